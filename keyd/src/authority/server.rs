//! `keyd authority run`: serves enrollment and subscriptions over QUIC and
//! operator commands over a local socket.
//!
//! One thread owns the [`Authority`] (its store calls are synchronous and
//! short) and takes requests in order; connection tasks only do I/O and the
//! channel handshake. A subscriber is registered for deltas in the same step
//! that computes its catch-up, so it misses none and gets none twice. Each
//! subscriber forwards the deltas that follow the serial it last sent; one
//! that lags (a slow reader) gets the current roster as a snapshot instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use mesh_proto::channel::ServerHandshake;
use mesh_proto::cookie::{self, CookieChecker, CookieError, Verdict};
use mesh_proto::identity::{NodeId, NoisePrivateKey, NoisePublicKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, oneshot, watch};
use tracing::{info, warn};

use super::keys;
use super::link::{self, Framed, Link};
use super::service::{Authority, Catchup, Published, TokenSpec};
use super::wire::{self, Hello, JoinRequest, Refusal, Reply, SubscribeRequest};
use crate::admission::{Admission, AdmissionConfig, ConnectionDecision};
use crate::ratelimit::SharedLogLimiter;
use crate::text;
use crate::time::unix_now;

/// The whole handshake and the first reply must fit in this.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// A subscription with nothing to say sends a keepalive this often.
const KEEPALIVE: Duration = Duration::from_secs(20);
/// From the QUIC handshake's end to the first message (msg1).
const FIRST_FRAME_DEADLINE: Duration = Duration::from_secs(2);
/// From msg2 to msg3.
const MSG3_DEADLINE: Duration = Duration::from_secs(2);
/// Channel handshakes in progress from one source (address or /64).
const HANDSHAKES_PER_SOURCE: usize = 2;
/// The largest message the authority reassembles from a node.
const MAX_FROM_NODE: usize = 4096;
/// Deltas buffered for subscribers; one further behind gets a snapshot.
const DELTA_BACKLOG: usize = 1024;

/// Operator commands on the admin socket (one JSON object per line).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminOp {
    TokenCreate {
        lifetime_secs: u64,
        uses: u32,
        #[serde(default)]
        groups: Vec<String>,
        #[serde(default)]
        attributes: Vec<(String, String)>,
        #[serde(default)]
        name_pattern: Option<String>,
    },
    TokenList,
    TokenRevoke {
        id: String,
    },
    NodeList,
    NodeRevoke {
        node: String,
    },
    NodeRename {
        node: String,
        name: String,
    },
    /// Roll over to a signing key an operator certified offline and put in
    /// the state directory.
    AdoptKey {
        fingerprint: String,
    },
    /// Set the firewall policy: standard base64 of `Policy::encode()` (the
    /// CLI parsed and checked the source; the authority checks again).
    PolicySet {
        policy: String,
    },
    PolicyShow,
    /// Remove the firewall policy (no firewall: everything passes).
    PolicyClear,
    Status,
}

enum Request {
    Enroll {
        req: Box<JoinRequest>,
        client: NoisePublicKey,
        observed: SocketAddr,
        reply: oneshot::Sender<Result<Reply, Refusal>>,
    },
    Subscribe {
        req: SubscribeRequest,
        client: NoisePublicKey,
        observed: SocketAddr,
        reply: oneshot::Sender<Result<Subscription, Refusal>>,
    },
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<Result<Value, String>>,
    },
    /// Is this key still an unrevoked member?
    Member {
        client: NoisePublicKey,
        reply: oneshot::Sender<bool>,
    },
}

struct Subscription {
    node: NodeId,
    catchup: Catchup,
    /// The serial the catch-up brings the node to.
    serial: u64,
    deltas: broadcast::Receiver<Published>,
}

/// Counters shown by `keyd authority status`.
#[derive(Default)]
struct Counters {
    labels: BTreeMap<&'static str, u64>,
}

