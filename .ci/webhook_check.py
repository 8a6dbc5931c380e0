"""The injector as the chart deploys it (.ci/delivery): `tollgate webhook` started with the
certificate the chart generated, called over HTTPS the way the API server calls it (the
Service's DNS name, the caBundle of the MutatingWebhookConfiguration as the only trust),
with examples/k8s/admission-review.json; the returned JSONPatch is applied with the
jsonpatch library and the patched Pod written out for schema validation.
Usage: webhook_check.py RENDERED.yaml TOLLGATE_BINARY OUT.yaml"""

import base64
import json
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import jsonpatch
import yaml

rendered, tollgate, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
documents = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
secret = next(d for d in documents if d["kind"] == "Secret" and d["type"] == "kubernetes.io/tls")
config = next(d for d in documents if d["kind"] == "MutatingWebhookConfiguration")
webhooks = {w["name"]: w for w in config["webhooks"]}
assert set(webhooks) == {"namespace.inject.tollgate.dev", "pod.inject.tollgate.dev"}
for hook in webhooks.values():
    assert hook["failurePolicy"] == "Ignore", "a webhook outage must not block Pod creation"
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
service = hook["clientConfig"]["service"]
host = f"{service['name']}.{service['namespace']}.svc"

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp / key).write_bytes(base64.b64decode(secret["data"][key]))
    webhook = subprocess.Popen(
        [tollgate, "webhook", f"--listen=127.0.0.1:{port}", f"--cert={tmp}/tls.crt", f"--key={tmp}/tls.key"],
        env={"TOLLGATE_RUN_DIR": str(tmp)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def call(path, body):
            return subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(tmp / "ca.crt"), "--resolve", f"{host}:{port}:127.0.0.1",
                 "-H", "content-type: application/json", "--data-binary", "@-", f"https://{host}:{port}{path}"],
                input=body, capture_output=True)
        review = pathlib.Path("examples/k8s/admission-review.json").read_bytes()
        deadline = time.monotonic() + 10
        while (answer := call(webhooks["pod.inject.tollgate.dev"]["clientConfig"]["service"]["path"], review)).returncode:
            assert time.monotonic() < deadline, answer.stderr.decode()
            time.sleep(0.1)
    finally:
        webhook.terminate()
        webhook.wait()

response = json.loads(answer.stdout)["response"]
assert response["allowed"] is True and response["patchType"] == "JSONPatch", response
pod = json.loads(review)["request"]["object"]
pod = jsonpatch.JsonPatch(json.loads(base64.b64decode(response["patch"]))).apply(pod)
assert any(c["name"] == "tollgate" for c in pod["spec"]["initContainers"])
# The API server names the Pod after admission; the schemas want the name.
pod["metadata"].setdefault("name", pod["metadata"]["generateName"] + "x7k2p")
out.write_text(yaml.safe_dump(pod))
print(f"webhook check: the chart's certificate served, the patched Pod written to {out}")
