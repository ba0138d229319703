//! The post-quantum channel between a node (or a machine joining) and the
//! keyd authority, sans-IO: bytes in, bytes out.
//!
//! `Noise_XKhfs_25519+Kyber1024_ChaChaPoly_BLAKE2s` (the KEM is ML-KEM-1024
//! through [`crate::kem::resolver`], as keyd↔keyd). The client knows the
//! authority's static key in advance (a join token carries it) and proves its
//! own static key, its keyd Noise key, in msg3. With snow's `hfs` modifier
//! (`apply_hfs_modifier`: `e1` goes right after the first message's DH,
//! `ekem1` right after `ee`) the pattern is:
//!
//! ```text
//!   <- s
//!   ...
//!   -> e, es, e1        msg1: payload empty (only X25519 `es` protects it)
//!   <- e, ee, ekem1     msg2: payload empty
//!   -> s, se            msg3: payload = the client's hello
//! ```
//!
//! `e1` (the ML-KEM public key) travels encrypted under `es`. The client's
//! static key and its hello (a join token) travel under keys that already mix
//! `ee` and the ML-KEM secret, so a future quantum decryptor of a recording
//! learns neither. A payload in msg1 or msg2 is refused by its receiver.
//!
//! Who notices what: a client pinned to the wrong authority key, on another
//! network or suite (the prologue differs), or a tampered msg1 fails at the
//! authority in [`ServerHandshake::accept`] ([`ChannelError::Decrypt`], the
//! client learns it only as a closed stream); a tampered msg2 fails at the
//! client in [`ClientHandshake::finish`], which is also where the client
//! learns that the authority holds the pinned key; a tampered msg3 fails in
//! [`ServerHandshake::finish`].
//!
//! After the handshake, [`Channel`] carries application messages of any size
//! up to a limit as a sequence of Noise transport messages. Each message on
//! the wire (framed by the caller with [`crate::frame`]) is at most 65535
//! bytes. The plaintext of each chunk starts with a flags byte (`START`,
//! `END`), and a first chunk adds the whole message's length (u32,
//! big-endian), so the receiver refuses an oversized message at its first
//! chunk, before buffering any of it. Noise's nonces refuse a replayed,
//! dropped or reordered chunk. Any error in [`Channel::open`] closes the
//! channel for good: the stream under it is reliable, so an error means the
//! peer or the path misbehaves.
//!
//! Secrets: the DH and ML-KEM secrets live in the resolver's types, which wipe
//! themselves. Every plaintext buffer here (hello, chunks, reassembly) is
//! [`Zeroizing`], and a reassembly buffer that grows is copied into a larger
//! one and the old one wiped, never reallocated in place.

use std::fmt;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::identity::{NoisePrivateKey, NoisePublicKey};
use crate::kem;

/// The suite as pqmesh names it (the KEM by its FIPS 203 name).
pub const SUITE: &str = "Noise_XKhfs_25519+ML-KEM-1024_ChaChaPoly_BLAKE2s";
/// The same suite as snow's grammar names it.
pub const NOISE_PARAMS: &str = "Noise_XKhfs_25519+Kyber1024_ChaChaPoly_BLAKE2s";
/// Noise's own message size limit; also the frame limit on the wire.
pub use crate::exchange::MAX_MESSAGE_LEN;
/// The largest hello (msg3 payload) either side accepts.
pub const MAX_HELLO_LEN: usize = 8 * 1024;
/// What a msg3 adds to its hello: the encrypted static key (32 + 16) and the
/// payload's tag (16).
pub const MSG3_OVERHEAD: usize = 32 + 16 + 16;
/// [`Channel`]'s default limit on one reassembled message.
pub const DEFAULT_MAX_MESSAGE: usize = 32 * 1024 * 1024;

const TAG_LEN: usize = 16;
/// The largest chunk plaintext (header included) one Noise message carries.
const MAX_CHUNK_PLAINTEXT: usize = MAX_MESSAGE_LEN - TAG_LEN;
const START: u8 = 0x01;
const END: u8 = 0x02;
/// Flags byte, plus the total length on a first chunk.
const START_HEADER_LEN: usize = 1 + 4;
const NEXT_HEADER_LEN: usize = 1;

/// The prologue both sides must agree on, byte for byte: purpose, suite and
/// network, so that no other protocol's or network's handshake can complete.
pub fn prologue(network_id: &str) -> Vec<u8> {
    format!("pqmesh-authority/1\0{SUITE}\0{network_id}").into_bytes()
}

/// Which message a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Msg1,
    Msg2,
    Msg3,
    Transport,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Msg1 => "msg1",
            Step::Msg2 => "msg2",
            Step::Msg3 => "msg3",
            Step::Transport => "transport message",
        })
    }
}

