//! Node configuration: a YAML file (what node pods get from a ConfigMap) plus environment
//! overrides (what the pod spec sets per pod), with defaults for everything else.
//!
//! ```yaml
//! node: { name: ams-0, colo: ams, region: eu }
//! listen: 0.0.0.0:8787
//! dataDir: /var/lib/colony
//! keysDir: /etc/colony/keys          # one file per namespace: hex keys, one per line, oldest first
//! namespaces:
//!   - name: chat
//!     limits: { maxValueBytes: 1MiB }
//! storage: { idleTimeout: 30s, memoryLimit: 256MiB }
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}={value:?} is not valid: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
    #[error("configuration is not valid: {0}")]
    Invalid(String),
}

/// A duration written like `30s`, `10m`, `30d` (humantime syntax).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("{s:?} is not a duration like \"30s\" or \"10m\": {e}"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte size written like `512MiB`, `2MB`, `100KB`, `10GB` or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like \"512MiB\" or \"2MB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" | "Ki" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" | "Mi" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" | "Gi" => 1 << 30,
            "TB" => 1_000_000_000_000,
            "TiB" | "Ti" => 1 << 40,
            other => {
                return Err(format!(
                    "{s:?}: unknown size unit {other:?} (use B, KB, KiB, MB, MiB, GB, GiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Who this node is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeIdentity {
    /// Unique within the region. Env: `COLONY_NODE_NAME`.
    pub name: String,
    /// Env: `COLONY_COLO`.
    pub colo: String,
    /// Env: `COLONY_REGION`.
    pub region: String,
}

impl Default for NodeIdentity {
    fn default() -> Self {
        NodeIdentity {
            name: "local-0".into(),
            colo: "local".into(),
            region: "local".into(),
        }
    }
}

/// Per-namespace limits. Going over any of them is a 4xx error that writes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    pub max_key_bytes: ByteSize,
    /// Key plus value, as stored.
    pub max_value_bytes: ByteSize,
    pub max_batch_keys: usize,
    pub max_statement_bytes: ByteSize,
    pub max_params: usize,
    /// Largest string, blob or row SQLite may hold.
    pub max_row_bytes: ByteSize,
    pub max_request_bytes: ByteSize,
    pub max_database_bytes: ByteSize,
    /// Wall-clock limit for one request's statements; the statement is interrupted and rolled back.
    pub request_time_limit: HumanDuration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: ByteSize(2 << 10),
            max_value_bytes: ByteSize(2 << 20),
            max_batch_keys: 128,
            max_statement_bytes: ByteSize(100_000),
            max_params: 100,
            max_row_bytes: ByteSize(2_000_000),
            max_request_bytes: ByteSize(32 << 20),
            max_database_bytes: ByteSize(10_000_000_000),
            request_time_limit: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// Replication settings of a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Replication {
    pub replicas: usize,
    pub write_quorum: usize,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            replicas: 5,
            write_quorum: 3,
        }
    }
}

/// One object namespace served by this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    /// The jurisdiction this namespace's objects are confined to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    #[serde(default)]
    pub replication: Replication,
    #[serde(default)]
    pub limits: Limits,
}

impl NamespaceConfig {
    pub fn named(name: &str) -> Self {
        NamespaceConfig {
            name: name.to_string(),
            jurisdiction: None,
            replication: Replication::default(),
            limits: Limits::default(),
        }
    }
}

/// How the node keeps objects in memory and on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StorageConfig {
    /// An object with no request for this long closes its database and frees its memory.
    pub idle_timeout: HumanDuration,
    /// Memory the node may use for open object databases; least recently used objects are
    /// closed beyond it. An open object holds about 80 KB in SQLite (its WAL index alone is 32
    /// KiB) and about 20 KB more elsewhere: the default 192 MiB keeps about 2,500 open, and the
    /// node near 500 MB resident after touching 100,000 objects.
    pub memory_limit: ByteSize,
    /// At most this many objects are open at once (each holds file descriptors).
    pub max_open_objects: usize,
    /// Size of one node-log segment file.
    pub log_segment_bytes: ByteSize,
    /// An object's SQLite WAL is checkpointed into its database file beyond this size.
    pub checkpoint_wal_bytes: ByteSize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            memory_limit: ByteSize(192 << 20),
            max_open_objects: 4096,
            log_segment_bytes: ByteSize(64 << 20),
            checkpoint_wal_bytes: ByteSize(4 << 20),
        }
    }
}

/// `cluster.control` value for nodes run by the Kubernetes operator: heartbeats are the node's
/// own Lease, the placement map a ConfigMap (see docs/control-plane.md).
pub const KUBERNETES_CONTROL: &str = "kubernetes";

