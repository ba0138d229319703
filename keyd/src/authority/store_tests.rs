//! Tests of the redb store on real files in a temporary directory.

use super::*;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

fn meta(serial: u64, next_v4: u64, next_v6: u64) -> Meta {
    Meta {
        network_id: "net-1".into(),
        serial,
        roster: vec![0xAA, serial as u8, 0xBB],
        next_v4,
        next_v6,
    }
}

fn token(id: &str) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        secret_hash: [7; 32],
        created_at: 1_700_000_000,
        expires_at: 1_700_003_600,
        max_uses: 3,
        uses: 1,
        groups: vec!["web".into(), "db".into()],
        attributes: vec![("env".into(), "prod".into())],
        name_pattern: Some("web-*".into()),
        revoked_at: None,
    }
}

fn node(n: u8) -> NodeRecord {
    NodeRecord {
        node_id: [n; 16],
        name: format!("node-{n}"),
        wg_public: [n.wrapping_add(1); 32],
        noise_public: [n.wrapping_add(2); 32],
        addresses: vec![format!("10.77.0.{n}/32"), format!("fd77::{n:x}/128")],
        groups: vec!["web".into()],
        attributes: vec![("zone".into(), "a".into()), ("rack".into(), "7".into())],
        wg_endpoint: Some("192.0.2.1:51820".parse().unwrap()),
        keyd_endpoint: Some("[2001:db8::1]:51821".parse().unwrap()),
        observed_addr: None,
        enrolled_at: 1_700_000_100,
        token_id: "ab12".into(),
        cert: vec![1, 2, 3, n],
        revoked_at: Some(1_700_000_200),
    }
}

fn batch(expect: Option<u64>, meta: Meta) -> Batch {
    Batch {
        expect_serial: expect,
        meta,
        put_tokens: vec![],
        put_nodes: vec![],
        deltas: vec![],
        keep_deltas: 100,
    }
}

fn store_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("authority.redb")
}

#[test]
fn a_fresh_store_is_empty_and_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(
        store.load().unwrap(),
        Loaded {
            meta: None,
            tokens: vec![],
            nodes: vec![]
        }
    );
    assert_eq!(store.deltas(0, 1).unwrap(), None);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);
}

#[test]
fn an_existing_wider_file_is_narrowed_to_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
    drop(RedbStore::open(&path).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);
}

#[test]
fn a_symlink_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    let link = store_path(&dir);
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(matches!(
        RedbStore::open(&link),
        Err(StoreError::Open { .. })
    ));
    assert!(!target.exists());
}

#[test]
fn every_record_type_round_trips_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let mut first = node(5);
    first.observed_addr = Some("198.51.100.9:40000".parse().unwrap());
    first.wg_endpoint = None;
    let mut plain = token("cd34");
    plain.name_pattern = None;
    plain.revoked_at = Some(1_700_000_500);
    plain.groups.clear();
    let b = Batch {
        expect_serial: None,
        meta: meta(2, 6, 6),
        put_tokens: vec![token("ab12"), plain.clone()],
        put_nodes: vec![first.clone(), node(6)],
        deltas: vec![(1, b"delta-1".to_vec()), (2, b"delta-2".to_vec())],
        keep_deltas: 100,
    };
    {
        let mut store = RedbStore::open(&path).unwrap();
        store.commit(&b).unwrap();
    }
    let mut store = RedbStore::open(&path).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.meta, Some(b.meta.clone()));
    assert_eq!(loaded.tokens, vec![token("ab12"), plain]);
    assert_eq!(loaded.nodes, vec![first, node(6)]);
    assert_eq!(
        store.deltas(0, 2).unwrap(),
        Some(vec![b"delta-1".to_vec(), b"delta-2".to_vec()])
    );

    // Put replaces by key; records not named stay.
    let mut used = token("ab12");
    used.uses = 3;
    let mut moved = node(6);
    moved.wg_endpoint = Some("203.0.113.4:51820".parse().unwrap());
    let mut b2 = batch(Some(2), meta(3, 6, 6));
    b2.put_tokens = vec![used.clone()];
    b2.put_nodes = vec![moved.clone()];
    store.commit(&b2).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.tokens[0], used);
    assert_eq!(loaded.tokens.len(), 2);
    assert_eq!(loaded.nodes[1], moved);
    assert_eq!(loaded.nodes.len(), 2);
    assert_eq!(loaded.meta.unwrap().serial, 3);
}

