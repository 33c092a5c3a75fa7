//! The builders are pure: their output is pinned by YAML fixtures.

mod support;

use colony_node::placement::{AssignInput, NodeInfo, PlacementMap, assign_slots};
use colony_operator::builders::{self, selector_labels};
use colony_operator::settings::Settings;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use support::{assert_fixture, colo, object_namespace};

/// What the node does with the configuration the operator renders: parse and validate it.
/// `cluster.control: kubernetes` is the node's Kubernetes adapter; a node that does not know it
/// yet is told so by `validate`, which is the only difference allowed here.
fn node_accepts(config: &colony_node::config::NodeConfig) {
    if let Err(e) = config.validate() {
        panic!("the node refuses the configuration the operator renders: {e}");
    }
}

fn v<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).expect("serializes")
}

fn sample_colo() -> colony_operator::crd::Colo {
    let mut c = colo("ams", "eu", 3, 1024);
    c.spec.image = Some("registry.example/colony-node:1.2.3".into());
    c.spec.resources = serde_json::from_value(
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}),
    )
    .ok();
    c.spec.node_selector = Some(BTreeMap::from([(
        "kubernetes.io/os".to_string(),
        "linux".to_string(),
    )]));
    c.spec.tolerations = serde_json::from_value(
        json!([{"key": "colony.dev/dedicated", "operator": "Exists", "effect": "NoSchedule"}]),
    )
    .ok();
    c.spec.storage.storage_class_name = Some("fast".into());
    c.spec.storage.size = "20Gi".into();
    c
}

#[test]
fn node_objects_match_their_fixtures() {
    let c = sample_colo();
    let mut chat = object_namespace("chat", Some("eu"), 3, 2);
    chat.spec.limits.max_value_bytes = Some("1MiB".into());
    chat.spec.limits.request_time_limit = Some("10s".into());
    let games = object_namespace("games", None, 5, 3);
    let namespaces = vec![
        builders::namespace_config(&games).expect("valid"),
        builders::namespace_config(&chat).expect("valid"),
    ];
    let config = builders::node_config(&c, &namespaces, Duration::from_secs(15));
    node_accepts(&config);
    let cm = builders::node_configmap(&c, &config).expect("builds");
    assert_fixture("node-configmap.yaml", &v(&cm));
    let hash = builders::config_hash(&config).expect("hash");
    assert_eq!(hash.len(), 16);
    let sts = builders::statefulset(
        &c,
        &Settings::default(),
        &["games".into(), "chat".into()],
        &hash,
        3,
    )
    .expect("builds");
    assert_fixture("statefulset.yaml", &v(&sts));
    assert_fixture(
        "service.yaml",
        &v(&builders::headless_service(&c).expect("builds")),
    );
    assert_fixture(
        "pdb.yaml",
        &v(&builders::pod_disruption_budget(&c).expect("builds")),
    );
    assert_fixture(
        "node-role.yaml",
        &v(&builders::node_role(&c, &builders::pod_names("ams", 3)).expect("builds")),
    );
    assert_fixture(
        "node-rolebinding.yaml",
        &v(&builders::node_role_binding(&c).expect("builds")),
    );
    assert_fixture(
        "node-serviceaccount.yaml",
        &v(&builders::node_service_account(&c).expect("builds")),
    );
}

#[test]
fn the_node_reads_back_the_rendered_configuration() {
    let c = sample_colo();
    let ns = builders::namespace_config(&object_namespace("chat", None, 3, 2)).expect("valid");
    let cm = builders::node_configmap(
        &c,
        &builders::node_config(&c, &[ns], Duration::from_secs(15)),
    )
    .expect("builds");
    let text = &cm.data.as_ref().expect("data")["node.yaml"];
    let mut parsed =
        colony_node::config::NodeConfig::from_yaml(text, std::path::Path::new("node.yaml"))
            .expect("node parses it");
    let env: BTreeMap<&str, &str> = [
        ("COLONY_NODE_NAME", "ams-2"),
        ("COLONY_LISTEN", "0.0.0.0:8787"),
    ]
    .into();
    parsed
        .apply_env(|k| env.get(k).map(|s| s.to_string()))
        .expect("env applies");
    node_accepts(&parsed);
    assert_eq!(parsed.node.name, "ams-2");
    assert_eq!(parsed.node.colo, "ams");
    assert_eq!(parsed.node.region, "eu");
    assert_eq!(parsed.namespaces[0].replication.write_quorum, 2);
    assert_eq!(
        parsed.keys_dir.as_deref(),
        Some(std::path::Path::new("/etc/colony/keys"))
    );
}

