//! SPEC §3 `identity`: API keys and JWTs.

use super::unlocated;
use crate::units::Duration;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

/// Who the user of a request is (SPEC §3 `identity`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityConfig {
    #[serde(default)]
    pub(crate) api_keys: Option<ApiKeysConfig>,
    #[serde(default)]
    pub(crate) jwt: Option<JwtConfig>,
    #[serde(default)]
    pub(crate) trusted_user_header: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) on_invalid: OnInvalid,
    #[serde(default = "default_tier")]
    pub(crate) default_tier: String,
}

fn default_tier() -> String {
    "free".to_string()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnInvalid {
    #[default]
    Reject,
    Anonymous,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiKeysConfig {
    #[serde(default = "default_api_key_header")]
    pub(crate) header: Spanned<String>,
    #[serde(default)]
    pub(crate) keys: Vec<ApiKeyEntry>,
    #[serde(default)]
    pub(crate) file: Option<Spanned<String>>,
}

fn default_api_key_header() -> Spanned<String> {
    unlocated("x-api-key".to_string())
}

/// One API key, stored only as the sha256 of the raw key.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiKeyEntry {
    pub(crate) sha256: Spanned<String>,
    pub(crate) user: String,
    #[serde(default)]
    pub(crate) tier: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtConfig {
    #[serde(default = "default_jwt_header")]
    pub(crate) header: Spanned<String>,
    #[serde(default = "default_algorithms")]
    pub(crate) algorithms: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) hs256_secret_env: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) public_keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) jwks_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) issuer: Option<String>,
    #[serde(default)]
    pub(crate) audience: Option<String>,
    #[serde(default = "default_user_claim")]
    pub(crate) user_claim: String,
    #[serde(default = "default_tier_claim")]
    pub(crate) tier_claim: String,
    #[serde(default = "default_leeway")]
    pub(crate) leeway: Duration,
}

fn default_jwt_header() -> Spanned<String> {
    unlocated("authorization".to_string())
}

fn default_algorithms() -> Vec<Spanned<String>> {
    ["HS256", "RS256", "ES256"]
        .map(|a| unlocated(a.to_string()))
        .into()
}

fn default_user_claim() -> String {
    "sub".to_string()
}

fn default_tier_claim() -> String {
    "tier".to_string()
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
