//! A signed value: the exact body bytes, an Ed25519 signature over
//! `domain || body bytes`, and the decoded body.
//!
//! The signature covers the bytes as they travel, never a re-encoding, so
//! there is exactly one signed form. The domain string separates kinds: a CA
//! certificate's signature can never pass as a roster's or a node's.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::armor::postcard_exact;
use crate::identity::{CaSigningKey, verify_signature};
use crate::{CertError, CodecError};

#[derive(Serialize, Deserialize)]
struct Envelope {
    body: Vec<u8>,
    signature: Vec<u8>,
}

/// SHA-256 over the domain and the signed body bytes. Names a certificate (or
/// roster) in revocation lists and logs; stable whatever encodes the envelope.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    pub fn from_hex(text: &str) -> Result<Self, CodecError> {
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CodecError::Malformed(format!(
                "`{text}` is not a fingerprint (64 hex digits)"
            )));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|e| CodecError::Malformed(e.to_string()))?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed<T> {
    pub body: T,
    body_bytes: Vec<u8>,
    signature: [u8; 64],
    domain: &'static [u8],
}

impl<T: Serialize + DeserializeOwned> Signed<T> {
    pub fn sign(domain: &'static [u8], body: T, key: &CaSigningKey) -> Result<Self, CertError> {
        let body_bytes = postcard::to_stdvec(&body).map_err(CodecError::from)?;
        let signature = key.sign(&[domain, &body_bytes].concat());
        Ok(Self {
            body,
            body_bytes,
            signature,
            domain,
        })
    }

    /// Decodes the envelope and the body. Does not check the signature: the
    /// caller knows which key must have made it (see [`Signed::verify`]).
    pub fn decode(domain: &'static [u8], bytes: &[u8]) -> Result<Self, CodecError> {
        let envelope: Envelope = postcard_exact(bytes)?;
        let signature = <[u8; 64]>::try_from(envelope.signature.as_slice()).map_err(|_| {
            CodecError::Length {
                expected: 64,
                found: envelope.signature.len(),
            }
        })?;
        let body = postcard_exact(&envelope.body)?;
        Ok(Self {
            body,
            body_bytes: envelope.body,
            signature,
            domain,
        })
    }

    /// The first byte of the body: every signed body here starts with its
    /// `version: u8` (postcard writes a `u8` as one byte). Lets a caller refuse
    /// an old layout by version before decoding the body as the new one.
    pub fn body_version(bytes: &[u8]) -> Result<u8, CodecError> {
        let envelope: Envelope = postcard_exact(bytes)?;
        envelope.body.first().copied().ok_or(CodecError::Length {
            expected: 1,
            found: 0,
        })
    }

    pub fn verify(&self, public: &[u8; 32]) -> bool {
        verify_signature(
            public,
            &[self.domain, &self.body_bytes].concat(),
            &self.signature,
        )
    }

    /// Rebuilds a signed value from a body and the signature made over its
    /// encoding (a roster delta carries only the signature of the roster it
    /// produces). Nothing is trusted until [`Signed::verify`] passes.
    pub(crate) fn from_parts(
        domain: &'static [u8],
        body: T,
        signature: [u8; 64],
    ) -> Result<Self, CodecError> {
        let body_bytes = postcard::to_stdvec(&body).map_err(CodecError::from)?;
        Ok(Self {
            body,
            body_bytes,
            signature,
            domain,
        })
    }

    pub(crate) fn signature(&self) -> [u8; 64] {
        self.signature
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let envelope = Envelope {
            body: self.body_bytes.clone(),
            signature: self.signature.to_vec(),
        };
        // Serializing a struct of two byte vectors into memory cannot fail.
        postcard::to_stdvec(&envelope).unwrap_or_default()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(self.domain);
        h.update(&self.body_bytes);
        Fingerprint(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_print_as_hex() {
        let fp = Fingerprint([0xab; 32]);
        assert_eq!(fp.to_string(), "ab".repeat(32));
        assert_eq!(
            format!("{fp:?}"),
            format!("Fingerprint({})", "ab".repeat(32))
        );
        assert_eq!(Fingerprint::from_hex(&fp.to_hex()), Ok(fp));
    }

    #[test]
    fn body_version_is_the_first_body_byte() {
        let envelope = |body: Vec<u8>| {
            postcard::to_stdvec(&Envelope {
                body,
                signature: vec![0; 64],
            })
            .unwrap()
        };
        assert_eq!(Signed::<u8>::body_version(&envelope(vec![9, 1])), Ok(9));
        assert!(Signed::<u8>::body_version(&envelope(vec![])).is_err());
        assert!(Signed::<u8>::body_version(b"junk").is_err());
    }
}
