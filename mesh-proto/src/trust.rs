//! Zero-trust checks on a peer, run on every hybrid exchange.
//!
//! Nothing about where a message came from counts. A peer is accepted only if
//! its certificate decodes, names the configured CA, carries that CA's
//! signature, is for this network, has a node id that derives from its keys,
//! is inside its validity window (with bounded clock skew), is not revoked,
//! matches the Noise static key the peer proved it holds, is the exact
//! certificate listed in the current roster, and is not this node itself.
//! The roster itself must be fresh: past its expiry (plus skew) every peer is
//! refused, since revocations published since then cannot be known.

use std::sync::Arc;

use crate::cert::{CaCert, NodeCert};
use crate::identity::NodeId;
use crate::roster::{Member, Roster};
use crate::{TrustError, UnixTime};

/// Default tolerance for clocks that disagree, in seconds.
pub const DEFAULT_MAX_CLOCK_SKEW: u64 = 300;
/// The largest clock skew keyd may be configured with. mesh-node's check of
/// the data plane's certificate (`--ca-pin`) allows this much on
/// authorities' validity, so that it never refuses a roster keyd would
/// take at start: keyd, which can repair things, needs the data plane up.
pub const MAX_CLOCK_SKEW_LIMIT: u64 = 3600;

/// What a node trusts: its CA, the current roster, and how much clock skew to
/// tolerate. Cheap to clone; the daemon swaps in a new roster on update.
#[derive(Clone, Debug)]
pub struct Trust {
    pub ca: Arc<CaCert>,
    pub roster: Arc<Roster>,
    pub max_clock_skew: u64,
    /// This node's own id, so a reflected handshake is refused.
    pub local: NodeId,
}

/// A peer that passed every check, with its roster entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPeer {
    pub member: Member,
}

impl VerifiedPeer {
    pub fn cert(&self) -> &NodeCert {
        &self.member.cert
    }
    pub fn node_id(&self) -> NodeId {
        self.member.cert.body().node_id
    }
    pub fn name(&self) -> &str {
        &self.member.cert.body().name
    }
}

