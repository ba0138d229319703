//! Error types. Every refusal has its own variant so that the daemons can log
//! it specifically and count it under its own label (`TrustError::label`).

use thiserror::Error;

use crate::UnixTime;

/// Bytes that do not decode: armor, base64, postcard, lengths.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error("expected a `-----BEGIN {expected}-----` block")]
    MissingArmor { expected: &'static str },
    #[error("armored block `{found}` where `{expected}` was expected")]
    WrongArmorLabel {
        expected: &'static str,
        found: String,
    },
    #[error("armored block has no matching END line")]
    UnterminatedArmor,
    #[error("invalid base64: {0}")]
    Base64(String),
    #[error("expected {expected} bytes, found {found}")]
    Length { expected: usize, found: usize },
    #[error("malformed encoding: {0}")]
    Malformed(String),
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("unsupported format version {found} (this build understands {supported})")]
    Version { found: u8, supported: u8 },
}

impl From<postcard::Error> for CodecError {
    fn from(e: postcard::Error) -> Self {
        CodecError::Malformed(e.to_string())
    }
}

/// Key material problems.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    #[error("key: {0}")]
    Codec(#[from] CodecError),
    #[error(
        "key file {path} is readable by group or others (mode {mode:03o}); \
         a private key must be private: run `chmod 600 {path}`"
    )]
    InsecurePermissions { path: String, mode: u32 },
    #[error("the operating system random generator failed: {0}")]
    Random(String),
}

/// A node certificate attribute (`KEY=VALUE`) that cannot be certified.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AttributeError {
    #[error(
        "attribute name `{key}` must be 1-{max} characters of a-z, 0-9, '_', '.' or '-'",
        max = crate::cert::MAX_ATTRIBUTE_KEY_LEN
    )]
    Key { key: String },
    #[error(
        "attribute `{key}`: value `{value}` must be 1-{max} printable ASCII characters without '=' or ','",
        max = crate::cert::MAX_ATTRIBUTE_VALUE_LEN
    )]
    Value { key: String, value: String },
    #[error("`{text}` is not KEY=VALUE")]
    Syntax { text: String },
    #[error("attribute `{key}` is given twice")]
    Duplicate { key: String },
    #[error("{count} attributes: a certificate holds at most {max}", max = crate::cert::MAX_ATTRIBUTES)]
    TooMany { count: usize },
}

/// Certificate problems found while decoding, issuing or signing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CertError {
    #[error("certificate: {0}")]
    Codec(#[from] CodecError),
    #[error("invalid certificate attribute: {0}")]
    Attribute(#[from] AttributeError),
    #[error("invalid certificate field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("signature does not verify")]
    BadSignature,
}

/// Roster problems: decoding, signature, consistency, rollback.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RosterError {
    #[error("roster: {0}")]
    Codec(#[from] CodecError),
    #[error("roster member {index}: {source}")]
    Member { index: usize, source: CertError },
    #[error("roster is not signed by the configured CA (issuer {found}, expected {expected})")]
    WrongIssuer { expected: String, found: String },
    #[error("roster signature does not verify against the configured CA")]
    BadSignature,
    #[error("roster is for network `{found}`, this node is in `{expected}`")]
    WrongNetwork { expected: String, found: String },
    #[error("roster member {index} ({name}) is not signed by the CA or a listed authority")]
    MemberNotFromCa { index: usize, name: String },
    #[error("roster authority certificate {index}: {source}")]
    Authority { index: usize, source: CertError },
    #[error("roster is signed by {signer}, which is neither the CA nor a listed authority")]
    UnknownSigner { signer: String },
    #[error("roster signer {signer} was not valid at the roster's issue time {issued_at}")]
    SignerExpired { signer: String, issued_at: UnixTime },
    #[error(
        "roster signer {signer} is valid {not_before}..{not_after}, not now ({now}): an expired or future authority key signs nothing"
    )]
    SignerNotValidNow {
        signer: String,
        not_before: UnixTime,
        not_after: UnixTime,
        now: UnixTime,
    },
    #[error(
        "roster signer {signer} is not an authority the roster in use (serial {held}) lists, nor one certified since: a dropped key signs nothing"
    )]
    SignerNotTrusted { signer: String, held: u64 },
    #[error(
        "roster update from serial {from} does not apply to serial {current} (a gap or a replay; a snapshot is needed)"
    )]
    DeltaGap { current: u64, from: u64 },
    #[error("roster update for serial {serial} was made from another roster than the one in use")]
    DeltaBase { serial: u64 },
    #[error("roster update: {0}")]
    DeltaMalformed(String),
    #[error("roster member {index} ({name}) is for network `{found}`")]
    MemberWrongNetwork {
        index: usize,
        name: String,
        found: String,
    },
    #[error("roster lists {what} `{value}` twice")]
    Duplicate { what: &'static str, value: String },
    #[error("roster serial {offered} is older than the serial {current} in use (rollback refused)")]
    Rollback { current: u64, offered: u64 },
    #[error(
        "roster serial {serial} is already in use with different contents (serial reuse refused)"
    )]
    SerialReuse { serial: u64 },
    #[error("cannot sign roster: {0}")]
    Signing(CertError),
    /// The firewall policy the roster carries does not decode or validate.
    #[error("roster firewall policy: {0}")]
    Policy(crate::firewall::policy::PolicyError),
    #[error("roster expiry {not_after} is not after its issue time {issued_at}")]
    Validity {
        issued_at: UnixTime,
        not_after: UnixTime,
    },
    #[error(
        "roster serial {serial} expired at {not_after} (now {now}): the CA must publish a newer one"
    )]
    Expired {
        serial: u64,
        not_after: UnixTime,
        now: UnixTime,
    },
}

