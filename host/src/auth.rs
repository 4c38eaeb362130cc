//! Authentication: turns a credential (a bearer token) into an [`Identity`].
//!
//! Providers, tried in order: the static token map from `[auth] tokens`,
//! JWT HS256 from `[auth.jwt]` (the user id read from `user_claim`, falling
//! back to `sub`), then the backend from `[auth.backend]` (`POST url` with
//! `{"i": token}`, as Misskey's `/api/i` takes it; answers are cached per
//! token for `cache_ttl_ms`, refusals for a few seconds). This module only
//! verifies credentials; it knows nothing of connections or protocols.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use parking_lot::Mutex;

use crate::config::{BackendAuthConfig, Config, JwtConfig};

/// Who a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Arc<str>,
    /// Every claim as a JSON object (`{}` for static tokens).
    pub claims: Arc<str>,
}

/// Why a credential was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("unknown token")]
    UnknownToken,
    #[error("malformed JWT")]
    Malformed,
    #[error("unsupported JWT algorithm (only HS256)")]
    Algorithm,
    #[error("JWT issuer is not the configured one")]
    Issuer,
    #[error("JWT audience does not include the configured one")]
    Audience,
    #[error("JWT claim `{0}` is not a NumericDate")]
    InvalidClaim(&'static str),
    #[error("JWT signature mismatch")]
    Signature,
    #[error("JWT expired")]
    Expired,
    #[error("JWT not valid yet")]
    NotYetValid,
    #[error("JWT has no user id claim `{0}` (nor `sub`)")]
    NoUserClaim(String),
    #[error("user is suspended")]
    Suspended,
    #[error("the token's app may not read the account (read:account)")]
    NoPermission,
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The HTTP status of a refusal before an upgrade: 403 for a suspended
    /// user, 503 when the backend cannot be asked, 401 otherwise.
    pub fn status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            AuthError::Suspended => StatusCode::FORBIDDEN,
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

impl axum::response::IntoResponse for AuthError {
    /// `{"error": "authentication failed", "reason"}`: the reason names the
    /// kind of refusal, never the credential's content.
    fn into_response(self) -> axum::response::Response {
        (
            self.status(),
            axum::Json(
                serde_json::json!({"error": "authentication failed", "reason": self.to_string()}),
            ),
        )
            .into_response()
    }
}

/// The configured providers.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: BTreeMap<String, String>,
    jwt: Option<JwtConfig>,
    backend: Option<Arc<Backend>>,
}

/// Most cached backend answers kept; past it, expired ones are dropped
/// first, then everything.
const CACHE_MAX: usize = 100_000;
/// How long a refusal is remembered.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

type Cached = (Instant, Result<Identity, AuthError>);

#[derive(Debug)]
struct Backend {
    config: BackendAuthConfig,
    /// Token -> (valid until, answer).
    cache: Mutex<HashMap<String, Cached>>,
}

impl Authenticator {
    pub fn new(config: &Config) -> Self {
        Self {
            tokens: config.tokens.clone(),
            jwt: config.jwt.clone(),
            backend: config.backend_auth.clone().map(|config| {
                Arc::new(Backend {
                    config,
                    cache: Mutex::new(HashMap::new()),
                })
            }),
        }
    }

    /// Drops the backend's cached answers for a user (and for `token`, if
    /// given: a refusal is cached under no user), so the next connection is
    /// checked again: after Misskey says the user was updated, suspended or
    /// deleted, or their token was regenerated. Returns how many answers
    /// were dropped.
    pub fn forget(&self, user: &str, token: Option<&str>) -> usize {
        let Some(b) = &self.backend else {
            return 0;
        };
        let mut cache = b.cache.lock();
        let before = cache.len();
        cache.retain(|t, (_, r)| {
            Some(t.as_str()) != token && !matches!(r, Ok(id) if &*id.user_id == user)
        });
        before - cache.len()
    }

    /// Verifies a token with the local providers (static tokens, JWT) and
    /// the backend's cached answers; never waits on the network.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let local = self.verify_local(token);
        match (&local, &self.backend) {
            (Err(_), Some(b)) => b.cached(token).unwrap_or(local),
            _ => local,
        }
    }

    fn verify_local(&self, token: &str) -> Result<Identity, AuthError> {
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

    /// Verifies a token with every provider, asking the backend if the
    /// local providers do not know it.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::UnknownToken);
        }
        let local = self.verify_local(token);
        match (&local, &self.backend) {
            (Err(_), Some(b)) => b.check(token).await,
            _ => local,
        }
    }
}