impl Trust {
    /// Runs every check on `cert_bytes`, presented by a peer that proved
    /// possession of the Noise static key `remote_static`.
    pub fn verify_peer(
        &self,
        cert_bytes: &[u8],
        remote_static: &[u8],
        now: UnixTime,
    ) -> Result<VerifiedPeer, TrustError> {
        let skew = self.max_clock_skew;
        let cert = NodeCert::from_bytes(cert_bytes).map_err(|e| match e {
            crate::CertError::Codec(c) => TrustError::MalformedCertificate(c),
            other => {
                TrustError::MalformedCertificate(crate::CodecError::Malformed(other.to_string()))
            }
        })?;
        let body = cert.body();
        // The issuer is the root CA or an authority the current roster lists;
        // an authority key counts only inside its own validity window.
        let issuer_key = if body.issuer == self.ca.fingerprint() {
            self.ca.body().public_key
        } else {
            let authority =
                self.roster
                    .authority(&body.issuer)
                    .ok_or_else(|| TrustError::UnknownCa {
                        expected: self.ca.fingerprint().to_hex(),
                        found: body.issuer.to_hex(),
                    })?;
            if !authority.is_valid_at(now, skew) {
                return Err(TrustError::IssuerExpired {
                    issuer: body.issuer.to_hex(),
                    not_after: authority.body().not_after,
                    now,
                });
            }
            authority.body().public_key
        };
        if !cert.verify_signature(&issuer_key) {
            return Err(TrustError::BadSignature);
        }
        let network = &self.ca.body().network_id;
        if &body.network_id != network {
            return Err(TrustError::WrongNetwork {
                expected: network.clone(),
                found: body.network_id.clone(),
            });
        }
        if body.node_id != NodeId::derive(&body.wg_public, &body.noise_public) {
            return Err(TrustError::NodeIdMismatch);
        }
        if !self.ca.is_valid_at(now, skew) {
            return Err(TrustError::CaExpired { now });
        }
        self.roster
            .check_fresh(now, skew)
            .map_err(|_| TrustError::RosterExpired {
                serial: self.roster.serial(),
                not_after: self.roster.not_after(),
                now,
            })?;
        if now.saturating_add(skew) < body.not_before {
            return Err(TrustError::NotYetValid {
                not_before: body.not_before,
                now,
            });
        }
        if now > body.not_after.saturating_add(skew) {
            return Err(TrustError::Expired {
                not_after: body.not_after,
                now,
            });
        }
        let fingerprint = cert.fingerprint();
        if self.roster.revokes(&cert) {
            return Err(TrustError::Revoked {
                fingerprint: fingerprint.to_hex(),
            });
        }
        if remote_static != body.noise_public.0 {
            return Err(TrustError::StaticKeyMismatch);
        }
        if body.node_id == self.local {
            return Err(TrustError::SelfConnection);
        }
        let member = self
            .roster
            .member(&body.node_id)
            .filter(|m| m.cert.fingerprint() == fingerprint)
            .ok_or_else(|| TrustError::NotInRoster {
                name: body.name.clone(),
                node_id: body.node_id.to_string(),
            })?;
        Ok(VerifiedPeer {
            member: member.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::tests::{DAY, T0, request, test_ca};
    use crate::identity::{CaSigningKey, NoisePrivateKey, WgPrivateKey};
    use crate::roster::tests::member;

    struct World {
        key: CaSigningKey,
        ca: CaCert,
        members: Vec<Member>,
    }

    fn world() -> World {
        let (key, ca) = test_ca("net-a");
        let members = (1..=3)
            .map(|i| member(&ca, &key, &format!("n{i}"), i))
            .collect();
        World { key, ca, members }
    }

    fn trust(w: &World, revoked: Vec<crate::signed::Fingerprint>) -> Trust {
        let roster = Roster::build(
            &w.ca,
            &w.key,
            1,
            T0,
            T0 + 365 * DAY,
            w.members.clone(),
            revoked,
        )
        .unwrap();
        Trust {
            ca: Arc::new(w.ca.clone()),
            roster: Arc::new(roster),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            local: w.members[0].cert.body().node_id,
        }
    }

    fn present(t: &Trust, m: &Member, now: UnixTime) -> Result<VerifiedPeer, TrustError> {
        t.verify_peer(&m.cert.to_bytes(), &m.cert.body().noise_public.0, now)
    }

    #[test]
    fn accepts_a_valid_member() {
        let w = world();
        let t = trust(&w, vec![]);
        let p = present(&t, &w.members[1], T0).unwrap();
        assert_eq!(p.name(), "n2");
        assert_eq!(p.member, w.members[1]);
    }

    #[test]
    fn refuses_each_case_with_its_own_error() {
        let w = world();
        let t = trust(&w, vec![w.members[2].cert.fingerprint()]);
        let m = &w.members[1];

        // Malformed.
        assert!(matches!(
            t.verify_peer(b"garbage", &[0; 32], T0),
            Err(TrustError::MalformedCertificate(_))
        ));
        // Another CA, same network name.
        let (okey, other) = test_ca("net-a");
        let stranger = member(&other, &okey, "x", 9);
        assert!(matches!(
            present(&t, &stranger, T0),
            Err(TrustError::UnknownCa { .. })
        ));
        // Validity window, with skew tolerated.
        let nb = m.cert.body().not_before;
        let na = m.cert.body().not_after;
        assert!(present(&t, m, nb - DEFAULT_MAX_CLOCK_SKEW).is_ok());
        assert!(matches!(
            present(&t, m, nb - DEFAULT_MAX_CLOCK_SKEW - 1),
            Err(TrustError::NotYetValid { .. })
        ));
        assert!(present(&t, m, na + DEFAULT_MAX_CLOCK_SKEW).is_ok());
        assert!(matches!(
            present(&t, m, na + DEFAULT_MAX_CLOCK_SKEW + 1),
            Err(TrustError::Expired { .. })
        ));
        // Revoked.
        assert!(matches!(
            present(&t, &w.members[2], T0),
            Err(TrustError::Revoked { .. })
        ));
        // Static key not the certificate's.
        assert_eq!(
            t.verify_peer(&m.cert.to_bytes(), &[9; 32], T0),
            Err(TrustError::StaticKeyMismatch)
        );
        // Our own certificate reflected back.
        assert_eq!(
            present(&t, &w.members[0], T0),
            Err(TrustError::SelfConnection)
        );
        // Valid certificate of this CA, but not in the roster.
        let outsider = member(&w.ca, &w.key, "late", 50);
        assert!(matches!(
            present(&t, &outsider, T0),
            Err(TrustError::NotInRoster { .. })
        ));
        // CA expired.
        let far = w.ca.body().not_after + DEFAULT_MAX_CLOCK_SKEW + 1;
        assert!(matches!(
            present(&t, m, far),
            Err(TrustError::CaExpired { .. })
        ));
    }

    #[test]
    fn an_expired_roster_accepts_nobody() {
        let w = world();
        let roster =
            Roster::build(&w.ca, &w.key, 4, T0, T0 + DAY, w.members.clone(), vec![]).unwrap();
        let t = Trust {
            roster: Arc::new(roster),
            ..trust(&w, vec![])
        };
        let edge = T0 + DAY + DEFAULT_MAX_CLOCK_SKEW;
        assert!(present(&t, &w.members[1], edge).is_ok());
        let refused = present(&t, &w.members[1], edge + 1).unwrap_err();
        assert_eq!(
            refused,
            TrustError::RosterExpired {
                serial: 4,
                not_after: T0 + DAY,
                now: edge + 1
            }
        );
        assert_eq!(refused.label(), "roster_expired");
    }

    #[test]
    fn labels_are_distinct() {
        use crate::ExchangeError;
        let labels = [
            TrustError::RosterExpired {
                serial: 0,
                not_after: 0,
                now: 0,
            }
            .label(),
            TrustError::Expired {
                not_after: 0,
                now: 0,
            }
            .label(),
            TrustError::Revoked {
                fingerprint: String::new(),
            }
            .label(),
            ExchangeError::StaleEpoch {
                offered: 1,
                last: 1,
            }
            .label(),
            ExchangeError::UnexpectedMessage("x").label(),
        ];
        assert_eq!(
            labels,
            [
                "roster_expired",
                "expired",
                "revoked",
                "stale_epoch",
                "unexpected_message"
            ]
        );
    }

    #[test]
    fn refuses_reissued_cert_that_is_not_the_listed_one() {
        let w = world();
        let t = trust(&w, vec![]);
        // Same keys (so same node id), new certificate with other groups:
        // not the certificate the roster lists.
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let mut r = request("n9", &wg, &noise);
        r.addresses = vec!["10.99.0.50/24".parse().unwrap()];
        let listed = w.ca.issue(&w.key, r.clone()).unwrap();
        r.groups = vec!["admin".into()];
        let reissued = w.ca.issue(&w.key, r).unwrap();
        let mut members = w.members.clone();
        members.push(Member {
            cert: listed,
            wg_endpoint: None,
            keyd_endpoint: None,
        });
        let roster = Roster::build(&w.ca, &w.key, 2, T0, T0 + 365 * DAY, members, vec![]).unwrap();
        let t = Trust {
            roster: Arc::new(roster),
            ..t
        };
        assert!(matches!(
            t.verify_peer(&reissued.to_bytes(), &noise.public_key().0, T0),
            Err(TrustError::NotInRoster { .. })
        ));
    }

    #[test]
    fn refuses_wrong_network_under_same_ca_key() {
        // A CA key reused for two networks: the certificate of one network
        // must not pass in the other, even though the signature is valid.
        let key = CaSigningKey::generate().unwrap();
        let ca_a = CaCert::create(&key, "ca", "net-a", T0 - DAY, T0 + 90 * DAY).unwrap();
        let ca_b = CaCert::create(&key, "ca", "net-b", T0 - DAY, T0 + 90 * DAY).unwrap();
        let m = member(&ca_b, &key, "b1", 1);
        let roster = Roster::build(&ca_a, &key, 1, T0, T0 + 365 * DAY, vec![], vec![]).unwrap();
        let t = Trust {
            ca: Arc::new(ca_a),
            roster: Arc::new(roster),
            max_clock_skew: 0,
            local: NodeId([0; 16]),
        };
        // Issuer fingerprint differs (it covers the network id) ...
        assert!(matches!(
            present(&t, &m, T0),
            Err(TrustError::UnknownCa { .. })
        ));
        // ... and a CA that signs a body naming another network is caught too.
        let mut body = m.cert.body().clone();
        body.issuer = t.ca.fingerprint();
        let forged = crate::cert::tests::sign_raw(body, &key);
        assert!(matches!(
            t.verify_peer(&forged.to_bytes(), &forged.body().noise_public.0, T0),
            Err(TrustError::WrongNetwork { .. })
        ));
    }
}
