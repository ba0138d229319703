//! The authority's decisions on simulated time, over a real redb store in a
//! temporary directory.

use std::net::SocketAddr;

use mesh_proto::cert::CaCert;
use mesh_proto::delta::RosterDelta;
use mesh_proto::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
use mesh_proto::roster::Roster;

use super::*;
use crate::authority::keys::{self, DirKeyFiles};
use crate::authority::store::RedbStore;
use crate::authority::token::JoinToken;

const T0: UnixTime = 1_900_000_000;
const DAY: u64 = 86_400;
const HOUR: u64 = 3_600;

struct World {
    dir: tempfile::TempDir,
    ca: CaCert,
    root: CaSigningKey,
    /// A node following every published delta, as a subscriber would.
    follower: Roster,
}

fn params() -> Params {
    Params {
        cert_lifetime: 30 * DAY,
        roster_lifetime: 7 * DAY,
        authority_lifetime: 90 * DAY,
        pool_v4: "10.77.0.0/24".parse().unwrap(),
        pool_v6: Some("fd77::/64".parse().unwrap()),
        keep_deltas: 64,
        endpoints: vec!["192.0.2.1:51830".parse().unwrap()],
    }
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let root = CaSigningKey::generate().unwrap();
    let ca = CaCert::create(&root, "root", "net-a", T0 - DAY, T0 + 3650 * DAY).unwrap();
    let key = CaSigningKey::generate().unwrap();
    let cert = ca
        .certify_authority(
            &root,
            "auth-1",
            key.verifying_key(),
            T0 - DAY,
            T0 + 90 * DAY,
        )
        .unwrap();
    keys::save(dir.path(), &SigningKey { cert, key }).unwrap();
    let follower = Roster::build(&ca, &root, 0, T0 - 10, T0 - 5, vec![], vec![]).unwrap();
    World {
        dir,
        ca,
        root,
        follower,
    }
}

impl World {
    fn open(&self, root_online: bool, now: UnixTime) -> Authority {
        let store = RedbStore::open(&self.dir.path().join("store.redb")).unwrap();
        let keys = keys::load_all(self.dir.path(), &self.ca).unwrap();
        let root = root_online.then(|| CaSigningKey::from_text(&self.root.to_text()).unwrap());
        Authority::open(
            Box::new(store),
            Box::new(DirKeyFiles {
                dir: self.dir.path().to_path_buf(),
            }),
            self.ca.clone(),
            root,
            keys,
            NoisePublicKey([5; 32]),
            params(),
            now,
        )
        .unwrap()
    }

    /// Applies what was published, in order, as a subscribed node does.
    fn follow(&mut self, a: &Authority, published: impl IntoIterator<Item = Published>) {
        for p in published {
            let d = RosterDelta::from_bytes(&p.delta).unwrap();
            self.follower = self.follower.apply(&d, &self.ca).unwrap();
        }
        assert_eq!(self.follower.to_bytes(), a.roster().to_bytes());
    }

    fn start_following(&mut self, a: &Authority) {
        self.follower = Roster::from_bytes(&a.roster().to_bytes(), &self.ca).unwrap();
    }
}

fn spec(uses: u32) -> TokenSpec {
    TokenSpec {
        lifetime: HOUR,
        uses,
        groups: vec!["web".into()],
        attributes: vec![("tier".into(), "front".into())],
        name_pattern: None,
    }
}

struct Machine {
    wg: WgPrivateKey,
    noise: NoisePrivateKey,
}

fn machine() -> Machine {
    Machine {
        wg: WgPrivateKey::generate().unwrap(),
        noise: NoisePrivateKey::generate().unwrap(),
    }
}

fn observed(i: u8) -> SocketAddr {
    format!("198.51.100.{i}:40000").parse().unwrap()
}

fn join(token: &JoinToken, m: &Machine, name: &str) -> JoinRequest {
    JoinRequest {
        token_id: token.id,
        token_secret: token.secret.clone(),
        name: name.into(),
        wg_public: m.wg.public_key(),
        endpoints: Endpoints {
            wg: Some("0.0.0.0:51820".parse().unwrap()),
            keyd: Some("0.0.0.0:51821".parse().unwrap()),
        },
    }
}

