//! bench/flood's attacker: a host on the underlay that is no member of the
//! mesh (it has no roster and no certificate of the network's CA) floods a
//! keyd's QUIC port for a bounded time, in one of three modes:
//!
//! - `pipeline`: msg1s that a responder cannot tell from a member's (msg1
//!   carries no identity), pipelined on one connection, one bidirectional
//!   stream each; replies are read and discarded. A connection the victim
//!   closes is dialled again, so a victim that refuses does not end the flood.
//! - `streams`: many connections, each opening many streams that send one
//!   msg1 and never read, with a receive window of 0: the victim can never
//!   deliver its reply.
//! - `garbage`: random frames (whole, truncated, unframed bytes) on many
//!   streams of many connections, dialled again when closed.
//!
//! It prints one JSON object with its own counts on stdout at the end.
//!
//! msg1 is built with `mesh_proto::exchange::Exchange::initiate` under a
//! throwaway CA and identity of the attacker's own. If msg1 ever carries a
//! MAC keyed by the responder's static key (WireGuard's mac1), this attacker
//! cannot compute it (it lacks the roster), and that is the point: it keeps
//! sending what any non-member can send.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use clap::{Parser, ValueEnum};
use mesh_proto::cert::{CaCert, NodeCertRequest};
use mesh_proto::exchange::{DEFAULT_TIMEOUT, Exchange, ExchangeParams, LocalIdentity, PeerEpochs};
use mesh_proto::frame::{self, FrameDecoder};
use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
use mesh_proto::roster::{Member, Roster};
use mesh_proto::trust::{DEFAULT_MAX_CLOCK_SKEW, Trust};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ConnectionError, VarInt};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};

/// A dial that gets no QUIC answer in this time counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// msg1s made up front for the `streams` mode, used in turn.
const MSG1_POOL: usize = 64;
/// A WireGuard-style cookie reply (nonce 24, cookie 16, tag 16), should the
/// victim answer with one; a msg2 is far longer.
const COOKIE_REPLY_LEN: usize = 56;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Pipeline,
    Streams,
    Garbage,
}

#[derive(Parser, Debug)]
#[command(about = "Floods a keyd's QUIC port without the roster (bench/flood)")]
struct Args {
    /// The victim keyd's QUIC address.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Seconds to flood.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Connections at once (`streams`, `garbage`).
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Streams opened on each connection (`streams`).
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Streams in flight on each connection (`pipeline`, `garbage`).
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Network id put in the throwaway CA (the prologue binds it, but msg1
    /// carries nothing the responder could check it against).
    #[arg(long, default_value = "demo")]
    network: String,
}

#[derive(Default)]
struct Counts {
    msgs_sent: AtomicU64,
    bytes_sent: AtomicU64,
    replies: AtomicU64,
    cookie_replies: AtomicU64,
    reply_bytes: AtomicU64,
    conns_attempted: AtomicU64,
    conns_accepted: AtomicU64,
    conns_refused: AtomicU64,
    conns_unanswered: AtomicU64,
    conns_closed_by_victim: AtomicU64,
    conns_timed_out: AtomicU64,
    streams_opened: AtomicU64,
    streams_failed: AtomicU64,
}

struct Ctx {
    args: Args,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    params: ExchangeParams,
    pool: Vec<Vec<u8>>,
    next: AtomicUsize,
    deadline: Instant,
    counts: Counts,
    last_error: Mutex<Option<String>>,
}

impl Ctx {
    fn note(&self, e: impl std::fmt::Display) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
    }

    /// A fresh framed msg1: new ephemeral X25519 and ML-KEM keys each time.
    fn fresh_msg1(&self) -> Result<Vec<u8>> {
        let mut ex =
            Exchange::initiate(self.params.clone(), std::time::Instant::now(), unix_now())?;
        let msg = ex
            .poll_transmit()
            .ok_or_else(|| anyhow!("the exchange made no msg1"))?;
        Ok(frame::encode(&msg)?)
    }

    fn pooled_msg1(&self) -> &[u8] {
        let i = self.next.fetch_add(1, Relaxed);
        self.pool
            .get(i % self.pool.len().max(1))
            .map_or(&[], Vec::as_slice)
    }

    fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }

    async fn connect(&self) -> Option<quinn::Connection> {
        self.counts.conns_attempted.fetch_add(1, Relaxed);
        let connecting =
            match self
                .endpoint
                .connect_with(self.client.clone(), self.args.target, "pqmesh")
            {
                Ok(c) => c,
                Err(e) => {
                    self.counts.conns_refused.fetch_add(1, Relaxed);
                    self.note(e);
                    return None;
                }
            };
        let until = self.deadline.min(Instant::now() + CONNECT_TIMEOUT);
        match timeout_at(until, connecting).await {
            Ok(Ok(conn)) => {
                self.counts.conns_accepted.fetch_add(1, Relaxed);
                Some(conn)
            }
            Ok(Err(e)) => {
                self.counts.conns_refused.fetch_add(1, Relaxed);
                self.note(e);
                None
            }
            Err(_) if self.past_deadline() => None,
            Err(_) => {
                // Silence (a dropped Initial) is not a refusal we saw.
                self.counts.conns_unanswered.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Counts how a connection ended, if it ended before we closed it.
    fn record_end(&self, conn: &quinn::Connection) {
        match conn.close_reason() {
            None | Some(ConnectionError::LocallyClosed) => {}
            Some(ConnectionError::TimedOut) => {
                self.counts.conns_timed_out.fetch_add(1, Relaxed);
            }
            Some(e) => {
                self.counts.conns_closed_by_victim.fetch_add(1, Relaxed);
                self.note(e);
            }
        }
    }

    fn sent(&self, bytes: usize) {
        self.counts.msgs_sent.fetch_add(1, Relaxed);
        self.counts.bytes_sent.fetch_add(bytes as u64, Relaxed);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Exchange parameters under a CA and identity of the attacker's own.
fn throwaway_params(network: &str) -> Result<ExchangeParams> {
    let now = unix_now();
    let key = CaSigningKey::generate()?;
    let ca = CaCert::create(&key, "flood-ca", network, now - 60, now + 86_400)?;
    let noise = NoisePrivateKey::generate()?;
    let cert = ca.issue(
        &key,
        NodeCertRequest {
            name: "attacker".into(),
            addresses: vec!["10.66.0.1/32".parse().map_err(|e: String| anyhow!(e))?],
            groups: vec![],
            attributes: Default::default(),
            not_before: now - 60,
            not_after: now + 86_400,
            wg_public: WgPrivateKey::generate()?.public_key(),
            noise_public: noise.public_key(),
        },
    )?;
    let member = Member {
        cert: cert.clone(),
        wg_endpoint: None,
        keyd_endpoint: None,
    };
    let roster = Roster::build(&ca, &key, 1, now, now + 86_400, vec![member], vec![])?;
    let identity = Arc::new(LocalIdentity {
        cert,
        noise_key: noise,
    });
    Ok(ExchangeParams {
        trust: Trust {
            ca: Arc::new(ca),
            roster: Arc::new(roster),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            local: identity.node_id(),
        },
        identity,
        timeout: DEFAULT_TIMEOUT,
        last_epoch: 0,
        peer_epochs: PeerEpochs::default(),
        expected_peer: None,
        channel_binding: Vec::new(),
    })
}

fn client_config(mode: Mode) -> Result<quinn::ClientConfig> {
    // keyd's own client TLS: the attacker looks like any keyd.
    let tls = keyd::quic::client_tls()?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(Duration::from_secs(30).try_into()?))
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    if let Mode::Streams = mode {
        // Never grant the victim credit: its reply can never be delivered.
        transport.stream_receive_window(VarInt::from_u32(0));
    }
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Mode `pipeline`: one connection (dialled again if the victim closes it).
async fn pipeline(ctx: Arc<Ctx>) {
    while !ctx.past_deadline() {
        let Some(conn) = ctx.connect().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut set = JoinSet::new();
        for _ in 0..ctx.args.inflight.max(1) {
            set.spawn(pipeline_stream(ctx.clone(), conn.clone()));
        }
        set.join_all().await;
        ctx.record_end(&conn);
        conn.close(0u32.into(), b"done");
    }
}

/// One stream after another on `conn`: msg1, read one reply frame, reset.
async fn pipeline_stream(ctx: Arc<Ctx>, conn: quinn::Connection) {
    let mut buf = vec![0u8; 8192];
    while !ctx.past_deadline() && conn.close_reason().is_none() {
        let msg = match ctx.fresh_msg1() {
            Ok(m) => m,
            Err(e) => {
                ctx.note(format!("cannot make msg1: {e:#}"));
                return;
            }
        };
        let Ok(Ok((mut send, mut recv))) = timeout_at(ctx.deadline, conn.open_bi()).await else {
            return;
        };
        ctx.counts.streams_opened.fetch_add(1, Relaxed);
        match timeout_at(ctx.deadline, send.write_all(&msg)).await {
            Ok(Ok(())) => ctx.sent(msg.len()),
            Ok(Err(e)) => {
                ctx.counts.streams_failed.fetch_add(1, Relaxed);
                ctx.note(e);
                continue;
            }
            Err(_) => return,
        }
        let mut decoder = FrameDecoder::default();
        loop {
            match timeout_at(ctx.deadline, recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => {
                    decoder.push(buf.get(..n).unwrap_or_default());
                    if let Some(reply) = decoder.next_frame() {
                        let counter = if reply.len() == COOKIE_REPLY_LEN {
                            &ctx.counts.cookie_replies
                        } else {
                            &ctx.counts.replies
                        };
                        counter.fetch_add(1, Relaxed);
                        ctx.counts
                            .reply_bytes
                            .fetch_add(reply.len() as u64 + 2, Relaxed);
                        break;
                    }
                }
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(e)) => {
                    ctx.counts.streams_failed.fetch_add(1, Relaxed);
                    ctx.note(e);
                    break;
                }
            }
        }
        let _ = send.reset(0u32.into());
        let _ = recv.stop(0u32.into());
    }
}

/// Mode `streams`: one connection holding many streams that never read,
/// dialled again if it fails or the victim closes it.
async fn hold(ctx: Arc<Ctx>) {
    while !ctx.past_deadline() {
        let Some(conn) = ctx.connect().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut held = Vec::with_capacity(ctx.args.streams);
        for _ in 0..ctx.args.streams {
            let Ok(Ok((mut send, recv))) = timeout_at(ctx.deadline, conn.open_bi()).await else {
                break;
            };
            ctx.counts.streams_opened.fetch_add(1, Relaxed);
            let msg = ctx.pooled_msg1();
            match timeout_at(ctx.deadline, send.write_all(msg)).await {
                Ok(Ok(())) => ctx.sent(msg.len()),
                Ok(Err(e)) => {
                    ctx.counts.streams_failed.fetch_add(1, Relaxed);
                    ctx.note(e);
                }
                Err(_) => break,
            }
            held.push((send, recv));
        }
        let _ = timeout_at(ctx.deadline, conn.closed()).await;
        ctx.record_end(&conn);
        drop(held);
        conn.close(0u32.into(), b"done");
    }
}

/// xorshift64*: garbage needs speed, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> usize {
        usize::try_from(self.next() % n.max(1)).unwrap_or(0)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// One of: a whole frame of random length, a whole frame of msg1's
    /// length (an X25519 key and an ML-KEM-1024 key: 1600 bytes), a frame
    /// that announces more than it sends, or unframed bytes.
    fn garbage(&mut self) -> Vec<u8> {
        let framed = |len: usize, body: Vec<u8>| {
            let mut v = u16::try_from(len)
                .unwrap_or(u16::MAX)
                .to_be_bytes()
                .to_vec();
            v.extend_from_slice(&body);
            v
        };
        match self.below(4) {
            0 => {
                let len = self.below(4000);
                framed(len, self.bytes(len))
            }
            1 => framed(1600, self.bytes(1600)),
            2 => {
                let announced = 2000 + self.below(63_000);
                let sent = self.below(2000);
                framed(announced, self.bytes(sent))
            }
            _ => {
                let len = 1 + self.below(3000);
                self.bytes(len)
            }
        }
    }
}

/// Mode `garbage`: streams of random frames, `inflight` at a time on each
/// connection, dialled again when closed.
async fn garbage(ctx: Arc<Ctx>, seed: u64) {
    let mut round = 0u64;
    while !ctx.past_deadline() {
        let Some(conn) = ctx.connect().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut set = JoinSet::new();
        for k in 0..ctx.args.inflight.max(1) as u64 {
            round += 1;
            let rng = Rng((seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k) | 1);
            set.spawn(garbage_stream(ctx.clone(), conn.clone(), rng));
        }
        set.join_all().await;
        ctx.record_end(&conn);
        conn.close(0u32.into(), b"done");
    }
}

/// One stream after another on `conn`: garbage, FIN, then wait until the
/// victim has acknowledged it (or stopped the stream), so that only bytes
/// that reached the victim are counted, not bytes still in our buffers.
async fn garbage_stream(ctx: Arc<Ctx>, conn: quinn::Connection, mut rng: Rng) {
    while !ctx.past_deadline() && conn.close_reason().is_none() {
        let Ok(Ok((mut send, _recv))) = timeout_at(ctx.deadline, conn.open_bi()).await else {
            return;
        };
        ctx.counts.streams_opened.fetch_add(1, Relaxed);
        let bytes = rng.garbage();
        if !matches!(
            timeout_at(ctx.deadline, send.write_all(&bytes)).await,
            Ok(Ok(()))
        ) {
            ctx.counts.streams_failed.fetch_add(1, Relaxed);
            continue;
        }
        let _ = send.finish();
        match timeout_at(ctx.deadline, send.stopped()).await {
            Ok(Ok(_)) => ctx.sent(bytes.len()),
            Ok(Err(e)) => {
                ctx.counts.streams_failed.fetch_add(1, Relaxed);
                ctx.note(e);
            }
            Err(_) => return,
        }
    }
}

fn report(ctx: &Ctx, mode: Mode, elapsed: Duration) -> serde_json::Value {
    let c = &ctx.counts;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let sent = c.msgs_sent.load(Relaxed);
    serde_json::json!({
        "mode": format!("{mode:?}").to_lowercase(),
        "duration_s": (secs * 100.0).round() / 100.0,
        "msgs_sent": sent,
        "msgs_per_s": (sent as f64 / secs).round(),
        "bytes_sent": c.bytes_sent.load(Relaxed),
        "replies": c.replies.load(Relaxed),
        "cookie_replies": c.cookie_replies.load(Relaxed),
        "reply_bytes": c.reply_bytes.load(Relaxed),
        "conns_attempted": c.conns_attempted.load(Relaxed),
        "conns_accepted": c.conns_accepted.load(Relaxed),
        "conns_refused": c.conns_refused.load(Relaxed),
        "conns_unanswered": c.conns_unanswered.load(Relaxed),
        "conns_closed_by_victim": c.conns_closed_by_victim.load(Relaxed),
        "conns_timed_out": c.conns_timed_out.load(Relaxed),
        "streams_opened": c.streams_opened.load(Relaxed),
        "streams_failed": c.streams_failed.load(Relaxed),
        "last_error": ctx.last_error.lock().ok().and_then(|e| e.clone()),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mode = args.mode;
    let params = throwaway_params(&args.network).context("cannot make the throwaway identity")?;
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)
        .context("cannot open the attacker's QUIC socket")?;
    let client = client_config(mode)?;
    endpoint.set_default_client_config(client.clone());
    let mut pool = Vec::new();
    if let Mode::Streams = mode {
        for _ in 0..MSG1_POOL {
            let mut ex = Exchange::initiate(params.clone(), std::time::Instant::now(), unix_now())?;
            let msg = ex.poll_transmit().ok_or_else(|| anyhow!("no msg1"))?;
            pool.push(frame::encode(&msg)?);
        }
    }
    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        deadline: started + Duration::from_secs(args.duration),
        args,
        endpoint: endpoint.clone(),
        client,
        params,
        pool,
        next: AtomicUsize::new(0),
        counts: Counts::default(),
        last_error: Mutex::new(None),
    });
    let mut set = JoinSet::new();
    match mode {
        Mode::Pipeline => {
            set.spawn(pipeline(ctx.clone()));
        }
        Mode::Streams => {
            for _ in 0..ctx.args.connections {
                set.spawn(hold(ctx.clone()));
            }
        }
        Mode::Garbage => {
            let seed = getrandom::u64().map_err(|e| anyhow!("no randomness: {e}"))?;
            for i in 0..ctx.args.connections {
                set.spawn(garbage(
                    ctx.clone(),
                    seed.wrapping_add(i as u64 * 0x9E37_79B9),
                ));
            }
        }
    }
    // Every task watches the deadline; this bounds the run even if one hangs.
    let _ = timeout_at(ctx.deadline + Duration::from_secs(5), set.join_all()).await;
    let elapsed = started
        .elapsed()
        .min(Duration::from_secs(ctx.args.duration));
    println!("{}", report(&ctx, mode, elapsed));
    endpoint.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}
