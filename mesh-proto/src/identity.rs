//! Node and CA key pairs, their text forms, and node ids.
//!
//! * WireGuard keys: X25519, one line of base64, exactly as `wg genkey` and
//!   `wg pubkey` write them, so the `wg` tool reads our files and we read its.
//! * keyd's Noise static key: X25519, armored (`PQMESH NOISE PRIVATE KEY`).
//! * CA signing key: Ed25519, armored (`PQMESH CA PRIVATE KEY`).
//!
//! Private keys zeroize on drop and never print: their `Debug` is redacted.
//! Reading and writing files (0600) is the binaries' job; this module gives
//! the text forms and [`check_private_key_mode`].

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{CodecError, KeyError, armor};

pub const NOISE_PRIVATE_LABEL: &str = "PQMESH NOISE PRIVATE KEY";
pub const CA_PRIVATE_LABEL: &str = "PQMESH CA PRIVATE KEY";

/// Fills a fresh secret from the operating system's generator.
pub fn random_bytes<const N: usize>() -> Result<Zeroizing<[u8; N]>, KeyError> {
    let mut bytes = Zeroizing::new([0u8; N]);
    getrandom::fill(bytes.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(bytes)
}

/// Refuses a private key file whose mode lets group or others read or write it.
/// `path` only names the file in the message.
pub fn check_private_key_mode(path: &str, mode: u32) -> Result<(), KeyError> {
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_string(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

macro_rules! public_key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// One line of base64, the form `wg pubkey` prints.
            pub fn to_base64(&self) -> String {
                armor::to_base64(&self.0)
            }
            pub fn from_base64(text: &str) -> Result<Self, CodecError> {
                armor::from_base64_array(text).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_base64())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_base64())
            }
        }
    };
}

public_key_type!(
    /// A WireGuard (X25519) public key.
    WgPublicKey
);
public_key_type!(
    /// keyd's Noise static (X25519) public key.
    NoisePublicKey
);

/// An X25519 private key, used both for WireGuard and for keyd's Noise static key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct X25519Secret([u8; 32]);

impl X25519Secret {
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = *random_bytes::<32>()?;
        // Clamp as `wg genkey` does, so the file is byte-identical in form.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Ok(Self(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn public_bytes(&self) -> [u8; 32] {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        x25519_dalek::PublicKey::from(&secret).to_bytes()
    }
}

impl fmt::Debug for X25519Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("X25519Secret(<redacted>)")
    }
}

/// The WireGuard private key of a node.
#[derive(Clone, Debug)]
pub struct WgPrivateKey(pub X25519Secret);

impl WgPrivateKey {
    pub fn generate() -> Result<Self, KeyError> {
        X25519Secret::generate().map(Self)
    }
    pub fn public_key(&self) -> WgPublicKey {
        WgPublicKey(self.0.public_bytes())
    }
    /// The `wg genkey` form: base64 and a newline.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{}\n", armor::to_base64(self.0.as_bytes())))
    }
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(armor::from_base64_array::<32>(text)?);
        Ok(Self(X25519Secret::from_bytes(*bytes)))
    }
}

/// keyd's Noise static private key.
#[derive(Clone, Debug)]
pub struct NoisePrivateKey(pub X25519Secret);

impl NoisePrivateKey {
    pub fn generate() -> Result<Self, KeyError> {
        X25519Secret::generate().map(Self)
    }
    pub fn public_key(&self) -> NoisePublicKey {
        NoisePublicKey(self.0.public_bytes())
    }
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(armor::encode(NOISE_PRIVATE_LABEL, self.0.as_bytes()))
    }
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(armor::decode(NOISE_PRIVATE_LABEL, text)?);
        let array = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| CodecError::Length {
            expected: 32,
            found: bytes.len(),
        })?;
        Ok(Self(X25519Secret::from_bytes(array)))
    }
}

/// The CA's Ed25519 signing key. `SigningKey` zeroizes itself on drop.
pub struct CaSigningKey(SigningKey);

