//! The `_method` members of a JSON body, as Laravel reads them: for a request whose `Content-Type`
//! holds `/json` or `+json` anywhere, it decodes the body (`json_decode`) and reads its input from
//! that, so a top-level `"_method": "DELETE"` in a `POST` makes it route the request as `DELETE`
//! (Symfony's method override, on in Laravel). Express's `method-override` with a getter reading
//! `req.body._method` does the same after `express.json()`.
//!
//! Read without building the document: one pass over the bytes, which only looks at the members
//! of the top-level object and skips every value below them by counting brackets (no recursion,
//! so no depth limit that a parser of the app would not share). Names are unescaped (`\u005f` is
//! `_`) and matched as form names are ([`super::names_method`]: `_METHOD` too, which no framework
//! reads, is decided all the same); every member so named counts, not only the last (PHP keeps
//! the last of two). A string value is unescaped and read as a form value is
//! ([`super::override_named`]); any other value (a number, an array, `null`) is `?`, which no
//! method rule names. A body that is not valid JSON is read up to where it stops being so: PHP's
//! `json_decode` then gives nothing, and what was found before is decided all the same.

/// The methods the top-level `_method` members of a JSON body name (see the module's text).
pub(crate) fn method_overrides(body: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut at = Scan { body, i: 0 };
    // A UTF-8 byte order mark: `json_decode` refuses it, other parsers skip it.
    if at.body.starts_with(b"\xef\xbb\xbf") {
        at.i = 3;
    }
    at.skip_space();
    if !at.eat(b'{') {
        return found;
    }
    loop {
        at.skip_space();
        if at.peek() != Some(b'"') {
            // `}` (the end), or not JSON: nothing more to read either way.
            return found;
        }
        let Some(name) = at.string() else {
            return found;
        };
        at.skip_space();
        if !at.eat(b':') {
            return found;
        }
        at.skip_space();
        let named = super::names_method(name.iter().copied());
        if at.peek() == Some(b'"') {
            let Some(value) = at.string() else {
                if named {
                    // Cut short inside the value: decided as one no rule names.
                    super::add_distinct(&mut found, "?".to_owned());
                }
                return found;
            };
            if named
                && let Some(method) = super::override_named(Some(&value))
                && !super::add_distinct(&mut found, method)
            {
                return found;
            }
        } else {
            if named && !super::add_distinct(&mut found, "?".to_owned()) {
                return found;
            }
            if !at.skip_value() {
                return found;
            }
        }
        at.skip_space();
        if !at.eat(b',') {
            return found;
        }
    }
}

