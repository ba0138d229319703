//! A bounded HTTP/1 server for `GET /metrics`: any host that can reach the
//! address may connect, unauthenticated, so each connection gets one
//! request, a request head of at most [`Limits::max_request`] bytes read
//! within [`Limits::read_timeout`], and at most [`Limits::max_connections`]
//! connections are served at once (more are closed at once, unread).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::warn;

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_request: usize,
    /// For the whole request head.
    pub read_timeout: Duration,
    /// For the whole response.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            max_request: 8192,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// What is wrong with a request, and the status it is answered with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request head is longer than {0} bytes")]
    TooLarge(usize),
    #[error("the request head did not arrive in time")]
    Timeout,
    #[error("the connection closed before the request head ended")]
    Truncated,
    #[error("not an HTTP/1 request line")]
    Malformed,
    #[error("method not allowed (only GET)")]
    Method,
    #[error("no such path (only /metrics)")]
    NotFound,
}

impl RequestError {
    fn status(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "431 Request Header Fields Too Large",
            Self::Timeout => "408 Request Timeout",
            Self::Truncated | Self::Malformed => "400 Bad Request",
            Self::Method => "405 Method Not Allowed",
            Self::NotFound => "404 Not Found",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Checks a complete request head: `GET /metrics` (a query is ignored).
pub fn check_request(head: &[u8]) -> Result<(), RequestError> {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(RequestError::Malformed)?;
    let line = std::str::from_utf8(&head[..line_end]).map_err(|_| RequestError::Malformed)?;
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Err(RequestError::Malformed);
    }
    if method != "GET" {
        return Err(RequestError::Method);
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return Err(RequestError::NotFound);
    }
    Ok(())
}

/// Reads the request head: up to the empty line, bounded in size and time.
async fn read_head(stream: &mut TcpStream, limits: &Limits) -> Result<Vec<u8>, RequestError> {
    let read = async {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|_| RequestError::Truncated)?;
            if n == 0 {
                return Err(RequestError::Truncated);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(head);
            }
            if head.len() > limits.max_request {
                return Err(RequestError::TooLarge(limits.max_request));
            }
        }
    };
    tokio::time::timeout(limits.read_timeout, read)
        .await
        .unwrap_or(Err(RequestError::Timeout))
}

fn response(status: &str, extra: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn serve_one(
    mut stream: TcpStream,
    limits: &Limits,
    render: &(dyn Fn() -> Option<String> + Send + Sync),
) {
    let answer = match read_head(&mut stream, limits)
        .await
        .and_then(|head| check_request(&head))
    {
        Ok(()) => match render() {
            Some(body) => response("200 OK", "", &body),
            None => response("503 Service Unavailable", "", "keyd has no status yet\n"),
        },
        Err(RequestError::Truncated) => return,
        Err(e) => {
            let allow = if e == RequestError::Method {
                "Allow: GET\r\n"
            } else {
                ""
            };
            response(e.status(), allow, &format!("{e}\n"))
        }
    };
    let _ = tokio::time::timeout(limits.write_timeout, async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves `listener` until the task is dropped; `render` gives the body
/// (`None`: not ready, answered 503).
pub async fn serve(
    listener: TcpListener,
    limits: Limits,
    render: Arc<dyn Fn() -> Option<String> + Send + Sync>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let limits = Arc::new(limits);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap: closed at once, before reading anything.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (limits, render) = (limits.clone(), render.clone());
        tokio::spawn(async move {
            serve_one(stream, &limits, &*render).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        assert_eq!(
            check_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(())
        );
        assert_eq!(check_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Ok(()));
        assert_eq!(
            check_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err(RequestError::Method)
        );
        assert_eq!(
            check_request(b"GET / HTTP/1.1\r\n\r\n"),
            Err(RequestError::NotFound)
        );
        assert_eq!(
            check_request(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Err(RequestError::NotFound)
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"\xff /metrics HTTP/1.1\r\n\r\n",
            b"no line end",
        ] {
            assert_eq!(check_request(bad), Err(RequestError::Malformed), "{bad:?}");
        }
    }

    /// A server on loopback with these limits; its address.
    async fn start(limits: Limits) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render = Arc::new(|| Some("x_total 1\n".to_string()));
        tokio::spawn(serve(listener, limits, render));
        addr
    }

    /// Sends `request` (the write side left open) and reads until the
    /// server closes; a reset (closed unread) reads as what came before it.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let addr = start(Limits::default()).await;
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx_total 1\n"), "{ok}");
        let e = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            e.starts_with("HTTP/1.1 405 ") && e.contains("Allow: GET"),
            "{e}"
        );
        let e = exchange(addr, b"GET /admin HTTP/1.1\r\n\r\n").await;
        assert!(e.starts_with("HTTP/1.1 404 "), "{e}");
        let e = exchange(addr, b"hello\r\n\r\n").await;
        assert!(e.starts_with("HTTP/1.1 400 "), "{e}");
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_refused() {
        let addr = start(Limits {
            max_request: 64,
            ..Limits::default()
        })
        .await;
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', 4096));
        let e = exchange(addr, &big).await;
        assert!(e.starts_with("HTTP/1.1 431 "), "{e}");
    }

    #[tokio::test]
    async fn a_client_that_never_ends_its_request_is_dropped() {
        let addr = start(Limits {
            read_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        // Half a request head, then silence: the server answers 408 and
        // closes instead of waiting for ever.
        let e = exchange(addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(e.starts_with("HTTP/1.1 408 "), "{e}");
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_unanswered() {
        let addr = start(Limits {
            max_connections: 2,
            // Silent connections keep their slots for the whole test.
            read_timeout: Duration::from_secs(3600),
            ..Limits::default()
        })
        .await;
        // Two silent connections hold both slots...
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // ...so a third is closed without an answer, even a valid request
        // (the accept loop takes connections in order, so the two above
        // hold their slots by the time this one is accepted).
        let refused = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(refused, "");
        // A slot comes back when a connection ends.
        drop(held.pop());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
            if ok.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
