//! Test harness: real `colony-node` processes on loopback, each with its own data directory.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_colony-node"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A node process. Killed (SIGKILL) when dropped.
pub struct TestNode {
    pub child: Option<Child>,
    pub port: u16,
    pub data: PathBuf,
    pub args: Vec<String>,
    pub client: reqwest::Client,
    /// The node's open-file limit (`RLIMIT_NOFILE`), when not inherited.
    pub file_limit: Option<u64>,
    _dir: Option<tempfile::TempDir>,
}

/// The configuration most tests run with: two namespaces, small log segments (tests create many
/// nodes; each preallocates its segments).
pub const DEFAULT_YAML: &str = "listen: {listen}
dataDir: {data}
namespaces:
  - name: default
  - name: other
storage:
  logSegmentBytes: 4MiB
";

impl TestNode {
    /// A node with [`DEFAULT_YAML`].
    pub async fn new() -> TestNode {
        Self::serve(DEFAULT_YAML).await
    }

    /// `colony-node dev` with extra arguments (e.g. `--namespace x`).
    pub async fn dev(extra: &[&str]) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let port = free_port();
        let mut args = vec![
            "dev".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node = TestNode {
            child: None,
            port,
            data,
            args,
            client: client(),
            file_limit: None,
            _dir: Some(dir),
        };
        node.start().await;
        node
    }

    /// `colony-node serve` with a YAML configuration; `{listen}` and `{data}` are filled in.
    pub async fn serve(yaml: &str) -> TestNode {
        let mut node = Self::configured(yaml);
        node.start().await;
        node
    }

    /// Like [`TestNode::serve`], not started yet (to prepare its data directory first).
    pub fn configured(yaml: &str) -> TestNode {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let port = free_port();
        let config = dir.path().join("node.yaml");
        let text = yaml
            .replace("{listen}", &format!("127.0.0.1:{port}"))
            .replace("{data}", &data.display().to_string());
        std::fs::write(&config, text).expect("write config");
        let args = vec![
            "serve".to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        TestNode {
            child: None,
            port,
            data,
            args,
            client: client(),
            file_limit: None,
            _dir: Some(dir),
        }
    }

    pub async fn start(&mut self) {
        let mut command = Command::new(binary());
        command
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(limit) = self.file_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command.spawn().expect("spawn colony-node");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.client.get(self.url("/healthz")).send().await
                && r.status().is_success()
            {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("colony-node exited during start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "colony-node did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.start().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn obj(&self, ns: &str, name: &str, rest: &str) -> String {
        self.url(&format!("/v1/ns/{ns}/names/{name}{rest}"))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        status_json(r).await
    }

    pub async fn sql(&self, name: &str, sql: &str, params: Value) -> (u16, Value) {
        self.post(
            &format!("/v1/ns/default/names/{name}/sql"),
            json!({"sql": sql, "params": params}),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        status_json(r).await
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

pub async fn status_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
}

/// Asserts an error response: status and code.
#[track_caller]
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "unexpected status, body: {}", got.1);
    assert_eq!(got.1["error"]["code"], code, "unexpected error: {}", got.1);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error without a message: {}",
        got.1
    );
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out
}