impl CaSigningKey {
    pub fn generate() -> Result<Self, KeyError> {
        let seed = random_bytes::<32>()?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }
    pub fn verifying_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(armor::encode(CA_PRIVATE_LABEL, self.0.as_bytes()))
    }
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let bytes = Zeroizing::new(armor::decode(CA_PRIVATE_LABEL, text)?);
        let seed = Zeroizing::new(<[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            CodecError::Length {
                expected: 32,
                found: bytes.len(),
            }
        })?);
        Ok(Self(SigningKey::from_bytes(&seed)))
    }
}

impl fmt::Debug for CaSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaSigningKey(<redacted>)")
    }
}

/// Verifies an Ed25519 signature made by [`CaSigningKey::sign`].
pub fn verify_signature(public: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public) else {
        return false;
    };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    key.verify_strict(message, &sig).is_ok()
}

/// A node's id: derived from both of its public keys, so a certificate cannot
/// claim an id that belongs to other keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    pub fn derive(wg: &WgPublicKey, noise: &NoisePublicKey) -> Self {
        let mut h = Sha256::new();
        h.update(b"pqmesh node id v1\0");
        h.update(wg.0);
        h.update(noise.0);
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wg_key_text_is_wg_genkey_form() {
        let key = WgPrivateKey::generate().unwrap();
        let text = key.to_text();
        assert_eq!(text.len(), 45, "44 base64 chars and a newline");
        let again = WgPrivateKey::from_text(&text).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let b = key.0.as_bytes();
        assert_eq!(b[0] & 7, 0, "clamped like wg genkey");
        assert_eq!(b[31] & 0xc0, 0x40);
    }

    #[test]
    fn wg_public_key_matches_known_vector() {
        // RFC 7748 section 6.1: Alice's private and public key.
        let private = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let key = WgPrivateKey(X25519Secret::from_bytes(private));
        assert_eq!(key.public_key().0, public);
    }

    #[test]
    fn noise_and_ca_keys_round_trip_armored() {
        let n = NoisePrivateKey::generate().unwrap();
        let n2 = NoisePrivateKey::from_text(&n.to_text()).unwrap();
        assert_eq!(n.public_key(), n2.public_key());
        let ca = CaSigningKey::generate().unwrap();
        let ca2 = CaSigningKey::from_text(&ca.to_text()).unwrap();
        assert_eq!(ca.verifying_key(), ca2.verifying_key());
        // A key of one kind is not accepted as the other.
        assert!(NoisePrivateKey::from_text(&ca.to_text()).is_err());
    }

    #[test]
    fn signatures_verify_and_forgeries_do_not() {
        let ca = CaSigningKey::generate().unwrap();
        let sig = ca.sign(b"hello");
        assert!(verify_signature(&ca.verifying_key(), b"hello", &sig));
        assert!(!verify_signature(&ca.verifying_key(), b"hellO", &sig));
        assert!(!verify_signature(&ca.verifying_key(), b"hello", &sig[..63]));
    }

    #[test]
    fn debug_never_prints_secrets() {
        let key = WgPrivateKey::generate().unwrap();
        let b64 = armor::to_base64(key.0.as_bytes());
        assert!(!format!("{key:?}").contains(&b64));
        assert!(format!("{key:?}").contains("redacted"));
    }

    #[test]
    fn key_file_mode_check() {
        assert!(check_private_key_mode("k", 0o600).is_ok());
        assert!(check_private_key_mode("k", 0o400).is_ok());
        let err = check_private_key_mode("/etc/k", 0o644).unwrap_err();
        assert!(err.to_string().contains("chmod 600 /etc/k"), "{err}");
        assert!(check_private_key_mode("k", 0o620).is_err());
        assert!(check_private_key_mode("k", 0o604).is_err());
    }

    #[test]
    fn node_id_depends_on_both_keys() {
        let a = NodeId::derive(&WgPublicKey([1; 32]), &NoisePublicKey([2; 32]));
        let b = NodeId::derive(&WgPublicKey([1; 32]), &NoisePublicKey([3; 32]));
        let c = NodeId::derive(&WgPublicKey([4; 32]), &NoisePublicKey([2; 32]));
        assert!(a != b && a != c && b != c);
        assert_eq!(a.to_string().len(), 32);
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
