//! Pure functions from the custom resources to the Kubernetes objects the operator applies.
//!
//! Nothing here does I/O: every function takes what it needs and returns typed objects (or a
//! typed error), so the fixtures in `operator/tests/fixtures/` pin their exact output.

use crate::crd::{Colo, ObjectNamespace};
use crate::error::{Error, Result, ser};
use crate::settings::{NODE_PORT, Settings};
use colony_node::cluster::kubernetes::{
    LABEL_COLO, LABEL_REGION, PLACEMENT_KEY, VERSION_ANNOTATION, placement_configmap_name,
};
use colony_node::config::{
    ByteSize, ClusterConfig, HumanDuration, Limits, NamespaceConfig, NodeConfig, NodeIdentity,
    Replication, StorageConfig, valid_name,
};
use colony_node::placement::PlacementMap;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

pub const LABEL_NAMESPACE: &str = "colony.dev/object-namespace";
pub const ANNOTATION_CONFIG_HASH: &str = "colony.dev/config-hash";
pub const NODE_CONFIG_KEY: &str = "node.yaml";
pub const IDS_KEY: &str = "keys";
pub const CONFIG_DIR: &str = "/etc/colony";
pub const KEYS_DIR: &str = "/etc/colony/keys";
pub const DATA_DIR: &str = "/var/lib/colony";
/// The Secret (one per Kubernetes namespace with Colos) holding the token of the nodes' admin
/// and internal APIs; created once by the operator, never rotated.
pub const ADMIN_TOKEN_SECRET: &str = "colony-admin-token";
pub const ADMIN_TOKEN_KEY: &str = "token";
pub const ADMIN_TOKEN_FILE: &str = "/etc/colony/admin-token";
/// Added to every Colo: its deletion waits until its nodes' slots have moved to other colos
/// and their pods and Leases are gone.
pub const FINALIZER: &str = "colony.dev/drain";
/// The label selector of a region's node Leases (the nodes label their own Leases).
pub fn node_lease_selector(region: &str) -> String {
    format!("app.kubernetes.io/name=colony-node,{LABEL_REGION}={region}")
}

pub fn node_config_name(colo: &str) -> String {
    format!("colony-node-{colo}")
}

pub fn node_account_name(colo: &str) -> String {
    format!("colony-node-{colo}")
}

pub fn placement_name(region: &str) -> String {
    placement_configmap_name(region)
}

pub fn ids_secret_name(namespace: &str) -> String {
    format!("colony-ids-{namespace}")
}

/// The labels that select a Colo's pods. They are part of the StatefulSet's immutable selector,
/// so they must never depend on anything that can change (not the region, image or version).
pub fn selector_labels(colo: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "colony-node".to_string(),
        ),
        (LABEL_COLO.to_string(), colo.to_string()),
    ])
}

/// All labels of a Colo's objects and pods.
pub fn colo_labels(colo: &Colo) -> BTreeMap<String, String> {
    let mut l = selector_labels(&colo.name_any());
    l.insert("app.kubernetes.io/instance".into(), colo.name_any());
    l.insert("app.kubernetes.io/component".into(), "node".into());
    l.insert("app.kubernetes.io/part-of".into(), "colony".into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "colony-operator".into(),
    );
    l.insert(LABEL_REGION.into(), colo.spec.region.clone());
    l
}

fn owner(colo: &Colo) -> Result<OwnerReference> {
    colo.controller_owner_ref(&()).ok_or_else(|| {
        Error::Invalid(format!(
            "Colo {} has no uid yet: it cannot own objects",
            colo.name_any()
        ))
    })
}

fn namespace_of(colo: &Colo) -> Result<String> {
    colo.namespace().ok_or_else(|| Error::NoNamespace {
        kind: "Colo",
        name: colo.name_any(),
    })
}

fn typed<T: DeserializeOwned>(what: &'static str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(ser(what))
}

fn meta(colo: &Colo, name: &str) -> Result<Value> {
    Ok(json!({
        "name": name,
        "namespace": namespace_of(colo)?,
        "labels": colo_labels(colo),
        "ownerReferences": [owner(colo)?],
    }))
}

