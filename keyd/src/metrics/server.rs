//! A bounded HTTP/1 server for `GET /metrics`: any host that can reach the
//! address may connect, unauthenticated, so each connection gets one
//! request, a request head of at most [`Limits::max_request`] bytes read
//! within [`Limits::read_timeout`]; at most [`Limits::max_connections`]
//! connections are served at once, and at most [`Limits::max_per_source`]
//! from one address, so that one host cannot take every slot and blind
//! Prometheus (more are closed at once, unread). Every connection refused
//! and every bad request is counted (`keyd_metrics_requests_refused_total`,
//! on every page) and logged at a bounded rate.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::exposition::{Exposition, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::ratelimit::SharedLogLimiter;

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections from one IP address at once.
    pub max_per_source: usize,
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
            // A Prometheus server (or two, in a pair) scrapes one at a time.
            max_per_source: 2,
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

    /// Its `reason` in `keyd_metrics_requests_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Timeout => "timeout",
            Self::Truncated => "closed_early",
            Self::Malformed => "malformed",
            Self::Method => "method",
            Self::NotFound => "not_found",
        }
    }
}

/// A connection closed unread: the server serves `max_connections` already.
const BUSY: &str = "busy";
/// A connection closed unread: its address holds `max_per_source` already.
const SOURCE_BUSY: &str = "source_busy";

/// Every `reason` of `keyd_metrics_requests_refused_total`: the caps, then
/// each [`RequestError`]'s label. All are shown from the start, at 0.
pub const REFUSAL_REASONS: [&str; 8] = [
    BUSY,
    SOURCE_BUSY,
    "too_large",
    "timeout",
    "closed_early",
    "malformed",
    "method",
    "not_found",
];

/// Counts per [`REFUSAL_REASONS`] entry.
#[derive(Default)]
struct Refusals([AtomicU64; REFUSAL_REASONS.len()]);

