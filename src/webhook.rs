//! `tollgate webhook` (SPEC §1, §9): the Kubernetes mutating admission webhook. It gives
//! an opted-in Pod exactly what `tollgate inject` gives it — the same function — as a
//! JSONPatch in an `admission.k8s.io/v1` AdmissionReview answer.
//!
//! Who is opted in: a Pod labelled or annotated `tollgate.dev/inject: enabled`, or any Pod
//! of a namespace labelled so, unless the Pod says `disabled`. The namespace's labels are
//! not in the review, so the chart registers two webhooks: one whose `namespaceSelector`
//! picks the opted-in namespaces, calling `/inject/namespace`, and one for the others,
//! calling `/inject`. A Pod the webhook cannot inject (no port to forward to, a bad
//! annotation) is admitted unchanged with a warning that `kubectl` shows: the webhook
//! never blocks a Pod, and the chart registers it with `failurePolicy: Ignore`.

use crate::certificate::ReloadingCertificate;
use crate::inject::{self, Node, INJECTED};
use crate::problem::Code;
use crate::reply::{read_body, Reply};
use async_trait::async_trait;
use base64::Engine;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// The label or annotation a Pod or namespace opts in (`enabled`) or out (`disabled`) with.
pub(crate) const OPT_IN: &str = "tollgate.dev/inject";
/// Per-Pod overrides of the webhook's defaults.
const CONFIG_MAP: &str = "tollgate.dev/config-map";
const IMAGE: &str = "tollgate.dev/image";
const APP_PORT: &str = "tollgate.dev/app-port";
/// The API server sends objects of at most ~1.5 MiB (etcd's limit) inside the review.
const MAX_REVIEW: usize = 4 * 1024 * 1024;
const API_VERSION: &str = "admission.k8s.io/v1";

pub struct WebhookOptions {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// What a Pod gets when its annotations say nothing else.
    pub defaults: inject::Options,
}

/// Serves the webhook until SIGTERM.
pub fn run(options: WebhookOptions) -> Result<(), String> {
    // SIGHUP and SIGUSR1 are caught and mean nothing here: the certificate follows its files.
    let signals = crate::signals::catch().map_err(|e| format!("cannot catch signals: {e}"))?;
    crate::server::ensure_free(&[options.listen])?;
    let certificate = ReloadingCertificate::load(options.cert, options.key)?;
    let run_dir = crate::server::run_dir(&[options.listen]);
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: run_dir.join("tollgate.pid").to_string_lossy().into_owned(),
        upgrade_sock: run_dir.join("upgrade.sock").to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = Service::new(
        "tollgate webhook".to_string(),
        HttpServer::new_app(Webhook {
            defaults: options.defaults,
        }),
    );
    let mut tls = TlsSettings::intermediate("", "").map_err(|e| e.to_string())?;
    tls.set_cert_resolver(Arc::new(certificate));
    service.add_tls_with_settings(&options.listen.to_string(), None, tls);
    server.add_service(service);
    tracing::info!(listen = %options.listen, "tollgate webhook started");
    server.run(signals.shutdown);
    Ok(())
}

struct Webhook {
    defaults: inject::Options,
}

#[async_trait]
impl ServeHttp for Webhook {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let namespace_opted_in = match (&method, session.req_header().uri.path()) {
            (&Method::GET, "/healthz" | "/readyz") => {
                return Reply::text(StatusCode::OK, "ok\n").into_response()
            }
            (&Method::POST, "/inject") => false,
            (&Method::POST, "/inject/namespace") => true,
            _ => {
                return Reply::problem(
                    Code::NotFound,
                    "the webhook serves POST /inject, POST /inject/namespace and GET /healthz",
                    Value::Null,
                )
                .into_response()
            }
        };
        let reply = match read_body(session, MAX_REVIEW).await {
            Ok(body) => match review(&body, namespace_opted_in, &self.defaults) {
                Ok(answer) => Reply::json(StatusCode::OK, &answer),
                Err(why) => Reply::problem(Code::BadRequest, why, Value::Null),
            },
            Err(reply) => reply,
        };
        reply.into_response()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionReview {
    api_version: String,
    kind: String,
    request: Option<AdmissionRequest>,
}

#[derive(Deserialize)]
struct AdmissionRequest {
    uid: String,
    kind: GroupVersionKind,
    operation: String,
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    kind: String,
}

/// The answer to one AdmissionReview; `Err` when the body is not one (a 400).
fn review(
    body: &[u8],
    namespace_opted_in: bool,
    defaults: &inject::Options,
) -> Result<Value, String> {
    let review: AdmissionReview =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    if review.api_version != API_VERSION || review.kind != "AdmissionReview" {
        return Err(format!(
            "expected an {API_VERSION} AdmissionReview, got {} {}",
            review.api_version, review.kind
        ));
    }
    let request = review.request.ok_or("the AdmissionReview has no request")?;
    let mut response = json!({ "uid": request.uid, "allowed": true });
    let is_pod_create = request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.operation == "CREATE";
    if let (true, Some(object)) = (is_pod_create, request.object) {
        match mutate(object, namespace_opted_in, defaults) {
            Ok(Some(patch)) => {
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            }
            Ok(None) => {}
            Err(why) => {
                response["warnings"] = json!([format!("tollgate sidecar not injected: {why}")])
            }
        }
    }
    Ok(json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response }))
}

