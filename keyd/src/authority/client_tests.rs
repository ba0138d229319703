//! The node's side against a malicious authority, in process over loopback
//! QUIC: the authority here holds the pinned Noise key (so the channel comes
//! up) but sends what it likes. Only complete, verified, in-order rosters
//! may reach the daemon (`out`); everything else ends the subscription with
//! an error that names it.

use std::net::SocketAddr;

use mesh_proto::RosterError;
use mesh_proto::cert::{AuthorityCert, NodeCertRequest};
use mesh_proto::channel::ServerHandshake;
use mesh_proto::delta::RosterChange;
use mesh_proto::identity::{CaSigningKey, WgPrivateKey};
use mesh_proto::roster::{Member, RosterContent, Signer};
use tokio::task::JoinHandle;

use super::super::token::{TokenId, TokenSecret};
use super::*;

const NETWORK: &str = "net-t";
/// Every wait in these tests is bounded by this.
const BOUND: Duration = Duration::from_secs(20);

fn now() -> u64 {
    crate::time::unix_now()
}

/// A network as an authority would hold it: root CA, one certified signing
/// key, and a node (whose keys the test plays) enrolled at serial 1.
struct Net {
    root: CaSigningKey,
    ca: CaCert,
    auth_key: CaSigningKey,
    auth: AuthorityCert,
    node_noise: NoisePrivateKey,
    node_wg: WgPrivateKey,
    node: Member,
    r1: Roster,
}

fn ca(network: &str) -> (CaSigningKey, CaCert) {
    let key = CaSigningKey::generate().unwrap();
    let t = now();
    let ca = CaCert::create(&key, "root", network, t - 3600, t + 365 * 86_400).unwrap();
    (key, ca)
}

fn certify(ca: &CaCert, root: &CaSigningKey) -> (CaSigningKey, AuthorityCert) {
    let key = CaSigningKey::generate().unwrap();
    let t = now();
    let cert = ca
        .certify_authority(root, "auth", key.verifying_key(), t - 3600, t + 90 * 86_400)
        .unwrap();
    (key, cert)
}

fn member(auth: &AuthorityCert, key: &CaSigningKey, name: &str, octet: u8) -> Member {
    member_with(
        auth,
        key,
        name,
        octet,
        &WgPrivateKey::generate().unwrap(),
        &NoisePrivateKey::generate().unwrap(),
    )
}

fn member_with(
    auth: &AuthorityCert,
    key: &CaSigningKey,
    name: &str,
    octet: u8,
    wg: &WgPrivateKey,
    noise: &NoisePrivateKey,
) -> Member {
    let t = now();
    let cert = auth
        .issue(
            key,
            NodeCertRequest {
                name: name.into(),
                addresses: vec![format!("10.88.0.{octet}/24").parse().unwrap()],
                groups: vec![],
                attributes: Default::default(),
                not_before: t - 60,
                not_after: t + 86_400,
                wg_public: wg.public_key(),
                noise_public: noise.public_key(),
            },
        )
        .unwrap();
    Member {
        cert,
        wg_endpoint: Some(format!("192.0.2.{octet}:51820").parse().unwrap()),
        keyd_endpoint: Some(format!("192.0.2.{octet}:51821").parse().unwrap()),
    }
}

impl Net {
    fn new() -> Self {
        let (root, ca) = ca(NETWORK);
        let (auth_key, auth) = certify(&ca, &root);
        let node_wg = WgPrivateKey::generate().unwrap();
        let node_noise = NoisePrivateKey::generate().unwrap();
        let node = member_with(&auth, &auth_key, "me", 1, &node_wg, &node_noise);
        let t = now();
        let r1 = Roster::sign(
            &ca,
            &Signer::Authority(&auth, &auth_key),
            &RosterContent {
                serial: 1,
                issued_at: t,
                not_after: t + 86_400,
                authorities: vec![auth.clone()],
                members: vec![node.clone()],
                ..RosterContent::default()
            },
        )
        .unwrap();
        Net {
            root,
            ca,
            auth_key,
            auth,
            node_noise,
            node_wg,
            node,
            r1,
        }
    }

