//! The signed roster: who is in the network, where to reach them, and which
//! certificates are revoked, under a serial that only goes up.
//!
//! A roster is accepted only whole: CA signature, network, and every member
//! certificate signed by the same CA for the same network, with no node id,
//! name, key or overlay address listed twice. [`Roster::check_update`] refuses
//! a roster older than the one in use (rollback protection).
//!
//! A roster also expires (`not_after`, chosen by the CA): a node cut off from
//! updates would otherwise trust peers revoked since forever. Past its expiry
//! (plus the clock skew tolerated for certificates) [`Roster::check_fresh`]
//! refuses it and [`crate::trust::Trust::verify_peer`] accepts no peer.
//!
//! A roster may carry the network's firewall policy (the canonical bytes of
//! [`Policy::encode`]), signed and serialed with the membership. A roster
//! whose policy does not decode is refused whole, when signed and when
//! verified.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::cert::{AuthorityCert, CaCert, NodeCert};
use crate::firewall::policy::Policy;
use crate::identity::{CaSigningKey, NodeId, NoisePublicKey, WgPublicKey};
use crate::signed::{Fingerprint, Signed};
use crate::{CodecError, RosterError, UnixTime, armor};

/// 3: the body lists authority certificates, names its signer and revokes
/// nodes by id and keys. 4: the firewall policy. Older rosters are refused
/// with [`CodecError::Version`].
pub const ROSTER_VERSION: u8 = 4;
pub const ROSTER_LABEL: &str = "PQMESH ROSTER";
pub(crate) const ROSTER_DOMAIN: &[u8] = b"pqmesh roster v1\0";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MemberEntry {
    pub(crate) cert: Vec<u8>,
    pub(crate) wg_endpoint: Option<SocketAddr>,
    pub(crate) keyd_endpoint: Option<SocketAddr>,
}

/// A node revoked as a whole: every certificate carrying this id or either
/// key is refused, whatever its bytes (a re-encoded or renewed certificate
/// has another fingerprint but the same keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RevokedNode {
    pub node_id: NodeId,
    pub wg_public: WgPublicKey,
    pub noise_public: NoisePublicKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterBody {
    pub(crate) version: u8,
    pub(crate) network_id: String,
    pub(crate) serial: u64,
    pub(crate) issued_at: UnixTime,
    pub(crate) not_after: UnixTime,
    /// The root CA: names the network's trust anchor.
    pub(crate) issuer: Fingerprint,
    /// Who signed this roster: the root CA or one of `authorities`.
    pub(crate) signer: Fingerprint,
    /// Authority certificates (signed by the root) whose keys may sign node
    /// certificates and rosters while they are listed and valid.
    pub(crate) authorities: Vec<Vec<u8>>,
    pub(crate) members: Vec<MemberEntry>,
    pub(crate) revoked: Vec<Fingerprint>,
    pub(crate) revoked_nodes: Vec<RevokedNode>,
    /// [`Policy::encode`] of the network's firewall policy; None: no
    /// firewall (everything passes).
    pub(crate) policy: Option<Vec<u8>>,
}

/// One member of the network and its underlay endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub cert: NodeCert,
    /// Where its WireGuard data plane listens (UDP).
    pub wg_endpoint: Option<SocketAddr>,
    /// Where its keyd listens (QUIC).
    pub keyd_endpoint: Option<SocketAddr>,
}

impl Member {
    pub(crate) fn entry(&self) -> MemberEntry {
        MemberEntry {
            cert: self.cert.to_bytes(),
            wg_endpoint: self.wg_endpoint,
            keyd_endpoint: self.keyd_endpoint,
        }
    }
}

/// The key that signs a roster: the root CA's, or an authority's that the
/// root certified.
pub enum Signer<'a> {
    Root(&'a CaSigningKey),
    Authority(&'a AuthorityCert, &'a CaSigningKey),
}

impl Signer<'_> {
    /// The signing key, checked to belong to its certificate, and the
    /// fingerprint a roster names as its signer.
    pub(crate) fn checked(&self, ca: &CaCert) -> Result<(&CaSigningKey, Fingerprint), RosterError> {
        match self {
            Signer::Root(key) => {
                ca.check_key(key).map_err(RosterError::Signing)?;
                Ok((key, ca.fingerprint()))
            }
            Signer::Authority(a, key) => {
                a.check_key(key).map_err(RosterError::Signing)?;
                Ok((key, a.fingerprint()))
            }
        }
    }
}

