//! `tollgate inject` (SPEC §1, §9): adds the gateway as a sidecar to every workload of a
//! multi-document manifest, the way `istioctl kube-inject` and `linkerd inject` do.
//!
//! Each Deployment/StatefulSet/DaemonSet/ReplicaSet/Job/Pod gets the gateway container
//! (a native sidecar in `initContainers` by default), the policy and scratch volumes, the
//! `tollgate.io/sidecar` label and the `tollgate.io/injected` annotation. A Service that
//! selects such pods and targets the application's port is re-pointed at the gateway.
//! Every workload without a policy ConfigMap in the manifest gets one forwarding to the
//! application on localhost. Documents left alone are printed exactly as read, and a
//! second run changes nothing: injected pods are recognised by their annotation.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

pub(crate) const INJECTED: &str = "tollgate.io/injected";
pub(crate) const SIDECAR_LABEL: &str = "tollgate.io/sidecar";
/// The ports the gateway prefers, as in the chart; the next free ones are taken when the
/// pod already uses them.
const GATEWAY_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 9901;

/// A YAML node that keeps the order of mapping keys, so re-written documents read like
/// the originals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(IndexMap<String, Node>),
}

impl Node {
    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(map) => map.get(key),
            _ => None,
        }
    }

    pub(crate) fn path(&self, keys: &[&str]) -> Option<&Node> {
        keys.iter().try_fold(self, |node, key| node.get(key))
    }

    /// The mapping at `keys` below this one, created (as empty mappings) where missing.
    fn map_at(&mut self, keys: &[&str]) -> &mut IndexMap<String, Node> {
        let Node::Map(map) = self else {
            unreachable!("callers only descend from mappings")
        };
        keys.iter().fold(map, |map, key| Node::map_mut(map, key))
    }

    /// The mapping under `key`, made one if it is missing or something else.
    fn map_mut<'a>(
        map: &'a mut IndexMap<String, Node>,
        key: &str,
    ) -> &'a mut IndexMap<String, Node> {
        let node = map
            .entry(key.to_string())
            .or_insert_with(|| Node::Map(IndexMap::new()));
        if !matches!(node, Node::Map(_)) {
            *node = Node::Map(IndexMap::new());
        }
        match node {
            Node::Map(map) => map,
            _ => unreachable!("made a mapping above"),
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    fn seq_mut<'a>(map: &'a mut IndexMap<String, Node>, key: &str) -> &'a mut Vec<Node> {
        let node = map
            .entry(key.to_string())
            .or_insert_with(|| Node::Seq(Vec::new()));
        if !matches!(node, Node::Seq(_)) {
            *node = Node::Seq(Vec::new());
        }
        match node {
            Node::Seq(seq) => seq,
            _ => unreachable!("made a sequence above"),
        }
    }
}

#[derive(Clone)]
pub struct Options {
    pub image: String,
    /// The policy ConfigMap for every workload; default `<workload>-tollgate`.
    pub config_map: Option<String>,
    /// A native sidecar (`initContainers` with `restartPolicy: Always`, Kubernetes
    /// ≥ 1.29) or a plain container.
    pub native: bool,
    /// The application's port when its first container declares none.
    pub app_port: Option<u16>,
    /// The gateway's listening port and its admin API's; by default the first free
    /// ones from 8080 and 9901 that no container of the pod declares.
    pub port: Option<u16>,
    pub admin_port: Option<u16>,
}

/// What `inject` made: the manifest, and a line per injected workload saying which
/// ports the gateway took.
pub struct Injection {
    pub manifest: String,
    pub notes: Vec<String>,
}

/// The gateway's two ports in one pod.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ports {
    gateway: u16,
    admin: u16,
}

/// What one injected workload needs from the other documents.
struct Injected {
    name: String,
    namespace: Option<String>,
    pod_labels: IndexMap<String, Node>,
    app_port: u16,
    app_port_name: Option<String>,
    config_map: String,
    ports: Ports,
}

struct Document {
    raw: String,
    node: Option<Node>,
    changed: bool,
}