/// The node limits of an ObjectNamespace: its settings over Colony's defaults.
pub fn limits_of(ns: &ObjectNamespace) -> Result<Limits, String> {
    let l = &ns.spec.limits;
    let mut out = Limits::default();
    let size = |field: &str, v: &Option<String>, into: &mut ByteSize| -> Result<(), String> {
        if let Some(v) = v {
            *into = ByteSize::from_str(v).map_err(|e| format!("limits.{field}: {e}"))?;
        }
        Ok(())
    };
    size("maxKeyBytes", &l.max_key_bytes, &mut out.max_key_bytes)?;
    size(
        "maxValueBytes",
        &l.max_value_bytes,
        &mut out.max_value_bytes,
    )?;
    size(
        "maxStatementBytes",
        &l.max_statement_bytes,
        &mut out.max_statement_bytes,
    )?;
    size(
        "maxDatabaseBytes",
        &l.max_database_bytes,
        &mut out.max_database_bytes,
    )?;
    if let Some(k) = l.max_batch_keys {
        out.max_batch_keys = usize::try_from(k).map_err(|e| format!("limits.maxBatchKeys: {e}"))?;
    }
    if let Some(t) = &l.request_time_limit {
        out.request_time_limit = HumanDuration::from_str(&expand_days(t))
            .map_err(|e| format!("limits.requestTimeLimit: {e}"))?;
    }
    Ok(out)
}

/// `30d` → `30days` (humantime reads `d` too, but be explicit about what the CRD promises).
fn expand_days(s: &str) -> String {
    s.strip_suffix('d')
        .map(|n| format!("{n}days"))
        .unwrap_or_else(|| s.to_string())
}

/// The namespace section of the node configuration for one ObjectNamespace, or why the
/// ObjectNamespace cannot be served. This is the one validity check both reconcilers use.
pub fn namespace_config(ns: &ObjectNamespace) -> Result<NamespaceConfig, String> {
    let name = ns.name_any();
    if !valid_name(&name) {
        return Err(format!(
            "the name {name:?} is not a valid Colony namespace name: at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    let replicas = usize::try_from(ns.spec.replicas).map_err(|e| format!("replicas: {e}"))?;
    let write_quorum =
        usize::try_from(ns.spec.write_quorum).map_err(|e| format!("writeQuorum: {e}"))?;
    Ok(NamespaceConfig {
        name,
        jurisdiction: ns.spec.jurisdiction.clone(),
        replication: Replication {
            replicas,
            write_quorum,
        },
        limits: limits_of(ns)?,
    })
}

/// The node configuration of a Colo's pods (per-pod values come from the environment). The
/// control plane is Kubernetes: each node renews its own Lease (`lease` long) and watches the
/// region's placement ConfigMap.
pub fn node_config(colo: &Colo, namespaces: &[NamespaceConfig], lease: Duration) -> NodeConfig {
    let mut namespaces = namespaces.to_vec();
    namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    NodeConfig {
        node: NodeIdentity {
            // Overridden per pod by COLONY_NODE_NAME.
            name: format!("{}-0", colo.name_any()),
            colo: colo.name_any(),
            region: colo.spec.region.clone(),
        },
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], NODE_PORT as u16)),
        advertise_address: None,
        data_dir: DATA_DIR.into(),
        keys_dir: Some(KEYS_DIR.into()),
        // Set per pod by COLONY_ADMIN_TOKEN_FILE.
        admin_token_file: None,
        namespaces,
        storage: StorageConfig::default(),
        cluster: Some(ClusterConfig {
            control: "kubernetes".to_string(),
            lease_duration: HumanDuration(lease),
            source_address: None,
        }),
        slot_count: u32::try_from(colo.spec.slots.max(1)).unwrap_or(1024),
    }
}

