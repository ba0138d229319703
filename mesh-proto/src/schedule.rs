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
//!
//! HKDF is computed here from HMAC-SHA256 (RFC 5869: PRK = HMAC(salt, ikm),
//! PSK = HMAC(PRK, info || 0x01), one block) rather than with the `hkdf`
//! crate, whose `Hkdf` value keeps the PRK and drops it unwiped. Every buffer
//! holding the IKM or the PRK is `Zeroizing`, and the HMAC and SHA-256 states
//! wipe themselves on drop (their `zeroize` features). The known-answer test
//! below and `docs/key-schedule.md` pin the output.

use std::fmt;

use hmac::Hmac;
use hmac::digest::{FixedOutput, KeyInit, Update};
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
    // HKDF-Extract: the IKM is fed in two parts (k1 || k2), never copied.
    let mut prk = Zeroizing::new([0u8; 32]);
    hmac_sha256(handshake_hash, &[split.0, split.1], &mut prk);
    // HKDF-Expand to L = 32: a single block, T(1) = HMAC(PRK, info || 0x01).
    let mut psk = Psk([0; 32]);
    hmac_sha256(
        prk.as_ref(),
        &[
            PSK_LABEL,
            &epoch.to_be_bytes(),
            &initiator.0,
            &responder.0,
            &[1],
        ],
        &mut psk.0,
    );
    psk
}

/// HMAC-SHA256 of the concatenated `parts`, written straight into `out` (no
/// intermediate copy of the tag). The keyed state is wiped when dropped.
fn hmac_sha256(key: &[u8], parts: &[&[u8]], out: &mut [u8; 32]) {
    // HMAC accepts keys of any length (longer ones are hashed first), so this
    // cannot fail; there is no error to pass on.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        unreachable!("HMAC takes keys of any length")
    };
    for part in parts {
        Update::update(&mut mac, part);
    }
    mac.finalize_into(out.into());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// RFC 5869 test case 1 (HKDF-SHA256), computed with this module's HMAC
    /// steps: they are HKDF, not something that merely looks like it.
    #[test]
    fn hmac_steps_are_rfc5869_hkdf() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut prk = [0u8; 32];
        hmac_sha256(&salt, &[&ikm[..11], &ikm[11..]], &mut prk);
        assert_eq!(
            hex(&prk),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
        );
        let mut t1 = [0u8; 32];
        hmac_sha256(&prk, &[&info, &[1]], &mut t1);
        // The first 32 of the RFC's 42 OKM bytes.
        assert_eq!(
            hex(&t1),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }

    /// The documented schedule's known answer (docs/key-schedule.md): a
    /// change on both sides at once still changes this value.
    #[test]
    fn known_answer_vector() {
        let psk = derive_psk(
            (&[0x11; 32], &[0x22; 32]),
            &[0x33; 32],
            7,
            &NodeId([0xaa; 16]),
            &NodeId([0xbb; 16]),
        );
        assert_eq!(hex(psk.as_bytes()), KAT);
    }
    const KAT: &str = "a2f81c202b857b2b0957e7c41dc782b473778d21c834521644e14557a6252e71";

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
        assert_eq!(format!("{psk:?}"), "Psk(<redacted>)");
    }
}