struct Shared {
    network_id: String,
    noise_key: NoisePrivateKey,
    requests: std::sync::mpsc::SyncSender<Request>,
    current: watch::Receiver<(u64, Arc<Vec<u8>>)>,
    admission: Mutex<Admission>,
    counters: Mutex<Counters>,
    subscribers: std::sync::atomic::AtomicUsize,
    log: SharedLogLimiter,
    cookies: Mutex<CookieChecker>,
    /// Handshakes in progress per source key.
    handshakes: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Source keys enrolled nodes were last seen from.
    known: Mutex<std::collections::HashSet<std::net::IpAddr>>,
}

impl Shared {
    /// mac1 and cookies on a sealed msg1 (see mesh_proto::cookie).
    fn gate<'a>(&self, sealed: &'a [u8], source: SocketAddr, under_load: bool) -> Verdict<'a> {
        let (Ok(nonce), Ok(secret)) = (
            mesh_proto::identity::random_bytes::<{ cookie::NONCE_LEN }>(),
            mesh_proto::identity::random_bytes::<32>(),
        ) else {
            return Verdict::Refuse(CookieError::BadReply);
        };
        let mut checker = self.cookies.lock().unwrap_or_else(|p| p.into_inner());
        checker.check(
            sealed,
            source,
            under_load,
            Instant::now(),
            || *secret,
            *nonce,
        )
    }

    fn count(&self, label: &'static str) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.labels.entry(label).or_default() += 1;
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the authority thread; `None` if it has stopped.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        // The queue is bounded: a full one means the authority is behind.
        self.requests.try_send(make(tx)).ok()?;
        rx.await.ok()
    }
}

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    /// Connections from one address at once (nodes behind one NAT share it).
    pub max_connections_per_source: usize,
}

/// Runs until the process is stopped.
pub async fn serve(
    authority: Authority,
    noise_key: NoisePrivateKey,
    cfg: ServeConfig,
) -> Result<()> {
    let endpoint = link::server_endpoint(cfg.listen)?;
    let (deltas, _) = broadcast::channel(DELTA_BACKLOG);
    let roster = authority.roster();
    let (current_tx, current) = watch::channel((roster.serial(), Arc::new(roster.to_bytes())));
    let (requests, rx) = std::sync::mpsc::sync_channel(4096);
    let admission = Admission::new(AdmissionConfig {
        accept_unlisted_sources: true,
        max_connections_per_source: cfg.max_connections_per_source,
        ..AdmissionConfig::default()
    });
    let noise_public = noise_key.public_key();
    let shared = Arc::new(Shared {
        network_id: authority.ca().body().network_id.clone(),
        noise_key,
        requests,
        current,
        admission: Mutex::new(admission),
        counters: Mutex::new(Counters::default()),
        subscribers: std::sync::atomic::AtomicUsize::new(0),
        log: SharedLogLimiter::default(),
        cookies: Mutex::new(CookieChecker::new(
            &noise_public,
            *mesh_proto::identity::random_bytes::<32>().context("no randomness for cookies")?,
            Instant::now(),
        )),
        handshakes: Mutex::new(std::collections::HashMap::new()),
        known: Mutex::new(std::collections::HashSet::new()),
    });
    admit_nodes(&shared, &authority);
    info!(
        "authority up: network {}, QUIC {}, roster serial {}, {} nodes, signing key {}",
        shared.network_id,
        cfg.listen,
        authority.roster().serial(),
        authority.nodes().count(),
        authority.signer().fingerprint()
    );
    let state_dir = cfg.state_dir.clone();
    let s2 = shared.clone();
    std::thread::Builder::new()
        .name("authority".into())
        .spawn(move || owner(authority, rx, deltas, current_tx, s2, state_dir))
        .context("cannot start the authority thread")?;
    // No readiness without the operator's socket: the start fails instead.
    super::admin::listen(cfg.admin_socket, shared_admin(shared.clone()))?;
    crate::notify::ready();
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let decision = shared.admission().connection(
            source_key(remote.ip()),
            incoming.remote_address_validated(),
            Instant::now(),
        );
        match decision {
            ConnectionDecision::Accept => {
                tokio::spawn(connection(shared.clone(), incoming, remote));
            }
            ConnectionDecision::Retry => {
                let _ = incoming.retry();
            }
            ConnectionDecision::Refuse(r) => {
                incoming.ignore();
                shared.count(r.label());
                shared.log.warn(r.label(), || {
                    format!("connection from {remote} refused: {}", r.label())
                });
            }
        }
    }
    Ok(())
}

