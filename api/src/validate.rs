//! Input checks shared by the endpoints. Every error names the field.

use crate::error::ApiError;

pub const PASSWORD_MIN_CHARS: usize = 8;
pub const PASSWORD_MAX_CHARS: usize = 256;

/// A trimmed, non-empty string of at most `max` characters.
pub fn text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(ApiError::invalid(format!("{field} must not be empty")));
    }
    optional_text(field, v, max)
}

/// A trimmed string (possibly empty) of at most `max` characters.
pub fn optional_text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let v = value.trim();
    if v.chars().count() > max {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    if v.chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(v.to_owned())
}

/// An email address of a plausible shape (`local@domain.tld`), trimmed; case is kept (lookups
/// are case-insensitive).
pub fn email(field: &str, value: &str) -> Result<String, ApiError> {
    let v = value.trim();
    let bad = || ApiError::invalid(format!("{field} must be an email address"));
    if v.len() < 3 || v.len() > 254 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = v.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.len() > 64
        || local.contains('@')
        || domain.len() < 3
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains("..")
    {
        return Err(bad());
    }
    Ok(v.to_owned())
}

/// A new password: 8 to 256 characters, not trimmed.
pub fn password(field: &str, value: &str) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n < PASSWORD_MIN_CHARS {
        return Err(ApiError::invalid(format!(
            "{field} must be at least {PASSWORD_MIN_CHARS} characters"
        )));
    }
    if n > PASSWORD_MAX_CHARS {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {PASSWORD_MAX_CHARS} characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert!(email("email", "a@b.co").is_ok());
        assert_eq!(
            email("email", "  Ann@Example.org ").unwrap(),
            "Ann@Example.org"
        );
        for bad in [
            "", "a", "a@b", "@b.co", "a@.co", "a@b.", "a b@c.de", "a@b..de",
        ] {
            let e = email("email", bad).unwrap_err().to_string();
            assert!(e.contains("email"), "{bad}: {e}");
        }
    }

    #[test]
    fn texts_and_passwords() {
        assert!(text("name", "   ", 10).is_err());
        assert!(text("name", "0123456789x", 10).is_err());
        assert_eq!(text("name", " ok ", 10).unwrap(), "ok");
        assert!(text("name", "a\u{0}b", 10).is_err());
        assert!(password("password", "short").is_err());
        assert!(password("password", "long enough").is_ok());
    }
}