/// Membership of a cluster. Without it the node is standalone: it owns every slot of its colo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterConfig {
    /// The control plane: `kubernetes` (the operator's Leases and placement ConfigMap), or the
    /// URL of a local coordinator (`http://127.0.0.1:9000`, what `dev` and the tests run).
    /// Env: `COLONY_CONTROL`.
    pub control: String,
    /// A node that has not renewed its heartbeat for this long loses its slots; it stops serving
    /// on its own somewhat before that. At least 2s.
    #[serde(default = "default_lease")]
    pub lease_duration: HumanDuration,
    /// Local address outgoing connections are bound to (on loopback, one address per node makes
    /// each node recognisable). Env: `COLONY_SOURCE_ADDRESS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<std::net::IpAddr>,
}

fn default_lease() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_slot_count() -> u32 {
    1024
}

/// The whole node configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default)]
    pub node: NodeIdentity,
    /// Env: `COLONY_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where other nodes reach this one (`host:port`); defaults to `listen`. Env:
    /// `COLONY_ADVERTISE_ADDRESS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,
    /// Env: `COLONY_DATA_DIR`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Directory with one file per namespace holding its ID keys (hex, one per line, oldest
    /// first), as mounted from a Secret. Env: `COLONY_KEYS_DIR`. When unset, keys are generated
    /// once and kept under `dataDir/keys` (local development).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_dir: Option<PathBuf>,
    /// File holding a token (as mounted from a Secret): when set, `/v1/admin` and `/v1/internal`
    /// answer only requests with `Authorization: Bearer <token>`, and this node sends it to its
    /// peers. Env: `COLONY_ADMIN_TOKEN_FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    pub namespaces: Vec<NamespaceConfig>,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Slots per colo when standalone (a cluster's placement map says how many it uses).
    #[serde(default = "default_slot_count")]
    pub slot_count: u32,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8787))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./colony-data")
}

