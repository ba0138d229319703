//! The mesh policy on simulated time: no sockets, no sleeps, no root. Each
//! test drives one `MeshPolicy` as keyd's driver would and checks the
//! actions it asks for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::cert::{CaCert, NodeCert, NodeCertRequest};
use mesh_proto::identity::{CaSigningKey, NodeId, NoisePrivateKey, WgPrivateKey, WgPublicKey};
use mesh_proto::roster::{Member, Roster};
use mesh_proto::schedule::{Psk, derive_psk};
use mesh_proto::signed::Fingerprint;
use mesh_proto::uapi;

use super::*;

const T0: u64 = 1_900_000_000;
const DAY: u64 = 86_400;
const SKEW: u64 = 5;

struct World {
    key: CaSigningKey,
    ca: CaCert,
    certs: Vec<NodeCert>,
    serial: u64,
}

impl World {
    /// `n` nodes valid for a day from T0, sorted by node id: node 0 dials
    /// every other node, node n-1 dials none.
    fn new(n: usize) -> Self {
        let key = CaSigningKey::generate().unwrap();
        let ca = CaCert::create(&key, "ca", "policy-test", T0 - DAY, T0 + 30 * DAY).unwrap();
        let mut w = World {
            key,
            ca,
            certs: Vec::new(),
            serial: 0,
        };
        for i in 0..n {
            let c = w.issue(&format!("node{i}"), i as u8 + 1, T0 + DAY);
            w.certs.push(c);
        }
        w.certs.sort_by_key(|c| c.body().node_id);
        w
    }

    fn issue(&self, name: &str, octet: u8, not_after: u64) -> NodeCert {
        self.ca
            .issue(
                &self.key,
                NodeCertRequest {
                    name: name.into(),
                    addresses: vec![format!("10.5.0.{octet}/24").parse().unwrap()],
                    groups: vec![],
                    attributes: Default::default(),
                    not_before: T0 - 60,
                    not_after,
                    wg_public: WgPrivateKey::generate().unwrap().public_key(),
                    noise_public: NoisePrivateKey::generate().unwrap().public_key(),
                },
            )
            .unwrap()
    }

    fn roster(&mut self, certs: &[&NodeCert], revoked: &[&NodeCert]) -> Arc<Roster> {
        self.roster_until(certs, revoked, T0 + 7 * DAY)
    }

    fn roster_until(
        &mut self,
        certs: &[&NodeCert],
        revoked: &[&NodeCert],
        not_after: u64,
    ) -> Arc<Roster> {
        self.serial += 1;
        let members = certs
            .iter()
            .map(|c| Member {
                cert: (*c).clone(),
                wg_endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                keyd_endpoint: Some("192.0.2.1:51821".parse().unwrap()),
            })
            .collect();
        let revoked: Vec<Fingerprint> = revoked.iter().map(|c| c.fingerprint()).collect();
        Arc::new(
            Roster::build(
                &self.ca,
                &self.key,
                self.serial,
                T0 - 10,
                not_after,
                members,
                revoked,
            )
            .unwrap(),
        )
    }

    fn all(&mut self) -> Arc<Roster> {
        let certs = self.certs.clone();
        self.roster(&certs.iter().collect::<Vec<_>>(), &[])
    }
}

fn config() -> PolicyConfig {
    PolicyConfig {
        rotation_interval: Duration::from_secs(10),
        hard_lifetime: Duration::from_secs(20),
        max_clock_skew: SKEW,
        listen_port: 51820,
        persistent_keepalive: None,
        max_dials_in_flight: 8,
    }
}

fn psk(n: u8) -> Psk {
    derive_psk(
        (&[n; 32], &[n; 32]),
        &[0; 32],
        u64::from(n),
        &NodeId([1; 16]),
        &NodeId([2; 16]),
    )
}

/// One policy and its simulated clocks.
struct Sim {
    policy: MeshPolicy,
    start: Instant,
    now: Now,
}

impl Sim {
    fn new(me: &NodeCert, roster: Arc<Roster>, records: BTreeMap<NodeId, PairRecord>) -> Self {
        let start = Instant::now();
        let now = Now {
            mono: start,
            unix: T0,
        };
        Self {
            policy: MeshPolicy::new(config(), me.clone(), roster, records, 7, now),
            start,
            now,
        }
    }

