//! The `colony-node` command line.

use crate::config::{NamespaceConfig, NodeConfig};
use crate::server;
use clap::{Parser, Subcommand};
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
        Command::Dev {
            listen,
            data_dir,
            namespaces,
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

/// Runs the command; the process exit code.
pub async fn run(cli: Cli) -> i32 {
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
    println!(
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