fn enroll(
    a: &mut Authority,
    t: &JoinToken,
    m: &Machine,
    name: &str,
    i: u8,
    now: u64,
) -> Result<Enrolled, Refusal> {
    a.enroll(&join(t, m, name), m.noise.public_key(), observed(i), now)
}

#[test]
fn a_token_enrolls_a_machine_with_addresses_from_the_pools() {
    let mut w = world();
    let mut a = w.open(false, T0);
    w.start_following(&a);
    let (token, _) = a.create_token(spec(2), T0).unwrap();
    let m1 = machine();
    let e1 = enroll(&mut a, &token, &m1, "web-1", 1, T0 + 1).unwrap();
    let c = e1.cert.body();
    assert_eq!(c.name, "web-1");
    assert_eq!(
        c.addresses,
        vec![
            "10.77.0.1/24".parse().unwrap(),
            "fd77::1/64".parse().unwrap()
        ]
    );
    assert_eq!(c.groups, vec!["web".to_string()]);
    // The token's attributes are certified, for policies to select on.
    assert_eq!(
        c.attributes,
        BTreeMap::from([("tier".to_string(), "front".to_string())])
    );
    assert_eq!(c.issuer, a.signer().fingerprint());
    assert_eq!(c.not_after, T0 + 1 + 30 * DAY);
    // Listed with the address the authority saw where the node said "any".
    let member = a.roster().member(&e1.node_id).unwrap();
    assert_eq!(
        member.wg_endpoint,
        Some("198.51.100.1:51820".parse().unwrap())
    );
    w.follow(&a, e1.published);
    let e2 = enroll(&mut a, &token, &machine(), "web-2", 2, T0 + 2).unwrap();
    assert_eq!(e2.cert.body().addresses[0], "10.77.0.2/24".parse().unwrap());
    w.follow(&a, e2.published);
    assert_eq!(a.roster().members().len(), 2);
    let rec = a.tokens().next().unwrap();
    assert_eq!(rec.uses, 2);
    let node = a.nodes().find(|n| n.name == "web-1").unwrap();
    assert_eq!(node.observed_addr, Some(observed(1)));
    assert_eq!(node.attributes, vec![("tier".into(), "front".into())]);
}

#[test]
fn used_expired_revoked_and_unknown_tokens_are_refused_with_their_reason() {
    let w = world();
    let mut a = w.open(false, T0);
    let (once, _) = a.create_token(spec(1), T0).unwrap();
    enroll(&mut a, &once, &machine(), "a", 1, T0).unwrap();
    assert_eq!(
        enroll(&mut a, &once, &machine(), "b", 2, T0).unwrap_err(),
        Refusal::TokenUsed
    );

    let (t, _) = a.create_token(spec(5), T0).unwrap();
    assert_eq!(
        enroll(&mut a, &t, &machine(), "c", 3, T0 + HOUR).unwrap_err(),
        Refusal::TokenExpired
    );
    a.revoke_token(&t.id.to_hex(), T0 + 1).unwrap();
    assert_eq!(
        enroll(&mut a, &t, &machine(), "d", 4, T0 + 2).unwrap_err(),
        Refusal::TokenRevoked
    );

    // The right id with a wrong secret reveals nothing about the token.
    let (t2, _) = a.create_token(spec(5), T0).unwrap();
    let mut forged = t2.clone();
    forged.secret = crate::authority::token::TokenSecret([0; 32]);
    assert_eq!(
        enroll(&mut a, &forged, &machine(), "e", 5, T0).unwrap_err(),
        Refusal::TokenUnknown
    );
    let mut unknown = t2.clone();
    unknown.id = crate::authority::token::TokenId([9; 8]);
    assert_eq!(
        enroll(&mut a, &unknown, &machine(), "f", 6, T0).unwrap_err(),
        Refusal::TokenUnknown
    );
    // Refusals used nothing.
    assert_eq!(a.tokens().find(|r| r.id == t2.id.to_hex()).unwrap().uses, 0);
}

