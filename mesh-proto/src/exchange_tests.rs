//! Exchange tests: no sockets, no sleeps; messages move between two state
//! machines by hand, so every path (refusal, tampering, timeout) is plain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::cert::tests::{DAY, T0, request, test_ca};
use crate::cert::{CaCert, NodeCert};
use crate::exchange::*;
use crate::identity::{CaSigningKey, NodeId, NoisePrivateKey, WgPrivateKey};
use crate::roster::{Member, Roster};
use crate::signed::Fingerprint;
use crate::trust::{DEFAULT_MAX_CLOCK_SKEW, Trust};
use crate::{ExchangeError, TrustError, kem};

struct Node {
    identity: Arc<LocalIdentity>,
}

fn node(ca: &CaCert, key: &CaSigningKey, name: &str, octet: u8) -> Node {
    let wg = WgPrivateKey::generate().unwrap();
    let noise = NoisePrivateKey::generate().unwrap();
    let mut r = request(name, &wg, &noise);
    r.addresses = vec![format!("10.99.0.{octet}/24").parse().unwrap()];
    let cert = ca.issue(key, r).unwrap();
    Node {
        identity: Arc::new(LocalIdentity {
            cert,
            noise_key: noise,
        }),
    }
}

fn member(n: &Node) -> Member {
    Member {
        cert: n.identity.cert.clone(),
        wg_endpoint: None,
        keyd_endpoint: None,
    }
}

struct World {
    key: CaSigningKey,
    ca: CaCert,
    a: Node,
    b: Node,
}

fn world() -> World {
    let (key, ca) = test_ca("net-a");
    let a = node(&ca, &key, "a", 1);
    let b = node(&ca, &key, "b", 2);
    World { key, ca, a, b }
}

fn params(w: &World, me: &Node, peer: Option<&Node>, revoked: Vec<Fingerprint>) -> ExchangeParams {
    let roster = Roster::build(
        &w.ca,
        &w.key,
        1,
        T0,
        T0 + DAY,
        vec![member(&w.a), member(&w.b)],
        revoked,
    )
    .unwrap();
    ExchangeParams {
        identity: me.identity.clone(),
        trust: Trust {
            ca: Arc::new(w.ca.clone()),
            roster: Arc::new(roster),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            local: me.identity.node_id(),
        },
        timeout: DEFAULT_TIMEOUT,
        last_epoch: 0,
        peer_epochs: PeerEpochs::default(),
        expected_peer: peer.map(|p| p.identity.node_id()),
        channel_binding: Vec::new(),
    }
}

/// Moves messages both ways until both sides are quiet; `tamper` may change
/// the n-th message (0-based) in flight. Returns both sides' events.
fn run(
    init: &mut Exchange,
    resp: &mut Exchange,
    now: Instant,
    mut tamper: impl FnMut(usize, &mut Vec<u8>),
) -> (Vec<Event>, Vec<Event>) {
    let mut n = 0;
    loop {
        let mut moved = false;
        while let Some(mut m) = init.poll_transmit() {
            tamper(n, &mut m);
            n += 1;
            resp.receive(&m, now);
            moved = true;
        }
        while let Some(mut m) = resp.poll_transmit() {
            tamper(n, &mut m);
            n += 1;
            init.receive(&m, now);
            moved = true;
        }
        if !moved {
            break;
        }
    }
    let drain = |x: &mut Exchange| std::iter::from_fn(|| x.poll_event()).collect::<Vec<_>>();
    (drain(init), drain(resp))
}

fn pair(w: &World, pi: ExchangeParams, pr: ExchangeParams) -> (Exchange, Exchange, Instant) {
    let now = Instant::now();
    let _ = w;
    let i = Exchange::initiate(pi, now, T0).unwrap();
    let r = Exchange::respond(pr, now, T0).unwrap();
    (i, r, now)
}

fn established(events: Vec<Event>) -> Box<Established> {
    match events.into_iter().next() {
        Some(Event::Established(e)) => e,
        other => panic!("expected Established, got {other:?}"),
    }
}