    /// The next roster and its delta: a member `n<octet>` joins.
    fn join(&self, r: &Roster, octet: u8) -> (Roster, RosterDelta) {
        let change = RosterChange {
            upsert: vec![member(
                &self.auth,
                &self.auth_key,
                &format!("n{octet}"),
                octet,
            )],
            ..RosterChange::default()
        };
        let t = now();
        r.next(
            &self.ca,
            &Signer::Authority(&self.auth, &self.auth_key),
            &change,
            t,
            t + 86_400,
        )
        .unwrap()
    }

    fn follow(&self, to: SocketAddr, key: NoisePublicKey, held: &Roster) -> Follow {
        Follow {
            to: AuthorityAddr {
                network_id: NETWORK.into(),
                endpoints: vec![to],
                key,
            },
            ca: Arc::new(self.ca.clone()),
            noise: self.node_noise.clone(),
            me: self.node.cert.body().node_id,
            report: Endpoints::default(),
            held: Arc::new(held.clone()),
            log: SharedLogLimiter::default(),
            status: SharedLinkStatus::default(),
            max_clock_skew: 300,
        }
    }
}

/// A malicious authority: for each connection in turn, completes the
/// channel handshake, reports the hello it got, sends that connection's
/// script, then ends its stream and waits for the node to hang up.
struct Evil {
    addr: SocketAddr,
    key: NoisePublicKey,
    hellos: mpsc::UnboundedReceiver<Hello>,
    task: JoinHandle<Result<()>>,
}

impl Drop for Evil {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn evil(scripts: Vec<Vec<Reply>>) -> Evil {
    let noise = NoisePrivateKey::generate().unwrap();
    let key = noise.public_key();
    let endpoint = link::server_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, hellos) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        for script in scripts {
            let incoming = endpoint
                .accept()
                .await
                .ok_or_else(|| anyhow!("endpoint closed"))?;
            let conn = incoming.await?;
            let mut stream = Framed::new(conn.accept_bi().await?);
            // The node seals msg1 with mac1/mac2; this authority does not
            // bother checking them.
            let sealed = stream.read_required().await?;
            let msg1 = &sealed[..sealed
                .len()
                .saturating_sub(mesh_proto::cookie::SEALED_OVERHEAD)];
            let (hs, msg2) = ServerHandshake::accept(NETWORK, &noise, msg1)?;
            stream.write(&msg2).await?;
            let msg3 = stream.read_required().await?;
            let (channel, _client, hello) = hs.finish(&msg3)?;
            let _ = tx.send(wire::decode::<Hello>(&hello)?);
            let mut link = Link { stream, channel };
            for reply in script {
                link.send(&wire::encode(&reply)).await?;
            }
            let _ = link.stream.send.finish();
            // The node hangs up once it has read (or refused) everything.
            let _ = tokio::time::timeout(BOUND, link.receive()).await;
        }
        Ok(())
    });
    Evil {
        addr,
        key,
        hellos,
        task,
    }
}

/// One subscription against `script`, the node holding `held`: the rosters
/// that reached the daemon, and how the subscription ended.
async fn subscribe_once(
    net: &Net,
    held: &Roster,
    script: Vec<Reply>,
) -> (Vec<Arc<Roster>>, String) {
    let server = evil(vec![script]);
    let quic = link::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut f = net.follow(server.addr, server.key, held);
    let (out, mut rx) = mpsc::channel(16);
    let result = tokio::time::timeout(BOUND, subscription(&quic, &mut f, &out, false))
        .await
        .expect("the subscription ends");
    let err = match result {
        Ok(()) => panic!("a subscription only ends with an error while `out` is open"),
        Err(e) => e,
    };
    let mut got = Vec::new();
    while let Ok(r) = rx.try_recv() {
        got.push(r);
    }
    // What the node holds afterwards is the last roster it passed on.
    let last = got.last().map_or(held.serial(), |r| r.serial());
    assert_eq!(f.held.serial(), last, "held roster = last roster passed on");
    (
        got,
        roster_error(&err).unwrap_or_else(|| format!("{err:#}")),
    )
}