/// Injects into `manifest`; `Err` names the document that cannot be handled.
pub fn inject(manifest: &str, options: &Options) -> Result<Injection, String> {
    let mut documents: Vec<Document> = split_documents(manifest)
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let node = if raw
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                None
            } else {
                Some(
                    serde_saphyr::from_str::<Node>(&raw)
                        .map_err(|e| format!("document {}: {e}", index + 1))?,
                )
            };
            Ok(Document {
                raw,
                node,
                changed: false,
            })
        })
        .collect::<Result<_, String>>()?;

    let mut workloads = Vec::new();
    let mut notes = Vec::new();
    for (index, document) in documents.iter_mut().enumerate() {
        let Some(node) = &mut document.node else {
            continue;
        };
        if let Some((workload, changed)) =
            inject_workload(node, options).map_err(|e| format!("document {}: {e}", index + 1))?
        {
            if changed {
                notes.push(format!(
                    "{}: gateway on port {}, admin API on port {}, application on port {}",
                    workload.name, workload.ports.gateway, workload.ports.admin, workload.app_port
                ));
            }
            document.changed |= changed;
            workloads.push(workload);
        }
    }
    for document in &mut documents {
        if let Some(node) = &mut document.node {
            document.changed |= retarget_service(node, &workloads);
        }
    }

    let mut out = String::new();
    for document in &documents {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        match (&document.node, document.changed) {
            (Some(node), true) => out.push_str(&to_yaml(node)?),
            _ => out.push_str(&document.raw),
        }
    }
    let mut added = std::collections::HashSet::new();
    for workload in &workloads {
        let present = documents.iter().any(|d| {
            d.node.as_ref().is_some_and(|n| {
                n.get("kind").and_then(Node::str) == Some("ConfigMap")
                    && n.path(&["metadata", "name"]).and_then(Node::str)
                        == Some(workload.config_map.as_str())
                    && n.path(&["metadata", "namespace"]).and_then(Node::str)
                        == workload.namespace.as_deref()
            })
        });
        if !present && added.insert((&workload.config_map, &workload.namespace)) {
            if !out.is_empty() {
                out.push_str("---\n");
            }
            out.push_str(&to_yaml(&policy_config_map(workload)?)?);
        }
    }
    Ok(Injection {
        manifest: out,
        notes,
    })
}

/// Splits a stream into documents at `---` lines, keeping each document's text.
fn split_documents(manifest: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in manifest.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            documents.push(String::new());
        } else {
            documents.last_mut().expect("never empty").push_str(line);
        }
    }
    if documents.first().is_some_and(|d| d.trim().is_empty()) && documents.len() > 1 {
        documents.remove(0);
    }
    for document in &mut documents {
        if !document.is_empty() && !document.ends_with('\n') {
            document.push('\n');
        }
    }
    documents
}

fn to_yaml(node: &Node) -> Result<String, String> {
    let mut text = serde_saphyr::to_string(node).map_err(|e| e.to_string())?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

/// Where a workload kind keeps its pod template.
fn pod_template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&["spec", "template"])
        }
        "Pod" => Some(&[]),
        _ => None,
    }
}

/// Injects into one workload; `None` when the document is not a workload. The flag says
/// whether anything changed (false when it was injected before).
fn inject_workload(node: &mut Node, options: &Options) -> Result<Option<(Injected, bool)>, String> {
    let Some(kind) = node.get("kind").and_then(Node::str).map(str::to_string) else {
        return Ok(None);
    };
    let Some(template_path) = pod_template_path(&kind) else {
        return Ok(None);
    };
    inject_template(node, &kind, template_path, options).map(Some)
}

/// Injects into one Pod as the API server creates it (the admission webhook's case):
/// returns whether it changed. The same injection as `tollgate inject` gives a Pod.
pub(crate) fn inject_pod(pod: &mut Node, options: &Options) -> Result<bool, String> {
    inject_template(pod, "Pod", &[], options).map(|(_, changed)| changed)
}

/// The workload's name, for its default ConfigMap: `metadata.name`, else what a
/// controller-made Pod's `generateName` says of its owner (`web-7c5d8f9b6d-` of a
/// Deployment's ReplicaSet is `web`; `web-` of a StatefulSet or Job is `web`).
fn workload_name(node: &Node) -> Option<String> {
    let metadata = node.get("metadata")?;
    if let Some(name) = metadata.get("name").and_then(Node::str) {
        return Some(name.to_string());
    }
    let generated = metadata.get("generateName").and_then(Node::str)?;
    let mut owner = generated.strip_suffix('-').unwrap_or(generated);
    if let Some(hash) = metadata
        .path(&["labels", "pod-template-hash"])
        .and_then(Node::str)
    {
        owner = owner
            .strip_suffix(hash)
            .and_then(|o| o.strip_suffix('-'))
            .unwrap_or(owner);
    }
    (!owner.is_empty()).then(|| owner.to_string())
}

