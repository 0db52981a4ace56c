//! Applying a JSONPatch (RFC 6902) the way the API server does with a webhook's answer: `add`
//! (into objects, and into arrays at an index or `-`), `replace` and `remove`. Used to check
//! injection results (tests, dry runs) without a cluster.

use serde_json::Value;

/// Applies `ops` to `doc` in order; the first bad operation is an error naming it.
pub fn apply_patch(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    for (i, op) in ops.iter().enumerate() {
        let kind = op["op"].as_str().unwrap_or_default();
        let path = op["path"]
            .as_str()
            .ok_or_else(|| format!("operation {i} has no path"))?;
        apply_one(doc, kind, path, op.get("value"))
            .map_err(|e| format!("operation {i} ({kind} {path}): {e}"))?;
    }
    Ok(())
}

fn apply_one(doc: &mut Value, kind: &str, path: &str, value: Option<&Value>) -> Result<(), String> {
    let (parent_path, last) = path
        .rsplit_once('/')
        .ok_or_else(|| "the path does not start with /".to_owned())?;
    let last = last.replace("~1", "/").replace("~0", "~");
    let parent = doc
        .pointer_mut(parent_path)
        .ok_or_else(|| format!("{parent_path:?} does not exist"))?;
    let value = || value.cloned().ok_or_else(|| "no value".to_owned());
    match (kind, parent) {
        ("add", Value::Object(map)) => {
            map.insert(last, value()?);
        }
        ("replace", Value::Object(map)) => {
            let slot = map.get_mut(&last).ok_or("no such member")?;
            *slot = value()?;
        }
        ("remove", Value::Object(map)) => {
            map.remove(&last).ok_or("no such member")?;
        }
        ("add", Value::Array(items)) if last == "-" => items.push(value()?),
        ("add", Value::Array(items)) => {
            let i = index(&last, items.len() + 1)?;
            items.insert(i, value()?);
        }
        ("replace", Value::Array(items)) => {
            let i = index(&last, items.len())?;
            items[i] = value()?;
        }
        ("remove", Value::Array(items)) => {
            let i = index(&last, items.len())?;
            items.remove(i);
        }
        (other, _) => return Err(format!("unsupported operation {other:?} or target")),
    }
    Ok(())
}

fn index(token: &str, bound: usize) -> Result<usize, String> {
    match token.parse::<usize>() {
        Ok(i) if i < bound && (token == "0" || !token.starts_with('0')) => Ok(i),
        _ => Err(format!("bad array index {token:?}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rfc6902_examples() {
        let mut doc = json!({"foo": ["bar", "baz"], "a": {"b/c": 1}});
        let ops = [
            json!({"op": "add", "path": "/foo/1", "value": "qux"}),
            json!({"op": "add", "path": "/foo/-", "value": "end"}),
            json!({"op": "replace", "path": "/a/b~1c", "value": 2}),
            json!({"op": "add", "path": "/new", "value": {}}),
        ];
        apply_patch(&mut doc, &ops).unwrap();
        assert_eq!(
            doc,
            json!({"foo": ["bar", "qux", "baz", "end"], "a": {"b/c": 2}, "new": {}})
        );
        let bad = [json!({"op": "add", "path": "/missing/x", "value": 1})];
        assert!(apply_patch(&mut doc, &bad).is_err());
        let bad = [json!({"op": "add", "path": "/foo/9", "value": 1})];
        assert!(apply_patch(&mut doc, &bad).is_err());
    }
}
