//! The custom resources (group `colony.dev`, version `v1alpha1`) and the CRDs generated from them.
//!
//! Validation that needs only the object itself lives in the schema (OpenAPI plus CEL rules, so
//! the API server refuses bad specs at admission); validation that needs the cluster's state (does
//! the jurisdiction have enough nodes?) is reported as a `Ready=False` condition by the reconcilers.

// `printcolumn(name = .., type_ = ..)` repeats keys across columns, which clippy mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "colony.dev";
pub const VERSION: &str = "v1alpha1";

/// A DNS label: what region names must look like.
const DNS_LABEL: &str = "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
/// An ObjectNamespace name is a Colony namespace name: exactly what
/// `colony_node::config::valid_name` accepts (a DNS label).
const NAMESPACE_NAME: &str = "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
const NAMESPACE_NAME_MSG: &str = "an ObjectNamespace name must be a DNS label: at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit";
/// A Colo name names a Service (DNS-1035 label: starts with a letter) and a StatefulSet, whose
/// pods carry the label `controller-revision-hash: <name>-<10 characters>` (at most 63).
const COLO_NAME: &str =
    "size(self.metadata.name) <= 52 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
const COLO_NAME_MSG: &str = "a Colo name must be at most 52 lower-case letters, digits and '-', starting with a letter and ending with a letter or digit (it names a Service and a StatefulSet)";
/// Longest Colo name (see [`COLO_NAME`]).
pub const MAX_COLO_NAME: usize = 52;
const DNS_LABEL_MSG: &str = "must be a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit";
const DURATION: &str = "self.matches('^[0-9]+(s|m|h|d)$')";
const SIZE: &str = "self.matches('^[0-9]+(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?$')";
const SIZE_MSG: &str = "must be a size like \"16MiB\", \"2MB\" or a plain number of bytes";

/// One status condition, keyed by `type` (`Ready`, `Progressing`, `Degraded`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word a program can match on.
    pub reason: String,
    /// What a person needs to know.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Colo

/// A location: a pool of node pods (one StatefulSet) in a region.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "colony.dev",
    version = "v1alpha1",
    kind = "Colo",
    namespaced,
    status = "ColoStatus",
    shortname = "colo",
    category = "colony",
    annotation("helm.sh/resource-policy", "keep"),
    derive = "PartialEq",
    doc = "A Colony location: a pool of node pods in one region",
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".spec.nodes"),
    printcolumn(
        name = "Ready Nodes",
        type_ = "integer",
        json_path = ".status.readyNodes"
    ),
    printcolumn(
        name = "Slots Owned",
        type_ = "integer",
        json_path = ".status.slotsOwned"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[kube(validation = Rule::new(COLO_NAME).message(COLO_NAME_MSG))]
#[serde(rename_all = "camelCase")]
pub struct ColoSpec {
    /// The region this colo belongs to. Fixed once set.
    #[schemars(length(min = 1, max = 40))]
    #[x_kube(
        validation = Rule::new(DNS_LABEL).message(DNS_LABEL_MSG),
        validation = Rule::new("self == oldSelf").message("region cannot be changed: create a new Colo instead"),
    )]
    pub region: String,
    /// Number of node pods.
    #[serde(default = "default_nodes")]
    #[schemars(range(min = 0, max = 500))]
    pub nodes: i32,
    /// Node container image; the operator's default (`--node-image`) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory for each node pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Each node's persistent volume. Fixed once set (a StatefulSet cannot change it).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage cannot be changed after creation"))]
    pub storage: ColoStorage,
    /// Number of slots the colo's objects are spread over. Fixed once set.
    #[serde(default = "default_slots")]
    #[schemars(range(min = 1, max = 65536))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("slots cannot be changed after creation"))]
    pub slots: i32,
}

fn default_nodes() -> i32 {
    3
}