#[test]
fn selector_and_pvc_labels_never_change_with_the_spec() {
    let a = sample_colo();
    let mut b = sample_colo();
    b.spec.nodes = 7;
    b.spec.region = "us".into();
    b.spec.image = Some("registry.example/colony-node:9.9.9".into());
    b.spec.resources = None;
    let s = Settings::default();
    let sa = builders::statefulset(&a, &s, &[], "h1", 3).expect("builds");
    let sb = builders::statefulset(&b, &s, &["x".into()], "h2", 7).expect("builds");
    let spec_a = &sa.spec;
    let spec_b = &sb.spec;
    assert_eq!(
        spec_a.selector, spec_b.selector,
        "the StatefulSet selector is immutable"
    );
    assert_eq!(spec_a.service_name, spec_b.service_name);
    assert_eq!(
        v(&spec_a.volume_claim_templates),
        v(&spec_b.volume_claim_templates),
        "claim templates depend on storage only"
    );
    let selector = spec_a.selector.match_labels.clone().expect("labels");
    assert_eq!(selector, selector_labels("ams"));
    assert!(
        !selector.contains_key("colony.dev/region")
            && !selector.keys().any(|k| k.contains("version")),
        "nothing mutable in the selector"
    );
    // Pods carry every selector label, plus colo and region.
    let pod_labels = spec_b
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("labels");
    for (k, val) in &selector {
        assert_eq!(pod_labels.get(k), Some(val));
    }
    assert_eq!(pod_labels["colony.dev/region"], "us");
    assert_eq!(pod_labels["colony.dev/colo"], "ams");
    assert_eq!(spec_b.replicas, Some(7));
    let pdb = builders::pod_disruption_budget(&b).expect("builds");
    assert_eq!(
        pdb.spec
            .and_then(|s| s.selector)
            .and_then(|s| s.match_labels),
        Some(selector)
    );
}

#[test]
fn placement_map_configmap_matches_its_fixture_and_round_trips() {
    let nodes: Vec<NodeInfo> = ["ams-0", "ams-1", "fra-0"]
        .iter()
        .map(|n| NodeInfo {
            name: n.to_string(),
            colo: n[..3].to_string(),
            address: format!("{n}.{}.colony.svc:8787", &n[..3]),
        })
        .collect();
    let a = assign_slots(&AssignInput {
        colo: "ams",
        slot_count: 4,
        replicas: 3,
        nodes: &nodes,
        previous: None,
    })
    .expect("assigns");
    let map = PlacementMap {
        region: "eu".into(),
        version: 3,
        slot_count: 4,
        replicas: 3,
        nodes: nodes.iter().map(|n| (n.name.clone(), n.clone())).collect(),
        colos: BTreeMap::from([("ams".to_string(), a.slots)]),
    };
    let ams = colo("ams", "eu", 2, 4);
    let fra = colo("fra", "eu", 1, 4);
    let cm = builders::placement_configmap("colony", &map, &[&ams, &fra]).expect("builds");
    assert_fixture("placement-configmap.yaml", &v(&cm));
    assert_eq!(
        builders::read_placement(&cm, "eu").expect("reads"),
        Some(map)
    );
    let refs = cm.metadata.owner_references.expect("owners");
    assert_eq!(
        refs.len(),
        2,
        "owned by every Colo of the region, so it goes with the last one"
    );
    assert!(refs.iter().all(|r| r.controller == Some(false)));
}

#[test]
fn ids_secret_is_standalone_and_holds_one_key() {
    let ns = object_namespace("chat", None, 3, 2);
    let key = "ab".repeat(32);
    let s = builders::ids_secret(&ns, &key).expect("builds");
    assert_eq!(s.metadata.name.as_deref(), Some("colony-ids-chat"));
    assert!(
        s.metadata.owner_references.is_none(),
        "keys must outlive the ObjectNamespace"
    );
    assert_eq!(s.string_data.expect("data")["keys"], format!("{key}\n"));
}