/// The JSONPatch (serialized) that injects `pod`, `None` when it is not opted in or is
/// injected already.
fn mutate(
    pod: Value,
    namespace_opted_in: bool,
    defaults: &inject::Options,
) -> Result<Option<Vec<u8>>, String> {
    let mut pod: Node = serde_json::from_value(pod).map_err(|e| format!("unreadable Pod: {e}"))?;
    if !opted_in(&pod, namespace_opted_in) || annotation(&pod, INJECTED).is_some() {
        return Ok(None);
    }
    let options = pod_options(&pod, defaults)?;
    // Both sides as JSON of the same tree, so the patch holds only what injection changed.
    let before = serde_json::to_value(&pod).map_err(|e| e.to_string())?;
    if !inject::inject_pod(&mut pod, &options)? {
        return Ok(None);
    }
    let after = serde_json::to_value(&pod).map_err(|e| e.to_string())?;
    let patch = json_patch::diff(&before, &after);
    serde_json::to_vec(&patch)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn metadata_str<'a>(pod: &'a Node, section: &str, key: &str) -> Option<&'a str> {
    match pod.path(&["metadata", section, key]) {
        Some(Node::Str(value)) => Some(value),
        _ => None,
    }
}

fn annotation<'a>(pod: &'a Node, key: &str) -> Option<&'a str> {
    metadata_str(pod, "annotations", key)
}

/// `disabled` on the Pod wins; then `enabled` on the Pod; then the namespace.
fn opted_in(pod: &Node, namespace_opted_in: bool) -> bool {
    let said = [metadata_str(pod, "labels", OPT_IN), annotation(pod, OPT_IN)];
    if said.contains(&Some("disabled")) {
        return false;
    }
    said.contains(&Some("enabled")) || namespace_opted_in
}