/// The roster error behind `e`, as its variant's debug text.
fn roster_error(e: &anyhow::Error) -> Option<String> {
    e.downcast_ref::<RosterError>().map(|r| format!("{r:?}"))
}

fn serials(rs: &[Arc<Roster>]) -> Vec<u64> {
    rs.iter().map(|r| r.serial()).collect()
}

#[tokio::test]
async fn a_correct_delta_then_a_correct_snapshot_are_applied() {
    let net = Net::new();
    let (r2, d2) = net.join(&net.r1, 2);
    let (r3, _) = net.join(&r2, 3);
    let (r4, _) = net.join(&r3, 4);
    let script = vec![
        Reply::Keepalive,
        Reply::Delta(d2.to_bytes()),
        // Behind by two: the whole roster.
        Reply::Snapshot(r4.to_bytes()),
        // The same roster again is no change, not an error.
        Reply::Snapshot(r4.to_bytes()),
    ];
    let (got, end) = subscribe_once(&net, &net.r1, script).await;
    assert_eq!(serials(&got), vec![2, 4]);
    assert_eq!(got[0].to_bytes(), r2.to_bytes(), "the delta reproduces r2");
    assert_eq!(got[1].fingerprint(), r4.fingerprint());
    assert!(end.contains("closed the connection"), "{end}");
}

#[tokio::test]
async fn a_replayed_delta_is_refused() {
    let net = Net::new();
    let (_, d2) = net.join(&net.r1, 2);
    let script = vec![Reply::Delta(d2.to_bytes()), Reply::Delta(d2.to_bytes())];
    let (got, end) = subscribe_once(&net, &net.r1, script).await;
    assert_eq!(serials(&got), vec![2], "applied once, not twice");
    assert!(end.starts_with("DeltaGap { current: 2, from: 1 }"), "{end}");
}

#[tokio::test]
async fn a_delta_with_a_gap_is_refused() {
    let net = Net::new();
    let (r2, _) = net.join(&net.r1, 2);
    let (_, d3) = net.join(&r2, 3);
    let (got, end) = subscribe_once(&net, &net.r1, vec![Reply::Delta(d3.to_bytes())]).await;
    assert!(got.is_empty(), "nothing applied: {:?}", serials(&got));
    assert!(end.starts_with("DeltaGap { current: 1, from: 2 }"), "{end}");
}

#[tokio::test]
async fn an_altered_delta_is_refused() {
    let net = Net::new();
    let (_, d2) = net.join(&net.r1, 2);
    let good = d2.to_bytes();
    // The signature's last byte, and one in the new member's certificate
    // (the middle of the body): neither yields a roster that verifies.
    for at in [good.len() - 1, good.len() / 2] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        let (got, end) = subscribe_once(&net, &net.r1, vec![Reply::Delta(bad)]).await;
        assert!(got.is_empty(), "byte {at}: applied {:?}", serials(&got));
        assert!(
            !end.contains("closed the connection"),
            "byte {at}: refused on the delta itself, not at the end: {end}"
        );
    }
    // Exhaustively, without the network: no single altered byte applies.
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x80;
        let applied = RosterDelta::from_bytes(&bad).and_then(|d| net.r1.apply(&d, &net.ca));
        assert!(applied.is_err(), "byte {at} altered and still applied");
    }
}

