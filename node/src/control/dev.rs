//! `colony-node dev --colos N --nodes-per-colo M`: a local cluster on loopback — a control plane
//! in this process and every node its own `colony-node serve` process with its own data
//! directory and port.

use super::admin_client::HttpNodeAdmin;
use super::coordinator::{Coordinator, CoordinatorConfig};
use crate::cluster::peer_client::PeerClient;
use crate::config::{
    ClusterConfig, HumanDuration, NamespaceConfig, NodeConfig, NodeIdentity, Replication,
};
use crate::keys;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

/// Colo names used by `dev`, in order.
pub const DEV_COLOS: [&str; 8] = ["ams", "fra", "lhr", "cdg", "mad", "waw", "arn", "mxp"];

pub struct DevCluster {
    pub colos: usize,
    pub nodes_per_colo: usize,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub namespaces: Vec<String>,
    pub lease: Duration,
    pub replicas: usize,
    pub write_quorum: usize,
}

/// Where a dev node runs and what it talks to.
struct NodePlace<'a> {
    name: &'a str,
    colo: &'a str,
    listen: SocketAddr,
    data_dir: &'a Path,
    keys_dir: &'a Path,
    control: SocketAddr,
}

impl DevCluster {
    /// The configuration file of one dev node.
    fn node_config(&self, place: &NodePlace<'_>) -> NodeConfig {
        let replication = Replication {
            replicas: self.replicas,
            write_quorum: self.write_quorum,
        };
        let mut c = NodeConfig::local(place.listen, place.data_dir.to_path_buf());
        c.node = NodeIdentity {
            name: place.name.to_string(),
            colo: place.colo.to_string(),
            region: "local".to_string(),
        };
        c.keys_dir = Some(place.keys_dir.to_path_buf());
        c.namespaces = self
            .namespaces
            .iter()
            .map(|n| NamespaceConfig {
                replication: replication.clone(),
                ..NamespaceConfig::named(n)
            })
            .collect();
        c.cluster = Some(ClusterConfig {
            control: format!("http://{}", place.control),
            lease_duration: HumanDuration(self.lease),
            source_address: None,
        });
        c
    }
}

struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl DevCluster {
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
        if self.colos == 0 || self.colos > DEV_COLOS.len() || self.nodes_per_colo == 0 {
            return Err(format!(
                "--colos must be 1 to {} and --nodes-per-colo at least 1",
                DEV_COLOS.len()
            ));
        }
        let total = self.colos * self.nodes_per_colo;
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|e| format!("{}: {e}", self.data_dir.display()))?;
        let keys_dir = self.data_dir.join("keys");
        for ns in &self.namespaces {
            keys::load_or_generate(&keys_dir, ns).map_err(|e| e.to_string())?;
        }
        let ip = self.listen.ip();
        let base = self.listen.port();
        let control_addr = SocketAddr::new(ip, base + total as u16);
        let coordinator = Coordinator::new(
            CoordinatorConfig {
                region: "local".into(),
                lease: self.lease,
                slot_count: 1024,
                replicas: self.replicas,
                write_quorum: self.write_quorum,
                expect_nodes: total,
                state_file: Some(self.data_dir.join("placement.json")),
            },
            Arc::new(HttpNodeAdmin::new(
                PeerClient::new(None),
                Duration::from_secs(2),
            )),
        );
        let listener = tokio::net::TcpListener::bind(control_addr)
            .await
            .map_err(|e| format!("cannot listen on {control_addr}: {e}"))?;
        let router = super::router(coordinator.clone());
        tokio::spawn(async move {
            let _ = axum::serve(crate::server::without_nagle(listener), router).await;
        });
        tokio::spawn(coordinator.clone().run());

        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find colony-node itself: {e}"))?;
        let mut children = Children(Vec::new());
        let mut lines = Vec::new();
        for (c, colo) in DEV_COLOS.iter().take(self.colos).enumerate() {
            for i in 0..self.nodes_per_colo {
                let name = format!("{colo}-{i}");
                let port = base + (c * self.nodes_per_colo + i) as u16;
                let listen = SocketAddr::new(ip, port);
                let dir = self.data_dir.join(&name);
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let config = self.node_config(&NodePlace {
                    name: &name,
                    colo,
                    listen,
                    data_dir: &dir.join("data"),
                    keys_dir: &keys_dir,
                    control: control_addr,
                });
                let path = dir.join("node.yaml");
                let yaml = serde_yaml::to_string(&config).map_err(|e| e.to_string())?;
                std::fs::write(&path, yaml).map_err(|e| format!("{}: {e}", path.display()))?;
                let child = Command::new(&exe)
                    .arg("serve")
                    .arg("--config")
                    .arg(&path)
                    .spawn()
                    .map_err(|e| format!("cannot start node {name}: {e}"))?;
                children.0.push((name.clone(), child));
                lines.push(format!("  {name:<8} colo {colo}  http://{listen}"));
            }
        }
        crate::cli::say!(
            "Colony dev cluster: {total} nodes in {} colos of region \"local\", replicas {} / write quorum {}, lease {:?}",
            self.colos,
            self.replicas,
            self.write_quorum,
            self.lease
        );
        crate::cli::say!("  control  http://{control_addr}/v1/control/status");
        for l in &lines {
            crate::cli::say!("{l}");
        }
        crate::cli::say!(
            "Any node accepts any request and forwards it to the object's owner. Ctrl-C stops the cluster."
        );
        tokio::pin!(shutdown);
        let mut watch = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = watch.tick() => {
                    for (name, child) in &mut children.0 {
                        if let Ok(Some(status)) = child.try_wait() {
                            eprintln!("colony-node dev: node {name} exited ({status}); the others take over its slots");
                        }
                    }
                    children.0.retain_mut(|(_, c)| matches!(c.try_wait(), Ok(None)));
                }
            }
        }
        drop(children);
        Ok(())
    }
}