#[test]
fn names_and_keys_are_checked() {
    let w = world();
    let mut a = w.open(false, T0);
    let mut s = spec(10);
    s.name_pattern = Some("web-*".into());
    let (t, _) = a.create_token(s, T0).unwrap();
    assert_eq!(
        enroll(&mut a, &t, &machine(), "db-1", 1, T0).unwrap_err(),
        Refusal::NameNotAllowed
    );
    assert_eq!(
        enroll(&mut a, &t, &machine(), "web 1", 1, T0).unwrap_err(),
        Refusal::NameInvalid
    );
    let m = machine();
    fn enroll_named(
        a: &mut Authority,
        t: &JoinToken,
        m: &Machine,
        name: &str,
    ) -> Result<Enrolled, Refusal> {
        enroll(a, t, m, name, 1, T0)
    }
    let e = enroll_named(&mut a, &t, &m, "web-1").unwrap();
    assert_eq!(
        enroll_named(&mut a, &t, &machine(), "web-1").unwrap_err(),
        Refusal::NameTaken
    );
    assert_eq!(
        enroll_named(&mut a, &t, &m, "web-9").unwrap_err(),
        Refusal::KeysTaken
    );
    // The same machine asking again (its answer was lost) gets the same
    // enrollment, and the token is not used again.
    let uses = a.tokens().next().unwrap().uses;
    let again = enroll_named(&mut a, &t, &m, "web-1").unwrap();
    assert_eq!(again.cert, e.cert);
    assert!(again.published.is_none());
    assert_eq!(a.tokens().next().unwrap().uses, uses);
    assert!(pattern_matches("web-*-a", "web-12-a"));
    assert!(!pattern_matches("web-*-a", "web-12-b"));
    assert!(pattern_matches("*", "x"));
}

#[test]
fn a_revoked_node_is_cut_by_id_and_keys_and_cannot_come_back() {
    let mut w = world();
    let mut a = w.open(false, T0);
    w.start_following(&a);
    let (t, _) = a.create_token(spec(5), T0).unwrap();
    let m = machine();
    let e = enroll(&mut a, &t, &m, "n1", 1, T0).unwrap();
    w.follow(&a, e.published);
    assert_eq!(a.member_for(&m.noise.public_key()), Ok(e.node_id));
    let p = a.revoke_node(&e.node_id, T0 + 5).unwrap();
    w.follow(&a, p);
    assert!(w.follower.member(&e.node_id).is_none());
    assert!(w.follower.revokes(&e.cert));
    assert_eq!(
        a.member_for(&m.noise.public_key()),
        Err(Refusal::NodeRevoked)
    );
    assert_eq!(
        enroll(&mut a, &t, &m, "n1", 1, T0 + 6).unwrap_err(),
        Refusal::NodeRevoked
    );
    // The same Noise key with a fresh WireGuard key is the same node.
    let half = Machine {
        wg: WgPrivateKey::generate().unwrap(),
        noise: NoisePrivateKey::from_text(&m.noise.to_text()).unwrap(),
    };
    assert_eq!(
        enroll(&mut a, &t, &half, "n2", 1, T0 + 6).unwrap_err(),
        Refusal::NodeRevoked
    );
    assert!(matches!(
        a.revoke_node(&e.node_id, T0 + 7),
        Err(AuthorityError::AlreadyRevoked(_))
    ));
}

#[test]
fn state_survives_a_restart_and_addresses_are_never_reused() {
    let w = world();
    let (t, first) = {
        let mut a = w.open(false, T0);
        let (t, _) = a.create_token(spec(10), T0).unwrap();
        let e = enroll(&mut a, &t, &machine(), "n1", 1, T0).unwrap();
        a.revoke_node(&e.node_id, T0 + 1).unwrap();
        (t, e)
    };
    let mut a = w.open(false, T0 + 2);
    assert_eq!(a.roster().serial(), 3);
    let e = enroll(&mut a, &t, &machine(), "n2", 2, T0 + 3).unwrap();
    assert_ne!(e.cert.body().addresses[0], first.cert.body().addresses[0]);
    assert_eq!(e.cert.body().addresses[0], "10.77.0.2/24".parse().unwrap());
    assert_eq!(a.tokens().next().unwrap().uses, 2);
}