fn default_slots() -> i32 {
    1024
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ColoStorage {
    /// Storage class of the nodes' volumes; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Volume size, a Kubernetes quantity such as `10Gi`.
    #[serde(default = "default_storage_size")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$')").message("must be a quantity such as 10Gi"))]
    pub size: String,
}

impl Default for ColoStorage {
    fn default() -> Self {
        ColoStorage {
            storage_class_name: None,
            size: default_storage_size(),
        }
    }
}

fn default_storage_size() -> String {
    "10Gi".to_string()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ColoStatus {
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node pods whose Lease is fresh.
    #[serde(default)]
    pub ready_nodes: i32,
    /// Slots (of any colo of the region) owned by this colo's nodes in the published placement.
    #[serde(default)]
    pub slots_owned: i32,
    /// Version of the region's placement map last published.
    #[serde(default)]
    pub placement_version: i64,
    /// Nodes whose Lease has stopped changing, and since when (kept across operator restarts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing_nodes: Vec<FailingNode>,
    /// Slots of this colo whose members were fenced at a newer epoch than the placement shows
    /// (a failover that could not finish, a hand-off whose answer was lost): that epoch must be
    /// published once the owner is back, whoever owns the slot then. Kept across operator
    /// restarts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced_slots: Vec<FencedSlot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FencedSlot {
    pub slot: i64,
    pub epoch: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailingNode {
    pub name: String,
    /// The Lease `renewTime` observed unchanged (empty when the Lease is missing).
    #[serde(default)]
    pub renew_time: String,
    /// When the operator first saw that renewTime (RFC 3339, operator's clock).
    pub since: String,
}

// ---------------------------------------------------------------------------------------------
// Jurisdiction

/// A set of colos that objects' data must never leave, and where their archive goes.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "colony.dev",
    version = "v1alpha1",
    kind = "Jurisdiction",
    namespaced,
    status = "JurisdictionStatus",
    shortname = "jur",
    category = "colony",
    annotation("helm.sh/resource-policy", "keep"),
    derive = "PartialEq",
    doc = "A set of regions and colos that objects' data must never leave",
    printcolumn(name = "Regions", type_ = "string", json_path = ".spec.regions"),
    printcolumn(name = "Colos", type_ = "integer", json_path = ".status.coloCount"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("size(self.regions) + size(self.colos) > 0").message("a Jurisdiction must allow at least one region or colo"))]
#[serde(rename_all = "camelCase")]
pub struct JurisdictionSpec {
    /// Every colo of these regions is allowed.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(r, size(r) <= 40)").message("region names are at most 40 characters"))]
    pub regions: Vec<String>,
    /// These colos are allowed, whatever their region.
    #[serde(default)]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.all(c, size(c) <= 63)").message("colo names are at most 63 characters"))]
    pub colos: Vec<String>,
    /// Where the archive of this jurisdiction's namespaces goes (unless a namespace names its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveLocation>,
}

/// An S3 (or S3-compatible) location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveLocation {
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub prefix: String,
    /// S3 endpoint URL for S3-compatible stores; AWS when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Secret (same namespace) with keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JurisdictionStatus {
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Colos (existing Colo resources) this jurisdiction allows.
    #[serde(default)]
    pub colos: Vec<String>,
    #[serde(default)]
    pub colo_count: i32,
}

// ---------------------------------------------------------------------------------------------
// ObjectNamespace

/// A class of durable objects: replication, archive, limits, jurisdiction.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "colony.dev",
    version = "v1alpha1",
    kind = "ObjectNamespace",
    namespaced,
    status = "ObjectNamespaceStatus",
    shortname = "ons",
    category = "colony",
    annotation("helm.sh/resource-policy", "keep"),
    derive = "PartialEq",
    doc = "A Colony object namespace: a named class of durable objects",
    printcolumn(
        name = "Jurisdiction",
        type_ = "string",
        json_path = ".spec.jurisdiction"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Quorum", type_ = "integer", json_path = ".spec.writeQuorum"),
    printcolumn(name = "Colos", type_ = "integer", json_path = ".status.coloCount"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[kube(validation = Rule::new(NAMESPACE_NAME).message(NAMESPACE_NAME_MSG))]
#[x_kube(
    validation = Rule::new("self.writeQuorum <= self.replicas").message("writeQuorum must not exceed replicas"),
    validation = Rule::new("2 * self.writeQuorum > self.replicas").message("writeQuorum must be a majority of replicas (more than replicas / 2), or two quorums could miss each other"),
)]
#[serde(rename_all = "camelCase")]
pub struct ObjectNamespaceSpec {
    /// The Jurisdiction (same Kubernetes namespace) this namespace's objects are confined to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub jurisdiction: Option<String>,
    /// Copies of each object (owner included). Fixed once set.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 15))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("replicas cannot be changed: create a new ObjectNamespace instead"))]
    pub replicas: i32,
    /// Copies that must hold a write durably before it is acknowledged (owner included). Fixed
    /// once set.
    #[serde(default = "default_write_quorum")]
    #[schemars(range(min = 1, max = 15))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("writeQuorum cannot be changed: create a new ObjectNamespace instead"))]
    pub write_quorum: i32,
    #[serde(default)]
    pub archive: ArchiveSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
}

fn default_replicas() -> i32 {
    5
}

fn default_write_quorum() -> i32 {
    3
}

/// Where and how the namespace's log is archived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveSpec {
    /// Bucket; the jurisdiction's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 63))]
    pub bucket: Option<String>,
    /// Key prefix; defaults to the jurisdiction's prefix followed by the namespace name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Secret (same namespace) with keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Point-in-time recovery window, like `30d`, `12h`.
    #[serde(default = "default_retention")]
    #[schemars(length(min = 2, max = 12))]
    #[x_kube(validation = Rule::new(DURATION).message("must be a duration like \"30d\", \"12h\", \"90m\" or \"45s\""))]
    pub retention: String,
    /// A batch is shipped when it reaches this size...
    #[serde(default = "default_batch_bytes")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new(SIZE).message(SIZE_MSG))]
    pub batch_bytes: String,
    /// ...or this age, whichever comes first.
    #[serde(default = "default_batch_interval")]
    #[schemars(length(min = 2, max = 12))]
    #[x_kube(validation = Rule::new(DURATION).message("must be a duration like \"10s\" or \"1m\""))]
    pub batch_interval: String,
}