/// The connection cap grows with the network: one subscription per
/// enrolled node (many may share an address) and room for joins; the
/// addresses nodes were seen from may use the second half of the handshake
/// cap (see `Slots::take_handshake`).
fn admit_nodes(s: &Shared, a: &Authority) {
    let active: Vec<std::net::IpAddr> = a
        .nodes()
        .filter(|n| n.revoked_at.is_none())
        .filter_map(|n| n.observed_addr.map(|x| source_key(x.ip())))
        .collect();
    let nodes = a.nodes().filter(|n| n.revoked_at.is_none()).count();
    *s.known.lock().unwrap_or_else(|p| p.into_inner()) = active.iter().copied().collect();
    let mut admission = s.admission();
    admission.set_listed(active);
    admission.raise_connection_cap(2 * nodes + 256);
}

/// What the admin socket calls.
pub type AdminHandle =
    Arc<dyn Fn(AdminOp) -> tokio::task::JoinHandle<Result<Value, String>> + Send + Sync>;

fn shared_admin(s: Arc<Shared>) -> AdminHandle {
    Arc::new(move |op| {
        let s = s.clone();
        tokio::spawn(async move {
            s.ask(|reply| Request::Admin { op, reply })
                .await
                .unwrap_or_else(|| Err("the authority is busy or stopping".into()))
        })
    })
}

/// The thread that owns the authority.
fn owner(
    mut a: Authority,
    rx: std::sync::mpsc::Receiver<Request>,
    deltas: broadcast::Sender<Published>,
    current: watch::Sender<(u64, Arc<Vec<u8>>)>,
    s: Arc<Shared>,
    state_dir: PathBuf,
) {
    // Everything committed goes out, in order, even when the operation
    // that committed it failed later. The current roster is updated first:
    // a subscriber that sees a gap takes it, and must find the newest.
    let flush = |a: &mut Authority| {
        let p = a.take_published();
        if p.is_empty() {
            return;
        }
        let r = a.roster();
        current.send_replace((r.serial(), Arc::new(r.to_bytes())));
        for d in p {
            s.count("deltas_published");
            let _ = deltas.send(d);
        }
    };
    let mut next_tick = Instant::now();
    let mut listed_at = 0;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Request::Enroll {
                req,
                client,
                observed,
                reply,
            }) => {
                let result =
                    a.enroll(&req, client, observed, unix_now())
                        .map(|e| Reply::Enrolled {
                            ca: a.ca().to_bytes(),
                            cert: e.cert.to_bytes(),
                            roster: a.roster().to_bytes(),
                        });
                flush(&mut a);
                let _ = reply.send(result);
            }
            Ok(Request::Subscribe {
                req,
                client,
                observed,
                reply,
            }) => {
                let result = a.member_for(&client).and_then(|node| {
                    let catchup = a.catch_up(req.serial, req.roster).map_err(|e| {
                        warn!("catch-up for {node}: {e}");
                        Refusal::Internal
                    })?;
                    let sub = Subscription {
                        node,
                        catchup,
                        serial: a.roster().serial(),
                        deltas: deltas.subscribe(),
                    };
                    if let Err(e) = a.report_endpoints(&node, req.endpoints, observed, unix_now()) {
                        warn!("endpoints of {node}: {e}");
                    }
                    Ok(sub)
                });
                // After the subscriber is registered: it gets these too.
                flush(&mut a);
                let _ = reply.send(result);
            }
            Ok(Request::Admin { op, reply }) => {
                let result = admin(&mut a, op, &state_dir, &s);
                flush(&mut a);
                let _ = reply.send(result.map_err(|e| format!("{e:#}")));
            }
            Ok(Request::Member { client, reply }) => {
                let _ = reply.send(a.member_for(&client).is_ok());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + Duration::from_secs(1);
            if let Err(e) = a.handle_timeout(unix_now()) {
                s.log
                    .warn("timeout", || format!("renewal/refresh failed: {e}"));
            }
            flush(&mut a);
            if a.roster().serial() != listed_at {
                listed_at = a.roster().serial();
                admit_nodes(&s, &a);
            }
        }
    }
}

