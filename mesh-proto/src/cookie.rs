//! Bounded work before authentication: WireGuard's mac1 and cookies
//! (WireGuard whitepaper §5.4.7) in front of the hybrid exchange's msg1.
//!
//! ```text
//! sealed msg1 = msg1 || mac1 || mac2
//! mac1   = MAC(HASH(LABEL_MAC1 || responder's Noise static public), msg1)
//! mac2   = MAC(cookie, msg1 || mac1)            16 zero bytes without a fresh cookie
//! cookie = MAC(secret, source IP || source port) secret: 32 random bytes, new every 120 s
//! reply  = nonce (24) || XChaCha20-Poly1305(key = HASH(LABEL_COOKIE || responder's Noise
//!          static public), nonce, plaintext = cookie, associated data = mac1)
//! ```
//! MAC is keyed BLAKE2s with a 16-byte output and HASH is BLAKE2s-256, as in
//! WireGuard; the labels are pqmesh's own, so no value collides with one of
//! WireGuard's. The responder's Noise static key is in the certificates,
//! which only members hold, and never crosses the wire in clear: without it
//! no msg1 passes [`CookieChecker::check`], so a stranger cannot make a
//! responder do any public-key work. Under load (the caller decides) a msg1
//! must also carry a mac2 made with a cookie for its source address, which
//! costs the sender a round trip through that address.
//!
//! It sits outside Noise and authenticates nothing: the exchange's own checks
//! are unchanged, and the bytes Noise reads are exactly msg1. See
//! `docs/key-schedule.md`, "Bounded work before authentication".
//!
//! Sans-IO: time and randomness come in as arguments.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, Mac, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::{AeadInPlace, KeyInit, XChaCha20Poly1305};
use zeroize::Zeroizing;

use crate::identity::NoisePublicKey;

/// Length of mac1, mac2 and a cookie.
pub const MAC_LEN: usize = 16;
/// What [`CookieJar::seal`] appends to msg1: mac1 and mac2.
pub const SEALED_OVERHEAD: usize = 2 * MAC_LEN;
/// XChaCha20-Poly1305's nonce.
pub const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// A cookie reply: nonce, encrypted cookie, tag. A msg2 is far longer (it
/// carries an X25519 key and an ML-KEM-1024 ciphertext alone of 1600 bytes).
pub const COOKIE_REPLY_LEN: usize = NONCE_LEN + MAC_LEN + TAG_LEN;
/// How long an initiator uses a cookie, and how often the responder's secret
/// changes (WireGuard's `Cookie-Refresh-Time`).
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);
/// pqmesh's labels (WireGuard's are "mac1----" and "cookie--").
pub const LABEL_MAC1: &[u8] = b"pqmesh mac1----";
pub const LABEL_COOKIE: &[u8] = b"pqmesh cookie--";

type Cookie = Zeroizing<[u8; MAC_LEN]>;

/// Why a sealed msg1 or a cookie reply is refused. Labels for counters as
/// in the crate's other errors.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum CookieError {
    #[error("sealed msg1 of {found} bytes is shorter than its {SEALED_OVERHEAD} bytes of MACs")]
    TooShort { found: usize },
    #[error("msg1's mac1 is not keyed by this node's Noise static key")]
    BadMac1,
    #[error("cookie reply of {found} bytes, expected {COOKIE_REPLY_LEN}")]
    ReplyLength { found: usize },
    #[error("cookie reply does not decrypt: another responder, another msg1, or tampered")]
    BadReply,
}

impl CookieError {
    /// Every label [`label`](Self::label) gives (counters show each from
    /// the start; a test keeps the two in step).
    pub const LABELS: [&'static str; 4] = ["too_short", "bad_mac1", "reply_length", "bad_reply"];

    pub fn label(&self) -> &'static str {
        match self {
            CookieError::TooShort { .. } => "too_short",
            CookieError::BadMac1 => "bad_mac1",
            CookieError::ReplyLength { .. } => "reply_length",
            CookieError::BadReply => "bad_reply",
        }
    }
}

