//! Operator-wide settings (command-line flags) that the builders and reconcilers read.

use std::time::Duration;

/// The field manager of every server-side apply (and every write) the operator makes.
pub const FIELD_MANAGER: &str = "colony-operator";
/// The node's HTTP port (API, admin, health, metrics).
pub const NODE_PORT: i32 = 8787;
/// The shortest node lease the node itself accepts (`cluster.leaseDuration`).
pub const MIN_NODE_LEASE: Duration = Duration::from_secs(2);

/// `imagePullPolicy` of node pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    #[value(name = "Always")]
    Always,
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    #[value(name = "Never")]
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Node image for Colos that do not name one.
    pub node_image: String,
    pub image_pull_policy: Option<PullPolicy>,
    /// The nodes' lease duration: rendered into their configuration (so their Leases state it),
    /// and assumed for a node Lease that does not state one.
    pub node_lease_duration: Duration,
    /// How often each region's leases are observed and placement is reconsidered.
    pub observe_interval: Duration,
    /// Timeout of one node admin call.
    pub admin_timeout: Duration,
    /// At most this many planned hand-offs run at once per region.
    pub max_concurrent_handoffs: usize,
    /// At most this many slots per region change membership (learners catching up, members
    /// leaving) at once; bounds catch-up traffic and the admin calls of one pass.
    pub max_membership_changes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            node_image: "ghcr.io/colony-dev/colony-node:latest".to_string(),
            image_pull_policy: None,
            node_lease_duration: Duration::from_secs(15),
            observe_interval: Duration::from_secs(5),
            admin_timeout: Duration::from_secs(10),
            max_concurrent_handoffs: 16,
            max_membership_changes: 64,
        }
    }
}

impl Settings {
    /// The most one reconcile (a region pass included) may take: a few admin calls in a row
    /// plus the API requests around them. Acting is cut off when it is reached.
    pub fn work_timeout(&self) -> Duration {
        self.admin_timeout * 3 + Duration::from_secs(30)
    }

    /// Refuses settings that cannot work: a lease the node refuses, or one so short that a node
    /// could be declared failed between two observations.
    pub fn check(&self) -> Result<(), String> {
        if self.node_lease_duration < MIN_NODE_LEASE {
            return Err(format!(
                "the node lease duration must be at least {MIN_NODE_LEASE:?}, not {:?}",
                self.node_lease_duration
            ));
        }
        if self.observe_interval.is_zero() {
            return Err("the observe interval must not be zero".to_string());
        }
        if self.node_lease_duration < self.observe_interval * 3 {
            return Err(format!(
                "the node lease duration ({:?}) must be at least three observe intervals ({:?})",
                self.node_lease_duration, self.observe_interval
            ));
        }
        if self.admin_timeout.is_zero() {
            return Err("the admin timeout must not be zero".to_string());
        }
        if self.max_concurrent_handoffs == 0 || self.max_membership_changes == 0 {
            return Err("hand-off and membership-change limits must be at least 1".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_shorter_than_the_node_accepts_or_than_three_observations_is_refused() {
        assert_eq!(Settings::default().check(), Ok(()));
        let short = Settings {
            node_lease_duration: Duration::from_secs(1),
            observe_interval: Duration::from_millis(100),
            ..Settings::default()
        };
        assert!(short.check().unwrap_err().contains("at least 2s"));
        let slow = Settings {
            node_lease_duration: Duration::from_secs(10),
            observe_interval: Duration::from_secs(5),
            ..Settings::default()
        };
        assert!(
            slow.check()
                .unwrap_err()
                .contains("three observe intervals")
        );
    }
}