impl Default for ArchiveSpec {
    fn default() -> Self {
        ArchiveSpec {
            bucket: None,
            prefix: None,
            endpoint: None,
            region: None,
            credentials_secret: None,
            retention: default_retention(),
            batch_bytes: default_batch_bytes(),
            batch_interval: default_batch_interval(),
        }
    }
}

fn default_retention() -> String {
    "30d".to_string()
}

fn default_batch_bytes() -> String {
    "16MiB".to_string()
}

fn default_batch_interval() -> String {
    "10s".to_string()
}

/// Per-object limits; Colony's defaults (Cloudflare's where they exist) for what is unset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new(SIZE).message(SIZE_MSG))]
    pub max_key_bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new(SIZE).message(SIZE_MSG))]
    pub max_value_bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_batch_keys: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new(SIZE).message(SIZE_MSG))]
    pub max_statement_bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new(SIZE).message(SIZE_MSG))]
    pub max_database_bytes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 12))]
    #[x_kube(validation = Rule::new(DURATION).message("must be a duration like \"30s\""))]
    pub request_time_limit: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectNamespaceStatus {
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Colos that serve this namespace.
    #[serde(default)]
    pub colos: Vec<String>,
    #[serde(default)]
    pub colo_count: i32,
    /// Node pods in those colos.
    #[serde(default)]
    pub nodes: i32,
    /// The Secret holding the namespace's ID keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_secret: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Generated CRDs

/// The three CRDs, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Colo::crd(), Jurisdiction::crd(), ObjectNamespace::crd()]
}

const CRDS_HEADER: &str = "# Generated by `colony-operator crds` from operator/src/crd.rs: do not edit by hand.\n# Kept on `helm uninstall` (helm.sh/resource-policy: keep), and with them the users' resources.\n";

/// The CRDs as one multi-document YAML stream: what `colony-operator crds` prints, what
/// `crds/colony.dev.yaml` holds, and what the chart's CRD template contains.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(CRDS_HEADER);
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