impl Backend {
    fn cached(&self, token: &str) -> Option<Result<Identity, AuthError>> {
        let cache = self.cache.lock();
        let (at, r) = cache.get(token)?;
        (Instant::now() < *at).then(|| r.clone())
    }

    async fn check(&self, token: &str) -> Result<Identity, AuthError> {
        if let Some(r) = self.cached(token) {
            return r;
        }
        let r = tokio::time::timeout(self.config.timeout, self.ask(token))
            .await
            .unwrap_or_else(|_| Err(AuthError::Unavailable("timed out".into())));
        let ttl = match &r {
            Ok(_) => Some(self.config.cache_ttl),
            Err(AuthError::Unavailable(_)) => None,
            Err(_) => Some(NEGATIVE_TTL),
        };
        if let Some(ttl) = ttl {
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_MAX {
                let now = Instant::now();
                cache.retain(|_, (at, _)| *at > now);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), (Instant::now() + ttl, r.clone()));
        }
        r
    }

    async fn ask(&self, token: &str) -> Result<Identity, AuthError> {
        let unavailable = |e: &dyn std::fmt::Display| AuthError::Unavailable(e.to_string());
        let body = serde_json::json!({ "i": token }).to_string();
        let uri: http::Uri = self.config.url.parse().map_err(|e| unavailable(&e))?;
        let req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(crate::outbound::body(body))
            .map_err(|e| unavailable(&e))?;
        let answer = crate::outbound::send(req, self.config.timeout, 1 << 20)
            .await
            .map_err(|e| unavailable(&e))?;
        let (status, bytes) = (answer.status, answer.body);
        match status.as_u16() {
            200 => {}
            400 | 401 => return Err(AuthError::UnknownToken),
            // Misskey answers 403 for a suspended user, and for an app token
            // without the permission the endpoint needs (`i`: read:account,
            // which Misskey's streaming server requires too).
            403 => {
                let code = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.pointer("/error/code")?.as_str().map(str::to_owned));
                return Err(match code.as_deref() {
                    Some("PERMISSION_DENIED") => AuthError::NoPermission,
                    _ => AuthError::Suspended,
                });
            }
            other => return Err(AuthError::Unavailable(format!("backend answered {other}"))),
        }
        let user: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)
            .map_err(|_| AuthError::Unavailable("backend answer is not a JSON object".into()))?;
        let id = match user.get(&self.config.user_field) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(AuthError::Unavailable(format!(
                    "backend answer has no `{}`",
                    self.config.user_field
                )))
            }
        };
        Ok(Identity {
            user_id: id.into(),
            claims: serde_json::Value::Object(user).to_string().into(),
        })
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The claims whose type RFC 7519 fixes as a NumericDate: present with any
/// other type (a string, a negative or fractional number), the token is
/// invalid rather than the claim ignored.
const TIME_CLAIMS: [&str; 3] = ["exp", "nbf", "iat"];

