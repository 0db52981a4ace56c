//! The policy document as a YAML tree in which every scalar knows its line and column, so that the
//! whole document can be checked and every problem reported at its place, not only the first.
//!
//! It is read by the one YAML library the policy has always used (serde_yaml_ng), with its scalar
//! rules (`8080` is an integer, `"8080"` a string, `~` and nothing are null), its limits on nesting
//! and on alias repetition, and its syntax errors. serde gives a `Deserialize` impl no positions;
//! serde_yaml_ng only attaches one to an error raised while a node is read. So a scalar is read by
//! a visitor that puts the value aside and then fails on purpose: the failure carries the scalar's
//! position, which is read back from the error's text (the generic error type has no other public
//! form), and the value is taken from where it was put. A scalar's event is consumed before its
//! visitor runs, so the reader is consistent after that failure. Sequences and mappings are read
//! normally; their position is that of their first scalar (the caller knows better for an empty
//! one: the key that holds it).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

/// 1-based `(line, column)` of a node, when known.
pub(super) type At = Option<(usize, usize)>;

/// The most nodes a document may make. A policy of [`super::MAX_POLICY_BYTES`] without aliases
/// has fewer (every node takes at least two bytes); aliases may repeat a node, and this bounds
/// what they can make the reader build.
pub(super) const MAX_NODES: usize = 600_000;

/// The most bytes of strings a document may make. Without aliases its strings are within its
/// [`super::MAX_POLICY_BYTES`]; an alias repeats a string whole, and the node budget counts it
/// as one node, so a file of one 512 KiB string and 170,000 aliases of it (under 1 MiB, well
/// within the node budget) made the reader build 87 GB.
pub(super) const MAX_STRING_BYTES: usize = 2 * super::MAX_POLICY_BYTES;

/// What is left for the reader to build: nodes, and bytes of strings.
struct Budget {
    nodes: Cell<usize>,
    string_bytes: Cell<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    pub(super) at: At,
    pub(super) value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    /// `~`, `null`, or no value at all.
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    /// A node with a local tag, e.g. `!audit x`: never valid in a policy.
    Tagged(String, Box<Node>),
}

impl Value {
    /// What a node is, for "invalid type: ..., expected ..." messages.
    pub(super) fn kind(&self) -> String {
        match self {
            Self::Null => "null".to_owned(),
            Self::Bool(b) => format!("boolean `{b}`"),
            Self::Int(i) => format!("integer `{i}`"),
            Self::Float(f) => format!("floating point `{f}`"),
            Self::Str(s) => format!("string {}", super::pattern::Shown(s)),
            Self::Seq(_) => "sequence".to_owned(),
            Self::Map(_) => "mapping".to_owned(),
            Self::Tagged(tag, _) => format!("tagged value `!{tag}`"),
        }
    }
}

/// Parses one YAML document into a tree. An error here is YAML-level (syntax, more than one
/// document, too deep, too many aliases or nodes) and ends the reading.
pub(super) fn parse(yaml: &str) -> Result<Node, serde_yaml_ng::Error> {
    let budget = Budget {
        nodes: Cell::new(MAX_NODES),
        string_bytes: Cell::new(MAX_STRING_BYTES),
    };
    NodeSeed { budget: &budget }.deserialize(serde_yaml_ng::Deserializer::from_str(yaml))
}

/// The message of the deliberate failure; no YAML text can put it into an error message after the
/// path, where it is looked for.
const PROBE: &str = "\u{0}meshid-policy-position\u{0}";

#[derive(Clone, Copy)]
struct NodeSeed<'b> {
    budget: &'b Budget,
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Node;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        let left = self.budget.nodes.get();
        if left == 0 {
            return Err(de::Error::custom(format_args!(
                "the policy has more than {MAX_NODES} yaml nodes"
            )));
        }
        self.budget.nodes.set(left - 1);
        let mut scalar = None;
        let visitor = NodeVisitor {
            seed: self,
            scalar: &mut scalar,
        };
        match deserializer.deserialize_any(visitor) {
            Ok(value) => {
                let at = first_position(&value);
                Ok(Node { at, value })
            }
            Err(error) => match scalar {
                Some(value) => Ok(Node {
                    at: probe_position(&error.to_string()),
                    value,
                }),
                None => Err(error),
            },
        }
    }
}

/// The position of a collection: that of its first node that has one.
fn first_position(value: &Value) -> At {
    match value {
        Value::Seq(items) => items.iter().find_map(|n| n.at),
        Value::Map(entries) => entries.iter().find_map(|(k, v)| k.at.or(v.at)),
        Value::Tagged(_, node) => node.at,
        _ => None,
    }
}

