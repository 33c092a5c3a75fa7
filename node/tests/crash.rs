//! kill -9 and power cuts under write load: every acknowledged write survives, nothing is half
//! applied.

mod common;
mod lazy_disk;

use common::TestNode;
use lazy_disk::LazyDisk;
use rand::RngExt;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Small log segments and checkpoint thresholds, so crashes land amid segment switches,
/// checkpoints and segment retirement too.
const CONFIG: &str = "listen: {listen}
dataDir: {data}
namespaces:
  - name: default
storage:
  logSegmentBytes: 1MiB
  checkpointWalBytes: 64KiB
";

const OBJECTS: usize = 6;
const WRITERS_PER_OBJECT: usize = 2;

#[derive(Default)]
struct Acked {
    /// object -> sequence numbers whose SQL batch was acknowledged
    rows: BTreeMap<String, BTreeSet<i64>>,
    /// object -> key/value keys whose put was acknowledged
    keys: BTreeMap<String, BTreeSet<String>>,
}

async fn writer(
    node_url: String,
    object: String,
    writer: usize,
    first: i64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
) -> i64 {
    let client = common::client();
    let mut seq = first;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let id = (writer as i64) * 1_000_000_000 + seq;
        // Mostly small commits, sometimes a multi-page one.
        let pad: usize = if rand::rng().random_bool(0.1) {
            30_000
        } else {
            rand::rng().random_range(8..600)
        };
        let body = json!({"batch": [
            {"sql": "INSERT INTO a(seq, pad) VALUES (?, randomblob(?))", "params": [id, pad]},
            {"sql": "INSERT INTO b(seq) VALUES (?)", "params": [id]}
        ]});
        let sql = client
            .post(format!("{node_url}/v1/ns/default/names/{object}/sql"))
            .json(&body)
            .send()
            .await;
        match sql {
            Ok(r) if r.status().is_success() => {
                acked
                    .lock()
                    .expect("lock")
                    .rows
                    .entry(object.clone())
                    .or_default()
                    .insert(id);
            }
            Ok(r) => panic!("unexpected status {} for a valid write", r.status()),
            Err(_) => break, // the node is gone
        }
        if seq % 3 == 0 {
            let key = format!("k{id}");
            let put = client
                .post(format!("{node_url}/v1/ns/default/names/{object}/kv"))
                .json(&json!({"put": {key.clone(): id}}))
                .send()
                .await;
            match put {
                Ok(r) if r.status().is_success() => {
                    acked
                        .lock()
                        .expect("lock")
                        .keys
                        .entry(object.clone())
                        .or_default()
                        .insert(key);
                }
                Ok(r) => panic!("unexpected status {} for a valid put", r.status()),
                Err(_) => break,
            }
        }
    }
    seq
}