    /// Moves both clocks to `secs` after the start and handles timers.
    fn at(&mut self, secs: u64) {
        self.now = Now {
            mono: self.start + Duration::from_secs(secs),
            unix: T0 + secs,
        };
        self.policy.handle_timeout(self.now);
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.policy.poll_action()).collect()
    }

    fn events(&mut self) -> Vec<PolicyEvent> {
        std::iter::from_fn(|| self.policy.poll_event()).collect()
    }

    fn dials(&mut self) -> Vec<NodeId> {
        self.actions()
            .into_iter()
            .filter_map(|a| match a {
                Action::Dial(m) => Some(m.cert.body().node_id),
                _ => None,
            })
            .collect()
    }

    /// Feeds a data plane holding our key and `peers` (with their keys).
    fn observe(&mut self, peers: &[(WgPublicKey, Option<&Psk>)]) {
        self.observe_with_endpoint(peers, vec![], None);
    }

    /// The same, every peer with `allowed_ips` and `endpoint`.
    fn observe_with_endpoint(
        &mut self,
        peers: &[(WgPublicKey, Option<&Psk>)],
        allowed_ips: Vec<mesh_proto::prefix::IpPrefix>,
        endpoint: Option<std::net::SocketAddr>,
    ) {
        let view = DataPlaneView {
            interface_key_ok: true,
            listen_port: 51820,
            peers: peers
                .iter()
                .map(|(k, psk)| {
                    (
                        *k,
                        ViewPeer {
                            preshared_key: psk.map(|p| uapi::Key(*p.as_bytes())),
                            allowed_ips: allowed_ips.clone(),
                            persistent_keepalive: 0,
                            last_handshake: None,
                            endpoint,
                        },
                    )
                })
                .collect(),
        };
        self.policy.observed(view, self.now);
    }

    /// Performs every data-plane action successfully; returns them.
    fn perform(&mut self) -> Vec<Action> {
        let actions = self.actions();
        for a in &actions {
            self.policy.action_done(a, Ok(()), self.now);
        }
        actions
    }

    fn established(&mut self, peer: &NodeCert, epoch: u64, key: &Psk, role: Role) {
        self.policy
            .exchange_established(peer, epoch, key.clone(), role, self.now);
    }

    fn state(&self, peer: &NodeCert) -> PeerState {
        self.policy
            .peer_status(self.now)
            .into_iter()
            .find(|s| s.node_id == peer.body().node_id.to_string())
            .map(|s| s.state)
            .unwrap()
    }
}

fn installs(actions: &[Action]) -> Vec<WgPublicKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Install(i) => Some(i.public_key),
            _ => None,
        })
        .collect()
}

fn removals(actions: &[Action]) -> Vec<WgPublicKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(k) => Some(*k),
            _ => None,
        })
        .collect()
}

fn wg(c: &NodeCert) -> WgPublicKey {
    c.body().wg_public
}

#[test]
fn the_lower_node_id_dials_and_the_other_waits() {
    let mut w = World::new(3);
    let roster = w.all();
    let mut first = Sim::new(&w.certs[0], roster.clone(), BTreeMap::new());
    first.at(1);
    let mut dials = first.dials();
    dials.sort();
    assert_eq!(
        dials,
        vec![w.certs[1].body().node_id, w.certs[2].body().node_id]
    );
    let mut last = Sim::new(&w.certs[2], roster, BTreeMap::new());
    last.at(60);
    assert!(last.dials().is_empty(), "the highest node id dials no one");
}

#[test]
fn an_agreed_key_is_installed_then_rotated_with_jitter() {
    let mut w = World::new(2);
    let roster = w.all();
    let (me, peer) = (w.certs[0].clone(), w.certs[1].clone());
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.dials();
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    let actions = sim.actions();
    let install = actions
        .iter()
        .find_map(|a| match a {
            Action::Install(i) => Some(i.clone()),
            _ => None,
        })
        .expect("install");
    assert_eq!(install.public_key, wg(&peer));
    assert_eq!(install.preshared_key, psk(1));
    assert_eq!(install.allowed_ips, vec![peer.body().addresses[0].host()]);
    assert!(actions.iter().any(|a| matches!(a, Action::Persist)));
    assert_eq!(sim.state(&peer), PeerState::Up);
    assert_eq!(sim.policy.epoch_with(&peer.body().node_id), 1);
    // Not before 90 % of the interval, at the latest at 110 %.
    sim.at(8);
    assert!(sim.dials().is_empty());
    sim.at(11);
    assert_eq!(sim.dials(), vec![peer.body().node_id]);
}

/// Dials with `failure` five times; the waits before each next dial.
fn waits_after(failure: Failure) -> (Vec<u64>, PeerStatus) {
    let mut w = World::new(2);
    let roster = w.all();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    sim.at(1);
    assert_eq!(sim.dials().len(), 1);
    let mut t = 1;
    let mut waits = Vec::new();
    for _ in 0..5 {
        sim.policy
            .exchange_failed(Some(peer.body().node_id), failure, "failed", sim.now);
        let due = sim.policy.next_exchange(&peer.body().node_id).unwrap();
        let wait = due.duration_since(sim.now.mono).as_secs();
        waits.push(wait);
        t += wait;
        sim.at(t);
        assert_eq!(sim.dials().len(), 1, "dialled again after {wait}s");
    }
    let status = sim.policy.peer_status(sim.now).remove(0);
    (waits, status)
}

