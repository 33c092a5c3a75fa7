//! Idle objects close and open objects stay within limits; closed objects reopen transparently.

mod common;

use common::TestNode;
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};

async fn put_many(node: &TestNode, count: usize) {
    futures::stream::iter(0..count)
        .map(|i| {
            let url = node.obj("default", &format!("e{i}"), "/kv/value");
            let c = node.client.clone();
            async move {
                let r = c.put(url).json(&json!(i)).send().await.expect("put");
                assert_eq!(r.status().as_u16(), 200);
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

async fn wait_for(
    node: &TestNode,
    metric: &str,
    pred: impl Fn(f64) -> bool,
    within: Duration,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = node.metric(metric).await;
        if pred(v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_objects_close_beyond_the_limit_and_idle_ones_close_entirely() {
    let node = TestNode::serve(
        "listen: {listen}
dataDir: {data}
namespaces: [{name: default}]
storage: { maxOpenObjects: 20, idleTimeout: 2s, logSegmentBytes: 4MiB }
",
    )
    .await;
    put_many(&node, 300).await;
    let resident = wait_for(
        &node,
        "colony_objects_resident",
        |v| v <= 20.0,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        resident <= 20.0,
        "open objects stay within maxOpenObjects: {resident}"
    );
    assert!(node.metric("colony_object_evictions_total").await >= 280.0);
    // Every object reopens transparently with its data.
    for i in (0..300).step_by(7) {
        let (s, v) = node
            .get(&format!("/v1/ns/default/names/e{i}/kv/value"))
            .await;
        assert_eq!((s, v["value"].as_u64()), (200, Some(i as u64)));
    }
    let (_, list) = node.get("/v1/ns/default/objects?limit=1000").await;
    assert_eq!(list["objects"].as_array().map(Vec::len), Some(300));
    // With no requests, everything closes after the idle timeout.
    let resident = wait_for(
        &node,
        "colony_objects_resident",
        |v| v == 0.0,
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(resident, 0.0, "idle objects close");
    assert_eq!(node.metric("colony_objects_active").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_close_to_keep_sqlite_memory_within_the_limit() {
    let node = TestNode::serve(
        "listen: {listen}
dataDir: {data}
namespaces: [{name: default}]
storage: { maxOpenObjects: 10000, memoryLimit: 4MiB, idleTimeout: 1h, logSegmentBytes: 4MiB }
",
    )
    .await;
    put_many(&node, 400).await;
    // Each open database holds a page cache and a schema: 400 of them exceed 4 MiB.
    let resident = wait_for(
        &node,
        "colony_objects_resident",
        |v| v < 200.0,
        Duration::from_secs(8),
    )
    .await;
    assert!(
        resident < 200.0,
        "the memory limit closes objects: {resident} still open"
    );
    let (s, v) = node.get("/v1/ns/default/names/e0/kv/value").await;
    assert_eq!((s, v["value"].as_u64()), (200, Some(0)));
}

/// The node's threads, from /proc.
fn threads_of(node: &TestNode) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", node.pid()))
        .expect("the node's threads")
        .count()
}

/// Hundreds of objects going idle together close one after another on the housekeeping thread,
/// not on a thread each (which grew the runtime's blocking pool to 512 threads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_objects_closing_at_once_do_not_take_a_thread_each() {
    let node = TestNode::serve(
        "listen: {listen}
dataDir: {data}
namespaces: [{name: default}]
storage: { maxOpenObjects: 10000, idleTimeout: 2s, logSegmentBytes: 4MiB }
",
    )
    .await;
    put_many(&node, 600).await;
    let before = threads_of(&node);
    let resident = wait_for(
        &node,
        "colony_objects_resident",
        |v| v == 0.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(resident, 0.0, "idle objects close");
    // Idle pool threads linger for seconds after their last task, so this counts every thread
    // the closing took.
    let after = threads_of(&node);
    assert!(
        after < before + 50,
        "closing 600 objects took {} threads more ({before} before, {after} after)",
        after.saturating_sub(before)
    );
    let (s, v) = node.get("/v1/ns/default/names/e599/kv/value").await;
    assert_eq!((s, v["value"].as_u64()), (200, Some(599)));
}

/// New objects arriving faster than housekeeping closes old ones: past its cap of open
/// databases an open waits for a close, so the node never runs out of file descriptors. A
/// 2,048-descriptor limit allows 226 open objects (4 descriptors each, 1,024 kept in reserve;
/// `server::max_open_objects_for`), and opens wait past 255 (`object::open_cap`). Before the cap,
/// a housekeeping pass slowed by thousands of idle objects closing let new objects open until
/// the process had no descriptors left, and requests failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_objects_waits_for_room_instead_of_exhausting_file_descriptors() {
    let mut node = TestNode::configured(
        "listen: {listen}
dataDir: {data}
namespaces: [{name: default}]
storage: { idleTimeout: 1h, memoryLimit: 1GiB, logSegmentBytes: 4MiB }
",
    );
    node.file_limit = Some(2048);
    node.start().await;
    const CONCURRENCY: usize = 48;
    let cap = colony_node::object::open_cap(colony_node::server::max_open_objects_for(2048));

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (client, url, done) = (node.client.clone(), node.url("/metrics"), done.clone());
        tokio::spawn(async move {
            let mut most = 0.0f64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(r) = client.get(&url).send().await
                    && let Ok(text) = r.text().await
                    && let Some(v) = text
                        .lines()
                        .find_map(|l| l.strip_prefix("colony_objects_resident "))
                        .and_then(|v| v.trim().parse::<f64>().ok())
                {
                    most = most.max(v);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let failures: Vec<(usize, u16, String)> = futures::stream::iter(0..1500usize)
        .map(|i| {
            let url = node.obj("default", &format!("burst{i}"), "/kv/value");
            let c = node.client.clone();
            async move {
                let r = c.put(url).json(&json!(i)).send().await.expect("put");
                let status = r.status().as_u16();
                (i, status, r.text().await.unwrap_or_default())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .filter(|(_, status, _)| futures::future::ready(*status != 200))
        .collect()
        .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = watch.await.expect("watcher");
    assert!(
        failures.is_empty(),
        "{} puts failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        most <= (cap + CONCURRENCY) as f64,
        "at most the cap ({cap}) plus the opens already under way are open: {most}"
    );
    assert!(node.metric("colony_object_open_waits_total").await > 0.0);
    // Every object kept its value.
    for i in (0..1500).step_by(97) {
        let (s, v) = node
            .get(&format!("/v1/ns/default/names/burst{i}/kv/value"))
            .await;
        assert_eq!((s, v["value"].as_u64()), (200, Some(i as u64)));
    }
}

/// Past its cap an open waits for room at most 2 s (`object::registry`'s `ROOM_WAIT`), then
/// opens anyway: the cap guards file descriptors, and objects that cannot close (busy ones)
/// must not hold a new object's first request until they are done. With `maxOpenObjects: 1`
/// the cap is 2; two objects kept busy by long queries fill it, and a request to a third one is
/// answered after the wait, while both queries still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_that_finds_no_room_in_time_opens_past_the_cap() {
    let node = TestNode::serve(
        "listen: {listen}
dataDir: {data}
namespaces: [{name: default}]
storage: { maxOpenObjects: 1, idleTimeout: 1h, logSegmentBytes: 4MiB }
",
    )
    .await;
    assert_eq!(colony_node::object::open_cap(1), 2);
    const COUNT: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) SELECT count(*) AS n FROM c";
    // Long enough queries, whatever the machine's speed: one of known length, timed on one of
    // the two objects to keep busy (it stays open: one open object is within the limit).
    let probe = 300_000u64;
    let started = Instant::now();
    let (s, v) = node.sql("busy-a", COUNT, json!([probe])).await;
    assert_eq!(s, 200, "{v}");
    let per_row = started.elapsed().as_secs_f64() / probe as f64;
    let rows = ((8.0 / per_row) as u64).clamp(probe, 2_000_000_000);

    let busy: Vec<_> = ["busy-a", "busy-b"]
        .into_iter()
        .map(|name| {
            let (client, url) = (node.client.clone(), node.obj("default", name, "/sql"));
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .json(&json!({"sql": COUNT, "params": [rows]}))
                    .send()
                    .await;
                (Instant::now(), r.map(|r| r.status().as_u16()))
            })
        })
        .collect();
    let resident = wait_for(
        &node,
        "colony_objects_resident",
        |v| v >= 2.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(resident, 2.0, "both busy objects are open");
    // And both queries running: an object whose query had not started yet would be idle, and
    // housekeeping would close it to make room.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waits_before = node.metric("colony_object_open_waits_total").await;

    let asked = Instant::now();
    let r = node
        .client
        .put(node.obj("default", "newcomer", "/kv/value"))
        .json(&json!("hello"))
        .send()
        .await
        .expect("put");
    let answered = Instant::now();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        node.metric("colony_object_open_waits_total").await,
        waits_before + 1.0,
        "the open waited for room"
    );
    assert!(
        answered - asked >= Duration::from_millis(1500),
        "the open waited (about 2 s) before giving up: {:?}",
        answered - asked
    );
    assert_eq!(
        node.metric("colony_objects_resident").await,
        3.0,
        "it opened past the cap"
    );
    for task in busy {
        let (finished, status) = task.await.expect("busy request");
        assert!(
            finished > answered,
            "the busy queries ran past the new object's answer ({status:?}); make them longer"
        );
    }
    let (s, v) = node.get("/v1/ns/default/names/newcomer/kv/value").await;
    assert_eq!((s, v["value"].as_str()), (200, Some("hello")));
}

/// The node turns transparent huge pages off for itself (`huge_pages`): with them, each of its
/// many threads' heaps held a 2 MiB page for a few kilobytes of objects.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_runs_without_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return; // the environment chose, and the node leaves the choice to it
    }
    let node = TestNode::new().await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("the kernel reports THP_enabled (Linux 5.0 and later)");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

/// One HTTP/1.1 request on a connection the caller keeps (a pooled client could try to open a
/// new one, which a node out of descriptors would not accept). Returns the status and JSON body.
async fn on_connection(
    conn: &mut tokio::net::TcpStream,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: colony\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("send");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.expect("receive");
        assert!(n > 0, "the node closed the connection");
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("a content-length");
        if got.len() >= end + 4 + length {
            let status = text[9..12].parse().expect("a status");
            let json = serde_json::from_slice(&got[end + 4..end + 4 + length]).expect("JSON");
            return (status, json);
        }
    }
}

/// Puts `value` under key `v` of object `name`, on `conn`.
async fn put_on(
    conn: &mut tokio::net::TcpStream,
    name: &str,
    value: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let path = format!("/v1/ns/default/names/{name}/kv/v");
    on_connection(conn, "PUT", &path, Some(value)).await
}

/// A node out of file descriptors (here, every one held by an idle client connection)
/// answers a request that would open a database with 503 `too_many_open_files` and creates
/// nothing. It keeps serving the objects it has open, durably: their writes cross into new log
/// segments, which are prepared and held open ahead of need (a segment switch that needed a
/// descriptor failed every write of its batch). Once the connections close it opens objects
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_out_of_file_descriptors_refuses_new_objects_and_keeps_serving_open_ones() {
    let mut node = TestNode::configured(
        "listen: {listen}
dataDir: {data}
namespaces: [{name: default}]
storage: { idleTimeout: 1h, logSegmentBytes: 1MiB }
",
    );
    node.file_limit = Some(512);
    node.start().await;
    let addr = format!("127.0.0.1:{}", node.port);
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (s, _) = put_on(&mut conn, "kept", &json!(0)).await;
    assert_eq!(s, 200);
    // Opened by a read: its first write comes when no descriptor is left.
    let (s, _) = on_connection(&mut conn, "GET", "/v1/ns/default/names/read/kv/v", None).await;
    assert_eq!(s, 404);

    // Idle connections until the node accepts no more: the last one waits in the backlog.
    let mut held = Vec::new();
    let exhausted = loop {
        assert!(held.len() < 1000, "the node kept accepting connections");
        let mut c = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let answered = tokio::time::timeout(
            Duration::from_secs(2), // generous: an idle node answers in microseconds
            on_connection(&mut c, "GET", "/healthz", None),
        )
        .await
        .is_ok();
        held.push(c);
        if !answered {
            break held.len();
        }
    };
    assert!(
        exhausted > 100,
        "only {exhausted} connections were accepted"
    );

    let (s, v) = put_on(&mut conn, "fresh", &json!(1)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("too_many_open_files")),
        "{v}"
    );

    let (s, v) = put_on(&mut conn, "read", &json!(3)).await;
    assert_eq!(s, 200, "the first write to an object opened by a read: {v}");

    // 40 values of 48 KiB that compress poorly: about 2 MiB of log, two segment switches.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut last = String::new();
    for i in 1..=40 {
        last = (0..48 * 1024)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (b'a' + (seed % 26) as u8) as char
            })
            .collect();
        let (s, v) = put_on(&mut conn, "kept", &json!(last)).await;
        assert_eq!(s, 200, "write {i} to an open object: {v}");
    }

    drop(held);
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = node
            .client
            .put(node.obj("default", "fresh", "/kv/v"))
            .json(&json!(2))
            .send()
            .await
            && r.status().as_u16() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not open objects again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The refused put left nothing: the first value is the one written afterwards.
    let (s, v) = node.get("/v1/ns/default/names/fresh/kv/v").await;
    assert_eq!((s, v["value"].as_u64()), (200, Some(2)));

    node.restart().await;
    let (s, v) = node.get("/v1/ns/default/names/kept/kv/v").await;
    assert_eq!((s, v["value"].as_str()), (200, Some(last.as_str())));
    let (s, v) = node.get("/v1/ns/default/names/read/kv/v").await;
    assert_eq!((s, v["value"].as_u64()), (200, Some(3)));
}