impl NodeConfig {
    /// A local single-node configuration with one namespace, `default`.
    pub fn local(listen: SocketAddr, data_dir: PathBuf) -> Self {
        NodeConfig {
            node: NodeIdentity::default(),
            listen,
            advertise_address: None,
            data_dir,
            keys_dir: None,
            admin_token_file: None,
            namespaces: vec![NamespaceConfig::named("default")],
            storage: StorageConfig::default(),
            cluster: None,
            slot_count: default_slot_count(),
        }
    }

    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Applies `COLONY_*` environment overrides, read through `get` so tests need not touch the
    /// process environment.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("COLONY_NODE_NAME") {
            self.node.name = v;
        }
        if let Some(v) = get("COLONY_COLO") {
            self.node.colo = v;
        }
        if let Some(v) = get("COLONY_REGION") {
            self.node.region = v;
        }
        if let Some(v) = get("COLONY_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                    name: "COLONY_LISTEN",
                    value: v.clone(),
                    message: e.to_string(),
                })?;
        }
        if let Some(v) = get("COLONY_ADVERTISE_ADDRESS") {
            self.advertise_address = Some(v);
        }
        if let Some(v) = get("COLONY_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("COLONY_KEYS_DIR") {
            self.keys_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("COLONY_ADMIN_TOKEN_FILE") {
            self.admin_token_file = Some(PathBuf::from(v));
        }
        if let Some(v) = get("COLONY_CONTROL") {
            match self.cluster.as_mut() {
                Some(c) => c.control = v,
                None => {
                    self.cluster = Some(ClusterConfig {
                        control: v,
                        lease_duration: default_lease(),
                        source_address: None,
                    })
                }
            }
        }
        if let Some(v) = get("COLONY_SOURCE_ADDRESS") {
            let ip = v
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                    name: "COLONY_SOURCE_ADDRESS",
                    value: v.clone(),
                    message: e.to_string(),
                })?;
            if let Some(c) = self.cluster.as_mut() {
                c.source_address = Some(ip);
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        // A cluster node may start before any namespace exists (it waits for one); a standalone
        // node without a namespace could serve nothing.
        if self.namespaces.is_empty() && self.cluster.is_none() {
            return bad("at least one namespace must be configured".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for ns in &self.namespaces {
            if !valid_name(&ns.name) {
                return bad(format!(
                    "namespace name {:?} must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit",
                    ns.name
                ));
            }
            if !seen.insert(&ns.name) {
                return bad(format!("namespace {:?} is listed twice", ns.name));
            }
            let r = &ns.replication;
            if r.replicas == 0 || r.write_quorum == 0 || r.write_quorum > r.replicas {
                return bad(format!(
                    "namespace {:?}: need 1 <= writeQuorum ({}) <= replicas ({})",
                    ns.name, r.write_quorum, r.replicas
                ));
            }
            if ns.limits.max_batch_keys == 0 {
                return bad(format!(
                    "namespace {:?}: maxBatchKeys must be at least 1",
                    ns.name
                ));
            }
        }
        for (what, v) in [
            ("node.name", &self.node.name),
            ("node.colo", &self.node.colo),
            ("node.region", &self.node.region),
        ] {
            if v.is_empty() {
                return bad(format!("{what} must not be empty"));
            }
        }
        if self.storage.max_open_objects == 0 {
            return bad("storage.maxOpenObjects must be at least 1".into());
        }
        if self.storage.log_segment_bytes.0 < 1 << 20 {
            return bad("storage.logSegmentBytes must be at least 1MiB".into());
        }
        if self.slot_count == 0 || self.slot_count > 65536 {
            return bad(format!(
                "slotCount must be between 1 and 65536, not {}",
                self.slot_count
            ));
        }
        if let Some(c) = &self.cluster {
            if c.lease_duration.0 < Duration::from_secs(2) {
                return bad(format!(
                    "cluster.leaseDuration must be at least 2s, not {}",
                    c.lease_duration
                ));
            }
            if !c.control.starts_with("http://") && c.control != KUBERNETES_CONTROL {
                return bad(format!(
                    "cluster.control must be `kubernetes` or the URL of a local control plane (http://host:port), not {:?}",
                    c.control
                ));
            }
        }
        Ok(())
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceConfig> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    pub fn advertised(&self) -> String {
        self.advertise_address
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// Namespace names follow Kubernetes' DNS label rules, so an `ObjectNamespace` name is always a
/// valid Colony namespace name and vice versa.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!("512MiB".parse::<ByteSize>(), Ok(ByteSize(512 << 20)));
        assert_eq!("2MB".parse::<ByteSize>(), Ok(ByteSize(2_000_000)));
        assert_eq!("100".parse::<ByteSize>(), Ok(ByteSize(100)));
        assert!(
            "12XB"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!("lots".parse::<ByteSize>().is_err());
        assert_eq!(
            "30s".parse::<HumanDuration>(),
            Ok(HumanDuration(Duration::from_secs(30)))
        );
        assert_eq!(
            "30d".parse::<HumanDuration>(),
            Ok(HumanDuration(Duration::from_secs(30 * 86400)))
        );
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn yaml_fills_defaults_and_env_overrides() {
        let yaml = "namespaces:\n  - name: chat\n    limits: { maxValueBytes: 1MiB }\nstorage: { idleTimeout: 5s }\n";
        let mut c = NodeConfig::from_yaml(yaml, Path::new("c.yaml")).expect("parses");
        assert_eq!(c.namespaces[0].limits.max_value_bytes, ByteSize(1 << 20));
        assert_eq!(c.namespaces[0].limits.max_batch_keys, 128);
        assert_eq!(
            c.namespaces[0].replication,
            Replication {
                replicas: 5,
                write_quorum: 3
            }
        );
        assert_eq!(
            c.storage.idle_timeout,
            HumanDuration(Duration::from_secs(5))
        );
        let env: HashMap<&str, &str> = [
            ("COLONY_LISTEN", "127.0.0.9:9000"),
            ("COLONY_NODE_NAME", "ams-2"),
        ]
        .into();
        c.apply_env(|k| env.get(k).map(|v| v.to_string()))
            .expect("env applies");
        assert_eq!(c.listen.to_string(), "127.0.0.9:9000");
        assert_eq!(c.node.name, "ams-2");
        c.validate().expect("valid");
    }

    #[test]
    fn bad_configuration_is_refused_with_the_reason() {
        let err = NodeConfig::from_yaml("namespaces: []\nbogus: 1\n", Path::new("c.yaml"))
            .expect_err("unknown field");
        assert!(err.to_string().contains("bogus"), "{err}");
        let c = NodeConfig::from_yaml("namespaces: []\n", Path::new("c.yaml")).expect("parses");
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("at least one namespace")
        );
        let c = NodeConfig::from_yaml(
            "namespaces: [{name: a, replication: {replicas: 3, writeQuorum: 4}}]\n",
            Path::new("c.yaml"),
        )
        .expect("parses");
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("writeQuorum")
        );
        let c = NodeConfig::from_yaml("namespaces: [{name: Bad_Name}]\n", Path::new("c.yaml"))
            .expect("parses");
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("namespace name")
        );
        let mut c = NodeConfig::local(default_listen(), default_data_dir());
        let err = c.apply_env(|k| (k == "COLONY_LISTEN").then(|| "nowhere".to_string()));
        assert!(matches!(
            err,
            Err(ConfigError::Env {
                name: "COLONY_LISTEN",
                ..
            })
        ));
    }
}
