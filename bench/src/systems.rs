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
