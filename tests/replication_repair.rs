//! Replication repairs itself: a frame corrupted in flight is detected and resent, a follower
//! whose disk fills keeps out of the quorum and catches up when space returns, a node too far
//! behind rejoins by snapshot sync, a follower killed before writing its held pages recovers them
//! from its log, and an explicit hand-off moves ownership losing no write.
//! Each ends by handing the slot to the repaired node and reading everything back through it.

mod support;

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::cluster::{Options, TestCluster};

fn random_text(len: usize) -> String {
    use rand::RngExt;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(b'!' + rng.random_range(0..90u8)))
        .filter(|c| *c != '"' && *c != '\\')
        .collect()
}

fn three_nodes() -> Options {
    Options {
        nodes: 3,
        replicas: 3,
        write_quorum: 2,
        slots: 8,
        ..Options::default()
    }
}

async fn put(c: &TestCluster, node: usize, obj: &str, key: &str, value: Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .client
            .put(c.url(node, &format!("/v1/ns/default/names/{obj}/kv/{key}")))
            .json(&value)
            .send()
            .await;
        if let Ok(r) = r
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "put {obj}/{key} kept failing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get(c: &TestCluster, node: usize, obj: &str, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = c
            .client
            .get(c.url(node, &format!("/v1/ns/default/names/{obj}/kv/{key}")))
            .send()
            .await
            && r.status().is_success()
            && let Ok(v) = r.json::<Value>().await
        {
            return v["value"].clone();
        }
        assert!(Instant::now() < deadline, "get {obj}/{key} kept failing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn slot_of(c: &TestCluster, obj: &str) -> (String, u32) {
    let id = c.id_of(obj).await;
    let v: Value = c
        .client
        .get(c.url(0, &format!("/v1/admin/locate/default/{id}")))
        .send()
        .await
        .expect("locate")
        .json()
        .await
        .expect("json");
    (
        v["colo"].as_str().expect("colo").to_string(),
        v["slot"].as_u64().expect("slot") as u32,
    )
}

async fn slot_report(c: &TestCluster, node: usize, colo: &str, slot: u32) -> Value {
    c.client
        .get(c.url(node, &format!("/v1/admin/slots/{colo}/{slot}")))
        .send()
        .await
        .expect("slot report")
        .json()
        .await
        .expect("json")
}

/// Waits until `node` holds the slot's entries up to where its owner is.
async fn wait_caught_up(c: &TestCluster, node: usize, obj: &str) {
    let (colo, slot) = slot_of(c, obj).await;
    // Generous: the tests of this file run side by side, five clusters on two cores, and a node
    // whose disk was full waits up to 5 s between attempts at a new log segment.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owner = c.owner_of(obj).await;
        let o = slot_report(c, owner, &colo, slot).await;
        let f = slot_report(c, node, &colo, slot).await;
        if o["appended"] == f["durable"] && f["durable"] == f["applied"] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not catch up: owner {o} follower {f}",
            c.nodes[node].name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A hand-off request to the control plane; it answers once the owner has handed over (or given
/// up after its wait, hence the long timeout).
fn hand_off_request(c: &TestCluster, colo: &str, slot: u32, to: usize) -> reqwest::RequestBuilder {
    c.client
        .post(format!("{}/v1/control/handoff", c.control_url))
        .json(&json!({"colo": colo, "slot": slot, "to": c.nodes[to].name}))
        .timeout(Duration::from_secs(30))
}

/// Moves the object's slot to `to` (a follower) through the control plane.
async fn hand_off(c: &TestCluster, obj: &str, to: usize) {
    let (colo, slot) = slot_of(c, obj).await;
    // Each attempt may wait 8 s for the target: 30 s left room for only three, which a target
    // just back from a full disk (on two cores shared by five clusters) has needed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = hand_off_request(c, &colo, slot, to)
            .send()
            .await
            .expect("handoff");
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        if status.is_success() && c.owner_of(obj).await == to {
            return;
        }
        // Each attempt that did not end it (failed, or published but not yet seen by the node
        // asked), for the test's output should a later one fail too.
        eprintln!(
            "hand-off to {} not done yet: {status} {body}",
            c.nodes[to].name
        );
        assert!(
            Instant::now() < deadline,
            "hand-off to {} kept failing: {status} {body}; the owner's report: {}",
            c.nodes[to].name,
            slot_report(c, c.owner_of(obj).await, &colo, slot).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Seeds `obj`, cuts one of its followers off from the owner, and writes `writes` keys
/// (`k000`, `k001`, ... holding 0, 1, ...) through the owner: more than the 512 entries the
/// owner keeps for resending, so that follower can no longer catch up by streaming. Connections
/// reset, so nothing queued on them arrives later. Returns the owner, the follower and the slot.
async fn a_follower_past_the_resend_window(
    c: &TestCluster,
    obj: &str,
    writes: usize,
) -> (usize, usize, String, u32) {
    assert!(
        writes > 512,
        "{writes} writes stay within the resend window"
    );
    put(c, 0, obj, "seed", json!("x")).await;
    let owner = c.owner_of(obj).await;
    let target = a_follower(c, obj).await;
    let (colo, slot) = slot_of(c, obj).await;
    c.proxy.block(&c.nodes[owner].name, &c.nodes[target].name);
    for i in 0..writes {
        put(c, owner, obj, &format!("k{i:03}"), json!(i)).await;
    }
    (owner, target, colo, slot)
}

/// A node that follows `obj` (not its owner).
async fn a_follower(c: &TestCluster, obj: &str) -> usize {
    c.followers_of(obj).await[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frame_corrupted_in_flight_is_detected_and_the_follower_repaired() {
    let c = TestCluster::start(three_nodes()).await;
    let obj = "corrupt-me";
    put(&c, 0, obj, "k0", json!(0)).await;
    let owner = c.owner_of(obj).await;
    let follower = a_follower(&c, obj).await;
    // Flip a byte well inside the next frames the owner streams to that follower.
    c.proxy
        .corrupt_after(&c.nodes[owner].name, &c.nodes[follower].name, 40);
    for i in 1..20 {
        put(&c, owner, obj, &format!("k{i}"), json!(i)).await;
    }
    assert_eq!(c.proxy.corrupted(), 1, "the proxy flipped a byte");
    assert!(
        c.metric(follower, "colony_replication_corrupt_frames_total")
            .await
            >= 1.0,
        "the follower noticed the corrupted frame"
    );
    wait_caught_up(&c, follower, obj).await;
    hand_off(&c, obj, follower).await;
    for i in 0..20 {
        assert_eq!(
            get(&c, follower, obj, &format!("k{i}")).await,
            json!(i),
            "k{i} on the repaired follower"
        );
    }
}

/// The owner dies right after a write that reached only one follower: that follower, the most
/// advanced, becomes owner and must first bring the other follower up to its position — an entry
/// of the old epoch, resent as the new epoch's owner — before it serves. (A follower once refused
/// old-epoch entries outright, and the new owner stayed recovering for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_owner_ahead_of_the_others_brings_them_up_before_it_serves() {
    let mut c = TestCluster::start(three_nodes()).await;
    let obj = "ahead";
    put(&c, 0, obj, "seed", json!("x")).await;
    let owner = c.owner_of(obj).await;
    let followers = c.followers_of(obj).await;
    let (ahead, behind) = (followers[0], followers[1]);
    wait_caught_up(&c, behind, obj).await;
    let (colo, slot) = slot_of(&c, obj).await;
    let (owner_name, behind_name) = (c.nodes[owner].name.clone(), c.nodes[behind].name.clone());
    c.proxy.block(&owner_name, &behind_name);
    // Acknowledged by the owner and `ahead` (quorum 2 of 3); `behind` never sees it.
    put(&c, owner, obj, "last", json!("acked")).await;
    let before = slot_report(&c, behind, &colo, slot).await;
    let leader = slot_report(&c, ahead, &colo, slot).await;
    assert_ne!(
        before["durable"], leader["durable"],
        "the write must not have reached {behind_name}"
    );
    c.kill9(owner);
    c.proxy.heal(&owner_name, &behind_name);
    // The failover picks `ahead`; it serves once `behind` holds its position too.
    put(&c, behind, obj, "after", json!("failover")).await;
    assert_eq!(
        c.owner_of(obj).await,
        ahead,
        "the most advanced follower owns the slot"
    );
    assert_eq!(get(&c, behind, obj, "last").await, json!("acked"));
    wait_caught_up(&c, behind, obj).await;
    let report = slot_report(&c, behind, &colo, slot).await;
    assert!(
        report["durable"]["epoch"].as_u64() > before["durable"]["epoch"].as_u64(),
        "{behind_name} holds entries of the new epoch: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_far_behind_rejoins_by_snapshot_sync() {
    let mut c = TestCluster::start(three_nodes()).await;
    let obj = "far-behind";
    put(&c, 0, obj, "seed", json!("x")).await;
    let behind = a_follower(&c, obj).await;
    let writer = (0..3).find(|i| *i != behind).expect("another node");
    c.kill9(behind);
    // More entries than an owner keeps in memory for resending (512): only a sync can help.
    let value = "v".repeat(1000);
    for i in 0..700 {
        put(
            &c,
            writer,
            obj,
            &format!("k{i:03}"),
            json!(format!("{i}{value}")),
        )
        .await;
    }
    c.start_node(behind);
    c.wait_ready(Duration::from_secs(30)).await;
    wait_caught_up(&c, behind, obj).await;
    assert!(
        c.metric(behind, "colony_replication_syncs_completed_total")
            .await
            >= 1.0,
        "the returning node caught up by snapshot sync"
    );
    hand_off(&c, obj, behind).await;
    assert_eq!(get(&c, behind, obj, "seed").await, json!("x"));
    for i in (0..700).step_by(37) {
        assert_eq!(
            get(&c, behind, obj, &format!("k{i:03}")).await,
            json!(format!("{i}{value}"))
        );
    }
}

/// `(epoch, seq)` of a slot position in a slot report.
fn position(v: &Value) -> (u64, u64) {
    (
        v["epoch"].as_u64().expect("epoch"),
        v["seq"].as_u64().expect("seq"),
    )
}

/// A follower holds the pages of recent entries in memory for seconds before it writes them into
/// its database files; killed meanwhile, it takes them from its log again when it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_killed_before_writing_its_held_pages_recovers_them_from_its_log() {
    let mut c = TestCluster::start(three_nodes()).await;
    let obj = "held-pages";
    put(&c, 0, obj, "seed", json!("x")).await;
    let follower = a_follower(&c, obj).await;
    let writer = (0..3).find(|i| *i != follower).expect("another node");
    let (colo, slot) = slot_of(&c, obj).await;
    // Write for longer than the follower holds pages (so it has written some out and logged
    // their checkpoint markers), then on until it holds entries durably in its log that its
    // files do not have yet (its applied position behind its durable one), and kill it at once.
    let started = Instant::now();
    let mut written = 0;
    let held = loop {
        put(&c, writer, obj, &format!("k{written}"), json!(written)).await;
        written += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
        if started.elapsed() < Duration::from_secs(4) {
            continue;
        }
        let f = slot_report(&c, follower, &colo, slot).await;
        if position(&f["applied"]) < position(&f["durable"]) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
    };
    assert!(
        held,
        "the follower wrote every entry to its files at once; nothing was held to lose"
    );
    c.kill9(follower);
    c.start_node(follower);
    c.wait_ready(Duration::from_secs(30)).await;
    wait_caught_up(&c, follower, obj).await;
    hand_off(&c, obj, follower).await;
    assert_eq!(get(&c, follower, obj, "seed").await, json!("x"));
    for i in 0..written {
        assert_eq!(
            get(&c, follower, obj, &format!("k{i}")).await,
            json!(i),
            "k{i} after the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_explicit_hand_off_moves_ownership_without_losing_writes() {
    let c = TestCluster::start(three_nodes()).await;
    let obj = "moving";
    let url = |node: usize| c.url(node, &format!("/v1/ns/default/names/{obj}/sql"));
    let r = c
        .client
        .post(url(0))
        .json(&json!({"sql": "CREATE TABLE c(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"}))
        .send()
        .await
        .expect("create");
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
    let from = c.owner_of(obj).await;
    let to = a_follower(&c, obj).await;
    // Increments keep coming while the slot moves.
    let client = c.client.clone();
    let urls: Vec<String> = (0..3).map(url).collect();
    let writer = tokio::spawn(async move {
        let (mut acked, mut sent) = (0u64, 0usize);
        let mut refused = Vec::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(4) {
            let r = client
                .post(&urls[sent % 3])
                .json(&json!({"sql": "INSERT INTO c VALUES (1, 1) ON CONFLICT(id) DO UPDATE SET n = n + 1 RETURNING n"}))
                .send()
                .await;
            sent += 1;
            if let Ok(r) = r {
                if r.status().is_success() {
                    acked += 1;
                } else {
                    refused.push(r.text().await.unwrap_or_default());
                }
            }
        }
        (acked, refused)
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    hand_off(&c, obj, to).await;
    let (acked, refused) = writer.await.expect("writer");
    // Requests meeting the move wait for it (the draining owner holds them, the other nodes
    // route them again) rather than bounce back to the client.
    assert!(
        !refused.iter().any(|body| body.contains("not_owner")),
        "requests refused during the hand-off: {refused:?}"
    );
    assert_ne!(from, to);
    assert_eq!(c.owner_of(obj).await, to);
    let v: Value = c
        .client
        .post(url(to))
        .json(&json!({"sql": "SELECT n FROM c"}))
        .send()
        .await
        .expect("read")
        .json()
        .await
        .expect("json");
    let n = v["rows"][0][0].as_u64().expect("count");
    // Every acknowledged increment is there; an unacknowledged one may be too.
    assert!(
        n >= acked,
        "{n} increments present, {acked} were acknowledged"
    );
    assert!(
        acked > 10,
        "too few increments got through to mean anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_with_a_full_disk_stays_out_of_the_quorum_and_catches_up_later() {
    // Node 2's data lives on a 48 MiB tmpfs; 1 MiB log segments.
    let mut opts = three_nodes();
    opts.small_disk = vec![(2, 48)];
    let c = TestCluster::start(opts).await;
    let full = 2;
    // An object that node 2 follows.
    let mut obj = String::new();
    for i in 0..100 {
        let name = format!("full-{i}");
        if c.followers_of(&name).await.contains(&full) {
            obj = name;
            break;
        }
    }
    assert!(!obj.is_empty(), "node 2 follows some object");
    put(&c, 0, &obj, "before", json!(1)).await;
    wait_caught_up(&c, full, &obj).await;
    // Fill the disk: the node's next log segment cannot be allocated.
    let filler = c.nodes[full].data.join("filler");
    let status = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("dd");
    assert!(!status.success(), "dd stops at a full disk");
    // Incompressible values, so the log really needs new segments (page sets are compressed).
    let values: Vec<String> = (0..120).map(|_| random_text(40_000)).collect();
    for (i, v) in values.iter().enumerate() {
        put(&c, 0, &obj, &format!("k{i}"), json!(v)).await;
    }
    assert!(
        c.metric(full, "colony_replication_log_failures_total")
            .await
            >= 1.0,
        "the full node failed to log entries"
    );
    // Space returns: the node catches up and can serve everything.
    std::fs::remove_file(&filler).expect("remove filler");
    c.wait_ready(Duration::from_secs(30)).await;
    wait_caught_up(&c, full, &obj).await;
    hand_off(&c, &obj, full).await;
    assert_eq!(get(&c, full, &obj, "before").await, json!(1));
    for i in (0..120).step_by(7) {
        assert_eq!(
            get(&c, full, &obj, &format!("k{i}")).await,
            json!(values[i])
        );
    }
}

/// A hand-off the owner gives up on (its target cannot catch up) leaves the owner serving at its
/// epoch: it never fenced itself, so the control plane does not republish it at a newer one, which
/// would only send it through recovery. (An owner that is republished at a newer epoch serves
/// again too: `an_owner_published_again_at_a_newer_epoch_counts_its_own_writes_as_applied_and_serves`
/// in node/src/cluster/mod.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_that_gave_up_a_hand_off_serves_on_at_its_epoch() {
    let c = TestCluster::start(three_nodes()).await;
    let obj = "stays";
    put(&c, 0, obj, "k", json!("before")).await;
    let owner = c.owner_of(obj).await;
    let target = a_follower(&c, obj).await;
    let (colo, slot) = slot_of(&c, obj).await;
    let epoch = slot_report(&c, owner, &colo, slot).await["epoch"].clone();
    // The target misses a write and never hears from the owner again, so the hand-off cannot
    // finish: the owner gives up after its wait and says so.
    c.proxy
        .blackhole(&c.nodes[owner].name, &c.nodes[target].name);
    put(&c, owner, obj, "k", json!("unseen by the target")).await;
    let r = hand_off_request(&c, &colo, slot, target)
        .send()
        .await
        .expect("handoff");
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 503, "the hand-off cannot finish: {body}");
    assert!(body.contains("handoff_timeout"), "{body}");
    // Several control loop passes (100 ms each) later, the slot is where it was, and serving
    // (the other follower makes the quorum).
    tokio::time::sleep(Duration::from_secs(1)).await;
    put(&c, owner, obj, "k", json!("after")).await;
    let report = slot_report(&c, owner, &colo, slot).await;
    assert_eq!(
        (&report["role"], &report["phase"], &report["epoch"]),
        (&json!("owner"), &json!("serving"), &epoch),
        "{report}"
    );
    assert_eq!(c.owner_of(obj).await, owner);
    c.proxy.heal_all();
    wait_caught_up(&c, target, obj).await;
    assert_eq!(get(&c, target, obj, "k").await, json!("after"));
}

/// A hand-off whose target never comes close gives up with 503 `handoff_timeout` after its bound,
/// and the owner took writes the whole time: it never stopped to drain for a target that was not
/// streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_off_to_a_target_that_never_gets_close_times_out_without_stopping_writes() {
    let c = TestCluster::start(three_nodes()).await;
    let obj = "never-close";
    // The target stays cut off: it never streams again while the hand-off waits. (Cut off but
    // caught up, it would count as close, and the owner would drain for it.)
    let (owner, target, colo, slot) = a_follower_past_the_resend_window(&c, obj, 530).await;
    let started = Instant::now();
    let handoff = tokio::spawn(hand_off_request(&c, &colo, slot, target).send());
    // Writes throughout the wait, each answered at once (a draining owner would hold it).
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let r = c
            .client
            .put(c.url(owner, &format!("/v1/ns/default/names/{obj}/kv/w{i}")))
            .json(&json!(i))
            .timeout(Duration::from_millis(1500))
            .send()
            .await
            .unwrap_or_else(|e| panic!("write {i} while the hand-off waited: {e}"));
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(
            status, 200,
            "write {i}: the owner kept taking writes: {body}"
        );
    }
    let r = handoff.await.expect("task").expect("handoff");
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("handoff_timeout"), "{body}");
    // The answer says where the target stood: cut off, it never got within the resend window.
    assert!(
        ["streaming", "being probed", "syncing a snapshot"]
            .iter()
            .any(|state| body.contains(&format!(
                "{} is {state}, acknowledged",
                c.nodes[target].name
            ))),
        "{body}"
    );
    assert!(body.contains("entries behind"), "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "gave up after {:?}, before its 8 s bound",
        started.elapsed()
    );
    assert_eq!(c.owner_of(obj).await, owner, "the slot kept its owner");
    c.proxy.heal_all();
    put(&c, owner, obj, "after", json!("y")).await;
    for i in 0..5 {
        assert_eq!(get(&c, owner, obj, &format!("w{i}")).await, json!(i));
    }
    assert_eq!(get(&c, owner, obj, "k529").await, json!(529));
    assert_eq!(get(&c, owner, obj, "after").await, json!("y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_off_to_a_follower_that_needs_a_snapshot_sync_completes() {
    let c = TestCluster::start(three_nodes()).await;
    let obj = "needs-sync";
    // Only a snapshot sync can bring the target up, and it has to happen while the owner drains
    // for the hand-off.
    let (owner, target, colo, slot) = a_follower_past_the_resend_window(&c, obj, 600).await;
    let request = hand_off_request(&c, &colo, slot, target).send();
    let handoff = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While the target cannot even be reached, the owner waits for it without stopping writes:
    // one attempt, answered well within the 3 s a draining owner's requests would wait.
    let during = c
        .client
        .put(c.url(owner, &format!("/v1/ns/default/names/{obj}/kv/during")))
        .json(&json!("written while the hand-off waited"))
        .timeout(Duration::from_millis(1500))
        .send()
        .await
        .expect("a write while the hand-off waits for its target");
    assert_eq!(during.status(), 200, "the owner kept taking writes");
    c.proxy.heal_all();
    let r = handoff.await.expect("task").expect("handoff");
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 200, "the hand-off finished: {body}");
    // The nodes learn the new map within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.owner_of(obj).await != target {
        assert!(
            Instant::now() < deadline,
            "the placement never named the target"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&c, target, obj, "seed").await, json!("x"));
    assert_eq!(
        get(&c, target, obj, "during").await,
        json!("written while the hand-off waited")
    );
    for i in (0..600).step_by(53) {
        assert_eq!(get(&c, target, obj, &format!("k{i:03}")).await, json!(i));
    }
}

/// Every key of `obj`, read through `node` (which forwards to the owner), retried until the
/// slot has an owner that answers.
async fn all_keys(c: &TestCluster, node: usize, obj: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    'attempt: loop {
        assert!(
            Instant::now() < deadline,
            "{obj} could not be listed: {last}"
        );
        let mut keys = BTreeSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = c.url(node, &format!("/v1/ns/default/names/{obj}/kv?limit=10000"));
            if let Some(cur) = &cursor {
                url.push_str(&format!("&cursor={cur}"));
            }
            let page = match c.client.get(url).send().await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                Ok(r) => {
                    last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
                    None
                }
                Err(e) => {
                    last = e.to_string();
                    None
                }
            };
            let Some(page) = page else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'attempt;
            };
            keys.extend(
                page["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["key"].as_str().map(str::to_string)),
            );
            match page["cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return keys,
            }
        }
    }
}

type Writer = tokio::task::JoinHandle<(String, BTreeSet<String>)>;

/// Writers that put unique keys to `objects`, through every node in turn, until `stop`; each
/// returns its object and the keys acknowledged.
fn start_writers(
    c: &TestCluster,
    objects: &[String],
    round: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<Writer> {
    let urls: Vec<String> = (0..c.nodes.len()).map(|i| c.url(i, "")).collect();
    objects
        .iter()
        .enumerate()
        .map(|(w, obj)| {
            let (client, urls, obj, stop) =
                (c.client.clone(), urls.clone(), obj.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acked = BTreeSet::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("r{round}-w{w}-{n}");
                    let node = &urls[n % urls.len()];
                    let url = format!("{node}/v1/ns/default/names/{obj}/kv/{key}");
                    match client.put(url).json(&json!(n)).send().await {
                        Ok(r) if r.status().is_success() => {
                            acked.insert(key);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                (obj, acked)
            })
        })
        .collect()
}

/// A colo-wide power cut: every node loses what it had not synced, at once, while writes run.
/// Each acknowledged write was durable on a quorum before its answer, so after the restart every
/// one is there. Then again, and one node never comes back: every acknowledged write was on a
/// quorum of two, so one of the other two has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_power_cut_of_every_node_loses_no_acknowledged_write() {
    let mut c = TestCluster::start(Options {
        lazy_disks: true,
        ..three_nodes()
    })
    .await;
    let objects: Vec<String> = (0..6).map(|i| format!("blackout-{i}")).collect();
    let mut acked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for round in 0..2 {
        let stop = Arc::new(AtomicBool::new(false));
        let writers = start_writers(&c, &objects, round, &stop);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Writes are in flight on every node when the power goes.
        for i in 0..c.nodes.len() {
            c.kill9(i);
        }
        for i in 0..c.nodes.len() {
            c.power_cut(i);
        }
        stop.store(true, Ordering::Relaxed);
        let mut this_round = 0;
        for w in writers {
            let (obj, keys) = w.await.expect("writer");
            this_round += keys.len();
            acked.entry(obj).or_default().extend(keys);
        }
        assert!(this_round > 0, "round {round}: nothing was acknowledged");
        // The second time the last node is gone for good.
        let back = if round == 0 {
            c.nodes.len()
        } else {
            c.nodes.len() - 1
        };
        for i in 0..back {
            c.start_node(i);
        }
        if round == 0 {
            c.wait_ready(Duration::from_secs(60)).await;
        }
        for obj in &objects {
            let keys = all_keys(&c, 0, obj).await;
            let want = &acked[obj];
            let lost: Vec<&String> = want.difference(&keys).collect();
            assert!(
                lost.is_empty(),
                "round {round}, {obj}: {} of {} acknowledged keys lost: {lost:?}",
                lost.len(),
                want.len()
            );
        }
        eprintln!(
            "round {round}: {this_round} acknowledged puts, all {} so far present with {back} of 3 nodes back",
            acked.values().map(BTreeSet::len).sum::<usize>()
        );
    }
    for i in 0..c.nodes.len() {
        let counts = c.disk_counts(i);
        assert!(
            counts.power_cuts == 2 && counts.pages_lost > 0,
            "n{i}'s cuts took unsynced pages: {counts:?}"
        );
    }
}

/// An owner restarted within its lease finds a follower a few entries behind (it was down when
/// they were written). The owner resends them from the entries recovery read from its log, as
/// it would have before the restart, rather than sending the follower a snapshot of the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_restarted_within_its_lease_resends_to_a_follower_a_little_behind() {
    // A long lease: the owner must be back before it lapses, on a loaded machine too.
    let mut c = TestCluster::start(Options {
        lease: Duration::from_secs(30),
        ..three_nodes()
    })
    .await;
    let obj = "restart-resend";
    put(&c, 0, obj, "seed", json!(0)).await;
    let owner = c.owner_of(obj).await;
    let behind = a_follower(&c, obj).await;
    wait_caught_up(&c, behind, obj).await;
    c.kill9(behind);
    for i in 0..20 {
        put(&c, owner, obj, &format!("k{i}"), json!(i)).await;
    }
    c.kill9(owner);
    c.start_node(behind);
    c.start_node(owner);
    c.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(
        c.owner_of(obj).await,
        owner,
        "back within its lease, it still owns the slot"
    );
    wait_caught_up(&c, behind, obj).await;
    assert_eq!(
        c.required_metric(behind, "colony_replication_syncs_completed_total")
            .await,
        0.0,
        "the restarted follower caught up without a snapshot sync"
    );
    hand_off(&c, obj, behind).await;
    for i in 0..20 {
        assert_eq!(get(&c, behind, obj, &format!("k{i}")).await, json!(i));
    }
}