#[test]
fn the_statefulset_keeps_every_pod_the_placement_still_names() {
    let nodes: Vec<NodeInfo> = ["ams-0", "ams-1", "ams-2", "ams-3", "fra-0"]
        .iter()
        .map(|n| NodeInfo {
            name: n.to_string(),
            colo: n[..3].to_string(),
            address: format!("{n}.{}.colony.svc:8787", &n[..3]),
        })
        .collect();
    let map = PlacementMap {
        region: "eu".into(),
        version: 3,
        slot_count: 1,
        replicas: 3,
        nodes: nodes.iter().map(|n| (n.name.clone(), n.clone())).collect(),
        colos: BTreeMap::new(),
    };
    assert_eq!(builders::statefulset_replicas("ams", 2, Some(&map)), 4);
    assert_eq!(builders::statefulset_replicas("ams", 6, Some(&map)), 6);
    assert_eq!(builders::statefulset_replicas("ams", 2, None), 2);
    assert_eq!(builders::statefulset_replicas("fra", 0, Some(&map)), 1);
    assert_eq!(builders::pod_ordinal("ams", "ams-12"), Some(12));
    for not_a_pod in ["amsterdam-0", "ams-x", "ams-", "ams-01", "fra-0"] {
        assert_eq!(builders::pod_ordinal("ams", not_a_pod), None, "{not_a_pod}");
    }
}

#[test]
fn the_config_hash_follows_the_colos_own_configuration_only() {
    let c = sample_colo();
    let chat = builders::namespace_config(&object_namespace("chat", None, 3, 2)).expect("valid");
    let d = Duration::from_secs(15);
    let base = builders::config_hash(&builders::node_config(&c, std::slice::from_ref(&chat), d))
        .expect("hash");
    // Another colo, another region, the image, resources or node count: same configuration.
    let mut other = sample_colo();
    other.spec.nodes = 9;
    other.spec.image = Some("registry.example/colony-node:9".into());
    other.spec.resources = None;
    assert_eq!(
        base,
        builders::config_hash(&builders::node_config(
            &other,
            std::slice::from_ref(&chat),
            d
        ))
        .expect("hash")
    );
    // A served namespace's settings, or the lease: the pods must restart to read it.
    let mut tighter = chat.clone();
    tighter.limits.max_batch_keys = 64;
    assert_ne!(
        base,
        builders::config_hash(&builders::node_config(&c, &[tighter], d)).expect("hash")
    );
    assert_ne!(
        base,
        builders::config_hash(&builders::node_config(&c, &[chat], Duration::from_secs(20)))
            .expect("hash")
    );
}

#[test]
fn the_admin_token_secret_is_standalone_and_read_back_only_when_usable() {
    let s = builders::admin_token_secret("colony", &"ab".repeat(32)).expect("builds");
    assert_eq!(s.metadata.name.as_deref(), Some("colony-admin-token"));
    assert!(
        s.metadata.owner_references.is_none(),
        "shared by the namespace's colos"
    );
    let with = |token: &str| k8s_openapi::api::core::v1::Secret {
        data: Some(BTreeMap::from([(
            "token".to_string(),
            k8s_openapi::ByteString(token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    assert_eq!(
        builders::read_admin_token(&with(&format!("{}\n", "ab".repeat(32)))),
        Some("ab".repeat(32))
    );
    assert_eq!(builders::read_admin_token(&with("short")), None);
    assert_eq!(builders::read_admin_token(&Default::default()), None);
}

#[test]
fn namespace_limits_are_parsed_or_refused_with_the_field_name() {
    let mut ns = object_namespace("chat", None, 3, 2);
    ns.spec.limits.max_key_bytes = Some("4KiB".into());
    ns.spec.limits.request_time_limit = Some("2m".into());
    let l = builders::limits_of(&ns).expect("valid");
    assert_eq!(l.max_key_bytes.0, 4096);
    assert_eq!(l.request_time_limit.0.as_secs(), 120);
    ns.spec.limits.max_value_bytes = Some("12XB".into());
    let err = builders::limits_of(&ns).expect_err("bad unit");
    assert!(err.contains("limits.maxValueBytes"), "{err}");
}