fn pod_options(pod: &Node, defaults: &inject::Options) -> Result<inject::Options, String> {
    let mut options = defaults.clone();
    if let Some(config_map) = annotation(pod, CONFIG_MAP) {
        options.config_map = Some(config_map.to_string());
    }
    if let Some(image) = annotation(pod, IMAGE) {
        options.image = image.to_string();
    }
    if let Some(port) = annotation(pod, APP_PORT) {
        let port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("annotation {APP_PORT}: {port:?} is not a port"))?;
        options.app_port = Some(port);
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REVIEW: &str = include_str!("../examples/k8s/admission-review.json");

    fn defaults() -> inject::Options {
        inject::Options {
            image: "tollgate:test".into(),
            config_map: None,
            native: true,
            app_port: None,
            port: None,
            admin_port: None,
        }
    }

    fn review_of(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut review: Value = serde_json::from_str(REVIEW).unwrap();
        edit(&mut review);
        serde_json::to_vec(&review).unwrap()
    }

    /// The reviewed Pod with the answer's patch applied, or `None` without a patch.
    fn patched(body: &[u8], namespace: bool) -> (Value, Option<Value>) {
        let answer = review(body, namespace, &defaults()).unwrap();
        let response = answer["response"].clone();
        assert_eq!(response["allowed"], json!(true));
        let Some(patch) = response["patch"].as_str() else {
            return (response, None);
        };
        assert_eq!(response["patchType"], json!("JSONPatch"));
        let patch: json_patch::Patch = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(patch)
                .unwrap(),
        )
        .unwrap();
        let request: Value = serde_json::from_slice(body).unwrap();
        let mut pod = request["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).unwrap();
        (response, Some(pod))
    }

    #[test]
    fn an_opted_in_pod_gets_the_sidecar_and_its_owner_s_config_map() {
        let (response, pod) = patched(REVIEW.as_bytes(), false);
        assert_eq!(
            response["uid"],
            json!("705ab4f5-6393-11e8-b7cc-42010a800002")
        );
        let pod = pod.expect("a patch");
        let sidecar = &pod["spec"]["initContainers"][0];
        assert_eq!(sidecar["name"], json!("tollgate"));
        assert_eq!(sidecar["image"], json!("tollgate:test"));
        assert_eq!(sidecar["restartPolicy"], json!("Always"));
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes[0]["configMap"]["name"], json!("api-tollgate"));
        assert!(pod["metadata"]["annotations"][INJECTED].is_string());
        // Untouched: the application container and the defaulted fields.
        assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);
        assert_eq!(pod["spec"]["dnsPolicy"], json!("ClusterFirst"));
    }

    #[test]
    fn who_is_opted_in() {
        let labelled = |label: Option<&str>, annotation: Option<&str>| {
            review_of(|r| {
                let metadata = &mut r["request"]["object"]["metadata"];
                match label {
                    Some(v) => metadata["labels"][OPT_IN] = json!(v),
                    None => {
                        metadata["labels"].as_object_mut().unwrap().remove(OPT_IN);
                    }
                }
                if let Some(v) = annotation {
                    metadata["annotations"] = json!({ OPT_IN: v });
                }
            })
        };
        let injected = |body: Vec<u8>, namespace| patched(&body, namespace).1.is_some();
        assert!(injected(labelled(Some("enabled"), None), false));
        assert!(injected(labelled(None, Some("enabled")), false));
        assert!(!injected(labelled(None, None), false), "nobody opted in");
        assert!(
            injected(labelled(None, None), true),
            "the namespace opted in"
        );
        assert!(
            !injected(labelled(Some("disabled"), None), true),
            "the Pod opted out"
        );
        assert!(!injected(labelled(None, Some("disabled")), true));
        assert!(
            !injected(labelled(Some("enabled"), Some("disabled")), false),
            "disabled wins"
        );
    }

    #[test]
    fn an_injected_pod_is_left_alone() {
        let (_, pod) = patched(REVIEW.as_bytes(), false);
        let again = review_of(|r| r["request"]["object"] = pod.unwrap());
        assert_eq!(patched(&again, false).1, None);
    }

    #[test]
    fn annotations_override_the_defaults() {
        let body = review_of(|r| {
            r["request"]["object"]["metadata"]["annotations"] = json!({
                CONFIG_MAP: "shared-policy", IMAGE: "mirror.example/tollgate:1", APP_PORT: "4000"
            });
        });
        let pod = patched(&body, false).1.unwrap();
        assert_eq!(
            pod["spec"]["initContainers"][0]["image"],
            json!("mirror.example/tollgate:1")
        );
        assert_eq!(
            pod["spec"]["volumes"][0]["configMap"]["name"],
            json!("shared-policy")
        );
    }

    #[test]
    fn a_pod_that_cannot_be_injected_is_admitted_with_a_warning() {
        let body = review_of(|r| {
            r["request"]["object"]["metadata"]["annotations"] = json!({ APP_PORT: "http" });
        });
        let (response, pod) = patched(&body, false);
        assert_eq!(pod, None);
        assert!(response["warnings"][0].as_str().unwrap().contains(APP_PORT));
        let portless = review_of(|r| {
            r["request"]["object"]["spec"]["containers"][0]
                .as_object_mut()
                .unwrap()
                .remove("ports");
        });
        let (response, pod) = patched(&portless, false);
        assert_eq!(pod, None);
        assert!(response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("declares no port"));
    }

    #[test]
    fn other_objects_and_operations_pass_unpatched() {
        for body in [
            review_of(|r| r["request"]["operation"] = json!("UPDATE")),
            review_of(|r| r["request"]["kind"]["kind"] = json!("Deployment")),
        ] {
            assert_eq!(patched(&body, true).1, None);
        }
    }

    #[test]
    fn what_is_not_a_review_is_refused() {
        for body in [
            b"{".to_vec(),
            b"[]".to_vec(),
            review_of(|r| r["apiVersion"] = json!("admission.k8s.io/v1beta1")),
            review_of(|r| {
                r.as_object_mut()
                    .unwrap()
                    .remove("request")
                    .map(drop)
                    .unwrap()
            }),
            review_of(|r| {
                r["request"]
                    .as_object_mut()
                    .unwrap()
                    .remove("uid")
                    .map(drop)
                    .unwrap()
            }),
        ] {
            assert!(review(&body, false, &defaults()).is_err());
        }
    }
}