/// What a roster says, before it is signed.
#[derive(Clone, Debug, Default)]
pub struct RosterContent {
    pub serial: u64,
    pub issued_at: UnixTime,
    pub not_after: UnixTime,
    pub authorities: Vec<AuthorityCert>,
    pub members: Vec<Member>,
    pub revoked: Vec<Fingerprint>,
    pub revoked_nodes: Vec<RevokedNode>,
    /// [`Policy::encode`] of the firewall policy, or None for no firewall.
    pub policy: Option<Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct Roster {
    signed: Signed<RosterBody>,
    /// The decoded (and validated) `policy` of the body.
    policy: Option<Policy>,
    authorities: Vec<AuthorityCert>,
    members: Vec<Member>,
    revoked: HashSet<Fingerprint>,
    revoked_ids: HashSet<NodeId>,
    revoked_wg: HashSet<WgPublicKey>,
    revoked_noise: HashSet<NoisePublicKey>,
}

impl Roster {
    /// Builds and signs a roster with the root CA's key, valid until
    /// `not_after` (which must be after `issued_at`). Members must be
    /// certificates of this CA. The offline tooling's way to make one.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        ca: &CaCert,
        key: &CaSigningKey,
        serial: u64,
        issued_at: UnixTime,
        not_after: UnixTime,
        members: Vec<Member>,
        revoked: Vec<Fingerprint>,
    ) -> Result<Self, RosterError> {
        let content = RosterContent {
            serial,
            issued_at,
            not_after,
            members,
            revoked,
            ..RosterContent::default()
        };
        Self::sign(ca, &Signer::Root(key), &content)
    }

    /// Signs `content` with `signer`, then verifies the result as a node
    /// would: what is signed here is exactly what nodes will accept.
    pub fn sign(
        ca: &CaCert,
        signer: &Signer<'_>,
        content: &RosterContent,
    ) -> Result<Self, RosterError> {
        let (key, signer) = signer.checked(ca)?;
        // Refused before anything is signed.
        decode_policy(content.policy.as_deref(), None)?;
        let body = body_of(ca, signer, content);
        let signed = Signed::sign(ROSTER_DOMAIN, body, key).map_err(RosterError::Signing)?;
        Self::verify(signed, ca, None)
    }

    /// Decodes and fully verifies a roster against the configured CA.
    pub fn from_bytes(bytes: &[u8], ca: &CaCert) -> Result<Self, RosterError> {
        Self::verify(decode(bytes)?, ca, None)
    }

