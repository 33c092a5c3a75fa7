//! The `colony-node` command line.

use crate::config::{HumanDuration, NamespaceConfig, NodeConfig};
use crate::server;
use clap::{Parser, Subcommand};

/// Prints a line to stdout, ignoring a closed stdout: a node must not die because whoever started
/// it stopped reading its output.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use say;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "colony-node",
    version,
    about = "Colony node: durable objects with their own SQLite databases"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one node from a configuration file and COLONY_* environment variables (what node
    /// pods run).
    Serve {
        /// YAML configuration file.
        #[arg(long, short, env = "COLONY_CONFIG")]
        config: PathBuf,
    },
    /// Run Colony locally with development defaults: one node, namespace `default`, data under
    /// ./colony-data, ID keys generated on first start.
    Dev {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: SocketAddr,
        /// Where object databases, the node log and ID keys live.
        #[arg(long, default_value = "./colony-data")]
        data_dir: PathBuf,
        /// Namespaces to serve (repeatable).
        #[arg(long = "namespace", default_value = "default")]
        namespaces: Vec<String>,
        /// Run a local cluster of this many colos (one region) instead of a single node; each
        /// node is its own process, on consecutive ports from --listen.
        #[arg(long)]
        colos: Option<usize>,
        /// Nodes per colo in a local cluster.
        #[arg(long, default_value_t = 2)]
        nodes_per_colo: usize,
        /// Heartbeat lease of cluster nodes (at least 2s).
        #[arg(long, default_value = "10s")]
        lease: HumanDuration,
        /// Replicas of each slot (owner included) in a cluster.
        #[arg(long, default_value_t = 5)]
        replicas: usize,
        /// Acknowledged once this many replicas hold a write.
        #[arg(long, default_value_t = 3)]
        write_quorum: usize,
    },
    /// Run a local control plane: nodes heartbeat to it and learn the placement map from it.
    Control {
        #[arg(long, default_value = "127.0.0.1:9787")]
        listen: SocketAddr,
        /// Where the placement map is kept across restarts.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "local")]
        region: String,
        #[arg(long, default_value = "10s")]
        lease: HumanDuration,
        /// Slots per colo.
        #[arg(long, default_value_t = 1024)]
        slots: u32,
        #[arg(long, default_value_t = 5)]
        replicas: usize,
        #[arg(long, default_value_t = 3)]
        write_quorum: usize,
        /// Wait for this many nodes before placing slots (at most 30 s).
        #[arg(long, default_value_t = 1)]
        expect_nodes: usize,
        /// Local address for connections to the nodes (tests tell parties apart by address).
        #[arg(long)]
        source_address: Option<std::net::IpAddr>,
        /// File with the nodes' admin token, sent on admin calls.
        #[arg(long, env = "COLONY_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
    },
}

/// Builds the configuration a command runs with.
pub fn config_for(command: &Command) -> Result<NodeConfig, crate::config::ConfigError> {
    match command {
        Command::Serve { config } => {
            let mut c = NodeConfig::load(config)?;
            c.apply_env(|k| std::env::var(k).ok())?;
            c.validate()?;
            Ok(c)
        }
        Command::Control { .. } => Err(crate::config::ConfigError::Invalid(
            "the control plane has no node configuration".into(),
        )),
        Command::Dev {
            listen,
            data_dir,
            namespaces,
            ..
        } => {
            let mut c = NodeConfig::local(*listen, data_dir.clone());
            c.namespaces = namespaces
                .iter()
                .map(|n| NamespaceConfig::named(n))
                .collect();
            c.validate()?;
            Ok(c)
        }
    }
}