fn failed(events: &[Event]) -> Option<&ExchangeError> {
    events.iter().find_map(|e| match e {
        Event::Failed(err) => Some(err),
        Event::Established(_) => None,
    })
}

fn no_established(events: &[Event]) -> bool {
    !events.iter().any(|e| matches!(e, Event::Established(_)))
}

#[test]
fn both_sides_agree_on_peer_epoch_and_key() {
    let w = world();
    let (mut i, mut r, now) = pair(
        &w,
        params(&w, &w.a, Some(&w.b), vec![]),
        params(&w, &w.b, None, vec![]),
    );
    let (ei, er) = run(&mut i, &mut r, now, |_, _| {});
    let (ei, er) = (established(ei), established(er));
    assert_eq!(ei.psk, er.psk);
    assert_eq!((ei.epoch, er.epoch), (1, 1));
    assert_eq!(ei.peer.name(), "b");
    assert_eq!(er.peer.name(), "a");
    assert_eq!((ei.role, er.role), (Role::Initiator, Role::Responder));
    assert!(i.is_ended() && r.is_ended());
    assert_eq!(i.poll_timeout(), None);
}

#[test]
fn fresh_ephemerals_give_fresh_keys() {
    let w = world();
    let mut keys = Vec::new();
    for _ in 0..3 {
        let (mut i, mut r, now) = pair(
            &w,
            params(&w, &w.a, Some(&w.b), vec![]),
            params(&w, &w.b, None, vec![]),
        );
        let (ei, er) = run(&mut i, &mut r, now, |_, _| {});
        let (ei, er) = (established(ei), established(er));
        assert_eq!(ei.psk, er.psk);
        keys.push(ei.psk.clone());
    }
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[1], keys[2]);
    assert_ne!(keys[0], keys[2]);
}

/// Runs one honest exchange a -> b with the given epochs; both sides' results.
fn exchange_with(
    w: &World,
    initiator_last: u64,
    responder_last: u64,
    responder_peers: PeerEpochs,
) -> (Vec<Event>, Vec<Event>) {
    let mut pi = params(w, &w.a, Some(&w.b), vec![]);
    let mut pr = params(w, &w.b, None, vec![]);
    pi.last_epoch = initiator_last;
    pr.last_epoch = responder_last;
    pr.peer_epochs = responder_peers;
    let (mut i, mut r, now) = pair(w, pi, pr);
    run(&mut i, &mut r, now, |_, _| {})
}

fn epochs(entries: &[(&Node, u64)]) -> PeerEpochs {
    PeerEpochs::new(
        entries
            .iter()
            .map(|(n, e)| (n.identity.node_id(), *e))
            .collect(),
    )
}

#[test]
fn epoch_advances_past_both_sides() {
    let w = world();
    // Whichever side is ahead, both land on the same epoch and the same key:
    // the responder derives from the agreed epoch, not from its own.
    for (initiator_last, responder_last, agreed) in [(3, 7, 8), (9, 2, 10), (0, 0, 1)] {
        let (ei, er) = exchange_with(&w, initiator_last, responder_last, PeerEpochs::default());
        let (ei, er) = (established(ei), established(er));
        assert_eq!((ei.epoch, er.epoch), (agreed, agreed));
        assert_eq!(ei.psk, er.psk, "{initiator_last} {responder_last}");
    }
}

