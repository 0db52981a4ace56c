//! A policy document read from its YAML tree: every field checked and every problem collected with
//! its line and column, so that a file with several mistakes is answered with all of them. The
//! document is accepted only when there is no problem at all.

use std::collections::HashMap;
use std::fmt;

use super::node::{At, Node, Value};
use super::parse::{PortPolicy, Rule};
use super::pattern::{IdPattern, Method, PathPattern, PatternError, Shown};
use super::{MAX_RULES, Mode, PolicyError, Protocol};

/// The most problems reported for one document; one more line says how many were left out.
pub const MAX_PROBLEMS: usize = 100;

/// Reads a parsed YAML document into its mode and its ports (in file order).
pub(super) fn read(root: &Node) -> Result<(Mode, Vec<PortPolicy>), PolicyError> {
    let mut problems = Problems::default();
    let document = document(root, &mut problems);
    problems.finish(document)
}

/// The problems found so far, each with its position and a message that starts with the field.
#[derive(Default)]
struct Problems(Vec<(At, String)>);

impl Problems {
    fn push(&mut self, at: At, path: &str, message: impl fmt::Display) {
        let message = match path {
            "" => message.to_string(),
            path => format!("{path}: {message}"),
        };
        self.0.push((at, message));
    }

    /// The value when nothing was found; otherwise the problems in file order.
    fn finish<T>(mut self, value: Option<T>) -> Result<T, PolicyError> {
        if self.0.is_empty()
            && let Some(value) = value
        {
            return Ok(value);
        }
        self.0.sort_by_key(|(at, _)| (at.is_none(), *at));
        let total = self.0.len();
        let mut errors: Vec<PolicyError> = self
            .0
            .into_iter()
            .take(MAX_PROBLEMS)
            .map(|(location, message)| PolicyError::Yaml { location, message })
            .collect();
        if total > MAX_PROBLEMS {
            errors.push(PolicyError::Yaml {
                location: None,
                message: format!("{} more problems not shown", total - MAX_PROBLEMS),
            });
        }
        match errors.len() {
            // Unreachable (no problem and no value), but an error is the safe answer.
            0 => Err(PolicyError::Empty),
            1 => Err(errors.remove(0)),
            _ => Err(PolicyError::Several(errors)),
        }
    }
}

/// A field of a mapping: where its key and value are, and its path (`inbound[0].allow[1].id`).
struct Field<'a> {
    name: String,
    key_at: At,
    /// The value's position; the key's for a null or empty value.
    at: At,
    node: &'a Node,
    path: String,
}

struct Fields<'a> {
    at: At,
    path: String,
    list: Vec<Field<'a>>,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&Field<'a>> {
        self.list.iter().find(|f| f.name == name)
    }

    fn required(&self, name: &str, problems: &mut Problems) -> Option<&Field<'a>> {
        let field = self.get(name);
        if field.is_none() {
            problems.push(self.at, &self.path, format_args!("missing field `{name}`"));
        }
        field
    }
}

/// The fields of a mapping (a null or empty value is an empty mapping), each known and once.
fn fields<'a>(
    node: &'a Node,
    fallback: At,
    path: &str,
    expecting: &str,
    names: &[&str],
    problems: &mut Problems,
) -> Option<Fields<'a>> {
    let at = node.at.or(fallback);
    let entries: &[(Node, Node)] = match &node.value {
        Value::Map(entries) => entries,
        Value::Null => &[],
        other => {
            let message = format_args!("invalid type: {}, expected {expecting}", other.kind());
            problems.push(at, path, message);
            return None;
        }
    };
    let mut list: Vec<Field<'a>> = Vec::new();
    for (key, value) in entries {
        let Value::Str(name) = &key.value else {
            let message = format_args!("invalid type: {}, expected a field name", key.value.kind());
            problems.push(key.at, path, message);
            continue;
        };
        let field_path = match path {
            "" => name.clone(),
            path => format!("{path}.{name}"),
        };
        if !names.contains(&name.as_str()) {
            let message = format_args!("unknown field `{}`, expected {}", name, one_of(names));
            problems.push(key.at, path, message);
        } else if list.iter().any(|f| f.name == *name) {
            problems.push(key.at, path, format_args!("duplicate field `{name}`"));
        } else {
            let empty = match &value.value {
                Value::Null => true,
                Value::Seq(items) => items.is_empty(),
                Value::Map(entries) => entries.is_empty(),
                _ => false,
            };
            list.push(Field {
                name: name.clone(),
                key_at: key.at,
                at: if empty { key.at } else { value.at.or(key.at) },
                node: value,
                path: field_path,
            });
        }
    }
    Some(Fields {
        at,
        path: path.to_owned(),
        list,
    })
}

