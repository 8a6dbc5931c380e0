//! `tollgate inject` (SPEC §1, §9) on a multi-document manifest: the sidecar, volumes and
//! labels added, the Service re-pointed, the policy generated, everything else left as it
//! was, and a second run changing nothing.

use std::io::Write;
use std::process::{Command, Stdio};
use tollgate::inject::Node;

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/k8s/app.yaml");

fn inject(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn documents(text: &str) -> Vec<Node> {
    serde_saphyr::from_multiple(text).unwrap()
}

fn find<'a>(docs: &'a [Node], kind: &str, name: &str) -> &'a Node {
    docs.iter()
        .find(|d| {
            at(d, &["kind"]) == Some(&Node::Str(kind.into()))
                && at(d, &["metadata", "name"]) == Some(&Node::Str(name.into()))
        })
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn at<'a>(node: &'a Node, path: &[&str]) -> Option<&'a Node> {
    path.iter().try_fold(node, |n, key| match n {
        Node::Map(map) => map.get(*key),
        _ => None,
    })
}

fn seq<'a>(node: &'a Node, path: &[&str]) -> &'a [Node] {
    match at(node, path) {
        Some(Node::Seq(items)) => items,
        other => panic!("{path:?} is not a list: {other:?}"),
    }
}

fn named<'a>(items: &'a [Node], name: &str) -> Option<&'a Node> {
    items
        .iter()
        .find(|i| at(i, &["name"]) == Some(&Node::Str(name.into())))
}

fn s(text: &str) -> Node {
    Node::Str(text.into())
}