/// Where lost rows sit in their writers' sequences: the last of the writer's rows present and
/// acknowledged (a tail lost, or a hole).
fn around_lost(lost: &[&i64], acked: &BTreeSet<i64>, present: &BTreeSet<i64>) -> String {
    lost.iter()
        .map(|&&id| {
            let writer = id / 1_000_000_000;
            let range = writer * 1_000_000_000..(writer + 1) * 1_000_000_000;
            let last_present = present.range(range.clone()).next_back();
            let acked_after = acked.range(id + 1..range.end).count();
            format!(
                "{id}: writer {writer}'s last row present {last_present:?}, {acked_after} acknowledged after it"
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

async fn column(node: &TestNode, object: &str, sql: &str) -> BTreeSet<i64> {
    let (s, v) = node.sql(object, sql, json!([])).await;
    assert_eq!(s, 200, "{v}");
    v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r[0].as_i64())
        .collect()
}

async fn all_keys(node: &TestNode, object: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/ns/default/names/{object}/kv?limit=10000&cursor={c}"),
            None => format!("/v1/ns/default/names/{object}/kv?limit=10000"),
        };
        let (s, v) = node.get(&q).await;
        assert_eq!(s, 200, "{v}");
        keys.extend(
            v["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .filter_map(|e| e["key"].as_str().map(str::to_string)),
        );
        match v["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return keys,
        }
    }
}

/// Creates `t(seq, pad)` in `object` if it has none, and inserts one row per `seqs`, each
/// with `pad` random bytes, one request each.
async fn fill(node: &TestNode, object: &str, seqs: std::ops::Range<i64>, pad: usize) {
    let (s, v) = node
        .sql(
            object,
            "CREATE TABLE IF NOT EXISTS t(seq INTEGER PRIMARY KEY, pad BLOB)",
            json!([]),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for seq in seqs {
        let (s, v) = node
            .sql(
                object,
                "INSERT INTO t(seq, pad) VALUES (?, randomblob(?))",
                json!([seq, pad]),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
}

/// How a cycle ends the node: it is stopped by then, and starts again on the same data.
enum Crash {
    Kill9,
    /// kill -9, then the disk loses whatever was not made durable.
    PowerCut(LazyDisk),
}

impl Crash {
    /// The disk of a power cut.
    fn into_disk(self) -> LazyDisk {
        match self {
            Crash::PowerCut(disk) => disk,
            Crash::Kill9 => panic!("a kill -9 has no lazy disk"),
        }
    }

    fn strike(self, node: &mut TestNode) -> Crash {
        node.kill9();
        match self {
            Crash::Kill9 => Crash::Kill9,
            Crash::PowerCut(disk) => Crash::PowerCut(disk.power_cut()),
        }
    }
}

/// Writers run against the node, which crashes after a random while, `cycles` times; after each
/// restart every acknowledged row and key is there, and no batch is half applied.
async fn crash_cycles(node: &mut TestNode, mut crash: Crash, cycles: usize) -> Crash {
    node.start().await;
    let objects: Vec<String> = (0..OBJECTS).map(|i| format!("crash-{i}")).collect();
    for o in &objects {
        let (s, v) = node
            .post(
                &format!("/v1/ns/default/names/{o}/sql"),
                json!({"batch": [
                    {"sql": "CREATE TABLE a(seq INTEGER PRIMARY KEY, pad BLOB)"},
                    {"sql": "CREATE TABLE b(seq INTEGER PRIMARY KEY)"}
                ]}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut next: BTreeMap<usize, i64> = BTreeMap::new();
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (oi, o) in objects.iter().enumerate() {
            for w in 0..WRITERS_PER_OBJECT {
                let writer_id = oi * WRITERS_PER_OBJECT + w + 1;
                let first = *next.get(&writer_id).unwrap_or(&0);
                tasks.push((
                    writer_id,
                    tokio::spawn(writer(
                        node.url(""),
                        o.clone(),
                        writer_id,
                        first,
                        stop.clone(),
                        acked.clone(),
                    )),
                ));
            }
        }
        let run_for = rand::rng().random_range(400..1500);
        tokio::time::sleep(Duration::from_millis(run_for)).await;
        crash = crash.strike(node);
        stop.store(true, Ordering::Relaxed);
        for (writer_id, t) in tasks {
            next.insert(writer_id, t.await.expect("writer"));
        }
        node.start().await;
        if cycle % 2 == 1 {
            // Again as soon as it is up, before any write: what recovery wrote must be durable
            // by then (it retired the log segments it replayed).
            crash = crash.strike(node);
            node.start().await;
        }

        let (acked_rows, acked_keys) = {
            let a = acked.lock().expect("lock");
            (a.rows.clone(), a.keys.clone())
        };
        let mut total = 0;
        for o in &objects {
            let a = column(node, o, "SELECT seq FROM a").await;
            let b = column(node, o, "SELECT seq FROM b").await;
            assert_eq!(a, b, "cycle {cycle}, {o}: a batch was half applied");
            let want = acked_rows.get(o).cloned().unwrap_or_default();
            let lost: Vec<_> = want.difference(&a).collect();
            assert!(
                lost.is_empty(),
                "cycle {cycle}, {o}: acknowledged rows lost: {lost:?} ({})",
                around_lost(&lost, &want, &a)
            );
            let keys = all_keys(node, o).await;
            let want_keys = acked_keys.get(o).cloned().unwrap_or_default();
            let lost: Vec<_> = want_keys.difference(&keys).collect();
            assert!(
                lost.is_empty(),
                "cycle {cycle}, {o}: acknowledged keys lost: {lost:?}"
            );
            let (_, check) = node.sql(o, "PRAGMA integrity_check", json!([])).await;
            assert_eq!(check["rows"], json!([["ok"]]), "cycle {cycle}, {o}");
            total += want.len();
        }
        assert!(
            total > 0,
            "cycle {cycle}: the writers got nothing acknowledged"
        );
        eprintln!(
            "cycle {cycle}: crashed after {run_for} ms, {total} acknowledged batches all present"
        );
    }
    node.kill9();
    crash
}

fn cycles() -> usize {
    std::env::var("COLONY_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_write_load_loses_no_acknowledged_write_and_leaves_nothing_half_applied() {
    let mut node = TestNode::configured(CONFIG);
    crash_cycles(&mut node, Crash::Kill9, cycles()).await;
}

/// The node's data is on a disk that keeps only what was synced (see `lazy_disk`): a missing
/// `fsync` of a log segment, a database file before its checkpoint marker, or a directory after
/// a file was created, renamed or removed in it loses acknowledged writes here, where kill -9
/// (the page cache survives it) never would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_power_cut_under_write_load_loses_no_acknowledged_write() {
    let mut node = TestNode::configured(CONFIG);
    let disk = LazyDisk::mount(&node.data);
    let Crash::PowerCut(disk) = crash_cycles(&mut node, Crash::PowerCut(disk), cycles()).await
    else {
        unreachable!("the crash stays a power cut");
    };
    let counts = disk.counts();
    eprintln!("lazy disk: {counts:?}");
    assert_eq!(counts.power_cuts as usize, cycles() + cycles() / 2);
    assert!(
        counts.pages_lost > 0 && counts.file_syncs > 0 && counts.dir_syncs > 0,
        "the cuts took unsynced writes, and the node synced files and directories: {counts:?}"
    );
    // The lazy disk takes direct I/O, so the node log wrote past the page cache here.
    node.start().await;
    assert_eq!(node.metric("colony_log_direct_io").await, 1.0);
    node.kill9();
    // Unmounted before the node's directory is removed.
    drop(disk);
}

/// The same power cuts on a disk that refuses direct I/O (`O_DIRECT` opens fail with `EINVAL`,
/// as on some tmpfs and FUSE mounts): the node log finds that out when it starts, writes its
/// segments through the page cache instead, and what it acknowledged survives. Every filesystem
/// of the test machines takes direct I/O, so without this disk the page-cache path of the log
/// never met a power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_power_cut_on_a_disk_without_direct_io_loses_no_acknowledged_write() {
    let mut node = TestNode::configured(CONFIG);
    let disk = LazyDisk::mount_without_direct_io(&node.data);
    let cycles = cycles().div_ceil(2);
    let Crash::PowerCut(disk) = crash_cycles(&mut node, Crash::PowerCut(disk), cycles).await else {
        unreachable!("the crash stays a power cut");
    };
    node.start().await;
    assert_eq!(
        node.metric("colony_log_direct_io").await,
        0.0,
        "the log writes through the page cache"
    );
    node.kill9();
    let counts = disk.counts();
    eprintln!("lazy disk without direct I/O: {counts:?}");
    assert_eq!(counts.power_cuts as usize, cycles + cycles / 2);
    assert!(
        counts.pages_lost > 0 && counts.file_syncs > 0,
        "the cuts took unsynced writes, and the node synced files: {counts:?}"
    );
    // Unmounted before the node's directory is removed.
    drop(disk);
}

/// A power cut while a file on the disk is still open: the unmount meets `EBUSY` until it is
/// closed, and the cut waits for that rather than hanging (fuser's own unmount gives up on
/// `EBUSY`, and its join then waits forever).
#[test]
fn a_power_cut_waits_out_a_busy_mount_instead_of_hanging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m");
    let disk = LazyDisk::mount(&m);
    let open = std::fs::File::create(m.join("held")).expect("create");
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(open);
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        let disk = disk.power_cut();
        let _ = tx.send(started.elapsed());
        drop(disk);
    });
    let took = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the power cut finished once the file was closed");
    assert!(
        took >= Duration::from_millis(250),
        "the unmount waited for the open file ({took:?})"
    );
    closer.join().expect("closer");
}

/// The disk itself, through the kernel: only synced data and synced names survive a cut.
#[test]
fn the_lazy_disk_keeps_what_was_synced_and_nothing_else() {
    use std::fs::{self, File, OpenOptions};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m");
    let disk = LazyDisk::mount(&m);
    let sync_dir = || File::open(&m).and_then(|d| d.sync_all()).expect("sync dir");
    // Synced, names too.
    let a = File::create(m.join("a")).expect("create a");
    a.write_all_at(&[1; 10_000], 0).expect("write");
    a.sync_data().expect("sync a");
    fs::write(m.join("t.tmp"), b"t").expect("write t");
    File::open(m.join("t.tmp"))
        .and_then(|f| f.sync_all())
        .expect("sync t");
    let f = File::create(m.join("f")).expect("create f");
    f.write_all_at(&[7; 8192], 0).expect("write");
    f.sync_all().expect("sync f");
    sync_dir();
    // Not synced: a write, a new name (its file synced), a rename, a cut and regrowth.
    a.write_all_at(&[2; 100], 5000).expect("write");
    let b = File::create(m.join("b")).expect("create b");
    b.write_all_at(b"never named durably", 0).expect("write");
    b.sync_all().expect("sync b");
    fs::rename(m.join("t.tmp"), m.join("t")).expect("rename");
    f.set_len(100).expect("cut");
    f.set_len(8192).expect("grow");
    drop((a, b, f));

    let disk = disk.power_cut();
    let mut names: Vec<String> = fs::read_dir(&m)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["a", "f", "t.tmp"],
        "b's and t's names were never synced"
    );
    assert_eq!(
        fs::read(m.join("a")).expect("a"),
        vec![1; 10_000],
        "a as synced"
    );
    assert_eq!(
        fs::read(m.join("f")).expect("f"),
        vec![7; 8192],
        "f as synced"
    );

    let f = OpenOptions::new()
        .write(true)
        .open(m.join("f"))
        .expect("open f");
    f.set_len(100).expect("cut");
    f.set_len(8192).expect("grow");
    f.sync_all().expect("sync f");
    fs::rename(m.join("t.tmp"), m.join("t")).expect("rename");
    sync_dir();
    drop(f);
    let disk = disk.power_cut();
    let mut want = vec![7; 100];
    want.resize(8192, 0);
    assert_eq!(
        fs::read(m.join("f")).expect("f"),
        want,
        "cut, grown and synced"
    );
    assert!(m.join("t").exists() && !m.join("t.tmp").exists());

    // A second name in another directory, made durable there; the first name's removal is not.
    fs::create_dir(m.join("d")).expect("mkdir d");
    sync_dir();
    fs::hard_link(m.join("a"), m.join("d/a2")).expect("link");
    File::open(m.join("d"))
        .and_then(|d| d.sync_all())
        .expect("sync d");
    fs::remove_file(m.join("a")).expect("unlink a");
    assert_eq!(fs::read(m.join("d/a2")).expect("a2"), vec![1; 10_000]);
    let disk = disk.power_cut();
    assert_eq!(
        fs::read(m.join("d/a2")).expect("a2"),
        vec![1; 10_000],
        "the synced second name"
    );
    assert_eq!(
        fs::read(m.join("a")).expect("a"),
        vec![1; 10_000],
        "the removal was never synced"
    );
    let counts = disk.counts();
    assert_eq!(counts.power_cuts, 3);
    assert!(counts.pages_lost >= 3, "{counts:?}");
}

/// Deleting an object that never had data logs a delete whose object has no directory on disk:
/// a unique ID's shard (`01`) stays empty here, as only named objects (`02`) get data. The
/// node's pending directories must not wait for that directory: every checkpoint marker was held
/// back by it, and the log grew without end. Restarting with such a delete in the log works too
/// (recovery's own test, `a_delete_of_an_object_without_a_directory_is_replayed`, covers the case
/// where the delete has no marker yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_object_that_never_had_data_blocks_neither_markers_nor_recovery() {
    let mut node = TestNode::serve(CONFIG).await;
    let delete_new_unique = |node: &TestNode| {
        let node_url = node.url("");
        let client = node.client.clone();
        async move {
            let r = client
                .post(format!("{node_url}/v1/ns/default/ids"))
                .json(&json!({}))
                .send()
                .await
                .expect("new id");
            let (status, body) = common::status_json(r).await;
            assert_eq!(status, 200, "{body}");
            let id = body["id"].as_str().expect("id").to_string();
            let r = client
                .delete(format!("{node_url}/v1/ns/default/objects/{id}"))
                .send()
                .await
                .expect("delete");
            let (status, body) = common::status_json(r).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["deleted"], json!(false), "{body}");
        }
    };
    // Then a restart.
    delete_new_unique(&node).await;
    node.restart().await;
    // Another, while checkpoint markers are due: enough writes to fill several 1 MiB segments,
    // which the markers let retire.
    delete_new_unique(&node).await;
    fill(&node, "busy", 0..150, 30000).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let segments = node.metric("colony_log_segments").await;
        if segments <= 2.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{segments} log segments live: checkpoint markers are held back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, v) = node.sql("busy", "SELECT count(*) FROM t", json!([])).await;
    assert_eq!((s, &v["rows"]), (200, &json!([[150]])), "{v}");
}