fn inject_template(
    node: &mut Node,
    kind: &str,
    template_path: &[&str],
    options: &Options,
) -> Result<(Injected, bool), String> {
    let metadata_keys = [template_path, &["metadata"]].concat();
    let name = workload_name(node).ok_or_else(|| format!("{kind} without metadata.name"))?;
    let namespace = node
        .path(&["metadata", "namespace"])
        .and_then(Node::str)
        .map(str::to_string);
    let spec_keys = [template_path, &["spec"]].concat();
    let containers = match node.path(&spec_keys).map(|spec| spec.get("containers")) {
        Some(Some(Node::Seq(containers))) => containers,
        Some(_) => return Err(format!("{kind} {name} has no containers")),
        None => return Err(format!("{kind} {name} has no pod spec")),
    };
    let app = containers
        .iter()
        .find(|c| c.get("name").and_then(Node::str) != Some("tollgate"))
        .ok_or_else(|| format!("{kind} {name} has no application container"))?;
    let first_port = match app.get("ports") {
        Some(Node::Seq(ports)) => ports.first().cloned(),
        _ => None,
    };
    let app_port = match (
        options.app_port,
        first_port.as_ref().and_then(|p| p.get("containerPort")),
    ) {
        (Some(port), _) => port,
        (None, Some(Node::Int(port))) => u16::try_from(*port)
            .map_err(|_| format!("{kind} {name}: containerPort {port} out of range"))?,
        _ => {
            return Err(format!(
                "{kind} {name}: its container declares no port; pass --app-port"
            ))
        }
    };
    let spec = node.path(&spec_keys).expect("checked above");
    let ports = match sidecar_ports(spec) {
        Some(ports) => ports,
        None => choose_ports(&declared_ports(spec), app_port, options)
            .map_err(|e| format!("{kind} {name}: {e}"))?,
    };
    let app_port_name = first_port
        .as_ref()
        .and_then(|p| p.get("name"))
        .and_then(Node::str)
        .map(str::to_string);
    let config_map = options
        .config_map
        .clone()
        .unwrap_or_else(|| format!("{name}-tollgate"));

    let already = node
        .path(&metadata_keys)
        .and_then(|m| m.path(&["annotations", INJECTED]))
        .is_some();
    let mut pod_labels = match node.path(&metadata_keys).and_then(|m| m.get("labels")) {
        Some(Node::Map(labels)) => labels.clone(),
        _ => IndexMap::new(),
    };
    pod_labels.insert(SIDECAR_LABEL.into(), Node::Str("true".into()));
    let injected = Injected {
        name,
        namespace,
        pod_labels,
        app_port,
        app_port_name,
        config_map,
        ports,
    };
    if already {
        return Ok((injected, false));
    }

    let metadata = node.map_at(&metadata_keys);
    Node::map_mut(metadata, "labels").insert(SIDECAR_LABEL.into(), Node::Str("true".into()));
    Node::map_mut(metadata, "annotations")
        .insert(INJECTED.into(), Node::Str(env!("CARGO_PKG_VERSION").into()));

    let spec = node.map_at(&spec_keys);
    let container = sidecar_container(options, ports)?;
    if options.native {
        Node::seq_mut(spec, "initContainers").push(container);
    } else {
        Node::seq_mut(spec, "containers").push(container);
    }
    let volumes = Node::seq_mut(spec, "volumes");
    volumes.extend(parse(&format!(
        "- name: tollgate-policy\n  configMap:\n    name: {}\n- name: tollgate-run\n  emptyDir: {{}}\n",
        injected.config_map
    ))?.into_seq());
    Ok((injected, true))
}

impl Node {
    fn into_seq(self) -> Vec<Node> {
        match self {
            Node::Seq(seq) => seq,
            other => vec![other],
        }
    }
}

fn parse(yaml: &str) -> Result<Node, String> {
    serde_saphyr::from_str(yaml).map_err(|e| e.to_string())
}

/// The pod's containers, application and gateway alike, under `spec`.
fn pod_containers(spec: &Node) -> impl Iterator<Item = &Node> {
    ["containers", "initContainers"]
        .into_iter()
        .filter_map(|key| match spec.get(key) {
            Some(Node::Seq(containers)) => Some(containers.iter()),
            _ => None,
        })
        .flatten()
}

