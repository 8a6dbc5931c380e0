//! Who is the user of a request (SPEC §4 Identity): an API key entry, else a verified
//! JWT, else a `trusted_user_header` set by a trusted proxy, else anonymous.
//!
//! Keys are compared by their sha256, never stored raw. JWTs are verified with
//! jsonwebtoken (aws-lc backend); a verified token's principal is cached by the token's
//! hash until it expires, so a client reusing its token pays the signature check once.

use crate::config::{self, ApiKeyEntry, ConfigError, IdentityConfig, OnInvalid};
use crate::policy::compile::Compile;
use http::{HeaderMap, HeaderName};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use serde_saphyr::{Location, Spanned};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Principal {
    pub(crate) user: Arc<str>,
    pub(crate) tier: Arc<str>,
}

#[derive(Debug)]
pub(crate) enum Resolution {
    Anonymous,
    User(Arc<Principal>),
    /// Credentials were presented and are not valid: the reason, for the 401 detail.
    Invalid(&'static str),
}

pub(crate) struct Identity {
    api_keys: Option<ApiKeys>,
    jwt: Option<Jwt>,
    trusted_user_header: Option<HeaderName>,
    pub(crate) on_invalid: OnInvalid,
    pub(crate) default_tier: Arc<str>,
}

struct ApiKeys {
    header: HeaderName,
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
}

struct Jwt {
    header: HeaderName,
    /// Keys with the `kid` they were published under (JWKS), if any.
    keys: Vec<(Option<String>, DecodingKey)>,
    validations: Vec<Validation>,
    user_claim: String,
    tier_claim: String,
    cache: moka::sync::Cache<[u8; 32], (Arc<Principal>, u64)>,
}

/// How many verified tokens are remembered, and for how long at most.
const TOKEN_CACHE_ENTRIES: u64 = 10_000;
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(300);

impl Identity {
    /// Resolves the request's user. `peer_trusted` gates `trusted_user_header`.
    pub(crate) fn resolve(&self, headers: &HeaderMap, peer_trusted: bool) -> Resolution {
        if let Some(keys) = &self.api_keys {
            if let Some(key) = headers.get(&keys.header) {
                let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                return match keys.by_hash.get(&hash) {
                    Some(principal) => Resolution::User(principal.clone()),
                    None => Resolution::Invalid("unknown API key"),
                };
            }
        }
        if let Some(jwt) = &self.jwt {
            let token = headers
                .get(&jwt.header)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            if let Some(token) = token {
                return jwt.verify(token, &self.default_tier);
            }
        }
        if let (Some(header), true) = (&self.trusted_user_header, peer_trusted) {
            if let Some(user) = headers
                .get(header)
                .and_then(|v| v.to_str().ok())
                .filter(|u| !u.is_empty())
            {
                return Resolution::User(Arc::new(Principal {
                    user: user.into(),
                    tier: self.default_tier.clone(),
                }));
            }
        }
        Resolution::Anonymous
    }

