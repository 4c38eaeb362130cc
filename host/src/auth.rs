//! Authentication: turns a credential (a bearer token) into an [`Identity`].
//!
//! Providers, tried in order: the static token map from `[auth] tokens`, then
//! JWT HS256 from `[auth.jwt]` (the user id read from `user_claim`, falling
//! back to `sub`). This module only verifies credentials; it knows nothing of
//! connections or protocols.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Config, JwtConfig};

/// Who a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Arc<str>,
    /// Every claim as a JSON object (`{}` for static tokens).
    pub claims: Arc<str>,
}

/// Why a credential was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("unknown token")]
    UnknownToken,
    #[error("malformed JWT")]
    Malformed,
    #[error("unsupported JWT algorithm `{0}` (only HS256)")]
    Algorithm(String),
    #[error("JWT signature mismatch")]
    Signature,
    #[error("JWT expired")]
    Expired,
    #[error("JWT not valid yet")]
    NotYetValid,
    #[error("JWT has no user id claim `{0}` (nor `sub`)")]
    NoUserClaim(String),
}

/// The configured providers.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: BTreeMap<String, String>,
    jwt: Option<JwtConfig>,
}

impl Authenticator {
    pub fn new(config: &Config) -> Self {
        Self {
            tokens: config.tokens.clone(),
            jwt: config.jwt.clone(),
        }
    }

    /// Verifies a token with every provider.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if let Some(user) = self.tokens.get(token) {
            return Ok(Identity {
                user_id: user.as_str().into(),
                claims: "{}".into(),
            });
        }
        match &self.jwt {
            Some(jwt) if token.matches('.').count() == 2 => verify_jwt(jwt, token, now_secs()),
            _ => Err(AuthError::UnknownToken),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn verify_jwt(cfg: &JwtConfig, token: &str, now: u64) -> Result<Identity, AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(AuthError::Malformed)?;
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    if alg != "HS256" {
        return Err(AuthError::Algorithm(alg.to_owned()));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&cfg.secret).map_err(|_| AuthError::Malformed)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    // `verify_slice` compares in constant time.
    mac.verify_slice(&sig).map_err(|_| AuthError::Signature)?;
    let claims: serde_json::Map<String, serde_json::Value> = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(AuthError::Malformed)?;
    if let Some(exp) = claims.get("exp").and_then(|v| v.as_f64()) {
        if (now as f64) >= exp {
            return Err(AuthError::Expired);
        }
    }
    if let Some(nbf) = claims.get("nbf").and_then(|v| v.as_f64()) {
        if (now as f64) < nbf {
            return Err(AuthError::NotYetValid);
        }
    }
    let user = [cfg.user_claim.as_str(), "sub"]
        .iter()
        .find_map(|k| match claims.get(*k) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .ok_or_else(|| AuthError::NoUserClaim(cfg.user_claim.clone()))?;
    Ok(Identity {
        user_id: user.into(),
        claims: serde_json::Value::Object(claims).to_string().into(),
    })
}

/// Signs an HS256 JWT (used by tests and tools; the host only verifies).
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{s}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn auth() -> Authenticator {
        let mut tokens = BTreeMap::new();
        tokens.insert("tok-alice".to_owned(), "alice".to_owned());
        Authenticator {
            tokens,
            jwt: Some(JwtConfig {
                secret: b"s3cret".to_vec(),
                user_claim: "id".into(),
            }),
        }
    }

    #[test]
    fn static_token() {
        assert_eq!(&*auth().verify("tok-alice").unwrap().user_id, "alice");
        assert_eq!(auth().verify("nope"), Err(AuthError::UnknownToken));
    }

    #[test]
    fn jwt_with_user_claim_and_sub_fallback() {
        let t = sign_hs256(b"s3cret", &json!({"id": "u1", "username": "a"}));
        let id = auth().verify(&t).unwrap();
        assert_eq!(&*id.user_id, "u1");
        assert!(id.claims.contains("username"));
        let t = sign_hs256(b"s3cret", &json!({"sub": "u2"}));
        assert_eq!(&*auth().verify(&t).unwrap().user_id, "u2");
        let t = sign_hs256(b"s3cret", &json!({"name": "x"}));
        assert!(matches!(auth().verify(&t), Err(AuthError::NoUserClaim(_))));
    }

    #[test]
    fn jwt_refusals() {
        let bad = sign_hs256(b"other", &json!({"id": "u1"}));
        assert_eq!(auth().verify(&bad), Err(AuthError::Signature));
        let expired = sign_hs256(b"s3cret", &json!({"id": "u1", "exp": 1000}));
        assert_eq!(auth().verify(&expired), Err(AuthError::Expired));
        let future = sign_hs256(b"s3cret", &json!({"id": "u1", "nbf": 4_000_000_000u64}));
        assert_eq!(auth().verify(&future), Err(AuthError::NotYetValid));
        assert_eq!(auth().verify("a.b.c"), Err(AuthError::Malformed));
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"id":"u1"}"#)
        );
        assert!(matches!(
            auth().verify(&none_alg),
            Err(AuthError::Algorithm(_))
        ));
    }
}
