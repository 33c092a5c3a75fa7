//! `colony-operator`: run the operator, or print the CRDs it serves.

use clap::{Parser, Subcommand};
use colony_node::cluster::kubernetes::NAMESPACE_FILE;
use colony_operator::leader::identity;
use colony_operator::run::{RunOptions, run};
use colony_operator::settings::{PullPolicy, Settings};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "colony-operator",
    version,
    about = "Colony's Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML) generated from the Rust types.
    Crds,
    /// Run the operator (the default).
    Run,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Node image for Colos that do not name one.
    #[arg(
        long,
        env = "COLONY_NODE_IMAGE",
        default_value = "ghcr.io/colony-dev/colony-node:latest"
    )]
    node_image: String,
    /// imagePullPolicy of node pods; the cluster default when unset.
    #[arg(long, env = "COLONY_NODE_IMAGE_PULL_POLICY", value_enum)]
    node_image_pull_policy: Option<PullPolicy>,
    /// The nodes' lease duration (written into their configuration; at least 2s and three
    /// observe intervals): a node whose Lease stays unrenewed this long fails over.
    #[arg(long, env = "COLONY_NODE_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    node_lease_duration: Duration,
    /// How often each region's node Leases are observed.
    #[arg(long, env = "COLONY_OBSERVE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    observe_interval: Duration,
    /// Timeout of one call to a node's admin API.
    #[arg(long, env = "COLONY_ADMIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    admin_timeout: Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "COLONY_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "COLONY_LEADER_LEASE", default_value = "colony-operator")]
    leader_lease: String,
    /// Namespace of the leader-election Lease (the operator's own); the service account's
    /// namespace when unset.
    #[arg(long, env = "POD_NAMESPACE")]
    leader_namespace: Option<String>,
    /// This replica's identity in the leader Lease; the host name with a random suffix when
    /// unset (never a shared constant).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Leader election lease (at least 2s); the leader renews it every sixth and stops acting
    /// two thirds of it after its last successful renewal.
    #[arg(long, env = "COLONY_LEADER_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    leader_lease_duration: Duration,
    /// At most this many planned hand-offs run at once per region.
    #[arg(long, env = "COLONY_MAX_CONCURRENT_HANDOFFS", default_value_t = 16)]
    max_concurrent_handoffs: usize,
    /// At most this many slots per region change replicas at once.
    #[arg(long, env = "COLONY_MAX_MEMBERSHIP_CHANGES", default_value_t = 64)]
    max_membership_changes: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crds) => match colony_operator::crd::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("colony-operator: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Run) | None => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let a = cli.run;
            let settings = Settings {
                node_image: a.node_image,
                image_pull_policy: a.node_image_pull_policy,
                node_lease_duration: a.node_lease_duration,
                observe_interval: a.observe_interval,
                admin_timeout: a.admin_timeout,
                max_concurrent_handoffs: a.max_concurrent_handoffs,
                max_membership_changes: a.max_membership_changes,
            };
            let leader_namespace = match a.leader_namespace.filter(|n| !n.is_empty()) {
                Some(ns) => ns,
                None => match std::fs::read_to_string(NAMESPACE_FILE) {
                    Ok(ns) if !ns.trim().is_empty() => ns.trim().to_string(),
                    _ => {
                        tracing::error!(
                            "cannot tell the operator's namespace: set POD_NAMESPACE or --leader-namespace"
                        );
                        return ExitCode::FAILURE;
                    }
                },
            };
            let opts = RunOptions {
                settings,
                listen: a.listen,
                leader_lease: a.leader_lease,
                leader_namespace,
                identity: identity(a.identity),
                leader_duration: a.leader_lease_duration,
            };
            match run(opts).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
