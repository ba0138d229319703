//! Path probes to a peer's data-plane port (the ladder's direct rung): is
//! direct UDP to that peer passing, and with what round trip?
//!
//! One UDP socket (bound to keyd's QUIC listen IP, port 0) and one receive
//! task; each [`Prober::probe`] call registers a random nonce in a map of
//! pending probes, sends `mesh_proto::probe` request and waits for the
//! receive task to hand it the matching response. An answer counts only if
//! its nonce is pending and it comes from the address the request went to:
//! stray, forged and late answers are ignored and counted. The map is
//! bounded ([`MAX_IN_FLIGHT`]): beyond it a probe is refused, not queued.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mesh_proto::probe::{self, Nonce, Probe, ProbeKind};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tracing::debug;

/// Probes waiting for an answer at once, across all callers.
pub const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the caller's timeout.
    #[error("no answer in time")]
    Timeout,
    /// The bound on probes in flight is reached (the caller knows it).
    #[error("too many probes in flight")]
    TooMany,
    /// Sending failed, or no randomness for the nonce.
    #[error("cannot probe: {0}")]
    Io(#[from] io::Error),
}

/// What the prober has seen, for status and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProberStats {
    pub sent: u64,
    pub answered: u64,
    pub timed_out: u64,
    /// Datagrams that were no answer to a pending probe: not a probe
    /// response, an unknown or late nonce, or from the wrong address.
    pub ignored: u64,
}

#[derive(Debug, Default)]
struct Stats {
    sent: AtomicU64,
    answered: AtomicU64,
    timed_out: AtomicU64,
    ignored: AtomicU64,
}

struct Pending {
    target: SocketAddr,
    answer: oneshot::Sender<Instant>,
}

type PendingMap = Mutex<HashMap<Nonce, Pending>>;

/// Sends path probes and matches their answers; see the module docs.
pub struct Prober {
    socket: Arc<UdpSocket>,
    pending: Arc<PendingMap>,
    stats: Arc<Stats>,
    max_in_flight: usize,
    receiver: tokio::task::JoinHandle<()>,
}

impl Prober {
    /// Binds the probe socket at `local` and starts its receive task (on
    /// the current tokio runtime).
    pub async fn bind(local: SocketAddr) -> io::Result<Prober> {
        Self::bind_with_limit(local, MAX_IN_FLIGHT).await
    }

    /// [`Self::bind`] with another bound on probes in flight.
    pub async fn bind_with_limit(local: SocketAddr, max_in_flight: usize) -> io::Result<Prober> {
        let socket = Arc::new(UdpSocket::bind(local).await?);
        let pending = Arc::new(PendingMap::default());
        let stats = Arc::new(Stats::default());
        let receiver = tokio::spawn(receive(socket.clone(), pending.clone(), stats.clone()));
        Ok(Prober {
            socket,
            pending,
            stats,
            max_in_flight,
            receiver,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Probes waiting for their answer now.
    pub fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }

    pub fn stats(&self) -> ProberStats {
        let s = &self.stats;
        ProberStats {
            sent: s.sent.load(Ordering::Relaxed),
            answered: s.answered.load(Ordering::Relaxed),
            timed_out: s.timed_out.load(Ordering::Relaxed),
            ignored: s.ignored.load(Ordering::Relaxed),
        }
    }

    /// Sends one probe to `target` (a data plane's WireGuard port) and
    /// returns the round trip of its answer. Cancel-safe: dropping the
    /// future withdraws the probe, and a late answer is then ignored.
    pub async fn probe(
        &self,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Duration, ProbeError> {
        let target = canonical(target);
        let (tx, rx) = oneshot::channel();
        let nonce = self.register(target, tx)?;
        let _withdraw = Withdraw {
            pending: &self.pending,
            nonce,
        };
        let sent = Instant::now();
        self.socket.send_to(&Probe::request(nonce), target).await?;
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(at)) => {
                self.stats.answered.fetch_add(1, Ordering::Relaxed);
                Ok(at.saturating_duration_since(sent))
            }
            // The sender is only dropped with its entry, which is ours to
            // remove; the receive task ended (socket gone): no answer comes.
            Ok(Err(_)) | Err(_) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(ProbeError::Timeout)
            }
        }
    }

    /// Enters a fresh random nonce for `target` in the pending map.
    fn register(
        &self,
        target: SocketAddr,
        answer: oneshot::Sender<Instant>,
    ) -> Result<Nonce, ProbeError> {
        let mut nonce = Nonce::default();
        loop {
            getrandom::fill(&mut nonce).map_err(random_error)?;
            let mut pending = lock(&self.pending);
            if pending.len() >= self.max_in_flight {
                return Err(ProbeError::TooMany);
            }
            // A repeated 128-bit random nonce means a broken generator;
            // drawing again keeps each pending entry unambiguous.
            if let Entry::Vacant(slot) = pending.entry(nonce) {
                slot.insert(Pending { target, answer });
                return Ok(nonce);
            }
        }
    }
}

