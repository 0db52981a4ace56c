"""Evaluates the webhook's matchConditions (CEL, with cel-python) on the requests the API server
sends, and checks which ones reach each entry: every condition of an entry must hold for a request
to be sent, and none may fail to evaluate (a failing condition falls to the failurePolicy, so
under Fail it would refuse the request). What must be sent is what the injector must see: pod
CREATEs (per-pod entry: only pods that ask), meshid annotation changes, image changes of pods
running the sidecar (`kubectl set image`, which could swap the sidecar) and ephemeral containers
added to pods with meshid's volumes (`kubectl debug`, which could mount them); what must not be
sent is everything else (labels, images of pods without the sidecar, debugging other pods), so
that it never depends on the injector.

Usage: match_conditions.py RENDERED_YAML
"""

import copy
import sys

import celpy
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
webhook = next(d for d in docs if d["kind"] == "MutatingWebhookConfiguration")
entries = {e["name"]: e for e in webhook["webhooks"]}
assert sorted(entries) == ["namespace.inject.meshid.io", "pod.inject.meshid.io"], sorted(entries)

MESHED = {
    "metadata": {
        "name": "web-1",
        "labels": {"app": "web"},
        "annotations": {
            "meshid.io/inject": "enabled",
            "meshid.io/inbound": "8080=http",
            "meshid.io/injected": "v1",
        },
    },
    "spec": {
        "initContainers": [{"name": "meshid-sidecar", "image": "meshid/sidecar:0.1.0"}],
        "containers": [{"name": "app", "image": "web:1"}],
        "volumes": [{"name": "kube-api-access-x"}, {"name": "meshid-token"}, {"name": "meshid-state"}],
    },
}
ASKING = {
    "metadata": {"name": "web-2", "annotations": {"meshid.io/inject": "enabled"}},
    "spec": {"containers": [{"name": "app", "image": "web:1"}]},
}
PLAIN = {
    "metadata": {"name": "other", "labels": {"app": "other"}},
    "spec": {
        "initContainers": [{"name": "setup", "image": "setup:1"}],
        "containers": [{"name": "app", "image": "other:1"}],
        "volumes": [{"name": "data"}],
    },
}


def changed(pod, change):
    pod = copy.deepcopy(pod)
    change(pod)
    return pod


def debugged(pod):
    return changed(pod, lambda p: p["spec"].update(ephemeralContainers=[{"name": "dbg", "image": "busybox"}]))


def create(pod):
    return {"operation": "CREATE"}, pod, None


def update(old, change, sub=None):
    request = {"operation": "UPDATE"}
    if sub is not None:
        request["subResource"] = sub
    return request, changed(old, change), old


def set_image(list_name, name, image):
    def change(p):
        for c in p["spec"][list_name]:
            if c["name"] == name:
                c["image"] = image
    return change


FAKE_IN_CONTAINERS = changed(PLAIN, lambda p: p["spec"]["containers"].append(
    {"name": "meshid-sidecar", "image": "x:1"}))

# (what, (request, object, oldObject), sent to the namespace entry, sent to the pod entry)
CASES = [
    ("CREATE of a pod asking for injection", create(ASKING), True, True),
    ("CREATE of a pod not asking", create(PLAIN), True, False),
    ("CREATE of a pod opting out", create(changed(ASKING, lambda p: p["metadata"]["annotations"].update(
        {"meshid.io/inject": "disabled"}))), True, False),
    ("CREATE with a typo in meshid.io/inject", create(changed(ASKING, lambda p: p["metadata"]["annotations"].update(
        {"meshid.io/inject": "yes"}))), True, True),
    ("a label on an injected pod", update(MESHED, lambda p: p["metadata"]["labels"].update(tier="a")), False, False),
    ("a label, subResource given empty", update(MESHED, lambda p: p["metadata"]["labels"].update(tier="a"), sub=""),
     False, False),
    ("another annotation on an injected pod", update(MESHED, lambda p: p["metadata"]["annotations"].update(
        {"example.com/x": "1"})), False, False),
    ("a meshid annotation changed", update(MESHED, lambda p: p["metadata"]["annotations"].update(
        {"meshid.io/inbound": "9090=http"})), True, True),
    ("a meshid annotation added", update(MESHED, lambda p: p["metadata"]["annotations"].update(
        {"meshid.io/mode": "audit"})), True, True),
    ("a meshid annotation removed", update(MESHED, lambda p: p["metadata"]["annotations"].pop(
        "meshid.io/injected")), True, True),
    ("meshid annotations added to a pod without any", update(PLAIN, lambda p: p["metadata"].update(
        annotations={"meshid.io/injected": "v1"})), True, True),
    ("kubectl set image of the sidecar", update(MESHED, set_image("initContainers", "meshid-sidecar", "evil:1")),
     True, True),
    ("kubectl set image of the app of an injected pod", update(MESHED, set_image("containers", "app", "web:2")),
     True, True),
    ("the sidecar removed", update(MESHED, lambda p: p["spec"].pop("initContainers")), True, True),
    ("kubectl set image of a fake sidecar among app containers",
     update(FAKE_IN_CONTAINERS, set_image("containers", "meshid-sidecar", "evil:2")), True, True),
    ("kubectl set image of a pod without the sidecar", update(PLAIN, set_image("containers", "app", "other:2")),
     False, False),
    ("an init image of a pod without the sidecar", update(PLAIN, set_image("initContainers", "setup", "setup:2")),
     False, False),
    ("kubectl debug of an injected pod", update(MESHED, lambda p: p.update(debugged(p)), sub="ephemeralcontainers"),
     True, True),
    ("kubectl debug of a pod without meshid volumes",
     update(PLAIN, lambda p: p.update(debugged(p)), sub="ephemeralcontainers"), False, False),
    # A status update keeps the old spec but takes the new metadata.
    ("a meshid annotation changed through pods/status",
     update(MESHED, lambda p: p["metadata"]["annotations"].update({"meshid.io/mode": "permissive"}),
            sub="status"), True, True),
    ("the kubelet's status write (no annotation changed)",
     update(MESHED, lambda p: p.setdefault("status", {}).update(phase="Running"), sub="status"),
     False, False),
]

env = celpy.Environment()
programs = {
    name: [(c["name"], env.program(env.compile(c["expression"]))) for c in entry["matchConditions"]]
    for name, entry in entries.items()
}
problems = []
for what, (request, obj, old), *expected in CASES:
    activation = {
        "request": celpy.json_to_cel(request),
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
    }
    for (name, conditions), want in zip(sorted(programs.items()), expected):
        results = []
        for cname, program in conditions:
            try:
                result = program.evaluate(activation)
            except Exception as error:  # noqa: BLE001 - any evaluation error is a finding
                result = error
            if not isinstance(result, (bool, celpy.celtypes.BoolType)):
                problems.append(f"{name}: {what}: condition {cname} did not evaluate to a bool: {result!r}")
            results.append(bool(result) if isinstance(result, (bool, celpy.celtypes.BoolType)) else None)
        sent = all(r is True for r in results)
        if sent != want:
            problems.append(f"{name}: {what}: {'sent' if sent else 'not sent'}, expected "
                            f"{'sent' if want else 'not sent'} (conditions: {results})")
for p in problems:
    print("FAIL:", p, file=sys.stderr)
if problems:
    sys.exit(1)
print(f"matchConditions: {len(CASES)} requests x {len(entries)} entries decided as expected")