/// What the responder does with a sealed msg1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Run the exchange on this msg1 (the MACs stripped).
    Accept(&'a [u8]),
    /// Under load and without a valid mac2: send these [`COOKIE_REPLY_LEN`]
    /// bytes back instead of msg2, and do no public-key work.
    CookieReply(Vec<u8>),
    /// Drop it without an answer.
    Refuse(CookieError),
}

/// HASH(label || key): BLAKE2s-256.
fn hash(label: &[u8], key: &NoisePublicKey) -> [u8; 32] {
    let mut h = Blake2s256::new();
    Digest::update(&mut h, label);
    Digest::update(&mut h, key.0);
    h.finalize().into()
}

/// Keyed BLAKE2s-128 over the concatenation of `parts`.
fn keyed<const N: usize>(key: &[u8; N], parts: &[&[u8]]) -> Blake2sMac<U16> {
    const { assert!(N <= 32, "BLAKE2s keys are at most 32 bytes") };
    // Cannot fail: the length is checked at compile time just above.
    let mut m = <Blake2sMac<U16> as Mac>::new_from_slice(key).expect("key of at most 32 bytes");
    for part in parts {
        Update::update(&mut m, part);
    }
    m
}

fn mac<const N: usize>(key: &[u8; N], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    keyed(key, parts).finalize_fixed().into()
}

/// Constant-time comparison (`digest`'s `verify_slice` uses `subtle`).
fn verify<const N: usize>(key: &[u8; N], parts: &[&[u8]], tag: &[u8]) -> bool {
    keyed(key, parts).verify_slice(tag).is_ok()
}

/// A sealed msg1 taken apart.
struct Sealed<'a> {
    msg1: &'a [u8],
    mac1: &'a [u8],
    mac2: &'a [u8],
}

fn split(sealed: &[u8]) -> Result<Sealed<'_>, CookieError> {
    let at = sealed
        .len()
        .checked_sub(SEALED_OVERHEAD)
        .ok_or(CookieError::TooShort {
            found: sealed.len(),
        })?;
    let (msg1, macs) = sealed.split_at(at);
    let (mac1, mac2) = macs.split_at(MAC_LEN);
    Ok(Sealed { msg1, mac1, mac2 })
}

fn cipher(responder: &NoisePublicKey) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(&hash(LABEL_COOKIE, responder).into())
}

/// The source address as the cookie covers it: IPv4 (4 bytes) or IPv6 (16
/// bytes), then the port big-endian. An IPv4-mapped IPv6 address counts as
/// its IPv4 address, so a dual-stack socket gives the same cookie.
fn address_bytes(source: SocketAddr) -> ([u8; 18], usize) {
    let mut out = [0u8; 18];
    let n = match source.ip().to_canonical() {
        IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    out[n..n + 2].copy_from_slice(&source.port().to_be_bytes());
    (out, n + 2)
}

/// Initiator side: the cookie one responder gave us. Keep one per peer.
#[derive(Default)]
pub struct CookieJar {
    cookie: Option<(Cookie, Instant)>,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieJar")
            .field("received", &self.cookie.as_ref().map(|(_, at)| at))
            .finish()
    }
}

impl CookieJar {
    /// `msg1 || mac1 || mac2`, ready to frame. mac2 is 16 zero bytes unless
    /// a cookie younger than [`COOKIE_LIFETIME`] is held.
    pub fn seal(&self, responder: &NoisePublicKey, msg1: &[u8], now: Instant) -> Vec<u8> {
        let mut out = Vec::with_capacity(msg1.len() + SEALED_OVERHEAD);
        out.extend_from_slice(msg1);
        let mac1 = mac(&hash(LABEL_MAC1, responder), &[msg1]);
        out.extend_from_slice(&mac1);
        let mac2 = match &self.cookie {
            Some((cookie, at)) if now.saturating_duration_since(*at) < COOKIE_LIFETIME => {
                mac(cookie, &[&out])
            }
            _ => [0; MAC_LEN],
        };
        out.extend_from_slice(&mac2);
        out
    }

