//! Identity (SPEC §4): API keys by hash (inline and from a hot-reloaded file), JWTs
//! (HS256 secret from the environment, RS256/ES256 PEM keys, a JWKS file), the trusted
//! user header, `on_invalid`, and the 401 the gateway answers for bad credentials.

mod common;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::process::Command;
use std::time::Duration;

fn sha(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn policy(app: &Upstream, identity: &str) -> String {
    format!(
        "{}identity:\n{identity}",
        simple_policy(&[app.addr.to_string()])
    )
}

/// The user and tier the access log recorded for the request with this id.
fn logged_user(gw: &Tollgate, response: &reqwest::blocking::Response) -> (Value, Value) {
    let line = gw
        .access_line(&request_id(response), Duration::from_secs(5))
        .expect("the request's line");
    (line["user"].clone(), line["tier"].clone())
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn api_keys_resolve_users_and_unknown_keys_get_401() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        &format!(
            "  api_keys:\n    header: x-api-key\n    keys:\n      - {{ sha256: \"{}\", user: alice, tier: enterprise }}\n  default_tier: free\n",
            sha("alice-key")
        ),
    ));
    let ok = gw
        .client
        .get(gw.url("/health"))
        .header("x-api-key", "alice-key")
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(logged_user(&gw, &ok), (json!("alice"), json!("enterprise")));

    let anonymous = gw.get("/health");
    assert_eq!(anonymous.status(), 200);
    assert_eq!(logged_user(&gw, &anonymous).0, Value::Null);

    let before = app.requests();
    let bad = gw
        .client
        .get(gw.url("/health"))
        .header("x-api-key", "guess")
        .send()
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
    let doc: Value = bad.json().unwrap();
    assert_eq!(doc["error"], "unauthorized");
    assert_eq!(
        app.requests(),
        before,
        "a rejected request never reaches upstream"
    );
}

#[test]
fn on_invalid_anonymous_lets_bad_credentials_through_as_anonymous() {
    let app = upstream("app");
    let gw = Tollgate::start(&policy(
        &app,
        &format!("  api_keys:\n    keys:\n      - {{ sha256: \"{}\", user: alice }}\n  on_invalid: anonymous\n", sha("alice-key")),
    ));
    let response = gw
        .client
        .get(gw.url("/health"))
        .header("x-api-key", "guess")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(logged_user(&gw, &response).0, Value::Null);
}

#[test]
fn api_key_file_changes_reload_the_policy() {
    let app = upstream("app");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!("- {{ sha256: \"{}\", user: first }}\n", sha("k1")),
    )
    .unwrap();
    let (port, admin) = (free_port(), free_port());
    let policy_path = dir.path().join("gateway.yaml");
    std::fs::write(
        &policy_path,
        format!(
            "{}{}",
            head(port, admin, ""),
            policy(&app, "  api_keys:\n    file: keys.yaml\n")
        ),
    )
    .unwrap();
    let gw = Tollgate::spawn(tempfile::tempdir().unwrap(), policy_path, port, admin, &[]);
    assert!(wait_for(Duration::from_secs(20), || gw
        .admin_get("/healthz")
        .is_ok()));
    let with_key = |key: &str| {
        gw.client
            .get(gw.url("/health"))
            .header("x-api-key", key)
            .send()
            .unwrap()
            .status()
    };
    assert!(wait_for(Duration::from_secs(5), || gw
        .client
        .get(gw.url("/health"))
        .send()
        .is_ok()));
    assert_eq!(with_key("k1"), 200);
    assert_eq!(with_key("k2"), 401);
    std::fs::write(
        dir.path().join("keys.yaml"),
        format!("- {{ sha256: \"{}\", user: second }}\n", sha("k2")),
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || gw.generation() == 2),
        "a key file change is a policy change"
    );
    assert_eq!(with_key("k2"), 200);
    assert_eq!(with_key("k1"), 401);
}

