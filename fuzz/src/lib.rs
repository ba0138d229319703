//! Fixtures shared by the fuzz targets: a deterministic network (CA, two
//! nodes, a roster), exchange parameters, a Noise peer that sends arbitrary
//! payloads inside valid messages, and a signing oracle that lets the fuzzer
//! reach the code behind a CA signature.
//!
//! Everything is derived from fixed seeds, so a saved input replays the same
//! way on any machine (only Noise's ephemeral keys are random, and no target
//! depends on their value). Fixtures `expect` freely: they never depend on
//! fuzz input, and a broken fixture must stop the run at once.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use mesh_proto::UnixTime;
use mesh_proto::armor;
use mesh_proto::cert::{CaCert, NodeCertRequest};
use mesh_proto::exchange::{self, ExchangeParams, LocalIdentity, PeerEpochs};
use mesh_proto::identity::{
    CA_PRIVATE_LABEL, CaSigningKey, NoisePrivateKey, WgPrivateKey, X25519Secret,
};
use mesh_proto::kem;
use mesh_proto::roster::{Member, Roster};
use mesh_proto::trust::{DEFAULT_MAX_CLOCK_SKEW, Trust};
use serde::{Deserialize, Serialize};

/// The wall-clock time every target runs at: inside every validity window.
pub const T0: UnixTime = 1_800_000_000;
const DAY: u64 = 86_400;

/// Copies of mesh-proto's private signing domains. [`World`] checks at start
/// that re-signing a real roster and certificate with them gives the same
/// bytes, so a change in mesh-proto stops the run instead of silently
/// turning the signed-body modes into signature failures.
pub const ROSTER_DOMAIN: &[u8] = b"pqmesh roster v1\0";
pub const NODE_DOMAIN: &[u8] = b"pqmesh node certificate v1\0";

/// mesh-proto's signed envelope (`signed.rs`), mirrored.
#[derive(Serialize, Deserialize)]
struct Envelope {
    body: Vec<u8>,
    signature: Vec<u8>,
}

/// The exchange payloads (`exchange.rs`), mirrored for seeds and for the
/// fake peer's valid messages.
#[derive(Serialize, Deserialize)]
pub struct ResponderHello {
    pub cert: Vec<u8>,
    pub last_epoch: u64,
}

#[derive(Serialize, Deserialize)]
pub struct InitiatorHello {
    pub cert: Vec<u8>,
    pub epoch: u64,
}

pub struct Node {
    pub identity: Arc<LocalIdentity>,
}

pub struct World {
    pub key: CaSigningKey,
    pub ca: CaCert,
    /// `a` is the initiator in every exchange mode, `b` the responder.
    pub a: Node,
    pub b: Node,
    pub roster: Roster,
}

pub static WORLD: LazyLock<World> = LazyLock::new(World::new);

fn secret(seed: u8) -> X25519Secret {
    X25519Secret::from_bytes([seed; 32])
}

fn node(ca: &CaCert, key: &CaSigningKey, name: &str, octet: u8) -> Node {
    let wg = WgPrivateKey(secret(octet));
    let noise = NoisePrivateKey(secret(octet + 100));
    let req = NodeCertRequest {
        name: name.into(),
        addresses: vec![
            format!("10.99.0.{octet}/24").parse().expect("prefix"),
            format!("fd99::{octet}/64").parse().expect("prefix"),
        ],
        groups: vec!["web".into()],
        attributes: Default::default(),
        not_before: T0 - 60,
        not_after: T0 + 30 * DAY,
        wg_public: wg.public_key(),
        noise_public: noise.public_key(),
    };
    let cert = ca.issue(key, req).expect("issue");
    Node {
        identity: Arc::new(LocalIdentity {
            cert,
            noise_key: noise,
        }),
    }
}

fn member(n: &Node, port: u16) -> Member {
    Member {
        cert: n.identity.cert.clone(),
        wg_endpoint: Some(([192, 0, 2, 1], port).into()),
        keyd_endpoint: None,
    }
}

impl World {
    fn new() -> Self {
        let key =
            CaSigningKey::from_text(&armor::encode(CA_PRIVATE_LABEL, &[7; 32])).expect("CA key");
        let ca = CaCert::create(&key, "fuzz-ca", "net-fuzz", T0 - DAY, T0 + 365 * DAY).expect("CA");
        let a = node(&ca, &key, "a", 1);
        let b = node(&ca, &key, "b", 2);
        let roster = Roster::build(
            &ca,
            &key,
            1,
            T0,
            T0 + 7 * DAY,
            vec![member(&a, 51820), member(&b, 51821)],
            vec![],
        )
        .expect("roster");
        let w = Self {
            key,
            ca,
            a,
            b,
            roster,
        };
        for (domain, signed) in [
            (ROSTER_DOMAIN, w.roster.to_bytes()),
            (NODE_DOMAIN, w.a.identity.cert.to_bytes()),
        ] {
            let body = envelope_body(&signed).expect("envelope");
            assert_eq!(
                w.sign(domain, &body),
                signed,
                "fuzz/src/lib.rs's copy of mesh-proto's envelope or domains is stale"
            );
        }
        w
    }

