//! The hybrid X25519 + ML-KEM-1024 exchange as a sans-IO state machine.
//!
//! ```text
//! initiator                                         responder
//!  msg1  -> e, e1                       (payload: empty)
//!  msg2  <- e, ee, ekem1, s, es         (payload: responder cert, its last epoch)
//!  msg3  -> s, se                       (payload: initiator cert, chosen epoch)
//!  conf  <- transport message           (payload: epoch)   key confirmation
//! ```
//! Epochs: the responder learns who the initiator is only at msg3, so in msg2
//! it sends the highest epoch it has used with *any* peer; the initiator picks
//! `max(its last with this peer, that) + 1`, which is therefore above every
//! epoch the responder used with this pair too. At msg3 the responder checks
//! it: the offered epoch must be above the value it sent and above its own
//! last epoch with this peer ([`ExchangeParams::peer_epochs`]), else
//! [`ExchangeError::StaleEpoch`]. A (pair, epoch) thus never repeats on the
//! responder, whatever the initiator remembers.
//!
//! `Noise_XXhfs_25519+Kyber1024_ChaChaPoly_BLAKE2s` (the KEM is ML-KEM-1024,
//! see [`crate::kem`]). Both certificates travel encrypted under keys that
//! already mix the ML-KEM secret, so identities stay hidden from a future
//! quantum adversary too. The prologue binds the protocol version, the suite
//! and the network id: a peer on another suite or network fails at msg2.
//!
//! Feed it with [`Exchange::receive`] and [`Exchange::handle_timeout`]; drain
//! [`Exchange::poll_transmit`] and [`Exchange::poll_event`]; arm a timer for
//! [`Exchange::poll_timeout`]. It never blocks, reads a clock or does I/O.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::armor::postcard_exact;
use crate::cert::NodeCert;
use crate::identity::{NodeId, NoisePrivateKey};
use crate::schedule::{Psk, derive_psk};
use crate::trust::{Trust, VerifiedPeer};
use crate::{CodecError, ExchangeError, TrustError, UnixTime, kem};

pub const PROTOCOL_VERSION: &str = "pqmesh/1";
/// The suite as pqmesh names it (the KEM by its FIPS 203 name).
pub const SUITE: &str = "Noise_XXhfs_25519+ML-KEM-1024_ChaChaPoly_BLAKE2s";
/// The same suite as snow's grammar names it.
pub const NOISE_PARAMS: &str = "Noise_XXhfs_25519+Kyber1024_ChaChaPoly_BLAKE2s";
/// Noise's own message size limit; also the frame limit on the wire.
pub const MAX_MESSAGE_LEN: usize = 65535;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The prologue both sides must agree on, byte for byte.
pub fn prologue(network_id: &str) -> Vec<u8> {
    format!("{PROTOCOL_VERSION}\0{SUITE}\0{network_id}").into_bytes()
}

/// A node's own identity as keyd holds it.
#[derive(Debug)]
pub struct LocalIdentity {
    pub cert: NodeCert,
    pub noise_key: NoisePrivateKey,
}

impl LocalIdentity {
    pub fn node_id(&self) -> NodeId {
        self.cert.body().node_id
    }
}

/// Each peer's last epoch with this node, as the responder needs it at msg3.
/// Cheap to clone: the daemon shares one map between exchanges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerEpochs(Arc<BTreeMap<NodeId, u64>>);

impl PeerEpochs {
    pub fn new(map: BTreeMap<NodeId, u64>) -> Self {
        Self(Arc::new(map))
    }

    /// The last epoch used with `id`; 0 when there was none.
    pub fn get(&self, id: &NodeId) -> u64 {
        self.0.get(id).copied().unwrap_or(0)
    }
}