#[test]
fn hs256_tokens_from_an_environment_secret() {
    let app = upstream("app");
    let identity = "  jwt:\n    algorithms: [HS256]\n    hs256_secret_env: TEST_JWT_SECRET\n    issuer: https://auth.example.com\n    audience: api\n    leeway: 0s\n";
    let gw = Tollgate::start_with(
        &policy(&app, identity),
        "",
        &[("TEST_JWT_SECRET", "s3cret")],
    );
    let token = |claims: Value, secret: &str| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let claims = |exp: u64, iss: &str| json!({"sub": "carol", "tier": "standard", "iss": iss, "aud": "api", "exp": exp});
    let call = |token: &str| {
        gw.client
            .get(gw.url("/health"))
            .bearer_auth(token)
            .send()
            .unwrap()
    };

    let ok = call(&token(
        claims(now() + 60, "https://auth.example.com"),
        "s3cret",
    ));
    assert_eq!(ok.status(), 200);
    assert_eq!(logged_user(&gw, &ok), (json!("carol"), json!("standard")));

    for (bad, detail) in [
        (
            token(claims(now() - 5, "https://auth.example.com"), "s3cret"),
            "token expired",
        ),
        (
            token(claims(now() + 60, "https://auth.example.com"), "wrong"),
            "token signature not valid for any configured key",
        ),
        (
            token(claims(now() + 60, "https://evil.example.com"), "s3cret"),
            "token issuer not accepted",
        ),
        ("not.a.jwt".to_string(), "malformed bearer token"),
    ] {
        let response = call(&bad);
        assert_eq!(response.status(), 401, "{detail}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(response.json::<Value>().unwrap()["detail"], detail);
    }
}

#[test]
fn rs256_and_es256_pem_keys_and_a_jwks_file() {
    let keys = tempfile::tempdir().unwrap();
    let dir = keys.path();
    openssl(dir, &["genrsa", "-out", "rsa.pem", "2048"]);
    openssl(
        dir,
        &["rsa", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"],
    );
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.sec1.pem",
        ],
    );
    openssl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "ec.sec1.pem",
            "-out",
            "ec.pem",
        ],
    );
    openssl(
        dir,
        &["ec", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"],
    );
    openssl(dir, &["genrsa", "-out", "jwks-rsa.pem", "2048"]);
    // The JWKS entry for the third key: modulus and exponent, base64url.
    let modulus = Command::new("openssl")
        .args(["rsa", "-in", "jwks-rsa.pem", "-noout", "-modulus"])
        .current_dir(dir)
        .output()
        .unwrap();
    let hex = String::from_utf8(modulus.stdout)
        .unwrap()
        .trim()
        .trim_start_matches("Modulus=")
        .to_string();
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k-2026", "alg": "RS256", "use": "sig", "n": base64url(&n), "e": "AQAB"}]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();

    let app = upstream("app");
    let identity = format!(
        "  jwt:\n    algorithms: [RS256, ES256]\n    public_keys: [\"{}\", \"{}\"]\n    jwks_file: \"{}\"\n    user_claim: uid\n",
        dir.join("rsa.pub.pem").display(),
        dir.join("ec.pub.pem").display(),
        dir.join("jwks.json").display()
    );
    let gw = Tollgate::start(&policy(&app, &identity));
    let claims = |user: &str| json!({"uid": user, "exp": now() + 60});
    let sign = |alg: Algorithm, kid: Option<&str>, key: &EncodingKey, user: &str| {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, &claims(user), key).unwrap()
    };
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&read("ec.pem")).unwrap();
    let jwks_rsa = EncodingKey::from_rsa_pem(&read("jwks-rsa.pem")).unwrap();
    for (token, user) in [
        (sign(Algorithm::RS256, None, &rsa, "rsa-user"), "rsa-user"),
        (sign(Algorithm::ES256, None, &ec, "ec-user"), "ec-user"),
        (
            sign(Algorithm::RS256, Some("k-2026"), &jwks_rsa, "jwks-user"),
            "jwks-user",
        ),
    ] {
        let response = gw
            .client
            .get(gw.url("/health"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(response.status(), 200, "{user}");
        assert_eq!(logged_user(&gw, &response).0, json!(user));
    }
    let hs = encode(
        &Header::default(),
        &claims("x"),
        &EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    let response = gw
        .client
        .get(gw.url("/health"))
        .bearer_auth(hs)
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        401,
        "HS256 is not in this policy's algorithms"
    );
}

#[test]
fn trusted_user_header_only_from_trusted_proxies() {
    let app = upstream("app");
    let body = policy(&app, "  trusted_user_header: x-user-id\n");
    let trusted = Tollgate::start_with(&body, "  trusted_proxies: [\"127.0.0.1/32\"]\n", &[]);
    let response = trusted
        .client
        .get(trusted.url("/health"))
        .header("x-user-id", "erin")
        .send()
        .unwrap();
    assert_eq!(
        logged_user(&trusted, &response),
        (json!("erin"), json!("free"))
    );

    let untrusted = Tollgate::start(&body);
    let response = untrusted
        .client
        .get(untrusted.url("/health"))
        .header("x-user-id", "erin")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(logged_user(&untrusted, &response).0, Value::Null);
}
