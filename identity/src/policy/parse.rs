//! The policy's types, the file's limits (size, nesting) and the parse from text: YAML to a tree
//! ([`super::node`]), the tree to ports and rules ([`super::document`]).

use std::io::Read;
use std::path::Path;

use super::node::{self, At, Value};
use super::pattern::{IdPattern, Method, PathPattern};
use super::{MAX_FLOW_DEPTH, MAX_POLICY_BYTES, Mode, PolicyError, Protocol};

/// The rules of one inbound port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PortPolicy {
    pub(super) port: u16,
    /// Where the port number is in the file.
    pub(super) at: At,
    pub(super) protocol: Protocol,
    pub(super) rules: Vec<Rule>,
}

/// One entry of an `allow` list. `None` means any method or path; a list is never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rule {
    pub(super) id: IdPattern,
    pub(super) methods: Option<Vec<Method>>,
    pub(super) paths: Option<Vec<PathPattern>>,
    /// Where the rule's `id` is in the file.
    pub(super) at: At,
}

impl Rule {
    /// Whether the rule allows `method` (exact, case-sensitive); no `methods` allows any.
    pub(super) fn allows_method(&self, method: &str) -> bool {
        let Some(methods) = &self.methods else {
            return true;
        };
        methods.iter().any(|m| m.as_str() == method)
    }

    /// Whether this rule allows every peer and request that `other` allows, so that `other`, after
    /// it, never decides anything.
    pub(super) fn covers(&self, other: &Rule) -> bool {
        let methods = match (&self.methods, &other.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|m| mine.contains(m)),
        };
        let paths = match (&self.paths, &other.paths) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => theirs.iter().all(|q| mine.iter().any(|p| p.covers(q))),
        };
        self.id.covers(&other.id) && methods && paths
    }

    /// Whether the rule allows `path`, which must already be safe and without its query.
    pub(super) fn allows_path(&self, path: &str) -> bool {
        let Some(paths) = &self.paths else {
            return true;
        };
        paths.iter().any(|p| p.matches(path))
    }
}

/// Refuses flow collections nested deeper than [`MAX_FLOW_DEPTH`], naming the line and column.
///
/// A light scan, not a YAML parser: brackets in comments and quoted scalars do not count, and a
/// quote opens a scalar only where a node can start (line start, or after `[ { , : - ?`), as in
/// YAML. Brackets inside plain scalars count, which errs on the side of refusing. It guards against
/// mistakes and blunt attacks; a file crafted to fool it only slows its own reload, which runs on
/// the watcher's thread, never on the data plane.
fn check_flow_depth(yaml: &str) -> Result<(), PolicyError> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Code,
        Single,
        Double,
        Comment,
    }
    let mut state = State::Code;
    let mut depth = 0usize;
    // The last character that was not a space or tab on this line, outside quotes and comments.
    let mut last_significant: Option<char> = None;
    let mut previous = '\n';
    let (mut line, mut column) = (1usize, 0usize);
    let mut chars = yaml.chars();
    while let Some(c) = chars.next() {
        column += 1;
        match state {
            State::Code => {
                let node_may_start = matches!(
                    last_significant,
                    None | Some('[' | '{' | ',' | ':' | '-' | '?')
                );
                match c {
                    '[' | '{' => {
                        depth += 1;
                        if depth > MAX_FLOW_DEPTH {
                            return Err(PolicyError::Yaml {
                                location: Some((line, column)),
                                message: format!(
                                    "collections nested deeper than {MAX_FLOW_DEPTH} levels"
                                ),
                            });
                        }
                    }
                    ']' | '}' => depth = depth.saturating_sub(1),
                    '\'' if node_may_start => state = State::Single,
                    '"' if node_may_start => state = State::Double,
                    '#' if previous.is_whitespace() => state = State::Comment,
                    _ => {}
                }
                if state == State::Code && !matches!(c, ' ' | '\t' | '\r' | '\n') {
                    last_significant = Some(c);
                }
            }
            State::Single if c == '\'' => {
                state = State::Code;
                last_significant = Some(c);
            }
            State::Double if c == '\\' => {
                // An escaped character, whatever it is, does not end the scalar.
                if chars.next() == Some('\n') {
                    line += 1;
                    column = 0;
                } else {
                    column += 1;
                }
            }
            State::Double if c == '"' => {
                state = State::Code;
                last_significant = Some(c);
            }
            State::Comment if c == '\n' => state = State::Code,
            _ => {}
        }
        if c == '\n' {
            line += 1;
            column = 0;
            if state == State::Code {
                last_significant = None;
            }
        }
        previous = c;
    }
    Ok(())
}

