//! CA and node certificates.
//!
//! A CA certificate is self-signed and names the network. A node certificate
//! binds a node's name, id, network, overlay addresses, groups, attributes
//! (`env=prod`: what firewall policies select on), validity window, WireGuard
//! public key and keyd Noise public key, and names its CA by fingerprint. Both are postcard-encoded inside a [`Signed`] envelope; files
//! hold them armored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::AttributeError;
use crate::identity::{CaSigningKey, NodeId, NoisePublicKey, WgPublicKey};
use crate::prefix::IpPrefix;
use crate::signed::{Fingerprint, Signed};
use crate::{CertError, CodecError, UnixTime, armor};

/// The version of CA and authority certificate bodies.
pub const CERT_VERSION: u8 = 1;
/// The version of node certificate bodies. 2: attributes. A version-1 node
/// certificate is refused with [`CodecError::Version`], not misread.
pub const NODE_CERT_VERSION: u8 = 2;
pub const CA_CERT_LABEL: &str = "PQMESH CA CERTIFICATE";
pub const NODE_CERT_LABEL: &str = "PQMESH CERTIFICATE";
pub const AUTHORITY_CERT_LABEL: &str = "PQMESH AUTHORITY CERTIFICATE";
const CA_DOMAIN: &[u8] = b"pqmesh ca certificate v1\0";
const NODE_DOMAIN: &[u8] = b"pqmesh node certificate v1\0";
const AUTHORITY_DOMAIN: &[u8] = b"pqmesh authority certificate v1\0";

/// How far an authority certificate's `not_before` is set before the moment
/// the root certifies it (clocks a little behind). A node counts a key as
/// certified after a roster was issued if `not_before + AUTHORITY_BACKDATE`
/// is later than the roster's issue time (`Roster::check_signer`).
pub const AUTHORITY_BACKDATE: UnixTime = 60;

/// Limits that keep a certificate small enough for one handshake payload.
pub const MAX_NAME_LEN: usize = 63;
pub const MAX_GROUPS: usize = 32;
pub const MAX_ADDRESSES: usize = 8;
pub const MAX_ATTRIBUTES: usize = 32;
pub const MAX_ATTRIBUTE_KEY_LEN: usize = 32;
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaCertBody {
    pub version: u8,
    pub name: String,
    pub network_id: String,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub public_key: [u8; 32],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertBody {
    pub version: u8,
    pub name: String,
    pub node_id: NodeId,
    pub network_id: String,
    pub addresses: Vec<IpPrefix>,
    pub groups: Vec<String>,
    /// Key-value pairs for policy (`env=prod`); see [`check_attribute`].
    pub attributes: BTreeMap<String, String>,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub wg_public: WgPublicKey,
    pub noise_public: NoisePublicKey,
    /// Fingerprint of the CA certificate that signed this one.
    pub issuer: Fingerprint,
}

/// What an operator asks the CA to certify.
#[derive(Clone, Debug)]
pub struct NodeCertRequest {
    pub name: String,
    pub addresses: Vec<IpPrefix>,
    pub groups: Vec<String>,
    pub attributes: BTreeMap<String, String>,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub wg_public: WgPublicKey,
    pub noise_public: NoisePublicKey,
}

/// The root CA certifies an authority's signing key for a limited time, so
/// the root key can stay offline and the online key can be rolled: node
/// certificates and rosters are signed by the root or by a key certified here
/// and listed in the current roster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityCertBody {
    pub version: u8,
    pub name: String,
    pub network_id: String,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub public_key: [u8; 32],
    /// Fingerprint of the root CA certificate that signed this one.
    pub issuer: Fingerprint,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorityCert(Signed<AuthorityCertBody>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaCert(Signed<CaCertBody>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCert(Signed<NodeCertBody>);

/// Names, network ids and groups: short, printable, safe in logs and shells.
pub fn check_label(field: &'static str, value: &str) -> Result<(), CertError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if value.is_empty() || value.len() > MAX_NAME_LEN || !value.chars().all(ok_char) {
        return Err(CertError::Field {
            field,
            reason: format!(
                "`{value}` must be 1-{MAX_NAME_LEN} characters of letters, digits, '-', '_' or '.'"
            ),
        });
    }
    Ok(())
}

/// One attribute: the key 1-32 characters of `a-z`, `0-9`, `_`, `.`, `-`;
/// the value 1-64 printable ASCII characters (space included) except `=`
/// and `,`, so that `KEY=VALUE[,KEY=VALUE]` lists and logs stay unambiguous.
pub fn check_attribute(key: &str, value: &str) -> Result<(), AttributeError> {
    let key_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c);
    if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY_LEN || !key.chars().all(key_char) {
        return Err(AttributeError::Key {
            key: key.escape_default().to_string(),
        });
    }
    let value_char = |c: char| matches!(c, ' '..='~') && c != '=' && c != ',';
    if value.is_empty() || value.len() > MAX_ATTRIBUTE_VALUE_LEN || !value.chars().all(value_char) {
        return Err(AttributeError::Value {
            key: key.to_string(),
            value: value.escape_default().to_string(),
        });
    }
    Ok(())
}

/// Every pair checked, and at most [`MAX_ATTRIBUTES`] of them.
pub fn check_attributes(attributes: &BTreeMap<String, String>) -> Result<(), AttributeError> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(AttributeError::TooMany {
            count: attributes.len(),
        });
    }
    attributes
        .iter()
        .try_for_each(|(k, v)| check_attribute(k, v))
}

