//! The authority's persistent state: an embedded, crash-safe store (redb).
//!
//! The authority keeps its whole state in memory, loaded once at start with
//! [`Store::load`], and writes every change as ONE [`Batch`] through
//! [`Store::commit`]. The store is persistence only: it holds no business
//! logic beyond refusing batches that would break the invariants below.
//!
//! What it guarantees:
//! - **Atomic batches.** A batch (new meta, tokens, nodes, deltas, pruning) is
//!   one redb write transaction: after a crash either all of it is there or
//!   none of it.
//! - **Durable commits.** `commit` returns only after the transaction is on
//!   disk (`Durability::Immediate`, with two-phase commit so that no write
//!   order, even one chosen by someone who controls record contents, can make
//!   a torn commit look valid). A committed batch survives kill -9 and power
//!   loss.
//! - **No address offset twice.** A batch whose `next_v4`/`next_v6` is below
//!   the stored one, or whose serial is below the stored serial, is refused,
//!   so even a buggy caller cannot hand out the same overlay address again.
//! - **Compare-and-set on the roster serial.** A batch applies only if the
//!   stored serial equals `expect_serial`.
//!
//! Why the trait is shaped so: a replicated database (PostgreSQL, etcd)
//! shared by several authorities implements [`Store::commit`] as one
//! transaction that updates the meta row `WHERE serial = expect_serial` (or an
//! etcd transaction comparing the meta key's value) and writes the rest only
//! if that matched; a lost race is [`StoreError::Conflict`], after which the
//! authority reloads and retries. Single-process redb needs no such race
//! handling, but checks the same condition so both behave alike.
//!
//! Every value is a 1-byte schema version followed by its postcard encoding;
//! an unknown version or a value that does not decode is
//! [`StoreError::Corrupt`], naming the table and the key.

use std::fs::{OpenOptions, Permissions};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mesh_proto::UnixTime;
use mesh_proto::identity::NodeId;
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The schema version every stored value starts with.
pub const SCHEMA_VERSION: u8 = 1;

/// redb's page cache.
const STORE_CACHE: usize = 8 * 1024 * 1024;

/// The store file's mode: it holds token hashes and the whole membership.
pub const FILE_MODE: u32 = 0o600;

// Table names, as errors name them.
const META_T: &str = "meta";
const TOKENS_T: &str = "tokens";
const NODES_T: &str = "nodes";
const DELTAS_T: &str = "deltas";
const META: TableDefinition<&str, &[u8]> = TableDefinition::new(META_T);
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new(TOKENS_T);
const NODES: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new(NODES_T);
const DELTAS: TableDefinition<u64, &[u8]> = TableDefinition::new(DELTAS_T);
/// The one key of the meta table.
const META_KEY: &str = "meta";

/// A join token as stored: the secret itself is never stored, only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id (hex), the table key.
    pub id: String,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    pub created_at: UnixTime,
    pub expires_at: UnixTime,
    pub max_uses: u32,
    pub uses: u32,
    pub groups: Vec<String>,
    pub attributes: Vec<(String, String)>,
    pub name_pattern: Option<String>,
    pub revoked_at: Option<UnixTime>,
}

/// An enrolled node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The table key.
    pub node_id: [u8; 16],
    pub name: String,
    pub wg_public: [u8; 32],
    pub noise_public: [u8; 32],
    /// Overlay prefixes as text, e.g. "10.77.0.5/32", "fd77::5/128".
    pub addresses: Vec<String>,
    pub groups: Vec<String>,
    pub attributes: Vec<(String, String)>,
    /// Reported by the node.
    pub wg_endpoint: Option<SocketAddr>,
    /// Reported by the node.
    pub keyd_endpoint: Option<SocketAddr>,
    /// As the authority saw it.
    pub observed_addr: Option<SocketAddr>,
    pub enrolled_at: UnixTime,
    pub token_id: String,
    /// Its current certificate (signed bytes).
    pub cert: Vec<u8>,
    pub revoked_at: Option<UnixTime>,
}