#[test]
fn the_pool_runs_out_with_a_clear_refusal() {
    let w = world();
    let mut a = w.open(false, T0);
    a.params.pool_v4 = "10.77.0.0/30".parse().unwrap();
    let (t, _) = a.create_token(spec(10), T0).unwrap();
    enroll(&mut a, &t, &machine(), "a", 1, T0).unwrap();
    enroll(&mut a, &t, &machine(), "b", 2, T0).unwrap();
    assert_eq!(
        enroll(&mut a, &t, &machine(), "c", 3, T0).unwrap_err(),
        Refusal::PoolExhausted
    );
}

#[test]
fn certificates_are_renewed_at_two_thirds_with_the_same_keys_and_addresses() {
    let mut w = world();
    let mut a = w.open(false, T0);
    w.start_following(&a);
    let (t, _) = a.create_token(spec(2), T0).unwrap();
    let e = enroll(&mut a, &t, &machine(), "n1", 1, T0).unwrap();
    w.follow(&a, e.published);
    // Before two thirds: only the roster's own refresh.
    let p = a.handle_timeout(T0 + 19 * DAY).unwrap();
    w.follow(&a, p);
    assert_eq!(w.follower.member(&e.node_id).unwrap().cert, e.cert);
    let later = T0 + 21 * DAY;
    let p = a.handle_timeout(later).unwrap();
    w.follow(&a, p);
    let renewed = &w.follower.member(&e.node_id).unwrap().cert;
    assert_ne!(renewed, &e.cert);
    let (old, new) = (e.cert.body(), renewed.body());
    assert_eq!(
        (new.wg_public, new.noise_public),
        (old.wg_public, old.noise_public)
    );
    assert_eq!(new.addresses, old.addresses);
    assert_eq!(
        (&new.groups, &new.attributes),
        (&old.groups, &old.attributes),
        "groups and attributes kept"
    );
    assert_eq!(new.attributes["tier"], "front");
    assert_eq!(new.not_after, later + 30 * DAY);
    // Nothing more is due right after.
    let again = a.handle_timeout(later + 1).unwrap();
    assert!(again.is_empty(), "renewed twice");
}

#[test]
fn the_roster_is_refreshed_before_it_expires() {
    let mut w = world();
    let mut a = w.open(false, T0);
    w.start_following(&a);
    assert!(a.handle_timeout(T0 + 2 * DAY).unwrap().is_empty());
    let p = a.handle_timeout(T0 + 3 * DAY).unwrap();
    assert_eq!(p.len(), 1);
    w.follow(&a, p);
    assert_eq!(w.follower.not_after(), T0 + 10 * DAY);
}

#[test]
fn with_the_root_online_the_signing_key_rolls_over_in_three_ordered_updates() {
    let mut w = world();
    let mut a = w.open(true, T0);
    w.start_following(&a);
    let (t, _) = a.create_token(spec(3), T0).unwrap();
    let mut published = vec![];
    let mut ids = vec![];
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let e = enroll(&mut a, &t, &machine(), name, i as u8, T0).unwrap();
        ids.push(e.node_id);
        published.extend(e.published);
    }
    w.follow(&a, published);
    let old = a.signer().fingerprint();
    // Two thirds of the 91-day key life.
    let at = T0 - DAY + 61 * DAY;
    let p = a.handle_timeout(at).unwrap();
    assert!(p.len() >= 3, "{} updates", p.len());
    w.follow(&a, p);
    let new = a.signer().fingerprint();
    assert_ne!(new, old);
    assert_eq!(w.follower.signer(), new);
    assert_eq!(w.follower.authorities().len(), 1);
    for id in &ids {
        assert_eq!(w.follower.member(id).unwrap().cert.body().issuer, new);
    }
    // The new key is on disk: a restart signs with it.
    drop(a);
    let a = w.open(true, at + 1);
    assert_eq!(a.signer().fingerprint(), new);
}

