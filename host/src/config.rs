//! Configuration: one TOML file, read in two stages.
//!
//! [`RawConfig`] mirrors the file (every key optional, unknown keys refused);
//! [`Config::from_raw`] validates it into the typed [`Config`] the rest of
//! the host uses, after command-line flags and environment overrides are
//! applied. Every error names the key and the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
/// Default plugins folder.
pub const DEFAULT_PLUGINS: &str = "./plugins";

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// The file as written, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub plugins: Option<PathBuf>,
    /// Where compiled plugin code is cached (default: `<plugins>/.cache`).
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub api: RawApi,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub misskey: RawMisskey,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub plugin_runtime: RawPluginRuntime,
    /// `[plugins.<name>]` tables, split off by [`RawConfig::parse`].
    #[serde(skip)]
    pub plugins_config: BTreeMap<String, toml::Table>,
    #[serde(default)]
    pub socketio: RawSocketIo,
    pub cluster: Option<RawCluster>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub redis: Option<String>,
    pub prefix: Option<String>,
    pub node_ttl_ms: Option<u64>,
}

/// Several nodes on one Redis (`[cluster]`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `redis://[:pass@]host[:port][/db]` or `rediss://`.
    pub redis: String,
    /// Prefix of every key and channel chanhost uses in that Redis.
    pub prefix: String,
    /// A node not heard from for this long is gone.
    pub node_ttl: Duration,
}

