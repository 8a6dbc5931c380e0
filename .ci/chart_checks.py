"""Checks on the rendered Helm chart (.ci/delivery): what the chart promises operators
that schema validation cannot see. Usage: chart_checks.py RENDER_DIR TOLLGATE_BINARY"""

import json
import pathlib
import subprocess
import sys
import tempfile

import yaml

out, tollgate = pathlib.Path(sys.argv[1]), sys.argv[2]


def docs(name):
    return [d for d in yaml.safe_load_all((out / f"{name}.yaml").read_text()) if d]


def kinds(rendered, kind):
    return [d for d in rendered if d["kind"] == kind]


def one(rendered, kind):
    found = kinds(rendered, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def gateway(pod, where="containers"):
    found = [c for c in pod.get(where, []) if c["name"] == "tollgate"]
    assert len(found) == 1, f"tollgate not in {where}"
    return found[0]


def check_container(c):
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # A directory mount (no subPath): subPath mounts never see ConfigMap updates.
    assert "subPath" not in mounts["/etc/tollgate"] and mounts["/etc/tollgate"]["readOnly"]
    assert "/tmp" in mounts, "pid file and upgrade socket need a writable /tmp"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] >= 1


def check_pod(pod, grace_needed):
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] >= grace_needed
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "configMap" in volumes["tollgate-policy"] and "emptyDir" in volumes["tollgate-run"]


def check_policy(rendered):
    for cm in kinds(rendered, "ConfigMap"):
        text = cm["data"]["gateway.yaml"]
        policy = yaml.safe_load(text)
        assert policy["admin"]["listen"].startswith("0.0.0.0:"), "probes reach the pod IP"
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(text)
            f.flush()
            result = subprocess.run([tollgate, "check", f.name], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
        return int(policy["server"]["shutdown_grace"].rstrip("s"))
    raise AssertionError("no policy ConfigMap")


# standalone, defaults
r = docs("standalone")
grace = check_policy(r)
deployment = one(r, "Deployment")
pod = deployment["spec"]["template"]["spec"]
c = gateway(pod)
check_container(c)
check_pod(pod, grace + c["lifecycle"]["preStop"]["sleep"]["seconds"] + 5)
assert deployment["spec"]["replicas"] == 2
service = one(r, "Service")
assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "gateway-http", "admin": "gateway-admin"}
assert one(r, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
assert not kinds(r, "HorizontalPodAutoscaler") and not kinds(r, "ServiceMonitor")
assert "checksum/config" not in (deployment["spec"]["template"]["metadata"].get("annotations") or {})

# standalone with autoscaling, monitoring, alerts, rollout reload, admin token
r = docs("standalone-full")
deployment = one(r, "Deployment")
assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
assert one(r, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
assert len(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]) == 64
env = {e["name"]: e for e in gateway(deployment["spec"]["template"]["spec"]).get("env", [])}
assert env["TOLLGATE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tollgate-admin"
def has_private_ca(pod):
    """extraEnv/extraVolumes/extraVolumeMounts reach the gateway container and its pod."""
    c = gateway(pod, "initContainers" if pod.get("initContainers") else "containers")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    return (env.get("SSL_CERT_FILE") == "/etc/tollgate-ca/ca.pem"
            and mounts.get("private-ca") == "/etc/tollgate-ca"
            and volumes["private-ca"]["secret"]["secretName"] == "private-ca"
            and {"tollgate-policy", "tollgate-run"} <= set(volumes))
assert has_private_ca(deployment["spec"]["template"]["spec"])
assert one(r, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "admin"
alerts = {rule["alert"] for g in one(r, "PrometheusRule")["spec"]["groups"] for rule in g["rules"]}
assert alerts == {"TollgateSLOBurnRateFast", "TollgateSLOBurnRateSlow", "TollgateHigh5xxRate",
                  "TollgateHighLatency", "TollgateCircuitOpen", "TollgateShedding", "TollgateReloadFailing",
                  "TollgateSharedStoreErrors", "TollgateAccessLogDropping", "TollgateCacheHitRatioCollapse"}, alerts
# The dashboard ConfigMap carries the JSON tests/observability.rs checked, under the label
# Grafana's sidecar watches.
dashboard = next(d for d in kinds(r, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
assert json.loads(dashboard["data"]["tollgate.json"]) == json.loads(
    pathlib.Path("helm/tollgate/files/grafana-dashboard.json").read_text())

# sidecar, native (Kubernetes >= 1.29): an init container that keeps running
r = docs("sidecar-native")
policy_grace = check_policy(r)
assert yaml.safe_load(one(r, "ConfigMap")["data"]["gateway.yaml"])["upstreams"]["app"]["servers"] == ["127.0.0.1:3000"]
pod = one(r, "Deployment")["spec"]["template"]
assert pod["metadata"]["labels"]["tollgate.io/sidecar"] == "true"
c = gateway(pod["spec"], "initContainers")
assert c["restartPolicy"] == "Always"
assert has_private_ca(pod["spec"])
check_container(c)
check_pod(pod["spec"], policy_grace + 10)
assert all(x["name"] != "tollgate" for x in pod["spec"]["containers"])
assert one(r, "Service")["spec"]["ports"][0]["targetPort"] == "gateway-http"
assert not kinds(r, "PodMonitor") and not kinds(r, "HorizontalPodAutoscaler")

# sidecar, classic: a regular container; monitoring through a PodMonitor
r = docs("sidecar-classic")
pod = one(r, "Deployment")["spec"]["template"]["spec"]
c = gateway(pod)
assert "restartPolicy" not in c and not pod.get("initContainers")
assert one(r, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "gateway-admin"

print("chart checks passed")