#[test]
fn catch_up_sends_deltas_or_a_snapshot() {
    let mut w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(10), T0).unwrap();
    enroll(&mut a, &t, &machine(), "a", 1, T0).unwrap();
    w.start_following(&a);
    let (serial, fp) = (a.roster().serial(), a.roster().fingerprint());
    assert!(matches!(
        a.catch_up(serial, Some(fp)).unwrap(),
        Catchup::UpToDate
    ));
    enroll(&mut a, &t, &machine(), "b", 2, T0).unwrap();
    enroll(&mut a, &t, &machine(), "c", 3, T0).unwrap();
    match a.catch_up(serial, Some(fp)).unwrap() {
        Catchup::Deltas(d) => {
            assert_eq!(d.len(), 2);
            for bytes in d {
                let d = RosterDelta::from_bytes(&bytes).unwrap();
                w.follower = w.follower.apply(&d, &w.ca).unwrap();
            }
            assert_eq!(w.follower.to_bytes(), a.roster().to_bytes());
        }
        other => panic!("expected deltas, got {other:?}"),
    }
    assert!(matches!(a.catch_up(0, None).unwrap(), Catchup::Snapshot(_)));
    // A node claiming a serial ahead of the authority gets the snapshot
    // (and refuses it as a rollback: an operator must look).
    assert!(matches!(
        a.catch_up(99, Some(fp)).unwrap(),
        Catchup::Snapshot(_)
    ));
}

#[test]
fn endpoint_reports_publish_only_changes() {
    let mut w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let m = machine();
    let e = enroll(&mut a, &t, &m, "n1", 1, T0).unwrap();
    w.start_following(&a);
    let same = Endpoints {
        wg: Some("0.0.0.0:51820".parse().unwrap()),
        keyd: Some("0.0.0.0:51821".parse().unwrap()),
    };
    assert!(
        a.report_endpoints(&e.node_id, same, observed(1), T0 + 1)
            .unwrap()
            .is_none()
    );
    // Seen from elsewhere: recorded and published.
    let p = a
        .report_endpoints(&e.node_id, same, observed(7), T0 + 2)
        .unwrap();
    assert!(p.is_some());
    w.follow(&a, p);
    assert_eq!(
        w.follower.member(&e.node_id).unwrap().wg_endpoint,
        Some("198.51.100.7:51820".parse().unwrap())
    );
}

#[test]
fn rename_reissues_the_certificate() {
    let mut w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(2), T0).unwrap();
    let e = enroll(&mut a, &t, &machine(), "old", 1, T0).unwrap();
    enroll(&mut a, &t, &machine(), "other", 2, T0).unwrap();
    w.start_following(&a);
    assert!(a.rename_node(&e.node_id, "other", T0).is_err());
    let p = a.rename_node(&e.node_id, "new", T0 + 1).unwrap();
    w.follow(&a, p);
    let renamed = w.follower.member(&e.node_id).unwrap().cert.body().clone();
    assert_eq!(renamed.name, "new");
    assert_eq!(renamed.attributes, e.cert.body().attributes);
    assert_eq!(a.find_node("new").unwrap(), e.node_id);
}

#[test]
fn token_attributes_follow_the_certificate_rules() {
    let w = world();
    let mut a = w.open(false, T0);
    for attributes in [
        vec![("Tier".to_string(), "front".to_string())],
        vec![("tier".into(), "a,b".into())],
        vec![("tier".into(), "a".into()), ("tier".into(), "b".into())],
    ] {
        let bad = TokenSpec {
            attributes: attributes.clone(),
            ..spec(1)
        };
        assert!(
            matches!(
                a.create_token(bad, T0),
                Err(AuthorityError::Cert(mesh_proto::CertError::Attribute(_)))
            ),
            "{attributes:?}"
        );
    }
    assert_eq!(a.tokens().count(), 0, "no token stored");
}

#[test]
fn short_lived_certificates_are_renewed_before_they_expire() {
    let mut w = world();
    let mut a = w.open(false, T0);
    a.params.cert_lifetime = 30;
    w.start_following(&a);
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let e = enroll(&mut a, &t, &machine(), "n1", 1, T0).unwrap();
    w.follow(&a, e.published);
    assert_eq!(e.cert.body().not_after, T0 + 30);
    assert!(a.handle_timeout(T0 + 19).unwrap().is_empty());
    let p = a.handle_timeout(T0 + 20).unwrap();
    w.follow(&a, p);
    let c = w.follower.member(&e.node_id).unwrap().cert.clone();
    assert_eq!(c.body().not_after, T0 + 50, "renewed at 2/3, before expiry");
    assert!(a.handle_timeout(T0 + 21).unwrap().is_empty());
    let p = a.handle_timeout(T0 + 40).unwrap();
    w.follow(&a, p);
    assert_eq!(
        w.follower.member(&e.node_id).unwrap().cert.body().not_after,
        T0 + 70
    );
}

