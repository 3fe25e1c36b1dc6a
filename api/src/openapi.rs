//! The OpenAPI document served at `/openapi.json`: poem-openapi's, finished with what its
//! derives cannot say, so that a client generated from it (openapi-generator, progenitor) and
//! a conformance run (schemathesis, see README "Testing") find every answer described.
//!
//! - **Error responses, per operation and per status.** Every error has the body
//!   `{"error": {"code", "message"}}` (`ErrorBody`). Which statuses an operation can answer
//!   comes from its shape — a request body: 400, 413, 415; query or header parameters: 400;
//!   path parameters: 404 (a malformed id answers like a missing one); a bearer token: 401;
//!   every operation that reads PostgreSQL or Redis: 503 — plus what its handler decides
//!   ([`HANDLER_ERRORS`]: 401 of a login, 403, 404, 409, 422, and the 429 of our own
//!   throttles). 429 and 503 carry `Retry-After`, 401 `WWW-Authenticate`.
//! - **One entry per path.** Two `OpenApi` impls serving the same path (the conversation's
//!   messages: listed by `ConversationsApi`, posted to `ChatApi`) are written by poem-openapi
//!   as two entries with the same key, and a JSON reader keeps only the last; their methods
//!   are merged here.
//!
//! - **Server-Sent Events, one event at a time.** Before OpenAPI 3.2 (`itemSchema`), the
//!   schema of a `text/event-stream` answer describes each event: `{id, event, data}` with
//!   `data` a string holding JSON. So `SseEvent` becomes one alternative per event name
//!   (`crate::sse::EVENT_SCHEMAS`) whose `data` declares `contentMediaType: application/json`
//!   and its payload's schema as `contentSchema`, and the stream's media type refers to it.
//!
//! Nullable fields are declared where they are defined (`#[oai(nullable)]` on every `Option`
//! of an `Object`); a test checks that every optional property is nullable.

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::{Map, Value, json};

/// Errors an operation's handler answers, beyond those its shape implies (see the module
/// comment): `(method, path, statuses)`. Every operation is listed (a test checks it), so a
/// new endpoint is a decision, not a default.
pub const HANDLER_ERRORS: &[(&str, &str, &[u16])] = &[
    ("get", "/healthz", &[]),
    ("get", "/readyz", &[]),
    ("get", "/metrics", &[]),
    // registration and login: throttled per client IP (and email); 409: email taken
    ("post", "/v1/auth/register", &[409, 429]),
    ("post", "/v1/auth/login", &[401, 429]),
    ("get", "/v1/me", &[]),
    // org administration: 403 for members (and for admins touching owners)
    ("post", "/v1/orgs/{org_id}/members", &[403, 409, 422]),
    ("get", "/v1/orgs/{org_id}/members", &[]),
    (
        "patch",
        "/v1/orgs/{org_id}/members/{user_id}",
        &[403, 409, 422],
    ),
    ("delete", "/v1/orgs/{org_id}/members/{user_id}", &[403, 409]),
    ("post", "/v1/orgs/{org_id}/teams", &[403, 409]),
    ("get", "/v1/orgs/{org_id}/teams", &[]),
    ("post", "/v1/teams/{team_id}/members", &[403, 409, 422]),
    ("delete", "/v1/teams/{team_id}/members/{user_id}", &[403]),
    ("post", "/v1/projects", &[403, 422]),
    ("get", "/v1/projects", &[]),
    ("get", "/v1/projects/{id}", &[]),
    ("post", "/v1/projects/{id}/members", &[409, 422]),
    ("delete", "/v1/projects/{id}/members/{user_id}", &[422]),
    ("post", "/v1/projects/{id}/tasks", &[422]),
    ("get", "/v1/projects/{id}/tasks", &[]),
    ("get", "/v1/tasks/{id}", &[]),
    ("patch", "/v1/tasks/{id}", &[422]),
    ("post", "/v1/projects/{id}/documents", &[422]),
    ("get", "/v1/projects/{id}/documents", &[]),
    ("get", "/v1/documents/{id}", &[]),
    ("delete", "/v1/documents/{id}", &[403]),
    ("post", "/v1/conversations", &[422]),
    ("get", "/v1/conversations", &[]),
    ("get", "/v1/conversations/{id}", &[]),
    ("get", "/v1/conversations/{id}/messages", &[]),
    // 429: MESSAGE_RATE_LIMIT, or too many open streams (SSE_MAX_STREAMS_PER_USER)
    // 409: an Idempotency-Key used before for another request
    ("post", "/v1/conversations/{id}/messages", &[409, 429]),
    (
        "get",
        "/v1/conversations/{id}/responses/{response_id}/events",
        &[429],
    ),
    ("get", "/v1/models", &[]),
    ("get", "/v1/orgs/{org_id}/settings/model", &[]),
    ("put", "/v1/orgs/{org_id}/settings/model", &[403, 422]),
    ("get", "/v1/orgs/{org_id}/settings/budget", &[403]),
    ("put", "/v1/orgs/{org_id}/settings/budget", &[403]),
    ("get", "/v1/conversations/{id}/actions", &[]),
    ("get", "/v1/actions/{id}", &[]),
    // 429: the org's token budget has no room for the continuation
    ("post", "/v1/actions/{id}/confirm", &[409, 429]),
    ("post", "/v1/actions/{id}/reject", &[409]),
];