/// Reads `... PROBE at line L column C` (serde_yaml_ng leaves the position out at line 1 column 1).
fn probe_position(message: &str) -> At {
    let rest = &message[message.rfind(PROBE)? + PROBE.len()..];
    if rest.is_empty() {
        return Some((1, 1));
    }
    let (line, column) = rest.strip_prefix(" at line ")?.split_once(" column ")?;
    Some((line.parse().ok()?, column.parse().ok()?))
}

struct NodeVisitor<'b, 's> {
    seed: NodeSeed<'b>,
    scalar: &'s mut Option<Value>,
}

impl NodeVisitor<'_, '_> {
    /// Puts the scalar aside and fails, so that the reader attaches its position.
    fn aside<E: de::Error>(self, value: Value) -> Result<Value, E> {
        *self.scalar = Some(value);
        Err(E::custom(PROBE))
    }
}

impl<'de> Visitor<'de> for NodeVisitor<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any yaml value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.aside(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.aside(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.aside(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.aside(Value::Int(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.aside(Value::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.aside(Value::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        // Beyond i128: still an integer, and no port; i128::MAX says "too big" just as well.
        self.aside(Value::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.aside(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        let left = self.seed.budget.string_bytes.get();
        let Some(left) = left.checked_sub(v.len()) else {
            return Err(E::custom(format_args!(
                "the policy's strings, aliases repeated, are more than {MAX_STRING_BYTES} bytes"
            )));
        };
        self.seed.budget.string_bytes.set(left);
        self.aside(Value::Str(v.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.seed)? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(self.seed)? {
            let value = map.next_value_seed(self.seed)?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        use serde::de::VariantAccess;
        let (tag, content) = data.variant::<String>()?;
        let node = content.newtype_variant_seed(self.seed)?;
        Ok(Value::Tagged(tag, Box::new(node)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(node: &Node) -> (usize, usize) {
        node.at.expect("a position")
    }

    #[test]
    fn every_scalar_has_its_position() {
        let yaml = "a: 1\nb:\n  - x\n  - \"y z\"\n  - [true, ~, 1.5, -3]\nc: {d: e}\n";
        let root = parse(yaml).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        assert_eq!(at(&root), (1, 1));
        assert_eq!((at(&entries[0].0), at(&entries[0].1)), ((1, 1), (1, 4)));
        assert_eq!(entries[0].1.value, Value::Int(1));
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(at(&entries[1].1), (3, 5));
        assert_eq!(items[1].value, Value::Str("y z".into()));
        assert_eq!(at(&items[1]), (4, 5));
        let Value::Seq(flow) = &items[2].value else {
            panic!()
        };
        let kinds: Vec<_> = flow.iter().map(|n| (n.value.kind(), at(n))).collect();
        assert_eq!(
            kinds,
            [
                ("boolean `true`".to_owned(), (5, 6)),
                ("null".to_owned(), (5, 12)),
                ("floating point `1.5`".to_owned(), (5, 15)),
                ("integer `-3`".to_owned(), (5, 20)),
            ]
        );
        let Value::Map(inner) = &entries[2].1.value else {
            panic!()
        };
        assert_eq!((at(&inner[0].0), at(&inner[0].1)), ((6, 5), (6, 8)));
    }

    #[test]
    fn tags_aliases_and_empty_values() {
        let root = parse("a: !x 1\nb: &r [q]\nc: *r\nd:\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert!(
            matches!(&entries[0].1.value, Value::Tagged(t, n) if t == "x" && n.value == Value::Int(1))
        );
        assert_eq!(entries[2].1.value, entries[1].1.value);
        assert_eq!(entries[3].1.value, Value::Null);
        assert_eq!(parse("").unwrap().value, Value::Null);
        assert_eq!(parse("# only a comment\n").unwrap().value, Value::Null);
    }

    #[test]
    fn yaml_errors_end_the_reading() {
        for bad in ["a: [\n", "a: 1\n---\nb: 2\n", "a: *nowhere\n"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let many = format!("[{}]", "x,".repeat(MAX_NODES));
        let error = parse(&many).unwrap_err().to_string();
        assert!(error.contains("yaml nodes"), "{error}");
        // Aliases of one large string: each repeats it whole.
        let long = "x".repeat(512 * 1024);
        let aliased = format!("a: &a {long}\nb: [{}]\n", "*a,".repeat(100));
        let error = parse(&aliased).unwrap_err().to_string();
        assert!(error.contains("strings, aliases repeated"), "{error}");
        // The same string once, and a few aliases of it, are read.
        let few = format!("a: &a {long}\nb: [*a, *a]\n");
        assert!(parse(&few).is_ok());
    }

    #[test]
    fn positions_are_read_back_from_messages() {
        assert_eq!(probe_position(PROBE), Some((1, 1)));
        assert_eq!(
            probe_position(&format!("a.b[0]: {PROBE} at line 12 column 7")),
            Some((12, 7))
        );
        assert_eq!(probe_position("something else"), None);
    }
}