    /// Whether a rejected credential was a bearer token (the 401 then says so).
    pub(crate) fn uses_bearer_tokens(&self) -> bool {
        self.jwt.is_some()
    }
}

impl Jwt {
    fn verify(&self, token: &str, default_tier: &Arc<str>) -> Resolution {
        let now = jsonwebtoken::get_current_timestamp();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((principal, expires)) = self.cache.get(&hash) {
            if now <= expires {
                return Resolution::User(principal);
            }
            self.cache.invalidate(&hash);
        }
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Resolution::Invalid("malformed bearer token");
        };
        let Some(validation) = self
            .validations
            .iter()
            .find(|v| v.algorithms.contains(&header.alg))
        else {
            return Resolution::Invalid("token algorithm not accepted");
        };
        let candidates = self
            .keys
            .iter()
            .filter(|(kid, _)| match (&header.kid, kid) {
                (Some(wanted), Some(kid)) => wanted == kid,
                _ => true,
            });
        let mut reason = "token signature not valid for any configured key";
        for (_, key) in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, validation) {
                Ok(data) => {
                    return self.principal(&data.claims, &hash, default_tier, validation.leeway)
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    match e.kind() {
                        ErrorKind::InvalidSignature
                        | ErrorKind::InvalidAlgorithm
                        | ErrorKind::InvalidKeyFormat => {}
                        ErrorKind::ExpiredSignature => return Resolution::Invalid("token expired"),
                        ErrorKind::ImmatureSignature => {
                            return Resolution::Invalid("token not valid yet")
                        }
                        ErrorKind::InvalidIssuer => {
                            return Resolution::Invalid("token issuer not accepted")
                        }
                        ErrorKind::InvalidAudience => {
                            return Resolution::Invalid("token audience not accepted")
                        }
                        ErrorKind::MissingRequiredClaim(_) => {
                            return Resolution::Invalid("token lacks a required claim")
                        }
                        _ => reason = "token not valid",
                    }
                }
            }
        }
        Resolution::Invalid(reason)
    }

    fn principal(
        &self,
        claims: &serde_json::Map<String, Value>,
        hash: &[u8; 32],
        default_tier: &Arc<str>,
        leeway: u64,
    ) -> Resolution {
        let text = |v: &Value| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let Some(user) = claims.get(&self.user_claim).and_then(text) else {
            return Resolution::Invalid("token has no user claim");
        };
        let tier = claims
            .get(&self.tier_claim)
            .and_then(text)
            .map_or_else(|| default_tier.clone(), Arc::from);
        let principal = Arc::new(Principal {
            user: user.into(),
            tier,
        });
        if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
            self.cache.insert(*hash, (principal.clone(), exp + leeway));
        }
        Resolution::User(principal)
    }
}

/// Compiles the `identity` section, appending located errors to `errors`. Files it reads
/// are appended to `read_files`, so that the reload watcher notices when they change.
pub(crate) fn compile(cx: &mut Compile<'_>, config: &IdentityConfig) -> Option<Identity> {
    let policy_path = cx.path;
    let (errors, read_files) = (&mut cx.errors, &mut cx.read_files);
    let errors_before = errors.len();
    let base = policy_path.parent().unwrap_or(Path::new("."));
    let err = |errors: &mut Vec<ConfigError>, at: &Location, message: String| {
        errors.push(ConfigError::at(policy_path, at, message))
    };
    let default_tier: Arc<str> = config.default_tier.as_str().into();

    let api_keys = match &config.api_keys {
        None => None,
        Some(k) => {
            let header = header_name(&k.header, policy_path, errors);
            let mut by_hash = HashMap::new();
            add_api_keys(&mut by_hash, &k.keys, policy_path, &default_tier, errors);
            if let Some(file) = &k.file {
                let path = base.join(&file.value);
                read_files.push(path.clone());
                match std::fs::read_to_string(&path) {
                    Ok(text) => match config::parse_api_keys(&path, &text) {
                        Ok(entries) => {
                            add_api_keys(&mut by_hash, &entries, &path, &default_tier, errors)
                        }
                        Err(e) => errors.push(e),
                    },
                    Err(e) => err(
                        errors,
                        &file.referenced,
                        format!("cannot read `{}`: {e}", path.display()),
                    ),
                }
            }
            header.map(|header| ApiKeys { header, by_hash })
        }
    };

    let jwt = match &config.jwt {
        None => None,
        Some(j) => {
            let header = header_name(&j.header, policy_path, errors);
            let mut algorithms = Vec::new();
            for a in &j.algorithms {
                match a.value.as_str() {
                    "HS256" => algorithms.push(Algorithm::HS256),
                    "RS256" => algorithms.push(Algorithm::RS256),
                    "ES256" => algorithms.push(Algorithm::ES256),
                    other => err(
                        errors,
                        &a.referenced,
                        format!("algorithm `{other}`: expected HS256, RS256 or ES256"),
                    ),
                }
            }
            let mut keys = Vec::new();
            if let Some(var) = &j.hs256_secret_env {
                match std::env::var(&var.value) {
                    Ok(secret) if !secret.is_empty() => {
                        keys.push((None, DecodingKey::from_secret(secret.as_bytes())))
                    }
                    _ => err(
                        errors,
                        &var.referenced,
                        format!(
                            "the environment variable `{}` holding the HS256 secret is not set",
                            var.value
                        ),
                    ),
                }
            }
            for pem in &j.public_keys {
                let path = base.join(&pem.value);
                read_files.push(path.clone());
                let key = std::fs::read(&path)
                    .map_err(|e| format!("cannot read `{}`: {e}", path.display()))
                    .and_then(|bytes| {
                        DecodingKey::from_rsa_pem(&bytes)
                            .or_else(|_| DecodingKey::from_ec_pem(&bytes))
                            .map_err(|_| {
                                format!(
                                    "`{}` is not an RSA or EC public key in PEM",
                                    path.display()
                                )
                            })
                    });
                match key {
                    Ok(key) => keys.push((None, key)),
                    Err(message) => err(errors, &pem.referenced, message),
                }
            }
            if let Some(jwks) = &j.jwks_file {
                let path = base.join(&jwks.value);
                read_files.push(path.clone());
                match load_jwks(&path) {
                    Ok(found) => keys.extend(found),
                    Err(message) => err(errors, &jwks.referenced, message),
                }
            }
            if keys.is_empty() && errors.len() == errors_before {
                err(
                    errors,
                    &Location::UNKNOWN,
                    "identity.jwt needs a key: hs256_secret_env, public_keys or jwks_file"
                        .to_string(),
                );
            }
            let validations = algorithms
                .iter()
                .map(|&alg| {
                    let mut v = Validation::new(alg);
                    v.algorithms = vec![alg];
                    v.leeway = j.leeway.0.as_secs();
                    v.validate_aud = j.audience.is_some();
                    if let Some(aud) = &j.audience {
                        v.set_audience(&[aud]);
                    }
                    if let Some(iss) = &j.issuer {
                        v.set_issuer(&[iss]);
                    }
                    v
                })
                .collect();
            header.map(|header| Jwt {
                header,
                keys,
                validations,
                user_claim: j.user_claim.clone(),
                tier_claim: j.tier_claim.clone(),
                cache: moka::sync::Cache::builder()
                    .max_capacity(TOKEN_CACHE_ENTRIES)
                    .time_to_live(TOKEN_CACHE_TTL)
                    .build(),
            })
        }
    };

    let trusted_user_header = config
        .trusted_user_header
        .as_ref()
        .and_then(|h| header_name(h, policy_path, errors));

    (errors.len() == errors_before).then(|| Identity {
        api_keys,
        jwt,
        trusted_user_header,
        on_invalid: config.on_invalid,
        default_tier,
    })
}