/// Why the channel or its handshake refused something.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChannelError {
    /// Building our own Noise state failed (a bug, not the peer's doing).
    #[error("local setup: {0}")]
    Setup(String),
    #[error("{step} of {len} bytes is longer than 65535")]
    TooLong { step: Step, len: usize },
    /// The message does not authenticate: another key (a client pinned to the
    /// wrong authority), another network or suite, tampered bytes, or a
    /// replayed, dropped or reordered transport message.
    #[error("{step} does not authenticate")]
    Decrypt { step: Step },
    /// Noise refused the message for another reason (wrong length, bad key
    /// encoding).
    #[error("{step} rejected: {reason}")]
    Noise { step: Step, reason: String },
    #[error("{step} carries a {len}-byte payload where none is allowed")]
    UnexpectedPayload { step: Step, len: usize },
    #[error("hello of {len} bytes is over the {max}-byte limit")]
    HelloTooLong { len: usize, max: usize },
    #[error("handshake finished without the client's static key")]
    MissingStatic,
    /// A message larger than the receiver's limit (refused at its first
    /// chunk) or than the wire format's (refused by `seal`).
    #[error("message of {len} bytes is over the {limit}-byte limit")]
    MessageTooLarge { len: u64, limit: u64 },
    #[error("malformed chunk: {0}")]
    Chunk(&'static str),
    /// An earlier error closed the channel.
    #[error("channel closed after an earlier error")]
    Closed,
}

impl ChannelError {
    /// Stable label for logs and counters.
    pub fn label(&self) -> &'static str {
        match self {
            ChannelError::Setup(_) => "setup",
            ChannelError::TooLong { .. } => "too_long",
            ChannelError::Decrypt { .. } => "decrypt",
            ChannelError::Noise { .. } => "noise",
            ChannelError::UnexpectedPayload { .. } => "unexpected_payload",
            ChannelError::HelloTooLong { .. } => "hello_too_long",
            ChannelError::MissingStatic => "missing_static",
            ChannelError::MessageTooLarge { .. } => "message_too_large",
            ChannelError::Chunk(_) => "chunk",
            ChannelError::Closed => "closed",
        }
    }

    fn noise(step: Step, e: snow::Error) -> Self {
        match e {
            snow::Error::Decrypt => ChannelError::Decrypt { step },
            e => ChannelError::Noise {
                step,
                reason: e.to_string(),
            },
        }
    }
}

fn build(
    network_id: &str,
    local: &NoisePrivateKey,
    authority: Option<&NoisePublicKey>,
) -> Result<snow::HandshakeState, ChannelError> {
    let setup = |e: snow::Error| ChannelError::Setup(e.to_string());
    let params = NOISE_PARAMS.parse().map_err(setup)?;
    let prologue = prologue(network_id);
    let builder = snow::Builder::with_resolver(params, kem::resolver())
        .local_private_key(local.0.as_bytes())
        .map_err(setup)?
        .prologue(&prologue)
        .map_err(setup)?;
    match authority {
        Some(key) => builder
            .remote_public_key(&key.0)
            .map_err(setup)?
            .build_initiator(),
        None => builder.build_responder(),
    }
    .map_err(setup)
}

fn write(
    hs: &mut snow::HandshakeState,
    step: Step,
    payload: &[u8],
) -> Result<Vec<u8>, ChannelError> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let n = hs
        .write_message(payload, &mut buf)
        .map_err(|e| ChannelError::noise(step, e))?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads a handshake message; the payload lands in a buffer wiped on drop.
fn read(
    hs: &mut snow::HandshakeState,
    step: Step,
    msg: &[u8],
) -> Result<Zeroizing<Vec<u8>>, ChannelError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ChannelError::TooLong {
            step,
            len: msg.len(),
        });
    }
    let mut buf = Zeroizing::new(vec![0u8; msg.len()]);
    let n = hs
        .read_message(msg, &mut buf)
        .map_err(|e| ChannelError::noise(step, e))?;
    buf.truncate(n);
    Ok(buf)
}

fn read_empty(hs: &mut snow::HandshakeState, step: Step, msg: &[u8]) -> Result<(), ChannelError> {
    let payload = read(hs, step, msg)?;
    if !payload.is_empty() {
        return Err(ChannelError::UnexpectedPayload {
            step,
            len: payload.len(),
        });
    }
    Ok(())
}

fn transport(hs: snow::HandshakeState) -> Result<Channel, ChannelError> {
    let state = hs
        .into_transport_mode()
        .map_err(|e| ChannelError::Setup(e.to_string()))?;
    Ok(Channel {
        state,
        max_message: DEFAULT_MAX_MESSAGE,
        partial: None,
        closed: false,
    })
}