fn node_json(n: &super::store::NodeRecord) -> Value {
    let cert = mesh_proto::cert::NodeCert::from_bytes(&n.cert).ok();
    json!({
        "name": n.name,
        "node_id": NodeId(n.node_id).to_string(),
        "addresses": n.addresses,
        "groups": n.groups,
        "attributes": n.attributes.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        "wg_endpoint": n.wg_endpoint,
        "keyd_endpoint": n.keyd_endpoint,
        "observed": n.observed_addr,
        "enrolled_at": n.enrolled_at,
        "token": n.token_id,
        "cert_not_after": cert.as_ref().map(|c| c.body().not_after),
        "cert_fingerprint": cert.as_ref().map(|c| c.fingerprint().to_hex()),
        "revoked_at": n.revoked_at,
    })
}

fn token_json(t: &super::store::TokenRecord, now: u64) -> Value {
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if now >= t.expires_at {
        "expired"
    } else if t.uses >= t.max_uses {
        "used"
    } else {
        "usable"
    };
    json!({
        "id": t.id,
        "state": state,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "uses": t.uses,
        "max_uses": t.max_uses,
        "groups": t.groups,
        "attributes": t.attributes.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        "name_pattern": t.name_pattern,
        "revoked_at": t.revoked_at,
    })
}

/// The policy in force with the roster that carries it.
fn policy_json(a: &Authority) -> Value {
    json!({
        "serial": a.roster().serial(),
        "policy": a.policy(),
        "rules": a.policy().map(|p| p.rules.len()),
        "bytes": a.roster().policy_bytes().map(<[u8]>::len),
    })
}