fn header_name(
    h: &Spanned<String>,
    file: &Path,
    errors: &mut Vec<ConfigError>,
) -> Option<HeaderName> {
    match HeaderName::from_bytes(h.value.as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            errors.push(ConfigError::at(
                file,
                &h.referenced,
                format!("`{}` is not a valid header name", h.value),
            ));
            None
        }
    }
}

fn add_api_keys(
    by_hash: &mut HashMap<[u8; 32], Arc<Principal>>,
    entries: &[ApiKeyEntry],
    file: &Path,
    default_tier: &Arc<str>,
    errors: &mut Vec<ConfigError>,
) {
    for entry in entries {
        let Some(digest) = decode_sha256(&entry.sha256.value) else {
            errors.push(ConfigError::at(
                file,
                &entry.sha256.referenced,
                "sha256 must be 64 hex digits: the hash of the key, never the key itself",
            ));
            continue;
        };
        let tier = entry
            .tier
            .as_deref()
            .map_or_else(|| default_tier.clone(), Arc::from);
        let principal = Arc::new(Principal {
            user: entry.user.as_str().into(),
            tier,
        });
        if by_hash.insert(digest, principal).is_some() {
            errors.push(ConfigError::at(
                file,
                &entry.sha256.referenced,
                "this API key is listed twice",
            ));
        }
    }
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn load_jwks(path: &Path) -> Result<Vec<(Option<String>, DecodingKey)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
        .map_err(|e| format!("`{}` is not a JWKS document: {e}", path.display()))?;
    set.keys
        .iter()
        .map(|jwk| {
            DecodingKey::from_jwk(jwk)
                .map(|key| (jwk.common.key_id.clone(), key))
                .map_err(|e| {
                    format!(
                        "`{}`: unusable key {:?}: {e}",
                        path.display(),
                        jwk.common.key_id
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn identity(yaml: &str) -> Identity {
        let config: IdentityConfig = serde_saphyr::from_str(yaml).unwrap();
        let (metrics, events) = (Metrics::new(), Default::default());
        let mut cx = Compile::new(Path::new("gateway.yaml"), &metrics, &events);
        let id = compile(&mut cx, &config);
        assert!(cx.errors.is_empty(), "{:?}", cx.errors);
        id.unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    fn sha(key: &str) -> String {
        crate::digest::sha256_hex(key)
    }

    #[test]
    fn api_keys_by_hash_with_tiers() {
        let id = identity(&format!(
            "api_keys:\n  keys:\n    - {{ sha256: \"{}\", user: alice, tier: enterprise }}\n    - {{ sha256: \"{}\", user: bob }}\n",
            sha("alice-key"),
            sha("bob-key")
        ));
        let Resolution::User(p) = id.resolve(&headers(&[("x-api-key", "alice-key")]), false) else {
            panic!()
        };
        assert_eq!((&*p.user, &*p.tier), ("alice", "enterprise"));
        let Resolution::User(p) = id.resolve(&headers(&[("x-api-key", "bob-key")]), false) else {
            panic!()
        };
        assert_eq!(&*p.tier, "free");
        assert!(matches!(
            id.resolve(&headers(&[("x-api-key", "nope")]), false),
            Resolution::Invalid(_)
        ));
        assert!(matches!(
            id.resolve(&headers(&[]), false),
            Resolution::Anonymous
        ));
    }

    #[test]
    fn jwt_hs256_claims_expiry_and_cache() {
        std::env::set_var("TOLLGATE_TEST_JWT_SECRET", "s3cret");
        let id = identity("jwt:\n  hs256_secret_env: TOLLGATE_TEST_JWT_SECRET\n  issuer: https://auth.example.com\n  leeway: 0s\n");
        let now = jsonwebtoken::get_current_timestamp();
        let token = |claims: serde_json::Value, secret: &str| {
            encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let good = token(
            serde_json::json!({"sub": "carol", "tier": "standard", "iss": "https://auth.example.com", "exp": now + 60}),
            "s3cret",
        );
        for _ in 0..2 {
            let Resolution::User(p) = id.resolve(
                &headers(&[("authorization", &format!("Bearer {good}"))]),
                false,
            ) else {
                panic!()
            };
            assert_eq!((&*p.user, &*p.tier), ("carol", "standard"));
        }
        let expired = token(
            serde_json::json!({"sub": "carol", "iss": "https://auth.example.com", "exp": now - 10}),
            "s3cret",
        );
        let forged = token(
            serde_json::json!({"sub": "carol", "iss": "https://auth.example.com", "exp": now + 60}),
            "guess",
        );
        let wrong_issuer = token(
            serde_json::json!({"sub": "carol", "iss": "https://evil", "exp": now + 60}),
            "s3cret",
        );
        for (bad, why) in [
            (expired, "token expired"),
            (forged, "token signature not valid for any configured key"),
            (wrong_issuer, "token issuer not accepted"),
        ] {
            match id.resolve(
                &headers(&[("authorization", &format!("Bearer {bad}"))]),
                false,
            ) {
                Resolution::Invalid(reason) => assert_eq!(reason, why),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            id.resolve(&headers(&[("authorization", "Basic dXNlcg==")]), false),
            Resolution::Anonymous
        ));
    }

    #[test]
    fn trusted_user_header_only_from_trusted_peers() {
        let id = identity("trusted_user_header: x-user-id\ndefault_tier: standard\n");
        let h = headers(&[("x-user-id", "dave")]);
        assert!(matches!(id.resolve(&h, false), Resolution::Anonymous));
        let Resolution::User(p) = id.resolve(&h, true) else {
            panic!()
        };
        assert_eq!((&*p.user, &*p.tier), ("dave", "standard"));
    }

    #[test]
    fn bad_hashes_are_located_errors() {
        let config: IdentityConfig =
            serde_saphyr::from_str("api_keys:\n  keys:\n    - { sha256: abc, user: x }\n").unwrap();
        let (metrics, events) = (Metrics::new(), Default::default());
        let mut cx = Compile::new(Path::new("g.yaml"), &metrics, &events);
        assert!(compile(&mut cx, &config).is_none());
        let errors = cx.errors;
        assert_eq!((errors[0].line, errors[0].column), (3, 17), "{}", errors[0]);
    }
}