#[test]
fn a_machine_whose_answer_was_lost_gets_it_again_with_its_used_up_token() {
    let w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let m = machine();
    let first = enroll(&mut a, &t, &m, "n1", 1, T0).unwrap();
    let serial = a.roster().serial();
    // The answer never arrived; the machine retries, even after expiry.
    let again = enroll(&mut a, &t, &m, "n1", 1, T0 + 2 * HOUR).unwrap();
    assert_eq!(again.cert, first.cert);
    assert!(again.published.is_none());
    assert_eq!(a.roster().serial(), serial, "nothing changed");
    // Another machine with the used token is still refused, and so is this
    // one under another name.
    assert_eq!(
        enroll(&mut a, &t, &machine(), "n2", 2, T0).unwrap_err(),
        Refusal::TokenUsed
    );
    assert_eq!(
        enroll(&mut a, &t, &m, "n9", 1, T0).unwrap_err(),
        Refusal::TokenUsed
    );
}

#[test]
fn endpoints_no_node_could_use_are_replaced_and_port_zero_is_none() {
    let w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let m = machine();
    let mut req = join(&t, &m, "n1");
    req.endpoints = Endpoints {
        wg: Some("127.0.0.1:51820".parse().unwrap()),
        keyd: Some("224.0.0.1:0".parse().unwrap()),
    };
    let e = a
        .enroll(&req, m.noise.public_key(), observed(4), T0)
        .unwrap();
    let member = a.roster().member(&e.node_id).unwrap();
    assert_eq!(
        member.wg_endpoint,
        Some("198.51.100.4:51820".parse().unwrap())
    );
    assert_eq!(member.keyd_endpoint, None);
}

#[test]
fn a_member_moves_in_the_roster_at_most_once_a_minute() {
    let mut w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let e = enroll(&mut a, &t, &machine(), "n1", 1, T0).unwrap();
    w.start_following(&a);
    a.take_published();
    let same = Endpoints {
        wg: Some("0.0.0.0:51820".parse().unwrap()),
        keyd: None,
    };
    // First move: published at once.
    assert!(
        a.report_endpoints(&e.node_id, same, observed(2), T0 + 1)
            .unwrap()
            .is_some()
    );
    // A member reconnecting from ever new addresses: recorded, not published.
    for i in 3..20 {
        assert!(
            a.report_endpoints(&e.node_id, same, observed(i), T0 + 2)
                .unwrap()
                .is_none()
        );
    }
    assert!(a.handle_timeout(T0 + 30).unwrap().is_empty());
    // A minute after the first: the latest position, in one delta.
    let p = a.handle_timeout(T0 + 1 + ENDPOINT_INTERVAL).unwrap();
    assert_eq!(p.len(), 1);
    let all = a.take_published();
    assert_eq!(all.len(), 2, "the first move and the late one");
    w.follow(&a, all);
    assert_eq!(
        w.follower.member(&e.node_id).unwrap().wg_endpoint,
        Some("198.51.100.19:51820".parse().unwrap())
    );
}

#[test]
fn names_that_read_as_node_ids_are_refused_and_ids_win() {
    let w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(5), T0).unwrap();
    let victim = enroll(&mut a, &t, &machine(), "web-1", 1, T0).unwrap();
    let id_text = victim.node_id.to_string();
    assert_eq!(
        enroll(&mut a, &t, &machine(), &id_text, 2, T0).unwrap_err(),
        Refusal::NameInvalid
    );
    assert_eq!(a.find_node(&id_text).unwrap(), victim.node_id);
    assert!(
        a.rename_node(&victim.node_id, &"ab".repeat(16), T0)
            .is_err()
    );
}

