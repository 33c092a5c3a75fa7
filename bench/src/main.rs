//! `colony-bench`: benchmark programs for Colony. Each prints its figures and, where a peer
//! system is named, the peer's figures from the same run on the same machine, as ratios.
//!
//! Run it through `scripts/bench`, which builds in release mode and installs the peers.

mod cluster;
mod etcd;
mod load;
mod single;
mod systems;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "colony-bench", about = "Benchmarks for Colony")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One node: SQL increments and reads over keep-alive HTTP, against workerd; RSS after
    /// touching many objects.
    Single {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Measurements per workload and system; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Objects in workload (c).
        #[arg(long, default_value_t = 1000)]
        objects: u64,
        /// The colony-node binary (default: next to this one).
        #[arg(long)]
        node: Option<PathBuf>,
        /// The workerd binary; without it only Colony is measured.
        #[arg(long)]
        workerd: Option<PathBuf>,
        /// RSS milestones, in objects touched (comma separated; 0 to skip).
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        rss_objects: Vec<u64>,
        /// Also measure workerd's RSS after touching this many objects (slow: workerd creates
        /// about 55 objects/s here).
        #[arg(long)]
        peer_rss_objects: Option<u64>,
        /// Workloads to run, by letter (a-d; comma separated; default all).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<char>,
    },
    /// Replication: its cost (1 node vs 5 nodes at quorum 3), Colony against a 3-member etcd
    /// cluster on the same write workloads, and failover time after kill -9 of an owner.
    Cluster {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Measurements per workload and system; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The colony-node binary (default: next to this one).
        #[arg(long)]
        node: Option<PathBuf>,
        /// The etcd binary; without it the etcd comparison is skipped.
        #[arg(long)]
        etcd: Option<PathBuf>,
        /// Owner kills per lease duration in the failover section.
        #[arg(long, default_value_t = 10)]
        failover_trials: usize,
        /// Lease durations for the failover section (comma separated).
        #[arg(long, value_delimiter = ',', default_value = "10s,2s", value_parser = humantime::parse_duration)]
        leases: Vec<Duration>,
        /// Sections to run (replication, etcd, failover; comma separated; default all).
        #[arg(long, value_delimiter = ',')]
        sections: Vec<String>,
        /// Replication-cost workloads to run, by letter (a-h; comma separated; default all).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<char>,
    },
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("colony-bench: {e}");
            std::process::exit(1);
        }
    };
    let result = match cli.command {
        Command::Single {
            duration,
            runs,
            connections,
            objects,
            node,
            workerd,
            rss_objects,
            peer_rss_objects,
            workloads,
        } => runtime.block_on(single::run(single::Options {
            duration: Duration::from_secs(duration),
            runs: runs.max(1),
            connections,
            objects,
            node: node.unwrap_or_else(|| systems::sibling_binary("colony-node")),
            workerd,
            workerd_config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workerd/config.capnp"),
            rss_objects: rss_objects.into_iter().filter(|&n| n > 0).collect(),
            peer_rss_objects,
            workloads,
        })),
        Command::Cluster {
            duration,
            runs,
            node,
            etcd,
            failover_trials,
            leases,
            sections,
            workloads,
        } => runtime.block_on(cluster::run(cluster::Options {
            duration: Duration::from_secs(duration),
            runs: runs.max(1),
            node: node.unwrap_or_else(|| systems::sibling_binary("colony-node")),
            etcd,
            failover_trials,
            leases,
            sections,
            workloads,
        })),
    };
    if let Err(e) = result {
        eprintln!("colony-bench: {e}");
        std::process::exit(1);
    }
}