async fn run_control(
    listen: SocketAddr,
    client: crate::cluster::peer_client::PeerClient,
    cfg: crate::control::coordinator::CoordinatorConfig,
) -> i32 {
    use crate::control::admin_client::HttpNodeAdmin;
    use crate::control::coordinator::Coordinator;
    if let Some(dir) = cfg.state_file.as_ref().and_then(|p| p.parent())
        && let Err(e) = std::fs::create_dir_all(dir)
    {
        eprintln!("colony-node: {}: {e}", dir.display());
        return 1;
    }
    let admin = std::sync::Arc::new(HttpNodeAdmin::new(
        client,
        std::time::Duration::from_secs(2),
    ));
    let coordinator = Coordinator::new(cfg, admin);
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("colony-node: cannot listen on {listen}: {e}");
            return 1;
        }
    };
    say!("colony-node control plane listening on http://{listen}");
    tokio::spawn(coordinator.clone().run());
    match axum::serve(
        crate::server::without_nagle(listener),
        crate::control::router(coordinator),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("colony-node: control plane: {e}");
            1
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn check_lease(lease: &HumanDuration) -> Result<(), String> {
    if lease.0 < std::time::Duration::from_secs(2) {
        return Err(format!("--lease must be at least 2s, not {lease}"));
    }
    Ok(())
}

/// Runs the command; the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match &cli.command {
        Command::Dev {
            listen,
            data_dir,
            namespaces,
            colos: Some(colos),
            nodes_per_colo,
            lease,
            replicas,
            write_quorum,
        } => {
            if let Err(e) = check_lease(lease) {
                eprintln!("colony-node: {e}");
                return 2;
            }
            if *write_quorum == 0 || write_quorum > replicas {
                eprintln!(
                    "colony-node: need 1 <= --write-quorum ({write_quorum}) <= --replicas ({replicas})"
                );
                return 2;
            }
            let cluster = crate::control::dev::DevCluster {
                colos: *colos,
                nodes_per_colo: *nodes_per_colo,
                listen: *listen,
                data_dir: data_dir.clone(),
                namespaces: namespaces.clone(),
                lease: lease.0,
                replicas: *replicas,
                write_quorum: *write_quorum,
            };
            return match cluster.run(shutdown_signal()).await {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("colony-node: {e}");
                    1
                }
            };
        }
        Command::Control {
            listen,
            data_dir,
            region,
            lease,
            slots,
            replicas,
            write_quorum,
            expect_nodes,
            source_address,
            admin_token_file,
        } => {
            if let Err(e) = check_lease(lease) {
                eprintln!("colony-node: {e}");
                return 2;
            }
            let token = match admin_token_file
                .as_ref()
                .map(std::fs::read_to_string)
                .transpose()
            {
                Ok(t) => t.map(|t| t.trim().to_string()),
                Err(e) => {
                    eprintln!("colony-node: cannot read the admin token: {e}");
                    return 2;
                }
            };
            return run_control(
                *listen,
                crate::cluster::peer_client::PeerClient::with_token(
                    *source_address,
                    token.as_deref(),
                ),
                crate::control::coordinator::CoordinatorConfig {
                    region: region.clone(),
                    lease: lease.0,
                    slot_count: *slots,
                    replicas: *replicas,
                    write_quorum: *write_quorum,
                    expect_nodes: *expect_nodes,
                    state_file: data_dir.as_ref().map(|d| d.join("placement.json")),
                },
            )
            .await;
        }
        _ => {}
    }
    let config = match config_for(&cli.command) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("colony-node: {e}");
            return 2;
        }
    };
    let (node, listener) = match server::start(config).await {
        Ok(started) => started,
        Err(e) => {
            eprintln!("colony-node: {e}");
            return 1;
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| node.config.listen.to_string(), |a| a.to_string());
    let mut names: Vec<&str> = node.namespaces.keys().map(String::as_str).collect();
    names.sort();
    say!(
        "colony-node {} listening on http://{addr} (data in {}, namespaces: {})",
        node.config.node.name,
        node.config.data_dir.display(),
        names.join(", ")
    );
    if let Err(e) = server::serve(node, listener, shutdown_signal()).await {
        eprintln!("colony-node: server error: {e}");
        return 1;
    }
    0
}