/// Everything one exchange needs to know.
#[derive(Clone, Debug)]
pub struct ExchangeParams {
    pub identity: Arc<LocalIdentity>,
    pub trust: Trust,
    pub timeout: Duration,
    /// Initiator: highest epoch this node has used with the peer it dials (0
    /// if none). Responder: highest epoch this node has used with *any* peer,
    /// sent in msg2 before the peer is known. The new epoch is above both
    /// sides' values, so epochs only go up.
    pub last_epoch: u64,
    /// Responder: each peer's last epoch; msg3 must offer more than the
    /// initiator's entry here. The initiator ignores it.
    pub peer_epochs: PeerEpochs,
    /// The initiator knows whom it dialled: any other (valid) peer answering
    /// is refused. `None` on the responder.
    pub expected_peer: Option<NodeId>,
    /// What binds the exchange to the channel that carries it (keyd: the
    /// QUIC or TLS connection's exporter), mixed into the prologue: an
    /// exchange relayed between two different connections fails, so a
    /// connection on which one succeeded has the certified peer at its
    /// other end. Empty: not bound.
    pub channel_binding: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

/// A finished exchange: who the peer is and the key both sides now hold.
#[derive(Debug)]
pub struct Established {
    pub peer: VerifiedPeer,
    pub epoch: u64,
    pub psk: Psk,
    pub role: Role,
}

#[derive(Debug)]
pub enum Event {
    Established(Box<Established>),
    Failed(ExchangeError),
}

#[derive(Serialize, Deserialize)]
struct ResponderHello {
    cert: Vec<u8>,
    last_epoch: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct InitiatorHello {
    pub(crate) cert: Vec<u8>,
    pub(crate) epoch: u64,
}

#[derive(Serialize, Deserialize)]
struct Confirm {
    epoch: u64,
}

enum Stage {
    /// Responder: waiting for msg1.
    AwaitHello(snow::HandshakeState),
    /// Initiator: waiting for msg2.
    AwaitResponse(snow::HandshakeState),
    /// Responder: waiting for msg3.
    AwaitIdentity(snow::HandshakeState),
    /// Initiator: msg3 sent, waiting for the responder's key confirmation.
    AwaitConfirm(snow::TransportState, Box<Established>),
    Ended,
}

pub struct Exchange {
    role: Role,
    stage: Stage,
    params: ExchangeParams,
    deadline: Instant,
    unix_now: UnixTime,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("role", &self.role)
            .field("ended", &matches!(self.stage, Stage::Ended))
            .finish_non_exhaustive()
    }
}

pub(crate) fn build(
    params: &ExchangeParams,
    role: Role,
) -> Result<snow::HandshakeState, ExchangeError> {
    let noise_params = NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| ExchangeError::Setup(e.to_string()))?;
    let mut prologue = prologue(&params.trust.ca.body().network_id);
    if !params.channel_binding.is_empty() {
        prologue.extend_from_slice(b"\0channel\0");
        prologue.extend_from_slice(&params.channel_binding);
    }
    let builder = snow::Builder::with_resolver(noise_params, kem::resolver())
        .local_private_key(params.identity.noise_key.0.as_bytes())?
        .prologue(&prologue)?;
    Ok(match role {
        Role::Initiator => builder.build_initiator()?,
        Role::Responder => builder.build_responder()?,
    })
}

/// Serializing a small struct of integers and byte vectors into memory
/// cannot fail; an empty payload would fail the peer's decode, never ours.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).unwrap_or_default()
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ExchangeError> {
    postcard_exact(bytes).map_err(ExchangeError::Payload)
}