/// A delta whose signature was made by another key (one the root even
/// certified, but that the roster does not list) over the same bytes.
#[tokio::test]
async fn a_delta_with_a_forged_signature_is_refused() {
    let net = Net::new();
    let (_, d2) = net.join(&net.r1, 2);
    let mut forged = d2.to_bytes();
    // The encoding ends with the signature: length 64, then its bytes.
    let n = forged.len();
    assert_eq!(forged[n - 65], 64, "the signature is the last 64 bytes");
    let (rogue_key, _) = certify(&net.ca, &net.root);
    let signature = rogue_key.sign(&forged[..n - 65]);
    forged[n - 64..].copy_from_slice(&signature);
    let (got, end) = subscribe_once(&net, &net.r1, vec![Reply::Delta(forged)]).await;
    assert!(got.is_empty(), "forged update applied: {:?}", serials(&got));
    assert!(end.starts_with("BadSignature"), "{end}");
}

#[tokio::test]
async fn an_older_snapshot_is_refused_as_a_rollback() {
    let net = Net::new();
    let (r2, _) = net.join(&net.r1, 2);
    let (r3, _) = net.join(&r2, 3);
    let (got, end) = subscribe_once(&net, &r3, vec![Reply::Snapshot(r2.to_bytes())]).await;
    assert!(got.is_empty(), "rolled back to {:?}", serials(&got));
    assert!(
        end.starts_with("Rollback { current: 3, offered: 2 }"),
        "{end}"
    );
}

#[tokio::test]
async fn a_snapshot_signed_by_another_ca_is_refused() {
    let net = Net::new();
    // Same network name, another root: a forger's roster with a high serial.
    let (other_root, other_ca) = ca(NETWORK);
    let (k, a) = certify(&other_ca, &other_root);
    let t = now();
    let forged = Roster::sign(
        &other_ca,
        &Signer::Authority(&a, &k),
        &RosterContent {
            serial: 99,
            issued_at: t,
            not_after: t + 86_400,
            authorities: vec![a.clone()],
            members: vec![member(&a, &k, "me", 1)],
            ..RosterContent::default()
        },
    )
    .unwrap();
    let (got, end) = subscribe_once(&net, &net.r1, vec![Reply::Snapshot(forged.to_bytes())]).await;
    assert!(
        got.is_empty(),
        "forged snapshot applied: {:?}",
        serials(&got)
    );
    assert!(end.starts_with("WrongIssuer"), "{end}");
}

/// Through `follow`: a gap ends the subscription, the error is logged, and
/// the node reconnects asking for the whole roster (serial 0), which it
/// then applies.
#[tokio::test]
async fn after_a_gap_follow_reconnects_and_asks_for_a_snapshot() {
    let net = Net::new();
    let (r2, _) = net.join(&net.r1, 2);
    let (r3, d3) = net.join(&r2, 3);
    let mut server = evil(vec![
        vec![Reply::Delta(d3.to_bytes())],
        vec![Reply::Snapshot(r3.to_bytes())],
    ]);
    let f = net.follow(server.addr, server.key, &net.r1);
    let (out, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(f, out));
    let got = tokio::time::timeout(BOUND, rx.recv())
        .await
        .expect("a roster within the bound")
        .expect("follow keeps running");
    assert_eq!(got.serial(), 3, "the gap was not applied; the snapshot was");
    let first = server.hellos.recv().await.unwrap();
    let second = server.hellos.recv().await.unwrap();
    task.abort();
    match (first, second) {
        (Hello::Subscribe(a), Hello::Subscribe(b)) => {
            assert_eq!((a.serial, a.roster), (1, Some(net.r1.fingerprint())));
            assert_eq!(
                (b.serial, b.roster),
                (0, None),
                "a fresh start after the gap"
            );
        }
        other => panic!("unexpected hellos: {other:?}"),
    }
}

fn token_for(net: &Net, server: &Evil) -> JoinToken {
    JoinToken {
        network_id: NETWORK.into(),
        ca_fingerprint: net.ca.fingerprint(),
        authority_key: server.key,
        endpoints: vec![server.addr],
        id: TokenId([7; 8]),
        secret: TokenSecret([9; 32]),
    }
}