/// Checks `[cluster]`.
fn cluster(
    raw: RawCluster,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<ClusterConfig, ConfigError> {
    let redis = raw.redis.ok_or_else(|| {
        invalid(
            "cluster.redis",
            "missing: the Redis URL the nodes share, e.g. \"redis://127.0.0.1:6379/0\"".into(),
        )
    })?;
    if let Err(e) = crate::pubsub::check_url(&redis) {
        return Err(invalid("cluster.redis", e.to_string()));
    }
    let prefix = raw.prefix.unwrap_or_else(|| "chanhost".into());
    if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "cluster.prefix",
            "must be a non-empty name without spaces".into(),
        ));
    }
    let node_ttl = Duration::from_millis(raw.node_ttl_ms.unwrap_or(10_000));
    if node_ttl < Duration::from_millis(300) {
        return Err(invalid(
            "cluster.node_ttl_ms",
            "must be at least 300".into(),
        ));
    }
    Ok(ClusterConfig {
        redis,
        prefix,
        node_ttl,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(default)]
    pub tokens: BTreeMap<String, String>,
    pub jwt: Option<RawJwt>,
    pub backend: Option<RawBackendAuth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackendAuth {
    pub url: Option<String>,
    pub user_field: Option<String>,
    pub cache_ttl_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub secret: Option<String>,
    pub user_claim: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMisskey {
    pub ping_interval_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_frame_bytes: Option<usize>,
    pub max_channels: Option<usize>,
    pub max_captures: Option<usize>,
    pub bus: Option<RawMisskeyBus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMisskeyBus {
    pub redis: Option<String>,
    pub channel: Option<String>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSocketIo {
    pub ping_interval_ms: Option<u64>,
    pub ping_timeout_ms: Option<u64>,
    pub max_payload: Option<usize>,
    pub connect_timeout_ms: Option<u64>,
    pub upgrade_timeout_ms: Option<u64>,
    pub packet_gap_ms: Option<u64>,
    pub cors_origins: Option<Vec<String>>,
    pub adapter: Option<RawSioAdapter>,
    pub recovery: Option<RawSioRecovery>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSioRecovery {
    pub max_disconnection_ms: Option<u64>,
    pub history_per_room: Option<usize>,
}

/// Connection state recovery (`[socketio.recovery]`, socket.io's
/// `connectionStateRecovery`).
#[derive(Debug, Clone)]
pub struct SioRecoveryConfig {
    /// How long a disconnected socket's session is kept
    /// (`maxDisconnectionDuration`).
    pub max_disconnection: Duration,
    /// The most events a room's history keeps; older ones are cut (and
    /// a session that would need them connects as new).
    pub history_per_room: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSioAdapter {
    pub redis: Option<String>,
    pub key: Option<String>,
}

/// `@socket.io/redis-adapter`'s protocol on a Redis (`[socketio.adapter]`).
#[derive(Debug, Clone)]
pub struct SioAdapterConfig {
    pub redis: String,
    /// The adapter's `key` option: channels are `<key>#<nsp>#...`.
    pub key: String,
}

/// Checks `[socketio.adapter]`.
fn sio_adapter(
    raw: RawSioAdapter,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<SioAdapterConfig, ConfigError> {
    let redis = raw.redis.ok_or_else(|| {
        invalid(
            "socketio.adapter.redis",
            "missing: the Redis URL the socket.io servers' adapter uses, e.g. \"redis://127.0.0.1:6379\" (default: [cluster] redis)".into(),
        )
    })?;
    if let Err(e) = crate::pubsub::check_url(&redis) {
        return Err(invalid("socketio.adapter.redis", e.to_string()));
    }
    let key = raw.key.unwrap_or_else(|| "socket.io".into());
    if key.is_empty() || key.contains('#') || key.chars().any(char::is_whitespace) {
        return Err(invalid(
            "socketio.adapter.key",
            "must be a non-empty name without `#` or spaces (the adapter's `key` option)".into(),
        ));
    }
    Ok(SioAdapterConfig { redis, key })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub send_queue: Option<usize>,
    pub send_queue_bytes: Option<usize>,
    pub body_timeout_ms: Option<u64>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub per_ip_connections: Option<usize>,
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPluginRuntime {
    pub call_timeout_ms: Option<u64>,
    pub init_timeout_ms: Option<u64>,
    pub memory_mb: Option<usize>,
    pub stack_kb: Option<usize>,
    pub queue: Option<usize>,
    pub queue_bytes: Option<usize>,
    pub http_timeout_ms: Option<u64>,
    pub pending_connect_ms: Option<u64>,
}

/// Misskey streaming settings.
#[derive(Debug, Clone)]
pub struct MisskeyConfig {
    /// Interval of server WebSocket pings (Misskey: 60 s).
    pub ping_interval: Duration,
    /// A peer that sent nothing for this long is dropped (Misskey: 2 min).
    pub idle_timeout: Duration,
    /// Largest client frame accepted; larger ones close the stream with 1009.
    pub max_frame_bytes: usize,
    /// Channel instances per stream (Misskey: 32).
    pub max_channels: usize,
    /// Captured notes per stream, oldest evicted (Misskey: 1536).
    pub max_captures: usize,
    /// Misskey's own event bus, read from Redis (`[misskey.bus]`).
    pub bus: Option<MisskeyBusConfig>,
}

/// Where Misskey's `GlobalEventService` publishes (`[misskey.bus]`).
#[derive(Debug, Clone)]
pub struct MisskeyBusConfig {
    /// Misskey's `redisForPubsub`, as a URL: `redis://[:pass@]host[:port][/db]`
    /// or `rediss://` for TLS.
    pub redis: String,
    /// The Redis channel Misskey publishes on: its `config.host`.
    pub channel: String,
    /// For `rediss://`: the CA certificates (PEM) to trust instead of the
    /// webpki roots (a private CA, as Misskey's `redis.tls.ca`).
    pub ca: Option<Vec<u8>>,
}

/// Checks `[misskey.bus]`: both keys, and a Redis URL the client accepts.
fn misskey_bus(
    raw: RawMisskeyBus,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<MisskeyBusConfig, ConfigError> {
    let redis = raw.redis.ok_or_else(|| {
        invalid(
            "misskey.bus.redis",
            "missing: the Redis URL Misskey publishes its events on (its redisForPubsub), e.g. \"redis://127.0.0.1:6379\" (default: [cluster] redis)".into(),
        )
    })?;
    if let Err(e) = crate::pubsub::check_url(&redis) {
        return Err(invalid("misskey.bus.redis", e.to_string()));
    }
    let channel = raw.channel.filter(|c| !c.is_empty()).ok_or_else(|| {
        invalid(
            "misskey.bus.channel",
            "missing: the Redis channel Misskey publishes on, its config.host (e.g. \"misskey.example\")".into(),
        )
    })?;
    let ca = match raw.ca_file {
        None => None,
        Some(path) => {
            if !redis.starts_with("rediss://") {
                return Err(invalid(
                    "misskey.bus.ca_file",
                    "only for a TLS URL (rediss://)".into(),
                ));
            }
            let pem = std::fs::read(&path).map_err(|e| {
                invalid(
                    "misskey.bus.ca_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(invalid(
                    "misskey.bus.ca_file",
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
            Some(pem)
        }
    };
    Ok(MisskeyBusConfig { redis, channel, ca })
}

/// Checks `[socketio.recovery]` (defaults as the reference server's
/// `maxDisconnectionDuration`, two minutes).
fn sio_recovery(
    raw: RawSioRecovery,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<SioRecoveryConfig, ConfigError> {
    let max = raw.max_disconnection_ms.unwrap_or(120_000);
    if max == 0 || max > 86_400_000 {
        return Err(invalid(
            "socketio.recovery.max_disconnection_ms",
            "must be between 1 and 86400000 (a day)".into(),
        ));
    }
    let cap = raw.history_per_room.unwrap_or(1000);
    if cap == 0 || cap > 1_000_000 {
        return Err(invalid(
            "socketio.recovery.history_per_room",
            "must be between 1 and 1000000".into(),
        ));
    }
    Ok(SioRecoveryConfig {
        max_disconnection: Duration::from_millis(max),
        history_per_room: cap,
    })
}

/// Engine.IO / Socket.IO settings (defaults as the reference server).
#[derive(Debug, Clone)]
pub struct SocketIoConfig {
    /// Interval of server pings (`pingInterval`).
    pub ping_interval: Duration,
    /// How long a pong may take (`pingTimeout`).
    pub ping_timeout: Duration,
    /// Largest message or polling body accepted (`maxPayload`), in bytes.
    pub max_payload: usize,
    /// A session that connects no namespace within this is closed.
    pub connect_timeout: Duration,
    /// A WebSocket upgrade not completed within this is abandoned.
    pub upgrade_timeout: Duration,
    /// On WebSocket, the pause after a CONNECT reply before the events held
    /// behind it (and between those); zero writes them back to back.
    pub packet_gap: Duration,
    /// Origins allowed cross-site (`"*"` for any). Same-origin requests
    /// and requests without an Origin are always allowed.
    pub cors_origins: Vec<String>,
    /// `[socketio.adapter]`: absent, chanhost speaks no socket.io adapter.
    pub adapter: Option<SioAdapterConfig>,
    /// `[socketio.recovery]`: absent, no connection state recovery.
    pub recovery: Option<SioRecoveryConfig>,
}

/// Limits of the plugin runtime.
#[derive(Debug, Clone)]
pub struct PluginRuntimeConfig {
    /// Time budget of one plugin call; each HTTP request the call makes
    /// extends it by that request's own limit.
    pub call_timeout: Duration,
    /// Budget of `describe` + `init` on a new instance (large guests start slowly).
    pub init_timeout: Duration,
    /// Linear memory a plugin instance may grow to.
    pub memory_bytes: usize,
    /// Wasm stack per call.
    pub stack_bytes: usize,
    /// Calls waiting per plugin before new event calls are dropped.
    pub queue: usize,
    /// Bytes of payloads waiting per plugin before new calls are dropped.
    pub queue_bytes: usize,
    /// Bound on each phase of a plugin's outbound HTTP request (connect,
    /// first byte, between bytes). The plugin waits meanwhile.
    pub http_timeout: Duration,
    /// How long a connect a plugin deferred (`defer-connect`) may wait for
    /// its `settle-connect` before it is refused.
    pub pending_connect: Duration,
}

/// JWT HS256 provider settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub secret: Vec<u8>,
    pub user_claim: String,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences), if set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
}

impl JwtConfig {
    /// A provider with the defaults: claim `id`, no issuer or audience
    /// check, 5 s of leeway.
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
            user_claim: "id".into(),
            issuer: None,
            audience: None,
            leeway_s: DEFAULT_JWT_LEEWAY_S,
        }
    }
}

/// Default clock skew allowed on a JWT's `exp` and `nbf`.
pub const DEFAULT_JWT_LEEWAY_S: u64 = 5;

/// What one client may hold and how long a request may take (`[limits]`).
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Frames waiting per connection (what the socket has not taken);
    /// past it the connection is closed as a slow consumer (1008).
    pub send_queue: usize,
    /// Bytes waiting per connection, the same way.
    pub send_queue_bytes: usize,
    /// A request body (publish, rooms API, polling POST) must arrive
    /// whole within this; else 408 and the connection is closed.
    pub body_timeout: Duration,
    /// Largest request head (request line and headers); larger ones get 431.
    pub max_header_bytes: usize,
    /// Client connections (Misskey streams, Socket.IO sessions) held at
    /// once; past it new ones get 503. None: derived from the process's
    /// open-file limit at start, keeping a reserve for the API and the
    /// operational endpoints.
    pub max_connections: Option<usize>,
    /// Client connections per client address; 0 = no cap.
    pub per_ip_connections: usize,
    /// Peers whose `X-Forwarded-For` names the client (addresses or CIDR
    /// ranges); from anyone else the header is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            send_queue: 1024,
            send_queue_bytes: 1 << 20,
            body_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
            max_connections: None,
            per_ip_connections: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Tokens checked by the backend: `POST url` with `{"i": token}` (what
/// Misskey's `/api/i` takes); 200 answers the user, 401 an unknown token,
/// 403 a suspended user.
#[derive(Debug, Clone)]
pub struct BackendAuthConfig {
    pub url: String,
    /// Field of the answer holding the user id.
    pub user_field: String,
    /// How long an answer is reused for the same token.
    pub cache_ttl: Duration,
    pub timeout: Duration,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub plugins_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub api_key: Option<String>,
    pub tokens: BTreeMap<String, String>,
    pub jwt: Option<JwtConfig>,
    pub backend_auth: Option<BackendAuthConfig>,
    pub misskey: MisskeyConfig,
    pub socketio: SocketIoConfig,
    pub limits: LimitsConfig,
    pub plugin_runtime: PluginRuntimeConfig,
    /// `[plugins.<name>]` tables, handed to each plugin's `init` as JSON.
    pub plugin_tables: BTreeMap<String, serde_json::Value>,
    /// `[cluster]`: absent, one node in memory.
    pub cluster: Option<ClusterConfig>,
}

/// Overrides from the command line.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub plugins: Option<PathBuf>,
}

/// Environment values that override the file (`CHANHOST_API_KEY`, `CHANHOST_JWT_SECRET`).
#[derive(Debug, Default, Clone)]
pub struct EnvOverrides {
    pub api_key: Option<String>,
    pub jwt_secret: Option<String>,
}

impl EnvOverrides {
    /// Reads the overrides from the process environment.
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            api_key: get("CHANHOST_API_KEY"),
            jwt_secret: get("CHANHOST_JWT_SECRET"),
        }
    }
}

impl RawConfig {
    /// Parses a config file's text. `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        // `plugins` is either the folder (`plugins = "dir"`) or, since TOML
        // cannot hold both a string and `[plugins.<name>]` tables under one
        // key, a table: `dir` names the folder and every sub-table is the
        // config of the plugin it is named after.
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut plugins_config = BTreeMap::new();
        if let Some(toml::Value::Table(t)) = table.get("plugins").cloned() {
            table.remove("plugins");
            for (name, v) in t {
                match v {
                    toml::Value::Table(tt) => {
                        plugins_config.insert(name, tt);
                    }
                    toml::Value::String(dir) if name == "dir" => {
                        table.insert("plugins".into(), toml::Value::String(dir));
                    }
                    _ => {
                        return Err(ConfigError::Invalid {
                            origin: path.display().to_string(),
                            key: format!("plugins.{name}"),
                            message: "expected `dir = \"folder\"` or a `[plugins.<name>]` table of plugin settings".into(),
                        })
                    }
                }
            }
        }
        let mut raw: RawConfig =
            table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        if !plugins_config.is_empty() {
            raw.plugins_config = plugins_config;
        }
        Ok(raw)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

fn ms(v: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(v.unwrap_or(default))
}

impl Config {
    /// Validates a raw config. `origin` names where it came from (the file,
    /// or "defaults") for error messages.
    pub fn from_raw(
        raw: RawConfig,
        origin: &str,
        flags: &Overrides,
        env: &EnvOverrides,
    ) -> Result<Self, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let (listen_src, listen_key) = match (&flags.listen, &raw.listen) {
            (Some(l), _) => (l.clone(), "--listen"),
            (None, Some(l)) => (l.clone(), "listen"),
            (None, None) => (DEFAULT_LISTEN.to_owned(), "listen"),
        };
        let listen: SocketAddr = listen_src.parse().map_err(|_| {
            invalid(
                listen_key,
                format!("`{listen_src}` is not a socket address like 127.0.0.1:3000"),
            )
        })?;
        let plugins_dir = flags
            .plugins
            .clone()
            .or(raw.plugins.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PLUGINS));
        let cache_dir = raw
            .cache_dir
            .clone()
            .unwrap_or_else(|| plugins_dir.join(".cache"));

        let api_key = env.api_key.clone().or(raw.api.key.clone());
        if api_key.as_deref() == Some("") {
            return Err(invalid("api.key", "must not be empty".into()));
        }

        let jwt = match raw.auth.jwt {
            None => env
                .jwt_secret
                .as_ref()
                .map(|s| JwtConfig::new(s.as_bytes())),
            Some(j) => {
                let secret = env.jwt_secret.clone().or(j.secret).ok_or_else(|| {
                    invalid(
                        "auth.jwt.secret",
                        "missing (set it, or CHANHOST_JWT_SECRET)".into(),
                    )
                })?;
                if secret.is_empty() {
                    return Err(invalid("auth.jwt.secret", "must not be empty".into()));
                }
                let user_claim = j.user_claim.unwrap_or_else(|| "id".into());
                if user_claim.is_empty() {
                    return Err(invalid("auth.jwt.user_claim", "must not be empty".into()));
                }
                for (key, v) in [
                    ("auth.jwt.issuer", &j.issuer),
                    ("auth.jwt.audience", &j.audience),
                ] {
                    if v.as_deref() == Some("") {
                        return Err(invalid(
                            key,
                            "must not be empty (leave it out to skip the check)".into(),
                        ));
                    }
                }
                Some(JwtConfig {
                    secret: secret.into_bytes(),
                    user_claim,
                    issuer: j.issuer,
                    audience: j.audience,
                    leeway_s: j.leeway_s.unwrap_or(DEFAULT_JWT_LEEWAY_S),
                })
            }
        };
        let backend_auth = match raw.auth.backend {
            None => None,
            Some(b) => {
                let url = b.url.ok_or_else(|| {
                    invalid(
                        "auth.backend.url",
                        "missing (e.g. \"http://misskey:3000/api/i\")".into(),
                    )
                })?;
                let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
                    matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
                });
                if !ok {
                    return Err(invalid(
                        "auth.backend.url",
                        format!("`{url}` is not an http(s) URL"),
                    ));
                }
                Some(BackendAuthConfig {
                    url,
                    user_field: b.user_field.unwrap_or_else(|| "id".into()),
                    cache_ttl: ms(b.cache_ttl_ms, 60_000),
                    timeout: ms(b.timeout_ms, 5_000),
                })
            }
        };
        for (token, user) in &raw.auth.tokens {
            if token.is_empty() || user.is_empty() {
                return Err(invalid(
                    "auth.tokens",
                    "tokens and user ids must not be empty".into(),
                ));
            }
        }

        let cluster = raw.cluster.map(|c| cluster(c, &invalid)).transpose()?;
        let m = raw.misskey;
        let misskey = MisskeyConfig {
            ping_interval: ms(m.ping_interval_ms, 60_000),
            idle_timeout: ms(m.idle_timeout_ms, 120_000),
            max_frame_bytes: m.max_frame_bytes.unwrap_or(64 * 1024),
            max_channels: m.max_channels.unwrap_or(32),
            max_captures: m.max_captures.unwrap_or(1536),
            bus: m
                .bus
                .map(|mut b| {
                    // Misskey's bus may share the cluster's Redis.
                    if b.redis.is_none() {
                        b.redis = cluster.as_ref().map(|c| c.redis.clone());
                    }
                    misskey_bus(b, &invalid)
                })
                .transpose()?,
        };
        if misskey.ping_interval.is_zero() {
            return Err(invalid("misskey.ping_interval_ms", "must be > 0".into()));
        }
        if misskey.idle_timeout < misskey.ping_interval {
            return Err(invalid(
                "misskey.idle_timeout_ms",
                "must be at least misskey.ping_interval_ms".into(),
            ));
        }
        if misskey.max_frame_bytes < 1024 {
            return Err(invalid("misskey.max_frame_bytes", "must be >= 1024".into()));
        }

        let l = raw.limits;
        let d = LimitsConfig::default();
        let mut trusted_proxies = Vec::new();
        for p in l.trusted_proxies.unwrap_or_default() {
            let net = p
                .parse::<ipnet::IpNet>()
                .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    invalid(
                        "limits.trusted_proxies",
                        format!("`{p}` is not an address or CIDR range like 10.0.0.0/8"),
                    )
                })?;
            trusted_proxies.push(net);
        }
        let limits = LimitsConfig {
            send_queue: l.send_queue.unwrap_or(d.send_queue),
            send_queue_bytes: l.send_queue_bytes.unwrap_or(d.send_queue_bytes),
            body_timeout: l
                .body_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(d.body_timeout),
            max_header_bytes: l.max_header_bytes.unwrap_or(d.max_header_bytes),
            max_connections: l.max_connections,
            per_ip_connections: l.per_ip_connections.unwrap_or(0),
            trusted_proxies,
        };
        if limits.send_queue == 0 {
            return Err(invalid("limits.send_queue", "must be > 0".into()));
        }
        if limits.send_queue_bytes < 64 << 10 {
            return Err(invalid(
                "limits.send_queue_bytes",
                "must be >= 65536".into(),
            ));
        }
        if limits.body_timeout.is_zero() {
            return Err(invalid("limits.body_timeout_ms", "must be > 0".into()));
        }
        if limits.max_header_bytes < 8192 {
            return Err(invalid("limits.max_header_bytes", "must be >= 8192".into()));
        }
        if limits.max_connections == Some(0) {
            return Err(invalid(
                "limits.max_connections",
                "must be > 0 (leave it out for the default)".into(),
            ));
        }

        let p = raw.plugin_runtime;
        let plugin_runtime = PluginRuntimeConfig {
            call_timeout: ms(p.call_timeout_ms, 200),
            init_timeout: ms(p.init_timeout_ms, 10_000),
            memory_bytes: p.memory_mb.unwrap_or(64) << 20,
            stack_bytes: p.stack_kb.unwrap_or(512) << 10,
            queue: p.queue.unwrap_or(4096),
            queue_bytes: p.queue_bytes.unwrap_or(64 << 20),
            http_timeout: ms(p.http_timeout_ms, 5_000),
            pending_connect: ms(p.pending_connect_ms, 30_000),
        };
        if plugin_runtime.pending_connect.is_zero() {
            return Err(invalid(
                "plugin_runtime.pending_connect_ms",
                "must be > 0".into(),
            ));
        }
        if plugin_runtime.http_timeout.is_zero() {
            return Err(invalid(
                "plugin_runtime.http_timeout_ms",
                "must be > 0".into(),
            ));
        }
        if plugin_runtime.call_timeout < Duration::from_millis(10) {
            return Err(invalid(
                "plugin_runtime.call_timeout_ms",
                "must be >= 10".into(),
            ));
        }
        if plugin_runtime.memory_bytes < (1 << 20) {
            return Err(invalid("plugin_runtime.memory_mb", "must be >= 1".into()));
        }
        if plugin_runtime.stack_bytes < (64 << 10) {
            return Err(invalid("plugin_runtime.stack_kb", "must be >= 64".into()));
        }
        if plugin_runtime.queue == 0 {
            return Err(invalid("plugin_runtime.queue", "must be > 0".into()));
        }
        if plugin_runtime.queue_bytes < 1 << 20 {
            return Err(invalid(
                "plugin_runtime.queue_bytes",
                "must be >= 1048576".into(),
            ));
        }

        let mut plugin_tables = BTreeMap::new();
        for (name, table) in raw.plugins_config {
            let json = serde_json::to_value(&table)
                .map_err(|e| invalid(&format!("plugins.{name}"), e.to_string()))?;
            if let Some(allow) = table.get("allow_http") {
                let ok = allow
                    .as_array()
                    .is_some_and(|a| a.iter().all(|v| v.as_str().is_some()));
                if !ok {
                    return Err(invalid(
                        &format!("plugins.{name}.allow_http"),
                        "expected a list of origins like [\"http://backend:8080\"]".into(),
                    ));
                }
            }
            plugin_tables.insert(name, json);
        }
        let sio = raw.socketio;
        let socketio = SocketIoConfig {
            ping_interval: ms(sio.ping_interval_ms, 25_000),
            ping_timeout: ms(sio.ping_timeout_ms, 20_000),
            max_payload: sio.max_payload.unwrap_or(1_000_000),
            connect_timeout: ms(sio.connect_timeout_ms, 45_000),
            upgrade_timeout: ms(sio.upgrade_timeout_ms, 10_000),
            packet_gap: ms(sio.packet_gap_ms, 5),
            cors_origins: sio.cors_origins.unwrap_or_default(),
            adapter: sio
                .adapter
                .map(|mut a| {
                    // The adapter may share the cluster's Redis.
                    if a.redis.is_none() {
                        a.redis = cluster.as_ref().map(|c| c.redis.clone());
                    }
                    sio_adapter(a, &invalid)
                })
                .transpose()?,
            recovery: sio
                .recovery
                .map(|r| sio_recovery(r, &invalid))
                .transpose()?,
        };
        for (key, d) in [
            ("socketio.ping_interval_ms", socketio.ping_interval),
            ("socketio.ping_timeout_ms", socketio.ping_timeout),
            ("socketio.connect_timeout_ms", socketio.connect_timeout),
            ("socketio.upgrade_timeout_ms", socketio.upgrade_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be > 0".into()));
            }
        }
        if socketio.max_payload < 1024 {
            return Err(invalid("socketio.max_payload", "must be >= 1024".into()));
        }
        for o in &socketio.cors_origins {
            let ok = o == "*" || o.starts_with("http://") || o.starts_with("https://");
            if !ok || o.ends_with('/') {
                return Err(invalid(
                    "socketio.cors_origins",
                    format!("`{o}` is not an origin like https://app.example (or \"*\")"),
                ));
            }
        }

        Ok(Config {
            listen,
            plugins_dir,
            cache_dir,
            api_key,
            tokens: raw.auth.tokens,
            jwt,
            backend_auth,
            misskey,
            socketio,
            limits,
            plugin_runtime,
            plugin_tables,
            cluster,
        })
    }

    /// Loads the config: the file if given, then flags and environment.
    pub fn load(
        file: Option<&Path>,
        flags: &Overrides,
        env: &EnvOverrides,
    ) -> Result<Self, ConfigError> {
        match file {
            Some(path) => {
                let raw = RawConfig::load(path)?;
                Self::from_raw(raw, &path.display().to_string(), flags, env)
            }
            None => Self::from_raw(RawConfig::default(), "defaults", flags, env),
        }
    }

    /// The config table of one plugin as JSON text (`{}` when none).
    pub fn plugin_table_json(&self, name: &str) -> String {
        self.plugin_tables
            .get(name)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "{}".to_owned())
    }

    /// A configuration for tests and embedding: defaults, the given plugins folder.
    pub fn for_plugins(dir: impl Into<PathBuf>) -> Self {
        let flags = Overrides {
            listen: Some("127.0.0.1:0".into()),
            plugins: Some(dir.into()),
        };
        Self::from_raw(
            RawConfig::default(),
            "defaults",
            &flags,
            &EnvOverrides::default(),
        )
        .expect("defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw = RawConfig::parse(text, Path::new("test.toml"))?;
        Config::from_raw(
            raw,
            "test.toml",
            &Overrides::default(),
            &EnvOverrides::default(),
        )
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
listen = "127.0.0.1:4000"
[api]
key = "k"
[auth]
tokens = { "tok-alice" = "alice" }
[auth.jwt]
secret = "s"
user_claim = "uid"
[plugins]
dir = "dir"
[plugins.mew]
allow_http = ["http://backend:8080"]
rooms_url = "http://backend:8080/rooms"
"#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 4000);
        assert_eq!(c.plugins_dir, PathBuf::from("dir"));
        assert_eq!(c.api_key.as_deref(), Some("k"));
        assert_eq!(c.tokens["tok-alice"], "alice");
        assert!(c.plugin_table_json("mew").contains("rooms_url"));
        assert_eq!(c.plugin_table_json("other"), "{}");
        assert_eq!(c.jwt.unwrap().user_claim, "uid");
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/chanhost.toml");
        let raw = RawConfig::load(&path).unwrap();
        let c = Config::from_raw(
            raw,
            "example",
            &Overrides::default(),
            &EnvOverrides::default(),
        )
        .unwrap();
        assert_eq!(c.plugins_dir, PathBuf::from("plugins"));
        assert_eq!(c.tokens["tok-alice"], "alice");
        // Uncommented, its plugin tables parse too.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("# [", "[")
            .replace("# rooms_url", "rooms_url")
            .replace("# api_base", "api_base")
            .replace("# allow_http", "allow_http")
            .replace("# admin_secret", "admin_secret")
            .replace("# secret", "secret")
            .replace("# user_claim", "user_claim")
            .replace("# url", "url")
            .replace("# backend", "backend");
        let raw = RawConfig::parse(&text, &path).unwrap();
        let c = Config::from_raw(
            raw,
            "example",
            &Overrides::default(),
            &EnvOverrides::default(),
        )
        .unwrap();
        assert!(c.plugin_table_json("mew").contains("rooms_url"));
        assert!(c.plugin_table_json("mew-infra").contains("admin_secret"));
        assert!(c.plugin_table_json("misskey").contains("backend"));
        assert!(c.backend_auth.is_some());
    }

    #[test]
    fn recovery_is_off_unless_asked_and_bounded() {
        assert!(parse("").unwrap().socketio.recovery.is_none());
        let r = parse("[socketio.recovery]\n")
            .unwrap()
            .socketio
            .recovery
            .unwrap();
        assert_eq!(r.max_disconnection, Duration::from_secs(120));
        assert_eq!(r.history_per_room, 1000);
        let r = parse("[socketio.recovery]\nmax_disconnection_ms = 5000\nhistory_per_room = 3")
            .unwrap()
            .socketio
            .recovery
            .unwrap();
        assert_eq!(
            (r.max_disconnection.as_millis(), r.history_per_room),
            (5000, 3)
        );
        assert!(parse("[socketio.recovery]\nmax_disconnection_ms = 0").is_err());
        assert!(parse("[socketio.recovery]\nhistory_per_room = 0").is_err());
    }

    #[test]
    fn the_socketio_adapter_takes_the_clusters_redis_and_a_plain_key() {
        let c =
            parse("[cluster]\nredis = \"redis://127.0.0.1:7000\"\n[socketio.adapter]\n").unwrap();
        let a = c.socketio.adapter.unwrap();
        assert_eq!(
            (a.redis.as_str(), a.key.as_str()),
            ("redis://127.0.0.1:7000", "socket.io")
        );
        let c = parse("[socketio.adapter]\nredis = \"redis://r:6379\"\nkey = \"app\"").unwrap();
        assert_eq!(c.socketio.adapter.unwrap().key, "app");
        assert!(parse("[socketio.adapter]\n")
            .unwrap_err()
            .to_string()
            .contains("socketio.adapter.redis"));
        let e = parse("[socketio.adapter]\nredis = \"redis://r\"\nkey = \"a#b\"").unwrap_err();
        assert!(e.to_string().contains("socketio.adapter.key"), "{e}");
        assert!(parse("").unwrap().socketio.adapter.is_none());
    }

    #[test]
    fn backend_auth_url_is_checked() {
        let c = parse("[auth.backend]\nurl = \"http://misskey:3000/api/i\"").unwrap();
        assert_eq!(c.backend_auth.unwrap().user_field, "id");
        let e = parse("[auth.backend]\nurl = \"misskey\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.backend.url"), "{e}");
        let e = parse("[auth.backend]\n").unwrap_err().to_string();
        assert!(e.contains("auth.backend.url"), "{e}");
    }

    #[test]
    fn plugins_folder_as_string() {
        let c = parse("plugins = \"p\"").unwrap();
        assert_eq!(c.plugins_dir, PathBuf::from("p"));
        assert_eq!(c.cache_dir, PathBuf::from("p/.cache"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("lisen = \"x\"").unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        assert!(e.contains("test.toml"), "{e}");
    }

    #[test]
    fn bad_listen_is_named() {
        let e = parse("listen = \"nowhere\"").unwrap_err().to_string();
        assert!(e.contains("`listen`") && e.contains("nowhere"), "{e}");
    }

    #[test]
    fn bad_allow_http_is_named() {
        let e = parse("[plugins.x]\nallow_http = \"http://a\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plugins.x.allow_http"), "{e}");
    }

    #[test]
    fn env_overrides_file() {
        let raw = RawConfig::parse("[api]\nkey = \"file\"", Path::new("t")).unwrap();
        let env = EnvOverrides {
            api_key: Some("env".into()),
            jwt_secret: None,
        };
        let c = Config::from_raw(raw, "t", &Overrides::default(), &env).unwrap();
        assert_eq!(c.api_key.as_deref(), Some("env"));
    }
}
