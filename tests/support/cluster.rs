//! A Colony cluster on loopback for tests: a control-plane process and node processes, each on
//! its own 127.0.0.x address and reachable by others only through the partitioning proxy.
//!
//! Parties: `control` (127.0.0.9), nodes `n0`, `n1`, ... (127.0.0.10 + i), and `client` (the
//! test itself, from 127.0.0.1).

use super::lazy_disk::{Counts, LazyDisk};
use super::netproxy::{NetProxy, loopback_ip};
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `colony-node` binary built next to the test executable (target/<profile>/colony-node;
/// `cargo test --workspace` builds it because colony-node has integration tests).
pub fn node_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join("colony-node");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p colony-node`, or run the whole workspace's tests)",
        bin.display()
    );
    bin
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub const CONTROL: &str = "control";

pub fn control_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))
}

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: usize,
    pub lease: Duration,
    pub replicas: usize,
    pub write_quorum: usize,
    pub slots: u32,
    /// Extra YAML for every node's `storage:` section.
    pub storage_yaml: String,
    /// Nodes whose data directory is a tmpfs of this many MiB (to fill their disk).
    pub small_disk: Vec<(usize, u64)>,
    /// Every node's data directory is a disk that keeps only what was synced, for
    /// [`TestCluster::power_cut`].
    pub lazy_disks: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 5,
            lease: Duration::from_secs(2),
            replicas: 5,
            write_quorum: 3,
            slots: 32,
            storage_yaml: "logSegmentBytes: 1MiB".into(),
            small_disk: Vec::new(),
            lazy_disks: false,
        }
    }
}

pub struct Node {
    pub name: String,
    pub ip: IpAddr,
    /// Where the process listens.
    pub listen: SocketAddr,
    /// Where everybody else reaches it (its proxy).
    pub address: SocketAddr,
    pub data: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub paused: bool,
    mounted: bool,
    disk: Option<LazyDisk>,
}

pub struct TestCluster {
    pub proxy: NetProxy,
    pub nodes: Vec<Node>,
    pub control_url: String,
    control: Child,
    pub client: reqwest::Client,
    pub opts: Options,
    dir: tempfile::TempDir,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::env::var_os("COLONY_KEEP_TEST_DIR").is_some() {
            eprintln!(
                "keeping the cluster's files in {}",
                self.dir.path().display()
            );
            let d = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            let _ = d.keep();
        }
        let _ = self.control.kill();
        let _ = self.control.wait();
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                if n.paused {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            if n.mounted {
                let _ = Command::new("umount").arg(&n.data).status();
            }
            // Unmounted before the test directory is removed.
            n.disk = None;
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .pool_max_idle_per_host(16)
        .build()
        .expect("client")
}

impl TestCluster {
    pub async fn start(opts: Options) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = NetProxy::new();
        let bin = node_binary();
        // Control plane.
        let cip = control_ip();
        proxy.add_party(CONTROL, cip);
        let control_listen = SocketAddr::new(cip, free_port(cip));
        let control_proxy = proxy
            .forward(CONTROL, SocketAddr::new(cip, 0), control_listen)
            .await
            .expect("control proxy");
        let control = Command::new(&bin)
            .args([
                "control",
                "--listen",
                &control_listen.to_string(),
                "--region",
                "test",
            ])
            .args(["--lease", &format!("{}ms", opts.lease.as_millis())])
            .args(["--slots", &opts.slots.to_string()])
            .args(["--replicas", &opts.replicas.to_string()])
            .args(["--write-quorum", &opts.write_quorum.to_string()])
            .args(["--expect-nodes", &opts.nodes.to_string()])
            .args(["--source-address", &cip.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the control plane");
        // From here on the cluster's Drop stops every process started and unmounts every disk
        // mounted, should a later step panic.
        let mut cluster = TestCluster {
            proxy,
            nodes: Vec::new(),
            control_url: format!("http://{control_proxy}"),
            control,
            client: client(),
            opts,
            dir,
        };
        // Shared ID keys.
        let keys = cluster.dir.path().join("keys");
        std::fs::create_dir_all(&keys).expect("keys dir");
        std::fs::write(keys.join("default"), format!("{}\n", "7a".repeat(32))).expect("keys");
        for i in 0..cluster.opts.nodes {
            let name = format!("n{i}");
            let ip = loopback_ip(i);
            cluster.proxy.add_party(&name, ip);
            let listen = SocketAddr::new(ip, free_port(ip));
            let address = cluster
                .proxy
                .forward(&name, SocketAddr::new(ip, 0), listen)
                .await
                .expect("node proxy");
            let data = cluster.dir.path().join(&name);
            std::fs::create_dir_all(&data).expect("data dir");
            let config = cluster.dir.path().join(format!("{name}.yaml"));
            cluster.nodes.push(Node {
                name: name.clone(),
                ip,
                listen,
                address,
                data: data.clone(),
                config: config.clone(),
                child: None,
                paused: false,
                mounted: false,
                disk: None,
            });
            let opts = &cluster.opts;
            if let Some((_, mib)) = opts.small_disk.iter().find(|(n, _)| *n == i) {
                let status = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                    .arg(&data)
                    .status()
                    .expect("run mount");
                assert!(
                    status.success(),
                    "the disk-full test mounts a small tmpfs for node {name}'s data; mount failed ({status}) — it needs root (CAP_SYS_ADMIN)"
                );
                cluster.nodes[i].mounted = true;
            }
            if opts.lazy_disks {
                cluster.nodes[i].disk = Some(LazyDisk::mount(&data));
            }
            let yaml = format!(
                "node: {{ name: {name}, colo: c{i}, region: test }}
listen: {listen}
advertiseAddress: {address}
dataDir: {data}
keysDir: {keys}
namespaces:
  - name: default
    replication: {{ replicas: {replicas}, writeQuorum: {quorum} }}
storage: {{ {storage} }}
cluster:
  control: {control_url}
  leaseDuration: {lease}ms
  sourceAddress: {ip}
",
                data = data.join("data").display(),
                keys = keys.display(),
                replicas = opts.replicas,
                quorum = opts.write_quorum,
                storage = opts.storage_yaml,
                control_url = cluster.control_url,
                lease = opts.lease.as_millis(),
            );
            std::fs::write(&config, yaml).expect("write config");
        }
        for i in 0..cluster.nodes.len() {
            cluster.start_node(i);
        }
        cluster.wait_ready(Duration::from_secs(60)).await;
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "{} is running", n.name);
        // Each node logs to its own file in the test directory (kept with COLONY_KEEP_TEST_DIR=1).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", n.name)))
            .expect("node log file");
        let child = Command::new(node_binary())
            .args(["serve", "--config"])
            .arg(&n.config)
            .env(
                "RUST_LOG",
                std::env::var("COLONY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a node");
        n.child = Some(child);
        n.paused = false;
    }

    /// SIGKILL.
    pub fn kill9(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Some(mut c) = n.child.take() {
            if n.paused {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        n.paused = false;
    }

    /// SIGKILL, then the node's disk loses whatever was not synced (`lazy_disks`).
    pub fn power_cut(&mut self, i: usize) {
        self.kill9(i);
        let n = &mut self.nodes[i];
        let disk = n.disk.take().expect("power cuts need Options::lazy_disks");
        n.disk = Some(disk.power_cut());
    }

    /// What node `i`'s disk was asked to do and lost (`lazy_disks`).
    pub fn disk_counts(&self, i: usize) -> Counts {
        self.nodes[i].disk.as_ref().expect("a lazy disk").counts()
    }

    fn signal(&mut self, i: usize, sig: i32) {
        let n = &mut self.nodes[i];
        let pid = n.child.as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(rc, 0, "signal {sig} to {}", n.name);
        n.paused = sig == libc::SIGSTOP;
    }

    pub fn pause(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.nodes[i].address)
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .expect("known node")
    }

    pub async fn control_status(&self) -> Value {
        self.client
            .get(format!("{}/v1/control/status", self.control_url))
            .send()
            .await
            .expect("control status")
            .json()
            .await
            .expect("json")
    }

    /// Waits until the control plane reports the placement balanced again — every healthy node
    /// settled, nothing left to hand back — with every node owning slots; returns the status.
    pub async fn wait_balanced(&self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let status = self.control_status().await;
            let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
            let all_own = nodes.len() == self.nodes.len()
                && nodes
                    .iter()
                    .all(|n| n["healthy"] == true && n["slotsOwned"].as_u64() > Some(0));
            if status["balanced"] == true && all_own {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "placement not balanced within {within:?}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every running node is ready and serving the placement.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut answers = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                if n.child.is_none() || n.paused {
                    continue;
                }
                let answer = match self.client.get(self.url(i, "/readyz")).send().await {
                    Ok(r) if r.status().is_success() => None,
                    Ok(r) => Some(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(answer) = answer {
                    answers.push(format!("{}: {answer}", n.name));
                }
            }
            if answers.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become ready within {within:?}; not ready: {answers:#?}\n{}",
                self.diagnosis()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What a failed wait prints: the test process's open descriptors and proxied connections
    /// (to tell a leak from a slow node), and from each node's log its last warnings and errors
    /// and its last lines.
    pub fn diagnosis(&self) -> String {
        // Reading may fail for want of descriptors, the very thing this looks for: say so.
        let descriptors = std::fs::read_dir("/proc/self/fd")
            .map_or_else(|e| format!("? ({e})"), |d| d.count().to_string());
        let mut out = format!(
            "test process: {descriptors} open file descriptors, {} connections through the proxy\n",
            self.proxy.active_connections()
        );
        let last = |lines: &[&str], n: usize| lines[lines.len().saturating_sub(n)..].join("\n");
        for n in &self.nodes {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", n.name)))
                .unwrap_or_else(|e| format!("(its log cannot be read: {e})"));
            let lines: Vec<&str> = log.lines().collect();
            let warnings: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .collect();
            out.push_str(&format!(
                "--- {} (running: {}, paused: {}), {} log lines, {} warnings or errors; the last of these:\n{}\n--- and its last lines:\n{}\n",
                n.name,
                n.child.is_some(),
                n.paused,
                lines.len(),
                warnings.len(),
                last(&warnings, 10),
                last(&lines, 3),
            ));
        }
        out
    }

    /// The ID of a named object.
    pub async fn id_of(&self, name: &str) -> String {
        for i in 0..self.nodes.len() {
            if let Ok(r) = self
                .client
                .post(self.url(i, "/v1/ns/default/ids"))
                .json(&json!({"name": name}))
                .send()
                .await
                && let Ok(v) = r.json::<Value>().await
                && let Some(id) = v["id"].as_str()
            {
                return id.to_string();
            }
        }
        panic!("no node answered for the ID of {name}");
    }

    /// Where an object lives now (its owner's index), as the control plane publishes it.
    pub async fn owner_of(&self, name: &str) -> usize {
        let id = self.id_of(name).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for i in 0..self.nodes.len() {
                if let Ok(r) = self
                    .client
                    .get(self.url(i, &format!("/v1/admin/locate/default/{id}")))
                    .send()
                    .await
                    && let Ok(v) = r.json::<Value>().await
                    && let Some(owner) = v["owner"].as_str()
                {
                    return self.index_of(owner);
                }
            }
            assert!(
                Instant::now() < deadline,
                "nobody could say where {name} lives"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Followers of the slot of an object.
    pub async fn followers_of(&self, name: &str) -> Vec<usize> {
        let id = self.id_of(name).await;
        for i in 0..self.nodes.len() {
            if let Ok(r) = self
                .client
                .get(self.url(i, &format!("/v1/admin/locate/default/{id}")))
                .send()
                .await
                && let Ok(v) = r.json::<Value>().await
                && let Some(fs) = v["followers"].as_array()
            {
                return fs
                    .iter()
                    .filter_map(|f| f.as_str())
                    .map(|f| self.index_of(f))
                    .collect();
            }
        }
        panic!("nobody could say who follows {name}");
    }

    /// Every `(node, colo, slot, epoch)` in which a node accepted writes as owner.
    pub fn ownership(&self) -> Vec<(String, String, u32, u64)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let Ok(text) = std::fs::read_to_string(n.data.join("data").join("ownership.log"))
            else {
                continue;
            };
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if let [node, colo, slot, epoch] = f[..]
                    && let (Ok(slot), Ok(epoch)) = (slot.parse(), epoch.parse())
                {
                    out.push((node.to_string(), colo.to_string(), slot, epoch));
                }
            }
        }
        out
    }

    /// Metric value from a node's /metrics (0 if absent).
    /// Node `i`'s metric `name`, which must be there.
    pub async fn required_metric(&self, i: usize, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url(i, "/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        metric_value(&text, name)
            .unwrap_or_else(|| panic!("{} has no metric {name}", self.nodes[i].name))
    }

    /// Node `i`'s metric `name`; 0 when the node does not answer or lacks it.
    pub async fn metric(&self, i: usize, name: &str) -> f64 {
        let Ok(r) = self.client.get(self.url(i, "/metrics")).send().await else {
            return 0.0;
        };
        let Ok(text) = r.text().await else { return 0.0 };
        metric_value(&text, name).unwrap_or(0.0)
    }
}

/// The value of the first sample of metric `name` in a Prometheus text exposition.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
