//! HTTP requests the host itself sends: the auth backend's token checks
//! and plugins' `fetch` (WIT 0.2.0). One client, so both follow the same
//! rules: every phase bounded (connect, first byte, between bytes), the
//! whole exchange bounded too, and the body read up to a cap.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

/// A request body as the client sends it.
pub type Body = http_body_util::combinators::BoxBody<Bytes, wasmtime_wasi_http::Error>;

/// Why an exchange gave no response.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OutboundError {
    #[error("{0}")]
    Request(String),
    #[error("no complete answer within {0} ms")]
    TimedOut(u128),
    #[error("the response body is larger than {0} bytes")]
    TooLarge(usize),
}

/// A whole response.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A body of bytes.
pub fn body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e: std::convert::Infallible| match e {})
        .boxed()
}

/// Sends `request` and reads the whole answer: each phase within
/// `timeout`, the whole exchange within three times that, the body up to
/// `max_body` bytes. The `Host` header is set from the URI when missing.
pub async fn send(
    mut request: http::Request<Body>,
    timeout: Duration,
    max_body: usize,
) -> Result<Answer, OutboundError> {
    if !request.headers().contains_key(http::header::HOST) {
        if let Some(a) = request.uri().authority() {
            if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                request.headers_mut().insert(http::header::HOST, v);
            }
        }
    }
    let options = wasmtime_wasi_http::RequestOptions {
        connect_timeout: Some(timeout),
        first_byte_timeout: Some(timeout),
        between_bytes_timeout: Some(timeout),
    };
    let exchange = async {
        let (res, io) = wasmtime_wasi_http::default_send_request(request, Some(options))
            .await
            .map_err(|e| OutboundError::Request(e.to_string()))?;
        let (parts, body) = res.into_parts();
        let (bytes, _) = tokio::join!(Limited::new(body, max_body).collect(), async {
            let _ = io.await;
        });
        let bytes = bytes.map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                OutboundError::TooLarge(max_body)
            } else {
                OutboundError::Request(e.to_string())
            }
        })?;
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: bytes.to_bytes(),
        })
    };
    tokio::time::timeout(timeout * 3, exchange)
        .await
        .unwrap_or(Err(OutboundError::TimedOut((timeout * 3).as_millis())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server answering `reply` to the first request.
    async fn server(reply: &'static [u8]) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(reply).await;
            // Keep the connection until the client is done.
            let _ = s.read(&mut buf).await;
        });
        addr
    }

    fn get(addr: std::net::SocketAddr) -> http::Request<Body> {
        http::Request::get(format!("http://{addr}/x"))
            .body(body(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn reads_a_whole_answer_and_caps_the_body() {
        let addr =
            server(b"HTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: 5\r\n\r\nhello").await;
        let a = send(get(addr), Duration::from_secs(2), 100).await.unwrap();
        assert_eq!(a.status, 201);
        assert_eq!(a.headers["x-a"], "1");
        assert_eq!(&a.body[..], b"hello");

        let addr = server(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let e = send(get(addr), Duration::from_secs(2), 4)
            .await
            .unwrap_err();
        assert_eq!(e, OutboundError::TooLarge(4));
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            std::future::pending::<()>().await
        });
        let e = send(get(addr), Duration::from_millis(50), 100)
            .await
            .unwrap_err();
        assert!(
            matches!(e, OutboundError::Request(_) | OutboundError::TimedOut(_)),
            "{e:?}"
        );
    }
}
