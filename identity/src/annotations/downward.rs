//! The downward-API annotations file: the kubelet publishes a pod's annotations to the pod as
//! `key="value"` lines (values quoted as Go's `%q` does) and rewrites the file when they change.

use std::collections::BTreeMap;

/// A line of the file that is not `key="value"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct DownwardApiError {
    pub line: usize,
    pub why: String,
}

/// Parses the downward-API annotations file: one `key="value"` per line, the value quoted as Go's
/// `%q` does (`\"`, `\\`, `\n`, `\t`, `\xNN`, `\uNNNN`, `\UNNNNNNNN`, ...).
pub(super) fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>, DownwardApiError> {
    let mut map = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| DownwardApiError {
            line: n + 1,
            why: why.to_owned(),
        };
        let (key, quoted) = line
            .split_once('=')
            .ok_or_else(|| bad("not key=\"value\""))?;
        let value = unquote(quoted).ok_or_else(|| bad("the value is not a quoted string"))?;
        map.insert(key.to_owned(), value);
    }
    Ok(map)
}

/// The 1-based line of each key in the downward-API file's text (the last one when a key is
/// repeated, as in [`parse_downward_api`]'s map).
pub(super) fn key_lines(text: &str) -> BTreeMap<String, usize> {
    text.lines()
        .enumerate()
        .filter_map(|(n, line)| Some((line.split_once('=')?.0.to_owned(), n + 1)))
        .collect()
}

/// Undoes Go's `strconv.Quote`.
fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return None,
            '\\' => {
                let e = chars.next()?;
                let hex = |chars: &mut std::str::Chars<'_>, n: usize| {
                    let digits: String = chars.by_ref().take(n).collect();
                    (digits.len() == n)
                        .then(|| u32::from_str_radix(&digits, 16).ok())
                        .flatten()
                };
                out.push(match e {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'a' => '\u{7}',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    'v' => '\u{b}',
                    '\\' => '\\',
                    '"' => '"',
                    '\'' => '\'',
                    'x' => char::from_u32(hex(&mut chars, 2)?)?,
                    'u' => char::from_u32(hex(&mut chars, 4)?)?,
                    'U' => char::from_u32(hex(&mut chars, 8)?)?,
                    _ => return None,
                });
            }
            c => out.push(c),
        }
    }
    Some(out)
}

/// Quotes a value as Go's `%q` does for printable text (what the kubelet writes); the inverse of
/// the parser above, for tests and tools that write the file.
pub fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes annotations in the downward-API file format (sorted by key, as the kubelet does).
pub fn to_downward_api(annotations: &BTreeMap<String, String>) -> String {
    annotations
        .iter()
        .map(|(k, v)| format!("{k}={}\n", quote(v)))
        .collect()
}
