//! Messages between a node and the authority, inside the post-quantum
//! channel (`mesh_proto::channel`). Postcard-encoded; every one is bounded
//! by the channel's message limit on the side that receives it.
//!
//! ```text
//! node                                   authority
//!  channel msg3: Hello::Join        ->   Enrolled | Refused
//!  channel msg3: Hello::Subscribe   ->   Snapshot | Delta... then Delta, Keepalive, ... (until either side closes)
//! ```

use std::net::SocketAddr;

use mesh_proto::identity::WgPublicKey;
use mesh_proto::signed::Fingerprint;
use serde::{Deserialize, Serialize};

use super::token::{TokenId, TokenSecret};

/// QUIC ALPN of the authority service.
pub const ALPN: &[u8] = b"pqmesh-authority/1";
/// The largest reply a node accepts: a snapshot of a 10,000-node roster is
/// about 4 MB.
pub const MAX_REPLY: usize = 64 * 1024 * 1024;

/// Where a node's data plane and keyd listen, as the node itself sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub wg: Option<SocketAddr>,
    pub keyd: Option<SocketAddr>,
}

/// The first thing a node says, in the channel's third message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hello {
    Join(JoinRequest),
    Subscribe(SubscribeRequest),
}

/// A machine enrolls. Its Noise key is the channel's client static (proven
/// by the handshake); its WireGuard key is sent here. Neither private key
/// ever leaves the machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token_id: TokenId,
    pub token_secret: TokenSecret,
    /// The name the machine asks for (the token may restrict it).
    pub name: String,
    pub wg_public: WgPublicKey,
    pub endpoints: Endpoints,
}

/// A member asks for every roster change from the one it holds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeRequest {
    pub serial: u64,
    pub roster: Option<Fingerprint>,
    pub endpoints: Endpoints,
}

/// Why the authority said no. Stable: nodes and operators match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the join token is not known to this authority")]
    TokenUnknown,
    #[error("the join token has been used as many times as it allows")]
    TokenUsed,
    #[error("the join token has expired")]
    TokenExpired,
    #[error("the join token has been revoked")]
    TokenRevoked,
    #[error("the name is not allowed by this token's name pattern")]
    NameNotAllowed,
    #[error("the name is malformed")]
    NameInvalid,
    #[error("the name is taken by another node")]
    NameTaken,
    #[error("these keys are already enrolled")]
    KeysTaken,
    #[error("this node has been revoked")]
    NodeRevoked,
    #[error("this key is not a member of the network")]
    NotAMember,
    #[error("the address pool is exhausted")]
    PoolExhausted,
    #[error("the request is malformed")]
    Malformed,
    #[error("the authority is busy; try again")]
    Busy,
    #[error("the authority could not complete the request")]
    Internal,
}

impl Refusal {
    /// Stable label for counters and logs.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TokenUnknown => "token_unknown",
            Refusal::TokenUsed => "token_used",
            Refusal::TokenExpired => "token_expired",
            Refusal::TokenRevoked => "token_revoked",
            Refusal::NameNotAllowed => "name_not_allowed",
            Refusal::NameInvalid => "name_invalid",
            Refusal::NameTaken => "name_taken",
            Refusal::KeysTaken => "keys_taken",
            Refusal::NodeRevoked => "node_revoked",
            Refusal::NotAMember => "not_a_member",
            Refusal::PoolExhausted => "pool_exhausted",
            Refusal::Malformed => "malformed",
            Refusal::Busy => "busy",
            Refusal::Internal => "internal",
        }
    }
}

/// What the authority sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Enrollment done: the root CA certificate, the node's certificate and
    /// the current roster (which lists it).
    Enrolled {
        ca: Vec<u8>,
        cert: Vec<u8>,
        roster: Vec<u8>,
    },
    Refused(Refusal),
    /// The whole current roster (a node that is new, or too far behind).
    Snapshot(Vec<u8>),
    /// One roster delta, serial n to n + 1.
    Delta(Vec<u8>),
    /// Nothing changed; the subscription is alive.
    Keepalive,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing owned values into memory cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, mesh_proto::CodecError> {
    mesh_proto::armor::postcard_exact(bytes)
}