#[test]
fn failed_exchanges_back_off_up_to_half_an_interval() {
    let (waits, status) = waits_after(Failure::Exchange);
    assert_eq!(waits, vec![1, 2, 4, 5, 5]);
    assert_eq!((status.exchanges_failed, status.dials_unanswered), (5, 0));
}

/// A peer that is not listening yet (a mesh starting at once) is tried
/// again every second: nobody did any work, and it is reached as soon as it
/// listens. Counted apart from failed exchanges.
#[test]
fn an_unanswered_dial_is_tried_again_soon_and_counted_apart() {
    let (waits, status) = waits_after(Failure::NoAnswer);
    assert_eq!(waits, vec![1, 1, 1, 1, 1]);
    assert_eq!(
        (status.exchanges_failed, status.dials_unanswered),
        (0, 5),
        "a keyd that never answered is not a failed exchange"
    );
}

#[test]
fn a_failed_install_lengthens_the_wait_before_the_next_exchange() {
    let mut w = World::new(2);
    let roster = w.all();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    sim.observe(&[]);
    sim.perform();
    let mut previous = Duration::ZERO;
    for epoch in 1..=3 {
        sim.established(&peer, epoch, &psk(epoch as u8), Role::Initiator);
        let actions = sim.actions();
        for a in &actions {
            let result = match a {
                Action::Install(_) => Err("data plane refused".to_string()),
                _ => Ok(()),
            };
            sim.policy.action_done(a, result, sim.now);
        }
        let next_dial = sim
            .policy
            .next_exchange(&peer.body().node_id)
            .unwrap()
            .duration_since(sim.now.mono);
        assert!(next_dial >= Duration::from_secs(1));
        assert!(
            next_dial > previous || next_dial == Duration::from_secs(5),
            "epoch {epoch}: {next_dial:?} after {previous:?}"
        );
        previous = next_dial;
    }
    assert_eq!(sim.policy.counters().installs_failed, 3);
}

#[test]
fn a_revocation_during_the_exchange_is_not_installed() {
    let mut w = World::new(2);
    let roster = w.all();
    let (me, peer) = (w.certs[0].clone(), w.certs[1].clone());
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.dials();
    // The exchange is in flight when the revocation arrives.
    let revoked = w.roster(&[&me, &peer], &[&peer]);
    sim.policy.set_roster(revoked, sim.now);
    sim.actions();
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    assert!(installs(&sim.actions()).is_empty());
    assert!(
        sim.events()
            .iter()
            .any(|e| matches!(e, PolicyEvent::NotInstalled { .. }))
    );
    assert_eq!(sim.state(&peer), PeerState::Cut(CutReason::Revoked));
    // A data plane that somehow holds it is corrected at the next read.
    sim.observe(&[(wg(&peer), Some(&psk(1)))]);
    assert_eq!(removals(&sim.actions()), vec![wg(&peer)]);
}

#[test]
fn a_revocation_removes_an_installed_peer_at_once() {
    let mut w = World::new(2);
    let roster = w.all();
    let (me, peer) = (w.certs[0].clone(), w.certs[1].clone());
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    sim.perform();
    let revoked = w.roster(&[&me, &peer], &[&peer]);
    sim.policy.set_roster(revoked, sim.now);
    assert_eq!(removals(&sim.actions()), vec![wg(&peer)]);
    assert_eq!(sim.policy.counters().peers_cut_revoked_or_unlisted, 1);
}

#[test]
fn a_failed_removal_is_retried_until_the_peer_is_gone() {
    let mut w = World::new(2);
    let (me, peer) = (w.certs[0].clone(), w.certs[1].clone());
    let roster = w.roster(&[&me], &[]);
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    for t in 1..=3 {
        sim.observe(&[(wg(&peer), None)]);
        let actions = sim.actions();
        assert_eq!(removals(&actions), vec![wg(&peer)], "read {t}");
        for a in &actions {
            sim.policy
                .action_done(a, Err("socket gone".into()), sim.now);
        }
        sim.at(t);
        sim.actions();
    }
    assert_eq!(sim.policy.counters().removals_failed, 3);
    sim.observe(&[]);
    assert!(removals(&sim.actions()).is_empty());
}

#[test]
fn after_a_keyd_restart_a_peer_without_fresh_keys_is_cut_on_time() {
    let mut w = World::new(2);
    let roster = w.all();
    let (me, peer) = (w.certs[0].clone(), w.certs[1].clone());
    // The key was installed 25 s before this start (limit 10 + 20 = 30 s).
    let records = BTreeMap::from([(
        peer.body().node_id,
        PairRecord {
            epoch: 7,
            installed_at: Some(T0 - 25),
        },
    )]);
    let mut sim = Sim::new(&me, roster, records);
    sim.observe(&[(wg(&peer), Some(&psk(7)))]);
    assert!(
        removals(&sim.actions()).is_empty(),
        "tunnels survive a restart"
    );
    assert_eq!(sim.state(&peer), PeerState::Up);
    assert_eq!(sim.policy.epoch_with(&peer.body().node_id), 7);
    // Every exchange fails from now on.
    for t in 1..=4 {
        sim.policy.exchange_failed(
            Some(peer.body().node_id),
            Failure::Exchange,
            "dead",
            sim.now,
        );
        sim.at(t);
        sim.actions();
    }
    sim.at(5);
    assert_eq!(removals(&sim.perform()), vec![wg(&peer)]);
    assert_eq!(sim.state(&peer), PeerState::Cut(CutReason::HardLifetime));
    assert_eq!(
        sim.policy.counters().peers_cut_at_hard_lifetime,
        1,
        "counted once, not again when the removal is done"
    );
}