/// Parses a document into its mode and its ports, sorted by port.
pub(super) fn parse_document(yaml: &str) -> Result<(Mode, Vec<PortPolicy>), PolicyError> {
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge);
    }
    if yaml.trim().is_empty() {
        return Err(PolicyError::Empty);
    }
    check_flow_depth(yaml)?;
    let root = node::parse(yaml).map_err(yaml_error)?;
    // A document of only comments (or `null`) reads as empty, not as an odd error.
    if root.value == Value::Null {
        return Err(PolicyError::Empty);
    }
    let (mode, mut ports) = super::document::read(&root)?;
    ports.sort_by_key(|p| p.port);
    Ok((mode, ports))
}

/// Reads a policy file (following symlinks), refusing anything but a regular file of at most
/// [`MAX_POLICY_BYTES`].
pub fn read_file(path: &Path) -> Result<Vec<u8>, PolicyError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without blocking, then checked: opening a FIFO would block until someone writes to
    // it, and a check of the path before opening it could be answered by a regular file that a
    // FIFO then replaced (reloads would have stopped for good, and shutdown waited on them).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(PolicyError::Read)?;
    if !file.metadata().map_err(PolicyError::Read)?.is_file() {
        return Err(PolicyError::NotAFile);
    }
    let mut bytes = Vec::new();
    let limit = MAX_POLICY_BYTES as u64 + 1;
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(PolicyError::Read)?;
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::TooLarge);
    }
    Ok(bytes)
}