/// `` `a` ``, `` `a` or `b` ``, or `` one of `a`, `b`, `c` ``, as serde words it.
fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.as_slice() {
        [one] => one.clone(),
        [a, b] => format!("{a} or {b}"),
        all => format!("one of {}", all.join(", ")),
    }
}

/// The items of a list; a null or empty value is an empty list.
fn list<'a>(field: &Field<'a>, expecting: &str, problems: &mut Problems) -> Option<&'a [Node]> {
    match &field.node.value {
        Value::Seq(items) => Some(items),
        Value::Null => Some(&[]),
        other => {
            let message = format_args!("invalid type: {}, expected {expecting}", other.kind());
            problems.push(field.at, &field.path, message);
            None
        }
    }
}

fn document(root: &Node, problems: &mut Problems) -> Option<(Mode, Vec<PortPolicy>)> {
    let expecting = "a policy: a mapping with `inbound` and optionally `mode`";
    let fields = fields(
        root,
        Some((1, 1)),
        "",
        expecting,
        &["mode", "inbound"],
        problems,
    )?;
    let mode = match fields.get("mode") {
        None => Some(Mode::Enforce),
        Some(field) => word(
            field,
            &[("enforce", Mode::Enforce), ("audit", Mode::Audit)],
            problems,
        ),
    };
    let ports = fields
        .required("inbound", problems)
        .and_then(|field| inbound(field, problems));
    Some((mode?, ports?))
}

/// One of a few words, e.g. `enforce` or `audit`.
fn word<T: Copy>(field: &Field<'_>, words: &[(&str, T)], problems: &mut Problems) -> Option<T> {
    let names: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
    let message = match &field.node.value {
        Value::Str(s) => match words.iter().find(|(w, _)| w == s) {
            Some((_, value)) => return Some(*value),
            None => format!("unknown variant `{}`, expected {}", s, one_of(&names)),
        },
        other => format!(
            "invalid type: {}, expected {}",
            other.kind(),
            one_of(&names)
        ),
    };
    problems.push(field.at, &field.path, message);
    None
}

fn inbound(field: &Field<'_>, problems: &mut Problems) -> Option<Vec<PortPolicy>> {
    let items = list(field, "a list of ports", problems)?;
    let mut ports = Vec::new();
    let mut all_good = true;
    let mut seen = HashMap::new();
    let mut total_rules = 0usize;
    for (i, item) in items.iter().enumerate() {
        let path = format!("{}[{i}]", field.path);
        let Some(PortEntry {
            port,
            number,
            rules,
        }) = port(item, item.at.or(field.at), &path, problems)
        else {
            all_good = false;
            continue;
        };
        total_rules += rules;
        if let Some((number, at)) = number
            && let Some(first) = seen.insert(number, i)
        {
            let message = format_args!("port {number} is already listed at inbound[{first}]");
            problems.push(at, &format!("{path}.port"), message);
        }
        match port {
            Some(port) => ports.push(port),
            None => all_good = false,
        }
    }
    if total_rules > MAX_RULES {
        let message = format_args!("{total_rules} rules is more than the limit of {MAX_RULES}");
        problems.push(field.key_at, &field.path, message);
        all_good = false;
    }
    all_good.then_some(ports)
}

/// What one entry of `inbound` gave: the port (if all of it is good), its number and where it is
/// (if that is good), and how many rules it lists.
struct PortEntry {
    port: Option<PortPolicy>,
    number: Option<(u16, At)>,
    rules: usize,
}

fn port(node: &Node, fallback: At, path: &str, problems: &mut Problems) -> Option<PortEntry> {
    let expecting = "a port: a mapping with `port`, `allow` and optionally `protocol`";
    let names = ["port", "protocol", "allow"];
    let fields = fields(node, fallback, path, expecting, &names, problems)?;
    let number_field = fields.required("port", problems);
    let number = number_field.and_then(|field| port_number(field, problems));
    let protocol = match fields.get("protocol") {
        None => Some(Protocol::Tcp),
        Some(field) => word(
            field,
            &[("tcp", Protocol::Tcp), ("http", Protocol::Http)],
            problems,
        ),
    };
    let allow = fields.required("allow", problems);
    let items = allow.and_then(|field| list(field, "a list of rules", problems));
    let count = items.map_or(0, <[Node]>::len);
    let rules = allow.zip(items).and_then(|(field, items)| {
        let mut rules = Vec::new();
        for (j, item) in items.iter().enumerate() {
            let path = format!("{}[{j}]", field.path);
            rules.push(rule(item, item.at.or(field.at), &path, protocol, problems));
        }
        rules.into_iter().collect::<Option<Vec<Rule>>>()
    });
    let port = match (number, protocol, rules) {
        (Some(port), Some(protocol), Some(rules)) => Some(PortPolicy {
            port,
            at: number_field.and_then(|f| f.at),
            protocol,
            rules,
        }),
        _ => None,
    };
    let at = number_field.and_then(|f| f.at);
    Some(PortEntry {
        port,
        number: number.map(|n| (n, at)),
        rules: count,
    })
}

