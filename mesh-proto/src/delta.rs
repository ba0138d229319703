//! Roster deltas: the change from serial n to n + 1, so that a change costs
//! bytes in proportion to the change, not to the network.
//!
//! A delta carries the operations and the signature of the roster they
//! produce, nothing else. A node applies it to the roster it holds (which
//! must be exactly serial n, by fingerprint: a gap, a replay or a fork is
//! refused and the node asks for a snapshot), re-encodes the resulting body
//! and verifies the signature over it as over any roster. The result is an
//! ordinary signed roster that `keyd inspect` checks; a forged or altered
//! delta fails that verification, and only whole, in-order updates apply.
//!
//! Both sides derive the next body with the same function ([`apply_ops`]):
//! members are replaced in place or appended, so the order, and with it the
//! signed bytes, are the same on the authority and on every node.
//!
//! The firewall policy changes by [`SetPolicy`]: the whole new policy (or
//! none), since a policy is small beside a roster and a rule edit is rare.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::armor::postcard_exact;
use crate::cert::{AuthorityCert, CaCert};
use crate::identity::NodeId;
use crate::roster::{
    MemberEntry, ROSTER_DOMAIN, ROSTER_VERSION, RevokedNode, Roster, RosterBody, Signer,
};
use crate::signed::{Fingerprint, Signed};
use crate::{CodecError, RosterError, UnixTime};

/// 2: [`SetPolicy`]. Version-1 deltas are refused with
/// [`CodecError::Version`].
pub const DELTA_VERSION: u8 = 2;

/// Replaces the roster's firewall policy: the canonical bytes of
/// [`crate::firewall::policy::Policy::encode`], or None for no firewall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPolicy(pub Option<Vec<u8>>);