fn verify_jwt(cfg: &JwtConfig, token: &str, now: u64) -> Result<Identity, AuthError> {
    use jsonwebtoken::errors::ErrorKind;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    // `exp` is optional (Mew's tokens may lack it) but checked when present.
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = cfg.audience.is_some();
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        v.required_spec_claims.insert("iss".into());
    }
    if let Some(aud) = &cfg.audience {
        v.set_audience(&[aud]);
        v.required_spec_claims.insert("aud".into());
    }
    let key = jsonwebtoken::DecodingKey::from_secret(&cfg.secret);
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::Signature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
            _ => AuthError::Malformed,
        })?;
    let claims = data.claims;
    let mut times = [None; 3];
    for (slot, name) in times.iter_mut().zip(TIME_CLAIMS) {
        if let Some(value) = claims.get(name) {
            *slot = Some(value.as_u64().ok_or(AuthError::InvalidClaim(name))?);
        }
    }
    let [exp, nbf, _iat] = times;
    if exp.is_some_and(|exp| now >= exp.saturating_add(cfg.leeway_s)) {
        return Err(AuthError::Expired);
    }
    if nbf.is_some_and(|nbf| now.saturating_add(cfg.leeway_s) < nbf) {
        return Err(AuthError::NotYetValid);
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
                leeway_s: 0,
                ..JwtConfig::new(b"s3cret".to_vec())
            }),
            backend: None,
        }
    }

    #[test]
    fn refusals_carry_their_status() {
        use axum::http::StatusCode;
        assert_eq!(AuthError::Suspended.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            AuthError::Unavailable("x".into()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(AuthError::Expired.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(AuthError::UnknownToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(AuthError::NoPermission.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn forgetting_a_user_drops_their_cached_answers_only() {
        let backend = Backend {
            config: BackendAuthConfig {
                url: "http://127.0.0.1:1/api/i".into(),
                user_field: "id".into(),
                cache_ttl: Duration::from_secs(60),
                timeout: Duration::from_secs(1),
            },
            cache: Mutex::new(HashMap::new()),
        };
        let later = Instant::now() + Duration::from_secs(60);
        let who = |u: &str| {
            Ok(Identity {
                user_id: u.into(),
                claims: "{}".into(),
            })
        };
        {
            let mut c = backend.cache.lock();
            c.insert("t-dan".into(), (later, who("dan")));
            c.insert("t-dan-2".into(), (later, who("dan")));
            c.insert("t-eve".into(), (later, who("eve")));
            c.insert("t-old".into(), (later, Err(AuthError::UnknownToken)));
        }
        let auth = Authenticator {
            backend: Some(Arc::new(backend)),
            ..Authenticator::default()
        };
        assert_eq!(auth.forget("dan", Some("t-old")), 3);
        assert_eq!(&*auth.verify("t-eve").unwrap().user_id, "eve");
        assert_eq!(auth.verify("t-dan"), Err(AuthError::UnknownToken));
        assert_eq!(auth.forget("nobody", None), 0);
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
        assert!(auth().verify(&none_alg).is_err());
        let hs512 = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"id":"u1"}"#)
        );
        assert_eq!(auth().verify(&hs512), Err(AuthError::Algorithm));
    }

    #[test]
    fn time_claims_of_the_wrong_type_make_the_token_invalid() {
        for (claim, value) in [
            ("exp", json!("4000000000")),
            ("nbf", json!("0")),
            ("iat", json!("now")),
            ("exp", json!(-1)),
            ("exp", json!(4_000_000_000.5)),
            ("iat", json!(null)),
        ] {
            let mut claims = json!({"id": "u1"});
            claims[claim] = value.clone();
            let t = sign_hs256(b"s3cret", &claims);
            assert_eq!(
                auth().verify(&t),
                Err(AuthError::InvalidClaim(claim)),
                "{claim} = {value}"
            );
        }
        let t = sign_hs256(
            b"s3cret",
            &json!({"id": "u1", "exp": 4_000_000_000u64, "nbf": 0, "iat": 1}),
        );
        assert_eq!(&*auth().verify(&t).unwrap().user_id, "u1");
    }

    #[test]
    fn leeway_issuer_and_audience() {
        let cfg = JwtConfig {
            issuer: Some("mew".into()),
            audience: Some("gateway".into()),
            leeway_s: 30,
            ..JwtConfig::new(b"k".to_vec())
        };
        let now = 1_000_000;
        let sign = |c: serde_json::Value| sign_hs256(b"k", &c);
        let ok = json!({"id": "u", "iss": "mew", "aud": ["x", "gateway"], "exp": now - 10});
        assert!(
            verify_jwt(&cfg, &sign(ok), now).is_ok(),
            "within the leeway"
        );
        let late = json!({"id": "u", "iss": "mew", "aud": "gateway", "exp": now - 31});
        assert_eq!(verify_jwt(&cfg, &sign(late), now), Err(AuthError::Expired));
        let early = json!({"id": "u", "iss": "mew", "aud": "gateway", "nbf": now + 31});
        assert_eq!(
            verify_jwt(&cfg, &sign(early), now),
            Err(AuthError::NotYetValid)
        );
        let iss = json!({"id": "u", "iss": "other", "aud": "gateway"});
        assert_eq!(verify_jwt(&cfg, &sign(iss), now), Err(AuthError::Issuer));
        let no_iss = json!({"id": "u", "aud": "gateway"});
        assert_eq!(verify_jwt(&cfg, &sign(no_iss), now), Err(AuthError::Issuer));
        let aud = json!({"id": "u", "iss": "mew", "aud": "else"});
        assert_eq!(verify_jwt(&cfg, &sign(aud), now), Err(AuthError::Audience));
        // Without an audience configured, a token's own `aud` is accepted.
        let plain = JwtConfig::new(b"k".to_vec());
        let t = sign(json!({"id": "u", "aud": "anything"}));
        assert!(verify_jwt(&plain, &t, now).is_ok());
    }

    #[test]
    fn refusals_do_not_quote_the_token() {
        let evil = format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(b"{\"alg\":\"HS256\\nFORGED line\"}"),
            URL_SAFE_NO_PAD.encode(br#"{"id":"u1"}"#)
        );
        let e = auth().verify(&evil).unwrap_err().to_string();
        assert!(!e.contains("FORGED") && !e.contains('\n'), "{e}");
    }
}