#[test]
fn after_a_restart_an_expired_peer_in_the_data_plane_is_removed_at_once() {
    let mut w = World::new(1);
    let me = w.certs[0].clone();
    let old = w.issue("old", 9, T0 - 30);
    let roster = w.roster(&[&me, &old], &[]);
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.observe(&[(wg(&old), None)]);
    assert_eq!(removals(&sim.actions()), vec![wg(&old)]);
    assert_eq!(
        sim.state(&old),
        PeerState::Cut(CutReason::CertificateExpired)
    );
}

#[test]
fn a_key_installed_a_moment_ago_is_not_cut() {
    let mut w = World::new(2);
    let roster = w.all();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    sim.perform();
    sim.at(29);
    sim.established(&peer, 2, &psk(2), Role::Initiator);
    sim.perform();
    sim.at(31);
    sim.observe(&[(wg(&peer), Some(&psk(2)))]);
    assert!(removals(&sim.actions()).is_empty());
    assert_eq!(sim.state(&peer), PeerState::Up);
    assert_eq!(sim.policy.counters().peers_cut_at_hard_lifetime, 0);
}

#[test]
fn a_restarted_data_plane_gets_its_key_and_peers_back() {
    let mut w = World::new(3);
    let roster = w.all();
    let me = w.certs[0].clone();
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&w.certs[1], 1, &psk(1), Role::Initiator);
    sim.established(&w.certs[2], 1, &psk(2), Role::Initiator);
    sim.perform();
    assert_eq!(
        sim.policy.counters().dataplane_restarts_healed,
        0,
        "a first start is no heal"
    );
    // mesh-node restarted: no private key, no peers.
    sim.policy.observed(DataPlaneView::default(), sim.now);
    let actions = sim.actions();
    assert!(matches!(actions[0], Action::ConfigureInterface));
    let mut got = installs(&actions);
    got.sort();
    let mut want = vec![wg(&w.certs[1]), wg(&w.certs[2])];
    want.sort();
    assert_eq!(got, want);
    // Said and counted once it is done, not while it fails.
    sim.policy
        .action_done(&actions[0], Err("refused".into()), sim.now);
    assert!(!sim.events().contains(&PolicyEvent::InterfaceRestored));
    assert_eq!(sim.policy.counters().dataplane_restarts_healed, 0);
    // The next read finds it still restarted; this time it works.
    sim.policy.observed(DataPlaneView::default(), sim.now);
    let actions = sim.actions();
    assert!(matches!(actions[0], Action::ConfigureInterface));
    // A 1 s keepalive makes the restarted side handshake at once ...
    for a in &actions {
        if let Action::Install(i) = a {
            assert_eq!(i.persistent_keepalive, Some(1));
        }
        sim.policy.action_done(a, Ok(()), sim.now);
    }
    assert!(sim.events().contains(&PolicyEvent::InterfaceRestored));
    assert_eq!(sim.policy.counters().dataplane_restarts_healed, 1);
    // ... and the configured one (none) is put back after KICK.
    sim.at(KICK.as_secs());
    let actions = sim.perform();
    let back: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Install(i) => Some(i.persistent_keepalive),
            _ => None,
        })
        .collect();
    assert_eq!(back, vec![None, None]);
    assert!(
        sim.policy.poll_timeout(sim.now) > sim.now.mono,
        "no timer left in the past"
    );
}

#[test]
fn a_changed_preshared_key_in_the_data_plane_is_put_back() {
    let mut w = World::new(2);
    let roster = w.all();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    sim.perform();
    sim.observe(&[(wg(&peer), Some(&psk(9)))]);
    let actions = sim.actions();
    assert_eq!(installs(&actions), vec![wg(&peer)]);
    match &actions[0] {
        Action::Install(i) => assert_eq!(i.preshared_key, psk(1)),
        other => panic!("{other:?}"),
    }
}