pub fn node_configmap(colo: &Colo, config: &NodeConfig) -> Result<ConfigMap> {
    let yaml = serde_yaml::to_string(config).map_err(ser("node configuration"))?;
    typed(
        "ConfigMap",
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(colo, &node_config_name(&colo.name_any()))?,
            "data": { NODE_CONFIG_KEY: yaml },
        }),
    )
}

/// A digest of the colo's own rendered node configuration, put on the pod template so that a
/// change of it (and nothing else) rolls the pods.
pub fn config_hash(config: &NodeConfig) -> Result<String> {
    let yaml = serde_yaml::to_string(config).map_err(ser("node configuration"))?;
    Ok(hex::encode(&Sha256::digest(yaml.as_bytes())[..8]))
}

pub fn headless_service(colo: &Colo) -> Result<Service> {
    typed(
        "Service",
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(colo, &colo.name_any())?,
            "spec": {
                "clusterIP": "None",
                // Nodes reach their peers (catch-up, replication) before they report ready.
                "publishNotReadyAddresses": true,
                "selector": selector_labels(&colo.name_any()),
                "ports": [{"name": "http", "port": NODE_PORT, "targetPort": "http", "protocol": "TCP"}],
            },
        }),
    )
}

pub fn pod_disruption_budget(colo: &Colo) -> Result<PodDisruptionBudget> {
    typed(
        "PodDisruptionBudget",
        json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(colo, &colo.name_any())?,
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": selector_labels(&colo.name_any())},
            },
        }),
    )
}

pub fn node_service_account(colo: &Colo) -> Result<ServiceAccount> {
    typed(
        "ServiceAccount",
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta(colo, &node_account_name(&colo.name_any()))?,
        }),
    )
}

/// What a colo's node pods need from the API, by name wherever Kubernetes allows: apply their
/// own Lease (`pods` = the pod names that exist; `create` cannot be limited by name), and read
/// and watch their region's placement ConfigMap (a watch by `metadata.name` field selector is
/// authorized against `resourceNames`). Their own configuration is a mounted volume.
pub fn node_role(colo: &Colo, pods: &[String]) -> Result<Role> {
    let mut rules = vec![
        json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}),
    ];
    // An empty resourceNames list would allow every Lease: no rule at all without pods.
    if !pods.is_empty() {
        rules.push(json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "patch"], "resourceNames": pods}));
    }
    rules.push(json!({"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"], "resourceNames": [placement_name(&colo.spec.region)]}));
    typed(
        "Role",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(colo, &node_account_name(&colo.name_any()))?,
            "rules": rules,
        }),
    )
}

pub fn node_role_binding(colo: &Colo) -> Result<RoleBinding> {
    let name = node_account_name(&colo.name_any());
    typed(
        "RoleBinding",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(colo, &name)?,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace_of(colo)?}],
        }),
    )
}

/// How many pods a Colo's StatefulSet keeps: the wanted `nodes`, but never fewer than needed to
/// keep every pod the published placement still names (a pod that is scaled away first hands
/// its slots over and leaves their replica sets; the StatefulSet shrinks after that).
pub fn statefulset_replicas(colo: &str, nodes: i32, map: Option<&PlacementMap>) -> i32 {
    let referenced = map.map_or(0, |m| {
        m.nodes
            .values()
            .filter(|n| n.colo == colo)
            .filter_map(|n| pod_ordinal(colo, &n.name))
            .map(|o| o.saturating_add(1))
            .max()
            .unwrap_or(0)
    });
    nodes.max(0).max(referenced)
}

/// The ordinal of `pod` if it is a pod of the StatefulSet `colo`.
pub fn pod_ordinal(colo: &str, pod: &str) -> Option<i32> {
    let ord = pod.strip_prefix(colo)?.strip_prefix('-')?;
    if ord.is_empty()
        || !ord.bytes().all(|b| b.is_ascii_digit())
        || (ord.len() > 1 && ord.starts_with('0'))
    {
        return None;
    }
    ord.parse().ok()
}