#[test]
fn responder_refuses_an_epoch_not_above_the_pairs_last() {
    let w = world();
    // The node-wide value in msg2 (3) lags this pair's last epoch (10), as
    // after a daemon bug or a lost write: the initiator offers 4, and the
    // responder still refuses to use epoch 4 with a again.
    let (ei, er) = exchange_with(&w, 0, 3, epochs(&[(&w.a, 10)]));
    assert!(no_established(&ei) && no_established(&er));
    assert_eq!(
        failed(&er),
        Some(&ExchangeError::StaleEpoch {
            offered: 4,
            last: 10
        })
    );
    assert_eq!(failed(&er).map(ExchangeError::label), Some("stale_epoch"));
    // Boundary: equal is refused, one above is accepted.
    let (_, er) = exchange_with(&w, 0, 3, epochs(&[(&w.a, 4)]));
    assert_eq!(
        failed(&er),
        Some(&ExchangeError::StaleEpoch {
            offered: 4,
            last: 4
        })
    );
    let (ei, er) = exchange_with(&w, 0, 3, epochs(&[(&w.a, 3)]));
    assert_eq!((established(ei).epoch, established(er).epoch), (4, 4));
}

#[test]
fn only_the_initiators_entry_counts_and_only_on_the_responder() {
    let w = world();
    // Another peer's high epoch does not hold back this pair.
    let (ei, er) = exchange_with(&w, 0, 0, epochs(&[(&w.b, 50)]));
    assert_eq!((established(ei).epoch, established(er).epoch), (1, 1));
    // The initiator ignores its own peer_epochs.
    let mut pi = params(&w, &w.a, Some(&w.b), vec![]);
    pi.peer_epochs = epochs(&[(&w.b, 50)]);
    let (mut i, mut r, now) = pair(&w, pi, params(&w, &w.b, None, vec![]));
    let (ei, _) = run(&mut i, &mut r, now, |_, _| {});
    assert_eq!(established(ei).epoch, 1);
    assert_eq!(PeerEpochs::default().get(&w.a.identity.node_id()), 0);
}

/// A peer that runs the handshake honestly but offers `epoch` in msg3,
/// whatever msg2 said: what a faulty or hostile initiator can send.
fn offer_epoch(w: &World, responder: &mut Exchange, epoch: u64, now: Instant) -> Vec<Event> {
    let p = params(w, &w.a, Some(&w.b), vec![]);
    let mut hs = build(&p, Role::Initiator).unwrap();
    responder.receive(&write(&mut hs, &[]).unwrap(), now);
    read(&mut hs, &responder.poll_transmit().unwrap()).unwrap();
    let hello = InitiatorHello {
        cert: w.a.identity.cert.to_bytes(),
        epoch,
    };
    responder.receive(&write(&mut hs, &encode(&hello)).unwrap(), now);
    std::iter::from_fn(|| responder.poll_event()).collect()
}

#[test]
fn responder_refuses_an_epoch_not_above_what_it_sent() {
    let w = world();
    let now = Instant::now();
    let responder = |last: u64| {
        let mut pr = params(&w, &w.b, None, vec![]);
        pr.last_epoch = last;
        Exchange::respond(pr, now, T0).unwrap()
    };
    for offered in [0, 4, 5] {
        let events = offer_epoch(&w, &mut responder(5), offered, now);
        assert!(no_established(&events));
        assert_eq!(
            failed(&events),
            Some(&ExchangeError::StaleEpoch { offered, last: 5 })
        );
    }
    let events = offer_epoch(&w, &mut responder(5), 6, now);
    assert_eq!(established(events).epoch, 6);
}

#[test]
fn an_expired_roster_refuses_every_peer() {
    let w = world();
    let roster = Roster::build(
        &w.ca,
        &w.key,
        2,
        T0 - 2 * DAY,
        T0 - DAY,
        vec![member(&w.a), member(&w.b)],
        vec![],
    )
    .unwrap();
    let mut pr = params(&w, &w.b, None, vec![]);
    pr.trust.roster = Arc::new(roster);
    let (_, er) = expect_refusal(&w, params(&w, &w.a, Some(&w.b), vec![]), pr);
    assert!(
        matches!(
            er,
            Some(ExchangeError::Trust(TrustError::RosterExpired {
                serial: 2,
                ..
            }))
        ),
        "{er:?}"
    );
}