/// What the authority changes in a roster.
#[derive(Clone, Debug, Default)]
pub struct RosterChange {
    /// The new list of authority certificates, when it changes.
    pub authorities: Option<Vec<AuthorityCert>>,
    /// Members added, or replaced by node id (renewal, endpoint change).
    pub upsert: Vec<crate::roster::Member>,
    pub remove: Vec<NodeId>,
    pub revoke: Vec<Fingerprint>,
    pub revoke_nodes: Vec<RevokedNode>,
    /// A new firewall policy (or none), when it changes.
    pub set_policy: Option<SetPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DeltaBody {
    version: u8,
    network_id: String,
    from_serial: u64,
    from_fingerprint: Fingerprint,
    serial: u64,
    issued_at: UnixTime,
    not_after: UnixTime,
    signer: Fingerprint,
    authorities: Option<Vec<Vec<u8>>>,
    upsert: Vec<MemberEntry>,
    remove: Vec<NodeId>,
    revoke: Vec<Fingerprint>,
    revoke_nodes: Vec<RevokedNode>,
    set_policy: Option<SetPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DeltaWire {
    body: DeltaBody,
    /// The signature of the roster this delta produces.
    signature: Vec<u8>,
}

/// A roster update from serial n to n + 1. Untrusted until applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterDelta(DeltaWire);

impl RosterDelta {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RosterError> {
        // The body's version is the wire's first byte (postcard writes the
        // leading u8 as is): an older layout gets the version error, not a
        // confusing decode error.
        match bytes.first() {
            Some(&version) if version != DELTA_VERSION => {
                return Err(CodecError::Version {
                    found: version,
                    supported: DELTA_VERSION,
                }
                .into());
            }
            _ => {}
        }
        let wire: DeltaWire = postcard_exact(bytes)?;
        Ok(Self(wire))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing owned vectors and integers into memory cannot fail.
        postcard::to_stdvec(&self.0).unwrap_or_default()
    }

    pub fn from_serial(&self) -> u64 {
        self.0.body.from_serial
    }

    pub fn serial(&self) -> u64 {
        self.0.body.serial
    }

    /// The policy change this delta carries, if any (untrusted until applied).
    pub fn set_policy(&self) -> Option<&SetPolicy> {
        self.0.body.set_policy.as_ref()
    }
}

impl Roster {
    /// The authority's side: applies `change`, signs the next roster (serial
    /// + 1) with `signer`, and returns it with the delta every node applies.
    pub fn next(
        &self,
        ca: &CaCert,
        signer: &Signer<'_>,
        change: &RosterChange,
        issued_at: UnixTime,
        not_after: UnixTime,
    ) -> Result<(Roster, RosterDelta), RosterError> {
        let (key, signer_fp) = signer.checked(ca)?;
        // A policy that does not decode is refused before anything is signed.
        if let Some(SetPolicy(policy)) = &change.set_policy {
            crate::roster::decode_policy(policy.as_deref(), None)?;
        }
        let body = DeltaBody {
            version: DELTA_VERSION,
            network_id: self.network_id().to_string(),
            from_serial: self.serial(),
            from_fingerprint: self.fingerprint(),
            serial: self.serial() + 1,
            issued_at,
            not_after,
            signer: signer_fp,
            authorities: change
                .authorities
                .as_ref()
                .map(|list| list.iter().map(|a| a.to_bytes()).collect()),
            upsert: change.upsert.iter().map(|m| m.entry()).collect(),
            remove: change.remove.clone(),
            revoke: change.revoke.clone(),
            revoke_nodes: change.revoke_nodes.clone(),
            set_policy: change.set_policy.clone(),
        };
        let next_body = apply_ops(self, &body);
        let signed = Signed::sign(ROSTER_DOMAIN, next_body, key).map_err(RosterError::Signing)?;
        let signature = signed.signature().to_vec();
        let next = Roster::verify(signed, ca, Some(self))?;
        Ok((next, RosterDelta(DeltaWire { body, signature })))
    }

    /// The node's side: the roster `delta` produces from this one, verified
    /// like any roster. Refuses a delta that does not start at exactly this
    /// roster (gap, replay, fork), one for another network, and any whose
    /// result does not carry a valid signature.
    pub fn apply(&self, delta: &RosterDelta, ca: &CaCert) -> Result<Roster, RosterError> {
        let d = &delta.0.body;
        if d.network_id != self.network_id() {
            return Err(RosterError::WrongNetwork {
                expected: self.network_id().to_string(),
                found: d.network_id.clone(),
            });
        }
        if d.from_serial != self.serial() {
            return Err(RosterError::DeltaGap {
                current: self.serial(),
                from: d.from_serial,
            });
        }
        if d.from_fingerprint != self.fingerprint() {
            return Err(RosterError::DeltaBase { serial: d.serial });
        }
        if d.serial != d.from_serial.wrapping_add(1) || d.serial == 0 {
            return Err(RosterError::DeltaMalformed(format!(
                "serial {} does not follow {}",
                d.serial, d.from_serial
            )));
        }
        let signature = <[u8; 64]>::try_from(delta.0.signature.as_slice()).map_err(|_| {
            RosterError::Codec(CodecError::Length {
                expected: 64,
                found: delta.0.signature.len(),
            })
        })?;
        let body = apply_ops(self, d);
        let signed = Signed::from_parts(ROSTER_DOMAIN, body, signature)?;
        Roster::verify(signed, ca, Some(self))
    }
}

/// The next roster body: `delta`'s operations on `base`. Upserted members
/// replace the entry with the same node id in place, or are appended;
/// revocations are appended once. Linear in the roster, once per delta.
fn apply_ops(base: &Roster, delta: &DeltaBody) -> RosterBody {
    let b = &base.signed().body;
    let removed: HashSet<NodeId> = delta.remove.iter().copied().collect();
    let mut members = Vec::with_capacity(b.members.len() + delta.upsert.len());
    let mut index: HashMap<NodeId, usize> = HashMap::with_capacity(b.members.len());
    // The roster's decoded members are in the order of its entries.
    for (entry, m) in b.members.iter().zip(base.members()) {
        let id = m.cert.body().node_id;
        if !removed.contains(&id) {
            index.insert(id, members.len());
            members.push(entry.clone());
        }
    }
    for up in &delta.upsert {
        // An entry that does not decode is appended as is: verification of
        // the result refuses it.
        let id = crate::cert::NodeCert::from_bytes(&up.cert)
            .ok()
            .map(|c| c.body().node_id);
        match id.and_then(|id| index.get(&id).copied()) {
            Some(i) => members[i] = up.clone(),
            None => {
                if let Some(id) = id {
                    index.insert(id, members.len());
                }
                members.push(up.clone());
            }
        }
    }
    let mut revoked = b.revoked.clone();
    for fp in &delta.revoke {
        if !revoked.contains(fp) {
            revoked.push(*fp);
        }
    }
    let mut revoked_nodes = b.revoked_nodes.clone();
    for r in &delta.revoke_nodes {
        if !revoked_nodes.contains(r) {
            revoked_nodes.push(*r);
        }
    }
    RosterBody {
        version: ROSTER_VERSION,
        network_id: b.network_id.clone(),
        serial: delta.serial,
        issued_at: delta.issued_at,
        not_after: delta.not_after,
        issuer: b.issuer,
        signer: delta.signer,
        authorities: delta
            .authorities
            .clone()
            .unwrap_or_else(|| b.authorities.clone()),
        members,
        revoked,
        revoked_nodes,
        policy: match &delta.set_policy {
            Some(SetPolicy(policy)) => policy.clone(),
            None => b.policy.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::TrustError;
    use crate::cert::NodeCert;
    use crate::cert::tests::{DAY, T0, request, test_ca};
    use crate::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
    use crate::roster::tests::test_policy;
    use crate::roster::{Member, RosterContent};
    use crate::trust::{DEFAULT_MAX_CLOCK_SKEW, Trust};

    /// A network whose root CA certified one authority key, which signs the
    /// roster and every member certificate.
    struct Net {
        root_key: CaSigningKey,
        ca: CaCert,
        auth_key: CaSigningKey,
        auth: AuthorityCert,
        keys: Vec<(WgPrivateKey, NoisePrivateKey)>,
    }

    fn net() -> Net {
        let (root_key, ca) = test_ca("net-a");
        let (auth_key, auth) = authority(&ca, &root_key, "auth-1", T0 + 90 * DAY);
        Net {
            root_key,
            ca,
            auth_key,
            auth,
            keys: Vec::new(),
        }
    }

    fn authority(
        ca: &CaCert,
        root: &CaSigningKey,
        name: &str,
        not_after: UnixTime,
    ) -> (CaSigningKey, AuthorityCert) {
        let key = CaSigningKey::generate().unwrap();
        let cert = ca
            .certify_authority(root, name, key.verifying_key(), T0 - DAY, not_after)
            .unwrap();
        (key, cert)
    }

    impl Net {
        fn member(&mut self, i: u8) -> Member {
            let wg = WgPrivateKey::generate().unwrap();
            let noise = NoisePrivateKey::generate().unwrap();
            let mut r = request(&format!("n{i}"), &wg, &noise);
            r.addresses = vec![
                format!("10.99.{}.{}/32", i / 200, i % 200 + 1)
                    .parse()
                    .unwrap(),
            ];
            r.not_after = r.not_after.min(self.auth.body().not_after);
            self.keys.push((wg, noise));
            Member {
                cert: self.auth.issue(&self.auth_key, r).unwrap(),
                wg_endpoint: Some(format!("192.0.2.{i}:51820").parse().unwrap()),
                keyd_endpoint: None,
            }
        }

        fn signer(&self) -> Signer<'_> {
            Signer::Authority(&self.auth, &self.auth_key)
        }

        fn first(&mut self, n: u8) -> Roster {
            let members = (1..=n).map(|i| self.member(i)).collect();
            let content = RosterContent {
                serial: 1,
                issued_at: T0,
                not_after: T0 + DAY,
                authorities: vec![self.auth.clone()],
                members,
                ..RosterContent::default()
            };
            Roster::sign(&self.ca, &self.signer(), &content).unwrap()
        }

        fn next(&self, r: &Roster, change: &RosterChange) -> (Roster, RosterDelta) {
            r.next(&self.ca, &self.signer(), change, T0 + 1, T0 + DAY)
                .unwrap()
        }
    }

    fn renewed(m: &Member, auth: &AuthorityCert, key: &CaSigningKey, not_after: u64) -> Member {
        let c = m.cert.body();
        let cert = auth
            .issue(
                key,
                crate::cert::NodeCertRequest {
                    name: c.name.clone(),
                    addresses: c.addresses.clone(),
                    groups: c.groups.clone(),
                    attributes: c.attributes.clone(),
                    not_before: T0,
                    not_after,
                    wg_public: c.wg_public,
                    noise_public: c.noise_public,
                },
            )
            .unwrap();
        Member { cert, ..m.clone() }
    }

    fn trust(n: &Net, roster: &Roster) -> Trust {
        Trust {
            ca: Arc::new(n.ca.clone()),
            roster: Arc::new(roster.clone()),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            local: crate::identity::NodeId([0xee; 16]),
        }
    }

    fn present(t: &Trust, cert: &NodeCert, now: UnixTime) -> Result<(), TrustError> {
        t.verify_peer(&cert.to_bytes(), &cert.body().noise_public.0, now)
            .map(|_| ())
    }

    #[test]
    fn an_authority_signed_roster_and_its_members_verify() {
        let mut n = net();
        let r = n.first(3);
        let again = Roster::from_bytes(&r.to_bytes(), &n.ca).unwrap();
        assert_eq!(again.signer(), n.auth.fingerprint());
        assert_eq!(again.issuer(), n.ca.fingerprint());
        let t = trust(&n, &again);
        present(&t, &r.members()[1].cert, T0).unwrap();
        assert!(r.issued(&n.ca, &r.members()[0].cert));
    }

    #[test]
    fn a_delta_reproduces_the_signed_roster_and_is_small() {
        let mut n = net();
        let r1 = n.first(100);
        let new = n.member(101);
        let moved = Member {
            wg_endpoint: Some("198.51.100.7:51820".parse().unwrap()),
            ..r1.members()[4].clone()
        };
        let gone = r1.members()[9].cert.body().node_id;
        let change = RosterChange {
            upsert: vec![new, moved.clone()],
            remove: vec![gone],
            ..RosterChange::default()
        };
        let (r2, delta) = n.next(&r1, &change);
        let wire = delta.to_bytes();
        let applied = r1
            .apply(&RosterDelta::from_bytes(&wire).unwrap(), &n.ca)
            .unwrap();
        assert_eq!(applied.to_bytes(), r2.to_bytes());
        assert_eq!(applied.serial(), 2);
        assert_eq!(applied.members().len(), 100);
        assert_eq!(applied.members()[4], moved, "replaced in place");
        assert!(applied.member(&gone).is_none());
        // The change is two members; the roster a hundred.
        assert!(
            wire.len() * 10 < r2.to_bytes().len(),
            "delta {} bytes, roster {}",
            wire.len(),
            r2.to_bytes().len()
        );
    }

    fn set_policy(bytes: Option<Vec<u8>>) -> RosterChange {
        RosterChange {
            set_policy: Some(SetPolicy(bytes)),
            ..RosterChange::default()
        }
    }

    #[test]
    fn a_policy_is_set_changed_and_cleared_by_deltas() {
        let mut n = net();
        let r1 = n.first(3);
        assert_eq!(r1.policy(), None);
        let p1 = test_policy("web-to-db");
        let (r2, d2) = n.next(&r1, &set_policy(Some(p1.encode())));
        let node = r1
            .apply(&RosterDelta::from_bytes(&d2.to_bytes()).unwrap(), &n.ca)
            .unwrap();
        assert_eq!(node.to_bytes(), r2.to_bytes());
        assert_eq!(node.policy(), Some(&p1));
        assert_eq!(d2.set_policy(), Some(&SetPolicy(Some(p1.encode()))));
        // A delta that does not touch the policy keeps it.
        let m = n.member(9);
        let (r3, d3) = n.next(
            &r2,
            &RosterChange {
                upsert: vec![m],
                ..RosterChange::default()
            },
        );
        let node = node.apply(&d3, &n.ca).unwrap();
        assert_eq!(node.policy_bytes(), Some(p1.encode().as_slice()));
        // Replaced, then cleared: no firewall.
        let p2 = test_policy("web-to-db-v2");
        let (r4, d4) = n.next(&r3, &set_policy(Some(p2.encode())));
        let node = node.apply(&d4, &n.ca).unwrap();
        assert_eq!(node.policy(), Some(&p2));
        let (r5, d5) = n.next(&r4, &set_policy(None));
        let node = node.apply(&d5, &n.ca).unwrap();
        assert_eq!(node.policy(), None);
        assert_eq!(node.to_bytes(), r5.to_bytes());
    }

    #[test]
    fn policy_deltas_are_refused_on_replay_fork_and_alteration() {
        let mut n = net();
        let r1 = n.first(2);
        let (r2, d2) = n.next(&r1, &set_policy(Some(test_policy("a").encode())));
        // Replayed on the roster it produced.
        assert_eq!(
            r2.apply(&d2, &n.ca).unwrap_err(),
            RosterError::DeltaGap {
                current: 2,
                from: 1
            }
        );
        // A fork: another serial 2 with another policy; the delta after it
        // does not apply to ours.
        let (r2b, _) = n.next(&r1, &set_policy(Some(test_policy("b").encode())));
        let (_, d3b) = n.next(&r2b, &set_policy(None));
        assert_eq!(
            r2.apply(&d3b, &n.ca).unwrap_err(),
            RosterError::DeltaBase { serial: 3 }
        );
        // On the path: the policy swapped, or the clearing dropped.
        let mut swapped = d2.clone();
        swapped.0.body.set_policy = Some(SetPolicy(Some(test_policy("c").encode())));
        assert_eq!(
            r1.apply(&swapped, &n.ca).unwrap_err(),
            RosterError::BadSignature
        );
        let (_, clear) = n.next(&r2, &set_policy(None));
        let mut kept = clear.clone();
        kept.0.body.set_policy = None;
        assert_eq!(
            r2.apply(&kept, &n.ca).unwrap_err(),
            RosterError::BadSignature
        );
    }

    #[test]
    fn a_policy_that_does_not_decode_is_never_signed_nor_applied() {
        let mut n = net();
        let r1 = n.first(2);
        let garbage = Some(vec![0xff; 12]);
        assert!(matches!(
            r1.next(
                &n.ca,
                &n.signer(),
                &set_policy(garbage.clone()),
                T0 + 1,
                T0 + DAY
            ),
            Err(RosterError::Policy(_))
        ));
        // An authority that signs one anyway: nodes refuse it by its policy.
        let (_, valid) = n.next(&r1, &set_policy(None));
        let mut body = valid.0.body.clone();
        body.set_policy = Some(SetPolicy(garbage));
        let signed = Signed::sign(ROSTER_DOMAIN, apply_ops(&r1, &body), &n.auth_key).unwrap();
        let forged = RosterDelta(DeltaWire {
            body,
            signature: signed.signature().to_vec(),
        });
        assert!(matches!(
            r1.apply(&forged, &n.ca),
            Err(RosterError::Policy(_))
        ));
    }

    #[test]
    fn a_version_1_delta_is_refused_by_its_version() {
        let mut n = net();
        let r1 = n.first(1);
        let (_, d) = n.next(&r1, &RosterChange::default());
        let mut bytes = d.to_bytes();
        bytes[0] = 1;
        assert_eq!(
            RosterDelta::from_bytes(&bytes).unwrap_err(),
            RosterError::Codec(CodecError::Version {
                found: 1,
                supported: DELTA_VERSION
            })
        );
    }

    #[test]
    fn gaps_replays_and_forks_are_refused() {
        let mut n = net();
        let r1 = n.first(3);
        let (r2, d12) = n.next(&r1, &RosterChange::default());
        let (_r3, d23) = n.next(&r2, &RosterChange::default());
        assert_eq!(
            r1.apply(&d23, &n.ca).unwrap_err(),
            RosterError::DeltaGap {
                current: 1,
                from: 2
            }
        );
        assert_eq!(
            r2.apply(&d12, &n.ca).unwrap_err(),
            RosterError::DeltaGap {
                current: 2,
                from: 1
            }
        );
        // Another serial-2 roster, forked from the same serial 1: its delta
        // onward does not apply to ours.
        let m = n.member(9);
        let (r2b, _) = n.next(
            &r1,
            &RosterChange {
                upsert: vec![m],
                ..RosterChange::default()
            },
        );
        let (_, d2b3) = n.next(&r2b, &RosterChange::default());
        assert_eq!(
            r2.apply(&d2b3, &n.ca).unwrap_err(),
            RosterError::DeltaBase { serial: 3 }
        );
    }

    #[test]
    fn an_altered_or_forged_delta_is_refused() {
        let mut n = net();
        let r1 = n.first(3);
        let mut victim = r1.members()[1].clone();
        victim.wg_endpoint = Some("203.0.113.66:51820".parse().unwrap());
        let (_, delta) = n.next(
            &r1,
            &RosterChange {
                upsert: vec![victim],
                ..RosterChange::default()
            },
        );
        // An attacker on the path redirects the endpoint.
        let mut altered = delta.clone();
        altered.0.body.upsert[0].wg_endpoint = Some("203.0.113.99:51820".parse().unwrap());
        assert_eq!(
            r1.apply(&altered, &n.ca).unwrap_err(),
            RosterError::BadSignature
        );
        // Or drops a revocation it carries.
        let (_, revoking) = n.next(
            &r1,
            &RosterChange {
                remove: vec![r1.members()[2].cert.body().node_id],
                ..RosterChange::default()
            },
        );
        let mut dropped = revoking.clone();
        dropped.0.body.remove.clear();
        assert_eq!(
            r1.apply(&dropped, &n.ca).unwrap_err(),
            RosterError::BadSignature
        );
        // A delta signed by a key the root never certified.
        let (rogue_root, rogue_ca) = test_ca("net-a");
        let (_, rogue_auth) = authority(&rogue_ca, &rogue_root, "x", T0 + DAY);
        let mut forged = delta.clone();
        forged.0.body.signer = rogue_auth.fingerprint();
        assert!(matches!(
            r1.apply(&forged, &n.ca).unwrap_err(),
            RosterError::UnknownSigner { .. }
        ));
        // Garbage.
        assert!(RosterDelta::from_bytes(&[1, 2, 3]).is_err());
    }

    #[test]
    fn revoking_a_node_refuses_every_certificate_it_ever_had() {
        let mut n = net();
        let r1 = n.first(3);
        let old = r1.members()[1].clone();
        // Renewed: same keys, new certificate (new fingerprint).
        let new = renewed(&old, &n.auth, &n.auth_key, T0 + 40 * DAY);
        assert_ne!(new.cert.fingerprint(), old.cert.fingerprint());
        let (r2, _) = n.next(
            &r1,
            &RosterChange {
                upsert: vec![new.clone()],
                ..RosterChange::default()
            },
        );
        present(&trust(&n, &r2), &new.cert, T0).unwrap();
        let c = new.cert.body();
        let (r3, _) = n.next(
            &r2,
            &RosterChange {
                remove: vec![c.node_id],
                revoke_nodes: vec![RevokedNode {
                    node_id: c.node_id,
                    wg_public: c.wg_public,
                    noise_public: c.noise_public,
                }],
                ..RosterChange::default()
            },
        );
        for cert in [&old.cert, &new.cert] {
            assert!(r3.revokes(cert));
            assert!(matches!(
                present(&trust(&n, &r3), cert, T0),
                Err(TrustError::Revoked { .. })
            ));
        }
        // A roster that lists the revoked node again still refuses it.
        let (r4, _) = n.next(
            &r3,
            &RosterChange {
                upsert: vec![new.clone()],
                ..RosterChange::default()
            },
        );
        assert!(matches!(
            present(&trust(&n, &r4), &new.cert, T0),
            Err(TrustError::Revoked { .. })
        ));
    }

    #[test]
    fn the_authority_key_rolls_over_without_a_gap() {
        let mut n = net();
        let r1 = n.first(3);
        let (k2, a2) = authority(&n.ca, &n.root_key, "auth-2", T0 + 180 * DAY);
        // 1. List the new key (still signed by the old one).
        let (r2, d2) = n.next(
            &r1,
            &RosterChange {
                authorities: Some(vec![n.auth.clone(), a2.clone()]),
                ..RosterChange::default()
            },
        );
        // 2. The new key signs, and reissues every member.
        let reissued: Vec<Member> = r2
            .members()
            .iter()
            .map(|m| renewed(m, &a2, &k2, T0 + 30 * DAY))
            .collect();
        let signer2 = Signer::Authority(&a2, &k2);
        let change = RosterChange {
            upsert: reissued.clone(),
            ..RosterChange::default()
        };
        let (r3, d3) = r2.next(&n.ca, &signer2, &change, T0 + 2, T0 + DAY).unwrap();
        // Old and new certificates both pass while both keys are listed.
        let t3 = trust(&n, &r3);
        present(&t3, &r3.members()[0].cert, T0).unwrap();
        assert_eq!(r3.members()[0], reissued[0]);
        assert!(
            r3.issued(&n.ca, &r1.members()[0].cert),
            "old key still listed"
        );
        // 3. The old key is dropped.
        let drop_old = RosterChange {
            authorities: Some(vec![a2.clone()]),
            ..RosterChange::default()
        };
        let (r4, d4) = r3
            .next(&n.ca, &signer2, &drop_old, T0 + 3, T0 + DAY)
            .unwrap();
        // A node following along applies all three.
        let mut node = r1.clone();
        for d in [&d2, &d3, &d4] {
            node = node.apply(d, &n.ca).unwrap();
        }
        assert_eq!(node.to_bytes(), r4.to_bytes());
        assert_eq!(node.signer(), a2.fingerprint());
        present(&trust(&n, &node), &reissued[1].cert, T0).unwrap();
        // A certificate of the dropped key is refused now.
        assert!(matches!(
            present(&trust(&n, &node), &r1.members()[1].cert, T0),
            Err(TrustError::UnknownCa { .. })
        ));
        // Dropping the old key while members still hold its certificates
        // would strand them: refused when signing.
        assert!(matches!(
            r2.next(&n.ca, &signer2, &drop_old, T0 + 2, T0 + DAY),
            Err(RosterError::MemberNotFromCa { .. })
        ));
    }

    #[test]
    fn an_expired_authority_key_issues_nothing_that_passes() {
        let (root_key, ca) = test_ca("net-a");
        let (auth_key, auth) = authority(&ca, &root_key, "short", T0 + 2 * DAY);
        let mut n = Net {
            root_key,
            ca,
            auth_key,
            auth,
            keys: Vec::new(),
        };
        let r = n.first(2);
        let t = trust(&n, &r);
        present(&t, &r.members()[0].cert, T0).unwrap();
        let later = T0 + 2 * DAY + DEFAULT_MAX_CLOCK_SKEW + 1;
        let mut t_later = t.clone();
        // The roster itself is fresh at `later`, only the key is not.
        let (fresh, _) = r
            .next(
                &n.ca,
                &n.signer(),
                &RosterChange::default(),
                T0 + DAY,
                later + DAY,
            )
            .unwrap();
        t_later.roster = Arc::new(fresh);
        assert!(matches!(
            present(&t_later, &r.members()[0].cert, later),
            Err(TrustError::IssuerExpired { .. })
        ));
    }

    fn authority_from(
        n: &Net,
        name: &str,
        not_before: UnixTime,
        not_after: UnixTime,
    ) -> (CaSigningKey, AuthorityCert) {
        let key = CaSigningKey::generate().unwrap();
        let cert =
            n.ca.certify_authority(
                &n.root_key,
                name,
                key.verifying_key(),
                not_before,
                not_after,
            )
            .unwrap();
        (key, cert)
    }

    /// A roster a thief signs with `key`, listing its certificate and
    /// dropping every revocation, back-dated into the key's window.
    fn forged(held: &Roster, n: &Net, cert: &AuthorityCert, key: &CaSigningKey) -> Roster {
        let mut content = held.content();
        content.serial = held.serial() + 1_000_000;
        content.issued_at = cert.body().not_before + 1;
        content.not_after = T0 + 3650 * DAY;
        content.authorities = vec![cert.clone()];
        content.revoked_nodes.clear();
        // Members issued by other keys would not verify: keep the thief's own.
        content
            .members
            .retain(|m| m.cert.body().issuer == cert.fingerprint());
        Roster::sign(&n.ca, &Signer::Authority(cert, key), &content).unwrap()
    }

    #[test]
    fn an_expired_authority_key_cannot_sign_a_roster_nodes_take() {
        let mut n = net();
        let held = n.first(2);
        // A key the root certified long ago, expired since; its thief
        // back-dates a roster into its window. On its own the roster
        // verifies (it vouches for its own signer)...
        let (old_key, old) = authority_from(&n, "old", T0 - DAY, T0 - DAY + 3600);
        let bad = forged(&held, &n, &old, &old_key);
        assert!(Roster::from_bytes(&bad.to_bytes(), &n.ca).is_ok());
        // ...but no node takes it in place of what it holds, nor at start.
        assert!(matches!(
            Roster::check_update(Some(&held), &bad, T0, 300),
            Err(RosterError::SignerNotValidNow { .. })
        ));
        assert!(matches!(
            bad.check_signer(None, T0, 300),
            Err(RosterError::SignerNotValidNow { .. })
        ));
    }

    #[test]
    fn a_dropped_authority_key_signs_nothing_after_the_drop() {
        let mut n = net();
        let r1 = n.first(2);
        let old = (
            n.auth.clone(),
            CaSigningKey::from_text(&n.auth_key.to_text()).unwrap(),
        );
        // Rolled over: A2 listed, signs, reissues, drops A1.
        let (k2, a2) = authority_from(&n, "auth-2", T0 - 10, T0 + 180 * DAY);
        let (r2, _) = n.next(
            &r1,
            &RosterChange {
                authorities: Some(vec![n.auth.clone(), a2.clone()]),
                ..RosterChange::default()
            },
        );
        let s2 = Signer::Authority(&a2, &k2);
        let reissued = r2
            .members()
            .iter()
            .map(|m| renewed(m, &a2, &k2, T0 + 30 * DAY))
            .collect();
        let (r3, _) = r2
            .next(
                &n.ca,
                &s2,
                &RosterChange {
                    upsert: reissued,
                    ..RosterChange::default()
                },
                T0 + 2,
                T0 + DAY,
            )
            .unwrap();
        let (r4, _) = r3
            .next(
                &n.ca,
                &s2,
                &RosterChange {
                    authorities: Some(vec![a2.clone()]),
                    ..RosterChange::default()
                },
                T0 + 3,
                T0 + DAY,
            )
            .unwrap();
        // Each step passes the signer rule for a node following along.
        for (held, next) in [(&r1, &r2), (&r2, &r3), (&r3, &r4)] {
            assert_eq!(
                Roster::check_update(Some(held), next, T0 + 4, 300),
                Ok(true)
            );
        }
        // The old key is still inside its validity, but dropped: a roster
        // its thief signs is refused by a node that saw the drop.
        let bad = forged(&r1, &n, &old.0, &old.1);
        assert!(matches!(
            Roster::check_update(Some(&r4), &bad, T0 + 5, 300),
            Err(RosterError::SignerNotTrusted { .. })
        ));
    }

    #[test]
    fn a_node_that_slept_through_rollovers_takes_the_newest_key() {
        let mut n = net();
        let held = n.first(2);
        // While it slept, the root certified a key after its roster was
        // issued, and everything else changed.
        let (k3, a3) = authority_from(&n, "auth-3", T0 + 100, T0 + 180 * DAY);
        let reissued = held
            .members()
            .iter()
            .map(|m| {
                let c = m.cert.body();
                let cert = a3
                    .issue(
                        &k3,
                        crate::cert::NodeCertRequest {
                            name: c.name.clone(),
                            addresses: c.addresses.clone(),
                            groups: c.groups.clone(),
                            attributes: c.attributes.clone(),
                            not_before: T0 + 100,
                            not_after: T0 + 30 * DAY,
                            wg_public: c.wg_public,
                            noise_public: c.noise_public,
                        },
                    )
                    .unwrap();
                Member { cert, ..m.clone() }
            })
            .collect();
        let content = RosterContent {
            serial: 40,
            issued_at: T0 + 200,
            not_after: T0 + DAY,
            authorities: vec![a3.clone()],
            members: reissued,
            ..RosterContent::default()
        };
        let snapshot = Roster::sign(&n.ca, &Signer::Authority(&a3, &k3), &content).unwrap();
        assert_eq!(
            Roster::check_update(Some(&held), &snapshot, T0 + 300, 300),
            Ok(true)
        );
    }

    #[test]
    fn a_key_certified_just_after_the_held_roster_counts_despite_its_backdate() {
        let mut n = net();
        let held = n.first(2);
        // Certified 10 s after the held roster was issued, its not_before
        // back-dated by AUTHORITY_BACKDATE: before the roster's issue time.
        let certified = held.issued_at() + 10;
        let not_before = certified - crate::cert::AUTHORITY_BACKDATE;
        assert!(not_before <= held.issued_at());
        let (k, a) = authority_from(&n, "auth-x", not_before, T0 + 180 * DAY);
        let content = RosterContent {
            serial: held.serial() + 3,
            issued_at: certified + 5,
            not_after: T0 + DAY,
            authorities: vec![a.clone()],
            members: vec![],
            ..RosterContent::default()
        };
        let snapshot = Roster::sign(&n.ca, &Signer::Authority(&a, &k), &content).unwrap();
        assert_eq!(
            Roster::check_update(Some(&held), &snapshot, certified + 10, 300),
            Ok(true)
        );
    }
}