/// The edge ladder's relay endpoint reaches the data plane at once, is kept
/// by later installs and put back when the data plane holds another; back
/// on direct UDP the roster's endpoint is installed and roaming is left
/// alone.
#[test]
fn a_path_endpoint_is_installed_kept_and_dropped() {
    let mut w = World::new(2);
    let roster = w.all();
    let peer = w.certs[1].clone();
    let id = peer.body().node_id;
    let mut sim = Sim::new(&w.certs[0], roster.clone(), BTreeMap::new());
    let roster_endpoint = roster
        .members()
        .iter()
        .find(|m| m.cert.body().node_id == id)
        .unwrap()
        .wg_endpoint;
    sim.observe(&[]);
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    sim.perform();
    let relay: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let endpoint_of = |actions: &[Action]| {
        actions.iter().find_map(|a| match a {
            Action::Install(i) => Some(i.endpoint),
            _ => None,
        })
    };
    sim.policy.set_path_endpoint(id, Some(relay), sim.now);
    let actions = sim.perform();
    assert_eq!(endpoint_of(&actions), Some(Some(relay)));
    // The data plane roamed away from the relay: put back.
    let ips = vec![peer.body().addresses[0].host()];
    sim.observe_with_endpoint(&[(wg(&peer), Some(&psk(1)))], ips.clone(), roster_endpoint);
    assert_eq!(endpoint_of(&sim.perform()), Some(Some(relay)));
    // A rotation keeps the relay.
    sim.established(&peer, 2, &psk(2), Role::Initiator);
    assert_eq!(endpoint_of(&sim.perform()), Some(Some(relay)));
    // The same endpoint again changes nothing.
    sim.policy.set_path_endpoint(id, Some(relay), sim.now);
    assert_eq!(endpoint_of(&sim.perform()), None);
    // Back to direct: the roster's endpoint, and roaming is not undone.
    sim.policy.set_path_endpoint(id, None, sim.now);
    assert_eq!(endpoint_of(&sim.perform()), Some(roster_endpoint));
    // Roamed to the old relay (the peer still relaying): set straight, once;
    // if it roams there again the peer is relaying, and roaming follows it.
    sim.observe_with_endpoint(&[(wg(&peer), Some(&psk(2)))], ips.clone(), Some(relay));
    assert_eq!(endpoint_of(&sim.perform()), Some(roster_endpoint));
    sim.observe_with_endpoint(&[(wg(&peer), Some(&psk(2)))], ips.clone(), Some(relay));
    assert_eq!(endpoint_of(&sim.perform()), None);
    let roamed: std::net::SocketAddr = "192.0.2.77:51820".parse().unwrap();
    sim.observe_with_endpoint(&[(wg(&peer), Some(&psk(2)))], ips, Some(roamed));
    assert_eq!(endpoint_of(&sim.perform()), None);
}

#[test]
fn a_certificate_is_cut_when_it_expires_not_a_hard_lifetime_later() {
    let mut w = World::new(1);
    let me = w.certs[0].clone();
    let short = w.issue("short", 7, T0 + 100);
    let roster = w.roster(&[&me, &short], &[]);
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&short, 1, &psk(1), Role::Responder);
    sim.perform();
    // Keep the key fresh so only the certificate can end it.
    for t in (10..100).step_by(10) {
        sim.at(t);
        sim.established(&short, t / 10 + 1, &psk(t as u8), Role::Responder);
        sim.perform();
    }
    sim.at(100 + SKEW);
    assert_eq!(
        sim.state(&short),
        PeerState::Up,
        "valid up to not_after + skew"
    );
    let due = sim.policy.poll_timeout(sim.now);
    assert_eq!(due, sim.start + Duration::from_secs(100 + SKEW + 1));
    sim.at(100 + SKEW + 1);
    assert_eq!(removals(&sim.actions()), vec![wg(&short)]);
    assert_eq!(
        sim.state(&short),
        PeerState::Cut(CutReason::CertificateExpired)
    );
    assert_eq!(sim.policy.counters().peers_cut_at_certificate_expiry, 1);
}

#[test]
fn a_revoked_node_says_so_and_drops_its_peers() {
    let mut w = World::new(3);
    let roster = w.all();
    let me = w.certs[0].clone();
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&w.certs[1], 1, &psk(1), Role::Initiator);
    sim.established(&w.certs[2], 1, &psk(2), Role::Initiator);
    sim.perform();
    sim.events();
    let certs = w.certs.clone();
    let revoked = w.roster(&certs.iter().collect::<Vec<_>>(), &[&me]);
    sim.policy.set_roster(revoked, sim.now);
    let mut removed = removals(&sim.actions());
    removed.sort();
    let mut want = vec![wg(&certs[1]), wg(&certs[2])];
    want.sort();
    assert_eq!(removed, want);
    assert_eq!(sim.policy.local_state(), LocalState::Revoked);
    assert!(sim.events().contains(&PolicyEvent::LocalStateChanged {
        state: LocalState::Revoked
    }));
    sim.at(60);
    assert!(sim.dials().is_empty(), "a revoked node dials no one");
    assert!(
        sim.policy.poll_timeout(sim.now) > sim.now.mono,
        "no wake-up for dials it will not make (a busy loop)"
    );
    sim.established(&certs[1], 2, &psk(3), Role::Initiator);
    assert!(installs(&sim.actions()).is_empty());
}