/// The network-wide state beside the tokens and nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub network_id: String,
    /// Serial of `roster`.
    pub serial: u64,
    /// The current signed roster.
    pub roster: Vec<u8>,
    /// Next unused offset in the IPv4 pool (never goes down).
    pub next_v4: u64,
    /// Next unused offset in the IPv6 pool (never goes down).
    pub next_v6: u64,
}

/// Everything the store holds except the deltas, as loaded at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    /// None on a fresh store.
    pub meta: Option<Meta>,
    /// In id order.
    pub tokens: Vec<TokenRecord>,
    /// In node id order.
    pub nodes: Vec<NodeRecord>,
}

/// One atomic change. `expect_serial`: the batch applies only if the stored
/// meta's serial equals it (None = the store must be empty / have no meta);
/// otherwise StoreError::Conflict { expected, found }. This is the
/// compare-and-set a shared replicated database needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub expect_serial: Option<u64>,
    /// The new meta (always written).
    pub meta: Meta,
    /// Insert or replace by id.
    pub put_tokens: Vec<TokenRecord>,
    /// Insert or replace by node_id.
    pub put_nodes: Vec<NodeRecord>,
    /// (serial reached, signed delta bytes), in increasing serial order, each
    /// above the stored serial and at most `meta.serial`.
    pub deltas: Vec<(u64, Vec<u8>)>,
    /// After writing, keep only deltas with serial > meta.serial - keep_deltas.
    pub keep_deltas: u64,
}

/// The authority's persistence, one implementation per backend.
pub trait Store: Send {
    /// The whole state except the deltas.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Applies `batch` atomically and durably, or not at all.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// The deltas reaching serials from+1 ..= to, in order; Ok(None) if any
    /// of them is no longer kept (caller sends a snapshot instead).
    /// `from == to` gives an empty list; `from > to` gives None.
    fn deltas(&self, from: u64, to: u64) -> Result<Option<Vec<Vec<u8>>>, StoreError>;
}

/// A meta counter that must never go down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Serial,
    NextV4,
    NextV6,
}

impl std::fmt::Display for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Counter::Serial => "serial",
            Counter::NextV4 => "next_v4",
            Counter::NextV6 => "next_v6",
        })
    }
}

/// Why a stored value was refused.
#[derive(Debug, thiserror::Error)]
pub enum CorruptReason {
    #[error("empty value")]
    Empty,
    #[error("unknown schema version {0} (this keyd reads version {SCHEMA_VERSION})")]
    UnknownVersion(u8),
    // The postcard error is in the message rather than a source, so that the
    // whole refusal reads in one line in StoreError::Corrupt's message.
    #[error("cannot decode: {0}")]
    Decode(postcard::Error),
    #[error("{0} bytes after the value")]
    TrailingBytes(usize),
    #[error("the record names key {0}, not the key it is stored under")]
    KeyMismatch(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(
        "the store {} is already open in another process (is another keyd authority running on this state directory?)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("the store {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("cannot {action} the store {}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("store: cannot {context}")]
    Storage {
        context: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("store: cannot commit the batch")]
    Commit {
        #[source]
        source: Box<redb::CommitError>,
    },
    #[error("store: cannot encode a {table} value")]
    Encode {
        table: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("store: corrupt value in table {table}, key {key}: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: CorruptReason,
    },
    #[error("store: serial conflict: the batch expects {expected:?}, the store holds {found:?}")]
    Conflict {
        expected: Option<u64>,
        found: Option<u64>,
    },
    #[error("store: refused a batch that moves {counter} back from {stored} to {new}")]
    Regression {
        counter: Counter,
        stored: u64,
        new: u64,
    },
    #[error(
        "store: refused delta reaching serial {serial}: it must be above {above} and at most {max}"
    )]
    DeltaOutOfRange { serial: u64, above: u64, max: u64 },
}

/// Wraps a redb error with what the store was doing.
fn storage<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Storage {
        context,
        source: Box::new(e.into()),
    }
}

fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![SCHEMA_VERSION];
    postcard::to_io(value, &mut out).map_err(|source| StoreError::Encode { table, source })?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let result = match bytes.split_first() {
        None => Err(CorruptReason::Empty),
        Some((&SCHEMA_VERSION, body)) => match postcard::take_from_bytes::<T>(body) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(CorruptReason::TrailingBytes(rest.len())),
            Err(e) => Err(CorruptReason::Decode(e)),
        },
        Some((&version, _)) => Err(CorruptReason::UnknownVersion(version)),
    };
    result.map_err(|reason| StoreError::Corrupt {
        table,
        key: key(),
        reason,
    })
}