fn admin(a: &mut Authority, op: AdminOp, state_dir: &std::path::Path, s: &Shared) -> Result<Value> {
    let now = unix_now();
    Ok(match op {
        AdminOp::TokenCreate {
            lifetime_secs,
            uses,
            groups,
            attributes,
            name_pattern,
        } => {
            let (token, record) = a.create_token(
                TokenSpec {
                    lifetime: lifetime_secs,
                    uses,
                    groups,
                    attributes,
                    name_pattern,
                },
                now,
            )?;
            info!(id = %record.id, uses, "join token created");
            let mut v = token_json(&record, now);
            v["token"] = Value::String(token.encode().to_string());
            v
        }
        AdminOp::TokenList => Value::Array(a.tokens().map(|t| token_json(t, now)).collect()),
        AdminOp::TokenRevoke { id } => {
            let t = a.revoke_token(&id, now)?;
            info!(id = %t.id, "join token revoked");
            token_json(&t, now)
        }
        AdminOp::NodeList => Value::Array(a.nodes().map(node_json).collect()),
        AdminOp::NodeRevoke { node } => {
            let id = a.find_node(&node)?;
            a.revoke_node(&id, now)?;
            let n = a.nodes().find(|n| NodeId(n.node_id) == id).map(node_json);
            n.unwrap_or(Value::Null)
        }
        AdminOp::NodeRename { node, name } => {
            let id = a.find_node(&node)?;
            a.rename_node(&id, &name, now)?;
            let n = a.nodes().find(|n| NodeId(n.node_id) == id).map(node_json);
            n.unwrap_or(Value::Null)
        }
        AdminOp::AdoptKey { fingerprint } => {
            let key = keys::load_all(state_dir, a.ca())?
                .into_iter()
                .find(|k| k.cert.fingerprint().to_hex().starts_with(&fingerprint))
                .ok_or_else(|| {
                    anyhow!("no authority key {fingerprint} in {}", state_dir.display())
                })?;
            a.roll_to(key, now)?;
            json!({"signer": a.signer().fingerprint().to_hex(), "serial": a.roster().serial()})
        }
        AdminOp::PolicySet { policy } => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(policy.trim())
                .map_err(|e| anyhow!("the policy is not base64: {e}"))?;
            a.set_policy(Some(&bytes), now)?;
            policy_json(a)
        }
        AdminOp::PolicyClear => {
            a.set_policy(None, now)?;
            policy_json(a)
        }
        AdminOp::PolicyShow => policy_json(a),
        AdminOp::Status => {
            let counters = s
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .labels
                .clone();
            let (conns, handshakes) = s.admission().in_progress();
            let v = json!({
                "network": a.ca().body().network_id,
                "serial": a.roster().serial(),
                "roster_not_after": a.roster().not_after(),
                "members": a.roster().members().len(),
                "nodes": a.nodes().count(),
                "revoked_nodes": a.roster().revoked_nodes().len(),
                "policy_rules": a.policy().map(|p| p.rules.len()),
                "tokens": a.tokens().count(),
                "signer": a.signer().fingerprint().to_hex(),
                "signer_not_after": a.signer().body().not_after,
                "subscribers": s.subscribers.load(std::sync::atomic::Ordering::Relaxed),
                "connections": conns,
                "handshakes": handshakes,
                "counters": counters,
            });
            v
        }
    })
}

/// Gives admission slots back however the task ends.
struct Slots(Arc<Shared>, std::net::IpAddr, bool);

impl Slots {
    /// Takes a handshake slot: within the global cap (admission), at most
    /// [`HANDSHAKES_PER_SOURCE`] per source at once, and the second half of
    /// the cap only for addresses enrolled nodes were seen from: one host
    /// that knows the authority's key cannot hold every slot.
    fn take_handshake(&mut self, now: Instant) -> Result<()> {
        let s = &self.0;
        let mut per = s.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let mine = per.get(&self.1).copied().unwrap_or(0);
        if mine >= HANDSHAKES_PER_SOURCE {
            return Err(anyhow!(Busy("too_many_handshakes_from_source")));
        }
        let known = s
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&self.1);
        let mut admission = s.admission();
        if !known && admission.under_load() {
            return Err(anyhow!(Busy("handshakes_reserved_for_nodes")));
        }
        admission
            .handshake(self.1, now)
            .map_err(|r| anyhow!(Busy(r.label())))?;
        *per.entry(self.1).or_default() += 1;
        self.2 = true;
        Ok(())
    }

    fn handshake_done(&mut self) {
        if !std::mem::replace(&mut self.2, false) {
            return;
        }
        self.0.admission().handshake_done();
        let mut per = self.0.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.1);
            }
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.handshake_done();
        self.0.admission().connection_closed(self.1);
    }
}

/// Refused before any public-key work (its label is counted).
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
struct Busy(&'static str);

/// The key admission counts a source under: its IPv6 /64 (one host holds a
/// whole /64), or its IPv4 address.
fn source_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut b = v6.octets();
            b[8..].fill(0);
            std::net::IpAddr::V6(b.into())
        }
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

