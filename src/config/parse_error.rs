//! Turning serde_yaml_ng's errors into [`ConfigError`]s that name the key and its line.

use super::{ConfigError, Location, locate};

/// Turns a serde_yaml_ng error into a [`ConfigError`] with the key and its line.
pub(super) fn yaml_error(e: &serde_yaml_ng::Error, text: &str, file: &str) -> ConfigError {
    let mut message = e.to_string();
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    // serde_yaml_ng prefixes the path of the value being read: "lease.consul: ...".
    let (path, message) = match message.split_once(": ") {
        Some((p, m))
            if !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.[]?".contains(c)) =>
        {
            (
                Some(p.trim_start_matches('.').to_string()).filter(|p| !p.is_empty()),
                m.to_string(),
            )
        }
        _ => (None, message),
    };
    let mark = e.location();
    let mut at = Location {
        file: file.to_string(),
        line: mark.as_ref().map(|m| m.line()),
        column: mark.as_ref().map(|m| m.column()),
    };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let key = match &path {
            Some(p) => format!("{p}.{field}"),
            None => field.to_string(),
        };
        if let Some(p) = locate::locate(text, &key) {
            at.line = Some(p.line);
            at.column = Some(p.column);
        }
        let expected = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        return ConfigError::UnknownKey { at, key, expected };
    }
    if let Some(rest) = message.strip_prefix("duplicate field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        let key = match &path {
            Some(p) => format!("{p}.{field}"),
            None => field.to_string(),
        };
        // serde points at the mapping; the second occurrence is the one to remove.
        if let Some(p) = locate::locate_all(text, &key).get(1) {
            at.line = Some(p.line);
            at.column = Some(p.column);
        }
        return ConfigError::Syntax {
            at,
            key: Some(key),
            message: "is set twice; keep one".to_string(),
        };
    }
    if let Some(p) = &path
        && let Some(pos) = locate::locate(text, p)
        && at.line.is_none()
    {
        at.line = Some(pos.line);
        at.column = Some(pos.column);
    }
    ConfigError::Syntax {
        at,
        key: path,
        message: friendlier(message),
    }
}

/// Rewrites serde's wording into the config's terms: enum variants are values, structs
/// are sections.
fn friendlier(message: String) -> String {
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((value, expected)) = rest.split_once('`')
    {
        let allowed: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        return format!(
            "unknown value '{value}' (expected one of: {})",
            allowed.join(", ")
        );
    }
    if let Some(i) = message.find("expected struct ") {
        return format!("{}expected a section of 'key: value' lines", &message[..i]);
    }
    message
}
