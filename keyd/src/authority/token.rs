//! Join tokens: what an operator hands to a new machine so that it can
//! enroll with one command.
//!
//! A token carries everything the machine needs to reach and authenticate
//! the authority (its endpoints, its Noise static key, the network and the
//! root CA's fingerprint) and a 256-bit secret under a public id. The
//! authority stores only the secret's hash (SHA-256 under a domain string),
//! so a copy of its store lets no one enroll. The secret travels only in the
//! third message of the authority channel, under keys that mix the ML-KEM
//! secret (`mesh_proto::channel`).
//!
//! Text form: `pqmesh-join-1.` then URL-safe base64 of the postcard body.

use std::fmt;
use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mesh_proto::identity::{NoisePublicKey, random_bytes};
use mesh_proto::signed::Fingerprint;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub const TOKEN_PREFIX: &str = "pqmesh-join-1.";
/// Longest token text accepted: a few endpoints and keys, never more.
pub const MAX_TOKEN_TEXT: usize = 1024;
const HASH_DOMAIN: &[u8] = b"pqmesh join token v1\0";

/// A token's public id: names it in `token list`, logs and revocations.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub [u8; 8]);

impl TokenId {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Result<Self, TokenError> {
        let bytes = text.as_bytes();
        if bytes.len() != 16 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(TokenError::BadId);
        }
        let mut out = [0u8; 8];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| TokenError::BadId)?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({})", self.to_hex())
    }
}

/// The secret half of a token. Wiped on drop; never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct TokenSecret(pub [u8; 32]);

impl TokenSecret {
    pub fn generate() -> Result<Self, TokenError> {
        let bytes = random_bytes::<32>().map_err(|e| TokenError::Random(e.to_string()))?;
        Ok(Self(*bytes))
    }

    /// What the authority stores and compares.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(HASH_DOMAIN);
        h.update(self.0);
        h.finalize().into()
    }

    /// Compares with a stored hash in constant time.
    pub fn matches(&self, stored: &[u8; 32]) -> bool {
        let ours = self.hash();
        ours.iter()
            .zip(stored)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(..)")
    }
}

/// A decoded join token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub network_id: String,
    /// The root CA the joining node will trust, by fingerprint: the CA the
    /// authority sends must match it.
    pub ca_fingerprint: Fingerprint,
    /// The authority's Noise static key: the channel is pinned to it.
    pub authority_key: NoisePublicKey,
    pub endpoints: Vec<SocketAddr>,
    pub id: TokenId,
    pub secret: TokenSecret,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("network_id", &self.network_id)
            .field("id", &self.id)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a pqmesh join token (it must start with `{TOKEN_PREFIX}`)")]
    Prefix,
    #[error("join token is longer than {MAX_TOKEN_TEXT} characters")]
    TooLong,
    #[error("join token is damaged: not valid base64")]
    Base64,
    #[error("join token is damaged: {0}")]
    Decode(String),
    #[error("join token names no authority endpoint")]
    NoEndpoint,
    #[error("token id must be 16 hexadecimal digits")]
    BadId,
    #[error("cannot draw random bytes: {0}")]
    Random(String),
}

impl JoinToken {
    /// The text handed to the new machine. Contains the secret: wiped on drop.
    pub fn encode(&self) -> Zeroizing<String> {
        // Serializing owned fields into memory cannot fail.
        let body = Zeroizing::new(postcard::to_stdvec(self).unwrap_or_default());
        Zeroizing::new(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&*body)))
    }

    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_TEXT {
            return Err(TokenError::TooLong);
        }
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(body)
                .map_err(|_| TokenError::Base64)?,
        );
        let token: JoinToken = mesh_proto::armor::postcard_exact(&bytes)
            .map_err(|e| TokenError::Decode(e.to_string()))?;
        mesh_proto::cert::check_label("network_id", &token.network_id)
            .map_err(|e| TokenError::Decode(e.to_string()))?;
        if token.endpoints.is_empty() {
            return Err(TokenError::NoEndpoint);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            network_id: "net-a".into(),
            ca_fingerprint: Fingerprint([7; 32]),
            authority_key: NoisePublicKey([9; 32]),
            endpoints: vec!["192.0.2.1:51830".parse().unwrap()],
            id: TokenId([1, 2, 3, 4, 5, 6, 7, 8]),
            secret: TokenSecret::generate().unwrap(),
        }
    }

    #[test]
    fn round_trip_and_secret_hash() {
        let t = token();
        let text = t.encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        let back = JoinToken::parse(&text).unwrap();
        assert_eq!(back, t);
        assert!(back.secret.matches(&t.secret.hash()));
        assert!(!TokenSecret::generate().unwrap().matches(&t.secret.hash()));
        assert!(!format!("{t:?}").contains(&URL_SAFE_NO_PAD.encode(t.secret.0)));
        assert_eq!(TokenId::from_hex(&t.id.to_hex()).unwrap(), t.id);
    }

    #[test]
    fn damaged_tokens_are_refused_with_their_reason() {
        let text = token().encode();
        assert_eq!(JoinToken::parse("hello").unwrap_err(), TokenError::Prefix);
        assert_eq!(
            JoinToken::parse(&format!("{TOKEN_PREFIX}!!!")).unwrap_err(),
            TokenError::Base64
        );
        let body = URL_SAFE_NO_PAD
            .decode(text.strip_prefix(TOKEN_PREFIX).unwrap())
            .unwrap();
        let cut = format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(&body[..body.len() - 5])
        );
        assert!(matches!(
            JoinToken::parse(&cut).unwrap_err(),
            TokenError::Decode(_)
        ));
        let long = format!("{TOKEN_PREFIX}{}", "A".repeat(MAX_TOKEN_TEXT));
        assert_eq!(JoinToken::parse(&long).unwrap_err(), TokenError::TooLong);
        let mut none = token();
        none.endpoints.clear();
        assert_eq!(
            JoinToken::parse(&none.encode()).unwrap_err(),
            TokenError::NoEndpoint
        );
        assert_eq!(TokenId::from_hex("xyz").unwrap_err(), TokenError::BadId);
    }
}