/// The OS's errno where there is one, so callers see an `io::ErrorKind`.
fn random_error(e: getrandom::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::other(e),
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

/// Removes a probe's pending entry however its wait ends.
struct Withdraw<'a> {
    pending: &'a PendingMap,
    nonce: Nonce,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.nonce);
    }
}

/// The map stays consistent under any panic (single inserts and removes),
/// so a poisoned lock is still usable.
fn lock(pending: &PendingMap) -> MutexGuard<'_, HashMap<Nonce, Pending>> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An IPv4 peer seen through a dual-stack socket arrives v4-mapped; compare
/// addresses in one form.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The receive task: matches responses to pending probes until aborted.
async fn receive(socket: Arc<UdpSocket>, pending: Arc<PendingMap>, stats: Arc<Stats>) {
    // One byte more than a probe, so a longer datagram is seen as longer.
    let mut buf = [0u8; probe::LEN + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // ICMP errors from earlier sends surface here on some
                // systems; they concern no particular probe.
                debug!("prober: receive: {e}");
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) {
                    // An unknown failure: do not spin on it.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
        };
        let at = Instant::now();
        let matched = match probe::parse(&buf[..n]) {
            Some(Probe {
                kind: ProbeKind::Response,
                nonce,
            }) => take_if_from(&pending, nonce, canonical(from)),
            _ => None,
        };
        // The waiter may have given up between our lookup and now; then
        // the answer is as good as late, and it is counted so.
        let delivered = matched.is_some_and(|waiter| waiter.send(at).is_ok());
        if !delivered {
            stats.ignored.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Removes and returns the waiter for `nonce` if its probe went to `from`.
/// An answer from elsewhere leaves the probe pending: a forger who saw the
/// nonce cannot cancel it.
fn take_if_from(
    pending: &PendingMap,
    nonce: Nonce,
    from: SocketAddr,
) -> Option<oneshot::Sender<Instant>> {
    let mut pending = lock(pending);
    match pending.entry(nonce) {
        Entry::Occupied(e) if e.get().target == from => Some(e.remove().answer),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::sync::mpsc;

    const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    /// Long enough never to fire on a loaded machine where an answer is due.
    const PATIENT: Duration = Duration::from_secs(30);
    /// Where no answer is due, how long to wait for it not to come.
    const SHORT: Duration = Duration::from_millis(200);

    /// How the tiny responder answers a request.
    #[derive(Clone, Copy)]
    enum Mode {
        Honest,
        /// A response with another nonce.
        WrongNonce,
        /// The right response, from another socket.
        WrongSource,
        /// The request echoed back (not a response).
        Echo,
        Silent,
    }

    /// A responder on loopback: answers each request as `mode` says.
    /// Returns its address and a channel that receives every request's
    /// nonce once it has been handled.
    async fn responder(mode: Mode) -> (SocketAddr, mpsc::UnboundedReceiver<(Nonce, SocketAddr)>) {
        let socket = UdpSocket::bind(LOOPBACK).await.unwrap();
        let other = UdpSocket::bind(LOOPBACK).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Some(p) = probe::parse(&buf[..n]) else {
                    continue;
                };
                let nonce = p.nonce;
                let mut wrong = nonce;
                wrong[0] ^= 1;
                let _ = match mode {
                    Mode::Honest => socket.send_to(&Probe::response(nonce), from).await,
                    Mode::WrongNonce => socket.send_to(&Probe::response(wrong), from).await,
                    Mode::WrongSource => other.send_to(&Probe::response(nonce), from).await,
                    Mode::Echo => socket.send_to(&Probe::request(nonce), from).await,
                    Mode::Silent => Ok(0),
                };
                let _ = tx.send((nonce, from));
            }
        });
        (addr, rx)
    }

    /// Waits (bounded) until the prober has ignored `n` datagrams.
    async fn ignored(prober: &Prober, n: u64) {
        for _ in 0..3_000 {
            if prober.stats().ignored >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("ignored {:?}, expected {n}", prober.stats());
    }

    #[tokio::test]
    async fn an_honest_answer_gives_a_round_trip() {
        let (target, _) = responder(Mode::Honest).await;
        let prober = Prober::bind(LOOPBACK).await.unwrap();
        let rtt = prober.probe(target, PATIENT).await.unwrap();
        assert!(rtt < PATIENT, "{rtt:?}");
        assert_eq!(
            prober.stats(),
            ProberStats {
                sent: 1,
                answered: 1,
                timed_out: 0,
                ignored: 0
            }
        );
        assert_eq!(prober.in_flight(), 0);
    }

    #[tokio::test]
    async fn wrong_nonce_wrong_source_and_echoed_requests_are_ignored_and_counted() {
        for mode in [Mode::WrongNonce, Mode::WrongSource, Mode::Echo] {
            let (target, _) = responder(mode).await;
            let prober = Prober::bind(LOOPBACK).await.unwrap();
            let probing = prober.probe(target, PATIENT);
            tokio::pin!(probing);
            // The bad answer arrives and is ignored while the probe waits.
            tokio::select! {
                r = &mut probing => panic!("answered by a bad answer: {r:?}"),
                () = ignored(&prober, 1) => {}
            }
            assert_eq!(prober.in_flight(), 1, "the probe stays pending");
            assert_eq!(prober.stats().answered, 0);
        }
    }

    #[tokio::test]
    async fn silence_times_out_and_withdraws_the_probe() {
        let (target, _) = responder(Mode::Silent).await;
        let prober = Prober::bind(LOOPBACK).await.unwrap();
        let err = prober.probe(target, SHORT).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout), "{err:?}");
        assert_eq!(prober.in_flight(), 0);
        assert_eq!(prober.stats().timed_out, 1);
    }

    #[tokio::test]
    async fn a_late_answer_is_ignored_and_counted() {
        // The target is a socket of the test's: the request waits in it.
        let target = UdpSocket::bind(LOOPBACK).await.unwrap();
        let prober = Prober::bind(LOOPBACK).await.unwrap();
        let to = target.local_addr().unwrap();
        let err = prober.probe(to, SHORT).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout), "{err:?}");
        // Answer it now, right nonce and source, but too late.
        let mut buf = [0u8; 64];
        let (n, from) = target.recv_from(&mut buf).await.unwrap();
        let request = probe::parse(&buf[..n]).unwrap();
        assert_eq!(request.kind, ProbeKind::Request);
        let answer = Probe::response(request.nonce);
        target.send_to(&answer, from).await.unwrap();
        ignored(&prober, 1).await;
        assert_eq!(prober.stats().answered, 0);
        // A new probe is answered as usual.
        let probing = prober.probe(to, PATIENT);
        tokio::pin!(probing);
        let answered = async {
            let (n, from) = target.recv_from(&mut buf).await.unwrap();
            let p = probe::parse(&buf[..n]).unwrap();
            target
                .send_to(&Probe::response(p.nonce), from)
                .await
                .unwrap();
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = &mut probing => { r.unwrap(); }
            () = answered => unreachable!(),
        }
        assert_eq!(prober.stats().ignored, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_probes_in_flight_from_many_tasks_each_get_their_own_answer() {
        let (target, _) = responder(Mode::Honest).await;
        let prober = Arc::new(Prober::bind(LOOPBACK).await.unwrap());
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let prober = prober.clone();
                tokio::spawn(async move { prober.probe(target, PATIENT).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let stats = prober.stats();
        assert_eq!((stats.sent, stats.answered, stats.ignored), (200, 200, 0));
        assert_eq!(prober.in_flight(), 0);
    }

    #[tokio::test]
    async fn probes_beyond_the_limit_are_refused_and_cancelled_ones_withdrawn() {
        let (target, mut requests) = responder(Mode::Silent).await;
        let prober = Arc::new(Prober::bind_with_limit(LOOPBACK, 3).await.unwrap());
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let prober = prober.clone();
                tokio::spawn(async move { prober.probe(target, PATIENT).await })
            })
            .collect();
        // All three are pending once the responder has seen them.
        for _ in 0..3 {
            requests.recv().await.unwrap();
        }
        assert_eq!(prober.in_flight(), 3);
        let err = prober.probe(target, PATIENT).await.unwrap_err();
        assert!(matches!(err, ProbeError::TooMany), "{err:?}");
        for t in &waiting {
            t.abort();
        }
        for t in waiting {
            assert!(t.await.unwrap_err().is_cancelled());
        }
        assert_eq!(prober.in_flight(), 0, "cancelled probes are withdrawn");
        let (honest, _) = responder(Mode::Honest).await;
        prober.probe(honest, PATIENT).await.unwrap();
    }

    #[test]
    fn v4_mapped_addresses_compare_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:51820".parse().unwrap();
        let plain: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        assert_eq!(canonical(mapped), plain);
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