fn token_key(id: &str) -> String {
    crate::text::name(id)
}

fn node_key(id: &[u8; 16]) -> String {
    NodeId(*id).to_string()
}

fn read_meta(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Option<Meta>, StoreError> {
    match table.get(META_KEY).map_err(storage("read the meta"))? {
        None => Ok(None),
        Some(v) => decode(META_T, || META_KEY.to_owned(), v.value()).map(Some),
    }
}

/// The embedded default: one redb file in the authority's state directory.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens the store at `path`, creating it (mode 0600) if missing. An
    /// existing file with a wider mode is narrowed to 0600. Another open of
    /// the same file, in this process or another, is [`StoreError::Locked`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source: redb::Error| StoreError::Open {
            path: path.to_owned(),
            source: Box::new(source),
        };
        let io_err = |action, source| StoreError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        // Created here rather than by redb so it never exists with the umask's
        // mode, and never through a symlink.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_err(e.into()))?;
        let meta = file.metadata().map_err(|e| io_err("stat", e))?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile {
                path: path.to_owned(),
            });
        }
        if meta.permissions().mode() & 0o7777 != FILE_MODE {
            file.set_permissions(Permissions::from_mode(FILE_MODE))
                .map_err(|e| io_err("chmod 0600", e))?;
        }
        // The authority keeps its whole state in memory: redb's page cache
        // (1 GiB by default) would only hold a second copy of it.
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE)
            .create_file(file)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                    path: path.to_owned(),
                },
                e => open_err(e.into()),
            })?;
        // Create the tables once, so that reads never meet a missing table.
        let txn = db.begin_write().map_err(storage("begin a write"))?;
        {
            txn.open_table(META)
                .map_err(storage("create the meta table"))?;
            txn.open_table(TOKENS)
                .map_err(storage("create the tokens table"))?;
            txn.open_table(NODES)
                .map_err(storage("create the nodes table"))?;
            txn.open_table(DELTAS)
                .map_err(storage("create the deltas table"))?;
        }
        txn.commit().map_err(|e| StoreError::Commit {
            source: Box::new(e),
        })?;
        Ok(Self { db })
    }

    fn write_batch(txn: &WriteTransaction, batch: &Batch) -> Result<(), StoreError> {
        let mut meta_t = txn
            .open_table(META)
            .map_err(storage("open the meta table"))?;
        let stored = read_meta(&meta_t)?;
        let found = stored.as_ref().map(|m| m.serial);
        if found != batch.expect_serial {
            return Err(StoreError::Conflict {
                expected: batch.expect_serial,
                found,
            });
        }
        let new = &batch.meta;
        if let Some(old) = &stored {
            for (counter, stored, new) in [
                (Counter::Serial, old.serial, new.serial),
                (Counter::NextV4, old.next_v4, new.next_v4),
                (Counter::NextV6, old.next_v6, new.next_v6),
            ] {
                if new < stored {
                    return Err(StoreError::Regression {
                        counter,
                        stored,
                        new,
                    });
                }
            }
        }
        // Deltas only ever extend the stored history, so a kept delta is
        // never replaced and "deltas reaching serials" stays in step with meta.
        let mut above = found.unwrap_or(0);
        for (serial, _) in &batch.deltas {
            if *serial <= above || *serial > new.serial {
                return Err(StoreError::DeltaOutOfRange {
                    serial: *serial,
                    above,
                    max: new.serial,
                });
            }
            above = *serial;
        }

        let mut tokens = txn
            .open_table(TOKENS)
            .map_err(storage("open the tokens table"))?;
        for token in &batch.put_tokens {
            tokens
                .insert(token.id.as_str(), encode(TOKENS_T, token)?.as_slice())
                .map_err(storage("write a token"))?;
        }
        let mut nodes = txn
            .open_table(NODES)
            .map_err(storage("open the nodes table"))?;
        for node in &batch.put_nodes {
            nodes
                .insert(&node.node_id, encode(NODES_T, node)?.as_slice())
                .map_err(storage("write a node"))?;
        }
        let mut deltas = txn
            .open_table(DELTAS)
            .map_err(storage("open the deltas table"))?;
        for (serial, bytes) in &batch.deltas {
            deltas
                .insert(*serial, encode(DELTAS_T, bytes)?.as_slice())
                .map_err(storage("write a delta"))?;
        }
        let cutoff = new.serial.saturating_sub(batch.keep_deltas);
        deltas
            .retain_in(..=cutoff, |_, _| false)
            .map_err(storage("prune deltas"))?;
        meta_t
            .insert(META_KEY, encode(META_T, new)?.as_slice())
            .map_err(storage("write the meta"))?;
        Ok(())
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(storage("begin a read"))?;
        let meta_t = txn
            .open_table(META)
            .map_err(storage("open the meta table"))?;
        let meta = read_meta(&meta_t)?;

        let table = txn
            .open_table(TOKENS)
            .map_err(storage("open the tokens table"))?;
        let mut tokens = Vec::new();
        for item in table.iter().map_err(storage("read the tokens"))? {
            let (k, v) = item.map_err(storage("read a token"))?;
            let key = k.value();
            let token: TokenRecord = decode(TOKENS_T, || token_key(key), v.value())?;
            if token.id != key {
                return Err(StoreError::Corrupt {
                    table: TOKENS_T,
                    key: token_key(key),
                    reason: CorruptReason::KeyMismatch(token_key(&token.id)),
                });
            }
            tokens.push(token);
        }

        let table = txn
            .open_table(NODES)
            .map_err(storage("open the nodes table"))?;
        let mut nodes = Vec::new();
        for item in table.iter().map_err(storage("read the nodes"))? {
            let (k, v) = item.map_err(storage("read a node"))?;
            let key = k.value();
            let node: NodeRecord = decode(NODES_T, || node_key(key), v.value())?;
            if node.node_id != *key {
                return Err(StoreError::Corrupt {
                    table: NODES_T,
                    key: node_key(key),
                    reason: CorruptReason::KeyMismatch(node_key(&node.node_id)),
                });
            }
            nodes.push(node);
        }
        Ok(Loaded {
            meta,
            tokens,
            nodes,
        })
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(storage("begin a write"))?;
        txn.set_durability(Durability::Immediate);
        // Record contents come partly from enrolling nodes; two-phase commit
        // keeps a crash mid-fsync from ever exposing a torn commit.
        txn.set_two_phase_commit(true);
        match Self::write_batch(&txn, batch) {
            Ok(()) => txn.commit().map_err(|e| StoreError::Commit {
                source: Box::new(e),
            }),
            Err(e) => {
                // Nothing of the batch was committed; an abort failure adds
                // nothing the caller can act on beyond the refusal itself.
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    fn deltas(&self, from: u64, to: u64) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        if from > to {
            return Ok(None);
        }
        if from == to {
            return Ok(Some(Vec::new()));
        }
        let txn = self.db.begin_read().map_err(storage("begin a read"))?;
        let table = txn
            .open_table(DELTAS)
            .map_err(storage("open the deltas table"))?;
        let mut out = Vec::new();
        // from < to, so from + 1 cannot overflow.
        for (want, item) in (from + 1..=to).zip(
            table
                .range(from + 1..=to)
                .map_err(storage("read the deltas"))?,
        ) {
            let (k, v) = item.map_err(storage("read a delta"))?;
            let serial = k.value();
            if serial != want {
                return Ok(None);
            }
            out.push(decode(DELTAS_T, || serial.to_string(), v.value())?);
        }
        if out.len() as u64 != to - from {
            return Ok(None);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
