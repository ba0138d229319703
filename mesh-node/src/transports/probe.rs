//! Answers keyd's path probes (`mesh_proto::probe`) on the WireGuard socket,
//! so that keyd learns whether direct UDP to this data plane passes.
//!
//! The receiver looks at one byte per datagram: a WireGuard message starts
//! with its type (1 to 4), a probe with 0x70. Only datagrams starting with
//! 0x70 are parsed; a probe never reaches gotatun. Requests are answered
//! from the same socket to their source, responses (we never send
//! requests) are dropped. Anyone can send requests, so answers come out of
//! one token bucket per socket: an answer is the size of its request (no
//! amplification) and at most [`RATE`] per second of them leave, after a
//! burst of [`BURST`]. Everything is counted in
//! [`crate::counters::PROBES`]; the metrics watcher logs rate-limited drops
//! at a bounded rate, never one line per probe.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_proto::probe::{self, Probe, ProbeKind};
use tracing::debug;

use super::udp_socket::UdpSocket;
use crate::counters::{Counters, ProbeCounters};

/// Answers per second once the burst is spent.
pub const RATE: u32 = 2_000;
/// Answers that may leave at once.
pub const BURST: u32 = 200;

/// A token bucket on the caller's clock (sans-IO: `now` comes in).
#[derive(Debug)]
pub struct TokenBucket {
    burst: u32,
    /// Time to earn one token.
    per_token: Duration,
    tokens: u32,
    /// The time up to which tokens have been credited; `None` until first use.
    refilled: Option<Instant>,
}

impl TokenBucket {
    /// Starts full. A zero rate is taken as 1 per second, a zero burst as 1.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = burst.max(1);
        Self {
            burst,
            per_token: Duration::from_secs(1) / rate.max(1),
            tokens: burst,
            refilled: None,
        }
    }

    /// Takes a token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    fn refill(&mut self, now: Instant) {
        let refilled = *self.refilled.get_or_insert(now);
        let elapsed = now.saturating_duration_since(refilled);
        let per = self.per_token.as_nanos().max(1);
        let earned = elapsed.as_nanos() / per;
        if earned == 0 {
            return;
        }
        let room = u128::from(self.burst - self.tokens);
        if earned >= room {
            // Full: time spent full earns nothing.
            self.tokens = self.burst;
            self.refilled = Some(now);
        } else {
            // earned < burst (a u32), and earned * per <= elapsed.
            self.tokens += earned as u32;
            self.refilled = Some(refilled + Duration::from_nanos((earned * per) as u64));
        }
    }
}

/// What to do with a datagram that starts like a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a probe: gotatun's to judge (it drops what is not WireGuard).
    Pass,
    /// A request within the budget: send this back to its source.
    Answer([u8; probe::LEN]),
    /// A probe that gets no answer (counted).
    Drop,
}

/// The probe responder of one socket.
#[derive(Debug)]
pub struct Responder {
    bucket: TokenBucket,
    counters: &'static ProbeCounters,
}

impl Responder {
    pub fn new(counters: &'static ProbeCounters) -> Self {
        Self::with_limit(counters, RATE, BURST)
    }

    pub fn with_limit(counters: &'static ProbeCounters, rate: u32, burst: u32) -> Self {
        Self {
            bucket: TokenBucket::new(rate, burst),
            counters,
        }
    }

    /// The hot-path test: whether a datagram may be a probe. WireGuard
    /// packets (first byte 1..=4) fail it with one compare.
    #[inline]
    pub fn may_be_probe(datagram: &[u8]) -> bool {
        datagram.first() == Some(&probe::FIRST_BYTE)
    }

    /// Decides on a datagram at `now`, counting what is dropped.
    pub fn judge(&mut self, datagram: &[u8], now: Instant) -> Verdict {
        self.judge_from(datagram, false, now)
    }

    /// As [`judge`](Self::judge); a request from loopback (keyd checking
    /// that its own data plane answers probes) is answered outside the
    /// bucket, so a flood from outside cannot make this data plane look
    /// probe-less to its keyd. Loopback sources cannot come from outside.
    pub fn judge_from(&mut self, datagram: &[u8], loopback: bool, now: Instant) -> Verdict {
        let Some(p) = probe::parse(datagram) else {
            return Verdict::Pass;
        };
        match p.kind {
            ProbeKind::Response => {
                Counters::inc(&self.counters.responses_dropped);
                Verdict::Drop
            }
            ProbeKind::Request if loopback || self.bucket.take(now) => {
                Verdict::Answer(Probe::response(p.nonce))
            }
            ProbeKind::Request => {
                Counters::inc(&self.counters.rate_limited);
                Verdict::Drop
            }
        }
    }

