//! One object's requests run one at a time in arrival order; different objects run in parallel;
//! a runaway statement is stopped by its time limit and holds up nobody else.

mod common;

use common::{TestNode, assert_error};
use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const CONFIG: &str = "listen: {listen}
dataDir: {data}
namespaces:
  - name: default
    limits: { requestTimeLimit: 1s }
storage: { logSegmentBytes: 4MiB }
";

/// Runs until the time limit stops it.
const RUNAWAY: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_of_one_object_are_serialized() {
    let node = TestNode::serve(CONFIG).await;
    node.sql(
        "counter",
        "CREATE TABLE c(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
        json!([]),
    )
    .await;
    let results: Vec<i64> = futures::stream::iter(0..200)
        .map(|_| {
            let url = node.obj("default", "counter", "/sql");
            let c = node.client.clone();
            async move {
                let r = c
                    .post(url)
                    .json(&json!({"sql": "INSERT INTO c VALUES (1, 1) ON CONFLICT(id) DO UPDATE SET n = n + 1 RETURNING n"}))
                    .send()
                    .await
                    .expect("post");
                let (s, v) = common::status_json(r).await;
                assert_eq!(s, 200, "{v}");
                v["rows"][0][0].as_i64().expect("n")
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let distinct: BTreeSet<i64> = results.iter().copied().collect();
    assert_eq!(
        distinct,
        (1..=200).collect::<BTreeSet<i64>>(),
        "each increment saw a distinct, consecutive value"
    );
    let (_, v) = node.sql("counter", "SELECT n FROM c", json!([])).await;
    assert_eq!(v["rows"], json!([[200]]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runaway_statement_is_stopped_rolls_back_and_blocks_only_its_own_object() {
    let node = TestNode::serve(CONFIG).await;
    node.sql("runaway", "CREATE TABLE t(x)", json!([])).await;
    node.sql("other", "CREATE TABLE t(x)", json!([])).await;

    let started = Instant::now();
    let slow = {
        let url = node.obj("default", "runaway", "/sql");
        let c = node.client.clone();
        tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&json!({"batch": [{"sql": "INSERT INTO t VALUES (1)"}, {"sql": RUNAWAY}]}))
                .send()
                .await
                .expect("post");
            (common::status_json(r).await, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Another object answers promptly, many times, while the runaway runs.
    for i in 0..20 {
        let (s, v) = node
            .sql("other", "INSERT INTO t VALUES (?) RETURNING x", json!([i]))
            .await;
        assert_eq!(s, 200, "{v}");
    }
    let others_done = started.elapsed();
    // A request to the runaway's own object waits behind it.
    let (queued, queued_done) = {
        let (s, v) = node
            .sql("runaway", "SELECT count(*) FROM t", json!([]))
            .await;
        ((s, v), started.elapsed())
    };
    let (runaway_answer, runaway_done) = slow.await.expect("join");
    assert_error(&runaway_answer, 408, "limit_exceeded");
    assert!(
        runaway_answer.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("requestTimeLimit")),
        "{}",
        runaway_answer.1
    );
    assert!(
        runaway_done >= Duration::from_millis(900),
        "stopped by the 1 s limit, not earlier: {runaway_done:?}"
    );
    assert!(
        others_done < runaway_done,
        "the other object did not wait: {others_done:?} vs {runaway_done:?}"
    );
    // Sent ~0.2 s in, it could only finish after the runaway's full second on the same actor
    // (the two answers then leave microseconds apart, in either order).
    assert!(
        queued_done >= Duration::from_millis(900),
        "the same object's next request waited for the runaway: done after {queued_done:?}"
    );
    // The runaway's batch rolled back entirely.
    assert_eq!(
        queued,
        (
            200,
            json!({"columns": ["count(*)"], "rows": [[0]], "rowsRead": 1, "rowsWritten": 0})
        )
    );
}

/// A request to an idle object first runs on the thread that received it, within a budget of
/// about a millisecond; one that takes longer is rolled back there and runs again on a blocking
/// thread with its full time limit. It must take effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_longer_than_the_inline_budget_runs_again_and_takes_effect_once() {
    let node = TestNode::serve(CONFIG).await;
    node.sql("long", "CREATE TABLE t(x INTEGER)", json!([]))
        .await;
    // Once open, the object is idle between requests: short ones run inline. One that is
    // preempted past the budget on a busy machine runs again instead, so this sends up to 40
    // and wants 4 inline.
    let mut short = 0;
    while node.metric("colony_object_requests_inline_total").await < 4.0 {
        assert!(
            short < 40,
            "fewer than 4 of {short} short requests ran inline"
        );
        let (s, v) = node
            .sql("long", "INSERT INTO t VALUES (?)", json!([short]))
            .await;
        assert_eq!(s, 200, "{v}");
        short += 1;
    }
    let reruns_before = node
        .metric("colony_object_requests_inline_reruns_total")
        .await;

    // Tens of milliseconds of work: far past the inline budget, well within the 1 s limit.
    let (s, v) = node
        .sql(
            "long",
            "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) SELECT x FROM c",
            json!([]),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rowsWritten"], json!(100_000));
    assert_eq!(
        node.metric("colony_object_requests_inline_reruns_total")
            .await,
        reruns_before + 1.0,
        "the long request ran past the inline budget and ran again"
    );
    let (_, v) = node.sql("long", "SELECT count(*) FROM t", json!([])).await;
    assert_eq!(
        v["rows"],
        json!([[100_000 + short]]),
        "inserted exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_objects_run_at_the_same_time() {
    let node = TestNode::serve(CONFIG).await;
    let started = Instant::now();
    let runs: Vec<_> = ["p", "q"]
        .into_iter()
        .map(|name| {
            let url = node.obj("default", name, "/sql");
            let c = node.client.clone();
            tokio::spawn(async move {
                let r = c
                    .post(url)
                    .json(&json!({"sql": RUNAWAY}))
                    .send()
                    .await
                    .expect("post");
                common::status_json(r).await.0
            })
        })
        .collect();
    // Both actors are running at once.
    let mut max_active = 0.0f64;
    while started.elapsed() < Duration::from_millis(800) {
        max_active = max_active.max(node.metric("colony_objects_active").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in runs {
        assert_eq!(r.await.expect("join"), 408);
    }
    let elapsed = started.elapsed();
    assert_eq!(max_active, 2.0, "both objects were active at the same time");
    // Two 1 s runaways one after the other would take 2 s.
    assert!(
        elapsed < Duration::from_millis(1800),
        "ran in parallel: {elapsed:?}"
    );
}