#[test]
fn messages_have_the_expected_sizes() {
    let w = world();
    let (mut i, mut r, now) = pair(
        &w,
        params(&w, &w.a, Some(&w.b), vec![]),
        params(&w, &w.b, None, vec![]),
    );
    let mut sizes = Vec::new();
    run(&mut i, &mut r, now, |_, m| sizes.push(m.len()));
    // msg1: e (32) + ML-KEM public key (1568).
    assert_eq!(sizes[0], 32 + kem::PUBLIC_KEY_LEN);
    // msg2: e + encrypted KEM ciphertext + encrypted s + encrypted payload.
    assert!(sizes[1] > 32 + kem::CIPHERTEXT_LEN + 16 + 48, "{sizes:?}");
    assert_eq!(sizes.len(), 4, "msg1, msg2, msg3, confirmation");
}

fn expect_refusal(
    w: &World,
    pi: ExchangeParams,
    pr: ExchangeParams,
) -> (Option<ExchangeError>, Option<ExchangeError>) {
    let (mut i, mut r, now) = pair(w, pi, pr);
    let (ei, er) = run(&mut i, &mut r, now, |_, _| {});
    assert!(no_established(&ei) && no_established(&er), "{ei:?} {er:?}");
    (failed(&ei).cloned(), failed(&er).cloned())
}

#[test]
fn initiator_refuses_responder_from_another_ca() {
    let w = world();
    let (okey, other) = test_ca("net-a");
    let stranger = node(&other, &okey, "b", 2);
    let mut pr = params(&w, &stranger, None, vec![]);
    pr.trust.ca = Arc::new(other.clone());
    let (ei, _) = expect_refusal(&w, params(&w, &w.a, None, vec![]), pr);
    assert!(
        matches!(ei, Some(ExchangeError::Trust(TrustError::UnknownCa { .. }))),
        "{ei:?}"
    );
}

#[test]
fn responder_refuses_initiator_from_another_ca() {
    let w = world();
    let (okey, other) = test_ca("net-a");
    let stranger = node(&other, &okey, "a", 1);
    let mut pi = params(&w, &stranger, None, vec![]);
    // The stranger trusts our CA (so it accepts b) but holds a foreign cert.
    pi.trust.local = stranger.identity.node_id();
    let (_, er) = expect_refusal(&w, pi, params(&w, &w.b, None, vec![]));
    assert!(
        matches!(er, Some(ExchangeError::Trust(TrustError::UnknownCa { .. }))),
        "{er:?}"
    );
}

#[test]
fn revoked_peer_is_refused() {
    let w = world();
    let fp = w.a.identity.cert.fingerprint();
    let (_, er) = expect_refusal(
        &w,
        params(&w, &w.a, None, vec![]),
        params(&w, &w.b, None, vec![fp]),
    );
    assert!(
        matches!(er, Some(ExchangeError::Trust(TrustError::Revoked { .. }))),
        "{er:?}"
    );
}

#[test]
fn expired_peer_is_refused() {
    let w = world();
    let wg = WgPrivateKey::generate().unwrap();
    let noise = NoisePrivateKey::generate().unwrap();
    let mut r = request("old", &wg, &noise);
    r.not_before = T0 - DAY;
    r.not_after = T0 - 3600;
    r.addresses = vec!["10.99.0.9/24".parse().unwrap()];
    let old = Node {
        identity: Arc::new(LocalIdentity {
            cert: w.ca.issue(&w.key, r).unwrap(),
            noise_key: noise,
        }),
    };
    let roster = Roster::build(
        &w.ca,
        &w.key,
        1,
        T0,
        T0 + DAY,
        vec![member(&w.b), member(&old)],
        vec![],
    )
    .unwrap();
    let mut pr = params(&w, &w.b, None, vec![]);
    pr.trust.roster = Arc::new(roster);
    let mut pi = params(&w, &old, None, vec![]);
    pi.trust.local = old.identity.node_id();
    let (_, er) = expect_refusal(&w, pi, pr);
    assert!(
        matches!(er, Some(ExchangeError::Trust(TrustError::Expired { .. }))),
        "{er:?}"
    );
}