/// Operations that answer without PostgreSQL or Redis (no 503).
const NO_DEPENDENCY: &[&str] = &["/healthz", "/metrics"];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn description(status: u16) -> &'static str {
    match status {
        400 => "Invalid input; the message names the field or parameter.",
        401 => "Missing, invalid or expired credentials.",
        403 => "Authenticated and allowed to see it, but not to do this.",
        404 => "Not found, or not visible to the caller (the same answer for both).",
        409 => "Conflicts with the current state.",
        413 => "The request body is too large.",
        415 => "Unsupported content type.",
        422 => "Well-formed but semantically invalid (e.g. `invalid_reference`).",
        429 => "Over one of the API's own limits; retry after `Retry-After` seconds.",
        502 => "The models failed.",
        503 => "A dependency is unavailable, or the server is busy; retry later.",
        _ => "Error.",
    }
}

fn error_response(status: u16) -> Value {
    let mut r = json!({
        "description": description(status),
        "content": {
            "application/json; charset=utf-8": {
                "schema": {"$ref": "#/components/schemas/ErrorBody"}
            }
        }
    });
    let header = match status {
        401 => Some((
            "WWW-Authenticate",
            "`Bearer` (the scheme to authenticate with)",
        )),
        429 | 503 => Some(("Retry-After", "Seconds to wait before retrying")),
        _ => None,
    };
    if let (Some((name, text)), Some(obj)) = (header, r.as_object_mut()) {
        let schema = if name == "Retry-After" {
            json!({"type": "integer", "minimum": 0})
        } else {
            json!({"type": "string"})
        };
        // 503 answers of a failed dependency (not the busy hasher) may come without it
        let required = status == 429 || name == "WWW-Authenticate";
        obj.insert(
            "headers".into(),
            json!({ name: {"description": text, "required": required, "schema": schema} }),
        );
    }
    r
}