#[test]
fn a_wrong_expected_serial_is_a_conflict_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(&store_path(&dir)).unwrap();

    let mut stray = batch(Some(0), meta(1, 1, 1));
    stray.put_tokens = vec![token("ab12")];
    assert!(matches!(
        store.commit(&stray),
        Err(StoreError::Conflict {
            expected: Some(0),
            found: None
        })
    ));
    assert_eq!(store.load().unwrap().meta, None);
    assert!(store.load().unwrap().tokens.is_empty());

    store.commit(&batch(None, meta(1, 1, 1))).unwrap();
    let before = store.load().unwrap();
    for expect in [None, Some(0), Some(2)] {
        let mut b = batch(expect, meta(2, 2, 2));
        b.put_tokens = vec![token("ab12")];
        b.put_nodes = vec![node(1)];
        b.deltas = vec![(2, b"d2".to_vec())];
        match store.commit(&b) {
            Err(StoreError::Conflict { expected, found }) => {
                assert_eq!((expected, found), (expect, Some(1)));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(store.load().unwrap(), before);
    assert_eq!(store.deltas(1, 2).unwrap(), None);

    store.commit(&batch(Some(1), meta(2, 2, 2))).unwrap();
    assert_eq!(store.load().unwrap().meta.unwrap().serial, 2);
}

#[test]
fn counters_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(&store_path(&dir)).unwrap();
    store.commit(&batch(None, meta(5, 10, 20))).unwrap();
    let cases = [
        (meta(4, 10, 20), Counter::Serial, 5, 4),
        (meta(5, 9, 20), Counter::NextV4, 10, 9),
        (meta(6, 11, 19), Counter::NextV6, 20, 19),
    ];
    for (m, want, want_stored, want_new) in cases {
        let mut b = batch(Some(5), m);
        b.put_nodes = vec![node(9)];
        match store.commit(&b) {
            Err(StoreError::Regression {
                counter,
                stored,
                new,
            }) => assert_eq!((counter, stored, new), (want, want_stored, want_new)),
            other => panic!("expected a regression refusal, got {other:?}"),
        }
    }
    let loaded = store.load().unwrap();
    assert_eq!(loaded.meta, Some(meta(5, 10, 20)));
    assert!(loaded.nodes.is_empty());
    // Equal is fine: a token-only change keeps the serial and the pools.
    store.commit(&batch(Some(5), meta(5, 10, 20))).unwrap();
}

#[test]
fn deltas_outside_the_new_serials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(&store_path(&dir)).unwrap();
    store.commit(&batch(None, meta(3, 0, 0))).unwrap();
    for (deltas, serial) in [
        (vec![(3, vec![])], 3),              // already reached
        (vec![(6, vec![])], 6),              // beyond the new meta
        (vec![(5, vec![]), (4, vec![])], 4), // out of order
        (vec![(4, vec![]), (4, vec![])], 4), // twice
    ] {
        let mut b = batch(Some(3), meta(5, 0, 0));
        b.deltas = deltas;
        match store.commit(&b) {
            Err(StoreError::DeltaOutOfRange { serial: s, .. }) => assert_eq!(s, serial),
            other => panic!("expected a delta refusal, got {other:?}"),
        }
    }
    assert_eq!(store.load().unwrap().meta.unwrap().serial, 3);
}

#[test]
fn old_deltas_are_pruned_and_a_pruned_range_asks_for_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(&store_path(&dir)).unwrap();
    let delta = |s: u64| format!("signed delta {s}").into_bytes();
    let mut expect = None;
    for s in 1..=10u64 {
        let mut b = batch(expect, meta(s, s, s));
        b.deltas = vec![(s, delta(s))];
        b.keep_deltas = 3;
        store.commit(&b).unwrap();
        expect = Some(s);
    }
    assert_eq!(
        store.deltas(7, 10).unwrap(),
        Some(vec![delta(8), delta(9), delta(10)])
    );
    assert_eq!(store.deltas(8, 9).unwrap(), Some(vec![delta(9)]));
    assert_eq!(store.deltas(10, 10).unwrap(), Some(vec![]));
    assert_eq!(store.deltas(6, 10).unwrap(), None, "delta 7 was pruned");
    assert_eq!(store.deltas(0, 10).unwrap(), None);
    assert_eq!(
        store.deltas(9, 11).unwrap(),
        None,
        "delta 11 does not exist"
    );
    assert_eq!(store.deltas(10, 9).unwrap(), None);

    // Several deltas in one batch, then keep none at all.
    let mut b = batch(Some(10), meta(12, 12, 12));
    b.deltas = vec![(11, delta(11)), (12, delta(12))];
    b.keep_deltas = 3;
    store.commit(&b).unwrap();
    assert_eq!(
        store.deltas(9, 12).unwrap(),
        Some(vec![delta(10), delta(11), delta(12)])
    );
    let mut b = batch(Some(12), meta(12, 12, 12));
    b.keep_deltas = 0;
    store.commit(&b).unwrap();
    assert_eq!(store.deltas(11, 12).unwrap(), None);
}