/// The node pods: `replicas` of them (see [`statefulset_replicas`]). `key_namespaces` are the
/// ObjectNamespaces whose ID key Secrets are mounted.
pub fn statefulset(
    colo: &Colo,
    settings: &Settings,
    key_namespaces: &[String],
    config_hash: &str,
    replicas: i32,
) -> Result<StatefulSet> {
    let name = colo.name_any();
    let spec = &colo.spec;
    // Secrets are optional sources: a missing one must not keep the whole volume (and so every
    // pod of the rollout) from mounting; the node names the file it lacks instead.
    let mut sources = vec![
        json!({"configMap": {
            "name": node_config_name(&name),
            "items": [{"key": NODE_CONFIG_KEY, "path": NODE_CONFIG_KEY}],
        }}),
        json!({"secret": {
            "name": ADMIN_TOKEN_SECRET,
            "items": [{"key": ADMIN_TOKEN_KEY, "path": "admin-token"}],
            "optional": true,
        }}),
    ];
    let mut key_namespaces = key_namespaces.to_vec();
    key_namespaces.sort();
    key_namespaces.dedup();
    for ns in &key_namespaces {
        sources.push(json!({"secret": {
            "name": ids_secret_name(ns),
            "items": [{"key": IDS_KEY, "path": format!("keys/{ns}")}],
            "optional": true,
        }}));
    }
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| settings.node_image.clone());
    let mut container = json!({
        "name": "node",
        "image": image,
        "command": ["colony-node"],
        "args": ["serve", "--config", format!("{CONFIG_DIR}/{NODE_CONFIG_KEY}")],
        "ports": [{"name": "http", "containerPort": NODE_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "COLONY_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "COLONY_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "COLONY_COLO", "value": name},
            {"name": "COLONY_REGION", "value": spec.region},
            {"name": "COLONY_LISTEN", "value": format!("0.0.0.0:{NODE_PORT}")},
            {"name": "COLONY_ADVERTISE_ADDRESS", "value": format!("$(COLONY_NODE_NAME).{name}.$(COLONY_POD_NAMESPACE).svc:{NODE_PORT}")},
            {"name": "COLONY_DATA_DIR", "value": DATA_DIR},
            {"name": "COLONY_KEYS_DIR", "value": KEYS_DIR},
            {"name": "COLONY_ADMIN_TOKEN_FILE", "value": ADMIN_TOKEN_FILE},
        ],
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_DIR},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2, "failureThreshold": 150},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 2, "failureThreshold": 2},
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(policy) = settings.image_pull_policy {
        container["imagePullPolicy"] = json!(policy.as_str());
    }
    if let Some(r) = &spec.resources {
        container["resources"] = serde_json::to_value(r).map_err(ser("resources"))?;
    }
    let mut pod_spec = json!({
        "serviceAccountName": node_account_name(&name),
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "topologySpreadConstraints": [{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels(&name)},
        }],
        "containers": [container],
        "volumes": [
            {"name": "config", "projected": {"sources": sources}},
            {"name": "tmp", "emptyDir": {}},
        ],
    });
    if let Some(sel) = &spec.node_selector {
        pod_spec["nodeSelector"] = json!(sel);
    }
    if let Some(t) = &spec.tolerations {
        pod_spec["tolerations"] = serde_json::to_value(t).map_err(ser("tolerations"))?;
    }
    let mut pvc_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": spec.storage.size}},
    });
    if let Some(class) = &spec.storage.storage_class_name {
        pvc_spec["storageClassName"] = json!(class);
    }
    typed(
        "StatefulSet",
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta(colo, &name)?,
            "spec": {
                "replicas": replicas,
                "serviceName": name,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": selector_labels(&name)},
                "updateStrategy": {"type": "RollingUpdate"},
                "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                "template": {
                    "metadata": {
                        "labels": colo_labels(colo),
                        "annotations": {ANNOTATION_CONFIG_HASH: config_hash},
                    },
                    "spec": pod_spec,
                },
                "volumeClaimTemplates": [{
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "data", "labels": selector_labels(&name)},
                    "spec": pvc_spec,
                }],
            },
        }),
    )
}