fn container_ports(container: &Node) -> impl Iterator<Item = (Option<&str>, i64)> {
    let ports = match container.get("ports") {
        Some(Node::Seq(ports)) => ports.as_slice(),
        _ => &[],
    };
    ports.iter().filter_map(|p| match p.get("containerPort") {
        Some(Node::Int(n)) => Some((p.get("name").and_then(Node::str), *n)),
        _ => None,
    })
}

/// The ports an earlier injection gave the gateway container, when there is one.
fn sidecar_ports(spec: &Node) -> Option<Ports> {
    let sidecar =
        pod_containers(spec).find(|c| c.get("name").and_then(Node::str) == Some("tollgate"))?;
    let port = |wanted: &str| {
        container_ports(sidecar)
            .find(|(name, _)| *name == Some(wanted))
            .and_then(|(_, n)| u16::try_from(n).ok())
    };
    Some(Ports {
        gateway: port("gateway-http")?,
        admin: port("gateway-admin")?,
    })
}

/// Every port a container of the pod other than the gateway declares: they share one
/// network namespace, so the gateway must take none of them.
fn declared_ports(spec: &Node) -> Vec<u16> {
    pod_containers(spec)
        .filter(|c| c.get("name").and_then(Node::str) != Some("tollgate"))
        .flat_map(container_ports)
        .filter_map(|(_, n)| u16::try_from(n).ok())
        .collect()
}

/// The gateway's ports: those asked for, else the first free ones from the defaults.
fn choose_ports(declared: &[u16], app_port: u16, options: &Options) -> Result<Ports, String> {
    let taken = |port: u16, also: Option<u16>| {
        declared.contains(&port) || port == app_port || Some(port) == also
    };
    let pick = |asked: Option<u16>, from: u16, flag: &str, also: Option<u16>| {
        match asked {
        Some(port) if taken(port, also) => Err(format!(
            "{flag} {port} is already used in the pod (application port {app_port}, declared {declared:?})"
        )),
        Some(port) => Ok(port),
        None => (from..=u16::MAX)
            .chain(1024..from)
            .find(|&port| !taken(port, also))
            .ok_or_else(|| format!("no free port for {flag}")),
    }
    };
    let gateway = pick(options.port, GATEWAY_PORT, "--port", options.admin_port)?;
    let admin = pick(
        options.admin_port,
        ADMIN_PORT,
        "--admin-port",
        Some(gateway),
    )?;
    Ok(Ports { gateway, admin })
}

/// The gateway container, with the probes, security settings and mounts of the chart's.
fn sidecar_container(options: &Options, ports: Ports) -> Result<Node, String> {
    let restart = if options.native {
        "restartPolicy: Always\n"
    } else {
        ""
    };
    parse(&format!(
        "name: tollgate
image: \"{image}\"
{restart}args: [run, -c, /etc/tollgate/gateway.yaml]
ports:
  - {{ name: gateway-http, containerPort: {gateway}, protocol: TCP }}
  - {{ name: gateway-admin, containerPort: {admin}, protocol: TCP }}
startupProbe: {{ httpGet: {{ path: /healthz, port: gateway-admin }}, periodSeconds: 1, failureThreshold: 30 }}
livenessProbe: {{ httpGet: {{ path: /healthz, port: gateway-admin }}, periodSeconds: 10 }}
readinessProbe: {{ httpGet: {{ path: /readyz, port: gateway-admin }}, periodSeconds: 5 }}
lifecycle: {{ preStop: {{ sleep: {{ seconds: 5 }} }} }}
resources: {{ requests: {{ cpu: 100m, memory: 64Mi }}, limits: {{ memory: 256Mi }} }}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: 65532
  capabilities: {{ drop: [ALL] }}
volumeMounts:
  - {{ name: tollgate-policy, mountPath: /etc/tollgate, readOnly: true }}
  - {{ name: tollgate-run, mountPath: /tmp }}
",
        image = options.image,
        gateway = ports.gateway,
        admin = ports.admin,
    ))
}