    /// `body` in a signed envelope under this CA's key, as mesh-proto makes
    /// one: lets the fuzzer test what runs after the signature check.
    pub fn sign(&self, domain: &[u8], body: &[u8]) -> Vec<u8> {
        let signature = self.key.sign(&[domain, body].concat()).to_vec();
        postcard::to_stdvec(&Envelope {
            body: body.to_vec(),
            signature,
        })
        .expect("envelope")
    }

    pub fn trust(&self, me: &Node) -> Trust {
        Trust {
            ca: Arc::new(self.ca.clone()),
            roster: Arc::new(self.roster.clone()),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            local: me.identity.node_id(),
        }
    }

    /// What keyd gives an exchange: `a` dials `b`; `b` answers anyone listed.
    /// `peer_epoch` is `me`'s last epoch with the other node.
    pub fn params(
        &self,
        me: &Node,
        expected: Option<&Node>,
        last_epoch: u64,
        peer_epoch: u64,
    ) -> ExchangeParams {
        let other = if std::ptr::eq(me, &self.a) {
            &self.b
        } else {
            &self.a
        };
        ExchangeParams {
            identity: me.identity.clone(),
            trust: self.trust(me),
            timeout: Duration::from_secs(10),
            last_epoch,
            peer_epochs: PeerEpochs::new(BTreeMap::from([(other.identity.node_id(), peer_epoch)])),
            expected_peer: expected.map(|n| n.identity.node_id()),
            channel_binding: Vec::new(),
        }
    }

    /// A raw Noise handshake with `me`'s static key, as a peer that follows
    /// the protocol's cryptography but sends whatever payload it likes.
    pub fn noise(&self, me: &Node, initiator: bool) -> snow::HandshakeState {
        let params: snow::params::NoiseParams =
            exchange::NOISE_PARAMS.parse().expect("noise params");
        let prologue = exchange::prologue(&self.ca.body().network_id);
        let builder = snow::Builder::with_resolver(params, kem::resolver())
            .local_private_key(me.identity.noise_key.0.as_bytes())
            .expect("static key")
            .prologue(&prologue)
            .expect("prologue");
        if initiator {
            builder.build_initiator().expect("initiator")
        } else {
            builder.build_responder().expect("responder")
        }
    }
}

/// The body bytes of a signed envelope.
pub fn envelope_body(signed: &[u8]) -> Option<Vec<u8>> {
    postcard::from_bytes::<Envelope>(signed)
        .ok()
        .map(|e| e.body)
}

/// Writes one Noise handshake message; `None` if snow refuses (payload too
/// long for one message).
pub fn write(hs: &mut snow::HandshakeState, payload: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; exchange::MAX_MESSAGE_LEN];
    let n = hs.write_message(payload, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// Reads one Noise handshake message that must be valid.
pub fn read(hs: &mut snow::HandshakeState, msg: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; exchange::MAX_MESSAGE_LEN];
    let n = hs.read_message(msg, &mut buf).expect("valid message");
    buf.truncate(n);
    buf
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encode")
}

