//! TLS on both sides: the HTTPS listener (HTTP/2 by ALPN) and verified TLS to upstreams
//! with a policy-named CA. Certificates come from the openssl command line.

mod common;

use common::*;
use std::process::Command;

/// A gateway with an HTTPS listener on certificates made for the test, in front of
/// the demo upstream: (certificates' directory, upstream, gateway, HTTPS port).
fn https_gateway() -> (tempfile::TempDir, Upstream, Tollgate, u16) {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let app = upstream("app");
    let tls_port = free_port();
    let tls_section = format!(
        "  tls: {{ listen: \"127.0.0.1:{tls_port}\", cert: \"{}\", key: \"{}\" }}\n",
        certs.path().join("tls.crt").display(),
        certs.path().join("tls.key").display()
    );
    let gateway = Tollgate::start_with(&simple_policy(&[app.addr.to_string()]), &tls_section, &[]);
    assert!(wait_for(std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    }));
    (certs, app, gateway, tls_port)
}

#[test]
fn https_listener_and_verified_tls_upstreams() {
    let (certs, _app, _edge, tls_port) = https_gateway();

    // HTTPS with HTTP/2 negotiated by ALPN, and HTTP/1.1 on the same listener.
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                flag,
                "--cacert",
            ])
            .arg(certs.path().join("ca.pem"))
            .arg(format!("https://localhost:{tls_port}/api/predict"))
            .args(["--resolve", &format!("localhost:{tls_port}:127.0.0.1")])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{version} 200"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A gateway in front, speaking verified TLS to the first one with the policy's CA.
    let ca = certs.path().join("ca.pem");
    let front = Tollgate::start(&format!(
        "upstreams:
  edge:
    servers: [\"127.0.0.1:{tls_port}\"]
    tls: {{ sni: localhost, ca: \"{ca}\" }}
  unverifiable:
    servers: [\"127.0.0.1:{tls_port}\"]
    tls: true
routes:
  - name: verified
    match: {{ path_prefix: /api/ }}
    upstream: edge
  - name: unverified
    match: {{ path_prefix: /other/ }}
    upstream: unverifiable
",
        ca = ca.display()
    ));
    let response = front.get("/api/predict");
    assert_eq!(response.status(), 200);
    let doc: serde_json::Value = response.json().unwrap();
    assert_eq!(doc["server"], "app");
    assert_eq!(
        front.get("/other/x").status(),
        502,
        "a certificate no trusted CA signed is refused"
    );
}

#[test]
fn a_bad_ca_file_is_a_located_policy_error() {
    let text = format!(
        "{}upstreams:\n  app:\n    servers: [\"127.0.0.1:1\"]\n    tls: {{ ca: ca.pem }}\nroutes:\n  - name: all\n    upstream: app\n",
        head(8080, 9901, "")
    );
    let (code, stderr) = check_policy(&text, &[("ca.pem", "not a certificate")]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(":12:") && stderr.contains("tls.ca `ca.pem`: no certificate"),
        "{stderr}"
    );
}

#[test]
fn a_renewed_listener_certificate_is_served_without_a_restart() {
    let (certs, _app, _gateway, tls_port) = https_gateway();
    let status = |ca: &std::path::Path| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(ca)
            .arg(format!("https://localhost:{tls_port}/api/predict"))
            .args(["--resolve", &format!("localhost:{tls_port}:127.0.0.1")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let old_ca = certs.path().join("ca.pem");
    assert!(wait_for(std::time::Duration::from_secs(10), || status(
        &old_ca
    ) == "200"));

    // The renewal lands as a Secret volume update does: each file replaced whole.
    let renewed = tempfile::tempdir().unwrap();
    make_certificates(renewed.path());
    for file in ["tls.key", "tls.crt"] {
        let staged = certs.path().join(format!(".{file}"));
        std::fs::copy(renewed.path().join(file), &staged).unwrap();
        std::fs::rename(&staged, certs.path().join(file)).unwrap();
    }
    let new_ca = renewed.path().join("ca.pem");
    assert!(
        wait_for(std::time::Duration::from_secs(10), || status(&new_ca)
            == "200"),
        "the renewed certificate is not served"
    );
    assert_ne!(status(&old_ca), "200");
}
