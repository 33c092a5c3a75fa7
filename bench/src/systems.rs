//! Starting the systems under test as child processes on loopback.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed when dropped.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(name: &str, child: &mut Child, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{name} exited during start: {status}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{name} did not start listening on {addr}"))
}

/// A Colony node with one namespace, `default`, and otherwise default settings.
pub fn start_colony(binary: &Path, extra_yaml: &str) -> Result<Process, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port().map_err(|e| e.to_string())?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let config = dir.path().join("node.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {addr}\ndataDir: {}\nnamespaces: [{{name: default}}]\n{extra_yaml}",
            dir.path().join("data").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    wait_listening("colony-node", &mut child, addr)?;
    Ok(Process {
        child,
        addr,
        _dir: dir,
    })
}

/// workerd serving the benchmark's Durable Object class (bench/workerd/config.capnp).
pub fn start_workerd(binary: &Path, config: &Path) -> Result<Process, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port().map_err(|e| e.to_string())?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = Command::new(binary)
        .arg("serve")
        .arg(config)
        .arg(format!("--socket-addr=http={addr}"))
        .arg(format!(
            "--directory-path=do-storage={}",
            dir.path().display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    wait_listening("workerd", &mut child, addr)?;
    Ok(Process {
        child,
        addr,
        _dir: dir,
    })
}

/// `colony-node` next to this executable (both built by `cargo build --release`).
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The log filter of cluster processes: errors only, so their output does not drown the
/// figures, unless `COLONY_BENCH_NODE_LOG` asks for more (e.g. `info`) to see what happened.
fn node_log_filter() -> String {
    std::env::var("COLONY_BENCH_NODE_LOG").unwrap_or_else(|_| "error".to_string())
}

/// Starts a `colony-node` subcommand with the cluster log filter and waits until it listens
/// on `addr`.
fn spawn_colony(
    binary: &Path,
    args: &[std::ffi::OsString],
    what: &str,
    addr: SocketAddr,
) -> Result<Child, String> {
    let mut child = Command::new(binary)
        .args(args)
        .env("RUST_LOG", node_log_filter())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    wait_listening(what, &mut child, addr)?;
    Ok(child)
}

/// A local Colony cluster: `colony-node control` and `nodes` nodes on 127.0.0.1, one colo each
/// (so replicas spread over colos, as in production), all killed when dropped.
pub struct ColonyCluster {
    pub nodes: Vec<Process>,
    pub names: Vec<String>,
    configs: Vec<PathBuf>,
    binary: PathBuf,
    /// Dropped after the nodes (fields drop in order), so they never outlive it and complain.
    control: Process,
}

impl ColonyCluster {
    pub fn start(
        binary: &Path,
        nodes: usize,
        replicas: usize,
        write_quorum: usize,
        lease: Duration,
    ) -> Result<ColonyCluster, String> {
        let cdir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let cport = free_port().map_err(|e| e.to_string())?;
        let caddr: SocketAddr = ([127, 0, 0, 1], cport).into();
        let child = spawn_colony(
            binary,
            &[
                "control".into(),
                "--listen".into(),
                caddr.to_string().into(),
                "--region".into(),
                "bench".into(),
                "--lease".into(),
                format!("{}ms", lease.as_millis()).into(),
                "--replicas".into(),
                replicas.to_string().into(),
                "--write-quorum".into(),
                write_quorum.to_string().into(),
                "--expect-nodes".into(),
                nodes.to_string().into(),
            ],
            "colony-node control",
            caddr,
        )?;
        let control = Process {
            child,
            addr: caddr,
            _dir: cdir,
        };
        let keys = control._dir.path().join("keys");
        std::fs::create_dir_all(&keys).map_err(|e| e.to_string())?;
        std::fs::write(keys.join("default"), format!("{}\n", "5c".repeat(32)))
            .map_err(|e| e.to_string())?;
        let mut cluster = ColonyCluster {
            nodes: Vec::new(),
            names: Vec::new(),
            configs: Vec::new(),
            binary: binary.to_path_buf(),
            control,
        };
        for i in 0..nodes {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let port = free_port().map_err(|e| e.to_string())?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let name = format!("n{i}");
            let config = dir.path().join("node.yaml");
            std::fs::write(
                &config,
                format!(
                    "node: {{name: {name}, colo: c{i}, region: bench}}\nlisten: {addr}\ndataDir: {}\nkeysDir: {}\n\
                     namespaces: [{{name: default, replication: {{replicas: {replicas}, writeQuorum: {write_quorum}}}}}]\n\
                     cluster: {{control: http://{caddr}, leaseDuration: {}ms}}\n",
                    dir.path().join("data").display(),
                    keys.display(),
                    lease.as_millis()
                ),
            )
            .map_err(|e| e.to_string())?;
            let child = cluster.spawn_node(&config, addr)?;
            cluster.nodes.push(Process {
                child,
                addr,
                _dir: dir,
            });
            cluster.names.push(name);
            cluster.configs.push(config);
        }
        Ok(cluster)
    }

    fn spawn_node(&self, config: &Path, addr: SocketAddr) -> Result<Child, String> {
        spawn_colony(
            &self.binary,
            &["serve".into(), "--config".into(), config.into()],
            "colony-node",
            addr,
        )
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].child.kill();
        let _ = self.nodes[i].child.wait();
    }

    /// Starts node `i` again on its data.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        let child = self.spawn_node(&self.configs[i].clone(), self.nodes[i].addr)?;
        self.nodes[i].child = child;
        Ok(())
    }

    /// The control plane's address (`/v1/control/status`).
    pub fn control_addr(&self) -> SocketAddr {
        self.control.addr
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}