/// The client's side: msg1 sent, waiting for msg2.
pub struct ClientHandshake {
    hs: snow::HandshakeState,
}

impl fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHandshake").finish_non_exhaustive()
    }
}

impl ClientHandshake {
    /// Starts a handshake with the authority whose static key is pinned;
    /// returns msg1 to send.
    pub fn start(
        network_id: &str,
        local: &NoisePrivateKey,
        authority: &NoisePublicKey,
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        let mut hs = build(network_id, local, Some(authority))?;
        let msg1 = write(&mut hs, Step::Msg1, &[])?;
        Ok((Self { hs }, msg1))
    }

    /// Takes the authority's msg2 and returns the channel and msg3, which
    /// carries `hello` (at most [`MAX_HELLO_LEN`] bytes). A msg2 that does
    /// not authenticate means the peer does not hold the pinned key.
    pub fn finish(mut self, msg2: &[u8], hello: &[u8]) -> Result<(Channel, Vec<u8>), ChannelError> {
        if hello.len() > MAX_HELLO_LEN {
            return Err(ChannelError::HelloTooLong {
                len: hello.len(),
                max: MAX_HELLO_LEN,
            });
        }
        read_empty(&mut self.hs, Step::Msg2, msg2)?;
        let msg3 = write(&mut self.hs, Step::Msg3, hello)?;
        Ok((transport(self.hs)?, msg3))
    }
}

/// The authority's side: msg2 sent, waiting for msg3.
pub struct ServerHandshake {
    hs: snow::HandshakeState,
}

impl fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandshake").finish_non_exhaustive()
    }
}

impl ServerHandshake {
    /// Answers a client's msg1; returns msg2 to send. Costs one X25519 and
    /// one ML-KEM encapsulation per call whoever sent msg1: the caller
    /// bounds how often an unauthenticated source may call it.
    pub fn accept(
        network_id: &str,
        local: &NoisePrivateKey,
        msg1: &[u8],
    ) -> Result<(Self, Vec<u8>), ChannelError> {
        let mut hs = build(network_id, local, None)?;
        read_empty(&mut hs, Step::Msg1, msg1)?;
        let msg2 = write(&mut hs, Step::Msg2, &[])?;
        Ok((Self { hs }, msg2))
    }

    /// Takes msg3; returns the channel, the client's proven static key and
    /// its hello. Who the client is, and whether its hello admits it, is the
    /// caller's decision.
    pub fn finish(
        mut self,
        msg3: &[u8],
    ) -> Result<(Channel, NoisePublicKey, Zeroizing<Vec<u8>>), ChannelError> {
        // Checked before any decryption: a hello over the limit costs nothing.
        let hello_len = msg3.len().saturating_sub(MSG3_OVERHEAD);
        if hello_len > MAX_HELLO_LEN {
            return Err(ChannelError::HelloTooLong {
                len: hello_len,
                max: MAX_HELLO_LEN,
            });
        }
        let hello = read(&mut self.hs, Step::Msg3, msg3)?;
        let client = self
            .hs
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(NoisePublicKey)
            .ok_or(ChannelError::MissingStatic)?;
        Ok((transport(self.hs)?, client, hello))
    }
}

/// A message being reassembled: its announced length and what arrived.
struct Partial {
    total: usize,
    buf: Zeroizing<Vec<u8>>,
}

/// An established channel (snow's transport state) that carries messages
/// of any size up to a limit, chunked into Noise transport messages.
///
/// The limit, [`Channel::max_message`], bounds what [`Channel::open`]
/// reassembles: [`DEFAULT_MAX_MESSAGE`] unless [`Channel::set_max_message`]
/// says otherwise. [`Channel::seal`] is bounded only by the wire format
/// (`u32::MAX` bytes): what the peer accepts is the peer's limit.
pub struct Channel {
    state: snow::TransportState,
    max_message: usize,
    partial: Option<Partial>,
    closed: bool,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("max_message", &self.max_message)
            .field("reassembling", &self.partial.as_ref().map(|p| p.total))
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// The largest reassembled message [`Channel::open`] accepts.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Sets the largest reassembled message [`Channel::open`] accepts.
    pub fn set_max_message(&mut self, max_message: usize) {
        self.max_message = max_message;
    }

