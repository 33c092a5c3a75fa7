//! etcd, the replicated peer of the replication benchmark: a 3-member cluster on loopback
//! started from the binary `bench/etcd/install.sh` unpacks (Debian's etcd 3.4), and load
//! targets that put through its v3 JSON gateway.
//!
//! Durability is etcd's default: every member fdatasyncs its raft WAL for each batch of entries
//! before acknowledging them, and a put is answered once committed, that is in the synced WALs
//! of a majority (the leader's included). Nothing here relaxes that (no `--unsafe-no-fsync`).
//!
//! The gateway takes the key in the JSON body (`POST /v3/kv/put` with base64 `key` and
//! `value`; query parameters are ignored), and `load::Target` sends one fixed body, so a
//! target writes one key. Spreading writes over keys is done with one target per key:
//! [`put_targets`] and [`run_spread`], which gives connection `c` the key `c % keys`.

use crate::load::{self, Stats, Target};
use crate::systems::free_port;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hyper::Method;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Members in the cluster.
pub const MEMBERS: usize = 3;

/// The gateway path of a put (etcd 3.4 also still serves `/v3beta/kv/put`).
pub const PUT_PATH: &str = "/v3/kv/put";

/// One etcd process.
pub struct Member {
    pub name: String,
    pub client_addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

/// A 3-member etcd cluster on 127.0.0.1, data in a temporary directory; the members are killed
/// (and the data removed) when it is dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    // `Drop` kills and reaps the members before the fields, so this goes after them.
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts the members and waits until the cluster has a leader and takes a put.
    pub fn start(binary: &Path) -> Result<EtcdCluster, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ports = distinct_free_ports(2 * MEMBERS)?;
        let loopback = |port: u16| -> SocketAddr { ([127, 0, 0, 1], port).into() };
        let names: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
        let initial_cluster = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n}=http://{}", loopback(ports[MEMBERS + i])))
            .collect::<Vec<_>>()
            .join(",");
        // A token per cluster, so members of two clusters started side by side cannot join up.
        let token = format!("colony-bench-{}-{}", std::process::id(), ports[0]);

        let mut cluster = EtcdCluster {
            members: Vec::with_capacity(MEMBERS),
            dir,
        };
        for (i, name) in names.iter().enumerate() {
            let client_addr = loopback(ports[i]);
            let peer_addr = loopback(ports[MEMBERS + i]);
            let log = cluster.dir.path().join(format!("{name}.log"));
            let stderr = File::create(&log).map_err(|e| e.to_string())?;
            let child = Command::new(binary)
                .args(member_args(
                    name,
                    &cluster.dir.path().join(format!("{name}.etcd")),
                    client_addr,
                    peer_addr,
                    &initial_cluster,
                    &token,
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
            cluster.members.push(Member {
                name: name.clone(),
                client_addr,
                child,
                log,
            });
        }
        cluster.wait_ready(Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// The client address of the current leader. Puts sent to a follower are forwarded to
    /// the leader (one more hop); send them here to measure etcd at its best.
    ///
    /// Panics if no leader is known within 10 s (the cluster had one when `start` returned).
    pub fn leader_client_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.leader() {
                Ok(i) => return self.members[i].client_addr,
                Err(e) if Instant::now() >= deadline => panic!("etcd: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The index in `members()` of the member every member names as leader.
    pub fn leader(&self) -> Result<usize, String> {
        let mut ids = Vec::with_capacity(self.members.len());
        let mut leader = None;
        for m in &self.members {
            let status = status(m.client_addr)?;
            if status.leader == 0 {
                return Err(format!("{} knows no leader", m.name));
            }
            if leader.is_some_and(|l| l != status.leader) {
                return Err("members disagree on the leader".to_string());
            }
            leader = Some(status.leader);
            ids.push(status.member_id);
        }
        let leader = leader.ok_or("no members")?;
        ids.iter()
            .position(|&id| id == leader)
            .ok_or_else(|| format!("leader {leader:x} is not a member"))
    }

    /// Compacts the key history up to the current revision, so the space of overwritten
    /// values is reused (etcd keeps every revision until compacted; its backend quota is
    /// 2 GiB). For use between measurements.
    pub fn compact(&self) -> Result<(), String> {
        let addr = self.leader_client_addr();
        let (code, body) = http(addr, "POST", "/v3/kv/range", r#"{"key":"AA==","limit":1}"#)?;
        if code != 200 {
            return Err(format!("range: {code} {body}"));
        }
        let revision = json(&body)?
            .pointer("/header/revision")
            .and_then(as_u64)
            .ok_or_else(|| format!("no revision in {body}"))?;
        let (code, body) = http(
            addr,
            "POST",
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )?;
        if code != 200 {
            return Err(format!("compaction: {code} {body}"));
        }
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            for m in &mut self.members {
                if let Ok(Some(status)) = m.child.try_wait() {
                    return Err(format!(
                        "etcd member {} exited during start: {status}\n{}",
                        m.name,
                        log_tail(&m.log)
                    ));
                }
            }
            let last = match self.ready() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("--- {}:\n{}", m.name, log_tail(&m.log)))
                    .collect();
                return Err(format!(
                    "etcd cluster not ready after {timeout:?}: {last}\n{}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every member healthy, all agree on a leader, and a put through the leader succeeds.
    fn ready(&self) -> Result<(), String> {
        for m in &self.members {
            let (code, body) = http(m.client_addr, "GET", "/health", "")?;
            if code != 200 || !body.contains(r#""health":"true""#) {
                return Err(format!("{} not healthy: {code} {body}", m.name));
            }
        }
        let leader = self.members[self.leader()?].client_addr;
        let (code, body) = http(leader, "POST", PUT_PATH, &put_body("colony-bench/ready", 1))?;
        if code != 200 {
            return Err(format!("test put: {code} {body}"));
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.child.kill();
        }
        for m in &mut self.members {
            let _ = m.child.wait();
        }
    }
}

/// The command line of one member. Durability and timing settings are etcd's defaults.
fn member_args(
    name: &str,
    data_dir: &Path,
    client: SocketAddr,
    peer: SocketAddr,
    initial_cluster: &str,
    token: &str,
) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls=http://{client}"),
        format!("--advertise-client-urls=http://{client}"),
        format!("--listen-peer-urls=http://{peer}"),
        format!("--initial-advertise-peer-urls=http://{peer}"),
        format!("--initial-cluster={initial_cluster}"),
        "--initial-cluster-state=new".to_string(),
        format!("--initial-cluster-token={token}"),
        "--logger=zap".to_string(),
        "--log-outputs=stderr".to_string(),
        "--log-level=warn".to_string(),
    ]
}

fn distinct_free_ports(n: usize) -> Result<Vec<u16>, String> {
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n * 20 {
        let port = free_port().map_err(|e| e.to_string())?;
        if !ports.contains(&port) {
            ports.push(port);
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    Err("cannot find free ports".to_string())
}

/// The JSON body of a put of `value_len` bytes under `key`.
pub fn put_body(key: &str, value_len: usize) -> String {
    let value: Vec<u8> = (0..value_len).map(|i| b'a' + (i % 26) as u8).collect();
    serde_json::json!({
        "key": BASE64.encode(key.as_bytes()),
        "value": BASE64.encode(&value),
    })
    .to_string()
}

/// A target that puts `value_len` bytes (at least 12) under `key`, again and again, each put
/// a different value as Colony's are (etcd would write an unchanged one all the same).
pub fn put_target(addr: SocketAddr, key: &str, value_len: usize) -> Target {
    let body = put_body(key, value_len.max(12));
    // Hex digits are base64 digits: the stamp replaces the first 12 bytes of the value.
    let value_at = body.find(r#""value":""#).map(|i| i + r#""value":""#.len());
    let target = Target::new(addr, Method::POST, &body, |_, _| PUT_PATH.to_string());
    match value_at {
        Some(at) => target.stamped(at),
        None => target,
    }
}

/// One put target per key, key `i` being `{key_prefix}{i}`; run them with [`run_spread`].
pub fn put_targets(addr: SocketAddr, key_prefix: &str, keys: u64, value_len: usize) -> Vec<Target> {
    (0..keys.max(1))
        .map(|i| put_target(addr, &format!("{key_prefix}{i}"), value_len))
        .collect()
}

/// Like `load::run` over `connections` connections, connection `c` sending `targets[c %
/// targets.len()]`: with as many targets as connections, each connection writes its own key.
pub async fn run_spread(targets: &[Target], connections: usize, duration: Duration) -> Stats {
    let runs = targets.iter().enumerate().filter_map(|(j, target)| {
        let n = (j..connections).step_by(targets.len()).count();
        (n > 0).then(|| load::run(target, n, duration))
    });
    let mut total = Stats {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
            .expect("histogram bounds"),
    };
    for stats in futures::future::join_all(runs).await {
        total.ok += stats.ok;
        total.errors += stats.errors;
        total.elapsed = total.elapsed.max(stats.elapsed);
        let _ = total.latency.add(&stats.latency);
    }
    total
}

struct Status {
    member_id: u64,
    leader: u64,
}

/// `POST /v3/maintenance/status` on one member: its id and the leader it knows (0: none).
fn status(addr: SocketAddr) -> Result<Status, String> {
    let (code, body) = http(addr, "POST", "/v3/maintenance/status", "{}")?;
    if code != 200 {
        return Err(format!("status of {addr}: {code} {body}"));
    }
    let v = json(&body)?;
    let member_id = v
        .pointer("/header/member_id")
        .and_then(as_u64)
        .ok_or_else(|| format!("no member_id in {body}"))?;
    // The gateway omits zero values, so no leader means no `leader` field.
    let leader = v.get("leader").and_then(as_u64).unwrap_or(0);
    Ok(Status { member_id, leader })
}

fn json(body: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))
}

/// The gateway writes 64-bit integers as JSON strings.
fn as_u64(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::String(s) => s.parse().ok(),
        v => v.as_u64(),
    }
}

/// One blocking HTTP/1.0 exchange (setup and leader lookup, not measurements): the status code
/// and body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let timeout = Duration::from_secs(5);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("{addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: malformed answer"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: malformed status line"))?;
    Ok((code, body.to_string()))
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