#[test]
fn peer_missing_from_roster_is_refused() {
    let w = world();
    let late = node(&w.ca, &w.key, "late", 3);
    let mut pi = params(&w, &late, None, vec![]);
    pi.trust.local = late.identity.node_id();
    let (_, er) = expect_refusal(&w, pi, params(&w, &w.b, None, vec![]));
    assert!(
        matches!(
            er,
            Some(ExchangeError::Trust(TrustError::NotInRoster { .. }))
        ),
        "{er:?}"
    );
}

#[test]
fn a_different_member_answering_is_refused() {
    let w = world();
    // a dials "someone else" but b answers.
    let mut pi = params(&w, &w.a, None, vec![]);
    pi.expected_peer = Some(NodeId([7; 16]));
    let (ei, _) = expect_refusal(&w, pi, params(&w, &w.b, None, vec![]));
    assert!(
        matches!(
            ei,
            Some(ExchangeError::Trust(TrustError::UnexpectedPeer { .. }))
        ),
        "{ei:?}"
    );
}

#[test]
fn another_network_fails_on_the_prologue() {
    let w = world();
    let (okey, other) = test_ca("net-b");
    let nb = node(&other, &okey, "b", 2);
    let mut pr = params(&w, &nb, None, vec![]);
    pr.trust.ca = Arc::new(other);
    let (ei, _) = expect_refusal(&w, params(&w, &w.a, None, vec![]), pr);
    assert!(matches!(ei, Some(ExchangeError::Noise(_))), "{ei:?}");
}

/// An exchange relayed between two different channels (a machine in the
/// middle terminating QUIC or TLS on both sides) sees two different
/// bindings and fails; the same binding on both sides succeeds.
#[test]
fn exchanges_bound_to_different_channels_fail() {
    let w = world();
    let bound = |who, peer, binding: &[u8]| {
        let mut p = params(&w, who, peer, vec![]);
        p.channel_binding = binding.to_vec();
        p
    };
    let (ei, _) = expect_refusal(&w, bound(&w.a, None, &[1; 32]), bound(&w.b, None, &[2; 32]));
    assert!(matches!(ei, Some(ExchangeError::Noise(_))), "{ei:?}");
    let (ei, _) = expect_refusal(&w, bound(&w.a, None, &[1; 32]), bound(&w.b, None, &[]));
    assert!(matches!(ei, Some(ExchangeError::Noise(_))), "{ei:?}");
    let (mut i, mut r, now) = pair(
        &w,
        bound(&w.a, Some(&w.b), &[3; 32]),
        bound(&w.b, None, &[3; 32]),
    );
    let (ei, er) = run(&mut i, &mut r, now, |_, _| {});
    assert!(
        ei.iter().any(|e| matches!(e, Event::Established(_)))
            && er.iter().any(|e| matches!(e, Event::Established(_))),
        "{ei:?} {er:?}"
    );
}

#[test]
fn any_flipped_bit_in_any_message_fails_closed() {
    let w = world();
    for target in 0..4 {
        for bit in [0usize, 7, 100, 1000, 1599] {
            let (mut i, mut r, now) = pair(
                &w,
                params(&w, &w.a, Some(&w.b), vec![]),
                params(&w, &w.b, None, vec![]),
            );
            let (ei, er) = run(&mut i, &mut r, now, |n, m| {
                if n == target {
                    let pos = bit % m.len();
                    m[pos] ^= 1;
                }
            });
            // The side that receives the tampered message (or, for msg1, the
            // initiator at msg2) fails; nobody believes in a key.
            let receiver_established = if target % 2 == 0 { &er } else { &ei };
            assert!(
                no_established(receiver_established),
                "message {target} bit {bit}: {ei:?} {er:?}"
            );
            assert!(failed(&ei).is_some() || failed(&er).is_some());
        }
    }
}

