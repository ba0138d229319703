//! The key schedule: from a finished hybrid exchange to WireGuard's
//! pre-shared key.
//!
//! ```text
//! PSK = HKDF-SHA256(
//!         salt = handshake hash h            (binds the whole transcript),
//!         ikm  = k1 || k2                    (snow's raw split: secret, and
//!                                             includes both X25519 DH results
//!                                             and the ML-KEM shared secret),
//!         info = "pqmesh psk v1" || epoch (u64 BE)
//!                || initiator node id || responder node id,
//!         L = 32)
//! ```
//! The handshake hash is public-ish (an observer with the transcript and the
//! keys could recompute it), so it is only the salt; all secrecy comes from
//! the split keys. The epoch and both node ids make every key unique to one
//! rotation of one ordered pair.

use std::fmt;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::identity::NodeId;

pub const PSK_LABEL: &[u8] = b"pqmesh psk v1";

/// A WireGuard pre-shared key. Zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Psk([u8; 32]);

impl Psk {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, the form the WireGuard userspace API takes.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(64));
        for b in self.0 {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// Derives the PSK for `epoch` from the raw split keys and handshake hash.
pub fn derive_psk(
    split: (&[u8; 32], &[u8; 32]),
    handshake_hash: &[u8],
    epoch: u64,
    initiator: &NodeId,
    responder: &NodeId,
) -> Psk {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(split.0);
    ikm[32..].copy_from_slice(split.1);
    let hk = Hkdf::<Sha256>::new(Some(handshake_hash), ikm.as_ref());
    let mut info = Vec::with_capacity(PSK_LABEL.len() + 8 + 32);
    info.extend_from_slice(PSK_LABEL);
    info.extend_from_slice(&epoch.to_be_bytes());
    info.extend_from_slice(&initiator.0);
    info.extend_from_slice(&responder.0);
    let mut psk = Psk([0; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: expand cannot fail.
    let _ = hk.expand(&info, &mut psk.0);
    psk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_key() {
        let (a, b) = (NodeId([1; 16]), NodeId([2; 16]));
        let base = derive_psk((&[3; 32], &[4; 32]), &[5; 32], 1, &a, &b);
        assert_eq!(base, derive_psk((&[3; 32], &[4; 32]), &[5; 32], 1, &a, &b));
        for other in [
            derive_psk((&[9; 32], &[4; 32]), &[5; 32], 1, &a, &b),
            derive_psk((&[3; 32], &[9; 32]), &[5; 32], 1, &a, &b),
            derive_psk((&[3; 32], &[4; 32]), &[9; 32], 1, &a, &b),
            derive_psk((&[3; 32], &[4; 32]), &[5; 32], 2, &a, &b),
            derive_psk((&[3; 32], &[4; 32]), &[5; 32], 1, &b, &a),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn hex_form_and_redacted_debug() {
        let psk = derive_psk(
            (&[3; 32], &[4; 32]),
            &[5; 32],
            1,
            &NodeId([0; 16]),
            &NodeId([1; 16]),
        );
        assert_eq!(psk.to_hex().len(), 64);
        assert!(!format!("{psk:?}").contains(&psk.to_hex()[..8]));
    }
}