/// Seed inputs for a target: valid messages and documents that the fuzzer
/// mutates from, so it starts past the first length and signature checks.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    use mesh_proto::exchange::Exchange;
    use mesh_proto::uapi;
    use std::time::Instant;

    let w = &*WORLD;
    let with_mode = |mode: u8, body: &[u8]| [&[mode][..], body].concat();
    match target {
        "gso_split" => {
            let mut out = Vec::new();
            for (v6, gso_type) in [(false, 1u8), (true, 4u8)] {
                let ip_len = if v6 { 40 } else { 20 };
                let mut p = vec![0u8; ip_len + 20 + 3000];
                p[0] = if v6 { 0x60 } else { 0x45 };
                p[if v6 { 6 } else { 9 }] = 6;
                p[ip_len + 12] = 5 << 4;
                p[ip_len + 13] = 0x18;
                let hdr = [
                    1,
                    gso_type,
                    (ip_len + 20) as u8,
                    0,
                    0xe8,
                    0x03,
                    ip_len as u8,
                    0,
                    16,
                    0,
                ];
                out.push([&hdr[..], &p].concat());
            }
            out
        }
        "uapi" => {
            let key = |b: u8| uapi::Key([b; 32]);
            let mut peer = uapi::PeerSet::new(key(2));
            peer.preshared_key = Some(key(3));
            peer.endpoint = Some("[fd00::1%2]:51820".parse().expect("addr"));
            peer.persistent_keepalive_interval = Some(25);
            peer.replace_allowed_ips = true;
            peer.allowed_ips = vec![
                "10.99.0.2/32".parse().expect("prefix"),
                "fd99::2/128".parse().expect("prefix"),
            ];
            let mut removed = uapi::PeerSet::new(key(4));
            removed.remove = true;
            let set = uapi::SetRequest {
                private_key: Some(key(1)),
                listen_port: Some(51820),
                fwmark: Some(7),
                replace_peers: true,
                peers: vec![peer, removed],
            };
            let info = uapi::DeviceInfo {
                private_key: Some(key(1)),
                listen_port: 51820,
                fwmark: Some(7),
                peers: vec![uapi::PeerInfo {
                    public_key: key(2),
                    preshared_key: Some(key(3)),
                    endpoint: Some("192.0.2.1:51820".parse().expect("addr")),
                    persistent_keepalive_interval: 25,
                    allowed_ips: vec!["10.99.0.2/32".parse().expect("prefix")],
                    rx_bytes: 1,
                    tx_bytes: 2,
                    last_handshake: Some((1_800_000_000, 5)),
                }],
            };
            vec![
                uapi::format_set_request(&set).into_bytes(),
                uapi::format_get_response(&info).into_bytes(),
                b"get=1\n\n".to_vec(),
                uapi::format_errno(uapi::EINVAL).into_bytes(),
            ]
        }
        "exchange" => {
            let now = Instant::now();
            // One real exchange between a and b, to capture each message.
            let mut i =
                Exchange::initiate(w.params(&w.a, Some(&w.b), 0, 0), now, T0).expect("initiator");
            let mut r = Exchange::respond(w.params(&w.b, None, 0, 0), now, T0).expect("responder");
            let msg1 = i.poll_transmit().expect("msg1");
            r.receive(&msg1, now);
            let msg2 = r.poll_transmit().expect("msg2");
            i.receive(&msg2, now);
            let msg3 = i.poll_transmit().expect("msg3");
            r.receive(&msg3, now);
            let conf = r.poll_transmit().expect("confirmation");
            let epochs = |a: u64, b: u64| [a.to_le_bytes(), b.to_le_bytes()].concat();
            let ident = encode(&InitiatorHello {
                cert: w.a.identity.cert.to_bytes(),
                epoch: 5,
            });
            let hello = encode(&ResponderHello {
                cert: w.b.identity.cert.to_bytes(),
                last_epoch: 3,
            });
            let framed: Vec<u8> = [&msg1, &msg2, &msg3, &conf]
                .iter()
                .flat_map(|m| {
                    let m = [&[0u8][..], m].concat();
                    [(m.len() as u16).to_be_bytes().to_vec(), m].concat()
                })
                .collect();
            vec![
                with_mode(0, &msg1),
                with_mode(1, &msg3),
                with_mode(2, &[epochs(1, 2), ident].concat()),
                with_mode(3, &msg2),
                with_mode(4, &[&1u64.to_le_bytes()[..], &hello].concat()),
                with_mode(5, &[epochs(2, 1), vec![3]].concat()),
                with_mode(6, &[epochs(0, 0), conf].concat()),
                with_mode(7, &[&[0u8][..], &framed].concat()),
                with_mode(7, &[&[1u8][..], &framed].concat()),
            ]
        }
        "cert" => {
            let cert = w.a.identity.cert.to_bytes();
            vec![
                with_mode(0, &cert),
                with_mode(0, &w.ca.to_bytes()),
                with_mode(1, &envelope_body(&cert).expect("envelope")),
                with_mode(2, w.a.identity.cert.to_text().as_bytes()),
                with_mode(2, w.ca.to_text().as_bytes()),
            ]
        }
        "delta" => {
            use mesh_proto::delta::RosterChange;
            use mesh_proto::roster::{RevokedNode, Signer};
            let b = w.b.identity.cert.body();
            let moved = RosterChange {
                upsert: vec![Member {
                    wg_endpoint: Some(([192, 0, 2, 9], 51820).into()),
                    ..member(&w.b, 51821)
                }],
                ..RosterChange::default()
            };
            let revoke = RosterChange {
                remove: vec![b.node_id],
                revoke_nodes: vec![RevokedNode {
                    node_id: b.node_id,
                    wg_public: b.wg_public,
                    noise_public: b.noise_public,
                }],
                ..RosterChange::default()
            };
            [moved, revoke]
                .iter()
                .map(|c| {
                    w.roster
                        .next(&w.ca, &Signer::Root(&w.key), c, T0 + 1, T0 + 7 * DAY)
                        .expect("delta")
                        .1
                        .to_bytes()
                })
                .collect()
        }
        "roster" => {
            let roster = w.roster.to_bytes();
            vec![
                with_mode(0, &roster),
                with_mode(1, &envelope_body(&roster).expect("envelope")),
                with_mode(2, w.roster.to_text().as_bytes()),
            ]
        }
        _ => Vec::new(),
    }
}

/// With `PQMESH_FUZZ_SEEDS=DIR` set, writes `target`'s seeds into DIR once
/// and exits: `scripts/fuzz --seeds` regenerates the committed seeds this way
/// through the fuzz build itself, without a second build of every crate.
pub fn write_seeds_if_asked(target: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(dir) = std::env::var_os("PQMESH_FUZZ_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (n, seed) in seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{n:02}")), seed).expect("seed file");
        }
        std::process::exit(0);
    });
}