#[test]
fn truncated_messages_fail() {
    let w = world();
    for target in 0..3 {
        let (mut i, mut r, now) = pair(
            &w,
            params(&w, &w.a, Some(&w.b), vec![]),
            params(&w, &w.b, None, vec![]),
        );
        let (ei, er) = run(&mut i, &mut r, now, |n, m| {
            if n == target {
                m.truncate(m.len() / 2);
            }
        });
        assert!(no_established(&ei) && no_established(&er));
        assert!(failed(&ei).is_some() || failed(&er).is_some());
    }
}

#[test]
fn reordered_and_replayed_messages_fail() {
    let w = world();
    let now = Instant::now();
    // Record a whole genuine exchange.
    let mut i = Exchange::initiate(params(&w, &w.a, Some(&w.b), vec![]), now, T0).unwrap();
    let mut r = Exchange::respond(params(&w, &w.b, None, vec![]), now, T0).unwrap();
    let msg1 = i.poll_transmit().unwrap();
    r.receive(&msg1, now);
    let msg2 = r.poll_transmit().unwrap();
    i.receive(&msg2, now);
    let msg3 = i.poll_transmit().unwrap();

    // Reordered: msg3 to a fresh responder before msg1.
    let mut fresh = Exchange::respond(params(&w, &w.b, None, vec![]), now, T0).unwrap();
    fresh.receive(&msg3, now);
    assert!(matches!(fresh.poll_event(), Some(Event::Failed(_))));

    // Replayed: the recorded initiator flight to a fresh responder. msg1 is
    // unauthenticated, so it gets an answer, but msg3 was made for another
    // responder ephemeral and must fail.
    let mut replay = Exchange::respond(params(&w, &w.b, None, vec![]), now, T0).unwrap();
    replay.receive(&msg1, now);
    assert!(replay.poll_transmit().is_some());
    replay.receive(&msg3, now);
    assert!(matches!(
        replay.poll_event(),
        Some(Event::Failed(ExchangeError::Noise(_)))
    ));

    // Replayed msg2 to the initiator that already used it.
    i.receive(&msg2, now);
    assert!(matches!(i.poll_event(), Some(Event::Failed(_))));
    // And nothing after the end is accepted or queued.
    i.receive(&msg2, now);
    assert!(i.poll_event().is_none());
}

#[test]
fn times_out_and_stays_ended() {
    let w = world();
    let now = Instant::now();
    let mut i = Exchange::initiate(params(&w, &w.a, Some(&w.b), vec![]), now, T0).unwrap();
    let deadline = i.poll_timeout().unwrap();
    assert_eq!(deadline, now + DEFAULT_TIMEOUT);
    i.handle_timeout(deadline - Duration::from_millis(1));
    assert!(i.poll_event().is_none());
    i.handle_timeout(deadline);
    assert!(matches!(
        i.poll_event(),
        Some(Event::Failed(ExchangeError::Timeout))
    ));
    assert_eq!(i.poll_timeout(), None);
    // A late answer does not resurrect it.
    let mut r = Exchange::respond(params(&w, &w.b, None, vec![]), now, T0).unwrap();
    r.receive(&i.poll_transmit().unwrap(), now);
    i.receive(&r.poll_transmit().unwrap(), now);
    assert!(i.poll_event().is_none());
}

