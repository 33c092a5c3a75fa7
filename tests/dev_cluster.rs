//! `colony-node dev --colos 3 --nodes-per-colo 2`: six node processes and a control plane on
//! loopback; any node serves any object; the admin API can require a token.

mod support;

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::cluster::node_binary;

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SIGTERM: the dev supervisor stops its nodes on the way out.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A free range of `n` consecutive ports on 127.0.0.1.
async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

fn free_ports(n: u16) -> u16 {
    for _ in 0..50 {
        let base = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(20000);
        let base = base.saturating_sub(n).max(20000);
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_a_local_cluster_where_any_node_serves_any_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_ports(7);
    let mut child = Command::new(node_binary())
        .args([
            "dev",
            "--colos",
            "3",
            "--nodes-per-colo",
            "2",
            "--lease",
            "2s",
        ])
        .args(["--listen", &format!("127.0.0.1:{base}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dev");
    let stdout = child.stdout.take().expect("stdout");
    let _guard = Killed(child);
    // It prints every node's address.
    let mut addresses = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://"))
            && line.contains(" colo ")
        {
            addresses.push(url.to_string());
        }
        if line.starts_with("Any node accepts") {
            break;
        }
    }
    // Keep reading what the nodes print, as a terminal would.
    std::thread::spawn(move || for _ in lines {});
    assert_eq!(addresses.len(), 6, "six nodes listed: {addresses:?}");
    let client = support::cluster::client();
    // Wait for the cluster to place its slots and every node to be ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in &addresses {
        loop {
            let ready = client
                .get(format!("{a}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "{a} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Writes through one node, reads through every other: requests are forwarded to owners.
    for (i, address) in addresses.iter().enumerate() {
        let obj = format!("room-{i}");
        let r = client
            .put(format!("{address}/v1/ns/default/names/{obj}/kv/who"))
            .json(&json!(i))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 200);
    }
    for a in &addresses {
        for i in 0..6 {
            let v = get_json(&client, &format!("{a}/v1/ns/default/names/room-{i}/kv/who")).await;
            assert_eq!(v["value"], json!(i), "room-{i} read through {a}");
        }
    }
    let ready = get_json(&client, &format!("{}/readyz", addresses[0])).await;
    assert_eq!(ready["mode"], "cluster");
    assert_eq!(ready["nodesInRegion"], 6);
    assert_eq!(ready["underReplicated"], false);

    // A location hint naming another colo of the region makes it the object's home: its slot
    // belongs to that colo wherever the ID was made.
    let post_ids = |body: Value| {
        let client = client.clone();
        let url = format!("{}/v1/ns/default/ids", addresses[0]);
        async move {
            let v: Value = client
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("ids")
                .json()
                .await
                .expect("json");
            v
        }
    };
    let here = post_ids(json!({})).await["colo"]
        .as_str()
        .expect("colo")
        .to_string();
    let there = ["ams", "fra", "lhr"]
        .into_iter()
        .find(|c| *c != here)
        .expect("another colo");
    let hinted = post_ids(json!({"locationHint": there})).await;
    assert_eq!(hinted["colo"], there, "{hinted}");
    let id = hinted["id"].as_str().expect("id");
    let r = client
        .put(format!("{}/v1/ns/default/objects/{id}/kv/k", addresses[0]))
        .json(&json!(1))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    let located = get_json(
        &client,
        &format!("{}/v1/admin/locate/default/{id}", addresses[0]),
    )
    .await;
    assert_eq!(located["colo"], there, "{located}");
    let unknown = post_ids(json!({"locationHint": "nowhere"})).await;
    assert_eq!(unknown["colo"], here.as_str(), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_requires_the_token_when_one_is_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = "s3cret-token-of-32-characters-xx";
    std::fs::write(dir.path().join("token"), format!("{token}\n")).expect("token");
    let port = free_ports(1);
    let config = dir.path().join("node.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\ndataDir: {}\nadminTokenFile: {}\nnamespaces: [{{name: default}}]\nstorage: {{logSegmentBytes: 1MiB}}\n",
            dir.path().join("data").display(),
            dir.path().join("token").display()
        ),
    )
    .expect("config");
    let child = Command::new(node_binary())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let _guard = Killed(child);
    let client = support::cluster::client();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "node did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for path in [
        "/v1/admin/status",
        "/v1/admin/slots/local/0",
        "/v1/internal/slots/local/0/manifest",
    ] {
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401, "{path} without a token");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "unauthorized");
        let r = client
            .get(format!("{base}{path}"))
            .header("authorization", "Bearer wrong-token-of-32-characters-xxx")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401, "{path} with a wrong token");
    }
    let r = client
        .get(format!("{base}/v1/admin/status"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    // The object API is not affected.
    let r = client
        .put(format!("{base}/v1/ns/default/names/x/kv/k"))
        .json(&json!(1))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
}