    /// Takes the cookie from `responder`'s reply to `sealed_msg1` (the bytes
    /// this side sent, as [`seal`](Self::seal) made them); the msg1 is then
    /// sealed again and resent. A reply that does not decrypt leaves any
    /// cookie held untouched, so a forged reply cannot evict a good one.
    pub fn accept_reply(
        &mut self,
        responder: &NoisePublicKey,
        sealed_msg1: &[u8],
        reply: &[u8],
        now: Instant,
    ) -> Result<(), CookieError> {
        let mac1 = split(sealed_msg1)?.mac1;
        if reply.len() != COOKIE_REPLY_LEN {
            return Err(CookieError::ReplyLength { found: reply.len() });
        }
        let (nonce, sealed) = reply.split_at(NONCE_LEN);
        let (encrypted, tag) = sealed.split_at(MAC_LEN);
        let mut cookie = Cookie::default();
        cookie.copy_from_slice(encrypted);
        cipher(responder)
            .decrypt_in_place_detached(
                GenericArray::from_slice(nonce),
                mac1,
                &mut cookie[..],
                GenericArray::from_slice(tag),
            )
            .map_err(|_| CookieError::BadReply)?;
        self.cookie = Some((cookie, now));
        Ok(())
    }
}

/// Responder side: one per keyd (per Noise static key).
pub struct CookieChecker {
    mac1_key: [u8; 32],
    cipher: XChaCha20Poly1305,
    secret: Zeroizing<[u8; 32]>,
    /// The secret before the current one: a cookie handed out just before a
    /// rotation still works, so the initiator's 120 s always fit.
    previous: Option<Zeroizing<[u8; 32]>>,
    secret_set: Instant,
}

impl std::fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieChecker")
            .field("secret_set", &self.secret_set)
            .finish_non_exhaustive()
    }
}

impl CookieChecker {
    /// `secret`: 32 random bytes, the first cookie secret.
    pub fn new(own_static: &NoisePublicKey, secret: [u8; 32], now: Instant) -> Self {
        Self {
            mac1_key: hash(LABEL_MAC1, own_static),
            cipher: cipher(own_static),
            secret: Zeroizing::new(secret),
            previous: None,
            secret_set: now,
        }
    }