#[test]
fn a_second_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let first = RedbStore::open(&path).unwrap();
    match RedbStore::open(&path) {
        Err(e @ StoreError::Locked { .. }) => {
            assert!(e.to_string().contains("already open"), "{e}");
        }
        Err(e) => panic!("expected Locked, got {e:?}"),
        Ok(_) => panic!("expected Locked, the second open succeeded"),
    }
    drop(first);
    RedbStore::open(&path).unwrap();
}

/// Writes `value` under `key` in `table` with raw redb, beside the store.
fn poke<K: redb::Key + 'static>(
    path: &Path,
    table: TableDefinition<K, &[u8]>,
    key: K::SelfType<'_>,
    value: &[u8],
) {
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(table).unwrap().insert(key, value).unwrap();
    txn.commit().unwrap();
}

#[test]
fn a_corrupt_value_is_refused_naming_its_table_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    {
        let mut store = RedbStore::open(&path).unwrap();
        let mut b = batch(None, meta(1, 1, 1));
        b.put_tokens = vec![token("ab12")];
        b.put_nodes = vec![node(1)];
        store.commit(&b).unwrap();
    }
    let corrupt = |path: &Path| match RedbStore::open(path).unwrap().load() {
        Err(StoreError::Corrupt { table, key, reason }) => (table, key, reason),
        other => panic!("expected Corrupt, got {other:?}"),
    };

    poke(&path, TOKENS, "ab12", &[SCHEMA_VERSION, 0xFF, 0xFF, 0xFF]);
    let (table, key, reason) = corrupt(&path);
    assert_eq!((table, key.as_str()), ("tokens", "ab12"));
    assert!(matches!(reason, CorruptReason::Decode(_)), "{reason:?}");

    let message = RedbStore::open(&path)
        .unwrap()
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("table tokens, key ab12: cannot decode"),
        "{message}"
    );

    poke(&path, TOKENS, "ab12", &[99, 1, 2, 3]);
    let (table, key, reason) = corrupt(&path);
    assert_eq!((table, key.as_str()), ("tokens", "ab12"));
    assert!(
        matches!(reason, CorruptReason::UnknownVersion(99)),
        "{reason:?}"
    );

    // A valid record filed under another key is refused too.
    let other = encode(TOKENS_T, &token("ffff")).unwrap();
    poke(&path, TOKENS, "ab12", &other);
    let (_, key, reason) = corrupt(&path);
    assert_eq!(key, "ab12");
    assert!(
        matches!(reason, CorruptReason::KeyMismatch(ref k) if k == "ffff"),
        "{reason:?}"
    );

    poke(
        &path,
        TOKENS,
        "ab12",
        &encode(TOKENS_T, &token("ab12")).unwrap(),
    );
    RedbStore::open(&path).unwrap().load().unwrap();

    poke(&path, NODES, &[1u8; 16], b"garbage");
    let (table, key, _) = corrupt(&path);
    assert_eq!(
        (table, key.as_str()),
        ("nodes", "01010101010101010101010101010101")
    );
    poke(
        &path,
        NODES,
        &[1u8; 16],
        &encode(NODES_T, &node(1)).unwrap(),
    );

    poke(&path, META, META_KEY, &[]);
    let (table, key, reason) = corrupt(&path);
    assert_eq!((table, key.as_str()), ("meta", "meta"));
    assert!(matches!(reason, CorruptReason::Empty), "{reason:?}");
    poke(
        &path,
        META,
        META_KEY,
        &encode(META_T, &meta(1, 1, 1)).unwrap(),
    );

    poke(&path, DELTAS, 1u64, &[SCHEMA_VERSION]);
    match RedbStore::open(&path).unwrap().deltas(0, 1) {
        Err(StoreError::Corrupt { table, key, .. }) => {
            assert_eq!((table, key.as_str()), ("deltas", "1"))
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

// ---- kill -9 ----------------------------------------------------------------

/// Set in the child that [`kill9_writer`] runs as: the store's path.
const WRITER_ENV: &str = "PQMESH_STORE_KILL9_WRITER";
/// The line the writer prints once it has committed in this run.
const COMMITTED: &str = "kill9-writer: committed";
/// Keep fewer deltas than the run writes, so pruning is crashed into too.
const KILL9_KEEP: u64 = 32;

fn kill9_address(offset: u64) -> String {
    let base = u32::from(Ipv4Addr::new(10, 77, 0, 0));
    format!("{}/32", Ipv4Addr::from(base + offset as u32))
}

fn kill9_offset(address: &str) -> u64 {
    let ip: Ipv4Addr = address.strip_suffix("/32").unwrap().parse().unwrap();
    u64::from(u32::from(ip) - u32::from(Ipv4Addr::new(10, 77, 0, 0)))
}

/// The child of [`a_kill_9_at_any_point_leaves_the_store_consistent`]: commits
/// one batch after another (a new node at the next v4 offset, one delta)
/// until it is killed. Does nothing in a normal test run.
#[test]
#[ignore = "run by the kill -9 test as its child"]
fn kill9_writer() {
    let Some(path) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let parent = std::os::unix::process::parent_id();
    let mut store = RedbStore::open(Path::new(&path)).unwrap();
    let loaded = store.load().unwrap();
    let mut current = loaded.meta;
    let mut announced = false;
    // Stop if the parent test died, rather than write forever.
    while std::os::unix::process::parent_id() == parent {
        let (serial, offset) = current.as_ref().map_or((0, 0), |m| (m.serial, m.next_v4));
        let next = serial + 1;
        let mut n = node(0);
        n.node_id[..8].copy_from_slice(&next.to_be_bytes());
        n.name = format!("n{next}");
        n.addresses = vec![kill9_address(offset)];
        // A larger value spreads each commit over several pages.
        n.cert = vec![next as u8; 3000];
        let b = Batch {
            expect_serial: current.as_ref().map(|m| m.serial),
            meta: Meta {
                network_id: "net-1".into(),
                serial: next,
                roster: next.to_be_bytes().to_vec(),
                next_v4: offset + 1,
                next_v6: 0,
            },
            put_tokens: vec![],
            put_nodes: vec![n],
            deltas: vec![(next, next.to_be_bytes().to_vec())],
            keep_deltas: KILL9_KEEP,
        };
        store.commit(&b).unwrap();
        current = Some(b.meta);
        if !announced {
            println!("{COMMITTED}");
            announced = true;
        }
    }
}

/// Checks the invariants a kill must never break; returns the serial.
fn kill9_check(path: &Path) -> u64 {
    let store = RedbStore::open(path).unwrap();
    let loaded = store.load().unwrap();
    let meta = loaded.meta.expect("the writer committed at least once");
    let highest = {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(DELTAS).unwrap();
        let (k, _) = table.last().unwrap().expect("a delta is kept");
        k.value()
    };
    assert_eq!(meta.serial, highest, "meta and deltas disagree");
    assert_eq!(
        store
            .deltas(meta.serial.saturating_sub(KILL9_KEEP), meta.serial)
            .unwrap()
            .map(|d| d.len() as u64),
        Some(meta.serial.min(KILL9_KEEP))
    );
    assert_eq!(loaded.nodes.len() as u64, meta.serial);
    let mut seen = HashSet::new();
    for n in &loaded.nodes {
        let offset = kill9_offset(&n.addresses[0]);
        assert!(
            seen.insert(offset),
            "address {} handed out twice",
            n.addresses[0]
        );
        assert!(
            offset < meta.next_v4,
            "offset {offset} not below next_v4 {}",
            meta.next_v4
        );
    }
    meta.serial
}

#[test]
fn a_kill_9_at_any_point_leaves_the_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = store_path(&dir);
    let exe = std::env::current_exe().unwrap();
    // This module's path without the crate name, as libtest names tests.
    let module = module_path!().split_once("::").unwrap().1;
    let writer = format!("{module}::kill9_writer");
    let rounds = 5;
    let mut last = 0;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", &writer, "--nocapture", "--include-ignored"])
            .env(WRITER_ENV, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let committed = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == COMMITTED);
        if !committed {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("round {round}: the writer never committed:\n{err}");
        }
        // The random delay only varies where in a commit the kill lands.
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(
            u64::from(u16::from_le_bytes(r)) % 50_000,
        ));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "round {round}: the writer exited before the kill: {status}"
        );
        let serial = kill9_check(&path);
        eprintln!("kill -9 round {round}: consistent at serial {serial}");
        assert!(serial > last, "round {round} made no progress");
        last = serial;
    }
    assert!(last >= rounds);
}

#[test]
fn errors_cross_threads_for_anyhow() {
    fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
    assert_error::<StoreError>();
}