#[test]
fn injects_workloads_repoints_services_and_leaves_the_rest() {
    let (code, out, err) = inject(&["-f", APP], None);
    assert_eq!(code, 0, "{err}");
    let docs = documents(&out);

    let api = find(&docs, "Deployment", "api");
    let pod = at(api, &["spec", "template"]).unwrap();
    assert_eq!(
        at(pod, &["metadata", "labels", "tollgate.io/sidecar"]),
        Some(&s("true"))
    );
    assert!(at(pod, &["metadata", "annotations", "tollgate.io/injected"]).is_some());
    let sidecar = named(seq(pod, &["spec", "initContainers"]), "tollgate").expect("native sidecar");
    assert_eq!(at(sidecar, &["restartPolicy"]), Some(&s("Always")));
    assert_eq!(
        at(sidecar, &["readinessProbe", "httpGet", "path"]),
        Some(&s("/readyz"))
    );
    assert_eq!(
        at(sidecar, &["securityContext", "readOnlyRootFilesystem"]),
        Some(&Node::Bool(true))
    );
    let volumes = seq(pod, &["spec", "volumes"]);
    assert_eq!(
        at(
            named(volumes, "tollgate-policy").unwrap(),
            &["configMap", "name"]
        ),
        Some(&s("api-tollgate"))
    );
    assert!(named(volumes, "tollgate-run").is_some());
    // The application container is untouched.
    let app = named(seq(pod, &["spec", "containers"]), "api").unwrap();
    assert_eq!(
        at(app, &["env"]).map(|e| matches!(e, Node::Seq(v) if v.len() == 1)),
        Some(true)
    );
    assert_eq!(seq(pod, &["spec", "containers"]).len(), 1);

    // Services: the named targetPort and the implicit one both go to the gateway.
    let service = find(&docs, "Service", "api");
    assert_eq!(
        at(&seq(service, &["spec", "ports"])[0], &["targetPort"]),
        Some(&s("gateway-http"))
    );
    let headless = find(&docs, "Service", "search");
    assert_eq!(
        at(&seq(headless, &["spec", "ports"])[0], &["targetPort"]),
        Some(&s("gateway-http"))
    );

    // Each workload's policy forwards to its own port on localhost, and is valid.
    for (name, port) in [("api-tollgate", 3000), ("search-tollgate", 9200)] {
        let policy = at(find(&docs, "ConfigMap", name), &["data", "gateway.yaml"]).unwrap();
        let Node::Str(policy) = policy else {
            panic!("policy text")
        };
        assert!(policy.contains(&format!("127.0.0.1:{port}")), "{policy}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, policy).unwrap();
        let check = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    // Documents inject did not touch come out exactly as they went in, comments and
    // quoting included.
    let original = std::fs::read_to_string(APP).unwrap();
    let namespace_doc = original.split("---\n").next().unwrap();
    assert!(out.starts_with(namespace_doc), "{out}");
    let unrelated = original.split("---\n").last().unwrap();
    assert!(out.contains(unrelated), "{out}");
}

#[test]
fn a_second_run_changes_nothing() {
    let (_, first, _) = inject(&["-f", APP], None);
    let (code, second, err) = inject(&[], Some(&first));
    assert_eq!(code, 0, "{err}");
    assert_eq!(first, second);
    assert_eq!(first.matches("name: tollgate\n").count(), 2, "{first}");
}

#[test]
fn classic_sidecars_and_one_shared_policy() {
    let (code, out, err) = inject(
        &[
            "-f",
            APP,
            "--native",
            "false",
            "--config-map",
            "gateway-policy",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let docs = documents(&out);
    let pod = at(
        find(&docs, "StatefulSet", "search"),
        &["spec", "template", "spec"],
    )
    .unwrap();
    let sidecar = named(seq(pod, &["containers"]), "tollgate").expect("a plain container");
    assert!(at(sidecar, &["restartPolicy"]).is_none());
    assert!(at(pod, &["initContainers"]).is_none());
    // One shared ConfigMap, generated once (from the first workload's port).
    assert_eq!(
        out.matches("name: gateway-policy\n").count(),
        3,
        "two volumes and the ConfigMap: {out}"
    );
}

#[test]
fn a_workload_without_a_port_needs_app_port() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: job\nspec:\n  containers:\n    - name: job\n      image: busybox\n";
    let (code, _, err) = inject(&[], Some(pod));
    assert_eq!(code, 1);
    assert!(
        err.contains("Pod job") && err.contains("--app-port"),
        "{err}"
    );
    let (code, out, err) = inject(&["--app-port", "5000"], Some(pod));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("127.0.0.1:5000"));
    assert!(out.contains("kind: Pod") && out.contains("restartPolicy: Always"));
}

#[test]
fn an_application_on_the_gateways_default_port_gets_the_next_free_ones() {
    let manifest = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector: { matchLabels: { app: web } }\n  template:\n    metadata:\n      labels: { app: web }\n    spec:\n      containers:\n        - name: web\n          image: nginx\n          ports: [{ name: http, containerPort: 8080 }]\n        - name: metrics\n          image: exporter\n          ports: [{ containerPort: 9901 }, { containerPort: 8081 }]\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector: { app: web }\n  ports: [{ port: 80, targetPort: http }]\n";
    let (code, out, err) = inject(&[], Some(manifest));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("web: gateway on port 8082, admin API on port 9902, application on port 8080"),
        "{err}"
    );
    let docs = documents(&out);
    let pod = at(find(&docs, "Deployment", "web"), &["spec", "template"]).unwrap();
    let sidecar = named(seq(pod, &["spec", "initContainers"]), "tollgate").unwrap();
    let ports: Vec<&Node> = seq(sidecar, &["ports"])
        .iter()
        .map(|p| at(p, &["containerPort"]).unwrap())
        .collect();
    assert_eq!(ports, [&Node::Int(8082), &Node::Int(9902)]);
    let policy = at(
        find(&docs, "ConfigMap", "web-tollgate"),
        &["data", "gateway.yaml"],
    )
    .unwrap();
    let Node::Str(policy) = policy else {
        panic!("policy text")
    };
    assert!(
        policy.contains("0.0.0.0:8082") && policy.contains("0.0.0.0:9902"),
        "{policy}"
    );
    assert!(policy.contains("127.0.0.1:8080"), "{policy}");
    assert_eq!(
        at(
            &seq(find(&docs, "Service", "web"), &["spec", "ports"])[0],
            &["targetPort"]
        ),
        Some(&s("gateway-http"))
    );

    // Idempotent: the ports an injection chose are kept, nothing is said.
    let (code, again, err) = inject(&[], Some(&out));
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, out);
    assert!(err.is_empty(), "{err}");

    // Explicit ports are taken as given, unless the pod uses them.
    let (code, out, err) = inject(&["--port", "7000", "--admin-port", "7001"], Some(manifest));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("containerPort: 7000") && out.contains("0.0.0.0:7001"),
        "{out}"
    );
    let (code, _, err) = inject(&["--port", "9901"], Some(manifest));
    assert_eq!(code, 1);
    assert!(err.contains("--port 9901 is already used"), "{err}");
}