async fn connection(s: Arc<Shared>, incoming: quinn::Incoming, remote: SocketAddr) {
    let mut slots = Slots(s.clone(), source_key(remote.ip()), false);
    let result = async {
        let conn = tokio::time::timeout(HANDSHAKE_DEADLINE, incoming)
            .await
            .map_err(|_| anyhow!("QUIC handshake did not finish"))??;
        let (link, hello) = tokio::time::timeout(HANDSHAKE_DEADLINE, async {
            // A connection that does not say anything at once holds its
            // slot no longer than this.
            let stream = tokio::time::timeout(FIRST_FRAME_DEADLINE, conn.accept_bi())
                .await
                .map_err(|_| anyhow!(Busy("no_stream")))?
                .context("waiting for a stream")?;
            let mut stream = Framed::new(stream);
            // mac1 first: only a host that knows the authority's key (from
            // a token or a node's configuration) gets any public-key work;
            // under load it must also prove its address with a cookie.
            let mut replies = 0;
            let msg1 = loop {
                let sealed = tokio::time::timeout(FIRST_FRAME_DEADLINE, stream.read_required())
                    .await
                    .map_err(|_| anyhow!(Busy("no_first_message")))??;
                let under_load = s.admission().under_load();
                match s.gate(&sealed, remote, under_load) {
                    Verdict::Accept(msg1) => break msg1.to_vec(),
                    Verdict::CookieReply(reply) if replies == 0 => {
                        replies += 1;
                        stream.write(&reply).await?;
                    }
                    Verdict::CookieReply(_) => return Err(anyhow!(CookieError::BadReply)),
                    Verdict::Refuse(e) => return Err(anyhow!(e)),
                }
            };
            // The public-key work is bounded per source and in total.
            slots.take_handshake(Instant::now())?;
            let (hs, msg2) = ServerHandshake::accept(&s.network_id, &s.noise_key, &msg1)?;
            stream.write(&msg2).await?;
            // A real client answers at once; one that does not frees its
            // handshake slot soon.
            let msg3 = tokio::time::timeout(MSG3_DEADLINE, stream.read_required())
                .await
                .map_err(|_| anyhow!(Busy("no_msg3")))??;
            let (mut channel, client, hello) = hs.finish(&msg3)?;
            // Nodes send nothing after the hello: a small limit, so that an
            // enrolled node cannot make the authority buffer much.
            channel.set_max_message(MAX_FROM_NODE);
            let mut link = Link { stream, channel };
            let hello: Hello = match wire::decode(&hello) {
                Ok(h) => h,
                Err(e) => {
                    let _ = link
                        .send(&wire::encode(&Reply::Refused(Refusal::Malformed)))
                        .await;
                    return Err(anyhow!(e).context("the hello does not decode"));
                }
            };
            anyhow::Ok((link, (client, hello)))
        })
        .await
        .map_err(|_| anyhow!("the channel handshake did not finish in time"))??;
        slots.handshake_done();
        let (client, hello) = hello;
        match hello {
            Hello::Join(req) => enroll(&s, link, req, client, remote).await,
            Hello::Subscribe(req) => subscribe(&s, link, req, client, remote).await,
        }
    }
    .await;
    if let Err(e) = result {
        // A specific label where there is one (bad_mac1, decrypt, ...).
        let label = e
            .downcast_ref::<Busy>()
            .map(|b| b.0)
            .or_else(|| e.downcast_ref::<CookieError>().map(CookieError::label))
            .or_else(|| {
                e.downcast_ref::<mesh_proto::channel::ChannelError>()
                    .map(|c| c.label())
            })
            .unwrap_or("connection_failed");
        s.count(label);
        s.log.warn(label, || {
            format!(
                "connection from {remote}: {}",
                text::error(&format!("{e:#}"))
            )
        });
    }
}

