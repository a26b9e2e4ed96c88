//! Environment-variable expansion of a config file's text, the way LiteFS does it.
//!
//! LiteFS runs Go's `os.Expand` over the whole file before parsing the YAML, with a
//! mapping that understands two boolean expressions. We follow it exactly so a file
//! means the same thing under both programs:
//!
//! - `${NAME}` and `$NAME` become the variable's value, or nothing when it is unset.
//! - `${NAME == 'text'}`, `${NAME != "text"}` become `true` or `false`; so does
//!   `${NAME == OTHER}`, which compares two variables.
//! - `$` followed by something that is not a name is left alone; `${` without a
//!   closing brace, and `${}`, are dropped (Go's "invalid syntax" rule).
//!
//! Expansion works on the raw text, so it also happens inside YAML comments; that is
//! harmless and is what LiteFS does.

/// The result of expanding a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    /// The text with every reference replaced.
    pub text: String,
    /// Names referenced as plain values (`${NAME}`, `$NAME`) that were not set; they
    /// expanded to the empty string. Callers log them, because an empty value is the
    /// usual cause of a confusing validation error later.
    pub unset: Vec<String>,
}

/// Expands `text` using `lookup` to read variables (normally `std::env::var`).
pub fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Expanded {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut unset = Vec::new();
    // Start of the not-yet-copied run of plain text.
    let mut copied = 0;
    let mut j = 0;
    while j < bytes.len() {
        if bytes[j] != b'$' || j + 1 >= bytes.len() {
            j += 1;
            continue;
        }
        out.push_str(&text[copied..j]);
        let (name, width) = shell_name(&text[j + 1..]);
        match name {
            None if width > 0 => {} // invalid syntax: the characters are dropped
            None => out.push('$'),
            Some(name) => out.push_str(&map(name, lookup, &mut unset)),
        }
        j += width + 1;
        copied = j;
    }
    out.push_str(&text[copied..]);
    Expanded { text: out, unset }
}

/// Reads the name after a `$`: returns the name (if any) and how many bytes it used.
fn shell_name(s: &str) -> (Option<&str>, usize) {
    let b = s.as_bytes();
    if b[0] == b'{' {
        if b.len() > 2 && is_special(b[1]) && b[2] == b'}' {
            return (Some(&s[1..2]), 3);
        }
        return match s[1..].find('}') {
            Some(0) => (None, 2),
            Some(i) => (Some(&s[1..i + 1]), i + 2),
            None => (None, 1),
        };
    }
    if is_special(b[0]) {
        return (Some(&s[..1]), 1);
    }
    let n = b.iter().take_while(|c| is_word(**c)).count();
    if n == 0 {
        (None, 0)
    } else {
        (Some(&s[..n]), n)
    }
}

fn is_special(c: u8) -> bool {
    matches!(c, b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-') || c.is_ascii_digit()
}

fn is_word(c: u8) -> bool {
    c == b'_' || c.is_ascii_alphanumeric()
}

/// What one `${...}` body turns into.
fn map(body: &str, lookup: &dyn Fn(&str) -> Option<String>, unset: &mut Vec<String>) -> String {
    let body = body.trim();
    if let Some((lhs, equal, rhs)) = parse_comparison(body) {
        let left = lookup(lhs).unwrap_or_default();
        let right = match rhs {
            Operand::Literal(s) => s.to_string(),
            Operand::Var(name) => lookup(name).unwrap_or_default(),
        };
        return ((left == right) == equal).to_string();
    }
    match lookup(body) {
        Some(v) => v,
        None => {
            if !unset.iter().any(|u| u == body) {
                unset.push(body.to_string());
            }
            String::new()
        }
    }
}

enum Operand<'a> {
    Literal(&'a str),
    Var(&'a str),
}

/// Parses `NAME == 'x'`, `NAME != "x"` or `NAME == OTHER`; `equal` is false for `!=`.
fn parse_comparison(s: &str) -> Option<(&str, bool, Operand<'_>)> {
    let lhs_len = s.bytes().take_while(|c| is_word(*c)).count();
    if lhs_len == 0 {
        return None;
    }
    let (lhs, rest) = s.split_at(lhs_len);
    let rest = rest.trim_start();
    let (equal, rest) = if let Some(r) = rest.strip_prefix("==") {
        (true, r)
    } else if let Some(r) = rest.strip_prefix("!=") {
        (false, r)
    } else {
        return None;
    };
    let rhs = rest.trim_start();
    for quote in ['\'', '"'] {
        if rhs.len() >= 2 && rhs.starts_with(quote) && rhs.ends_with(quote) {
            return Some((lhs, equal, Operand::Literal(&rhs[1..rhs.len() - 1])));
        }
    }
    if !rhs.is_empty() && rhs.bytes().all(is_word) {
        return Some((lhs, equal, Operand::Var(rhs)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(text: &str, vars: &[(&str, &str)]) -> Expanded {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        expand(text, &|k| env.get(k).cloned())
    }

    #[test]
    fn plain_references() {
        let vars = [("APP", "shop"), ("HOST", "n1")];
        assert_eq!(run("key: litefs/${APP}", &vars).text, "key: litefs/shop");
        assert_eq!(
            run("url: http://$HOST:20202", &vars).text,
            "url: http://n1:20202"
        );
        assert_eq!(run("${ APP }", &vars).text, "shop");
    }

    #[test]
    fn unset_variables_expand_to_nothing_and_are_reported() {
        let e = run("a: ${NOPE}/${NOPE}/$ALSO", &[]);
        assert_eq!(e.text, "a: //");
        assert_eq!(e.unset, ["NOPE", "ALSO"]);
    }

    #[test]
    fn comparisons_give_booleans() {
        let vars = [("FLY_REGION", "ord"), ("PRIMARY_REGION", "ord"), ("X", "a")];
        assert_eq!(run("${FLY_REGION == 'ord'}", &vars).text, "true");
        assert_eq!(run("${FLY_REGION=='iad'}", &vars).text, "false");
        assert_eq!(run("${FLY_REGION != \"iad\"}", &vars).text, "true");
        assert_eq!(run("${FLY_REGION == PRIMARY_REGION}", &vars).text, "true");
        assert_eq!(run("${X != PRIMARY_REGION}", &vars).text, "true");
        // An unset variable compares as the empty string, as in LiteFS.
        assert_eq!(run("${MISSING == ''}", &vars).text, "true");
        assert!(run("${MISSING == ''}", &vars).unset.is_empty());
    }

    #[test]
    fn go_edge_cases() {
        // `$` not followed by a name stays; a trailing `$` stays.
        assert_eq!(run("cost: 5$ and $", &[]).text, "cost: 5$ and $");
        assert_eq!(run("a $/b", &[]).text, "a $/b");
        // `${}` and an unterminated `${` are dropped, as Go's os.Expand does.
        assert_eq!(run("a${}b", &[]).text, "ab");
        assert_eq!(run("a${b", &[]).text, "ab");
        // Special one-character names.
        assert_eq!(run("x$1y", &[("1", "one")]).text, "xoney");
    }

    #[test]
    fn multibyte_text_is_kept() {
        assert_eq!(run("é: ${A}ü", &[("A", "ß")]).text, "é: ßü");
    }
}