/// Re-points a Service at the gateway when it selects an injected workload's pods and
/// targets the application's port. Returns whether it changed.
fn retarget_service(node: &mut Node, workloads: &[Injected]) -> bool {
    if node.get("kind").and_then(Node::str) != Some("Service") {
        return false;
    }
    let namespace = node
        .path(&["metadata", "namespace"])
        .and_then(Node::str)
        .map(str::to_string);
    let Some(Node::Map(selector)) = node.path(&["spec", "selector"]).cloned() else {
        return false;
    };
    let Some(workload) = workloads.iter().find(|w| {
        w.namespace == namespace
            && !selector.is_empty()
            && selector.iter().all(|(k, v)| w.pod_labels.get(k) == Some(v))
    }) else {
        return false;
    };
    let mut changed = false;
    let spec = node.map_at(&["spec"]);
    if let Some(Node::Seq(ports)) = spec.get_mut("ports") {
        for port in ports {
            let Node::Map(port) = port else { continue };
            let target = port.get("targetPort").or_else(|| port.get("port")).cloned();
            let to_app = match &target {
                Some(Node::Int(n)) => *n == i64::from(workload.app_port),
                Some(Node::Str(s)) => Some(s) == workload.app_port_name.as_ref(),
                _ => false,
            };
            if to_app {
                port.insert("targetPort".into(), Node::Str("gateway-http".into()));
                changed = true;
            }
        }
    }
    changed
}

/// The policy of one injected workload: everything to the application on localhost; the
/// admin listener on all interfaces, where kubelet probes reach it; a drain that fits,
/// with the 5 s preStop, in Kubernetes' default 30 s grace period.
fn policy_config_map(workload: &Injected) -> Result<Node, String> {
    let policy = format!(
        "version: 1\nserver:\n  listen: [\"0.0.0.0:{}\"]\n  shutdown_grace: 20s\nadmin:\n  listen: \"0.0.0.0:{}\"\n  token_env: TOLLGATE_ADMIN_TOKEN\nupstreams:\n  app:\n    servers: [\"127.0.0.1:{}\"]\nroutes:\n  - name: all\n    upstream: app\n",
        workload.ports.gateway, workload.ports.admin, workload.app_port
    );
    let mut metadata = IndexMap::new();
    metadata.insert("name".into(), Node::Str(workload.config_map.clone()));
    if let Some(namespace) = &workload.namespace {
        metadata.insert("namespace".into(), Node::Str(namespace.clone()));
    }
    let mut labels = IndexMap::new();
    labels.insert(
        "app.kubernetes.io/part-of".into(),
        Node::Str(workload.name.clone()),
    );
    metadata.insert("labels".into(), Node::Map(labels));
    let mut data = IndexMap::new();
    data.insert("gateway.yaml".into(), Node::Str(policy));
    let mut config_map = IndexMap::new();
    config_map.insert("apiVersion".into(), Node::Str("v1".into()));
    config_map.insert("kind".into(), Node::Str("ConfigMap".into()));
    config_map.insert("metadata".into(), Node::Map(metadata));
    config_map.insert("data".into(), Node::Map(data));
    Ok(Node::Map(config_map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_separator_lines_only() {
        let docs = split_documents("---\na: 1\n--- # x\nb: \"---\"\n---\nc: 3");
        assert_eq!(docs, ["a: 1\n", "b: \"---\"\n", "c: 3\n"]);
        assert_eq!(split_documents("a: 1\n"), ["a: 1\n"]);
    }

    #[test]
    fn kinds_without_pods_are_left_alone() {
        let options = Options {
            image: "i".into(),
            config_map: None,
            native: true,
            app_port: None,
            port: None,
            admin_port: None,
        };
        let text = "apiVersion: v1\nkind: Secret\nmetadata: { name: s }\n";
        assert_eq!(inject(text, &options).unwrap().manifest, text);
    }

    #[test]
    fn ports_avoid_every_port_the_pod_declares() {
        let options = |port, admin_port| Options {
            image: "i".into(),
            config_map: None,
            native: true,
            app_port: None,
            port,
            admin_port,
        };
        let chosen = |declared: &[u16], app, port, admin| {
            choose_ports(declared, app, &options(port, admin)).map(|p| (p.gateway, p.admin))
        };
        assert_eq!(chosen(&[3000], 3000, None, None), Ok((8080, 9901)));
        assert_eq!(chosen(&[8080], 8080, None, None), Ok((8081, 9901)));
        assert_eq!(
            chosen(&[8080, 8081, 9901, 9090], 8080, None, None),
            Ok((8082, 9902))
        );
        assert_eq!(
            chosen(&[8080], 8080, Some(7000), Some(7001)),
            Ok((7000, 7001))
        );
        assert_eq!(chosen(&[8080], 8080, None, Some(8081)), Ok((8082, 8081)));
        assert!(chosen(&[8080, 9000], 8080, Some(9000), None).is_err());
        assert!(chosen(&[8080], 8080, Some(7000), Some(7000)).is_err());
    }
}