#[tokio::test]
async fn join_refuses_a_ca_other_than_the_tokens() {
    let net = Net::new();
    // A consistent enrollment, but under another root than the token names.
    let (other_root, other_ca) = ca(NETWORK);
    let (k, a) = certify(&other_ca, &other_root);
    let cert = member_with(&a, &k, "me", 1, &net.node_wg, &net.node_noise);
    let t = now();
    let roster = Roster::sign(
        &other_ca,
        &Signer::Authority(&a, &k),
        &RosterContent {
            serial: 1,
            issued_at: t,
            not_after: t + 86_400,
            authorities: vec![a.clone()],
            members: vec![cert.clone()],
            ..RosterContent::default()
        },
    )
    .unwrap();
    let mut server = evil(vec![vec![Reply::Enrolled {
        ca: other_ca.to_bytes(),
        cert: cert.cert.to_bytes(),
        roster: roster.to_bytes(),
    }]]);
    let token = token_for(&net, &server);
    let result = tokio::time::timeout(
        BOUND,
        join(
            &token,
            "me",
            net.node_wg.public_key(),
            &net.node_noise,
            Endpoints::default(),
        ),
    )
    .await
    .expect("join ends");
    let err = format!("{:#}", result.expect_err("another CA is refused"));
    assert!(
        err.contains(&format!("but the token names CA {}", net.ca.fingerprint())),
        "{err}"
    );
    // The request did reach the (malicious) authority: the check is the node's.
    match server.hellos.recv().await {
        Some(Hello::Join(j)) => assert_eq!(j.token_id, token.id),
        other => panic!("unexpected hello: {other:?}"),
    }
}

#[tokio::test]
async fn join_refuses_an_authority_without_the_pinned_key() {
    let net = Net::new();
    let server = evil(vec![vec![]]);
    let mut token = token_for(&net, &server);
    // The token pins another key than the one this authority holds.
    token.authority_key = NoisePrivateKey::generate().unwrap().public_key();
    let result = tokio::time::timeout(
        BOUND,
        join(
            &token,
            "me",
            net.node_wg.public_key(),
            &net.node_noise,
            Endpoints::default(),
        ),
    )
    .await
    .expect("join ends");
    assert!(
        result.is_err(),
        "joined an authority it cannot authenticate"
    );
}

/// Through `follow`: when the authority ends the subscription, the status
/// says so (not subscribed, one failure, the reason) rather than showing
/// the link up until keyd restarts.
#[tokio::test]
async fn a_subscription_that_ends_is_shown_down_and_counted() {
    let net = Net::new();
    let (r2, _) = net.join(&net.r1, 2);
    // One connection: a snapshot, then the authority closes its stream and
    // answers no more connections.
    let server = evil(vec![vec![Reply::Snapshot(r2.to_bytes())]]);
    let f = net.follow(server.addr, server.key, &net.r1);
    let status = f.status.clone();
    let (out, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(f, out));
    let got = tokio::time::timeout(BOUND, rx.recv())
        .await
        .expect("a roster within the bound")
        .expect("follow keeps running");
    assert_eq!(got.serial(), 2);
    let seen = tokio::time::timeout(BOUND, async {
        loop {
            let s = status.lock().unwrap().clone();
            if s.failures > 0 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the end is recorded within the bound");
    task.abort();
    assert!(!seen.subscribed, "{seen:?}");
    assert_eq!(seen.failures, 1, "{seen:?}");
    assert_eq!(seen.updates_by_snapshot, 1, "it was subscribed before");
    let error = seen.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("the authority closed the connection"),
        "{error}"
    );
}

#[test]
fn an_ended_subscription_is_recorded_down_with_its_reason_escaped() {
    let mut s = LinkStatus {
        subscribed: true,
        failures: 2,
        ..LinkStatus::default()
    };
    record_failure(&mut s, &anyhow!("evil\nline \u{1b}[31m"));
    assert!(!s.subscribed);
    assert_eq!(s.failures, 3);
    let error = s.last_error.unwrap();
    assert!(
        !error.contains('\n') && !error.contains('\u{1b}'),
        "{error}"
    );
    assert!(error.starts_with("evil"), "{error}");
}