async fn enroll(
    s: &Shared,
    mut link: Link,
    req: JoinRequest,
    client: NoisePublicKey,
    remote: SocketAddr,
) -> Result<()> {
    let name = text::name(&req.name);
    let reply = s
        .ask(|reply| Request::Enroll {
            req: Box::new(req),
            client,
            observed: remote,
            reply,
        })
        .await
        .unwrap_or(Err(Refusal::Busy));
    match &reply {
        Ok(_) => s.count("enrolled"),
        Err(r) => {
            s.count(r.label());
            s.log.warn(r.label(), || {
                format!("enrollment of {name} from {remote} refused: {r}")
            });
        }
    }
    let msg = match reply {
        Ok(r) => r,
        Err(r) => Reply::Refused(r),
    };
    link.send(&wire::encode(&msg)).await?;
    last_word(&mut link).await;
    Ok(())
}

/// Ends the stream after the last message and waits (bounded) until the
/// node has it: returning at once would close the connection, and QUIC
/// drops what the peer has not acknowledged yet.
async fn last_word(link: &mut Link) {
    let _ = link.stream.send.finish();
    let _ = tokio::time::timeout(HANDSHAKE_DEADLINE, link.stream.send.stopped()).await;
}

/// Counts a live subscription for as long as it runs.
struct Live<'a>(&'a Shared);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0
            .subscribers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn subscribe(
    s: &Shared,
    mut link: Link,
    req: SubscribeRequest,
    client: NoisePublicKey,
    remote: SocketAddr,
) -> Result<()> {
    let sub = s
        .ask(|reply| Request::Subscribe {
            req,
            client,
            observed: remote,
            reply,
        })
        .await
        .unwrap_or(Err(Refusal::Busy));
    let mut sub = match sub {
        Ok(sub) => sub,
        Err(r) => {
            s.count(r.label());
            s.log.warn(r.label(), || {
                format!("subscription from {remote} refused: {r}")
            });
            link.send(&wire::encode(&Reply::Refused(r))).await?;
            last_word(&mut link).await;
            return Ok(());
        }
    };
    s.subscribers
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _live = Live(s);
    match std::mem::replace(&mut sub.catchup, Catchup::UpToDate) {
        Catchup::UpToDate => {}
        Catchup::Deltas(list) => {
            for d in list {
                link.send(&wire::encode(&Reply::Delta(d))).await?;
            }
        }
        Catchup::Snapshot(r) => link.send(&wire::encode(&Reply::Snapshot(r))).await?,
    }
    let mut sent = sub.serial;
    let node = sub.node;
    loop {
        let next = tokio::select! {
            d = sub.deltas.recv() => d,
            _ = tokio::time::sleep(KEEPALIVE) => {
                link.send(&wire::encode(&Reply::Keepalive)).await?;
                continue;
            }
            // The node hung up (or sent something it must not).
            r = link.receive() => {
                r?;
                return Ok(());
            }
        };
        match next {
            // Revoked: it gets the delta that says so (when in order) and
            // nothing more, whatever else it missed.
            Ok(p) if p.cut.contains(&node) => {
                if p.serial == sent + 1 {
                    link.send(&wire::encode(&Reply::Delta(p.delta.to_vec())))
                        .await?;
                }
                last_word(&mut link).await;
                return Ok(());
            }
            Ok(p) if p.serial <= sent => {}
            Ok(p) if p.serial == sent + 1 => {
                link.send(&wire::encode(&Reply::Delta(p.delta.to_vec())))
                    .await?;
                sent = p.serial;
            }
            // Lagged, or a gap: the current roster instead, to a node that
            // is still a member (it may have missed its own revocation).
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                let refusal = match s.ask(|reply| Request::Member { client, reply }).await {
                    Some(true) => None,
                    Some(false) => Some(Refusal::NodeRevoked),
                    // Queue full or stopping: not a verdict on the node.
                    None => Some(Refusal::Busy),
                };
                if let Some(r) = refusal {
                    link.send(&wire::encode(&Reply::Refused(r))).await?;
                    last_word(&mut link).await;
                    return Ok(());
                }
                let (serial, bytes) = s.current.borrow().clone();
                s.count("snapshots_after_lag");
                link.send(&wire::encode(&Reply::Snapshot(bytes.to_vec())))
                    .await?;
                sent = serial;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