fn port_number(field: &Field<'_>, problems: &mut Problems) -> Option<u16> {
    let expecting = "a port number from 1 to 65535";
    let message = match &field.node.value {
        Value::Int(n) => match u16::try_from(*n) {
            Ok(port) if port != 0 => return Some(port),
            _ => format!("invalid value: integer `{n}`, expected {expecting}"),
        },
        other => format!("invalid type: {}, expected {expecting}", other.kind()),
    };
    problems.push(field.at, &field.path, message);
    None
}

fn rule(
    node: &Node,
    fallback: At,
    path: &str,
    protocol: Option<Protocol>,
    problems: &mut Problems,
) -> Option<Rule> {
    let expecting = "a rule: a mapping with `id` and optionally `methods` and `paths`";
    let fields = fields(
        node,
        fallback,
        path,
        expecting,
        &["id", "methods", "paths"],
        problems,
    )?;
    let id_field = fields.required("id", problems);
    let id = id_field.and_then(|field| {
        parsed(
            field.node,
            field.at,
            &field.path,
            "a spiffe id pattern",
            IdPattern::parse,
            problems,
        )
    });
    let methods = optional_list(
        &fields,
        "methods",
        "an http method",
        Method::parse,
        protocol,
        problems,
    );
    let paths = optional_list(
        &fields,
        "paths",
        "a request path",
        PathPattern::parse,
        protocol,
        problems,
    );
    Some(Rule {
        id: id?,
        methods: methods?,
        paths: paths?,
        at: id_field.and_then(|f| f.at),
    })
}

/// `methods` or `paths` of a rule: `Some(None)` when left out (any), `None` when wrong.
fn optional_list<T>(
    fields: &Fields<'_>,
    name: &str,
    expecting: &str,
    parse: fn(&str) -> Result<T, PatternError>,
    protocol: Option<Protocol>,
    problems: &mut Problems,
) -> Option<Option<Vec<T>>> {
    let Some(field) = fields.get(name) else {
        return Some(None);
    };
    let list = non_empty(field, expecting, parse, problems);
    if protocol == Some(Protocol::Tcp) {
        let message = format_args!("{name} are only allowed on a port with `protocol: http`");
        problems.push(field.key_at, &field.path, message);
        return None;
    }
    list.map(Some)
}

/// A list that must have at least one item: leaving the key out is how a rule says "any".
fn non_empty<T>(
    field: &Field<'_>,
    expecting: &str,
    parse: fn(&str) -> Result<T, PatternError>,
    problems: &mut Problems,
) -> Option<Vec<T>> {
    let items = list(field, &format!("a list of {expecting}s"), problems)?;
    if items.is_empty() {
        let message = "the list must not be empty (leave the key out to allow any)";
        problems.push(field.at, &field.path, message);
        return None;
    }
    let parsed: Vec<Option<T>> = items
        .iter()
        .enumerate()
        .map(|(k, item)| {
            let path = format!("{}[{k}]", field.path);
            parsed(
                item,
                item.at.or(field.at),
                &path,
                expecting,
                parse,
                problems,
            )
        })
        .collect();
    parsed.into_iter().collect()
}

/// A string value parsed by `parse`; the message quotes the value, e.g. `"/a*": '*' is only ...`.
fn parsed<T>(
    node: &Node,
    at: At,
    path: &str,
    expecting: &str,
    parse: fn(&str) -> Result<T, PatternError>,
    problems: &mut Problems,
) -> Option<T> {
    let Value::Str(text) = &node.value else {
        let message = format_args!("invalid type: {}, expected {expecting}", node.value.kind());
        problems.push(at, path, message);
        return None;
    };
    parse(text)
        .map_err(|e| problems.push(at, path, format_args!("{}: {e}", Shown(text))))
        .ok()
}