/// snow's stock resolver (pqcrypto-kyber 0.8.1) on one side, ours (libcrux
/// ML-KEM-1024) on the other: the same Noise protocol on the wire.
fn raw_handshake(init_stock: bool) -> ([u8; 32], [u8; 32]) {
    let p: snow::params::NoiseParams = NOISE_PARAMS.parse().unwrap();
    let prologue = prologue("net-a");
    let resolver = |stock: bool| -> snow::resolvers::BoxedCryptoResolver {
        if stock {
            Box::new(snow::resolvers::DefaultResolver)
        } else {
            kem::resolver()
        }
    };
    let ki = NoisePrivateKey::generate().unwrap();
    let kr = NoisePrivateKey::generate().unwrap();
    let mut i = snow::Builder::with_resolver(p.clone(), resolver(init_stock))
        .local_private_key(ki.0.as_bytes())
        .unwrap()
        .prologue(&prologue)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut r = snow::Builder::with_resolver(p, resolver(!init_stock))
        .local_private_key(kr.0.as_bytes())
        .unwrap()
        .prologue(&prologue)
        .unwrap()
        .build_responder()
        .unwrap();
    let (mut buf, mut out) = (vec![0u8; 65535], vec![0u8; 65535]);
    let n = i.write_message(b"", &mut buf).unwrap();
    r.read_message(&buf[..n], &mut out).unwrap();
    let n = r.write_message(b"hi", &mut buf).unwrap();
    i.read_message(&buf[..n], &mut out).unwrap();
    let n = i.write_message(b"", &mut buf).unwrap();
    r.read_message(&buf[..n], &mut out).unwrap();
    let si = i.dangerously_get_raw_split();
    let sr = r.dangerously_get_raw_split();
    assert_eq!(si, sr, "both sides derive the same keys");
    si
}

#[test]
fn interoperates_with_snows_pqcrypto_kyber_both_ways() {
    // Initiator generates the KEM key and decapsulates; responder encapsulates.
    // Running both directions exercises each operation across implementations.
    for _ in 0..10 {
        raw_handshake(true);
        raw_handshake(false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_input_never_panics_or_establishes(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 1..4)
    ) {
        let w = world();
        let now = Instant::now();
        let mut r = Exchange::respond(params(&w, &w.b, None, vec![]), now, T0).unwrap();
        let mut i = Exchange::initiate(params(&w, &w.a, Some(&w.b), vec![]), now, T0).unwrap();
        for m in &msgs {
            r.receive(m, now);
            i.receive(m, now);
        }
        let all: Vec<Event> = std::iter::from_fn(|| r.poll_event())
            .chain(std::iter::from_fn(|| i.poll_event()))
            .collect();
        prop_assert!(no_established(&all));
    }
}

#[test]
fn cert_type_is_in_sync_with_payload_limits() {
    // A certificate with every field at its maximum still fits one message.
    let w = world();
    let wg = WgPrivateKey::generate().unwrap();
    let noise = NoisePrivateKey::generate().unwrap();
    let mut r = request(&"n".repeat(crate::cert::MAX_NAME_LEN), &wg, &noise);
    r.groups = (0..crate::cert::MAX_GROUPS)
        .map(|g| format!("{g:0>63}"))
        .collect();
    r.addresses = (0..crate::cert::MAX_ADDRESSES)
        .map(|a| format!("fd99::{a}/64").parse().unwrap())
        .collect();
    let big: NodeCert = w.ca.issue(&w.key, r).unwrap();
    assert!(big.to_bytes().len() < MAX_MESSAGE_LEN / 2);
}

#[test]
fn debug_shows_role_and_state_only() {
    let w = world();
    let now = Instant::now();
    let i = Exchange::initiate(params(&w, &w.a, Some(&w.b), vec![]), now, T0).unwrap();
    assert_eq!(
        format!("{i:?}"),
        "Exchange { role: Initiator, ended: false, .. }"
    );
}

#[test]
fn messages_over_the_noise_limit_are_refused_before_snow() {
    let w = world();
    let now = Instant::now();
    let fail = |len: usize| {
        let mut r = Exchange::respond(params(&w, &w.b, None, vec![]), now, T0).unwrap();
        r.receive(&vec![0u8; len], now);
        match r.poll_event() {
            Some(Event::Failed(e)) => e,
            other => panic!("{len}: {other:?}"),
        }
    };
    let ours = ExchangeError::Noise("message longer than 65535 bytes".into());
    assert_eq!(fail(MAX_MESSAGE_LEN + 1), ours);
    assert_eq!(fail(MAX_MESSAGE_LEN * 2), ours);
    // At the limit the message reaches snow: msg1 is unauthenticated, so it
    // parses, and the refusal is for its content, not its length.
    assert!(matches!(fail(MAX_MESSAGE_LEN), ExchangeError::Payload(_)));
}