/// Zero-trust refusals of a peer. One variant per check.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TrustError {
    #[error("peer certificate does not decode: {0}")]
    MalformedCertificate(CodecError),
    #[error("peer certificate is issued by another CA ({found}, expected {expected})")]
    UnknownCa { expected: String, found: String },
    #[error("peer certificate signature does not verify against the CA")]
    BadSignature,
    #[error("peer certificate is for network `{found}`, expected `{expected}`")]
    WrongNetwork { expected: String, found: String },
    #[error("peer certificate node id does not match its keys")]
    NodeIdMismatch,
    #[error("peer certificate is not valid before {not_before} (now {now})")]
    NotYetValid { not_before: UnixTime, now: UnixTime },
    #[error("peer certificate expired at {not_after} (now {now})")]
    Expired { not_after: UnixTime, now: UnixTime },
    #[error("the CA certificate is outside its validity window (now {now})")]
    CaExpired { now: UnixTime },
    #[error("peer certificate's issuing authority {issuer} expired at {not_after} (now {now})")]
    IssuerExpired {
        issuer: String,
        not_after: UnixTime,
        now: UnixTime,
    },
    #[error("peer certificate {fingerprint} is revoked")]
    Revoked { fingerprint: String },
    #[error("peer's Noise static key is not the one in its certificate")]
    StaticKeyMismatch,
    #[error("peer {name} ({node_id}) is not a member of the current roster")]
    NotInRoster { name: String, node_id: String },
    #[error("peer presented this node's own certificate")]
    SelfConnection,
    #[error("peer {name} ({node_id}) is not the peer this exchange was opened for")]
    UnexpectedPeer { name: String, node_id: String },
    /// Not the peer's fault: this node's roster is stale, so no peer can be
    /// checked against current revocations.
    #[error("this node's roster (serial {serial}) expired at {not_after} (now {now})")]
    RosterExpired {
        serial: u64,
        not_after: UnixTime,
        now: UnixTime,
    },
}

impl TrustError {
    /// Every label [`label`](Self::label) gives: counters show each reason
    /// from the start, at 0 (the test below keeps the two in step).
    pub const LABELS: [&'static str; 15] = [
        "malformed_certificate",
        "unknown_ca",
        "bad_signature",
        "wrong_network",
        "node_id_mismatch",
        "not_yet_valid",
        "expired",
        "ca_expired",
        "issuer_expired",
        "revoked",
        "static_key_mismatch",
        "not_in_roster",
        "self_connection",
        "unexpected_peer",
        "roster_expired",
    ];

    /// Stable label for logs and the `reason` label of refusal counters.
    pub fn label(&self) -> &'static str {
        match self {
            TrustError::MalformedCertificate(_) => "malformed_certificate",
            TrustError::UnknownCa { .. } => "unknown_ca",
            TrustError::BadSignature => "bad_signature",
            TrustError::WrongNetwork { .. } => "wrong_network",
            TrustError::NodeIdMismatch => "node_id_mismatch",
            TrustError::NotYetValid { .. } => "not_yet_valid",
            TrustError::Expired { .. } => "expired",
            TrustError::CaExpired { .. } => "ca_expired",
            TrustError::Revoked { .. } => "revoked",
            TrustError::StaticKeyMismatch => "static_key_mismatch",
            TrustError::NotInRoster { .. } => "not_in_roster",
            TrustError::SelfConnection => "self_connection",
            TrustError::UnexpectedPeer { .. } => "unexpected_peer",
            TrustError::RosterExpired { .. } => "roster_expired",
            TrustError::IssuerExpired { .. } => "issuer_expired",
        }
    }
}

/// Why a hybrid exchange failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ExchangeError {
    #[error("handshake message rejected: {0}")]
    Noise(String),
    /// Not marked as `source`: the message already carries the reason, and
    /// error chains would print it twice.
    #[error("peer refused: {0}")]
    Trust(TrustError),
    #[error("handshake payload does not decode: {0}")]
    Payload(CodecError),
    #[error("unexpected {0}")]
    UnexpectedMessage(&'static str),
    #[error("handshake timed out")]
    Timeout,
    #[error("exchange already ended")]
    Closed,
    #[error("local setup: {0}")]
    Setup(String),
    /// The responder's check that keys never repeat for a pair: the offered
    /// epoch must be above every epoch it used with this peer.
    #[error("peer offered epoch {offered}, not above {last}")]
    StaleEpoch { offered: u64, last: u64 },
}