#[test]
fn a_revoked_nodes_name_can_be_taken_again() {
    let w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(5), T0).unwrap();
    let old = enroll(&mut a, &t, &machine(), "db-1", 1, T0).unwrap();
    a.revoke_node(&old.node_id, T0 + 1).unwrap();
    // The machine is rebuilt with new keys under its old host name.
    let new = enroll(&mut a, &t, &machine(), "db-1", 1, T0 + 2).unwrap();
    assert_ne!(new.node_id, old.node_id);
    assert_eq!(a.find_node("db-1").unwrap(), new.node_id, "the active one");
}

#[test]
fn a_rollover_cut_short_is_completed_on_the_next_tick() {
    let mut w = world();
    let mut a = w.open(true, T0);
    let (t, _) = a.create_token(spec(2), T0).unwrap();
    let e = enroll(&mut a, &t, &machine(), "n1", 1, T0).unwrap();
    w.start_following(&a);
    a.take_published();
    // Step 1 and the switch happened, then the authority stopped: the new
    // key signs, both are listed, the member holds an old-key certificate.
    let next =
        crate::authority::keys::certify(&w.ca, &w.root, T0 + 10, params().authority_lifetime)
            .unwrap();
    let both = vec![a.signer().clone(), next.cert.clone()];
    a.publish(
        RosterChange {
            authorities: Some(both),
            ..RosterChange::default()
        },
        vec![],
        vec![],
        None,
        T0 + 10,
    )
    .unwrap();
    a.signer = next;
    a.publish(RosterChange::default(), vec![], vec![], None, T0 + 10)
        .unwrap();
    a.handle_timeout(T0 + 11).unwrap();
    let published = a.take_published();
    w.follow(&a, published);
    let new = a.signer().fingerprint();
    assert_eq!(w.follower.authorities().len(), 1);
    assert_eq!(w.follower.signer(), new);
    assert_eq!(
        w.follower.member(&e.node_id).unwrap().cert.body().issuer,
        new
    );
}

#[test]
fn a_move_waiting_when_the_authority_stops_is_published_after_its_restart() {
    let mut w = world();
    let id = {
        let mut a = w.open(false, T0);
        let (t, _) = a.create_token(spec(1), T0).unwrap();
        let e = enroll(&mut a, &t, &machine(), "n1", 1, T0).unwrap();
        let same = Endpoints {
            wg: Some("0.0.0.0:51820".parse().unwrap()),
            keyd: None,
        };
        a.report_endpoints(&e.node_id, same, observed(2), T0 + 1)
            .unwrap();
        // Within the minute: recorded, waiting.
        assert!(
            a.report_endpoints(&e.node_id, same, observed(3), T0 + 2)
                .unwrap()
                .is_none()
        );
        e.node_id
    };
    let mut a = w.open(false, T0 + 3);
    w.start_following(&a);
    a.handle_timeout(T0 + 3).unwrap();
    let p = a.take_published();
    assert_eq!(p.len(), 1);
    w.follow(&a, p);
    assert_eq!(
        w.follower.member(&id).unwrap().wg_endpoint,
        Some("198.51.100.3:51820".parse().unwrap())
    );
}

#[test]
fn ipv4_mapped_endpoints_meet_the_same_rules() {
    let w = world();
    let mut a = w.open(false, T0);
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let m = machine();
    let mut req = join(&t, &m, "n1");
    req.endpoints = Endpoints {
        wg: Some("[::ffff:127.0.0.1]:51820".parse().unwrap()),
        keyd: Some("[::ffff:0.0.0.5]:51821".parse().unwrap()),
    };
    let e = a
        .enroll(&req, m.noise.public_key(), observed(4), T0)
        .unwrap();
    let member = a.roster().member(&e.node_id).unwrap();
    assert_eq!(
        member.wg_endpoint,
        Some("198.51.100.4:51820".parse().unwrap())
    );
    assert_eq!(
        member.keyd_endpoint,
        Some("198.51.100.4:51821".parse().unwrap())
    );
}

/// A store whose next commit lands and then reports an I/O error, as a
/// failure after the data reached the disk would.
struct LandsThenFails {
    inner: RedbStore,
    fail_next: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl crate::authority::store::Store for LandsThenFails {
    fn load(&self) -> Result<crate::authority::store::Loaded, StoreError> {
        self.inner.load()
    }
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.inner.commit(batch)?;
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Err(StoreError::Io {
                path: "store.redb".into(),
                action: "sync",
                source: std::io::Error::other("injected after the commit landed"),
            });
        }
        Ok(())
    }
    fn deltas(&self, from: u64, to: u64) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        self.inner.deltas(from, to)
    }
}