    /// Seals one application message of any size (up to `u32::MAX` bytes) as
    /// one or more Noise transport messages (each <= 65535 bytes on the
    /// wire), each carrying a small header saying whether more follow.
    pub fn seal(&mut self, message: &[u8]) -> Result<Vec<Vec<u8>>, ChannelError> {
        if self.closed {
            return Err(ChannelError::Closed);
        }
        let total = u32::try_from(message.len()).map_err(|_| ChannelError::MessageTooLarge {
            len: message.len() as u64,
            limit: u64::from(u32::MAX),
        })?;
        // Sized once for the largest chunk, so it never reallocates and
        // leaves no unwiped copy behind.
        let mut plain = Zeroizing::new(Vec::with_capacity(MAX_CHUNK_PLAINTEXT));
        let mut out = Vec::with_capacity(message.len() / MAX_CHUNK_PLAINTEXT + 1);
        let mut rest = message;
        let mut first = true;
        loop {
            let header = if first {
                START_HEADER_LEN
            } else {
                NEXT_HEADER_LEN
            };
            let (data, tail) = rest.split_at(rest.len().min(MAX_CHUNK_PLAINTEXT - header));
            let mut flags = 0;
            if first {
                flags |= START;
            }
            if tail.is_empty() {
                flags |= END;
            }
            plain.clear();
            plain.push(flags);
            if first {
                plain.extend_from_slice(&total.to_be_bytes());
            }
            plain.extend_from_slice(data);
            let mut msg = vec![0u8; plain.len() + TAG_LEN];
            let n = match self.state.write_message(&plain, &mut msg) {
                Ok(n) => n,
                Err(e) => {
                    // Some chunks may have used nonces already: the peer
                    // could never read what follows.
                    self.closed = true;
                    return Err(ChannelError::noise(Step::Transport, e));
                }
            };
            msg.truncate(n);
            out.push(msg);
            rest = tail;
            first = false;
            if rest.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Opens one Noise transport message; returns `Some(message)` when the
    /// last chunk of a message arrived. Refuses a message over the limit at
    /// its first chunk (before buffering any of it), a bad tag, a chunk out
    /// of order (snow's nonce), a malformed header. Any error closes the
    /// channel: later calls return [`ChannelError::Closed`].
    pub fn open(
        &mut self,
        noise_message: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, ChannelError> {
        if self.closed {
            return Err(ChannelError::Closed);
        }
        let result = self.open_inner(noise_message);
        if result.is_err() {
            self.closed = true;
            self.partial = None;
        }
        result
    }

    fn open_inner(
        &mut self,
        noise_message: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, ChannelError> {
        if noise_message.len() > MAX_MESSAGE_LEN {
            return Err(ChannelError::TooLong {
                step: Step::Transport,
                len: noise_message.len(),
            });
        }
        let mut plain = Zeroizing::new(vec![0u8; noise_message.len()]);
        let n = self
            .state
            .read_message(noise_message, &mut plain)
            .map_err(|e| ChannelError::noise(Step::Transport, e))?;
        let plain = plain.get(..n).ok_or(ChannelError::Chunk("length"))?;
        let (&flags, rest) = plain
            .split_first()
            .ok_or(ChannelError::Chunk("no header"))?;
        if flags & !(START | END) != 0 {
            return Err(ChannelError::Chunk("unknown flags"));
        }
        let data = if flags & START != 0 {
            if self.partial.is_some() {
                return Err(ChannelError::Chunk("a message starts inside another"));
            }
            let (len, data) = rest
                .split_first_chunk::<4>()
                .ok_or(ChannelError::Chunk("first chunk without a length"))?;
            let total = u32::from_be_bytes(*len);
            let fits = usize::try_from(total)
                .ok()
                .filter(|t| *t <= self.max_message);
            let Some(total) = fits else {
                return Err(ChannelError::MessageTooLarge {
                    len: u64::from(total),
                    limit: self.max_message as u64,
                });
            };
            self.partial = Some(Partial {
                total,
                buf: Zeroizing::new(Vec::new()),
            });
            data
        } else {
            rest
        };
        let Some(partial) = self.partial.as_mut() else {
            return Err(ChannelError::Chunk("a continuation without a start"));
        };
        let need = partial.buf.len() + data.len();
        if need > partial.total {
            return Err(ChannelError::Chunk("more bytes than the message announced"));
        }
        if need > partial.buf.capacity() {
            // Grow by copying into a larger buffer and wiping the old one
            // (a Vec's own reallocation would free it unwiped). Doubling
            // keeps the copies linear; memory follows what arrived, not what
            // was announced.
            let cap = need
                .max(partial.buf.capacity().saturating_mul(2))
                .min(partial.total);
            let mut grown = Zeroizing::new(Vec::with_capacity(cap));
            grown.extend_from_slice(&partial.buf);
            partial.buf = grown;
        }
        partial.buf.extend_from_slice(data);
        if flags & END == 0 {
            return Ok(None);
        }
        if need != partial.total {
            return Err(ChannelError::Chunk(
                "fewer bytes than the message announced",
            ));
        }
        Ok(self.partial.take().map(|p| p.buf))
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
