//! SPEC §3 `identity`: API keys and JWTs.

use super::unlocated;
use crate::units::Duration;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

/// Who the user of a request is (SPEC §3 `identity`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub trusted_user_header: Option<Spanned<String>>,
    #[serde(default)]
    pub on_invalid: OnInvalid,
    #[serde(default = "default_tier")]
    pub default_tier: String,
}

fn default_tier() -> String {
    "free".to_string()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalid {
    #[default]
    Reject,
    Anonymous,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    #[serde(default = "default_api_key_header")]
    pub header: Spanned<String>,
    #[serde(default)]
    pub keys: Vec<ApiKeyEntry>,
    #[serde(default)]
    pub file: Option<Spanned<String>>,
}

fn default_api_key_header() -> Spanned<String> {
    unlocated("x-api-key".to_string())
}

/// One API key, stored only as the sha256 of the raw key.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    pub sha256: Spanned<String>,
    pub user: String,
    #[serde(default)]
    pub tier: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default = "default_jwt_header")]
    pub header: Spanned<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Spanned<String>>,
    #[serde(default)]
    pub hs256_secret_env: Option<Spanned<String>>,
    #[serde(default)]
    pub public_keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub jwks_file: Option<Spanned<String>>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    #[serde(default = "default_tier_claim")]
    pub tier_claim: String,
    #[serde(default = "default_leeway")]
    pub leeway: Duration,
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
