//! A small validator for the JSON Schema subset the tool definitions use: an object with
//! `properties`, `required` and `additionalProperties: false`; property `type` `string`,
//! `integer` or `null` (or a list of them), `enum`, `minLength`/`maxLength`, `minimum`/
//! `maximum` and `format: uuid`. The schema the model is shown is the one arguments are checked
//! against, so the two cannot drift.

use serde_json::{Map, Value};

/// Check `args` against `schema`; the error names the field.
pub fn validate(schema: &Value, args: &Value) -> Result<(), String> {
    let Some(obj) = args.as_object() else {
        return Err("the arguments must be a JSON object".into());
    };
    let empty = Map::new();
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !obj.contains_key(name) {
                return Err(format!("{name}: is required"));
            }
        }
    }
    for (name, value) in obj {
        let Some(prop) = props.get(name) else {
            return Err(format!("{name}: unknown argument"));
        };
        check(name, prop, value)?;
    }
    Ok(())
}

fn type_names(prop: &Value) -> Vec<&str> {
    match prop.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn check(name: &str, prop: &Value, value: &Value) -> Result<(), String> {
    let types = type_names(prop);
    match value {
        Value::Null if types.contains(&"null") => Ok(()),
        Value::String(s) if types.contains(&"string") => {
            let chars = s.chars().count();
            if let Some(min) = prop.get("minLength").and_then(Value::as_u64)
                && (chars as u64) < min
            {
                return Err(format!("{name}: must be at least {min} characters"));
            }
            if let Some(max) = prop.get("maxLength").and_then(Value::as_u64)
                && (chars as u64) > max
            {
                return Err(format!("{name}: must be at most {max} characters"));
            }
            if prop.get("format").and_then(Value::as_str) == Some("uuid")
                && uuid::Uuid::parse_str(s).is_err()
            {
                return Err(format!("{name}: must be a UUID"));
            }
            if let Some(allowed) = prop.get("enum").and_then(Value::as_array)
                && !allowed.iter().any(|a| a.as_str() == Some(s))
            {
                let list: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
                return Err(format!("{name}: must be one of {}", list.join(", ")));
            }
            Ok(())
        }
        Value::Number(n) if types.contains(&"integer") => {
            let Some(i) = n.as_i64() else {
                return Err(format!("{name}: must be an integer"));
            };
            if let Some(min) = prop.get("minimum").and_then(Value::as_i64)
                && i < min
            {
                return Err(format!("{name}: must be at least {min}"));
            }
            if let Some(max) = prop.get("maximum").and_then(Value::as_i64)
                && i > max
            {
                return Err(format!("{name}: must be at most {max}"));
            }
            Ok(())
        }
        _ => Err(format!("{name}: must be of type {}", types.join(" or "))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "title": {"type": "string", "minLength": 1, "maxLength": 5},
                "status": {"type": "string", "enum": ["todo", "done"]},
                "who": {"type": ["string", "null"], "format": "uuid"},
                "n": {"type": "integer", "minimum": 1, "maximum": 3},
            },
            "required": ["id"],
            "additionalProperties": false,
        })
    }

    #[test]
    fn accepts_valid_arguments() {
        let id = uuid::Uuid::nil().to_string();
        validate(&schema(), &json!({"id": id})).unwrap();
        validate(
            &schema(),
            &json!({"id": id, "title": "abc", "status": "done", "who": null, "n": 2}),
        )
        .unwrap();
    }

    #[test]
    fn names_the_field_of_each_violation() {
        let id = uuid::Uuid::nil().to_string();
        for (args, field) in [
            (json!({}), "id: is required"),
            (json!({"id": "nope"}), "id: must be a UUID"),
            (json!({"id": id, "title": ""}), "title: must be at least"),
            (
                json!({"id": id, "title": "abcdef"}),
                "title: must be at most",
            ),
            (
                json!({"id": id, "status": "later"}),
                "status: must be one of",
            ),
            (json!({"id": id, "extra": 1}), "extra: unknown argument"),
            (
                json!({"id": id, "title": 5}),
                "title: must be of type string",
            ),
            (json!({"id": id, "n": 9}), "n: must be at most 3"),
            (json!({"id": id, "status": null}), "status: must be of type"),
            (json!([1]), "must be a JSON object"),
        ] {
            let e = validate(&schema(), &args).unwrap_err();
            assert!(e.contains(field), "{args}: {e}");
        }
    }
}
