//! `tollgate webhook` (SPEC §1, §9): the real binary serving HTTPS, real AdmissionReview
//! documents posted as the API server posts them, the returned JSONPatch applied with a
//! JSON-Patch library and the result compared with `tollgate inject` on the same Pod.

mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tollgate::inject::Node;

const REVIEW: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/k8s/admission-review.json"
);

struct Webhook {
    child: Child,
    port: u16,
}

impl Webhook {
    fn start(certs: &Path) -> Webhook {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "webhook",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--image",
                "tollgate:test",
            ])
            .arg("--cert")
            .arg(certs.join("tls.crt"))
            .arg("--key")
            .arg(certs.join("tls.key"))
            .env("TOLLGATE_RUN_DIR", certs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let webhook = Webhook { child, port };
        assert!(
            wait_for(Duration::from_secs(10), || webhook
                .call("GET", "/healthz", None, &certs.join("ca.pem"))
                .0
                == 200),
            "the webhook did not come up"
        );
        webhook
    }

    /// `curl` against the webhook, trusting only `ca`: (status, body).
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>, ca: &Path) -> (u16, String) {
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
            "--cacert",
        ])
        .arg(ca)
        .args(["-H", "content-type: application/json"])
        .arg(format!("https://localhost:{}{path}", self.port))
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", self.port)]);
        if body.is_some() {
            curl.args(["--data-binary", "@-"]);
        }
        let mut child = curl
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(body.unwrap_or_default()).unwrap();
        }
        let out = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.parse().unwrap_or(0), body.to_string())
    }

    /// The reviewed Pod with the answer's patch applied (`None` without a patch), and the
    /// answer's `response`.
    fn review(&self, path: &str, review: &Value, ca: &Path) -> (Option<Value>, Value) {
        let (status, body) = self.call("POST", path, Some(review.to_string().as_bytes()), ca);
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = answer["response"].clone();
        assert_eq!(response["uid"], review["request"]["uid"]);
        assert_eq!(response["allowed"], true, "the webhook never refuses a Pod");
        let Some(patch) = response["patch"].as_str() else {
            return (None, response);
        };
        assert_eq!(response["patchType"], "JSONPatch");
        let patch: json_patch::Patch = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(patch)
                .unwrap(),
        )
        .unwrap();
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        (Some(pod), response)
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example_review() -> Value {
    serde_json::from_str(&std::fs::read_to_string(REVIEW).unwrap()).unwrap()
}

/// `tollgate inject` on one Pod document (JSON is YAML): the Pod it prints.
fn injected_by_cli(pod: &Value) -> Node {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["inject", "--image", "tollgate:test", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(pod.to_string().as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let documents: Vec<Node> =
        serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    documents.into_iter().next().unwrap()
}

#[test]
fn the_webhook_injects_what_inject_injects_and_never_blocks() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let ca = certs.path().join("ca.pem");
    let webhook = Webhook::start(certs.path());

    // A Deployment's Pod, labelled in: the patched Pod is the Pod `tollgate inject` makes.
    let review = example_review();
    let (pod, _) = webhook.review("/inject", &review, &ca);
    let pod = pod.expect("an opted-in Pod is patched");
    let as_node: Node = serde_json::from_value(pod.clone()).unwrap();
    assert_eq!(as_node, injected_by_cli(&review["request"]["object"]));
    assert_eq!(
        pod["spec"]["volumes"][0]["configMap"]["name"], "api-tollgate",
        "the owner's ConfigMap, named as `tollgate inject` names it"
    );

    // Reviewed again (the API server reinvokes webhooks): already injected, no patch.
    let mut again = review.clone();
    again["request"]["object"] = pod;
    assert_eq!(webhook.review("/inject", &again, &ca).0, None);

    // Not opted in: no patch; the same Pod in an opted-in namespace: patched; opted out: not.
    let mut plain = review.clone();
    plain["request"]["object"]["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("tollgate.dev/inject");
    assert_eq!(webhook.review("/inject", &plain, &ca).0, None);
    assert!(webhook.review("/inject/namespace", &plain, &ca).0.is_some());
    let mut out = plain.clone();
    out["request"]["object"]["metadata"]["annotations"] =
        json!({"tollgate.dev/inject": "disabled"});
    assert_eq!(webhook.review("/inject/namespace", &out, &ca).0, None);

    // A Pod it cannot inject is admitted as it is, with a warning for kubectl.
    let mut portless = review.clone();
    portless["request"]["object"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("ports");
    let (pod, response) = webhook.review("/inject", &portless, &ca);
    assert_eq!(pod, None);
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(warning.contains("declares no port"), "{warning}");

    // What is not a review gets a 400 problem document, and the webhook keeps serving.
    for body in [&b"{"[..], b"{\"apiVersion\":\"v1\",\"kind\":\"Pod\"}", b""] {
        let (status, text) = webhook.call("POST", "/inject", Some(body), &ca);
        assert_eq!(status, 400, "{text}");
        let problem: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(problem["error"], "bad_request");
    }
    assert_eq!(webhook.call("GET", "/nowhere", None, &ca).0, 404);
    assert!(webhook.review("/inject", &review, &ca).0.is_some());
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let webhook = Webhook::start(certs.path());
    let old_ca = certs.path().join("ca.pem");

    // cert-manager renews: a new key and certificate from another CA land in place.
    let renewed = tempfile::tempdir().unwrap();
    make_certificates(renewed.path());
    let new_ca = renewed.path().join("ca.pem");
    assert_ne!(webhook.call("GET", "/healthz", None, &new_ca).0, 200);
    for file in ["tls.key", "tls.crt"] {
        let staged = certs.path().join(format!(".{file}"));
        std::fs::copy(renewed.path().join(file), &staged).unwrap();
        std::fs::rename(&staged, certs.path().join(file)).unwrap();
    }
    assert!(
        wait_for(Duration::from_secs(10), || webhook
            .call("GET", "/healthz", None, &new_ca)
            .0
            == 200),
        "the renewed certificate is not served"
    );
    assert_ne!(webhook.call("GET", "/healthz", None, &old_ca).0, 200);
}