    /// Handles a datagram that passed [`Self::may_be_probe`], answering on
    /// `socket` without waiting (a full send buffer drops the answer).
    /// Returns whether the datagram was a probe, and so is not gotatun's.
    pub fn receive(&mut self, datagram: &[u8], from: SocketAddr, socket: &UdpSocket) -> bool {
        // A dual-stack socket names IPv4 sources as ::ffff:a.b.c.d.
        let loopback = match from.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
            ip => ip.is_loopback(),
        };
        match self.judge_from(datagram, loopback, Instant::now()) {
            Verdict::Pass => false,
            Verdict::Drop => true,
            Verdict::Answer(answer) => {
                // Counted before it leaves, so whoever sees the answer
                // also sees it counted.
                Counters::inc(&self.counters.answered);
                if let Err(e) = socket.try_send_to(&answer, from) {
                    Counters::inc(&self.counters.answer_failed);
                    debug!("probe: cannot answer {from}: {e}");
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    const NONCE: probe::Nonce = [7; 16];

    #[test]
    fn bucket_gives_its_burst_then_its_rate_and_never_more_than_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2_000, 200);
        assert_eq!((0..1_000).filter(|_| b.take(t0)).count(), 200);
        // 500 µs earns one token; 499 µs earns none.
        assert!(!b.take(t0 + Duration::from_micros(499)));
        assert!(b.take(t0 + Duration::from_micros(500)));
        assert!(!b.take(t0 + Duration::from_micros(500)));
        // Partial time is kept: 250 + 250 µs earn a token.
        assert!(!b.take(t0 + Duration::from_micros(750)));
        assert!(b.take(t0 + Duration::from_micros(1_000)));
        // One second earns 2,000 but the bucket holds 200.
        let later = t0 + Duration::from_secs(1);
        assert_eq!((0..1_000).filter(|_| b.take(later)).count(), 200);
        // After a long idle spell, still only the burst.
        let much_later = t0 + Duration::from_secs(3_600);
        assert_eq!((0..1_000).filter(|_| b.take(much_later)).count(), 200);
        // A clock that goes backwards earns nothing.
        assert!(!b.take(t0));
    }

    #[test]
    fn over_a_simulated_second_answers_are_the_burst_plus_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RATE, BURST);
        // 10 requests every 100 µs for one second: 100,000 requests.
        let mut granted = 0;
        for step in 0..=10_000u64 {
            let now = t0 + Duration::from_micros(step * 100);
            granted += (0..10).filter(|_| b.take(now)).count();
        }
        assert_eq!(granted, (BURST + RATE) as usize);
    }

    #[test]
    fn requests_are_answered_with_their_nonce_and_responses_dropped() {
        static C: ProbeCounters = ProbeCounters::new();
        let mut r = Responder::new(&C);
        let now = Instant::now();
        let req = Probe::request(NONCE);
        assert!(Responder::may_be_probe(&req));
        assert_eq!(r.judge(&req, now), Verdict::Answer(Probe::response(NONCE)));
        let resp = Probe::response(NONCE);
        assert!(Responder::may_be_probe(&resp));
        assert_eq!(r.judge(&resp, now), Verdict::Drop);
        assert_eq!(C.responses_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(C.rate_limited.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn wireguard_packets_and_near_probes_are_passed_to_gotatun() {
        static C: ProbeCounters = ProbeCounters::new();
        let mut r = Responder::new(&C);
        let now = Instant::now();
        for ty in 1u8..=4 {
            let mut msg = Probe::request(NONCE);
            msg[..4].copy_from_slice(&[ty, 0, 0, 0]);
            assert!(!Responder::may_be_probe(&msg), "type {ty}");
        }
        assert!(!Responder::may_be_probe(&[]));
        // Starts like a probe but is not one: wrong size, non-zero padding.
        let req = Probe::request(NONCE);
        assert_eq!(r.judge(&req[..23], now), Verdict::Pass);
        let mut long = req.to_vec();
        long.push(0);
        assert_eq!(r.judge(&long, now), Verdict::Pass);
        let mut padded = req;
        padded[5] = 1;
        assert_eq!(r.judge(&padded, now), Verdict::Pass);
        for c in [&C.answered, &C.responses_dropped, &C.rate_limited] {
            assert_eq!(c.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn requests_over_the_budget_are_dropped_and_counted() {
        static C: ProbeCounters = ProbeCounters::new();
        let mut r = Responder::with_limit(&C, 10, 3);
        let now = Instant::now();
        let req = Probe::request(NONCE);
        let verdicts: Vec<_> = (0..5).map(|_| r.judge(&req, now)).collect();
        let answered = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Answer(_)))
            .count();
        assert_eq!(answered, 3);
        assert_eq!(verdicts[3..], [Verdict::Drop, Verdict::Drop]);
        assert_eq!(C.rate_limited.load(Ordering::Relaxed), 2);
        // 100 ms later (10/s) one more.
        let later = now + Duration::from_millis(100);
        assert!(matches!(r.judge(&req, later), Verdict::Answer(_)));
        assert_eq!(r.judge(&req, later), Verdict::Drop);
        // The bucket is empty, but keyd's own check from loopback is answered.
        assert!(matches!(
            r.judge_from(&req, true, later),
            Verdict::Answer(_)
        ));
    }

    /// Through the real socket: a GSO batch of WireGuard-sized datagrams
    /// whose last (short) segment is a probe arrives as one GRO message;
    /// the receiver hands gotatun the datagrams and answers the probe, whose
    /// answer the sender's receiver drops as a response. Also a plain
    /// request from an ordinary socket gets the exact response back.
    #[tokio::test]
    async fn a_probe_in_a_gro_batch_is_answered_and_never_reaches_gotatun() {
        use crate::counters::PROBES;
        use crate::transports::udp::GsoUdpFactory;
        use crate::transports::udp_recv::GroBufs;
        use gotatun::packet::{Packet, PacketBufPool};
        use gotatun::udp::{UdpRecv, UdpSend, UdpTransportFactory, UdpTransportFactoryParams};

        async fn bind() -> (impl UdpSend, impl UdpRecv<RecvManyBuf = GroBufs>, u16) {
            let params = UdpTransportFactoryParams {
                addr: None,
                port: 0,
                fwmark: None,
            };
            let (send, recv) = GsoUdpFactory {
                buffer_size: 1 << 20,
            }
            .bind(&params)
            .await
            .unwrap();
            let port = send.local_addr().unwrap().unwrap().port();
            (send, recv, port)
        }
        /// Receives (polling: off the data-path thread the receiver cannot
        /// block) until `done` holds for what arrived, or gives up.
        async fn receive_until(
            recv: &mut impl UdpRecv<RecvManyBuf = GroBufs>,
            done: impl Fn(&[(Packet, SocketAddr)]) -> bool,
        ) -> Vec<(Packet, SocketAddr)> {
            let mut pool = PacketBufPool::new(64);
            let mut bufs = GroBufs::default();
            let mut got = Vec::new();
            for _ in 0..500 {
                if done(&got) {
                    break;
                }
                match recv.recv_many_from(&mut bufs, &mut pool, &mut got).await {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    other => other.unwrap(),
                }
            }
            got
        }

        let (a_send, mut a_recv, _) = bind().await;
        let (_b_send, mut b_recv, b_port) = bind().await;
        let to = SocketAddr::from(([127, 0, 0, 1], b_port));
        let answered = PROBES.answered.load(Ordering::Relaxed);
        let dropped = PROBES.responses_dropped.load(Ordering::Relaxed);

        let mut batch: Vec<(Packet, SocketAddr)> = (0..10u8)
            .map(|i| (Packet::copy_from(&[i; 1000][..]), to))
            .collect();
        batch.push((Packet::copy_from(&Probe::request(NONCE)[..]), to));
        batch.push((Packet::copy_from(&[4u8; 32][..]), to));
        a_send
            .send_many_to(&mut Default::default(), &mut batch)
            .await
            .unwrap();
        let got = receive_until(&mut b_recv, |got| got.len() >= 11).await;
        let sizes: Vec<usize> = got.iter().map(|(p, _)| p.len()).collect();
        assert_eq!(sizes, [[1000; 10].as_slice(), &[32]].concat());
        for (i, (packet, _)) in got[..10].iter().enumerate() {
            assert_eq!(&packet[..], &[i as u8; 1000][..]);
        }
        assert_eq!(PROBES.answered.load(Ordering::Relaxed), answered + 1);
        // The answer reached A, whose receiver drops responses.
        let got = receive_until(&mut a_recv, |_| {
            PROBES.responses_dropped.load(Ordering::Relaxed) > dropped
        })
        .await;
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(
            PROBES.responses_dropped.load(Ordering::Relaxed),
            dropped + 1
        );

        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        plain.send_to(&Probe::request([9; 16]), to).unwrap();
        let got = receive_until(&mut b_recv, |_| {
            PROBES.answered.load(Ordering::Relaxed) > answered + 1
        })
        .await;
        assert!(got.is_empty(), "{got:?}");
        plain
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = plain.recv_from(&mut buf).unwrap();
        assert_eq!(from, to);
        assert_eq!(&buf[..n], &Probe::response([9; 16]));
    }
}