#[test]
fn an_expired_roster_drops_every_peer() {
    let mut w = World::new(2);
    let certs = w.certs.clone();
    let roster = w.roster_until(&[&certs[0], &certs[1]], &[], T0 + 50);
    let mut sim = Sim::new(&certs[0], roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&certs[1], 1, &psk(1), Role::Initiator);
    sim.perform();
    for t in (10..=50 + SKEW).step_by(5) {
        sim.at(t);
        sim.established(&certs[1], t, &psk(t as u8), Role::Initiator);
        sim.perform();
    }
    assert_eq!(sim.policy.local_state(), LocalState::Member);
    sim.at(50 + SKEW + 1);
    assert_eq!(sim.policy.local_state(), LocalState::RosterExpired);
    assert_eq!(removals(&sim.actions()), vec![wg(&certs[1])]);
    sim.at(50 + SKEW + 20);
    sim.actions();
    assert!(
        sim.policy.poll_timeout(sim.now) > sim.now.mono,
        "an expired roster is no reason to wake up at once, again and again"
    );
}

#[test]
fn peers_keyd_does_not_know_are_removed() {
    let mut w = World::new(2);
    let roster = w.all();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    let stranger = WgPrivateKey::generate().unwrap().public_key();
    sim.observe(&[(stranger, None)]);
    assert_eq!(removals(&sim.actions()), vec![stranger]);
    assert_eq!(sim.policy.counters().unknown_peers_removed, 1);
}

#[test]
fn a_member_that_leaves_the_roster_is_removed() {
    let mut w = World::new(2);
    let roster = w.all();
    let (me, peer) = (w.certs[0].clone(), w.certs[1].clone());
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    sim.perform();
    let smaller = w.roster(&[&me], &[]);
    sim.policy.set_roster(smaller, sim.now);
    assert_eq!(removals(&sim.actions()), vec![wg(&peer)]);
    assert!(sim.policy.peer_status(sim.now).is_empty());
}

#[test]
fn epochs_survive_through_the_persisted_records() {
    let mut w = World::new(3);
    let roster = w.all();
    let me = w.certs[0].clone();
    let mut sim = Sim::new(&me, roster.clone(), BTreeMap::new());
    sim.established(&w.certs[1], 4, &psk(1), Role::Initiator);
    sim.established(&w.certs[2], 9, &psk(2), Role::Initiator);
    let records = sim.policy.persisted();
    assert_eq!(records.len(), 2);
    let again = Sim::new(&me, roster, records);
    let (max, per_peer) = again.policy.epochs();
    assert_eq!(max, 9);
    assert_eq!(per_peer[&w.certs[1].body().node_id], 4);
    assert_eq!(again.policy.epoch_with(&w.certs[2].body().node_id), 9);
}

#[test]
fn a_renewed_certificate_starts_a_new_key() {
    let mut w = World::new(2);
    let roster = w.all();
    let (me, peer) = (w.certs[0].clone(), w.certs[1].clone());
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.observe(&[]);
    sim.established(&peer, 1, &psk(1), Role::Initiator);
    sim.perform();
    sim.dials();
    // Same node, same keys, a new certificate (renewed).
    let renewed =
        w.ca.issue(
            &w.key,
            NodeCertRequest {
                name: peer.body().name.clone(),
                addresses: peer.body().addresses.clone(),
                groups: vec![],
                attributes: Default::default(),
                not_before: T0,
                not_after: T0 + 2 * DAY,
                wg_public: peer.body().wg_public,
                noise_public: peer.body().noise_public,
            },
        )
        .unwrap();
    let r = w.roster(&[&me, &renewed], &[]);
    sim.policy.set_roster(r, sim.now);
    assert!(
        removals(&sim.actions()).is_empty(),
        "the tunnel stays up across a renewal with the same keys"
    );
    // The old certificate's exchange result is refused; a new one is dialled.
    sim.at(1);
    assert_eq!(sim.dials(), vec![peer.body().node_id]);
    sim.established(&peer, 2, &psk(2), Role::Initiator);
    assert!(installs(&sim.actions()).is_empty());
    sim.established(&renewed, 3, &psk(3), Role::Initiator);
    assert_eq!(installs(&sim.actions()), vec![wg(&renewed)]);
}