    /// Judges a sealed msg1 from `source`. Without a valid mac1: refused,
    /// at the cost of one BLAKE2s over it. Not under load: accepted. Under
    /// load: accepted with a valid mac2 for `source`, else a cookie reply.
    /// A stale or wrong mac2 (a cookie for another address, a secret two
    /// rotations old) gets a fresh cookie reply as in WireGuard, not a
    /// refusal: an initiator whose NAT moved it to another port gets back
    /// in one round trip, and the reply costs no public-key work.
    ///
    /// `fresh_secret` is called (for 32 random bytes) only when the secret
    /// is due to rotate; `nonce` must be 24 random bytes, never reused.
    pub fn check<'a>(
        &mut self,
        sealed: &'a [u8],
        source: SocketAddr,
        under_load: bool,
        now: Instant,
        fresh_secret: impl FnOnce() -> [u8; 32],
        nonce: [u8; NONCE_LEN],
    ) -> Verdict<'a> {
        let Sealed { msg1, mac1, mac2 } = match split(sealed) {
            Ok(parts) => parts,
            Err(e) => return Verdict::Refuse(e),
        };
        if !verify(&self.mac1_key, &[msg1], mac1) {
            return Verdict::Refuse(CookieError::BadMac1);
        }
        if !under_load {
            return Verdict::Accept(msg1);
        }
        self.rotate(now, fresh_secret);
        let (addr, n) = address_bytes(source);
        let addr = &addr[..n];
        let signed = &sealed[..msg1.len() + MAC_LEN];
        let current = Cookie::new(mac(&self.secret, &[addr]));
        let previous = self.previous.as_ref().map(|s| Cookie::new(mac(s, &[addr])));
        for cookie in std::iter::once(&current).chain(previous.as_ref()) {
            if verify(cookie, &[signed], mac2) {
                return Verdict::Accept(msg1);
            }
        }
        Verdict::CookieReply(self.reply(&current, mac1, nonce))
    }

    /// Rotates lazily: the secret set 120 s ago becomes the previous one;
    /// after 240 s without a rotation both are replaced.
    fn rotate(&mut self, now: Instant, fresh_secret: impl FnOnce() -> [u8; 32]) {
        let age = now.saturating_duration_since(self.secret_set);
        if age < COOKIE_LIFETIME {
            return;
        }
        let fresh = Zeroizing::new(fresh_secret());
        let old = std::mem::replace(&mut self.secret, fresh);
        self.previous = (age < 2 * COOKIE_LIFETIME).then_some(old);
        self.secret_set = now;
    }

    fn reply(&self, cookie: &Cookie, mac1: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let mut encrypted = **cookie;
        // Encrypting 16 bytes cannot fail (the limit is 256 GiB); were it to,
        // the zero tag would make the initiator refuse the reply, no more.
        let tag = self
            .cipher
            .encrypt_in_place_detached(GenericArray::from_slice(&nonce), mac1, &mut encrypted)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(COOKIE_REPLY_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&encrypted);
        out.extend_from_slice(&tag);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MSG1: &[u8] = &[0x5a; 100];

    fn key(b: u8) -> NoisePublicKey {
        NoisePublicKey([b; 32])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_label_list_holds_every_variants_label() {
        let all = [
            CookieError::TooShort { found: 0 },
            CookieError::BadMac1,
            CookieError::ReplyLength { found: 0 },
            CookieError::BadReply,
        ];
        // No wildcard: a new variant does not compile until listed above.
        for e in &all {
            match e {
                CookieError::TooShort { .. }
                | CookieError::BadMac1
                | CookieError::ReplyLength { .. }
                | CookieError::BadReply => {}
            }
        }
        let labels: Vec<&str> = all.iter().map(|e| e.label()).collect();
        assert_eq!(labels, CookieError::LABELS);
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A checker for `key(0x42)` with a counter for secret rotations.
    struct Responder {
        checker: CookieChecker,
        rotations: u8,
    }

    impl Responder {
        fn new(t0: Instant) -> Self {
            Self {
                checker: CookieChecker::new(&key(0x42), [0x77; 32], t0),
                rotations: 0,
            }
        }

        fn check<'a>(
            &mut self,
            sealed: &'a [u8],
            from: &str,
            under_load: bool,
            now: Instant,
        ) -> Verdict<'a> {
            let rotations = &mut self.rotations;
            self.checker.check(
                sealed,
                addr(from),
                under_load,
                now,
                || {
                    *rotations += 1;
                    [*rotations; 32]
                },
                [0x99; NONCE_LEN],
            )
        }
    }

    /// Runs the cookie round trip under load: returns the jar with the cookie.
    fn cookie_from(r: &mut Responder, from: &str, now: Instant) -> CookieJar {
        let mut jar = CookieJar::default();
        let sealed = jar.seal(&key(0x42), MSG1, now);
        let Verdict::CookieReply(reply) = r.check(&sealed, from, true, now) else {
            panic!("expected a cookie reply");
        };
        jar.accept_reply(&key(0x42), &sealed, &reply, now).unwrap();
        jar
    }

    #[test]
    fn valid_mac1_is_accepted_when_not_under_load() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let sealed = CookieJar::default().seal(&key(0x42), MSG1, t0);
        assert_eq!(sealed.len(), MSG1.len() + SEALED_OVERHEAD);
        assert_eq!(&sealed[MSG1.len() + MAC_LEN..], &[0; MAC_LEN]);
        assert_eq!(
            r.check(&sealed, "192.0.2.7:4000", false, t0),
            Verdict::Accept(MSG1)
        );
        assert_eq!(r.rotations, 0);
    }

    #[test]
    fn wrong_key_or_flipped_bit_is_bad_mac1() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let other = CookieJar::default().seal(&key(0x43), MSG1, t0);
        for load in [false, true] {
            assert_eq!(
                r.check(&other, "192.0.2.7:4000", load, t0),
                Verdict::Refuse(CookieError::BadMac1)
            );
        }
        let sealed = CookieJar::default().seal(&key(0x42), MSG1, t0);
        // Every bit of msg1 and of mac1 is covered; mac2 is not mac1's.
        for byte in 0..MSG1.len() + MAC_LEN {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[byte] ^= 1 << bit;
                assert_eq!(
                    r.check(&bad, "192.0.2.7:4000", false, t0),
                    Verdict::Refuse(CookieError::BadMac1),
                    "byte {byte} bit {bit}"
                );
            }
        }
        assert_eq!(
            r.rotations, 0,
            "no work for a bad mac1, not even a rotation"
        );
    }

    #[test]
    fn too_short_is_refused() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let short = [0u8; SEALED_OVERHEAD - 1];
        assert_eq!(
            r.check(&short, "192.0.2.7:4000", true, t0),
            Verdict::Refuse(CookieError::TooShort { found: 31 })
        );
        let mut jar = CookieJar::default();
        assert_eq!(
            jar.accept_reply(&key(0x42), &short, &[0; COOKIE_REPLY_LEN], t0),
            Err(CookieError::TooShort { found: 31 })
        );
        // An empty msg1 with a valid mac1 is not this module's business.
        let empty = jar.seal(&key(0x42), &[], t0);
        assert_eq!(
            r.check(&empty, "192.0.2.7:4000", false, t0),
            Verdict::Accept(&[])
        );
    }

    #[test]
    fn under_load_the_cookie_round_trip_gets_msg1_accepted() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let mut jar = CookieJar::default();
        let first = jar.seal(&key(0x42), MSG1, t0);
        let Verdict::CookieReply(reply) = r.check(&first, "192.0.2.7:4000", true, t0) else {
            panic!("expected a cookie reply");
        };
        assert_eq!(reply.len(), COOKIE_REPLY_LEN);
        jar.accept_reply(&key(0x42), &first, &reply, t0).unwrap();
        let later = t0 + Duration::from_secs(1);
        let second = jar.seal(&key(0x42), MSG1, later);
        assert_eq!(
            first[..MSG1.len() + MAC_LEN],
            second[..MSG1.len() + MAC_LEN]
        );
        assert_ne!(&second[MSG1.len() + MAC_LEN..], &[0; MAC_LEN]);
        assert_eq!(
            r.check(&second, "192.0.2.7:4000", true, later),
            Verdict::Accept(MSG1)
        );
        // The same cookie keeps working for other msg1s from that address.
        let other = jar.seal(&key(0x42), b"another msg1", later);
        assert_eq!(
            r.check(&other, "192.0.2.7:4000", true, later),
            Verdict::Accept(b"another msg1".as_slice())
        );
    }

    #[test]
    fn a_cookie_for_another_address_gets_a_new_cookie_reply() {
        let t0 = Instant::now();
        for (from, to) in [
            ("192.0.2.7:4000", "192.0.2.8:4000"),
            ("192.0.2.7:4000", "192.0.2.7:4001"),
            ("[2001:db8::7]:4000", "[2001:db8::8]:4000"),
            ("[2001:db8::7]:4000", "192.0.2.7:4000"),
        ] {
            let mut r = Responder::new(t0);
            let jar = cookie_from(&mut r, from, t0);
            let sealed = jar.seal(&key(0x42), MSG1, t0);
            assert_eq!(r.check(&sealed, from, true, t0), Verdict::Accept(MSG1));
            assert!(
                matches!(r.check(&sealed, to, true, t0), Verdict::CookieReply(_)),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn an_ipv4_mapped_address_is_its_ipv4_address() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let jar = cookie_from(&mut r, "192.0.2.7:4000", t0);
        let sealed = jar.seal(&key(0x42), MSG1, t0);
        assert_eq!(
            r.check(&sealed, "[::ffff:192.0.2.7]:4000", true, t0),
            Verdict::Accept(MSG1)
        );
    }

    #[test]
    fn a_tampered_mac2_gets_a_cookie_reply() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let jar = cookie_from(&mut r, "192.0.2.7:4000", t0);
        let mut sealed = jar.seal(&key(0x42), MSG1, t0);
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(
            r.check(&sealed, "192.0.2.7:4000", true, t0),
            Verdict::CookieReply(_)
        ));
    }

    #[test]
    fn the_initiator_drops_a_cookie_after_120_s() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let jar = cookie_from(&mut r, "192.0.2.7:4000", t0);
        let fresh = jar.seal(
            &key(0x42),
            MSG1,
            t0 + COOKIE_LIFETIME - Duration::from_millis(1),
        );
        assert_ne!(&fresh[MSG1.len() + MAC_LEN..], &[0; MAC_LEN]);
        let stale = jar.seal(&key(0x42), MSG1, t0 + COOKIE_LIFETIME);
        assert_eq!(&stale[MSG1.len() + MAC_LEN..], &[0; MAC_LEN]);
    }

    #[test]
    fn a_cookie_survives_one_rotation_and_not_two() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        // Handed out just before the first rotation.
        let issued = t0 + COOKIE_LIFETIME - Duration::from_secs(1);
        let jar = cookie_from(&mut r, "192.0.2.7:4000", issued);
        let sealed = jar.seal(&key(0x42), MSG1, issued);
        // Rotated once (at 120 s): the previous secret still makes it.
        let once = t0 + COOKIE_LIFETIME;
        assert_eq!(
            r.check(&sealed, "192.0.2.7:4000", true, once),
            Verdict::Accept(MSG1)
        );
        assert_eq!(r.rotations, 1);
        // Rotated twice (at 240 s): refused, with a new cookie.
        let twice = once + COOKIE_LIFETIME;
        assert!(matches!(
            r.check(&sealed, "192.0.2.7:4000", true, twice),
            Verdict::CookieReply(_)
        ));
        assert_eq!(r.rotations, 2);
        // And its replacement works.
        let jar = cookie_from(&mut r, "192.0.2.7:4000", twice);
        let resealed = jar.seal(&key(0x42), MSG1, twice);
        assert_eq!(
            r.check(&resealed, "192.0.2.7:4000", true, twice),
            Verdict::Accept(MSG1)
        );
    }

    #[test]
    fn a_long_quiet_spell_replaces_both_secrets() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let jar = cookie_from(&mut r, "192.0.2.7:4000", t0);
        let sealed = jar.seal(&key(0x42), MSG1, t0);
        // One check 240 s later: a single rotation, and still no old secret.
        let late = t0 + 2 * COOKIE_LIFETIME;
        assert!(matches!(
            r.check(&sealed, "192.0.2.7:4000", true, late),
            Verdict::CookieReply(_)
        ));
        assert_eq!(r.rotations, 1);
    }

    #[test]
    fn no_rotation_before_120_s_nor_when_not_under_load() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let sealed = CookieJar::default().seal(&key(0x42), MSG1, t0);
        let just_before = t0 + COOKIE_LIFETIME - Duration::from_millis(1);
        r.check(&sealed, "192.0.2.7:4000", true, just_before);
        r.check(&sealed, "192.0.2.7:4000", false, t0 + 10 * COOKIE_LIFETIME);
        assert_eq!(r.rotations, 0);
    }

    #[test]
    fn a_bad_reply_is_refused_and_keeps_the_cookie() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let mut jar = CookieJar::default();
        let sealed = jar.seal(&key(0x42), MSG1, t0);
        let Verdict::CookieReply(reply) = r.check(&sealed, "192.0.2.7:4000", true, t0) else {
            panic!("expected a cookie reply");
        };
        // Any tampered byte: nonce, encrypted cookie or tag.
        for i in 0..reply.len() {
            let mut bad = reply.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                jar.accept_reply(&key(0x42), &sealed, &bad, t0),
                Err(CookieError::BadReply),
                "byte {i}"
            );
        }
        // A reply to another msg1 (another mac1).
        let other = jar.seal(&key(0x42), b"another msg1", t0);
        assert_eq!(
            jar.accept_reply(&key(0x42), &other, &reply, t0),
            Err(CookieError::BadReply)
        );
        // A reply from another responder key.
        assert_eq!(
            jar.accept_reply(&key(0x43), &sealed, &reply, t0),
            Err(CookieError::BadReply)
        );
        assert_eq!(
            jar.accept_reply(&key(0x42), &sealed, &reply[1..], t0),
            Err(CookieError::ReplyLength { found: 55 })
        );
        assert_eq!(
            jar.seal(&key(0x42), MSG1, t0)[MSG1.len() + MAC_LEN..],
            [0; MAC_LEN],
            "nothing was taken"
        );
        // A good cookie is not evicted by a later forged reply.
        jar.accept_reply(&key(0x42), &sealed, &reply, t0).unwrap();
        let mut forged = reply.clone();
        forged[COOKIE_REPLY_LEN - 1] ^= 1;
        assert!(jar.accept_reply(&key(0x42), &sealed, &forged, t0).is_err());
        let resealed = jar.seal(&key(0x42), MSG1, t0);
        assert_eq!(
            r.check(&resealed, "192.0.2.7:4000", true, t0),
            Verdict::Accept(MSG1)
        );
    }

    /// Pins the construction (labels, key derivation, order, address
    /// encoding); the values come from Python's hashlib and an independent
    /// XChaCha20-Poly1305 (docs/key-schedule.md).
    #[test]
    fn known_answer_vector() {
        let t0 = Instant::now();
        let mut r = Responder::new(t0);
        let mut jar = CookieJar::default();
        let sealed = jar.seal(&key(0x42), MSG1, t0);
        assert_eq!(
            sealed[MSG1.len()..],
            unhex("82e772124056e79576572f9e8c274edf00000000000000000000000000000000")
        );
        let Verdict::CookieReply(reply) = r.check(&sealed, "192.0.2.7:51821", true, t0) else {
            panic!("expected a cookie reply");
        };
        assert_eq!(
            reply,
            unhex(concat!(
                "999999999999999999999999999999999999999999999999",
                "ca0d26ea7fcbd16de35b6fe9c1aff92e",
                "75f28581e200397dc6dcbe2e45da76de"
            ))
        );
        jar.accept_reply(&key(0x42), &sealed, &reply, t0).unwrap();
        assert_eq!(
            jar.seal(&key(0x42), MSG1, t0)[MSG1.len() + MAC_LEN..],
            unhex("6f514bc708e855a516c6b54a9be0ae66")
        );
    }

    #[test]
    fn errors_have_distinct_labels() {
        let labels = [
            CookieError::TooShort { found: 0 }.label(),
            CookieError::BadMac1.label(),
            CookieError::ReplyLength { found: 0 }.label(),
            CookieError::BadReply.label(),
        ];
        assert_eq!(
            labels,
            ["too_short", "bad_mac1", "reply_length", "bad_reply"]
        );
    }

    proptest! {
        #[test]
        fn random_input_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            reply in proptest::collection::vec(any::<u8>(), 0..80),
            load: bool,
            port: u16,
            secs in 0u64..1000,
        ) {
            let t0 = Instant::now();
            let now = t0 + Duration::from_secs(secs);
            let mut r = Responder::new(t0);
            let from = SocketAddr::from(([198, 51, 100, 1], port)).to_string();
            let verdict = r.check(&bytes, &from, load, now);
            prop_assert!(!matches!(verdict, Verdict::Accept(_)), "random bytes passed mac1");
            let mut jar = CookieJar::default();
            prop_assert!(jar.accept_reply(&key(0x42), &bytes, &reply, now).is_err());
            let _ = jar.seal(&key(0x42), &bytes, now);
        }
    }
}