impl ExchangeError {
    /// Every label [`label`](Self::label) gives for a failure of the
    /// exchange itself; a `Trust` failure gives one of [`TrustError::LABELS`].
    pub const LABELS: [&'static str; 7] = [
        "noise",
        "payload",
        "unexpected_message",
        "timeout",
        "closed",
        "setup",
        "stale_epoch",
    ];

    /// Stable label for logs and counters.
    pub fn label(&self) -> &'static str {
        match self {
            ExchangeError::Noise(_) => "noise",
            ExchangeError::Trust(t) => t.label(),
            ExchangeError::Payload(_) => "payload",
            ExchangeError::UnexpectedMessage(_) => "unexpected_message",
            ExchangeError::Timeout => "timeout",
            ExchangeError::Closed => "closed",
            ExchangeError::Setup(_) => "setup",
            ExchangeError::StaleEpoch { .. } => "stale_epoch",
        }
    }
}

impl From<TrustError> for ExchangeError {
    fn from(e: TrustError) -> Self {
        ExchangeError::Trust(e)
    }
}

impl From<snow::Error> for ExchangeError {
    fn from(e: snow::Error) -> Self {
        ExchangeError::Noise(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant. The match has no wildcard: a new variant does
    /// not compile until it is listed here, and so checked below.
    fn every_trust_error() -> Vec<TrustError> {
        let s = String::new;
        let all = vec![
            TrustError::MalformedCertificate(CodecError::UnterminatedArmor),
            TrustError::UnknownCa {
                expected: s(),
                found: s(),
            },
            TrustError::BadSignature,
            TrustError::WrongNetwork {
                expected: s(),
                found: s(),
            },
            TrustError::NodeIdMismatch,
            TrustError::NotYetValid {
                not_before: 0,
                now: 0,
            },
            TrustError::Expired {
                not_after: 0,
                now: 0,
            },
            TrustError::CaExpired { now: 0 },
            TrustError::IssuerExpired {
                issuer: s(),
                not_after: 0,
                now: 0,
            },
            TrustError::Revoked { fingerprint: s() },
            TrustError::StaticKeyMismatch,
            TrustError::NotInRoster {
                name: s(),
                node_id: s(),
            },
            TrustError::SelfConnection,
            TrustError::UnexpectedPeer {
                name: s(),
                node_id: s(),
            },
            TrustError::RosterExpired {
                serial: 0,
                not_after: 0,
                now: 0,
            },
        ];
        for e in &all {
            match e {
                TrustError::MalformedCertificate(_)
                | TrustError::UnknownCa { .. }
                | TrustError::BadSignature
                | TrustError::WrongNetwork { .. }
                | TrustError::NodeIdMismatch
                | TrustError::NotYetValid { .. }
                | TrustError::Expired { .. }
                | TrustError::CaExpired { .. }
                | TrustError::IssuerExpired { .. }
                | TrustError::Revoked { .. }
                | TrustError::StaticKeyMismatch
                | TrustError::NotInRoster { .. }
                | TrustError::SelfConnection
                | TrustError::UnexpectedPeer { .. }
                | TrustError::RosterExpired { .. } => {}
            }
        }
        all
    }

    /// As above, without `Trust` (whose labels are [`TrustError::LABELS`]).
    fn every_exchange_error() -> Vec<ExchangeError> {
        let all = vec![
            ExchangeError::Noise(String::new()),
            ExchangeError::Payload(CodecError::UnterminatedArmor),
            ExchangeError::UnexpectedMessage("msg2"),
            ExchangeError::Timeout,
            ExchangeError::Closed,
            ExchangeError::Setup(String::new()),
            ExchangeError::StaleEpoch {
                offered: 1,
                last: 1,
            },
        ];
        for e in &all {
            match e {
                ExchangeError::Trust(_) => unreachable!("listed by TrustError::LABELS"),
                ExchangeError::Noise(_)
                | ExchangeError::Payload(_)
                | ExchangeError::UnexpectedMessage(_)
                | ExchangeError::Timeout
                | ExchangeError::Closed
                | ExchangeError::Setup(_)
                | ExchangeError::StaleEpoch { .. } => {}
            }
        }
        all
    }

    #[test]
    fn the_label_lists_hold_every_variants_label_once() {
        let trust: Vec<&str> = every_trust_error().iter().map(|e| e.label()).collect();
        assert_eq!(trust, TrustError::LABELS);
        let exchange: Vec<&str> = every_exchange_error().iter().map(|e| e.label()).collect();
        assert_eq!(exchange, ExchangeError::LABELS);
        let mut all: Vec<&str> = trust.into_iter().chain(exchange).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "labels are distinct");
        let wrapped = ExchangeError::Trust(TrustError::BadSignature);
        assert_eq!(wrapped.label(), "bad_signature");
    }
}