#[test]
fn a_large_mesh_spreads_its_first_contacts_and_caps_dials_in_flight() {
    let mut w = World::new(40);
    let roster = w.all();
    let me = w.certs[0].clone();
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    let at_start = sim.dials().len();
    assert!(
        at_start < 8,
        "first contacts are spread, {at_start} at once"
    );
    // 39 peers, 20 ms each: all first contacts are due within 0.78 s, but
    // never more than 8 exchanges run at once.
    sim.at(1);
    let mut in_flight = at_start + sim.dials().len();
    assert_eq!(in_flight, 8, "the cap");
    let mut dialled = in_flight;
    while dialled < 39 {
        // One exchange ends: exactly one more starts.
        let done = w.certs[dialled - 7].clone();
        sim.established(&done, 1, &psk(1), Role::Initiator);
        in_flight -= 1;
        let due = sim.policy.poll_timeout(sim.now);
        assert_eq!(
            due, sim.now.mono,
            "a due dial runs as soon as there is room"
        );
        sim.policy.handle_timeout(sim.now);
        let started = sim.dials().len();
        assert_eq!(started, 1);
        in_flight += started;
        dialled += started;
    }
    assert_eq!(in_flight, 8);
}

#[test]
fn a_read_reported_failed_is_tried_again() {
    let mut w = World::new(2);
    let roster = w.all();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    for t in 1..=3 {
        let actions = sim.actions();
        let reads: Vec<_> = actions
            .iter()
            .filter(|a| matches!(a, Action::ReadDataPlane))
            .collect();
        assert_eq!(reads.len(), 1, "one read at {t}");
        // The driver skipped it: the data plane was unreachable.
        sim.policy
            .action_done(reads[0], Err("data plane unreachable".into()), sim.now);
        sim.at(t);
    }
    assert_eq!(sim.policy.counters().dataplane_reads_failed, 3);
}

#[test]
fn a_peer_whose_certificate_is_not_valid_yet_is_dialled_when_it_becomes_valid() {
    let mut w = World::new(1);
    let me = w.certs[0].clone();
    let later =
        w.ca.issue(
            &w.key,
            NodeCertRequest {
                name: "later".into(),
                addresses: vec!["10.5.0.9/24".parse().unwrap()],
                groups: vec![],
                attributes: Default::default(),
                not_before: T0 + 100,
                not_after: T0 + DAY,
                wg_public: WgPrivateKey::generate().unwrap().public_key(),
                noise_public: NoisePrivateKey::generate().unwrap().public_key(),
            },
        )
        .unwrap();
    let roster = w.roster(&[&me, &later], &[]);
    let mut sim = Sim::new(&me, roster, BTreeMap::new());
    sim.at(1);
    assert!(sim.dials().is_empty());
    assert_eq!(
        sim.state(&later),
        PeerState::Cut(CutReason::CertificateNotYetValid)
    );
    if me.body().node_id < later.body().node_id {
        assert_eq!(
            sim.policy.poll_timeout(sim.now),
            sim.start + Duration::from_secs(100 - SKEW),
            "woken when it becomes valid"
        );
        sim.at(100 - SKEW);
        assert_eq!(sim.dials(), vec![later.body().node_id]);
    }
}

/// The same node's keys and name in a new certificate (what the authority's
/// renewal does).
fn renewed(w: &World, c: &NodeCert, not_after: u64) -> NodeCert {
    let b = c.body();
    w.ca.issue(
        &w.key,
        NodeCertRequest {
            name: b.name.clone(),
            addresses: b.addresses.clone(),
            groups: b.groups.clone(),
            attributes: b.attributes.clone(),
            not_before: T0 - 60,
            not_after,
            wg_public: b.wg_public,
            noise_public: b.noise_public,
        },
    )
    .unwrap()
}

#[test]
fn a_renewed_certificate_in_the_roster_becomes_this_nodes_own() {
    let mut w = World::new(2);
    let me = w.certs[0].clone();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&me, w.all(), BTreeMap::new());
    sim.events();
    assert_eq!(sim.policy.local_state(), LocalState::Member);
    let new = renewed(&w, &me, T0 + 20 * DAY);
    let roster = w.roster(&[&new, &peer], &[]);
    sim.policy.set_roster(roster, sim.now);
    assert_eq!(sim.policy.my_cert(), &new);
    assert!(
        sim.events().iter().any(|e| matches!(
            e,
            PolicyEvent::CertificateRenewed { not_after } if *not_after == T0 + 20 * DAY
        )),
        "the driver is told, to write the file"
    );
    assert_eq!(sim.policy.local_state(), LocalState::Member);
    // Past the old certificate's end the node is still a member.
    sim.at(2 * DAY);
    assert_eq!(sim.policy.local_state(), LocalState::Member);
}

#[test]
fn a_revoked_certificate_for_this_node_is_not_adopted() {
    let mut w = World::new(2);
    let me = w.certs[0].clone();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&me, w.all(), BTreeMap::new());
    sim.events();
    let new = renewed(&w, &me, T0 + 20 * DAY);
    let roster = w.roster(&[&new, &peer], &[&new]);
    sim.policy.set_roster(roster, sim.now);
    assert_eq!(sim.policy.my_cert(), &me);
    assert!(
        !sim.events()
            .iter()
            .any(|e| matches!(e, PolicyEvent::CertificateRenewed { .. }))
    );
}

