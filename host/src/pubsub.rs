//! A Redis pub/sub subscription that outlives Redis outages: it connects,
//! subscribes to its channels and patterns, hands every message to a
//! [`Subscriber`], and when the connection is lost (or cannot be made)
//! tries again with a growing pause (100 ms, doubling, at most 5 s),
//! logging each outage once when it starts and once when it ends. Messages
//! published while no connection is up are gone: Redis pub/sub keeps no
//! history.
//!
//! URLs are Redis URLs: `redis://[[user]:password@]host[:port][/db]`,
//! `rediss://` for TLS (certificates checked against the webpki roots, or
//! against the subscription's own CA certificates).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

/// Why a Redis URL is refused.
#[derive(Debug, thiserror::Error)]
#[error("not a Redis URL (redis://[:password@]host[:port][/db] or rediss://...): {0}")]
pub struct UrlError(pub(crate) redis::RedisError);

/// Checks a Redis URL without connecting.
pub fn check_url(url: &str) -> Result<(), UrlError> {
    redis::Client::open(url).map(|_| ()).map_err(UrlError)
}

/// A URL as it may be logged: the password left out.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<invalid url>".into(),
    }
}

/// One log line when an outage of a Redis connection starts and one when
/// it ends, whatever the number of failed attempts between.
pub(crate) struct Outage {
    what: &'static str,
    at: String,
    down: bool,
}

impl Outage {
    pub(crate) fn new(what: &'static str, at: String) -> Self {
        Self {
            what,
            at,
            down: false,
        }
    }

    /// A connection failed, or could not be made.
    pub(crate) fn down(&mut self, cause: &str) {
        if self.down {
            tracing::debug!(what = self.what, redis = %self.at, "still cannot reach Redis: {cause}");
        } else {
            tracing::warn!(what = self.what, redis = %self.at, "cannot reach Redis: {cause}; retrying");
            self.down = true;
        }
    }

    /// A connection is up.
    pub(crate) fn up(&mut self) {
        if self.down {
            tracing::info!(what = self.what, redis = %self.at, "Redis reached again");
            self.down = false;
        }
    }
}

/// What receives a subscription's messages.
pub trait Subscriber: Send + Sync + 'static {
    /// One message, with the channel it came on.
    fn message(&self, channel: &str, payload: &[u8]);
    /// The subscription went up (subscribed) or down.
    fn up(&self, up: bool);
}

/// What to subscribe to, and where.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub url: String,
    pub channels: Vec<String>,
    pub patterns: Vec<String>,
    /// What the subscription is for, in log lines ("misskey bus").
    pub what: &'static str,
    /// For `rediss://`: CA certificates (PEM) to trust instead of the
    /// webpki roots.
    pub ca: Option<Vec<u8>>,
}

/// A Redis request taking longer than this counts as failed (the
/// cluster broker's and the socket.io adapter's connections).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis request bounded by [`REQUEST_TIMEOUT`], its error as text.
pub(crate) async fn timed<T>(
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
    }
}

/// The pause before reconnect attempt `n` (0-based).
pub(crate) fn backoff(n: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << n.min(6));
    Duration::from_millis(ms.min(5_000))
}

/// Runs the subscription until `shutdown` is cancelled.
pub fn spawn(
    sub: Subscription,
    to: Arc<dyn Subscriber>,
    shutdown: CancellationToken,
) -> Result<(), UrlError> {
    let client = match &sub.ca {
        None => redis::Client::open(sub.url.as_str()),
        Some(pem) => redis::Client::build_with_tls(
            sub.url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        ),
    }
    .map_err(UrlError)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = run(&client, &sub, &*to) => {}
            _ = shutdown.cancelled() => {}
        }
        to.up(false);
    });
    Ok(())
}

async fn connect(
    client: &redis::Client,
    sub: &Subscription,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut ps = client.get_async_pubsub().await?;
    for c in &sub.channels {
        ps.subscribe(c).await?;
    }
    for p in &sub.patterns {
        ps.psubscribe(p).await?;
    }
    Ok(ps)
}

async fn run(client: &redis::Client, sub: &Subscription, to: &dyn Subscriber) {
    let at = redacted(&sub.url);
    let mut attempt = 0u32;
    let mut in_outage = false;
    let mut ever_up = false;
    loop {
        match connect(client, sub).await {
            Ok(ps) => {
                attempt = 0;
                to.up(true);
                if in_outage {
                    tracing::info!(what = sub.what, redis = %at, "Redis reached again; subscribed");
                } else if !ever_up {
                    tracing::info!(what = sub.what, redis = %at, channels = ?sub.channels, patterns = ?sub.patterns, "subscribed");
                }
                ever_up = true;
                let mut messages = ps.into_on_message();
                while let Some(m) = messages.next().await {
                    to.message(m.get_channel_name(), m.get_payload_bytes());
                }
                to.up(false);
                tracing::warn!(
                    what = sub.what,
                    redis = %at,
                    "lost the connection to Redis; reconnecting (messages published meanwhile are not received)"
                );
                in_outage = true;
            }
            Err(e) => {
                to.up(false);
                if !in_outage {
                    tracing::warn!(what = sub.what, redis = %at, "cannot reach Redis: {e}; retrying");
                    in_outage = true;
                } else {
                    tracing::debug!(what = sub.what, redis = %at, "still cannot reach Redis: {e}");
                }
            }
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_kept_out_of_logs() {
        assert!(check_url("redis://127.0.0.1:6379/2").is_ok());
        assert!(check_url("rediss://:secret@redis.example:6380").is_ok());
        assert!(check_url("http://127.0.0.1").is_err());
        assert_eq!(
            redacted("redis://:secret@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn the_pause_grows_to_five_seconds() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(3_200));
        assert_eq!(backoff(6), Duration::from_secs(5));
        assert_eq!(backoff(40), Duration::from_secs(5));
    }
}