pub(crate) fn write(
    hs: &mut snow::HandshakeState,
    payload: &[u8],
) -> Result<Vec<u8>, ExchangeError> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let n = hs.write_message(payload, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn read(hs: &mut snow::HandshakeState, msg: &[u8]) -> Result<Vec<u8>, ExchangeError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(ExchangeError::Noise(
            "message longer than 65535 bytes".into(),
        ));
    }
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let n = hs.read_message(msg, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

impl Exchange {
    /// Starts an exchange as initiator; msg1 is ready in `poll_transmit`.
    pub fn initiate(
        params: ExchangeParams,
        now: Instant,
        unix_now: UnixTime,
    ) -> Result<Self, ExchangeError> {
        let mut hs = build(&params, Role::Initiator)?;
        let msg1 = write(&mut hs, &[])?;
        let mut ex = Self::new(
            Role::Initiator,
            Stage::AwaitResponse(hs),
            params,
            now,
            unix_now,
        );
        ex.transmit.push_back(msg1);
        Ok(ex)
    }

    /// Prepares to answer an exchange; feed it the peer's msg1.
    pub fn respond(
        params: ExchangeParams,
        now: Instant,
        unix_now: UnixTime,
    ) -> Result<Self, ExchangeError> {
        let hs = build(&params, Role::Responder)?;
        Ok(Self::new(
            Role::Responder,
            Stage::AwaitHello(hs),
            params,
            now,
            unix_now,
        ))
    }

    fn new(
        role: Role,
        stage: Stage,
        params: ExchangeParams,
        now: Instant,
        unix_now: UnixTime,
    ) -> Self {
        Self {
            role,
            stage,
            deadline: now + params.timeout,
            params,
            unix_now,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// True once an `Established` or `Failed` event has been queued.
    pub fn is_ended(&self) -> bool {
        matches!(self.stage, Stage::Ended)
    }

    /// One message from the peer. Errors end the exchange with a `Failed` event.
    pub fn receive(&mut self, msg: &[u8], now: Instant) {
        self.handle_timeout(now);
        let stage = std::mem::replace(&mut self.stage, Stage::Ended);
        let result = match stage {
            Stage::Ended => return,
            Stage::AwaitHello(hs) => self.on_hello(hs, msg),
            Stage::AwaitResponse(hs) => self.on_response(hs, msg),
            Stage::AwaitIdentity(hs) => self.on_identity(hs, msg),
            Stage::AwaitConfirm(ts, est) => self.on_confirm(ts, est, msg),
        };
        match result {
            Ok(next) => self.stage = next,
            Err(e) => self.events.push_back(Event::Failed(e)),
        }
    }

    /// Fails the exchange if its deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.is_ended() && now >= self.deadline {
            self.stage = Stage::Ended;
            self.events.push_back(Event::Failed(ExchangeError::Timeout));
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_ended()).then_some(self.deadline)
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn verify(
        &self,
        cert: &[u8],
        hs: &snow::HandshakeState,
    ) -> Result<VerifiedPeer, ExchangeError> {
        let remote = hs
            .get_remote_static()
            .ok_or(ExchangeError::UnexpectedMessage(
                "handshake without a static key",
            ))?;
        let peer = self.params.trust.verify_peer(cert, remote, self.unix_now)?;
        if let Some(expected) = self.params.expected_peer
            && peer.node_id() != expected
        {
            return Err(TrustError::UnexpectedPeer {
                name: peer.name().to_string(),
                node_id: peer.node_id().to_string(),
            }
            .into());
        }
        Ok(peer)
    }

    fn psk(&self, hs: &mut snow::HandshakeState, epoch: u64, peer: &VerifiedPeer) -> Psk {
        let (k1, k2) = hs.dangerously_get_raw_split();
        let (k1, k2) = (zeroize::Zeroizing::new(k1), zeroize::Zeroizing::new(k2));
        let local = self.params.identity.node_id();
        let (initiator, responder) = match self.role {
            Role::Initiator => (local, peer.node_id()),
            Role::Responder => (peer.node_id(), local),
        };
        derive_psk(
            (&k1, &k2),
            hs.get_handshake_hash(),
            epoch,
            &initiator,
            &responder,
        )
    }

    fn on_hello(
        &mut self,
        mut hs: snow::HandshakeState,
        msg: &[u8],
    ) -> Result<Stage, ExchangeError> {
        if !read(&mut hs, msg)?.is_empty() {
            return Err(ExchangeError::Payload(CodecError::Malformed(
                "first handshake message must carry no payload".into(),
            )));
        }
        let hello = ResponderHello {
            cert: self.params.identity.cert.to_bytes(),
            last_epoch: self.params.last_epoch,
        };
        let msg2 = write(&mut hs, &encode(&hello))?;
        self.transmit.push_back(msg2);
        Ok(Stage::AwaitIdentity(hs))
    }

    fn on_response(
        &mut self,
        mut hs: snow::HandshakeState,
        msg: &[u8],
    ) -> Result<Stage, ExchangeError> {
        let payload = read(&mut hs, msg)?;
        let hello: ResponderHello = decode(&payload)?;
        let peer = self.verify(&hello.cert, &hs)?;
        let epoch = self
            .params
            .last_epoch
            .max(hello.last_epoch)
            .checked_add(1)
            .ok_or(ExchangeError::UnexpectedMessage("epoch overflow"))?;
        let ident = InitiatorHello {
            cert: self.params.identity.cert.to_bytes(),
            epoch,
        };
        let msg3 = write(&mut hs, &encode(&ident))?;
        let psk = self.psk(&mut hs, epoch, &peer);
        let transport = hs.into_transport_mode()?;
        self.transmit.push_back(msg3);
        let est = Established {
            peer,
            epoch,
            psk,
            role: Role::Initiator,
        };
        Ok(Stage::AwaitConfirm(transport, Box::new(est)))
    }

    fn on_identity(
        &mut self,
        mut hs: snow::HandshakeState,
        msg: &[u8],
    ) -> Result<Stage, ExchangeError> {
        let payload = read(&mut hs, msg)?;
        let ident: InitiatorHello = decode(&payload)?;
        let peer = self.verify(&ident.cert, &hs)?;
        // An honest initiator offers more than the value sent in msg2, which
        // the daemon keeps at or above every pair's epoch; checking the pair's
        // own last epoch too keeps keys unique even if those disagree.
        let last = self
            .params
            .last_epoch
            .max(self.params.peer_epochs.get(&peer.node_id()));
        if ident.epoch <= last {
            return Err(ExchangeError::StaleEpoch {
                offered: ident.epoch,
                last,
            });
        }
        let psk = self.psk(&mut hs, ident.epoch, &peer);
        let mut transport = hs.into_transport_mode()?;
        let mut buf = vec![0u8; 64];
        let n = transport.write_message(&encode(&Confirm { epoch: ident.epoch }), &mut buf)?;
        buf.truncate(n);
        self.transmit.push_back(buf);
        self.events
            .push_back(Event::Established(Box::new(Established {
                peer,
                epoch: ident.epoch,
                psk,
                role: Role::Responder,
            })));
        Ok(Stage::Ended)
    }

    fn on_confirm(
        &mut self,
        mut transport: snow::TransportState,
        est: Box<Established>,
        msg: &[u8],
    ) -> Result<Stage, ExchangeError> {
        let mut buf = vec![0u8; msg.len()];
        let n = transport.read_message(msg, &mut buf)?;
        let confirm: Confirm = decode(&buf[..n])?;
        if confirm.epoch != est.epoch {
            return Err(ExchangeError::UnexpectedMessage(
                "confirmation of another epoch",
            ));
        }
        self.events.push_back(Event::Established(est));
        Ok(Stage::Ended)
    }
}
