//! A whole node (in this process, so that a sync can be made to fail) whose checkpoint of an
//! object fails to sync and whose disk then lost that checkpoint's pages: every acknowledged
//! write is still there at the next request.

use crate::config::NodeConfig;
use crate::server;
use crate::storage::record::ObjectKey;
use std::path::Path;
use std::time::{Duration, Instant};

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The log positions of the checkpoint markers logged for `key` so far.
fn markers_of(log_dir: &Path, key: &ObjectKey) -> Vec<u64> {
    let markers = crate::storage::recovery::checkpoint_markers(log_dir);
    markers
        .iter()
        .filter(|c| &c.object == key)
        .map(|c| c.upto)
        .collect()
}

/// A node of one namespace, `default`, serving on loopback from `dir`/data, with `storage`
/// settings (YAML flow mapping); the node and its address.
async fn start_node(
    dir: &Path,
    storage: &str,
) -> (std::sync::Arc<server::Node>, std::net::SocketAddr) {
    let yaml = format!(
        "listen: 127.0.0.1:0
dataDir: {}
namespaces: [{{name: default}}]
storage: {storage}
",
        dir.join("data").display()
    );
    let config = NodeConfig::from_yaml(&yaml, Path::new("test.yaml")).expect("config");
    let (node, listener) = server::start(config).await.expect("node starts");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(server::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    (node, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_a_failed_checkpoint_sync_lost_are_rebuilt_from_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (node, addr) = start_node(tmp.path(), "{ idleTimeout: 1s, logSegmentBytes: 1MiB }").await;
    let client = reqwest::Client::new();
    let url = |key: &str| format!("http://{addr}/v1/ns/default/names/x/kv/{key}");
    let put = |key: String| {
        let (client, url) = (client.clone(), url(&key));
        async move {
            let r = client.put(url).json(&key).send().await.expect("put");
            assert_eq!(r.status().as_u16(), 200, "put {key}");
        }
    };

    let ns = node.namespace("default").expect("namespace").clone();
    let key = ObjectKey::new(
        ns.name.clone(),
        ns.keys.from_name("x", ns.config.jurisdiction.as_deref()),
    );
    let env = node.objects.env().clone();
    let failures = env.sync_failures.clone();
    let db = env.db_path(&key);
    let log_dir = data.join("log");

    for i in 0..5 {
        put(format!("k{i}")).await;
    }
    // Idle: closed with a checkpoint that syncs and logs its marker.
    wait_until("the object closes and its marker is logged", || {
        env.resident() == 0 && markers_of(&log_dir, &key).len() == 1
    })
    .await;
    let durable = std::fs::read(&db).expect("checkpointed database");

    for i in 5..10 {
        put(format!("k{i}")).await;
    }
    failures.fail_next_sync(&key);
    wait_until("the next checkpoint's sync fails", || {
        env.resident() == 0 && failures.is_marked(&key)
    })
    .await;
    assert_eq!(
        node.metrics.objects.sync_failed.get(),
        1,
        "reported in the metrics"
    );
    assert_eq!(
        markers_of(&log_dir, &key).len(),
        1,
        "the failed checkpoint logged no marker"
    );
    // The failed writeback: the disk holds the file as the last good checkpoint left it.
    std::fs::write(&db, &durable).expect("lose the checkpoint's pages");

    // While the file cannot be rebuilt (a directory stands where its `-wal` goes, which the
    // rebuild must remove), the object refuses requests with 503 storage_failed, changes
    // nothing, and stays marked. (Removing one directory ends it at once: a background
    // checkpoint may retry the rebuild at any moment.)
    let wal = db.with_extension("db-wal");
    let _ = std::fs::remove_file(&wal); // the rebuild discards it anyway
    std::fs::create_dir(&wal).expect("a directory where the -wal goes");
    let refused = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(
            (status, &body["error"]["code"]),
            (503, &serde_json::json!("storage_failed")),
            "{body}"
        );
    };
    refused(client.get(url("k0")).send().await.expect("get")).await;
    refused(
        client
            .put(url("k10"))
            .json(&"k10")
            .send()
            .await
            .expect("put"),
    )
    .await;
    assert!(failures.is_marked(&key), "still marked");
    assert_eq!(markers_of(&log_dir, &key).len(), 1);
    std::fs::remove_dir(&wal).expect("remove the directory");

    for i in 0..10 {
        let key = format!("k{i}");
        let r = client.get(url(&key)).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 200, "{key} survived the lost pages");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["value"], serde_json::json!(key));
    }
    let r = client.get(url("k10")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 404, "the refused put wrote nothing");
    assert!(!failures.is_marked(&key), "rebuilt");
    assert_eq!(node.metrics.objects.sync_failed.get(), 0);
    wait_until("the rebuild's marker is logged", || {
        markers_of(&log_dir, &key).len() == 2
    })
    .await;
    let markers = markers_of(&log_dir, &key);
    assert!(
        markers[1] > markers[0],
        "it covers the later writes: {markers:?}"
    );
}

/// A request run inline (on the async worker, within 1 ms) whose object is marked between the
/// inline path's own check and its opening of the database — a checkpoint's sync failed on
/// another thread in that moment — does not rebuild the file on the async worker: it answers
/// itself `rebuild_first` (a 408), so the request reruns on a blocking thread, which rebuilds the
/// file from the log and serves it. The client sees only its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_object_is_marked_mid_way_reruns_off_the_async_worker_after_a_rebuild() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (node, addr) = start_node(tmp.path(), "{}").await;
    let client = reqwest::Client::new();
    let url = |key: &str| format!("http://{addr}/v1/ns/default/names/y/kv/{key}");
    let ns = node.namespace("default").expect("namespace").clone();
    let key = ObjectKey::new(
        ns.name.clone(),
        ns.keys.from_name("y", ns.config.jurisdiction.as_deref()),
    );
    let failures = node.objects.env().sync_failures.clone();
    let objects = &node.metrics.objects;

    for i in 0..3 {
        let r = client
            .put(url(&format!("k{i}")))
            .json(&i)
            .send()
            .await
            .expect("put");
        assert_eq!(r.status().as_u16(), 200);
    }
    // Until a write runs inline with the object idle after it: a write run on a blocking
    // thread may still check the object's mark for a checkpoint after its answer, and the
    // injection below must go to the next request's inline check.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let inline = objects.inline.get();
        let r = client.put(url("k2")).json(&2).send().await.expect("put");
        assert_eq!(r.status().as_u16(), 200);
        if objects.inline.get() > inline && objects.active.get() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no write ran inline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reruns = objects.inline_reruns.get();

    failures.mark_after_next_check(&key);
    let r = client.put(url("k3")).json(&3).send().await.expect("put");
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        objects.inline_reruns.get(),
        reruns + 1,
        "the inline run gave the request back"
    );
    assert!(!failures.is_marked(&key), "rebuilt before it was served");
    assert_eq!(node.metrics.objects.sync_failed.get(), 0);
    for i in 0..4 {
        let r = client.get(url(&format!("k{i}"))).send().await.expect("get");
        assert_eq!(r.status().as_u16(), 200, "k{i}");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["value"], serde_json::json!(i));
    }
}