/// Parses `KEY=VALUE` (the first `=` splits: values hold no `=`) and checks it.
pub fn parse_attribute(text: &str) -> Result<(String, String), AttributeError> {
    let (key, value) = text.split_once('=').ok_or_else(|| AttributeError::Syntax {
        text: text.escape_default().to_string(),
    })?;
    check_attribute(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

/// Builds a checked attribute map from pairs, refusing a key given twice
/// (two values for one key would be silently dropped otherwise).
pub fn attribute_map(
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, AttributeError> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        check_attribute(&k, &v)?;
        if map.contains_key(&k) {
            return Err(AttributeError::Duplicate { key: k });
        }
        map.insert(k, v);
    }
    check_attributes(&map)?;
    Ok(map)
}

fn check_window(not_before: UnixTime, not_after: UnixTime) -> Result<(), CertError> {
    if not_before >= not_after {
        return Err(CertError::Field {
            field: "not_after",
            reason: format!("{not_after} is not after not_before {not_before}"),
        });
    }
    Ok(())
}

fn check_version(version: u8) -> Result<(), CertError> {
    check_version_of(version, CERT_VERSION)
}

fn check_version_of(version: u8, supported: u8) -> Result<(), CertError> {
    if version != supported {
        return Err(CodecError::Version {
            found: version,
            supported,
        }
        .into());
    }
    Ok(())
}

impl CaCertBody {
    fn validate(&self) -> Result<(), CertError> {
        check_version(self.version)?;
        check_label("name", &self.name)?;
        check_label("network_id", &self.network_id)?;
        check_window(self.not_before, self.not_after)
    }
}

impl NodeCertBody {
    fn validate(&self) -> Result<(), CertError> {
        check_version_of(self.version, NODE_CERT_VERSION)?;
        check_label("name", &self.name)?;
        check_label("network_id", &self.network_id)?;
        check_window(self.not_before, self.not_after)?;
        if self.addresses.is_empty() || self.addresses.len() > MAX_ADDRESSES {
            return Err(CertError::Field {
                field: "addresses",
                reason: format!("need 1 to {MAX_ADDRESSES} overlay addresses"),
            });
        }
        for a in &self.addresses {
            a.validate().map_err(|reason| CertError::Field {
                field: "addresses",
                reason,
            })?;
        }
        if self.groups.len() > MAX_GROUPS {
            return Err(CertError::Field {
                field: "groups",
                reason: format!("at most {MAX_GROUPS} groups"),
            });
        }
        for g in &self.groups {
            check_label("groups", g)?;
        }
        check_attributes(&self.attributes)?;
        if self.node_id != NodeId::derive(&self.wg_public, &self.noise_public) {
            return Err(CertError::Field {
                field: "node_id",
                reason: "does not derive from the certificate's public keys".into(),
            });
        }
        Ok(())
    }
}

impl CaCert {
    /// Creates a self-signed CA certificate for `network_id`.
    pub fn create(
        key: &CaSigningKey,
        name: &str,
        network_id: &str,
        not_before: UnixTime,
        not_after: UnixTime,
    ) -> Result<Self, CertError> {
        let body = CaCertBody {
            version: CERT_VERSION,
            name: name.to_string(),
            network_id: network_id.to_string(),
            not_before,
            not_after,
            public_key: key.verifying_key(),
        };
        body.validate()?;
        Ok(Self(Signed::sign(CA_DOMAIN, body, key)?))
    }

    /// Decodes and checks the self-signature and every field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CertError> {
        let signed = Signed::<CaCertBody>::decode(CA_DOMAIN, bytes)?;
        signed.body.validate()?;
        if !signed.verify(&signed.body.public_key) {
            return Err(CertError::BadSignature);
        }
        Ok(Self(signed))
    }

    pub fn from_text(text: &str) -> Result<Self, CertError> {
        Self::from_bytes(&armor::decode(CA_CERT_LABEL, text)?)
    }

    pub fn to_text(&self) -> String {
        armor::encode(CA_CERT_LABEL, &self.to_bytes())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    pub fn body(&self) -> &CaCertBody {
        &self.0.body
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.0.fingerprint()
    }

    pub fn is_valid_at(&self, now: UnixTime, skew: u64) -> bool {
        now.saturating_add(skew) >= self.0.body.not_before
            && now <= self.0.body.not_after.saturating_add(skew)
    }

    /// Signs `body`-shaped content with this CA's key (used for rosters).
    pub fn check_key(&self, key: &CaSigningKey) -> Result<(), CertError> {
        if key.verifying_key() != self.0.body.public_key {
            return Err(CertError::Field {
                field: "ca_key",
                reason: "the CA private key does not belong to this CA certificate".into(),
            });
        }
        Ok(())
    }

    /// Issues a node certificate. The validity window must lie inside the CA's.
    pub fn issue(&self, key: &CaSigningKey, req: NodeCertRequest) -> Result<NodeCert, CertError> {
        self.check_key(key)?;
        let ca = &self.0.body;
        issue_node(
            key,
            req,
            &ca.network_id,
            self.fingerprint(),
            (ca.not_before, ca.not_after),
        )
    }

    /// Checks that `cert` was signed by this CA (issuer and signature only;
    /// validity, revocation and membership are [`crate::trust`]'s job).
    pub fn signed(&self, cert: &NodeCert) -> bool {
        cert.0.body.issuer == self.fingerprint() && cert.0.verify(&self.0.body.public_key)
    }

    /// Certifies `public_key` as an authority signing key of this network for
    /// `not_before..not_after`, which must lie inside the CA's own window.
    pub fn certify_authority(
        &self,
        key: &CaSigningKey,
        name: &str,
        public_key: [u8; 32],
        not_before: UnixTime,
        not_after: UnixTime,
    ) -> Result<AuthorityCert, CertError> {
        self.check_key(key)?;
        let ca = &self.0.body;
        if not_before < ca.not_before || not_after > ca.not_after {
            return Err(CertError::Field {
                field: "not_after",
                reason: format!(
                    "authority validity {not_before}..{not_after} must lie inside the CA's {}..{}",
                    ca.not_before, ca.not_after
                ),
            });
        }
        let body = AuthorityCertBody {
            version: CERT_VERSION,
            name: name.to_string(),
            network_id: ca.network_id.clone(),
            not_before,
            not_after,
            public_key,
            issuer: self.fingerprint(),
        };
        body.validate()?;
        Ok(AuthorityCert(Signed::sign(AUTHORITY_DOMAIN, body, key)?))
    }
}

impl AuthorityCertBody {
    fn validate(&self) -> Result<(), CertError> {
        check_version(self.version)?;
        check_label("name", &self.name)?;
        check_label("network_id", &self.network_id)?;
        check_window(self.not_before, self.not_after)
    }
}

impl AuthorityCert {
    /// Decodes and checks that `root` signed it for root's network.
    pub fn from_bytes(bytes: &[u8], root: &CaCert) -> Result<Self, CertError> {
        let signed = Signed::<AuthorityCertBody>::decode(AUTHORITY_DOMAIN, bytes)?;
        signed.body.validate()?;
        if signed.body.issuer != root.fingerprint() {
            return Err(CertError::Field {
                field: "issuer",
                reason: format!(
                    "authority certificate names CA {}, not {}",
                    signed.body.issuer,
                    root.fingerprint()
                ),
            });
        }
        if signed.body.network_id != root.body().network_id {
            return Err(CertError::Field {
                field: "network_id",
                reason: format!(
                    "authority certificate is for `{}`, the CA for `{}`",
                    signed.body.network_id,
                    root.body().network_id
                ),
            });
        }
        if !signed.verify(&root.body().public_key) {
            return Err(CertError::BadSignature);
        }
        Ok(Self(signed))
    }

    pub fn from_text(text: &str, root: &CaCert) -> Result<Self, CertError> {
        Self::from_bytes(&armor::decode(AUTHORITY_CERT_LABEL, text)?, root)
    }

    pub fn to_text(&self) -> String {
        armor::encode(AUTHORITY_CERT_LABEL, &self.to_bytes())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    pub fn body(&self) -> &AuthorityCertBody {
        &self.0.body
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.0.fingerprint()
    }

    pub fn is_valid_at(&self, now: UnixTime, skew: u64) -> bool {
        now.saturating_add(skew) >= self.0.body.not_before
            && now <= self.0.body.not_after.saturating_add(skew)
    }

    /// Issues a node certificate with this authority's key. The validity
    /// window must lie inside the authority certificate's.
    pub fn issue(&self, key: &CaSigningKey, req: NodeCertRequest) -> Result<NodeCert, CertError> {
        self.check_key(key)?;
        let a = &self.0.body;
        issue_node(
            key,
            req,
            &a.network_id,
            self.fingerprint(),
            (a.not_before, a.not_after),
        )
    }

    /// Refuses a private key that is not the one this certificate certifies.
    pub fn check_key(&self, key: &CaSigningKey) -> Result<(), CertError> {
        if key.verifying_key() != self.0.body.public_key {
            return Err(CertError::Field {
                field: "authority_key",
                reason: "the private key does not belong to this authority certificate".into(),
            });
        }
        Ok(())
    }

    /// Checks that `cert` was signed by this authority (issuer and signature).
    pub fn signed(&self, cert: &NodeCert) -> bool {
        cert.0.body.issuer == self.fingerprint() && cert.0.verify(&self.0.body.public_key)
    }
}

/// Signs a node certificate for `network_id` under `issuer`, inside `window`.
fn issue_node(
    key: &CaSigningKey,
    req: NodeCertRequest,
    network_id: &str,
    issuer: Fingerprint,
    window: (UnixTime, UnixTime),
) -> Result<NodeCert, CertError> {
    if req.not_before < window.0 || req.not_after > window.1 {
        return Err(CertError::Field {
            field: "not_after",
            reason: format!(
                "node validity {}..{} must lie inside the issuer's {}..{}",
                req.not_before, req.not_after, window.0, window.1
            ),
        });
    }
    let body = NodeCertBody {
        version: NODE_CERT_VERSION,
        node_id: NodeId::derive(&req.wg_public, &req.noise_public),
        name: req.name,
        network_id: network_id.to_string(),
        addresses: req.addresses,
        groups: req.groups,
        attributes: req.attributes,
        not_before: req.not_before,
        not_after: req.not_after,
        wg_public: req.wg_public,
        noise_public: req.noise_public,
        issuer,
    };
    body.validate()?;
    Ok(NodeCert(Signed::sign(NODE_DOMAIN, body, key)?))
}

impl NodeCert {
    /// Decodes and checks every field. Does not check the signature, which
    /// needs the CA: see [`CaCert::signed`] and [`crate::trust`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CertError> {
        // The version before the layout: a version-1 body (no attributes)
        // gets the version error, not a confusing decode error.
        check_version_of(
            Signed::<NodeCertBody>::body_version(bytes)?,
            NODE_CERT_VERSION,
        )?;
        let signed = Signed::<NodeCertBody>::decode(NODE_DOMAIN, bytes)?;
        signed.body.validate()?;
        Ok(Self(signed))
    }

    pub fn from_text(text: &str) -> Result<Self, CertError> {
        Self::from_bytes(&armor::decode(NODE_CERT_LABEL, text)?)
    }

    pub fn to_text(&self) -> String {
        armor::encode(NODE_CERT_LABEL, &self.to_bytes())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    pub fn body(&self) -> &NodeCertBody {
        &self.0.body
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.0.fingerprint()
    }

    /// Checks the signature with the issuer's public key (the caller found
    /// the issuer by `body().issuer`).
    pub fn verify_signature(&self, issuer_key: &[u8; 32]) -> bool {
        self.0.verify(issuer_key)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::{NoisePrivateKey, WgPrivateKey};
    use proptest::prelude::*;

    pub const T0: UnixTime = 1_800_000_000;
    pub const DAY: u64 = 86_400;

    pub fn test_ca(network: &str) -> (CaSigningKey, CaCert) {
        let key = CaSigningKey::generate().unwrap();
        let ca = CaCert::create(&key, "test-ca", network, T0 - DAY, T0 + 365 * DAY).unwrap();
        (key, ca)
    }

    pub fn request(name: &str, wg: &WgPrivateKey, noise: &NoisePrivateKey) -> NodeCertRequest {
        NodeCertRequest {
            name: name.into(),
            addresses: vec![
                "10.99.0.1/24".parse().unwrap(),
                "fd99::1/64".parse().unwrap(),
            ],
            groups: vec!["web".into(), "db".into()],
            attributes: BTreeMap::from([("env".into(), "prod".into())]),
            not_before: T0 - 60,
            not_after: T0 + 30 * DAY,
            wg_public: wg.public_key(),
            noise_public: noise.public_key(),
        }
    }

    /// Signs any body, bypassing `issue`'s rules: models a CA that misbehaves.
    pub fn sign_raw(body: NodeCertBody, key: &CaSigningKey) -> NodeCert {
        NodeCert(Signed::sign(NODE_DOMAIN, body, key).unwrap())
    }

    fn issued() -> (CaSigningKey, CaCert, NodeCert) {
        let (key, ca) = test_ca("net-a");
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let cert = ca.issue(&key, request("node-1", &wg, &noise)).unwrap();
        (key, ca, cert)
    }

    #[test]
    fn issue_round_trip_and_verify() {
        let (_, ca, cert) = issued();
        let again = NodeCert::from_text(&cert.to_text()).unwrap();
        assert_eq!(again, cert);
        assert_eq!(again.fingerprint(), cert.fingerprint());
        assert!(ca.signed(&again));
        assert_eq!(again.body().network_id, "net-a");
        assert_eq!(CaCert::from_text(&ca.to_text()).unwrap(), ca);
    }

    #[test]
    fn another_ca_does_not_sign() {
        let (_, _, cert) = issued();
        let (_, other) = test_ca("net-a");
        assert!(!other.signed(&cert));
    }

    #[test]
    fn issue_refuses_bad_fields() {
        let (key, ca) = test_ca("net-a");
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let mut r = request("bad name!", &wg, &noise);
        assert!(matches!(
            ca.issue(&key, r.clone()),
            Err(CertError::Field { field: "name", .. })
        ));
        r.name = "ok".into();
        r.addresses.clear();
        assert!(matches!(
            ca.issue(&key, r.clone()),
            Err(CertError::Field {
                field: "addresses",
                ..
            })
        ));
        r = request("ok", &wg, &noise);
        r.not_after = r.not_before;
        assert!(matches!(
            ca.issue(&key, r.clone()),
            Err(CertError::Field {
                field: "not_after",
                ..
            })
        ));
        r = request("ok", &wg, &noise);
        r.not_after = T0 + 1000 * DAY;
        assert!(ca.issue(&key, r).is_err(), "outlives the CA");
        let other = CaSigningKey::generate().unwrap();
        assert!(matches!(
            ca.issue(&other, request("ok", &wg, &noise)),
            Err(CertError::Field {
                field: "ca_key",
                ..
            })
        ));
    }

    #[test]
    fn labels_are_one_to_63_safe_characters() {
        let max = "a".repeat(MAX_NAME_LEN);
        for ok in ["a", "node-1.eu_west", max.as_str()] {
            assert_eq!(check_label("name", ok), Ok(()), "{ok}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in ["", long.as_str(), "a b", "a\nb", "a/b", "é"] {
            assert!(
                matches!(
                    check_label("name", bad),
                    Err(CertError::Field { field: "name", .. })
                ),
                "{bad:?}"
            );
        }
        // And issuing applies it to names, networks and groups.
        let (key, ca) = test_ca("net-a");
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let mut r = request(&long, &wg, &noise);
        assert!(ca.issue(&key, r.clone()).is_err(), "over-long name");
        r.name = String::new();
        assert!(ca.issue(&key, r.clone()).is_err(), "empty name");
        r.name = "ok".into();
        r.groups = vec![String::new()];
        assert!(matches!(
            ca.issue(&key, r),
            Err(CertError::Field {
                field: "groups",
                ..
            })
        ));
        assert!(CaCert::create(&key, "ca", "", T0, T0 + DAY).is_err());
        assert!(CaCert::create(&key, &long, "net", T0, T0 + DAY).is_err());
    }

    /// A node certificate body as version 1 laid it out: no attributes.
    #[derive(Serialize, Deserialize)]
    struct NodeCertBodyV1 {
        version: u8,
        name: String,
        node_id: NodeId,
        network_id: String,
        addresses: Vec<IpPrefix>,
        groups: Vec<String>,
        not_before: UnixTime,
        not_after: UnixTime,
        wg_public: WgPublicKey,
        noise_public: NoisePublicKey,
        issuer: Fingerprint,
    }

    #[test]
    fn other_certificate_versions_are_refused() {
        let (key, ca, cert) = issued();
        let b = cert.body().clone();
        // A version-1 certificate, validly signed: refused by its version,
        // not misread as a version-2 layout.
        let v1 = NodeCertBodyV1 {
            version: 1,
            name: b.name.clone(),
            node_id: b.node_id,
            network_id: b.network_id.clone(),
            addresses: b.addresses.clone(),
            groups: b.groups.clone(),
            not_before: b.not_before,
            not_after: b.not_after,
            wg_public: b.wg_public,
            noise_public: b.noise_public,
            issuer: b.issuer,
        };
        let v1 = Signed::sign(NODE_DOMAIN, v1, &key).unwrap().to_bytes();
        assert_eq!(
            NodeCert::from_bytes(&v1),
            Err(CertError::Codec(CodecError::Version {
                found: 1,
                supported: NODE_CERT_VERSION
            }))
        );
        let mut body = b;
        body.version = NODE_CERT_VERSION + 1;
        let future = sign_raw(body, &key);
        assert_eq!(
            NodeCert::from_bytes(&future.to_bytes()),
            Err(CertError::Codec(CodecError::Version {
                found: NODE_CERT_VERSION + 1,
                supported: NODE_CERT_VERSION
            }))
        );
        let mut body = ca.body().clone();
        body.version = 0;
        let bytes = Signed::sign(CA_DOMAIN, body, &key).unwrap().to_bytes();
        assert_eq!(
            CaCert::from_bytes(&bytes),
            Err(CertError::Codec(CodecError::Version {
                found: 0,
                supported: CERT_VERSION
            }))
        );
    }

    #[test]
    fn a_self_signed_ca_with_bad_fields_is_refused() {
        // Validly self-signed, so only the field checks can refuse these.
        let (key, ca) = test_ca("net-a");
        let sign = |b: CaCertBody| Signed::sign(CA_DOMAIN, b, &key).unwrap().to_bytes();
        let mut b = ca.body().clone();
        b.name = "bad name".into();
        assert!(matches!(
            CaCert::from_bytes(&sign(b)),
            Err(CertError::Field { field: "name", .. })
        ));
        let mut b = ca.body().clone();
        b.network_id = String::new();
        assert!(matches!(
            CaCert::from_bytes(&sign(b)),
            Err(CertError::Field {
                field: "network_id",
                ..
            })
        ));
        let mut b = ca.body().clone();
        b.not_after = b.not_before;
        assert!(matches!(
            CaCert::from_bytes(&sign(b)),
            Err(CertError::Field {
                field: "not_after",
                ..
            })
        ));
    }

    #[test]
    fn a_node_certificate_may_span_exactly_the_cas_window() {
        let (key, ca) = test_ca("net-a");
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let mut r = request("edge", &wg, &noise);
        (r.not_before, r.not_after) = (ca.body().not_before, ca.body().not_after);
        assert!(ca.issue(&key, r.clone()).is_ok());
        let mut early = r.clone();
        early.not_before -= 1;
        let mut late = r;
        late.not_after += 1;
        for outside in [early, late] {
            assert!(matches!(
                ca.issue(&key, outside),
                Err(CertError::Field {
                    field: "not_after",
                    ..
                })
            ));
        }
    }

    #[test]
    fn ca_validity_tolerates_exactly_the_skew() {
        let (_, ca) = test_ca("net-a");
        let (nb, na) = (ca.body().not_before, ca.body().not_after);
        assert!(ca.is_valid_at(nb, 0) && ca.is_valid_at(na, 0));
        assert!(!ca.is_valid_at(nb - 1, 0) && !ca.is_valid_at(na + 1, 0));
        assert!(ca.is_valid_at(nb - 300, 300) && ca.is_valid_at(na + 300, 300));
        assert!(!ca.is_valid_at(nb - 301, 300) && !ca.is_valid_at(na + 301, 300));
    }

    #[test]
    fn tampered_ca_cert_is_refused() {
        let (_, ca) = test_ca("net-a");
        let mut bytes = ca.to_bytes();
        // Flip a byte in the network id, inside the signed body.
        let pos = bytes.windows(5).position(|w| w == b"net-a").unwrap();
        bytes[pos] ^= 0x01;
        assert_eq!(CaCert::from_bytes(&bytes), Err(CertError::BadSignature));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let (_, _, cert) = issued();
        let mut bytes = cert.to_bytes();
        bytes.push(0);
        assert!(matches!(
            NodeCert::from_bytes(&bytes),
            Err(CertError::Codec(CodecError::TrailingBytes(1)))
        ));
    }

    #[test]
    fn attributes_are_certified_and_round_trip() {
        let (_, ca, cert) = issued();
        let again = NodeCert::from_text(&cert.to_text()).unwrap();
        assert_eq!(again.body().attributes["env"], "prod");
        assert!(ca.signed(&again));
        // Signed: changing an attribute breaks the signature.
        let mut bytes = cert.to_bytes();
        let pos = bytes.windows(4).position(|w| w == b"prod").unwrap();
        bytes[pos] = b'q';
        let altered = NodeCert::from_bytes(&bytes).unwrap();
        assert_eq!(altered.body().attributes["env"], "qrod");
        assert!(!ca.signed(&altered));
    }

    #[test]
    fn attribute_rules() {
        let max_key = "k".repeat(MAX_ATTRIBUTE_KEY_LEN);
        let max_value = "v".repeat(MAX_ATTRIBUTE_VALUE_LEN);
        for (k, v) in [
            ("env", "prod"),
            ("a.b_c-9", "x y/z:1@#"),
            (max_key.as_str(), max_value.as_str()),
        ] {
            assert_eq!(check_attribute(k, v), Ok(()), "{k}={v}");
        }
        let long_key = "k".repeat(MAX_ATTRIBUTE_KEY_LEN + 1);
        for k in ["", "Env", "a b", "a=b", "é", long_key.as_str()] {
            assert!(
                matches!(check_attribute(k, "v"), Err(AttributeError::Key { .. })),
                "{k:?}"
            );
        }
        let long_value = "v".repeat(MAX_ATTRIBUTE_VALUE_LEN + 1);
        for v in ["", "a=b", "a,b", "a\nb", "\t", "é", long_value.as_str()] {
            assert!(
                matches!(check_attribute("k", v), Err(AttributeError::Value { .. })),
                "{v:?}"
            );
        }
        assert_eq!(
            parse_attribute("env=prod"),
            Ok(("env".into(), "prod".into()))
        );
        assert!(matches!(
            parse_attribute("env"),
            Err(AttributeError::Syntax { .. })
        ));
        assert!(matches!(
            parse_attribute("env=a=b"),
            Err(AttributeError::Value { .. })
        ));
        assert_eq!(
            attribute_map([("a".into(), "1".into()), ("a".into(), "2".into())]),
            Err(AttributeError::Duplicate { key: "a".into() })
        );
        let many = (0..=MAX_ATTRIBUTES).map(|i| (format!("k{i}"), "v".to_string()));
        assert_eq!(
            attribute_map(many),
            Err(AttributeError::TooMany {
                count: MAX_ATTRIBUTES + 1
            })
        );
    }

    #[test]
    fn issuing_and_decoding_apply_the_attribute_rules() {
        let (key, ca) = test_ca("net-a");
        let wg = WgPrivateKey::generate().unwrap();
        let noise = NoisePrivateKey::generate().unwrap();
        let mut r = request("ok", &wg, &noise);
        r.attributes.insert("Bad".into(), "x".into());
        assert!(matches!(
            ca.issue(&key, r),
            Err(CertError::Attribute(AttributeError::Key { .. }))
        ));
        let mut r = request("ok", &wg, &noise);
        r.attributes = (0..=MAX_ATTRIBUTES)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(matches!(
            ca.issue(&key, r),
            Err(CertError::Attribute(AttributeError::TooMany { .. }))
        ));
        // A CA that signs a bad value anyway: every reader still refuses it.
        let cert = ca.issue(&key, request("ok", &wg, &noise)).unwrap();
        let mut body = cert.body().clone();
        body.attributes.insert("env".into(), "a,b".into());
        let bad = sign_raw(body, &key);
        assert!(matches!(
            NodeCert::from_bytes(&bad.to_bytes()),
            Err(CertError::Attribute(AttributeError::Value { .. }))
        ));
    }

    #[test]
    fn fingerprint_hex_round_trip() {
        let (_, _, cert) = issued();
        let fp = cert.fingerprint();
        assert_eq!(Fingerprint::from_hex(&fp.to_hex()).unwrap(), fp);
        assert!(Fingerprint::from_hex("abc").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn node_cert_round_trips(
            name in "[a-z][a-z0-9-]{0,20}",
            groups in proptest::collection::vec("[a-z]{1,8}", 0..5),
            attributes in proptest::collection::btree_map("[a-z0-9_.-]{1,32}", "[ -+.-<>-~-]{1,64}", 0..5),
        ) {
            let (key, ca) = test_ca("net-p");
            let wg = WgPrivateKey::generate().unwrap();
            let noise = NoisePrivateKey::generate().unwrap();
            let mut r = request(&name, &wg, &noise);
            r.groups = groups;
            r.attributes = attributes;
            let cert = ca.issue(&key, r).unwrap();
            prop_assert_eq!(NodeCert::from_bytes(&cert.to_bytes()).unwrap(), cert);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = NodeCert::from_bytes(&bytes);
            let _ = CaCert::from_bytes(&bytes);
        }

        #[test]
        fn mutated_cert_never_verifies_as_original(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (_, ca, cert) = issued();
            let mut bytes = cert.to_bytes();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            // Either it no longer decodes, or it decodes and fails the CA check.
            if let Ok(c) = NodeCert::from_bytes(&bytes) {
                prop_assert!(!ca.signed(&c));
            }
        }
    }
}