#[test]
fn a_commit_that_landed_despite_an_error_still_publishes() {
    let mut w = world();
    let fail_next = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = LandsThenFails {
        inner: RedbStore::open(&w.dir.path().join("store.redb")).unwrap(),
        fail_next: fail_next.clone(),
    };
    let mut a = Authority::open(
        Box::new(store),
        Box::new(DirKeyFiles {
            dir: w.dir.path().to_path_buf(),
        }),
        w.ca.clone(),
        None,
        keys::load_all(w.dir.path(), &w.ca).unwrap(),
        NoisePublicKey([5; 32]),
        params(),
        T0,
    )
    .unwrap();
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let e = enroll(&mut a, &t, &machine(), "n1", 1, T0).unwrap();
    w.start_following(&a);
    a.take_published();
    fail_next.store(true, std::sync::atomic::Ordering::Relaxed);
    // The revocation reached the store; the error must not swallow it.
    let p = a.revoke_node(&e.node_id, T0 + 1).unwrap();
    assert!(p.is_some());
    let out = a.take_published();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].cut, vec![e.node_id]);
    w.follow(&a, out);
    assert!(w.follower.member(&e.node_id).is_none());
}

const POLICY: &str = r#"
[[rule]]
name = "web-to-db"
action = "allow"
from = { groups = ["web"] }
to = { groups = ["db"] }
proto = "tcp"
ports = ["5432"]
"#;

#[test]
fn the_policy_is_published_as_a_delta_kept_across_changes_and_restarts() {
    let mut w = world();
    let mut a = w.open(false, T0);
    w.start_following(&a);
    assert!(a.policy().is_none());
    let policy = Policy::from_toml(POLICY).unwrap();
    let p = a.set_policy(Some(&policy.encode()), T0 + 1).unwrap();
    assert!(p.is_some());
    w.follow(&a, p);
    assert_eq!(w.follower.policy(), Some(&policy), "the node has it");
    // Setting it again publishes nothing.
    assert!(
        a.set_policy(Some(&policy.encode()), T0 + 2)
            .unwrap()
            .is_none()
    );
    // Other changes (an enrollment, the roster's refresh) keep it.
    let (t, _) = a.create_token(spec(1), T0).unwrap();
    let e = enroll(&mut a, &t, &machine(), "web-1", 1, T0 + 3).unwrap();
    w.follow(&a, e.published);
    let p = a.handle_timeout(T0 + 6 * DAY).unwrap();
    w.follow(&a, p);
    assert_eq!(w.follower.policy(), Some(&policy));
    // Stored with the roster: a restarted authority has it.
    let serial = a.roster().serial();
    drop(a);
    let mut a = w.open(false, T0 + 6 * DAY);
    assert_eq!(a.policy(), Some(&policy));
    assert_eq!(a.roster().serial(), serial);
    // Cleared: no firewall on the nodes.
    let p = a.set_policy(None, T0 + 6 * DAY + 1).unwrap();
    w.follow(&a, p);
    assert_eq!(w.follower.policy(), None);
    assert!(a.set_policy(None, T0 + 6 * DAY + 2).unwrap().is_none());
}

#[test]
fn a_bad_policy_is_refused_before_anything_is_signed() {
    let w = world();
    let mut a = w.open(false, T0);
    let serial = a.roster().serial();
    // Bytes that do not decode.
    assert!(matches!(
        a.set_policy(Some(&[0xff; 12]), T0 + 1),
        Err(AuthorityError::Policy(_))
    ));
    // A policy that decodes but does not validate (a rule name twice).
    let mut twice = Policy::from_toml(POLICY).unwrap();
    twice.rules.push(twice.rules[0].clone());
    assert!(matches!(
        a.set_policy(Some(&twice.encode()), T0 + 1),
        Err(AuthorityError::Policy(PolicyError::DuplicateName { .. }))
    ));
    assert_eq!(a.roster().serial(), serial, "nothing published");
    assert!(a.take_published().is_empty());
    assert!(a.policy().is_none());
}