/// Nodes before the current layout put every object's file in the shard of its ID's first byte
/// (its kind), so all named objects of a namespace shared one directory. A node started on such
/// a data directory moves each file into its own shard before recovery, durably, and loses
/// nothing: neither rows already in the files nor rows only in the log. On the lazy disk, with a
/// power cut as soon as the node has started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_on_the_first_byte_layout_moves_the_files_and_loses_nothing() {
    const NAMES: usize = 8;
    let mut node = TestNode::configured(CONFIG);
    let mut disk = LazyDisk::mount(&node.data);
    node.start().await;
    let names: Vec<String> = (0..NAMES).map(|i| format!("layout-{i}")).collect();
    for name in &names {
        fill(&node, name, 0..20, 2000).await;
    }
    // Recovery writes the first rows into the files, and later starts do not replay them; the
    // second rows, of half the objects, are only in the log.
    disk = Crash::PowerCut(disk).strike(&mut node).into_disk();
    node.start().await;
    for name in &names[..NAMES / 2] {
        fill(&node, name, 100..120, 2000).await;
    }
    disk = Crash::PowerCut(disk).strike(&mut node).into_disk();

    // Rearrange the files durably as the old layout had them: a database with its companions.
    let objects = node.data.join("objects");
    let mut moved = 0;
    for file in common::files_under(&objects) {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let from = file.parent().expect("shard").to_path_buf();
        let old_shard = from.parent().expect("namespace").join(&name[..2]);
        if from != old_shard {
            std::fs::create_dir_all(&old_shard).expect("mkdir");
            std::fs::rename(&file, old_shard.join(&name)).expect("move");
            for dir in [&old_shard, &from, &objects.join("default")] {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .expect("sync dir");
            }
            moved += usize::from(name.ends_with(".db"));
        }
    }
    assert!(
        moved >= NAMES - 2,
        "only {moved} databases were outside the first byte's shard"
    );

    node.start().await;
    disk = Crash::PowerCut(disk).strike(&mut node).into_disk();
    node.start().await;
    for (i, name) in names.iter().enumerate() {
        let expected: BTreeSet<i64> = if i < NAMES / 2 {
            (0..20).chain(100..120).collect()
        } else {
            (0..20).collect()
        };
        assert_eq!(
            column(&node, name, "SELECT seq FROM t ORDER BY seq").await,
            expected,
            "{name}"
        );
    }
    let databases: Vec<_> = common::files_under(&objects)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "db"))
        .collect();
    assert_eq!(databases.len(), NAMES, "{databases:?}");
    for db in databases {
        let stem = db
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("stem")
            .to_string();
        let shard = db
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
            .expect("shard");
        assert_eq!(
            shard,
            &stem[62..64],
            "{} is not in its ID's shard",
            db.display()
        );
    }
    node.kill9();
    drop(disk);
}