impl Refusals {
    fn count(&self, reason: &str) {
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn render(&self) -> String {
        let mut e = Exposition::new();
        let name = "keyd_metrics_requests_refused_total";
        e.family(
            name,
            Kind::Counter,
            "Connections to /metrics closed unread (busy, source_busy) and bad requests, by reason",
        );
        for (reason, n) in REFUSAL_REASONS.iter().zip(&self.0) {
            e.sample(name, &[("reason", reason)], n.load(Ordering::Relaxed));
        }
        e.finish()
    }
}

/// A 200 answer's body: the part shared between scrapes (rendered once per
/// status), then the part made for this scrape.
pub struct Body {
    pub shared: Arc<str>,
    pub fresh: String,
}

/// What serves the page: `None` while keyd has no status (answered 503).
pub type Render = Arc<dyn Fn() -> Option<Body> + Send + Sync>;

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

/// Whether the head ends (an empty line) in what arrived from `new_from`
/// on. Only the new bytes are searched, with the 3 before them (the end may
/// straddle two reads): the earlier bytes were searched when they came, so
/// a head sent a byte at a time costs linear, not quadratic, work.
fn ends_head(head: &[u8], new_from: usize) -> bool {
    let tail = &head[new_from.saturating_sub(3)..];
    tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n")
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
            let new_from = head.len();
            head.extend_from_slice(&buf[..n]);
            if ends_head(&head, new_from) {
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

fn response_head(status: &str, extra: &str, length: usize) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {length}\r\n{extra}Connection: close\r\n\r\n"
    )
}

/// The state every connection shares.
struct Server {
    limits: Limits,
    render: Render,
    refusals: Refusals,
    /// Connections open per source address (entries removed at zero).
    sources: Mutex<HashMap<IpAddr, usize>>,
    log: SharedLogLimiter,
}

impl Server {
    /// Counts a refusal and logs it at a bounded rate (per reason).
    fn refuse(&self, reason: &'static str, from: SocketAddr, why: &dyn Display) {
        self.refusals.count(reason);
        self.log.warn(reason, || {
            format!("metrics: refused {from} ({reason}): {why}")
        });
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection's place in its source's count, given back on drop.
struct SourceSlot {
    server: Arc<Server>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(server: &Arc<Server>, ip: IpAddr) -> Option<Self> {
        let mut sources = server.sources();
        let open = sources.entry(ip).or_default();
        if *open >= server.limits.max_per_source {
            return None;
        }
        *open += 1;
        Some(Self {
            server: server.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut sources = self.server.sources();
        if let Some(open) = sources.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

async fn serve_one(mut stream: TcpStream, from: SocketAddr, server: &Server) {
    let limits = &server.limits;
    let (head, body) = match read_head(&mut stream, limits)
        .await
        .and_then(|head| check_request(&head))
    {
        Ok(()) => match (server.render)() {
            Some(page) => {
                let tail = page.fresh + &server.refusals.render();
                let length = page.shared.len() + tail.len();
                (
                    response_head("200 OK", "", length),
                    Some((page.shared, tail)),
                )
            }
            None => {
                let text = "keyd has no status yet\n";
                (
                    response_head("503 Service Unavailable", "", text.len()) + text,
                    None,
                )
            }
        },
        Err(e) => {
            server.refuse(e.label(), from, &e);
            if e == RequestError::Truncated {
                return;
            }
            let allow = if e == RequestError::Method {
                "Allow: GET\r\n"
            } else {
                ""
            };
            let text = format!("{e}\n");
            (response_head(e.status(), allow, text.len()) + &text, None)
        }
    };
    let _ = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(head.as_bytes()).await?;
        if let Some((shared, tail)) = body {
            stream.write_all(shared.as_bytes()).await?;
            stream.write_all(tail.as_bytes()).await?;
        }
        stream.shutdown().await
    })
    .await;
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, limits: Limits, render: Render) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let server = Arc::new(Server {
        limits,
        render,
        refusals: Refusals::default(),
        sources: Mutex::default(),
        log: SharedLogLimiter::default(),
    });
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over a cap: counted, then closed at once (the stream dropped at
        // the end of this turn), before reading anything.
        let Some(source) = SourceSlot::take(&server, from.ip()) else {
            let cap = server.limits.max_per_source;
            server.refuse(
                SOURCE_BUSY,
                from,
                &format!("{cap} connections from it at once"),
            );
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let cap = server.limits.max_connections;
            server.refuse(BUSY, from, &format!("{cap} connections at once"));
            continue;
        };
        // The body goes out in pieces: no waiting on Nagle between them.
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            serve_one(stream, from, &server).await;
            drop((slot, source));
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
        let render: Render = Arc::new(|| {
            Some(Body {
                shared: "x_total 1\n".into(),
                fresh: "y 2\n".into(),
            })
        });
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
        let (_, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(body.starts_with("x_total 1\ny 2\n# HELP "), "{ok}");
        let length = format!("Content-Length: {}\r\n", body.len());
        assert!(ok.contains(&length), "{ok}");
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
            max_per_source: 16,
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

    /// A connection to `addr` from the loopback address `source`.
    async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        socket.connect(addr).await.unwrap()
    }

    async fn exchange_from(source: [u8; 4], addr: SocketAddr, request: &[u8]) -> String {
        let mut s = connect_from(source, addr).await;
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The value of `keyd_metrics_requests_refused_total{reason}` in a page.
    fn refused(page: &str, reason: &str) -> u64 {
        let series = format!("keyd_metrics_requests_refused_total{{reason=\"{reason}\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {reason} in {page}"))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn one_host_cannot_take_every_slot() {
        let addr = start(Limits {
            max_per_source: 2,
            read_timeout: Duration::from_secs(3600),
            ..Limits::default()
        })
        .await;
        // 127.0.0.2 holds its two slots with silent connections...
        let _held = [
            connect_from([127, 0, 0, 2], addr).await,
            connect_from([127, 0, 0, 2], addr).await,
        ];
        // ...so its third is closed unanswered, while another host is served
        // (14 global slots are still free).
        let third = exchange_from([127, 0, 0, 2], addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(third, "");
        let other = exchange_from([127, 0, 0, 3], addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 200 OK"), "{other}");
        assert_eq!(refused(&other, "source_busy"), 1);
        assert_eq!(refused(&other, "busy"), 0);
    }

    #[tokio::test]
    async fn refused_connections_and_bad_requests_are_counted_by_reason() {
        let addr = start(Limits {
            max_connections: 1,
            max_per_source: 16,
            read_timeout: Duration::from_secs(3600),
            ..Limits::default()
        })
        .await;
        let first = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        for reason in REFUSAL_REASONS {
            assert_eq!(refused(&first, reason), 0, "{reason} from the start");
        }
        exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        exchange(addr, b"GET /x HTTP/1.1\r\n\r\n").await;
        exchange(addr, b"GET /x HTTP/1.1\r\n\r\n").await;
        exchange(addr, b"hello\r\n\r\n").await;
        // Half a head, then the end of the stream.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        half.shutdown().await.unwrap();
        let _ = half.read_to_end(&mut Vec::new()).await;
        {
            // The one slot held: the next connection is closed unread.
            let _held = TcpStream::connect(addr).await.unwrap();
            // The slot is taken once the server accepts it, before the next.
            assert_eq!(exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await, "");
        }
        // The held connection's slot comes back once the server sees it
        // closed (counted as closed_early).
        let page = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let page = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
                if !page.is_empty() {
                    return page;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slot comes back");
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        let counts: Vec<u64> = REFUSAL_REASONS.iter().map(|r| refused(&page, r)).collect();
        // The retries above may have met the held slot too: busy >= 1.
        assert!(counts[0] >= 1, "busy: {counts:?}");
        assert_eq!(
            REFUSAL_REASONS[1..]
                .iter()
                .zip(&counts[1..])
                .collect::<Vec<_>>(),
            [
                (&"source_busy", &0),
                (&"too_large", &0),
                (&"timeout", &0),
                (&"closed_early", &2),
                (&"malformed", &1),
                (&"method", &1),
                (&"not_found", &2),
            ]
        );
    }

    #[test]
    fn every_request_error_has_its_reason_listed() {
        for e in [
            RequestError::TooLarge(1),
            RequestError::Timeout,
            RequestError::Truncated,
            RequestError::Malformed,
            RequestError::Method,
            RequestError::NotFound,
        ] {
            // No wildcard: a new variant does not compile until listed.
            match e {
                RequestError::TooLarge(_)
                | RequestError::Timeout
                | RequestError::Truncated
                | RequestError::Malformed
                | RequestError::Method
                | RequestError::NotFound => {}
            }
            assert!(REFUSAL_REASONS.contains(&e.label()), "{e:?}");
        }
    }

    #[test]
    fn the_head_ends_where_it_ends_when_sent_a_byte_at_a_time() {
        for request in [
            &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /metrics HTTP/1.1\n\n",
            b"GET /metrics HTTP/1.1\r\n\n",
        ] {
            let mut head = Vec::new();
            let mut ended_at = None;
            for (i, &b) in request.iter().enumerate() {
                let new_from = head.len();
                head.push(b);
                if ends_head(&head, new_from) {
                    ended_at = Some(i);
                    break;
                }
            }
            assert_eq!(ended_at, Some(request.len() - 1), "{request:?}");
        }
        // An end that straddles two reads of any split.
        let request = b"GET /metrics HTTP/1.1\r\n\r\n";
        for split in 1..request.len() {
            let ends = ends_head(&request[..split], 0) || ends_head(request, split);
            assert!(ends, "split at {split}");
            assert!(!ends_head(&request[..split], 0), "split at {split}");
        }
    }
}
