//! Finds the line of a key path (`lease.consul.url`) in a YAML text.
//!
//! serde reports where a parse error happened, but a semantic error (a missing URL, a
//! static replica without `advertise-url`) is found after parsing, when positions are
//! gone. Config files are block-style YAML written by people, so an indentation scan
//! finds the key reliably; for anything it cannot follow (flow mappings, keys inside
//! block scalars) it answers `None` and the error simply names no line.

/// Position of a key: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column of the key's first character.
    pub column: usize,
}

/// Returns the position of the key at `path` (keys joined by `.`; sequence indexes such
/// as `exec[1]` are ignored), or `None` if it is not written in the text.
pub fn locate(text: &str, path: &str) -> Option<Position> {
    locate_all(text, path).into_iter().next()
}

/// Every position where the key at `path` is written, in file order (more than one
/// when a key is duplicated).
pub fn locate_all(text: &str, path: &str) -> Vec<Position> {
    let want = split_path(path);
    let mut found = Vec::new();
    if want.is_empty() {
        return found;
    }
    // Open mappings: (indentation of their keys, key).
    let mut stack: Vec<(usize, String)> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let Some((indent, key)) = key_of_line(raw) else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key));
        if stack.len() == want.len() && stack.iter().zip(&want).all(|((_, k), w)| k == w) {
            found.push(Position {
                line: n + 1,
                column: indent + 1,
            });
        }
    }
    found
}

/// Like [`locate`], but falls back to the nearest written ancestor: a missing
/// `lease.consul.url` points at the `consul:` line, or at `lease:`.
pub fn locate_nearest(text: &str, path: &str) -> Option<Position> {
    let mut keys = split_path(path);
    while !keys.is_empty() {
        if let Some(p) = locate(text, &keys.join(".")) {
            return Some(p);
        }
        keys.pop();
    }
    None
}

fn split_path(path: &str) -> Vec<String> {
    path.split('.')
        .map(|k| k.split('[').next().unwrap_or(k).to_string())
        .filter(|k| !k.is_empty())
        .collect()
}

/// The indentation and key of a `key: value` line (also `- key: value` inside a
/// sequence, whose key sits two columns to the right of the dash).
fn key_of_line(raw: &str) -> Option<(usize, String)> {
    let mut indent = raw.len() - raw.trim_start_matches(' ').len();
    let mut rest = &raw[indent..];
    while let Some(r) = rest.strip_prefix("- ") {
        let spaces = r.len() - r.trim_start_matches(' ').len();
        indent += 2 + spaces;
        rest = &r[spaces..];
    }
    if rest.is_empty() || rest.starts_with('#') {
        return None;
    }
    let (key, after) = if let Some(q) = rest.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let end = rest[1..].find(q)? + 1;
        (&rest[1..end], &rest[end + 1..])
    } else {
        let colon = rest
            .find(": ")
            .or_else(|| rest.strip_suffix(':').map(|s| s.len()))?;
        (rest[..colon].trim_end(), &rest[colon..])
    };
    if !after.trim_start().starts_with(':') || key.is_empty() {
        return None;
    }
    Some((indent, key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# comment with key: inside
fuse:
  dir: /litefs
lease:
  type: consul

  consul:
    url: http://x
    key: \"litefs/a\"
exec:
  - cmd: a
    if-candidate: true
  - cmd: b
\"quoted\": 1
";

    #[test]
    fn finds_nested_keys() {
        assert_eq!(
            locate(TEXT, "fuse.dir"),
            Some(Position { line: 3, column: 3 })
        );
        assert_eq!(
            locate(TEXT, "lease.consul.url"),
            Some(Position { line: 8, column: 5 })
        );
        assert_eq!(locate(TEXT, "lease.type").map(|p| p.line), Some(5));
        assert_eq!(
            locate(TEXT, "exec[0].if-candidate").map(|p| p.line),
            Some(12)
        );
        assert_eq!(locate(TEXT, "quoted").map(|p| p.line), Some(14));
        let cmds: Vec<usize> = locate_all(TEXT, "exec.cmd")
            .iter()
            .map(|p| p.line)
            .collect();
        assert_eq!(cmds, [11, 13]);
    }

    #[test]
    fn missing_keys() {
        assert_eq!(locate(TEXT, "lease.url"), None);
        assert_eq!(locate(TEXT, "consul"), None, "nested key is not top-level");
        assert_eq!(
            locate_nearest(TEXT, "lease.consul.ttl").map(|p| p.line),
            Some(7)
        );
        assert_eq!(locate_nearest(TEXT, "backup.type"), None);
    }
}