    /// Checks every rule on a decoded roster. Member certificates whose exact
    /// bytes `previous` already verified are not verified again (a delta
    /// changes a few members of many), but their issuer must still be listed.
    pub(crate) fn verify(
        signed: Signed<RosterBody>,
        ca: &CaCert,
        previous: Option<&Roster>,
    ) -> Result<Self, RosterError> {
        let body = &signed.body;
        if body.issuer != ca.fingerprint() {
            return Err(RosterError::WrongIssuer {
                expected: ca.fingerprint().to_hex(),
                found: body.issuer.to_hex(),
            });
        }
        if body.network_id != ca.body().network_id {
            return Err(RosterError::WrongNetwork {
                expected: ca.body().network_id.clone(),
                found: body.network_id.clone(),
            });
        }
        let authorities = body
            .authorities
            .iter()
            .enumerate()
            .map(|(index, bytes)| {
                AuthorityCert::from_bytes(bytes, ca)
                    .map_err(|source| RosterError::Authority { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let signer_key = if body.signer == ca.fingerprint() {
            ca.body().public_key
        } else {
            let a = authorities
                .iter()
                .find(|a| a.fingerprint() == body.signer)
                .ok_or_else(|| RosterError::UnknownSigner {
                    signer: body.signer.to_hex(),
                })?;
            let b = a.body();
            if body.issued_at < b.not_before || body.issued_at > b.not_after {
                return Err(RosterError::SignerExpired {
                    signer: a.fingerprint().to_hex(),
                    issued_at: body.issued_at,
                });
            }
            b.public_key
        };
        if !signed.verify(&signer_key) {
            return Err(RosterError::BadSignature);
        }
        if body.not_after <= body.issued_at {
            return Err(RosterError::Validity {
                issued_at: body.issued_at,
                not_after: body.not_after,
            });
        }
        let known: HashSet<&[u8]> = previous
            .map(|p| {
                p.signed
                    .body
                    .members
                    .iter()
                    .map(|e| e.cert.as_slice())
                    .collect()
            })
            .unwrap_or_default();
        let issuers: HashMap<Fingerprint, [u8; 32]> = authorities
            .iter()
            .map(|a| (a.fingerprint(), a.body().public_key))
            .chain([(ca.fingerprint(), ca.body().public_key)])
            .collect();
        let members = decode_members(&body.members)?;
        for (index, (m, entry)) in members.iter().zip(&body.members).enumerate() {
            let c = m.cert.body();
            let signed_by_issuer = issuers.get(&c.issuer).is_some_and(|key| {
                known.contains(entry.cert.as_slice()) || m.cert.verify_signature(key)
            });
            if !signed_by_issuer {
                return Err(RosterError::MemberNotFromCa {
                    index,
                    name: c.name.clone(),
                });
            }
            if c.network_id != body.network_id {
                return Err(RosterError::MemberWrongNetwork {
                    index,
                    name: c.name.clone(),
                    found: c.network_id.clone(),
                });
            }
        }
        check_unique(&members)?;
        let policy = decode_policy(body.policy.as_deref(), previous)?;
        let revoked = body.revoked.iter().copied().collect();
        let revoked_ids = body.revoked_nodes.iter().map(|r| r.node_id).collect();
        let revoked_wg = body.revoked_nodes.iter().map(|r| r.wg_public).collect();
        let revoked_noise = body.revoked_nodes.iter().map(|r| r.noise_public).collect();
        Ok(Self {
            signed,
            policy,
            authorities,
            members,
            revoked,
            revoked_ids,
            revoked_wg,
            revoked_noise,
        })
    }

    pub fn from_text(text: &str, ca: &CaCert) -> Result<Self, RosterError> {
        Self::from_bytes(&armor::decode(ROSTER_LABEL, text)?, ca)
    }

    /// Decodes without checking any signature: only for showing a roster to a
    /// person (`keyd inspect` without `--ca`). Never trust what this returns.
    pub fn decode_unverified(bytes: &[u8]) -> Result<Self, RosterError> {
        let signed = decode(bytes)?;
        let members = decode_members(&signed.body.members)?;
        let policy = decode_policy(signed.body.policy.as_deref(), None)?;
        let b = &signed.body;
        Ok(Self {
            policy,
            authorities: Vec::new(),
            members,
            revoked: b.revoked.iter().copied().collect(),
            revoked_ids: b.revoked_nodes.iter().map(|r| r.node_id).collect(),
            revoked_wg: b.revoked_nodes.iter().map(|r| r.wg_public).collect(),
            revoked_noise: b.revoked_nodes.iter().map(|r| r.noise_public).collect(),
            signed,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.signed.to_bytes()
    }

    pub fn to_text(&self) -> String {
        armor::encode(ROSTER_LABEL, &self.to_bytes())
    }

    pub fn serial(&self) -> u64 {
        self.signed.body.serial
    }

    pub fn issued_at(&self) -> UnixTime {
        self.signed.body.issued_at
    }

    /// The end of the validity the CA chose for this roster.
    pub fn not_after(&self) -> UnixTime {
        self.signed.body.not_after
    }

    /// Refuses a roster past its expiry by more than `max_clock_skew`
    /// seconds, the same tolerance certificates get.
    pub fn check_fresh(&self, now: UnixTime, max_clock_skew: u64) -> Result<(), RosterError> {
        let not_after = self.not_after();
        if past_expiry(not_after, now, max_clock_skew) {
            return Err(RosterError::Expired {
                serial: self.serial(),
                not_after,
                now,
            });
        }
        Ok(())
    }

    pub fn network_id(&self) -> &str {
        &self.signed.body.network_id
    }

    /// The root CA's fingerprint.
    pub fn issuer(&self) -> Fingerprint {
        self.signed.body.issuer
    }

    /// Who signed this roster: the root CA or a listed authority.
    pub fn signer(&self) -> Fingerprint {
        self.signed.body.signer
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.signed.fingerprint()
    }

    pub fn authorities(&self) -> &[AuthorityCert] {
        &self.authorities
    }

    /// The listed authority certificate with fingerprint `fp`.
    pub fn authority(&self, fp: &Fingerprint) -> Option<&AuthorityCert> {
        self.authorities.iter().find(|a| a.fingerprint() == *fp)
    }

    /// Was `cert` signed by the root CA or an authority this roster lists?
    /// (Issuer and signature only; validity and revocation are checked by
    /// [`crate::trust`].)
    pub fn issued(&self, ca: &CaCert, cert: &NodeCert) -> bool {
        ca.signed(cert)
            || self
                .authority(&cert.body().issuer)
                .is_some_and(|a| a.signed(cert))
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The firewall policy's canonical bytes ([`Policy::encode`]) as signed;
    /// None: the network has no firewall.
    pub fn policy_bytes(&self) -> Option<&[u8]> {
        self.signed.body.policy.as_deref()
    }

    /// The firewall policy, decoded and validated when the roster was.
    pub fn policy(&self) -> Option<&Policy> {
        self.policy.as_ref()
    }

    pub fn revoked(&self) -> impl Iterator<Item = &Fingerprint> {
        self.signed.body.revoked.iter()
    }

    pub fn revoked_nodes(&self) -> &[RevokedNode] {
        &self.signed.body.revoked_nodes
    }

    pub fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.cert.body().node_id == *id)
    }

    /// Is this exact certificate on the revocation list?
    pub fn is_revoked(&self, fp: &Fingerprint) -> bool {
        self.revoked.contains(fp)
    }

    /// Is `cert` revoked by its fingerprint, its node id or either key?
    pub fn revokes(&self, cert: &NodeCert) -> bool {
        let c = cert.body();
        self.revoked.contains(&cert.fingerprint())
            || self.revoked_ids.contains(&c.node_id)
            || self.revoked_wg.contains(&c.wg_public)
            || self.revoked_noise.contains(&c.noise_public)
    }

    /// The content this roster was signed from, to derive the next one.
    pub fn content(&self) -> RosterContent {
        let b = &self.signed.body;
        RosterContent {
            serial: b.serial,
            issued_at: b.issued_at,
            not_after: b.not_after,
            authorities: self.authorities.clone(),
            members: self.members.clone(),
            revoked: b.revoked.clone(),
            revoked_nodes: b.revoked_nodes.clone(),
            policy: b.policy.clone(),
        }
    }

    pub(crate) fn signed(&self) -> &Signed<RosterBody> {
        &self.signed
    }

    /// Rollback protection: may `offered` replace `current`? `Ok(true)` if it
    /// is newer (and its signer passes [`Roster::check_signer`]), `Ok(false)`
    /// if it is the same roster again.
    pub fn check_update(
        current: Option<&Roster>,
        offered: &Roster,
        now: UnixTime,
        max_clock_skew: u64,
    ) -> Result<bool, RosterError> {
        if let Some(current) = current {
            match offered.serial().cmp(&current.serial()) {
                std::cmp::Ordering::Less => {
                    return Err(RosterError::Rollback {
                        current: current.serial(),
                        offered: offered.serial(),
                    });
                }
                std::cmp::Ordering::Equal if offered.fingerprint() == current.fingerprint() => {
                    return Ok(false);
                }
                std::cmp::Ordering::Equal => {
                    return Err(RosterError::SerialReuse {
                        serial: offered.serial(),
                    });
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        offered.check_signer(current, now, max_clock_skew)?;
        Ok(true)
    }

    /// May this roster's signer replace `held`? A roster vouches for its own
    /// authorities, so on its own it would let any key the root ever
    /// certified sign again, its issue time back-dated into that key's
    /// window. Hence: the root may always sign; an authority key only while
    /// it is valid now (± skew), and only if the held roster lists it or the
    /// root certified it after the held roster was issued (a node that slept
    /// through rollovers). A key the operator dropped, or one that expired,
    /// signs nothing a node takes.
    pub fn check_signer(
        &self,
        held: Option<&Roster>,
        now: UnixTime,
        max_clock_skew: u64,
    ) -> Result<(), RosterError> {
        let signer = self.signer();
        if signer == self.issuer() {
            return Ok(());
        }
        let Some(a) = self.authority(&signer) else {
            // Verification found it listed; a roster decoded without
            // verification has no authorities and is never trusted.
            return Err(RosterError::UnknownSigner {
                signer: signer.to_hex(),
            });
        };
        if !a.is_valid_at(now, max_clock_skew) {
            return Err(RosterError::SignerNotValidNow {
                signer: signer.to_hex(),
                not_before: a.body().not_before,
                not_after: a.body().not_after,
                now,
            });
        }
        if let Some(held) = held
            && held.authority(&signer).is_none()
            && a.body()
                .not_before
                .saturating_add(crate::cert::AUTHORITY_BACKDATE)
                <= held.issued_at()
        {
            return Err(RosterError::SignerNotTrusted {
                signer: signer.to_hex(),
                held: held.serial(),
            });
        }
        Ok(())
    }
}

/// The body `signer` signs for `content`.
fn body_of(ca: &CaCert, signer: Fingerprint, content: &RosterContent) -> RosterBody {
    RosterBody {
        version: ROSTER_VERSION,
        network_id: ca.body().network_id.clone(),
        serial: content.serial,
        issued_at: content.issued_at,
        not_after: content.not_after,
        issuer: ca.fingerprint(),
        signer,
        authorities: content.authorities.iter().map(|a| a.to_bytes()).collect(),
        members: content.members.iter().map(Member::entry).collect(),
        revoked: content.revoked.clone(),
        revoked_nodes: content.revoked_nodes.clone(),
        policy: content.policy.clone(),
    }
}

/// Decodes (and so validates) a roster's policy bytes. The same bytes as
/// `previous` carried are not decoded again: a delta that leaves the policy
/// alone costs no rule walk.
pub(crate) fn decode_policy(
    bytes: Option<&[u8]>,
    previous: Option<&Roster>,
) -> Result<Option<Policy>, RosterError> {
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    if let Some(p) = previous
        && p.policy_bytes() == Some(bytes)
    {
        return Ok(p.policy.clone());
    }
    Policy::decode(bytes).map(Some).map_err(RosterError::Policy)
}

/// Decodes the envelope, checking the body's version before its layout: an
/// older roster gets the version error, not a confusing decode error.
pub(crate) fn decode(bytes: &[u8]) -> Result<Signed<RosterBody>, RosterError> {
    let version = Signed::<RosterBody>::body_version(bytes)?;
    if version != ROSTER_VERSION {
        return Err(CodecError::Version {
            found: version,
            supported: ROSTER_VERSION,
        }
        .into());
    }
    Ok(Signed::<RosterBody>::decode(ROSTER_DOMAIN, bytes)?)
}

fn decode_members(entries: &[MemberEntry]) -> Result<Vec<Member>, RosterError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let cert = NodeCert::from_bytes(&e.cert)
                .map_err(|source| RosterError::Member { index, source })?;
            Ok(Member {
                cert,
                wg_endpoint: e.wg_endpoint,
                keyd_endpoint: e.keyd_endpoint,
            })
        })
        .collect()
}

fn check_unique(members: &[Member]) -> Result<(), RosterError> {
    let mut ids = HashSet::new();
    let mut names = HashSet::new();
    let mut wg = HashSet::new();
    let mut noise = HashSet::new();
    let mut addrs = HashSet::new();
    for m in members {
        let c = m.cert.body();
        let dup = |what: &'static str, value: String| RosterError::Duplicate { what, value };
        if !ids.insert(c.node_id) {
            return Err(dup("node id", c.node_id.to_string()));
        }
        if !names.insert(c.name.clone()) {
            return Err(dup("name", c.name.clone()));
        }
        if !wg.insert(c.wg_public) {
            return Err(dup("WireGuard key", c.wg_public.to_base64()));
        }
        if !noise.insert(c.noise_public) {
            return Err(dup("Noise key", c.noise_public.to_base64()));
        }
        for a in &c.addresses {
            if !addrs.insert(a.addr) {
                return Err(dup("overlay address", a.addr.to_string()));
            }
        }
    }
    Ok(())
}

/// Whether a roster that expires at `not_after` is refused at `now`: only
/// once past it by more than `max_clock_skew` (what [`Roster::check_fresh`]
/// applies, and what a node's health reports).
pub fn past_expiry(not_after: UnixTime, now: UnixTime, max_clock_skew: u64) -> bool {
    now > not_after.saturating_add(max_clock_skew)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cert::tests::{DAY, T0, request, test_ca};
    use crate::identity::{NoisePrivateKey, WgPrivateKey};
    use proptest::prelude::*;

    pub fn member(ca: &CaCert, key: &CaSigningKey, name: &str, octet: u8) -> Member {
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let mut r = request(name, &wg, &noise);
        r.addresses = vec![format!("10.99.0.{octet}/24").parse().unwrap()];
        Member {
            cert: ca.issue(key, r).unwrap(),
            wg_endpoint: Some(format!("192.0.2.{octet}:51820").parse().unwrap()),
            keyd_endpoint: Some(format!("192.0.2.{octet}:51821").parse().unwrap()),
        }
    }

    #[test]
    fn build_round_trip_and_lookup() {
        let (key, ca) = test_ca("net-a");
        let members = vec![member(&ca, &key, "a", 1), member(&ca, &key, "b", 2)];
        let r = Roster::build(&ca, &key, 7, T0, T0 + DAY, members.clone(), vec![]).unwrap();
        let again = Roster::from_text(&r.to_text(), &ca).unwrap();
        assert_eq!(again.serial(), 7);
        assert_eq!(again.network_id(), "net-a");
        assert_eq!(again.issuer(), ca.fingerprint());
        assert_eq!(again.fingerprint(), r.fingerprint());
        assert_eq!(again.members(), members.as_slice());
        let id = members[1].cert.body().node_id;
        assert_eq!(again.member(&id).unwrap().cert.body().name, "b");
    }

    #[test]
    fn refuses_another_ca_and_tampering() {
        let (key, ca) = test_ca("net-a");
        let (_, other) = test_ca("net-a");
        let r = Roster::build(
            &ca,
            &key,
            1,
            T0,
            T0 + DAY,
            vec![member(&ca, &key, "a", 1)],
            vec![],
        )
        .unwrap();
        assert!(matches!(
            Roster::from_bytes(&r.to_bytes(), &other),
            Err(RosterError::WrongIssuer { .. })
        ));
        let mut bytes = r.to_bytes();
        let n = bytes.len();
        bytes[n - 70] ^= 1; // inside the body, before the signature
        assert!(Roster::from_bytes(&bytes, &ca).is_err());
    }

    #[test]
    fn refuses_member_of_another_ca() {
        let (key, ca) = test_ca("net-a");
        let (okey, other) = test_ca("net-a");
        let stranger = member(&other, &okey, "x", 9);
        // Sign a roster with the right CA that lists a stranger's certificate.
        let body = RosterBody {
            version: ROSTER_VERSION,
            network_id: "net-a".into(),
            serial: 1,
            issued_at: T0,
            not_after: T0 + DAY,
            issuer: ca.fingerprint(),
            signer: ca.fingerprint(),
            authorities: vec![],
            members: vec![MemberEntry {
                cert: stranger.cert.to_bytes(),
                wg_endpoint: None,
                keyd_endpoint: None,
            }],
            revoked: vec![],
            revoked_nodes: vec![],
            policy: None,
        };
        let signed = Signed::sign(ROSTER_DOMAIN, body, &key).unwrap();
        assert!(matches!(
            Roster::from_bytes(&signed.to_bytes(), &ca),
            Err(RosterError::MemberNotFromCa { index: 0, .. })
        ));
    }

    #[test]
    fn refuses_duplicates() {
        let (key, ca) = test_ca("net-a");
        let a = member(&ca, &key, "a", 1);
        let b = member(&ca, &key, "a", 2);
        assert!(matches!(
            Roster::build(&ca, &key, 1, T0, T0 + DAY, vec![a.clone(), b], vec![]),
            Err(RosterError::Duplicate { what: "name", .. })
        ));
        let c = member(&ca, &key, "c", 1);
        assert!(matches!(
            Roster::build(&ca, &key, 1, T0, T0 + DAY, vec![a, c], vec![]),
            Err(RosterError::Duplicate {
                what: "overlay address",
                ..
            })
        ));
    }

    #[test]
    fn rollback_and_serial_reuse_are_refused() {
        let (key, ca) = test_ca("net-a");
        let m = vec![member(&ca, &key, "a", 1)];
        let r5 = Roster::build(&ca, &key, 5, T0, T0 + DAY, m.clone(), vec![]).unwrap();
        let r4 = Roster::build(&ca, &key, 4, T0, T0 + DAY, m.clone(), vec![]).unwrap();
        let r6 = Roster::build(&ca, &key, 6, T0, T0 + DAY, m.clone(), vec![]).unwrap();
        let r5b = Roster::build(&ca, &key, 5, T0 + 1, T0 + 1 + DAY, m, vec![]).unwrap();
        assert_eq!(Roster::check_update(None, &r4, T0, 0), Ok(true));
        assert_eq!(
            Roster::check_update(Some(&r5), &r4, T0, 0),
            Err(RosterError::Rollback {
                current: 5,
                offered: 4
            })
        );
        assert_eq!(Roster::check_update(Some(&r5), &r5, T0, 0), Ok(false));
        assert_eq!(
            Roster::check_update(Some(&r5), &r5b, T0, 0),
            Err(RosterError::SerialReuse { serial: 5 })
        );
        assert_eq!(Roster::check_update(Some(&r5), &r6, T0, 0), Ok(true));
    }

    #[test]
    fn revocation_is_listed() {
        let (key, ca) = test_ca("net-a");
        let a = member(&ca, &key, "a", 1);
        let fp = a.cert.fingerprint();
        let r = Roster::build(&ca, &key, 2, T0, T0 + DAY, vec![], vec![fp]).unwrap();
        assert!(r.is_revoked(&fp));
        assert!(!r.is_revoked(&Fingerprint([0; 32])));
        // The list itself, which `keyd roster build --previous` carries over:
        // a roster that dropped it would un-revoke at the next build.
        let again = Roster::from_text(&r.to_text(), &ca).unwrap();
        assert_eq!(again.revoked().copied().collect::<Vec<_>>(), vec![fp]);
        assert!(again.is_revoked(&fp));
        let unverified = Roster::decode_unverified(&r.to_bytes()).unwrap();
        assert_eq!(unverified.revoked().copied().collect::<Vec<_>>(), vec![fp]);
    }

    #[test]
    fn expiry_is_signed_and_checked_with_skew() {
        let (key, ca) = test_ca("net-a");
        let r = Roster::build(&ca, &key, 3, T0, T0 + DAY, vec![], vec![]).unwrap();
        let again = Roster::from_bytes(&r.to_bytes(), &ca).unwrap();
        assert_eq!((again.issued_at(), again.not_after()), (T0, T0 + DAY));
        assert_eq!(again.check_fresh(T0, 0), Ok(()));
        assert_eq!(again.check_fresh(T0 + DAY, 0), Ok(()));
        assert_eq!(
            again.check_fresh(T0 + DAY + 1, 0),
            Err(RosterError::Expired {
                serial: 3,
                not_after: T0 + DAY,
                now: T0 + DAY + 1
            })
        );
        // The skew tolerated for certificates is tolerated here too.
        assert_eq!(again.check_fresh(T0 + DAY + 300, 300), Ok(()));
        assert!(matches!(
            again.check_fresh(T0 + DAY + 301, 300),
            Err(RosterError::Expired { .. })
        ));
        assert_eq!(again.check_fresh(u64::MAX, u64::MAX), Ok(()), "no overflow");
    }

    #[test]
    fn expiry_must_follow_issue() {
        let (key, ca) = test_ca("net-a");
        for not_after in [T0, T0 - 1] {
            assert_eq!(
                Roster::build(&ca, &key, 1, T0, not_after, vec![], vec![]).unwrap_err(),
                RosterError::Validity {
                    issued_at: T0,
                    not_after
                }
            );
        }
        assert!(Roster::build(&ca, &key, 1, T0, T0 + 1, vec![], vec![]).is_ok());
    }

    /// The body as version 1 laid it out: no `not_after`.
    #[derive(Serialize, Deserialize)]
    struct RosterBodyV1 {
        version: u8,
        network_id: String,
        serial: u64,
        issued_at: UnixTime,
        issuer: Fingerprint,
        members: Vec<MemberEntry>,
        revoked: Vec<Fingerprint>,
    }

    #[test]
    fn other_versions_are_refused_by_version() {
        let (key, ca) = test_ca("net-a");
        let v1 = RosterBodyV1 {
            version: 1,
            network_id: "net-a".into(),
            serial: 1,
            issued_at: T0,
            issuer: ca.fingerprint(),
            members: vec![],
            revoked: vec![],
        };
        let v1 = Signed::sign(ROSTER_DOMAIN, v1, &key).unwrap().to_bytes();
        let expect = RosterError::Codec(CodecError::Version {
            found: 1,
            supported: ROSTER_VERSION,
        });
        assert_eq!(Roster::from_bytes(&v1, &ca).unwrap_err(), expect);
        assert_eq!(Roster::decode_unverified(&v1).unwrap_err(), expect);
        // A future version in today's layout: refused, not misread.
        let mut body = Roster::build(&ca, &key, 1, T0, T0 + DAY, vec![], vec![])
            .unwrap()
            .signed
            .body;
        body.version = ROSTER_VERSION + 1;
        let future = Signed::sign(ROSTER_DOMAIN, body, &key).unwrap().to_bytes();
        assert_eq!(
            Roster::from_bytes(&future, &ca).unwrap_err(),
            RosterError::Codec(CodecError::Version {
                found: ROSTER_VERSION + 1,
                supported: ROSTER_VERSION
            })
        );
    }

    /// The body as version 3 laid it out: no policy.
    #[derive(Serialize, Deserialize)]
    struct RosterBodyV3 {
        version: u8,
        network_id: String,
        serial: u64,
        issued_at: UnixTime,
        not_after: UnixTime,
        issuer: Fingerprint,
        signer: Fingerprint,
        authorities: Vec<Vec<u8>>,
        members: Vec<MemberEntry>,
        revoked: Vec<Fingerprint>,
        revoked_nodes: Vec<RevokedNode>,
    }

    #[test]
    fn a_version_3_roster_is_refused_by_its_version() {
        let (key, ca) = test_ca("net-a");
        let v3 = RosterBodyV3 {
            version: 3,
            network_id: "net-a".into(),
            serial: 1,
            issued_at: T0,
            not_after: T0 + DAY,
            issuer: ca.fingerprint(),
            signer: ca.fingerprint(),
            authorities: vec![],
            members: vec![],
            revoked: vec![],
            revoked_nodes: vec![],
        };
        let v3 = Signed::sign(ROSTER_DOMAIN, v3, &key).unwrap().to_bytes();
        let expect = RosterError::Codec(CodecError::Version {
            found: 3,
            supported: ROSTER_VERSION,
        });
        assert_eq!(Roster::from_bytes(&v3, &ca).unwrap_err(), expect);
        assert_eq!(Roster::decode_unverified(&v3).unwrap_err(), expect);
    }

    /// A small policy: web may reach db on 5432.
    pub fn test_policy(name: &str) -> Policy {
        use crate::firewall::policy::{Action, PortRange, Proto, Rule, Selector};
        let group = |g: &str| Selector {
            groups: vec![g.into()],
            ..Selector::default()
        };
        Policy {
            rules: vec![Rule {
                name: name.into(),
                action: Action::Allow,
                from: group("web"),
                to: group("db"),
                proto: Proto::Tcp,
                ports: vec![PortRange {
                    first: 5432,
                    last: 5432,
                }],
            }],
        }
    }

    fn with_policy(policy: Option<Vec<u8>>) -> RosterContent {
        RosterContent {
            serial: 1,
            issued_at: T0,
            not_after: T0 + DAY,
            policy,
            ..RosterContent::default()
        }
    }

    #[test]
    fn the_policy_travels_signed_in_the_roster() {
        let (key, ca) = test_ca("net-a");
        let policy = test_policy("web-to-db");
        let bytes = policy.encode();
        let r = Roster::sign(&ca, &Signer::Root(&key), &with_policy(Some(bytes.clone()))).unwrap();
        let again = Roster::from_text(&r.to_text(), &ca).unwrap();
        assert_eq!(again.policy_bytes(), Some(bytes.as_slice()));
        assert_eq!(again.policy(), Some(&policy));
        assert_eq!(again.content().policy, Some(bytes));
        let unverified = Roster::decode_unverified(&r.to_bytes()).unwrap();
        assert_eq!(unverified.policy(), Some(&policy));
        // No policy: no firewall.
        let none = Roster::build(&ca, &key, 1, T0, T0 + DAY, vec![], vec![]).unwrap();
        assert_eq!(none.policy_bytes(), None);
        assert_eq!(
            Roster::from_bytes(&none.to_bytes(), &ca).unwrap().policy(),
            None
        );
        // Covered by the signature: a rule changed on the way is refused.
        let mut tampered = r.to_bytes();
        let at = tampered.windows(9).position(|w| w == b"web-to-db").unwrap();
        tampered[at] = b'x';
        assert_eq!(
            Roster::from_bytes(&tampered, &ca).unwrap_err(),
            RosterError::BadSignature
        );
    }

    #[test]
    fn a_policy_that_does_not_decode_is_refused_when_signed_and_when_verified() {
        let (key, ca) = test_ca("net-a");
        let garbage = vec![0xff; 12];
        assert!(matches!(
            Roster::sign(
                &ca,
                &Signer::Root(&key),
                &with_policy(Some(garbage.clone()))
            ),
            Err(RosterError::Policy(_))
        ));
        // A CA that signs one anyway: nodes still refuse it.
        let mut body = Roster::build(&ca, &key, 1, T0, T0 + DAY, vec![], vec![])
            .unwrap()
            .signed
            .body;
        body.policy = Some(garbage);
        let bytes = Signed::sign(ROSTER_DOMAIN, body, &key).unwrap().to_bytes();
        assert!(matches!(
            Roster::from_bytes(&bytes, &ca),
            Err(RosterError::Policy(_))
        ));
        assert!(matches!(
            Roster::decode_unverified(&bytes),
            Err(RosterError::Policy(_))
        ));
    }

    #[test]
    fn a_signed_roster_with_a_backwards_window_is_refused() {
        // A misbehaving CA signs it anyway: nodes still refuse it.
        let (key, ca) = test_ca("net-a");
        let mut body = Roster::build(&ca, &key, 1, T0, T0 + DAY, vec![], vec![])
            .unwrap()
            .signed
            .body;
        body.not_after = T0;
        let bytes = Signed::sign(ROSTER_DOMAIN, body, &key).unwrap().to_bytes();
        assert!(matches!(
            Roster::from_bytes(&bytes, &ca),
            Err(RosterError::Validity { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let (_, ca) = test_ca("net-a");
            let _ = Roster::from_bytes(&bytes, &ca);
            let _ = Roster::decode_unverified(&bytes);
        }
    }
}
