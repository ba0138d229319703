//! The authority's decisions: tokens, enrollment, revocation, renewal,
//! roster refresh and signing-key rollover, over the state loaded from the
//! store.
//!
//! Every change is computed in memory, written to the store as one atomic
//! batch, and only then applied in memory: a failed commit leaves both as
//! they were. Each change to the roster yields a [`Published`] delta for the
//! subscribers. Time comes in as an argument (unit tests run on simulated
//! time); the only I/O is the store and, on a key rollover, the new key's
//! files ([`KeyFiles`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_proto::UnixTime;
use mesh_proto::cert::{
    AuthorityCert, CaCert, NodeCert, NodeCertRequest, attribute_map, check_label,
};
use mesh_proto::delta::{RosterChange, SetPolicy};
use mesh_proto::firewall::policy::{Policy, PolicyError};
use mesh_proto::identity::{CaSigningKey, NodeId, NoisePublicKey, WgPublicKey};
use mesh_proto::prefix::IpPrefix;
use mesh_proto::roster::{Member, RevokedNode, Roster, RosterContent, Signer};
use mesh_proto::signed::Fingerprint;
use tracing::{info, warn};

use super::pool::address_at;
use super::store::{Batch, Meta, NodeRecord, Store, StoreError, TokenRecord};
use super::token::{JoinToken, TokenId, TokenSecret};
use super::wire::{Endpoints, JoinRequest, Refusal};

/// Certificates are renewed once this fraction of their life has passed.
const RENEW_AT: (u64, u64) = (2, 3);
/// Node certificates start this much before issue, for clocks a little behind.
const BACKDATE: u64 = 60;

/// How the authority runs (from its configuration file).
#[derive(Clone, Debug)]
pub struct Params {
    pub cert_lifetime: u64,
    pub roster_lifetime: u64,
    /// Life of an authority key certified by a root key this authority holds.
    pub authority_lifetime: u64,
    pub pool_v4: IpPrefix,
    pub pool_v6: Option<IpPrefix>,
    /// Deltas kept for nodes catching up; older gaps get a snapshot.
    pub keep_deltas: u64,
    /// Endpoints written into join tokens.
    pub endpoints: Vec<SocketAddr>,
}

/// An authority signing key and the root's certificate for it.
pub struct SigningKey {
    pub cert: AuthorityCert,
    pub key: CaSigningKey,
}

/// Where the authority keeps its signing keys: a rollover writes the new
/// key here before the roster that names it is committed.
pub trait KeyFiles: Send {
    fn save(&mut self, key: &SigningKey) -> Result<(), AuthorityError>;
}

/// One roster change for the subscribers.
#[derive(Clone, Debug)]
pub struct Published {
    pub serial: u64,
    pub delta: Arc<Vec<u8>>,
    /// Nodes this change revokes: their subscriptions end after it.
    pub cut: Vec<NodeId>,
}

/// What a node that holds `serial` needs.
#[derive(Debug)]
pub enum Catchup {
    UpToDate,
    Deltas(Vec<Vec<u8>>),
    Snapshot(Vec<u8>),
}

/// A successful enrollment.
#[derive(Debug)]
pub struct Enrolled {
    pub node_id: NodeId,
    pub cert: NodeCert,
    pub published: Option<Published>,
}

