//! What a review may cost in memory, counted from its body before anything is parsed
//! ([`review_cost`]): the JSON tree serde_json would build for it (so a body of a million tiny
//! values is charged the tree, not its length) and what answering it copies. Every factor here
//! was measured against a counting allocator on the bodies that make each part largest per byte
//! (arrays of `0`, objects of one member, dense allow lists, escaped probe headers, the most
//! containers a pod may have): each charge is above what the review used.

/// What answering costs beyond the parsed tree, per byte of body: copies of the `meshid.io/*`
/// annotations and of moved probes, and the answer's JSON, JSONPatch and base64 texts.
const ANSWER_PER_BODY_BYTE: u64 = 4;
/// What answering costs whatever the body: the patch's sidecar and volumes, and its texts (plus
/// [`BUNDLE_COPIES`] copies of the trust bundle).
const ANSWER_FIXED: u64 = 256 * 1024;
/// What the patch costs per container (its moved probes and Workload API mounts), for each object
/// in an array of the body (a container is one), up to [`crate::MAX_CONTAINERS`].
const ANSWER_PER_CONTAINER: u64 = 16 * 1024;
/// The trust bundle is in the patch as a value, in its JSON text, in base64 and in the answer.
pub const BUNDLE_COPIES: u64 = 8;
/// What parsing the `meshid.io/*` annotations costs, per byte of them (and 16 per annotation): the
/// parser splits lists into strings and builds the allow-list's policy document from them (measured
/// at under 120 bytes per byte for the densest allow list).
const MESHID_PER_BYTE: u64 = 128;
/// What moving probes costs, per byte of the strings in `httpGet` objects (and 16 per string):
/// paths and headers are copied into the new probe and into `meshid.io/app-probes`, escaped once
/// more in the patch's text, then base64-encoded into the answer (measured at under 18).
const PROBE_PER_BYTE: u64 = 24;

/// What reviewing `body` may cost in memory, at most: the serde_json tree of its JSON (every value
/// slot, array capacity as it grows, map nodes, string buffers; [`json_tree_bytes`]), the parsing
/// of its `meshid.io/*` annotations ([`MESHID_PER_BYTE`]), the copies of its probes' paths and
/// headers ([`PROBE_PER_BYTE`]), serde_json's scratch buffer (up to the body's length), the
/// answer's copies ([`ANSWER_PER_BODY_BYTE`]), and the answer's fixed part (the patch, per
/// container, and `bundle_len` bytes of trust bundle).
pub fn review_cost(body: &[u8], bundle_len: usize) -> u64 {
    let len = body.len() as u64;
    let scan = scan(body);
    scan.tree
        .saturating_add(scan.meshid.saturating_mul(MESHID_PER_BYTE))
        .saturating_add(scan.probes.saturating_mul(PROBE_PER_BYTE))
        .saturating_add(len.saturating_mul(1 + ANSWER_PER_BODY_BYTE))
        .saturating_add(ANSWER_FIXED)
        .saturating_add(ANSWER_PER_CONTAINER * scan.array_objects.min(crate::MAX_CONTAINERS as u64))
        .saturating_add((bundle_len as u64).saturating_mul(BUNDLE_COPIES))
}

/// An upper bound of the heap serde_json uses for `json` parsed into a `Value`, from its structure
/// alone (one pass, no allocation beyond a small stack): each array holds 32-byte slots in a vector
/// grown by doubling (the old and the new buffer both live while it grows), each non-empty object
/// is a B-tree whose nodes (640 and 736 bytes for up to 11 entries, at least 5 in all but one
/// node) hold the entries, and each non-empty string (key or value) its own buffer (malloc rounds
/// to 16 bytes, 32 at least). Text that is not JSON is counted as far as it goes: the parser stops
/// there too.
pub fn json_tree_bytes(json: &[u8]) -> u64 {
    scan(json).tree
}

/// What one pass over a body finds: the bytes of its serde_json tree, the bytes of the string
/// members whose key starts with `meshid.io/` and of the strings inside `httpGet` objects (plus 16
/// each), wherever they are, and the objects in arrays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Scan {
    tree: u64,
    meshid: u64,
    probes: u64,
    /// Objects that are elements of an array (containers among them).
    array_objects: u64,
}

/// Whether a JSON string's raw text holds an escape (it decodes to other bytes than it shows).
fn escapes(raw: &[u8]) -> bool {
    raw.contains(&b'\\')
}

fn scan(json: &[u8]) -> Scan {
    let mut scan = Scan::default();
    let mut stack: Vec<Open> = Vec::new();
    let mut string_start = None;
    let mut escaped = false;
    // The last string closed, while nothing but blanks followed it; then the key whose ':' was
    // seen, until its value starts.
    let mut last_string: Option<&[u8]> = None;
    let mut key: Option<&[u8]> = None;
    for (i, &b) in json.iter().enumerate() {
        if let Some(start) = string_start {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                let text = &json[start..i];
                let len = text.len() as u64;
                if len > 0 {
                    scan.tree += (len + 8).next_multiple_of(16).max(32);
                }
                // A key with an escape may read as anything once decoded (`meshid.io\/inbound`,
                // `http\u0047et`): charged as ours and as a probe's, the dearest it could be.
                if key.is_some_and(|k| k.starts_with(b"meshid.io/") || escapes(k)) {
                    scan.meshid += key.map_or(0, |k| k.len() as u64) + len + 16;
                }
                if stack.last().is_some_and(|open| open.probe) {
                    scan.probes += len + 16;
                }
                key = None;
                last_string = Some(text);
                string_start = None;
            }
            continue;
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        }
        if b == b':' {
            key = last_string.take();
            continue;
        }
        last_string = None;
        if !matches!(b, b']' | b'}' | b',')
            && let Some(open) = stack.last_mut()
        {
            // A value (or a key) starts in the innermost open array or object.
            open.any = true;
        }
        match b {
            b'"' => {
                string_start = Some(i + 1);
                continue;
            }
            b'[' | b'{' => {
                if stack.len() > MAX_DEPTH {
                    // serde_json refuses the body here, having built no more than what came before.
                    break;
                }
                let parent = stack.last();
                if b == b'{' && parent.is_some_and(|open| !open.object) {
                    scan.array_objects += 1;
                }
                let probe = parent.is_some_and(|open| open.probe)
                    || key.is_some_and(|k| k == b"httpGet" || escapes(k));
                stack.push(Open {
                    object: b == b'{',
                    probe,
                    any: false,
                    commas: 0,
                });
            }
            b']' | b'}' => scan.tree += stack.pop().map_or(0, Open::bytes),
            b',' => {
                if let Some(open) = stack.last_mut() {
                    open.commas += 1;
                }
            }
            _ => {}
        }
        key = None;
    }
    // Unclosed at the end: counted as if closed there.
    scan.tree += stack.into_iter().map(Open::bytes).sum::<u64>();
    scan
}