/// Fresh keys keep being agreed (the peer dials us) but none can be
/// installed (here: the data plane's firewall has not taken the policy):
/// the key the data plane still holds is removed at its own hard limit,
/// not kept alive by successors that never reached the data plane.
#[test]
fn a_key_left_in_the_data_plane_by_failed_installs_is_removed_at_its_limit() {
    let mut w = World::new(2);
    let roster = w.all();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    sim.observe(&[]);
    sim.perform();
    sim.established(&peer, 1, &psk(1), Role::Responder);
    assert_eq!(installs(&sim.perform()), [wg(&peer)]);
    let limit = config().rotation_interval + config().hard_lifetime;
    let mut removed_at = None;
    for t in 1..=limit.as_secs() + 5 {
        sim.at(t);
        if t % 10 == 0 {
            let epoch = t / 10 + 1;
            sim.established(&peer, epoch, &psk(epoch as u8), Role::Responder);
        }
        // The data plane still holds the first key: every install fails.
        let held: &[(WgPublicKey, Option<&Psk>)] = if removed_at.is_some() {
            &[]
        } else {
            &[(wg(&peer), Some(&psk(1)))]
        };
        sim.observe(held);
        for a in sim.actions() {
            let result = match &a {
                Action::Install(_) => Err("the firewall has not taken the policy".to_string()),
                Action::Remove(k) if *k == wg(&peer) => {
                    removed_at.get_or_insert(t);
                    Ok(())
                }
                _ => Ok(()),
            };
            sim.policy.action_done(&a, result, sim.now);
        }
    }
    assert_eq!(
        removed_at,
        Some(limit.as_secs()),
        "the first key goes at its limit, {limit:?} after it was agreed"
    );
    assert_eq!(sim.policy.counters().peers_cut_at_hard_lifetime, 1);
}

/// The review's finding: a removal at the limit that fails is tried again
/// (the data plane still holds the old key).
#[test]
fn a_failed_removal_at_the_limit_is_retried() {
    let mut w = World::new(2);
    let roster = w.all();
    let peer = w.certs[1].clone();
    let mut sim = Sim::new(&w.certs[0], roster, BTreeMap::new());
    sim.observe(&[]);
    sim.perform();
    sim.established(&peer, 1, &psk(1), Role::Responder);
    assert_eq!(installs(&sim.perform()), [wg(&peer)]);
    let limit = config().rotation_interval + config().hard_lifetime;
    let mut removes = 0;
    for t in 1..=limit.as_secs() * 6 {
        sim.at(t);
        if t % 10 == 0 {
            let epoch = t / 10 + 1;
            sim.established(&peer, epoch, &psk(epoch as u8), Role::Responder);
        }
        // The data plane keeps holding the first key (the one removal fails).
        sim.observe(&[(wg(&peer), Some(&psk(1)))]);
        for a in sim.actions() {
            let result = match &a {
                Action::Install(_) => Err("the firewall has not taken the policy".to_string()),
                Action::Remove(k) if *k == wg(&peer) => {
                    removes += 1;
                    Err("transient".to_string())
                }
                _ => Ok(()),
            };
            sim.policy.action_done(&a, result, sim.now);
        }
    }
    assert!(
        removes > 1,
        "the failed removal was retried {removes} time(s) in {}s",
        limit.as_secs() * 6
    );
}

/// The review's finding: after a keyd restart (the key in the data plane
/// adopted), fresh keys that never install do not keep the adopted key
/// past its limit.
#[test]
fn an_adopted_key_goes_at_its_limit_when_its_successors_fail_to_install() {
    let mut w = World::new(2);
    let roster = w.all();
    let me = w.certs[0].clone();
    let peer = w.certs[1].clone();
    let records = BTreeMap::from([(
        peer.body().node_id,
        PairRecord {
            epoch: 1,
            installed_at: Some(T0),
        },
    )]);
    let mut sim = Sim::new(&me, roster, records);
    sim.observe(&[(wg(&peer), Some(&psk(1)))]);
    sim.actions();
    let limit = config().rotation_interval + config().hard_lifetime;
    let mut removed = false;
    for t in 1..=limit.as_secs() * 6 {
        sim.at(t);
        if t % 10 == 0 {
            let epoch = t / 10 + 1;
            sim.established(&peer, epoch, &psk(epoch as u8), Role::Responder);
        }
        if removed {
            sim.observe(&[]);
        } else {
            sim.observe(&[(wg(&peer), Some(&psk(1)))]);
        }
        for a in sim.actions() {
            let result = match &a {
                Action::Install(_) => Err("the firewall has not taken the policy".to_string()),
                Action::Remove(k) if *k == wg(&peer) => {
                    removed = true;
                    Ok(())
                }
                _ => Ok(()),
            };
            sim.policy.action_done(&a, result, sim.now);
        }
    }
    assert!(
        removed,
        "the adopted key was never removed in {}s (limit {limit:?})",
        limit.as_secs() * 6
    );
}