/// The statuses an operation answers besides its successes.
pub fn error_statuses(method: &str, path: &str, op: &Value) -> Vec<u16> {
    let params: Vec<&Value> = op["parameters"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let has = |loc: &str| params.iter().any(|p| p["in"] == loc);
    let mut out: Vec<u16> = Vec::new();
    if op.get("requestBody").is_some() {
        out.extend([400, 413, 415]);
    }
    if has("query") || has("header") {
        out.push(400);
    }
    if has("path") {
        out.push(404);
    }
    if op
        .get("security")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty())
    {
        out.push(401);
    }
    if !NO_DEPENDENCY.contains(&path) {
        out.push(503);
    }
    if let Some((_, _, extra)) = HANDLER_ERRORS
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
    {
        out.extend(extra.iter());
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// An object whose repeated keys are merged (objects) instead of replaced.
struct Merged(Map<String, Value>);

impl<'de> Deserialize<'de> for Merged {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Merged;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Merged, A::Error> {
                let mut out = Map::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    match (out.get_mut(&k), v) {
                        (Some(Value::Object(have)), Value::Object(more)) => have.extend(more),
                        (_, v) => {
                            out.insert(k, v);
                        }
                    }
                }
                Ok(Merged(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct RawDocument {
    paths: Merged,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Finish poem-openapi's document (`OpenApiService::spec()`); see the module comment.
pub fn finish(spec: &str) -> Result<String, serde_json::Error> {
    let raw: RawDocument = serde_json::from_str(spec)?;
    let mut doc = raw.rest;
    let mut paths = raw.paths.0;
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for method in METHODS {
            let Some(op) = item.get_mut(method) else {
                continue;
            };
            let statuses = error_statuses(method, path, op);
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            responses.remove("4XX");
            for status in statuses {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| error_response(status));
            }
        }
    }
    for item in paths.values_mut() {
        for op in item
            .as_object_mut()
            .into_iter()
            .flat_map(|i| i.values_mut())
        {
            let responses = op.get_mut("responses").and_then(Value::as_object_mut);
            for r in responses.into_iter().flat_map(|r| r.values_mut()) {
                if let Some(sse) = r.pointer_mut("/content/text~1event-stream") {
                    sse["schema"] = json!({"$ref": "#/components/schemas/SseEvent"});
                }
            }
        }
    }
    if let Some(schemas) = doc
        .get_mut("components")
        .and_then(|c| c.get_mut("schemas"))
        .and_then(Value::as_object_mut)
    {
        schemas.insert("SseEvent".into(), sse_event_schema());
    }
    doc.insert("paths".into(), Value::Object(paths));
    serde_json::to_string(&doc)
}

/// One Server-Sent Event as a client reads it: `id`, `event`, and `data` (a JSON string).
fn sse_event_schema() -> Value {
    let variants: Vec<Value> = crate::sse::EVENT_SCHEMAS
        .iter()
        .map(|(event, payload)| {
            json!({
                "type": "object",
                "title": format!("SseEvent {event}"),
                "required": ["id", "event", "data"],
                "properties": {
                    "id": {"type": "string"},
                    "event": {"type": "string", "enum": [event]},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": format!("#/components/schemas/{payload}")},
                    },
                },
            })
        })
        .collect();
    json!({
        "description": "One Server-Sent Event: `id` (send it back as `Last-Event-ID` to resume \
            after it), `event` (its name) and `data` (JSON, by event name). Comment lines keep \
            the connection alive.",
        "oneOf": variants,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn repeated_paths_are_merged_and_errors_listed_per_status() {
        let spec = r#"{"openapi": "3.0.0", "paths": {
            "/v1/conversations/{id}/messages": {"get": {"parameters": [{"in": "path", "name": "id"}],
                "security": [{"BearerAuth": []}], "responses": {"200": {}, "4XX": {}}}},
            "/v1/conversations/{id}/messages": {"post": {"parameters": [{"in": "path", "name": "id"}],
                "requestBody": {}, "security": [{"BearerAuth": []}], "responses": {"200": {}, "4XX": {}}}},
            "/healthz": {"get": {"responses": {"200": {}}}}
        }, "components": {}}"#;
        let doc: Value = serde_json::from_str(&finish(spec).unwrap()).unwrap();
        let item = &doc["paths"]["/v1/conversations/{id}/messages"];
        let codes = |op: &Value| -> Vec<String> {
            op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        assert_eq!(codes(&item["get"]), ["200", "401", "404", "503"]);
        assert_eq!(
            codes(&item["post"]),
            [
                "200", "400", "401", "404", "409", "413", "415", "429", "503"
            ]
        );
        assert!(item["post"]["responses"]["429"]["headers"]["Retry-After"]["required"] == true);
        assert_eq!(codes(&doc["paths"]["/healthz"]["get"]), ["200"]);
        assert_eq!(doc["openapi"], "3.0.0");
    }
}