/// serde_json's recursion limit: it refuses a body nested deeper.
const MAX_DEPTH: usize = 128;

/// An open array or object: whether it holds a value yet, and how many commas it has seen.
struct Open {
    object: bool,
    /// Inside an `httpGet` object.
    probe: bool,
    any: bool,
    commas: u64,
}

impl Open {
    /// Its heap once parsed (see [`json_tree_bytes`]).
    fn bytes(self) -> u64 {
        let n = if self.any { self.commas + 1 } else { 0 };
        if n == 0 {
            0
        } else if self.object {
            // At most n / 5 + 1 leaves of 640 bytes, and internal nodes of 736 above them.
            192 * n + 960
        } else {
            48 * n.next_power_of_two().max(4)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_are_counted_by_shape_not_length() {
        struct Case {
            name: &'static str,
            json: &'static str,
            tree: u64,
        }
        for case in [
            Case {
                name: "scalars and empty things own nothing",
                json: r#"{"a": {"b": []}, "c": {}}"#,
                // The outer object (two members) and {"b": []}; the keys 32 bytes each.
                tree: (2 * 192 + 960) + (192 + 960) + 3 * 32,
            },
            Case {
                name: "an array grows by doubling, both buffers counted",
                json: "[0, 1, 2, 3, 4]",
                tree: 48 * 8,
            },
            Case {
                name: "strings: their buffer, escapes and all",
                json: r#"["", "a\"b", "0123456789abcdef0123456789"]"#,
                tree: 48 * 4 + 32 + 48,
            },
            Case {
                name: "unclosed: counted as if closed",
                json: "[[0, 0",
                tree: 48 * 4 + 48 * 4,
            },
        ] {
            assert_eq!(
                json_tree_bytes(case.json.as_bytes()),
                case.tree,
                "{}",
                case.name
            );
        }
        // Deeper than serde_json goes: counted up to its limit, not a stack of the whole depth.
        let deep = "[".repeat(100_000);
        assert_eq!(json_tree_bytes(deep.as_bytes()), 48 * 4 * 129);
    }

    #[test]
    fn meshid_annotations_and_probes_are_charged_for_what_answering_copies() {
        let plain = br#"{"metadata": {"annotations": {"team": "web-frontend"}}}"#;
        let meshid = br#"{"metadata": {"annotations": {"meshid.io/allow-8080": "spiffe://x"}}}"#;
        let scan_plain = scan(plain);
        assert_eq!(scan_plain.meshid, 0);
        let scan_meshid = scan(meshid);
        assert_eq!(scan_meshid.meshid, 20 + 10 + 16);
        // A value that only looks like a meshid key, and a key whose value is not a string.
        let other = br#"{"a": "meshid.io/x", "meshid.io/y": 7, "b": "c"}"#;
        assert_eq!(scan(other).meshid, 0);
        let probe = br#"{"containers": [{"name": "app",
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080,
                "httpHeaders": [{"name": "x", "value": "yz"}]}}}]}"#;
        let s = scan(probe);
        // "path", "/ready", "port", "httpHeaders", "name", "x", "value", "yz": 16 each and more.
        assert_eq!(s.probes, (4 + 6 + 4 + 11 + 4 + 1 + 5 + 2) + 8 * 16);
        assert_eq!(s.array_objects, 2);
        assert!(
            review_cost(probe, 4096) > review_cost(br#"{"containers": [{"name": "app"}]}"#, 4096)
        );
    }

    #[test]
    fn a_real_pod_costs_a_fraction_of_the_default_budget() {
        let pod = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "operation": "CREATE", "object": {
                "metadata": {"name": "web", "labels": {"app": "web", "tier": "front"},
                    "annotations": {"meshid.io/inject": "enabled",
                        "meshid.io/inbound": "8080=http",
                        "meshid.io/allow-8080": "spiffe://cluster.local/ns/shop/sa/frontend"}},
                "spec": {"containers": [{"name": "app", "image": "web:1",
                    "ports": [{"containerPort": 8080}],
                    "env": (0..40).map(|i| serde_json::json!({"name": format!("VAR_{i}"),
                        "value": "some value"})).collect::<Vec<_>>(),
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}}}
        })
        .to_string();
        let cost = review_cost(pod.as_bytes(), 2048);
        assert!(
            cost < 2 * 1024 * 1024,
            "{cost} bytes for a {}-byte pod",
            pod.len()
        );
        assert!(cost > 10 * pod.len() as u64);
    }
}