/// The ID key Secret of an ObjectNamespace, with one fresh key. Created once and never
/// overwritten (keys are only ever appended), so it carries no owner: deleting the
/// ObjectNamespace must not destroy the keys its existing IDs were made with.
pub fn ids_secret(ns: &ObjectNamespace, key_hex: &str) -> Result<Secret> {
    let namespace = ns.namespace().ok_or_else(|| Error::NoNamespace {
        kind: "ObjectNamespace",
        name: ns.name_any(),
    })?;
    typed(
        "Secret",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": ids_secret_name(&ns.name_any()),
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "colony",
                    "app.kubernetes.io/managed-by": "colony-operator",
                    LABEL_NAMESPACE: ns.name_any(),
                },
            },
            "type": "Opaque",
            "stringData": {IDS_KEY: format!("{key_hex}\n")},
        }),
    )
}

/// The Secret holding the nodes' admin token of a Kubernetes namespace. Shared by its Colos and
/// never rotated, so it carries no owner.
pub fn admin_token_secret(namespace: &str, token: &str) -> Result<Secret> {
    typed(
        "Secret",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": ADMIN_TOKEN_SECRET,
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "colony",
                    "app.kubernetes.io/managed-by": "colony-operator",
                },
            },
            "type": "Opaque",
            "stringData": {ADMIN_TOKEN_KEY: token},
        }),
    )
}

/// The admin token held by the Secret, if it holds a usable one (at least 32 characters).
pub fn read_admin_token(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(ADMIN_TOKEN_KEY)?;
    let token = String::from_utf8(bytes.0.clone()).ok()?.trim().to_string();
    (token.len() >= 32).then_some(token)
}

/// The published placement map of a region, owned (jointly) by the region's Colos so it goes away
/// with the last of them. Its version is also an annotation, which nodes read (metadata only)
/// with every heartbeat.
pub fn placement_configmap(
    namespace: &str,
    map: &PlacementMap,
    owners: &[&Colo],
) -> Result<ConfigMap> {
    let text = serde_json::to_string(map).map_err(ser("placement map"))?;
    let refs: Vec<OwnerReference> = owners
        .iter()
        .filter_map(|c| c.controller_owner_ref(&()))
        .map(|mut r| {
            r.controller = Some(false);
            r
        })
        .collect();
    typed(
        "ConfigMap",
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": placement_name(&map.region),
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/part-of": "colony",
                    "app.kubernetes.io/managed-by": "colony-operator",
                    LABEL_REGION: map.region,
                },
                "annotations": {VERSION_ANNOTATION: map.version.to_string()},
                "ownerReferences": refs,
            },
            "data": {PLACEMENT_KEY: text},
        }),
    )
}

/// `cm` (a placement ConfigMap as read) holding `map` instead, everything else kept, so that a
/// replace of it with its `resourceVersion` publishes `map` only if nobody wrote meanwhile.
pub fn with_placement(mut cm: ConfigMap, map: &PlacementMap) -> Result<ConfigMap> {
    let text = serde_json::to_string(map).map_err(ser("placement map"))?;
    cm.data
        .get_or_insert_with(BTreeMap::new)
        .insert(PLACEMENT_KEY.to_string(), text);
    cm.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(VERSION_ANNOTATION.to_string(), map.version.to_string());
    cm.metadata.managed_fields = None;
    Ok(cm)
}

/// Reads the placement map of `region` out of its ConfigMap (`None` when it holds no map yet),
/// exactly as the nodes read it.
pub fn read_placement(cm: &ConfigMap, region: &str) -> Result<Option<PlacementMap>> {
    colony_node::cluster::kubernetes::read_placement(cm, region).map_err(|message| {
        Error::BadPlacementMap {
            name: cm.name_any(),
            message,
        }
    })
}

/// Pod names of a Colo with `nodes` pods (StatefulSet ordinals).
pub fn pod_names(colo: &str, nodes: i32) -> Vec<String> {
    (0..nodes.max(0)).map(|i| format!("{colo}-{i}")).collect()
}