/// Keeps the YAML library's message (which names the field, e.g. `inbound[0].allow[1].id: ...`) and
/// moves its position to the front, where the Display of [`PolicyError::Yaml`] always shows it (the
/// library leaves it out at line 1 column 1).
fn yaml_error(error: serde_yaml_ng::Error) -> PolicyError {
    let location = error.location().map(|l| (l.line(), l.column()));
    let mut message = error.to_string();
    if let Some((line, column)) = location {
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    PolicyError::Yaml { location, message }
}

#[cfg(test)]
mod tests {
    use super::super::{MAX_PROBLEMS, MAX_RULES, Policy};
    use super::*;

    const GOOD: &str = "\
mode: audit
inbound:
  - port: 8080
    protocol: http
    allow:
      - id: spiffe://cluster.local/ns/shop/sa/frontend
      - id: spiffe://cluster.local/ns/ops/sa/*
        methods: [GET]
        paths: [/metrics, /api/*]
  - port: 5432
    allow: []
";

    #[test]
    fn parses_a_good_policy() {
        let policy = Policy::parse(GOOD).unwrap();
        assert_eq!(policy.mode(), Mode::Audit);
        assert_eq!(policy.port_protocol(8080), Some(Protocol::Http));
        assert_eq!(policy.port_protocol(5432), Some(Protocol::Tcp));
        assert_eq!(policy.port_protocol(80), None);
        let (_, ports) = parse_document(GOOD).unwrap();
        assert_eq!(
            ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            [5432, 8080]
        );
        assert_eq!(ports[1].rules.len(), 2);
        assert_eq!(ports[1].rules[1].methods.as_ref().unwrap().len(), 1);
        assert_eq!(ports[1].rules[1].paths.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn defaults() {
        let policy = Policy::parse("inbound:\n  - port: 1\n    allow: []\n").unwrap();
        assert_eq!(policy.mode(), Mode::Enforce);
        assert_eq!(policy.port_protocol(1), Some(Protocol::Tcp));
        assert!(Policy::parse("inbound: []").is_ok());
        // `allow:` with no value (or null) is an empty list: it denies everything.
        for empty in ["", " ~", " null", " []"] {
            let policy =
                Policy::parse(&format!("inbound:\n  - port: 1\n    allow:{empty}\n")).unwrap();
            assert_eq!(policy.port_protocol(1), Some(Protocol::Tcp));
            let peer = crate::SpiffeId::parse("spiffe://td/a").unwrap();
            assert!(!policy.decide_connection(1, &peer).allowed);
        }
    }

    /// Each case: the document, and the pieces its error message must contain.
    #[test]
    fn rejections() {
        let rule = |extra: &str| {
            format!("inbound:\n  - port: 80\n    allow:\n      - id: spiffe://td/a\n{extra}")
        };
        let http = |extra: &str| rule(extra).replace("allow:", "protocol: http\n    allow:");
        #[rustfmt::skip]
        let cases: Vec<(&str, String, &[&str])> = vec![
            ("empty", String::new(), &["empty"]),
            ("blank", " \n\t\n".into(), &["empty"]),
            ("only comments", "# nothing yet\n".into(), &["empty"]),
            ("null", "~".into(), &["empty"]),
            ("bad yaml", "inbound: [\n".into(), &["line 2 column 1"]),
            ("not a mapping", "hello".into(), &["line 1 column 1", "invalid type"]),
            ("unknown top field", "mode: enforce\ninbond: []\n".into(), &["line 2 column 1", "unknown field `inbond`"]),
            ("missing inbound", "mode: audit\n".into(), &["missing field `inbound`"]),
            ("bad mode", "mode: strict\ninbound: []\n".into(), &["line 1 column 7", "mode", "unknown variant `strict`"]),
            ("unknown port field", "inbound:\n  - port: 80\n    alow: []\n".into(), &["line 3 column 5", "inbound[0]", "unknown field `alow`"]),
            ("unknown rule field", rule("        method: [GET]\n"), &["line 5 column 9", "unknown field `method`"]),
            ("bad protocol", "inbound:\n  - port: 80\n    protocol: grpc\n    allow: []\n".into(), &["line 3 column 15", "inbound[0].protocol", "grpc"]),
            ("port 0", "inbound:\n  - port: 0\n    allow: []\n".into(), &["line 2 column 11", "inbound[0].port", "integer `0`, expected a port number"]),
            ("port too big", "inbound:\n  - port: 65536\n    allow: []\n".into(), &["line 2 column 11", "inbound[0].port"]),
            ("port a string", "inbound:\n  - port: http\n    allow: []\n".into(), &["line 2 column 11", "inbound[0].port"]),
            ("missing allow", "inbound:\n  - port: 80\n".into(), &["missing field `allow`"]),
            ("duplicate key", "inbound: []\ninbound: []\n".into(), &["duplicate"]),
            ("duplicate port", "inbound:\n  - port: 80\n    allow: []\n  - port: 80\n    allow: []\n".into(), &["inbound[1].port", "already listed at inbound[0]"]),
            ("bad id", rule("").replace("spiffe://td/a", "spiffe://td/a/"), &["line 4 column 13", "inbound[0].allow[0].id", "trailing"]),
            ("partial wildcard", rule("").replace("td/a", "td/a*"), &["line 4 column 13", "whole path segment"]),
            ("wildcard trust domain", rule("").replace("td/a", "*/a"), &["line 4 column 13", "trust domain"]),
            ("methods on tcp", rule("        methods: [GET]\n"), &["inbound[0].allow[0].methods", "protocol: http"]),
            ("paths on tcp", rule("        paths: [/x]\n"), &["inbound[0].allow[0].paths", "protocol: http"]),
            ("empty methods", http("        methods: []\n"), &["line 6 column 9", "inbound[0].allow[0].methods", "must not be empty"]),
            ("empty paths", http("        paths: []\n"), &["line 6 column 9", "inbound[0].allow[0].paths", "must not be empty"]),
            ("null methods", http("        methods:\n"), &["line 6 column 9", "inbound[0].allow[0].methods", "must not be empty"]),
            ("methods not a list", http("        methods: GET\n"), &["line 6 column 18", "methods", "invalid type"]),
            ("bad method", http("        methods: [GET, \"PO ST\"]\n"), &["line 6 column 24", "inbound[0].allow[0].methods[1]", "ascii letters"]),
            ("relative path", http("        paths: [metrics]\n"), &["line 6 column 17", "paths[0]", "start with '/'"]),
            ("inner wildcard", http("        paths: [/a/*/b]\n"), &["line 6 column 17", "\"/*\""]),
            ("unsafe path", http("        paths: [/a/../b]\n"), &["line 6 column 17", "never matches"]),
            ("two documents", "inbound: []\n---\ninbound: []\n".into(), &["more than one document"]),
        ];
        let mut wrong = Vec::new();
        for (name, yaml, expected) in cases {
            let error = Policy::parse(&yaml).expect_err(name);
            // One of the problems has every piece, and starts with its position.
            let problems: Vec<String> = error.problems().iter().map(|p| p.to_string()).collect();
            let found = problems.iter().any(|p| {
                expected.iter().all(|piece| p.contains(piece))
                    && expected
                        .first()
                        .filter(|first| first.starts_with("line "))
                        .is_none_or(|position| {
                            p.starts_with(position) && p.matches(position).count() == 1
                        })
            });
            if !found {
                wrong.push(format!("{name}: {problems:?} lacks {expected:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Every problem is reported, each at its place, in file order; the file is refused as a whole.
    #[test]
    fn every_problem_is_reported_with_its_place() {
        let yaml = "\
inbound:
  - port: 0
    allow:
      - id: spiffe://cluster.local/ns/a/sa/x*
      - id: spiffe://cluster.local/ns/a/sa/ok
        methods: [GET]
  - port: 9000
    protocl: tcp
    allow: []
";
        let error = Policy::parse(yaml).unwrap_err();
        let problems: Vec<String> = error.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            problems,
            [
                "line 2 column 11: inbound[0].port: invalid value: integer `0`, expected a port \
                 number from 1 to 65535",
                "line 4 column 13: inbound[0].allow[0].id: \"spiffe://cluster.local/ns/a/sa/x*\": \
                 '*' must be a whole path segment",
                "line 6 column 9: inbound[0].allow[1].methods: methods are only allowed on a port \
                 with `protocol: http`",
                "line 8 column 5: inbound[1]: unknown field `protocl`, expected one of `port`, \
                 `protocol`, `allow`",
            ]
        );
        let text = error.to_string();
        assert!(text.starts_with("4 problems: line 2 column 11: "), "{text}");
        assert!(matches!(error, PolicyError::Several(ref e) if e.len() == 4));

        // Problems in every kind of place, and a duplicate port after a good one.
        let yaml = "mode: strict\nmode: audit\ninbound:\n  - port: 80\n    protocol: http\n    allow:\n      - id: spiffe://td/a\n        methods: [GET, 7]\n        paths: []\n  - port: 80\n    allow: nope\n  - 5\n";
        let error = Policy::parse(yaml).unwrap_err();
        let problems: Vec<String> = error.problems().iter().map(|p| p.to_string()).collect();
        let expected = [
            "line 1 column 7: mode: unknown variant `strict`",
            "line 2 column 1: duplicate field `mode`",
            "line 8 column 24: inbound[0].allow[0].methods[1]: invalid type: integer `7`",
            "line 9 column 9: inbound[0].allow[0].paths: the list must not be empty",
            "line 10 column 11: inbound[1].port: port 80 is already listed at inbound[0]",
            "line 11 column 12: inbound[1].allow: invalid type: string \"nope\", expected a list",
            "line 12 column 5: inbound[2]: invalid type: integer `5`, expected a port",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (got, want) in problems.iter().zip(expected) {
            assert!(
                got.starts_with(want),
                "{got:?} does not start with {want:?}"
            );
        }
    }

    #[test]
    fn problems_are_capped() {
        let mut yaml = String::from("inbound:\n");
        for _ in 0..MAX_PROBLEMS + 20 {
            yaml.push_str("  - port: 0\n    allow: []\n");
        }
        let error = Policy::parse(&yaml).unwrap_err();
        let problems = error.problems();
        assert_eq!(problems.len(), MAX_PROBLEMS + 1);
        assert_eq!(
            problems[MAX_PROBLEMS].to_string(),
            "20 more problems not shown"
        );
    }

    /// Every prefix of a good file (what a torn write leaves) and some hostile YAML: an error or a
    /// policy, never a panic.
    #[test]
    fn hostile_input_never_panics() {
        for cut in 0..=GOOD.len() {
            let _ = Policy::parse(&GOOD[..cut]);
        }
        let nested = format!("inbound: {}{}", "[".repeat(10_000), "]".repeat(10_000));
        let laughs = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n\
                      c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c]\n";
        let hostile = [
            &nested,
            laughs,
            "inbound: !!binary AAAA",
            "\u{feff}inbound: []",
            "- - -",
        ];
        for yaml in hostile {
            assert!(
                Policy::parse(yaml).is_err() || yaml.contains('\u{feff}'),
                "{yaml:.40}"
            );
        }
    }

    #[test]
    fn size_and_rule_limits() {
        // Deep flow nesting is refused before the YAML parser sees it (its cost is quadratic).
        let deep = format!("inbound: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        match Policy::parse(&deep) {
            Err(PolicyError::Yaml {
                location: Some((1, column)),
                message,
            }) => {
                assert_eq!(column, 10 + MAX_FLOW_DEPTH, "{message}");
                assert!(message.contains("nested deeper"), "{message}");
            }
            other => panic!("deep nesting: {other:?}"),
        }
        // Brackets in comments, quoted scalars and plain words do not count; real nesting does.
        let fine = format!(
            "# {}\ninbound:\n  - port: 8080 # {}\n    protocol: http\n    allow:\n      - id: spiffe://td/a\n        paths: ['/{}', \"/{}\\\"\"]\n",
            "[".repeat(100),
            "{".repeat(100),
            "[".repeat(100),
            "{".repeat(100)
        );
        assert!(Policy::parse(&fine).is_ok(), "{:?}", Policy::parse(&fine));
        for hiding in ["\"x\", ", "it's, ", "x 'y, "] {
            let nested = format!("inbound: [{hiding}{}]\n", "[".repeat(MAX_FLOW_DEPTH));
            match Policy::parse(&nested) {
                Err(PolicyError::Yaml { message, .. }) if message.contains("nested deeper") => {}
                other => panic!("{hiding:?} hid the nesting: {other:?}"),
            }
        }
        let huge = format!("inbound: []\n#{}\n", "x".repeat(MAX_POLICY_BYTES));
        assert!(matches!(Policy::parse(&huge), Err(PolicyError::TooLarge)));
        let mut many = String::from("inbound:\n  - port: 1\n    allow:\n");
        for _ in 0..=MAX_RULES {
            many.push_str("      - id: spiffe://td/a\n");
        }
        let error = Policy::parse(&many).unwrap_err().to_string();
        assert!(
            error.contains("inbound: 10001 rules is more than the limit of 10000"),
            "{error}"
        );
    }

    #[test]
    fn read_file_limits() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(read_file(dir.path()), Err(PolicyError::NotAFile)));
        assert!(matches!(
            read_file(&dir.path().join("missing")),
            Err(PolicyError::Read(_))
        ));
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_POLICY_BYTES + 1]).unwrap();
        assert!(matches!(read_file(&big), Err(PolicyError::TooLarge)));
        std::fs::write(&big, vec![b'#'; MAX_POLICY_BYTES]).unwrap();
        assert_eq!(read_file(&big).unwrap().len(), MAX_POLICY_BYTES);
        // A FIFO (no writer) is refused without waiting for one.
        let fifo = dir.path().join("fifo.yaml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        assert!(matches!(read_file(&fifo), Err(PolicyError::NotAFile)));
    }

    #[test]
    fn load_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        let error = Policy::load(&path).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("policy file {}: cannot read", path.display())),
            "{error}"
        );
        std::fs::write(&path, "inbound:\n  - port: 0\n    allow: []\n").unwrap();
        let error = Policy::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("policy.yaml: line 2 column 11: inbound[0].port"),
            "{error}"
        );
        std::fs::write(&path, b"inbound: [] # \xff\n").unwrap();
        assert!(
            Policy::load(&path)
                .unwrap_err()
                .to_string()
                .contains("utf-8")
        );
        std::fs::write(&path, GOOD).unwrap();
        assert_eq!(Policy::load(&path).unwrap(), Policy::parse(GOOD).unwrap());
    }
}