/// What an operator asks for when creating a token.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub lifetime: u64,
    pub uses: u32,
    pub groups: Vec<String>,
    pub attributes: Vec<(String, String)>,
    pub name_pattern: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("roster: {0}")]
    Roster(#[from] mesh_proto::RosterError),
    #[error("certificate: {0}")]
    Cert(#[from] mesh_proto::CertError),
    #[error("firewall policy: {0}")]
    Policy(#[from] PolicyError),
    #[error("the store holds another network (`{found}`, expected `{expected}`)")]
    WrongNetwork { expected: String, found: String },
    #[error("the store's roster is signed by {signer}, but no key file for it was found")]
    NoSigningKey { signer: String },
    #[error("no node named or with id `{0}`")]
    NoSuchNode(String),
    #[error("no token with id `{0}`")]
    NoSuchToken(String),
    #[error("node `{0}` is already revoked")]
    AlreadyRevoked(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot save the new signing key: {0}")]
    KeyFile(String),
    #[error("cannot draw random bytes: {0}")]
    Random(String),
}

pub struct Authority {
    ca: CaCert,
    root_key: Option<CaSigningKey>,
    signer: SigningKey,
    noise_public: NoisePublicKey,
    params: Params,
    store: Box<dyn Store>,
    key_files: Box<dyn KeyFiles>,
    meta: Meta,
    roster: Roster,
    tokens: BTreeMap<String, TokenRecord>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    by_noise: HashMap<NoisePublicKey, NodeId>,
    /// When the certificates next need a look for renewal (0: at the next
    /// call), so an idle authority does not parse every certificate each
    /// second.
    next_renewal_scan: UnixTime,
    /// Every delta committed and not yet taken by the server, in order, so
    /// that none is lost when a later step of the same operation fails.
    outbox: Vec<Published>,
    /// When each node's endpoints last changed in the roster: a node moves
    /// at most once per [`ENDPOINT_INTERVAL`]; later reports wait in
    /// `moved`.
    endpoints_published: HashMap<NodeId, UnixTime>,
    moved: std::collections::BTreeSet<NodeId>,
    /// When an automatic rollover last failed.
    rollover_failed_at: Option<UnixTime>,
}

/// Seconds between automatic rollover attempts after one failed.
const ROLLOVER_RETRY: u64 = 600;

/// A member's endpoints change in the roster at most this often: each change
/// is a delta to every node, so a member must not be able to make the
/// authority publish without bound.
pub const ENDPOINT_INTERVAL: u64 = 60;

/// The in-memory effect of a batch, applied once the store has it.
struct Pending {
    batch: Batch,
    roster: Option<Roster>,
    published: Option<Published>,
}

impl Authority {
    /// Loads the state, or starts a network with an empty roster (serial 1)
    /// on a fresh store. `keys` are the signing keys found on disk: the one
    /// the roster names as its signer is used.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        store: Box<dyn Store>,
        key_files: Box<dyn KeyFiles>,
        ca: CaCert,
        root_key: Option<CaSigningKey>,
        mut keys: Vec<SigningKey>,
        noise_public: NoisePublicKey,
        params: Params,
        now: UnixTime,
    ) -> Result<Self, AuthorityError> {
        let loaded = store.load()?;
        let network = ca.body().network_id.clone();
        let (meta, roster, signer) = match loaded.meta {
            Some(meta) => {
                if meta.network_id != network {
                    return Err(AuthorityError::WrongNetwork {
                        expected: network,
                        found: meta.network_id,
                    });
                }
                let roster = Roster::from_bytes(&meta.roster, &ca)?;
                let at = keys
                    .iter()
                    .position(|k| k.cert.fingerprint() == roster.signer())
                    .ok_or_else(|| AuthorityError::NoSigningKey {
                        signer: roster.signer().to_hex(),
                    })?;
                (meta, roster, keys.swap_remove(at))
            }
            None => {
                // The newest key signs the first roster.
                keys.sort_by_key(|k| k.cert.body().not_after);
                let signer = keys.pop().ok_or_else(|| AuthorityError::NoSigningKey {
                    signer: "(none on disk)".into(),
                })?;
                let content = RosterContent {
                    serial: 1,
                    issued_at: now,
                    not_after: now + params.roster_lifetime,
                    authorities: vec![signer.cert.clone()],
                    ..RosterContent::default()
                };
                let roster =
                    Roster::sign(&ca, &Signer::Authority(&signer.cert, &signer.key), &content)?;
                let meta = Meta {
                    network_id: network,
                    serial: 1,
                    roster: roster.to_bytes(),
                    next_v4: 0,
                    next_v6: 0,
                };
                let mut store = store;
                store.commit(&Batch {
                    expect_serial: None,
                    meta: meta.clone(),
                    put_tokens: vec![],
                    put_nodes: vec![],
                    deltas: vec![],
                    keep_deltas: params.keep_deltas,
                })?;
                return Ok(Self::assemble(
                    store,
                    key_files,
                    ca,
                    root_key,
                    signer,
                    noise_public,
                    params,
                    meta,
                    roster,
                    vec![],
                    vec![],
                ));
            }
        };
        Ok(Self::assemble(
            store,
            key_files,
            ca,
            root_key,
            signer,
            noise_public,
            params,
            meta,
            roster,
            loaded.tokens,
            loaded.nodes,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        store: Box<dyn Store>,
        key_files: Box<dyn KeyFiles>,
        ca: CaCert,
        root_key: Option<CaSigningKey>,
        signer: SigningKey,
        noise_public: NoisePublicKey,
        params: Params,
        meta: Meta,
        roster: Roster,
        tokens: Vec<TokenRecord>,
        nodes: Vec<NodeRecord>,
    ) -> Self {
        let nodes: BTreeMap<NodeId, NodeRecord> =
            nodes.into_iter().map(|n| (NodeId(n.node_id), n)).collect();
        let by_noise = nodes
            .values()
            .map(|n| (NoisePublicKey(n.noise_public), NodeId(n.node_id)))
            .collect();
        // Moves recorded but not yet published when the authority stopped
        // go out at the first tick.
        let moved = nodes
            .values()
            .filter(|n| {
                roster.member(&NodeId(n.node_id)).is_some_and(|m| {
                    m.wg_endpoint != n.wg_endpoint || m.keyd_endpoint != n.keyd_endpoint
                })
            })
            .map(|n| NodeId(n.node_id))
            .collect();
        Self {
            ca,
            root_key,
            signer,
            noise_public,
            params,
            store,
            key_files,
            meta,
            roster,
            tokens: tokens.into_iter().map(|t| (t.id.clone(), t)).collect(),
            nodes,
            by_noise,
            next_renewal_scan: 0,
            outbox: Vec::new(),
            endpoints_published: HashMap::new(),
            moved,
            rollover_failed_at: None,
        }
    }

    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Every delta committed since the last call, in order. The server
    /// broadcasts these (and only these), so a delta committed by an
    /// operation that failed later is still sent.
    pub fn take_published(&mut self) -> Vec<Published> {
        std::mem::take(&mut self.outbox)
    }

    /// Reloads the state from the store, after a commit whose outcome is
    /// unknown (an I/O error may come after the data reached the disk):
    /// memory must not stay behind the store, or every later commit would
    /// meet a serial conflict.
    pub fn reload(&mut self) -> Result<(), AuthorityError> {
        let loaded = self.store.load()?;
        let Some(meta) = loaded.meta else {
            return Err(AuthorityError::Invalid("the store lost its state".into()));
        };
        let roster = Roster::from_bytes(&meta.roster, &self.ca)?;
        if roster.signer() != self.signer.cert.fingerprint() {
            return Err(AuthorityError::NoSigningKey {
                signer: roster.signer().to_hex(),
            });
        }
        self.nodes = loaded
            .nodes
            .into_iter()
            .map(|n| (NodeId(n.node_id), n))
            .collect();
        self.by_noise = self
            .nodes
            .values()
            .map(|n| (NoisePublicKey(n.noise_public), NodeId(n.node_id)))
            .collect();
        self.tokens = loaded
            .tokens
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        self.meta = meta;
        self.roster = roster;
        self.next_renewal_scan = 0;
        Ok(())
    }

    pub fn ca(&self) -> &CaCert {
        &self.ca
    }

    pub fn signer(&self) -> &AuthorityCert {
        &self.signer.cert
    }

    pub fn tokens(&self) -> impl Iterator<Item = &TokenRecord> {
        self.tokens.values()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    // ---- tokens -------------------------------------------------------

    /// Creates a token; the returned text is the only copy of its secret.
    pub fn create_token(
        &mut self,
        spec: TokenSpec,
        now: UnixTime,
    ) -> Result<(JoinToken, TokenRecord), AuthorityError> {
        if spec.uses == 0 {
            return Err(AuthorityError::Invalid(
                "a token needs at least one use".into(),
            ));
        }
        if spec.lifetime == 0 {
            return Err(AuthorityError::Invalid("a token needs a lifetime".into()));
        }
        for g in &spec.groups {
            check_label("groups", g)?;
        }
        // The rules of certificate attributes, and no name twice: what a
        // token grants must be certifiable at enrollment.
        attribute_map(spec.attributes.iter().cloned()).map_err(mesh_proto::CertError::from)?;
        if let Some(p) = &spec.name_pattern {
            check_pattern(p)?;
        }
        if self.params.endpoints.is_empty() {
            return Err(AuthorityError::Invalid(
                "the authority has no `endpoints` to write into tokens".into(),
            ));
        }
        let id = TokenId(
            *mesh_proto::identity::random_bytes::<8>()
                .map_err(|e| AuthorityError::Random(e.to_string()))?,
        );
        let secret = TokenSecret::generate().map_err(|e| AuthorityError::Random(e.to_string()))?;
        let record = TokenRecord {
            id: id.to_hex(),
            secret_hash: secret.hash(),
            created_at: now,
            expires_at: now.saturating_add(spec.lifetime),
            max_uses: spec.uses,
            uses: 0,
            groups: spec.groups,
            attributes: spec.attributes,
            name_pattern: spec.name_pattern,
            revoked_at: None,
        };
        self.commit(self.batch_for(vec![record.clone()], vec![], None, None))?;
        let token = JoinToken {
            network_id: self.ca.body().network_id.clone(),
            ca_fingerprint: self.ca.fingerprint(),
            authority_key: self.noise_public,
            endpoints: self.params.endpoints.clone(),
            id,
            secret,
        };
        Ok((token, record))
    }

    pub fn revoke_token(&mut self, id: &str, now: UnixTime) -> Result<TokenRecord, AuthorityError> {
        let mut t = self
            .tokens
            .get(id)
            .cloned()
            .ok_or_else(|| AuthorityError::NoSuchToken(id.to_string()))?;
        if t.revoked_at.is_none() {
            t.revoked_at = Some(now);
            self.commit(self.batch_for(vec![t.clone()], vec![], None, None))?;
        }
        Ok(t)
    }

    // ---- enrollment ---------------------------------------------------

    /// Enrolls the machine that proved `noise_public` in the channel and
    /// sent `req`, seen from `observed`. A machine that is already enrolled
    /// with these keys and name by this token gets its enrollment again
    /// (its first answer may have been lost), without using the token again.
    pub fn enroll(
        &mut self,
        req: &JoinRequest,
        noise_public: NoisePublicKey,
        observed: SocketAddr,
        now: UnixTime,
    ) -> Result<Enrolled, Refusal> {
        let id = NodeId::derive(&req.wg_public, &noise_public);
        // The answer to an enrollment may be lost: the same machine asking
        // again with the same token (now perhaps used up or expired) gets
        // the same enrollment. Only with the token's secret, so that this
        // reveals nothing to anyone else.
        let known = self.tokens.get(&req.token_id.to_hex());
        if let (Some(token), Some(existing)) = (known, self.nodes.get(&id))
            && req.token_secret.matches(&token.secret_hash)
            && existing.token_id == token.id
            && existing.name == req.name
            && existing.revoked_at.is_none()
        {
            let cert = NodeCert::from_bytes(&existing.cert).map_err(|_| Refusal::Internal)?;
            return Ok(Enrolled {
                node_id: id,
                cert,
                published: None,
            });
        }
        let token = self.check_token(req, now)?;
        check_label("name", &req.name).map_err(|_| Refusal::NameInvalid)?;
        if looks_like_node_id(&req.name) {
            return Err(Refusal::NameInvalid);
        }
        if let Some(p) = &token.name_pattern
            && !pattern_matches(p, &req.name)
        {
            return Err(Refusal::NameNotAllowed);
        }
        if self.is_revoked_key(&id, &req.wg_public, &noise_public) {
            return Err(Refusal::NodeRevoked);
        }
        if let Some(existing) = self.nodes.get(&id) {
            // Enrolled already (by another token): the same answer again.
            if existing.name == req.name {
                let cert = NodeCert::from_bytes(&existing.cert).map_err(|_| Refusal::Internal)?;
                return Ok(Enrolled {
                    node_id: id,
                    cert,
                    published: None,
                });
            }
            return Err(Refusal::KeysTaken);
        }
        if self
            .nodes
            .values()
            .any(|n| n.wg_public == req.wg_public.0 || n.noise_public == noise_public.0)
        {
            return Err(Refusal::KeysTaken);
        }
        // A revoked node's name may be taken again (it is no member).
        if self
            .nodes
            .values()
            .any(|n| n.name == req.name && n.revoked_at.is_none())
        {
            return Err(Refusal::NameTaken);
        }
        let mut meta = self.meta.clone();
        let mut addresses =
            vec![address_at(&self.params.pool_v4, meta.next_v4).ok_or(Refusal::PoolExhausted)?];
        meta.next_v4 += 1;
        if let Some(pool) = &self.params.pool_v6 {
            addresses.push(address_at(pool, meta.next_v6).ok_or(Refusal::PoolExhausted)?);
            meta.next_v6 += 1;
        }
        let cert = self
            .issue(
                &req.name,
                &addresses,
                &token.groups,
                &token.attributes,
                (req.wg_public, noise_public),
                now,
            )
            .map_err(|e| {
                warn!(error = %e, "enrollment: cannot issue a certificate");
                Refusal::Internal
            })?;
        let endpoints = published_endpoints(req.endpoints, observed);
        let record = NodeRecord {
            node_id: id.0,
            name: req.name.clone(),
            wg_public: req.wg_public.0,
            noise_public: noise_public.0,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            groups: token.groups.clone(),
            attributes: token.attributes.clone(),
            wg_endpoint: endpoints.wg,
            keyd_endpoint: endpoints.keyd,
            observed_addr: Some(observed),
            enrolled_at: now,
            token_id: token.id.clone(),
            cert: cert.to_bytes(),
            revoked_at: None,
        };
        let mut used = token.clone();
        used.uses += 1;
        let change = RosterChange {
            upsert: vec![Member {
                cert: cert.clone(),
                wg_endpoint: endpoints.wg,
                keyd_endpoint: endpoints.keyd,
            }],
            ..RosterChange::default()
        };
        let published = self
            .publish(change, vec![used], vec![record], Some(meta), now)
            .map_err(|e| {
                warn!(error = %e, "enrollment: cannot publish");
                Refusal::Internal
            })?;
        info!(name = %req.name, node_id = %id, address = %addresses[0], "node enrolled");
        Ok(Enrolled {
            node_id: id,
            cert,
            published,
        })
    }

    fn check_token(&self, req: &JoinRequest, now: UnixTime) -> Result<TokenRecord, Refusal> {
        let token = self
            .tokens
            .get(&req.token_id.to_hex())
            .ok_or(Refusal::TokenUnknown)?;
        // The secret first: without it, a token's state is not revealed.
        if !req.token_secret.matches(&token.secret_hash) {
            return Err(Refusal::TokenUnknown);
        }
        if token.revoked_at.is_some() {
            return Err(Refusal::TokenRevoked);
        }
        if now >= token.expires_at {
            return Err(Refusal::TokenExpired);
        }
        if token.uses >= token.max_uses {
            return Err(Refusal::TokenUsed);
        }
        Ok(token.clone())
    }

    fn is_revoked_key(&self, id: &NodeId, wg: &WgPublicKey, noise: &NoisePublicKey) -> bool {
        self.roster
            .revoked_nodes()
            .iter()
            .any(|r| r.node_id == *id || r.wg_public == *wg || r.noise_public == *noise)
    }

    /// A certificate for a node, with the groups and attributes its token
    /// granted (kept as they are across renewals and renames).
    fn issue(
        &self,
        name: &str,
        addresses: &[IpPrefix],
        groups: &[String],
        attributes: &[(String, String)],
        (wg_public, noise_public): (WgPublicKey, NoisePublicKey),
        now: UnixTime,
    ) -> Result<NodeCert, mesh_proto::CertError> {
        let a = self.signer.cert.body();
        let not_after = now
            .saturating_add(self.params.cert_lifetime)
            .min(a.not_after);
        self.signer.cert.issue(
            &self.signer.key,
            NodeCertRequest {
                name: name.to_string(),
                addresses: addresses.to_vec(),
                groups: groups.to_vec(),
                attributes: attribute_map(attributes.iter().cloned())?,
                not_before: now.saturating_sub(BACKDATE).max(a.not_before),
                not_after,
                wg_public,
                noise_public,
            },
        )
    }

    // ---- subscriptions ------------------------------------------------

    /// The member that proved `noise_public`, or why it may not subscribe.
    pub fn member_for(&self, noise_public: &NoisePublicKey) -> Result<NodeId, Refusal> {
        let id = self.by_noise.get(noise_public).ok_or(Refusal::NotAMember)?;
        match self.nodes.get(id) {
            Some(n) if n.revoked_at.is_none() => Ok(*id),
            Some(_) => Err(Refusal::NodeRevoked),
            None => Err(Refusal::NotAMember),
        }
    }

    /// Records where a member says it listens and where it was seen from;
    /// publishes the change when its roster endpoints move, at most once per
    /// [`ENDPOINT_INTERVAL`] per node (a later move waits for
    /// [`Self::handle_timeout`]).
    pub fn report_endpoints(
        &mut self,
        id: &NodeId,
        reported: Endpoints,
        observed: SocketAddr,
        now: UnixTime,
    ) -> Result<Option<Published>, AuthorityError> {
        let Some(node) = self.nodes.get(id).cloned() else {
            return Err(AuthorityError::NoSuchNode(id.to_string()));
        };
        let endpoints = published_endpoints(reported, observed);
        let mut record = node.clone();
        record.wg_endpoint = endpoints.wg;
        record.keyd_endpoint = endpoints.keyd;
        record.observed_addr = Some(observed);
        if record == node {
            return Ok(None);
        }
        let moves = self
            .roster
            .member(id)
            .is_some_and(|m| m.wg_endpoint != endpoints.wg || m.keyd_endpoint != endpoints.keyd);
        let recently = self
            .endpoints_published
            .get(id)
            .is_some_and(|t| now < t.saturating_add(ENDPOINT_INTERVAL));
        if moves && !recently {
            return self.publish_endpoints(vec![record], now);
        }
        self.commit(self.batch_for(vec![], vec![record], None, None))?;
        if moves {
            self.moved.insert(*id);
        }
        Ok(None)
    }

    /// One delta moving `records`' members to the endpoints recorded.
    fn publish_endpoints(
        &mut self,
        records: Vec<NodeRecord>,
        now: UnixTime,
    ) -> Result<Option<Published>, AuthorityError> {
        let upsert = records
            .iter()
            .filter_map(|r| {
                let m = self.roster.member(&NodeId(r.node_id))?;
                Some(Member {
                    wg_endpoint: r.wg_endpoint,
                    keyd_endpoint: r.keyd_endpoint,
                    ..m.clone()
                })
            })
            .collect();
        let ids: Vec<NodeId> = records.iter().map(|r| NodeId(r.node_id)).collect();
        let change = RosterChange {
            upsert,
            ..RosterChange::default()
        };
        match self.publish(change, vec![], records, None, now) {
            Ok(p) => {
                for id in ids {
                    self.endpoints_published.insert(id, now);
                    self.moved.remove(&id);
                }
                Ok(p)
            }
            // Not published: the move waits for the next tick.
            Err(e) => {
                self.moved.extend(ids);
                Err(e)
            }
        }
    }

    /// What a node holding roster `serial` (with fingerprint `fp`) is sent.
    pub fn catch_up(
        &self,
        serial: u64,
        fp: Option<Fingerprint>,
    ) -> Result<Catchup, AuthorityError> {
        let current = self.roster.serial();
        if serial == current && fp == Some(self.roster.fingerprint()) {
            return Ok(Catchup::UpToDate);
        }
        if serial == 0 || serial >= current || fp.is_none() {
            return Ok(Catchup::Snapshot(self.roster.to_bytes()));
        }
        match self.store.deltas(serial, current)? {
            // Many deltas cost more than the roster itself: send that.
            Some(d) if d.iter().map(Vec::len).sum::<usize>() < self.meta.roster.len() => {
                Ok(Catchup::Deltas(d))
            }
            _ => Ok(Catchup::Snapshot(self.roster.to_bytes())),
        }
    }

    // ---- operator actions ---------------------------------------------

    /// Finds a node by node id (hex), else by name (an active node before
    /// a revoked one of the same name). Names that read as node ids are
    /// refused at enrollment, so neither can stand for the other.
    pub fn find_node(&self, what: &str) -> Result<NodeId, AuthorityError> {
        if let Some(n) = self
            .nodes
            .values()
            .find(|n| NodeId(n.node_id).to_string() == what)
        {
            return Ok(NodeId(n.node_id));
        }
        let named = |active: bool| {
            self.nodes
                .values()
                .find(|n| n.name == what && n.revoked_at.is_none() == active)
        };
        named(true)
            .or_else(|| named(false))
            .map(|n| NodeId(n.node_id))
            .ok_or_else(|| AuthorityError::NoSuchNode(crate::text::name(what)))
    }

    /// The firewall policy in force (the roster's), if any.
    pub fn policy(&self) -> Option<&Policy> {
        self.roster.policy()
    }

    /// Sets the network's firewall policy from its encoding
    /// ([`Policy::encode`]), or removes it (`None`: no firewall). The bytes
    /// are decoded and validated (bounded, see [`Policy::decode`]) and the
    /// canonical encoding is what the roster carries. Publishes one delta;
    /// nothing when the policy is already in force.
    pub fn set_policy(
        &mut self,
        encoded: Option<&[u8]>,
        now: UnixTime,
    ) -> Result<Option<Published>, AuthorityError> {
        let canonical = encoded
            .map(|bytes| Policy::decode(bytes).map(|p| p.encode()))
            .transpose()?;
        if canonical.as_deref() == self.roster.policy_bytes() {
            return Ok(None);
        }
        let rules = self.roster.policy().map_or(0, |p| p.rules.len());
        let change = RosterChange {
            set_policy: Some(SetPolicy(canonical)),
            ..RosterChange::default()
        };
        let published = self.publish(change, vec![], vec![], None, now)?;
        info!(
            serial = self.roster.serial(),
            before = rules,
            after = self.roster.policy().map_or(0, |p| p.rules.len()),
            cleared = self.roster.policy().is_none(),
            "firewall policy changed"
        );
        Ok(published)
    }

    /// Revokes a node as a whole: its id and both keys, so that every
    /// certificate it ever had stops working on every node.
    pub fn revoke_node(
        &mut self,
        id: &NodeId,
        now: UnixTime,
    ) -> Result<Option<Published>, AuthorityError> {
        let mut node = self
            .nodes
            .get(id)
            .cloned()
            .ok_or_else(|| AuthorityError::NoSuchNode(id.to_string()))?;
        if node.revoked_at.is_some() {
            return Err(AuthorityError::AlreadyRevoked(node.name));
        }
        node.revoked_at = Some(now);
        let change = RosterChange {
            remove: vec![*id],
            revoke_nodes: vec![RevokedNode {
                node_id: *id,
                wg_public: WgPublicKey(node.wg_public),
                noise_public: NoisePublicKey(node.noise_public),
            }],
            ..RosterChange::default()
        };
        info!(name = %node.name, node_id = %id, "node revoked");
        self.publish(change, vec![], vec![node], None, now)
    }

    /// Renames a node: a new certificate with the new name.
    pub fn rename_node(
        &mut self,
        id: &NodeId,
        name: &str,
        now: UnixTime,
    ) -> Result<Option<Published>, AuthorityError> {
        check_label("name", name)?;
        if looks_like_node_id(name) {
            return Err(AuthorityError::Invalid(format!(
                "`{name}` reads as a node id: choose another name"
            )));
        }
        if self
            .nodes
            .values()
            .any(|n| n.name == name && n.revoked_at.is_none())
        {
            return Err(AuthorityError::Invalid(format!(
                "the name `{name}` is taken"
            )));
        }
        let mut node = self
            .nodes
            .get(id)
            .cloned()
            .ok_or_else(|| AuthorityError::NoSuchNode(id.to_string()))?;
        if node.revoked_at.is_some() {
            return Err(AuthorityError::AlreadyRevoked(node.name));
        }
        node.name = name.to_string();
        self.reissue(vec![node], now)
    }

    // ---- time ----------------------------------------------------------

    /// Renews certificates past two thirds of their life, refreshes the
    /// roster before it expires, and rolls the signing key over when a root
    /// key is at hand and the current key is past two thirds of its life.
    /// Call it every second or so.
    pub fn handle_timeout(&mut self, now: UnixTime) -> Result<Vec<Published>, AuthorityError> {
        // Each step on its own: a failed rollover must not stop renewals or
        // the roster's refresh. The first error is returned after all ran;
        // whatever was committed is in the outbox either way.
        let mut out = Vec::new();
        let mut first_error = None;
        let mut keep = |r: Result<Vec<Published>, AuthorityError>| match r {
            Ok(p) => out.extend(p),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        };
        keep(self.finish_rollover(now));
        keep(self.maybe_rollover(now).map(Option::unwrap_or_default));
        let due = if now >= self.next_renewal_scan {
            self.renewals_due(now)
        } else {
            Vec::new()
        };
        if !due.is_empty() {
            info!(count = due.len(), "renewing node certificates");
            keep(self.reissue(due, now).map(|p| p.into_iter().collect()));
        }
        let moved: Vec<NodeRecord> = self
            .moved
            .iter()
            .filter(|id| {
                self.endpoints_published
                    .get(id)
                    .is_none_or(|t| now >= t.saturating_add(ENDPOINT_INTERVAL))
            })
            .filter_map(|id| self.nodes.get(id).cloned())
            .collect();
        if !moved.is_empty() {
            keep(
                self.publish_endpoints(moved, now)
                    .map(|p| p.into_iter().collect()),
            );
        }
        let life = self.params.roster_lifetime;
        if self.roster.not_after() < now.saturating_add(life - life / 3) {
            keep(
                self.publish(RosterChange::default(), vec![], vec![], None, now)
                    .map(|p| p.into_iter().collect()),
            );
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Completes a rollover that stopped between its steps (a crash, a
    /// failed commit): members still holding certificates of another key
    /// get new ones, then only the signing key stays listed.
    fn finish_rollover(&mut self, now: UnixTime) -> Result<Vec<Published>, AuthorityError> {
        let signer = self.signer.cert.fingerprint();
        if self.roster.authorities().len() <= 1 && self.roster.signer() == signer {
            return Ok(Vec::new());
        }
        warn!("an unfinished signing-key rollover: completing it");
        let mut out = Vec::new();
        let stale: Vec<NodeRecord> = self
            .nodes
            .values()
            .filter(|n| n.revoked_at.is_none())
            .filter(|n| NodeCert::from_bytes(&n.cert).map_or(true, |c| c.body().issuer != signer))
            .cloned()
            .collect();
        if !stale.is_empty() {
            out.extend(self.reissue(stale, now)?);
        }
        out.extend(self.list_only_the_signer(now)?);
        Ok(out)
    }

    /// The roster update that drops every authority key but the signing one.
    fn list_only_the_signer(&mut self, now: UnixTime) -> Result<Option<Published>, AuthorityError> {
        let change = RosterChange {
            authorities: Some(vec![self.signer.cert.clone()]),
            ..RosterChange::default()
        };
        self.publish(change, vec![], vec![], None, now)
    }

    /// A new signing key certified by the root, published in three roster
    /// updates: list it, sign with it and reissue every certificate, drop
    /// the old key. Nodes take them in order; none is without a valid key.
    fn maybe_rollover(&mut self, now: UnixTime) -> Result<Option<Vec<Published>>, AuthorityError> {
        let Some(root) = &self.root_key else {
            return Ok(None);
        };
        // After a failed attempt, wait before the next: each makes a key.
        if self
            .rollover_failed_at
            .is_some_and(|t| now < t.saturating_add(ROLLOVER_RETRY))
        {
            return Ok(None);
        }
        let a = self.signer.cert.body();
        let life = a.not_after.saturating_sub(a.not_before);
        if now < a.not_before.saturating_add(life / 3 * 2) {
            return Ok(None);
        }
        let attempt = super::keys::certify(&self.ca, root, now, self.params.authority_lifetime)
            .and_then(|next| {
                self.key_files.save(&next)?;
                self.roll_to(next, now)
            });
        match attempt {
            Ok(p) => {
                self.rollover_failed_at = None;
                Ok(Some(p))
            }
            Err(e) => {
                self.rollover_failed_at = Some(now);
                Err(e)
            }
        }
    }

    /// Rolls over to `next` (already saved by the caller), whether made here
    /// or certified offline by an operator.
    pub fn roll_to(
        &mut self,
        next: SigningKey,
        now: UnixTime,
    ) -> Result<Vec<Published>, AuthorityError> {
        if next.cert.body().issuer != self.ca.fingerprint()
            || next.key.verifying_key() != next.cert.body().public_key
        {
            return Err(AuthorityError::Invalid(
                "the new key is not certified by this network's root".into(),
            ));
        }
        let mut out = Vec::new();
        info!(old = %self.signer.cert.fingerprint(), new = %next.cert.fingerprint(), "signing key rollover");
        let both = vec![self.signer.cert.clone(), next.cert.clone()];
        out.extend(self.publish(
            RosterChange {
                authorities: Some(both),
                ..RosterChange::default()
            },
            vec![],
            vec![],
            None,
            now,
        )?);
        let old = std::mem::replace(&mut self.signer, next);
        let active: Vec<NodeRecord> = self
            .nodes
            .values()
            .filter(|n| n.revoked_at.is_none())
            .cloned()
            .collect();
        match self.reissue(active, now) {
            Ok(p) => out.extend(p),
            Err(e) => {
                // Unless the reissue reached the store after all (a reload
                // then shows the new signer), the old key still signs.
                if self.roster.signer() != self.signer.cert.fingerprint() {
                    self.signer = old;
                }
                return Err(e);
            }
        }
        out.extend(self.list_only_the_signer(now)?);
        Ok(out)
    }

    /// The active nodes whose certificates are due; sets when to look next
    /// (the earliest renewal ahead, and at least hourly).
    fn renewals_due(&mut self, now: UnixTime) -> Vec<NodeRecord> {
        let mut due = Vec::new();
        let mut next = now.saturating_add(3600);
        for n in self.nodes.values().filter(|n| n.revoked_at.is_none()) {
            let Ok(c) = NodeCert::from_bytes(&n.cert) else {
                continue;
            };
            if self.renewal_due(&c, now) {
                due.push(n.clone());
            } else {
                let at = renewal_time(&c);
                if at > now {
                    next = next.min(at);
                }
            }
        }
        self.next_renewal_scan = next;
        due
    }

    /// Past two thirds of its life, and a new certificate would end later
    /// (near the end of the signing key's life it would not: then only a
    /// rollover helps, and renewing again would change nothing).
    fn renewal_due(&self, cert: &NodeCert, now: UnixTime) -> bool {
        let new_end = now
            .saturating_add(self.params.cert_lifetime)
            .min(self.signer.cert.body().not_after);
        now >= renewal_time(cert) && new_end > cert.body().not_after
    }

    /// New certificates for `nodes` (same keys and addresses), in one update.
    fn reissue(
        &mut self,
        nodes: Vec<NodeRecord>,
        now: UnixTime,
    ) -> Result<Option<Published>, AuthorityError> {
        let mut records = Vec::with_capacity(nodes.len());
        let mut upsert = Vec::with_capacity(nodes.len());
        for mut n in nodes {
            let addresses = n
                .addresses
                .iter()
                .map(|a| a.parse())
                .collect::<Result<Vec<IpPrefix>, _>>()
                .map_err(AuthorityError::Invalid)?;
            let cert = self.issue(
                &n.name,
                &addresses,
                &n.groups,
                &n.attributes,
                (WgPublicKey(n.wg_public), NoisePublicKey(n.noise_public)),
                now,
            )?;
            n.cert = cert.to_bytes();
            upsert.push(Member {
                cert,
                wg_endpoint: n.wg_endpoint,
                keyd_endpoint: n.keyd_endpoint,
            });
            records.push(n);
        }
        self.publish(
            RosterChange {
                upsert,
                ..RosterChange::default()
            },
            vec![],
            records,
            None,
            now,
        )
    }

    // ---- commit ----------------------------------------------------------

    /// Signs the next roster with `change`, commits it with the records, and
    /// applies it.
    fn publish(
        &mut self,
        change: RosterChange,
        tokens: Vec<TokenRecord>,
        nodes: Vec<NodeRecord>,
        meta: Option<Meta>,
        now: UnixTime,
    ) -> Result<Option<Published>, AuthorityError> {
        let signer = Signer::Authority(&self.signer.cert, &self.signer.key);
        let (roster, delta) = self.roster.next(
            &self.ca,
            &signer,
            &change,
            now,
            now.saturating_add(self.params.roster_lifetime),
        )?;
        let delta = Arc::new(delta.to_bytes());
        let published = Published {
            serial: roster.serial(),
            delta: delta.clone(),
            cut: change.revoke_nodes.iter().map(|r| r.node_id).collect(),
        };
        let mut pending = self.batch_for(tokens, nodes, meta, Some((roster, delta.to_vec())));
        pending.published = Some(published);
        self.commit(pending)
    }

    fn batch_for(
        &self,
        tokens: Vec<TokenRecord>,
        nodes: Vec<NodeRecord>,
        meta: Option<Meta>,
        roster: Option<(Roster, Vec<u8>)>,
    ) -> Pending {
        let mut meta = meta.unwrap_or_else(|| self.meta.clone());
        let mut deltas = Vec::new();
        let roster = roster.map(|(r, d)| {
            meta.serial = r.serial();
            meta.roster = r.to_bytes();
            deltas.push((r.serial(), d));
            r
        });
        Pending {
            batch: Batch {
                expect_serial: Some(self.meta.serial),
                meta,
                put_tokens: tokens,
                put_nodes: nodes,
                deltas,
                keep_deltas: self.params.keep_deltas,
            },
            roster,
            published: None,
        }
    }

    fn commit(&mut self, p: Pending) -> Result<Option<Published>, AuthorityError> {
        if let Err(e) = self.store.commit(&p.batch) {
            match self.reload() {
                // It reached the store after all: what it publishes goes out.
                Ok(()) if self.meta == p.batch.meta => {
                    warn!(error = %e, "a commit reported an error but reached the store");
                    if let Some(published) = &p.published {
                        self.outbox.push(published.clone());
                    }
                    return Ok(p.published);
                }
                Ok(()) => {}
                Err(r) => warn!(error = %r, "cannot reload the state after a failed commit"),
            }
            return Err(e.into());
        }
        let b = p.batch;
        self.meta = b.meta;
        for t in b.put_tokens {
            self.tokens.insert(t.id.clone(), t);
        }
        if !b.put_nodes.is_empty() {
            self.next_renewal_scan = 0;
        }
        for n in b.put_nodes {
            self.by_noise
                .insert(NoisePublicKey(n.noise_public), NodeId(n.node_id));
            self.nodes.insert(NodeId(n.node_id), n);
        }
        if let Some(r) = p.roster {
            self.roster = r;
        }
        if let Some(published) = &p.published {
            self.outbox.push(published.clone());
        }
        Ok(p.published)
    }
}

/// 32 hexadecimal digits: how a node id is written.
fn looks_like_node_id(name: &str) -> bool {
    name.len() == 32 && name.chars().all(|c| c.is_ascii_hexdigit())
}

/// Two thirds into a certificate's life, counted from when it was issued
/// (its `not_before` is back-dated for slow clocks).
fn renewal_time(cert: &NodeCert) -> UnixTime {
    let b = cert.body();
    let issued = b.not_before.saturating_add(BACKDATE).min(b.not_after);
    let life = b.not_after - issued;
    issued.saturating_add(life / RENEW_AT.1 * RENEW_AT.0)
}

/// A reported endpoint with an unspecified address (the node listens on
/// all addresses), or one no other node could use (loopback, multicast,
/// link-local, broadcast), is published with the address the authority
/// saw; port 0 is no endpoint. A member thus cannot point every node at an
/// arbitrary local address, only at its own port on the address it comes
/// from or on an address it says it has.
fn published_endpoints(reported: Endpoints, observed: SocketAddr) -> Endpoints {
    let usable = |ip: std::net::IpAddr| match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            !(v4.octets()[0] == 0
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_link_local()
                || v4.is_broadcast())
        }
        std::net::IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    };
    let fill = |e: Option<SocketAddr>| {
        e.filter(|e| e.port() != 0).map(|mut e| {
            if !usable(e.ip()) {
                e.set_ip(observed.ip());
            }
            e
        })
    };
    Endpoints {
        wg: fill(reported.wg),
        keyd: fill(reported.keyd),
    }
}

/// A name pattern: letters, digits, '-', '_', '.' and `*` (any run).
fn check_pattern(p: &str) -> Result<(), AuthorityError> {
    let ok = !p.is_empty()
        && p.len() <= mesh_proto::cert::MAX_NAME_LEN
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'));
    if ok {
        Ok(())
    } else {
        Err(AuthorityError::Invalid(format!(
            "name pattern `{}` may only hold letters, digits, '-', '_', '.' and '*'",
            crate::text::name(p)
        )))
    }
}

/// Glob match with `*` only, iteratively (no backtracking blow-up).
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