struct Scan<'a> {
    body: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.body.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let ate = self.peek() == Some(b);
        if ate {
            self.i += 1;
        }
        ate
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string starting at `"`, unescaped: UTF-8 bytes (a `\u` escape of a lone surrogate is
    /// U+FFFD). `None` when the body ends inside it or an escape is not JSON's.
    fn string(&mut self) -> Option<Vec<u8>> {
        debug_assert_eq!(self.peek(), Some(b'"'));
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let b = self.peek()?;
            self.i += 1;
            match b {
                b'"' => return Some(out),
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    let c = match e {
                        b'"' | b'\\' | b'/' => char::from(e),
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                b => out.push(b),
            }
        }
    }

    /// The character of a `\u` escape (after its `\u`), a surrogate pair's two escapes joined.
    fn unicode_escape(&mut self) -> Option<char> {
        let first = self.hex4()?;
        if (0xd800..0xdc00).contains(&first) && self.body[self.i..].starts_with(b"\\u") {
            let save = self.i;
            self.i += 2;
            match self.hex4() {
                Some(second) if (0xdc00..0xe000).contains(&second) => {
                    let c = 0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00);
                    return char::from_u32(c);
                }
                _ => self.i = save,
            }
        }
        Some(char::from_u32(first).unwrap_or('\u{fffd}'))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.body.get(self.i..self.i + 4)?;
        let mut v = 0;
        for &d in digits {
            v = v * 16 + char::from(d).to_digit(16)?;
        }
        self.i += 4;
        Some(v)
    }

    /// Skips one value that is not a string: a scalar up to the next `,`, `}`, `]` or space, or
    /// an array or object to its closing bracket (strings inside skipped whole, so a bracket in
    /// one counts for nothing). `false` when the body ends first or brackets do not match.
    fn skip_value(&mut self) -> bool {
        match self.peek() {
            None => false,
            Some(b'{' | b'[') => {
                let mut open: Vec<u8> = Vec::new();
                loop {
                    match self.peek() {
                        None => return false,
                        Some(b'"') => {
                            if self.string().is_none() {
                                return false;
                            }
                            continue;
                        }
                        Some(b @ (b'{' | b'[')) => open.push(if b == b'{' { b'}' } else { b']' }),
                        Some(b @ (b'}' | b']')) => {
                            if open.pop() != Some(b) {
                                return false;
                            }
                            if open.is_empty() {
                                self.i += 1;
                                return true;
                            }
                        }
                        Some(_) => {}
                    }
                    self.i += 1;
                }
            }
            Some(_) => {
                let start = self.i;
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.i += 1;
                }
                self.i > start
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(body: &str) -> Vec<String> {
        method_overrides(body.as_bytes())
    }

    #[test]
    fn top_level_method_members_are_found_in_any_spelling() {
        assert_eq!(found(r#"{"_method":"DELETE"}"#), ["DELETE"]);
        assert_eq!(
            found(r#"  {"a":1, "_method" : " put ", "b":[1,2]}"#),
            ["PUT"]
        );
        // Escaped names and values.
        assert_eq!(found(r#"{"\u005fmethod":"\u0044ELETE"}"#), ["DELETE"]);
        assert_eq!(found(r#"{"\u005Fmeth\u006fd":"patch"}"#), ["PATCH"]);
        // Every member so named, not only the last (PHP's).
        assert_eq!(
            found(r#"{"_method":"GET","x":{},"_method":"DELETE"}"#),
            ["GET", "DELETE"]
        );
        // Spellings a form name is read in.
        assert_eq!(found(r#"{"_METHOD":"DELETE"}"#), ["DELETE"]);
        assert_eq!(found(r#"{".method":"DELETE"}"#), ["DELETE"]);
        // After a byte order mark.
        assert_eq!(found("\u{feff}{\"_method\":\"DELETE\"}"), ["DELETE"]);
        // A value that is not a string is one no rule names.
        assert_eq!(found(r#"{"_method":["DELETE"]}"#), ["?"]);
        assert_eq!(found(r#"{"_method":null}"#), ["?"]);
        assert_eq!(found(r#"{"_method":12}"#), ["?"]);
        // An empty one asks for nothing.
        assert!(found(r#"{"_method":""}"#).is_empty());
    }

    #[test]
    fn members_below_the_top_level_and_other_documents_name_nothing() {
        for body in [
            r#"{"a":{"_method":"DELETE"}}"#,
            r#"{"a":["_method","DELETE"]}"#,
            r#"[{"_method":"DELETE"}]"#,
            r#"{"a":"_method","b":"DELETE"}"#,
            r#"{"a":"}\"_method\":","b":{"c":"]"}}"#,
            r#""_method""#,
            r#"{"_methods":"DELETE"}"#,
            "",
            "{",
            "null",
        ] {
            assert!(found(body).is_empty(), "{body}");
        }
    }

    #[test]
    fn a_body_that_stops_being_json_keeps_what_came_before() {
        // Found before the body broke: decided.
        assert_eq!(found(r#"{"_method":"DELETE", oops"#), ["DELETE"]);
        assert_eq!(found(r#"{"_method":"DELETE"} trailing"#), ["DELETE"]);
        // Cut short inside the value.
        assert_eq!(found(r#"{"_method":"DEL"#), ["?"]);
        // Not reached.
        assert!(found(r#"{"a":[}, "_method":"DELETE"}"#).is_empty());
        assert!(found(r#"{"a":"\x", "_method":"DELETE"}"#).is_empty());
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        let deep = format!(
            "{{\"a\":{}{},\"_method\":\"DELETE\"}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(found(&deep), ["DELETE"]);
    }
}
