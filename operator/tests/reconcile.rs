//! The reconcilers against a mocked API server that asserts every request: method, path, field
//! manager and body.

mod support;

use colony_node::lsn::Lsn;
use colony_node::placement::{AssignInput, NodeInfo, PlacementMap, assign_slots};
use colony_operator::builders;
use colony_operator::context::Context;
use colony_operator::crd::{Colo, ColoStatus, FailingNode, ObjectNamespace};
use colony_operator::error::Error;
use colony_operator::leader::Leadership;
use colony_operator::metrics::Metrics;
use colony_operator::node_admin::NodeAdmin;
use colony_operator::pass::region_pass;
use colony_operator::reconcile::{reconcile_colo, reconcile_jurisdiction, reconcile_namespace};
use colony_operator::settings::Settings;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{
    FakeAdmin, FakeConnector, Step, apply, colo, list, mock_client, not_found, object_namespace,
};

const NS: &str = "/apis/colony.dev/v1alpha1/namespaces/colony";
const CORE: &str = "/api/v1/namespaces/colony";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/colony/leases";
const PLACEMENT: &str = "/api/v1/namespaces/colony/configmaps/colony-placement-eu";
const LEASE_SELECTOR: &str =
    "labelSelector=app.kubernetes.io%2Fname%3Dcolony-node%2Ccolony.dev%2Fregion%3Deu";

fn context(
    client: Client,
    connector: Arc<FakeConnector>,
    clock: Arc<Mutex<Timestamp>>,
    leadership: Leadership,
) -> Arc<Context> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "colony-operator".into(),
            instance: None,
        },
    );
    Arc::new(
        Context::new(
            client,
            Settings::default(),
            connector,
            recorder,
            Arc::new(Metrics::new()),
            leadership,
        )
        .with_clock(move || *clock.lock().expect("clock")),
    )
}

fn ctx(client: Client, admin: Arc<FakeAdmin>, clock: Arc<Mutex<Timestamp>>) -> Arc<Context> {
    context(
        client,
        Arc::new(FakeConnector::new(admin)),
        clock,
        Leadership::unconditional(),
    )
}

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).expect("time")
}

fn j<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).expect("serializes")
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("finished in time (an unanswered request?)")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn admin_of(nodes: &[&str], lsn: Lsn) -> Arc<FakeAdmin> {
    let admin = Arc::new(FakeAdmin::default());
    admin
        .default_durable
        .lock()
        .expect("lock")
        .extend(nodes.iter().map(|n| (n.to_string(), lsn)));
    admin
}

/// A namespace whose ID key Secret exists (recorded in status), so colos serve it.
fn served_namespace(name: &str, replicas: i32, quorum: i32) -> ObjectNamespace {
    let mut on = object_namespace(name, None, replicas, quorum);
    on.status = Some(colony_operator::crd::ObjectNamespaceStatus {
        keys_secret: Some(format!("colony-ids-{name}")),
        ..Default::default()
    });
    on
}

fn with_finalizer(mut c: Colo) -> Colo {
    c.metadata.finalizers = Some(vec!["colony.dev/drain".into()]);
    c.metadata.resource_version = Some("41".into());
    c
}

fn lists(ons: Vec<Value>, colos: Vec<Value>) -> Vec<Step> {
    vec![
        Step::new("GET", format!("{NS}/objectnamespaces"))
            .respond(200, list("ObjectNamespaceList", "colony.dev/v1alpha1", ons)),
        Step::new("GET", format!("{NS}/jurisdictions"))
            .respond(200, list("JurisdictionList", "colony.dev/v1alpha1", vec![])),
        Step::new("GET", format!("{NS}/colos"))
            .respond(200, list("ColoList", "colony.dev/v1alpha1", colos)),
    ]
}

fn token_secret(token: &str) -> Value {
    use base64_like::encode;
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "colony-admin-token", "namespace": "colony"},
        "data": {"token": encode(token.as_bytes())}})
}

fn lease(name: &str, renew_secs: i64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "colony", "resourceVersion": format!("{renew_secs}"),
            "labels": {"app.kubernetes.io/name": "colony-node", "colony.dev/colo": name.split('-').next().unwrap_or(""), "colony.dev/region": "eu"}},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 15, "renewTime": format!("{}", t(renew_secs))},
    })
}

fn get_leases(items: Vec<Value>) -> Step {
    Step::new("GET", format!("{LEASES}?{LEASE_SELECTOR}"))
        .respond(200, list("LeaseList", "coordination.k8s.io/v1", items))
}

/// The objects of a Colo, applied in order after the region pass.
fn colo_objects(
    sts_status: Value,
    check_role: impl FnOnce(&Value) + Send + 'static,
    check_sts: impl FnOnce(&Value) + Send + 'static,
) -> Vec<Step> {
    vec![
        apply(&format!("{CORE}/serviceaccounts/colony-node-ams")),
        apply("/apis/rbac.authorization.k8s.io/v1/namespaces/colony/roles/colony-node-ams")
            .check(check_role),
        apply("/apis/rbac.authorization.k8s.io/v1/namespaces/colony/rolebindings/colony-node-ams"),
        apply(&format!("{CORE}/configmaps/colony-node-ams")).check(|b| {
            let yaml = b["data"]["node.yaml"].as_str().expect("node.yaml");
            assert!(yaml.contains("control: kubernetes"), "{yaml}");
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "Colo");
        }),
        apply(&format!("{CORE}/services/ams"))
            .check(|b| assert_eq!(b["spec"]["clusterIP"], "None")),
        Step::new(
            "PATCH",
            "/apis/apps/v1/namespaces/colony/statefulsets/ams?fieldManager=colony-operator&force=true",
        )
        .check(check_sts)
        .respond_with(move || json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ams", "namespace": "colony"}, "spec": {"selector": {}, "template": {}}, "status": sts_status})),
        apply("/apis/policy/v1/namespaces/colony/poddisruptionbudgets/ams")
            .check(|b| assert_eq!(b["spec"]["maxUnavailable"], 1)),
    ]
}

fn status_patch(check: impl FnOnce(&Value) + Send + 'static, onto: Value) -> Step {
    Step::new(
        "PATCH",
        format!("{NS}/colos/ams/status?fieldManager=colony-operator&force=true"),
    )
    .check(check)
    .echo_status_onto(onto)
}

#[tokio::test]
async fn colo_create_adds_the_finalizer_makes_the_admin_token_and_applies_every_object() {
    let c = colo("ams", "eu", 3, 1024);
    let mut c_rv = c.clone();
    c_rv.metadata.resource_version = Some("41".into());
    let colo_json = j(&c_rv);
    let chat = served_namespace("chat", 3, 2);
    let expected_sts = {
        let cfg = builders::node_config(
            &c,
            &[builders::namespace_config(&chat).expect("valid")],
            Settings::default().node_lease_duration,
        );
        j(&builders::statefulset(
            &c,
            &Settings::default(),
            &["chat".into()],
            &builders::config_hash(&cfg).expect("hash"),
            3,
        )
        .expect("sts"))
    };
    let posted_token: Arc<Mutex<String>> = Arc::default();
    let seen_token = posted_token.clone();
    let mut steps = lists(vec![j(&chat)], vec![colo_json.clone()]);
    steps.extend([
        Step::new(
            "PATCH",
            format!("{NS}/colos/ams?fieldManager=colony-operator"),
        )
        .check(|b| {
            assert_eq!(
                b,
                &json!({"metadata": {"finalizers": ["colony.dev/drain"], "resourceVersion": "41"}}),
                "a merge patch guarded by the resourceVersion"
            )
        })
        .respond(200, colo_json.clone()),
        Step::new("GET", format!("{CORE}/secrets/colony-admin-token"))
            .respond(404, not_found("secret")),
        Step::new(
            "POST",
            format!("{CORE}/secrets?fieldManager=colony-operator"),
        )
        .check(move |b| {
            assert_eq!(b["metadata"]["name"], "colony-admin-token");
            assert!(b["metadata"].get("ownerReferences").is_none());
            let token = b["stringData"]["token"].as_str().expect("token");
            assert_eq!(token.len(), 64);
            assert!(hex::decode(token).is_ok());
            *seen_token.lock().expect("lock") = token.to_string();
        })
        .echo(),
        Step::new("GET", PLACEMENT).respond(404, not_found("configmap")),
        get_leases(vec![]),
    ]);
    steps.extend(colo_objects(
        json!({"replicas": 0}),
        |b| {
            assert_eq!(
                b["rules"],
                json!([
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "patch"], "resourceNames": ["ams-0", "ams-1", "ams-2"]},
                    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"], "resourceNames": ["colony-placement-eu"]},
                ])
            )
        },
        move |b| assert_eq!(b, &expected_sts, "the StatefulSet applied is the builder's"),
    ));
    steps.push(status_patch(
        |b| {
            assert_eq!(b["apiVersion"], "colony.dev/v1alpha1");
            assert_eq!(b["kind"], "Colo");
            let s = &b["status"];
            assert_eq!(s["observedGeneration"], 1);
            assert_eq!(s["readyNodes"], 0);
            let ready = condition(s, "Ready");
            assert_eq!(ready["status"], "False");
            assert_eq!(ready["reason"], "NodesNotReady");
            assert_eq!(
                ready["message"],
                "0 of 3 node pods renew their Lease (0 pods ready)"
            );
            assert_eq!(ready["lastTransitionTime"], t(0).to_string());
            assert_eq!(condition(s, "Progressing")["reason"], "RollingOut");
            assert_eq!(condition(s, "Degraded")["status"], "False");
        },
        colo_json.clone(),
    ));
    let (client, server) = mock_client(steps);
    let connector = Arc::new(FakeConnector::new(Arc::new(FakeAdmin::default())));
    let ctx = context(
        client,
        connector.clone(),
        Arc::new(Mutex::new(t(0))),
        Leadership::unconditional(),
    );
    let action = within(reconcile_colo(Arc::new(c_rv), ctx))
        .await
        .expect("reconciles");
    assert_eq!(
        action,
        Action::requeue(Settings::default().observe_interval)
    );
    assert_eq!(within(server).await.expect("server").len(), 16);
    assert_eq!(
        *connector.tokens.lock().expect("lock"),
        vec![posted_token.lock().expect("lock").clone()],
        "the operator's admin calls carry the token it stored"
    );
}

#[tokio::test]
async fn a_namespace_is_served_only_once_its_key_secret_exists_and_config_changes_roll_pods() {
    let c = with_finalizer(colo("ams", "eu", 3, 1024));
    let pending = object_namespace("games", None, 3, 2); // no keysSecret in status yet
    let chat = served_namespace("chat", 3, 2);
    let hash_with = |ons: &[&ObjectNamespace]| {
        let cfgs: Vec<_> = ons
            .iter()
            .map(|o| builders::namespace_config(o).expect("valid"))
            .collect();
        builders::config_hash(&builders::node_config(
            &c,
            &cfgs,
            Settings::default().node_lease_duration,
        ))
        .expect("hash")
    };
    let expected_hash = hash_with(&[&chat]);
    assert_ne!(expected_hash, hash_with(&[&chat, &pending]));
    let mut steps = lists(vec![j(&pending), j(&chat)], vec![j(&c)]);
    steps.extend([
        Step::new("GET", format!("{CORE}/secrets/colony-admin-token"))
            .respond(200, token_secret(&"ab".repeat(32))),
        Step::new("GET", PLACEMENT).respond(404, not_found("configmap")),
        get_leases(vec![]),
    ]);
    steps.extend(colo_objects(
        json!({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}),
        |_| {},
        move |b| {
            let tpl = &b["spec"]["template"];
            assert_eq!(
                tpl["metadata"]["annotations"]["colony.dev/config-hash"],
                expected_hash
            );
            let sources = tpl["spec"]["volumes"][0]["projected"]["sources"]
                .as_array()
                .expect("sources");
            let secrets: Vec<&str> = sources
                .iter()
                .filter_map(|s| s["secret"]["name"].as_str())
                .collect();
            assert_eq!(secrets, ["colony-admin-token", "colony-ids-chat"]);
            assert!(
                sources
                    .iter()
                    .filter(|s| s.get("secret").is_some())
                    .all(|s| s["secret"]["optional"] == true)
            );
        },
    ));
    steps.push(status_patch(|_| {}, j(&c)));
    let (client, server) = mock_client(steps);
    let ctx = ctx(
        client,
        Arc::new(FakeAdmin::default()),
        Arc::new(Mutex::new(t(0))),
    );
    within(reconcile_colo(Arc::new(c), ctx))
        .await
        .expect("reconciles");
    within(server).await.expect("server");
}

#[tokio::test]
async fn not_leading_means_not_a_single_request() {
    let (client, server) = mock_client(vec![]);
    let ctx = context(
        client,
        Arc::new(FakeConnector::new(Arc::new(FakeAdmin::default()))),
        Arc::new(Mutex::new(t(0))),
        Leadership::new(),
    );
    let err = within(reconcile_colo(
        Arc::new(colo("ams", "eu", 3, 1024)),
        ctx.clone(),
    ))
    .await
    .expect_err("not the leader");
    assert!(matches!(err, Error::NotLeader(_)), "{err}");
    let err = within(reconcile_namespace(
        Arc::new(object_namespace("chat", None, 3, 2)),
        ctx,
    ))
    .await
    .expect_err("not the leader");
    assert!(matches!(err, Error::NotLeader(_)), "{err}");
    assert!(within(server).await.expect("server").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Placement, failover, hand-offs

fn nodes(names: &[&str]) -> Vec<NodeInfo> {
    names
        .iter()
        .map(|n| NodeInfo {
            name: n.to_string(),
            colo: "ams".into(),
            address: format!("{n}.ams.colony.svc:8787"),
        })
        .collect()
}

fn initial_map() -> PlacementMap {
    let ns = nodes(&["ams-0", "ams-1", "ams-2"]);
    let a = assign_slots(&AssignInput {
        colo: "ams",
        slot_count: 6,
        replicas: 3,
        nodes: &ns,
        previous: None,
    })
    .expect("assigns");
    PlacementMap {
        region: "eu".into(),
        version: 5,
        slot_count: 6,
        replicas: 3,
        nodes: ns.into_iter().map(|n| (n.name.clone(), n)).collect(),
        colos: BTreeMap::from([("ams".to_string(), a.slots)]),
    }
}

/// The placement ConfigMap as the API server holds it: resourceVersion = map version.
fn placement_cm(map: &PlacementMap) -> Value {
    let c = colo("ams", "eu", 3, 6);
    let mut cm = j(&builders::placement_configmap("colony", map, &[&c]).expect("cm"));
    cm["metadata"]["resourceVersion"] = json!(format!("rv{}", map.version));
    cm
}

type Published = Arc<Mutex<Option<PlacementMap>>>;

fn get_placement(published: &Published) -> Step {
    let p = published.clone();
    Step::new("GET", PLACEMENT).respond_with(move || {
        placement_cm(
            p.lock()
                .expect("lock")
                .as_ref()
                .expect("a map was published"),
        )
    })
}

/// A replace of the placement ConfigMap under the resourceVersion last read; the nodes apply
/// the map at once (the fake admin answers from it).
fn publish(
    published: &Published,
    admin: &Arc<FakeAdmin>,
    check: impl FnOnce(&PlacementMap, &PlacementMap) + Send + 'static,
) -> Step {
    let p = published.clone();
    let admin = admin.clone();
    Step::new("PUT", format!("{PLACEMENT}?fieldManager=colony-operator"))
        .check(move |b| {
            let text = b["data"]["placement.json"]
                .as_str()
                .expect("placement.json");
            let map: PlacementMap = serde_json::from_str(text).expect("a valid placement map");
            let mut held = p.lock().expect("lock");
            let before = held.clone().expect("a map was published");
            assert_eq!(
                b["metadata"]["resourceVersion"],
                format!("rv{}", before.version),
                "replaced under the resourceVersion read"
            );
            assert_eq!(map.version, before.version + 1);
            assert_eq!(
                b["metadata"]["annotations"]["colony.dev/placement-version"],
                map.version.to_string()
            );
            assert_safe_step(&before, &map);
            check(&before, &map);
            admin.apply(&map);
            *held = Some(map);
        })
        .echo()
}

/// No member leaves a replica set without having been `leaving`; owners change only with an
/// epoch bump, to a former voter.
fn assert_safe_step(before: &PlacementMap, after: &PlacementMap) {
    for (colo, slots) in &before.colos {
        for (i, b) in slots.slots.iter().enumerate() {
            let a = &after.colos[colo].slots[i];
            for m in b.receivers() {
                assert!(
                    a.has(m) || b.leaving.iter().any(|l| l == m),
                    "slot {i}: {m} removed without leaving first: {b:?} -> {a:?}"
                );
            }
            if a.owner != b.owner {
                assert_eq!(a.epoch, b.epoch + 1);
                assert!(b.followers.contains(&a.owner) || b.leaving.contains(&a.owner));
            }
        }
    }
}

fn event(reason: &'static str, note_contains: &'static str) -> Step {
    Step::new("POST", "/apis/events.k8s.io/v1/namespaces/colony/events")
        .check(move |b| {
            assert_eq!(b["reason"], reason, "{b}");
            assert_eq!(b["regarding"]["kind"], "Colo");
            assert_eq!(b["regarding"]["name"], "ams");
            let note = b["note"].as_str().unwrap_or("");
            assert!(
                note.contains(note_contains),
                "{reason}: {note:?} should contain {note_contains:?}"
            );
        })
        .echo()
}

fn renewing(names: &[&str], at: i64) -> Step {
    get_leases(names.iter().map(|n| lease(n, at)).collect())
}

fn failing_since(c: &mut Colo, node: &str, renew: i64, since: i64) {
    c.status = Some(ColoStatus {
        failing_nodes: vec![FailingNode {
            name: node.into(),
            renew_time: if renew < 0 {
                String::new()
            } else {
                t(renew).to_string()
            },
            since: t(since).to_string(),
        }],
        ..Default::default()
    });
}

fn pass_of<'a>(
    ctx: &'a Arc<Context>,
    admin: &'a Arc<FakeAdmin>,
    colos: &'a [Colo],
    ons: &'a [ObjectNamespace],
) -> impl std::future::Future<
    Output = colony_operator::error::Result<colony_operator::pass::RegionOutcome>,
> + 'a {
    let admin: Arc<dyn NodeAdmin> = admin.clone();
    async move { region_pass(ctx, &admin, "colony", "eu", colos, ons, &[]).await }
}

#[tokio::test]
async fn a_stale_lease_fails_over_then_the_node_gets_its_slots_back_by_hand_off() {
    let before = initial_map();
    let owned_by_1: Vec<usize> = before.colos["ams"]
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.owner == "ams-1")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(owned_by_1.len(), 2);
    let published: Published = Arc::new(Mutex::new(Some(before.clone())));
    let admin = admin_of(&["ams-0", "ams-1", "ams-2"], Lsn::new(1, 12));
    admin
        .default_durable
        .lock()
        .expect("lock")
        .insert("ams-0".into(), Lsn::new(1, 10));
    admin.apply(&before);
    // What a previous operator process recorded: ams-1's Lease unchanged since t(0).
    let mut c = colo("ams", "eu", 3, 6);
    failing_since(&mut c, "ams-1", 0, 0);
    let colos = vec![c];
    let ons = vec![served_namespace("chat", 3, 2)];

    let owned = owned_by_1.clone();
    let steps = vec![
        // Pass 1, t(20): a fresh operator; ams-1 failing since t(0) per status: fail over now.
        get_placement(&published),
        get_leases(vec![
            lease("ams-0", 19),
            lease("ams-1", 0),
            lease("ams-2", 18),
        ]),
        event(
            "FailingOver",
            "node ams-1: its Lease has not been renewed since",
        ),
        publish(&published, &admin, move |b, m| {
            assert_eq!(m.owned_by("ams-1"), 0, "the failed node owns nothing");
            for &i in &owned {
                let s = &m.colos["ams"].slots[i];
                assert_eq!(s.epoch, b.colos["ams"].slots[i].epoch + 1);
                assert_eq!(s.owner, "ams-2", "the most advanced follower");
                assert!(
                    s.followers.iter().any(|f| f == "ams-1"),
                    "kept as a follower"
                );
            }
        }),
        // Only once the map is out.
        event("FailoverTarget", "2 slots of ams-1 are now owned by ams-2"),
        // Pass 2, t(40): ams-1 renews again and is a voter of those slots: hand-offs, published
        // by the background run as soon as they are done.
        get_placement(&published),
        renewing(&["ams-0", "ams-1", "ams-2"], 38),
        get_placement(&published),
        publish(&published, &admin, |_, m| {
            assert_eq!(m.owned_by("ams-1"), 2, "balanced again");
        }),
        // Pass 3, t(45): nothing to do.
        get_placement(&published),
        renewing(&["ams-0", "ams-1", "ams-2"], 44),
    ];
    let (client, server) = mock_client(steps);
    let clock = Arc::new(Mutex::new(t(20)));
    let ctx = ctx(client, admin.clone(), clock.clone());

    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass 1");
    assert!(o.health["ams-1"].is_failed());
    assert!(o.failover_errors.is_empty(), "{:?}", o.failover_errors);
    let calls = admin.calls();
    for &i in &owned_by_1 {
        let s = &before.colos["ams"].slots[i];
        for f in &s.followers {
            let want = format!("fence {f} ams/{i} epoch={}", s.epoch + 1);
            assert!(calls.contains(&want), "{want} in {calls:?}");
        }
    }
    assert!(
        !calls.iter().any(|c| c.starts_with("fence ams-1")),
        "the failed node is not asked"
    );
    let metrics = ctx.metrics.encode().expect("metrics");
    assert!(
        metrics.contains("colony_operator_failovers_total{outcome=\"succeeded\"} 2"),
        "{metrics}"
    );

    *clock.lock().expect("clock") = t(40);
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass 2");
    assert_eq!(o.handoffs_started, 2);
    within(ctx.region("colony", "eu").settled()).await;
    let handoffs: Vec<String> = admin
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("handoff"))
        .collect();
    assert_eq!(handoffs.len(), 2, "{handoffs:?}");
    assert!(
        handoffs
            .iter()
            .all(|h| h.starts_with("handoff ams-2") && h.contains("to=ams-1")),
        "{handoffs:?}"
    );
    *clock.lock().expect("clock") = t(45);
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass 3");
    assert_eq!((o.unbalanced, o.changing, o.handoffs_started), (0, 0, 0));
    within(server).await.expect("server");
}

#[tokio::test]
async fn a_fresh_operator_trusts_no_lease_it_has_not_seen_renewed() {
    let published: Published = Arc::new(Mutex::new(Some(initial_map())));
    let steps = vec![
        get_placement(&published),
        get_leases(vec![
            lease("ams-0", 19),
            lease("ams-1", 0),
            lease("ams-2", 18),
        ]),
    ];
    let (client, server) = mock_client(steps);
    let admin = Arc::new(FakeAdmin::default());
    let ctx = ctx(client, admin.clone(), Arc::new(Mutex::new(t(20))));
    let colos = vec![colo("ams", "eu", 3, 6)];
    let ons = [served_namespace("chat", 3, 2)];
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass");
    assert!(
        o.health
            .values()
            .all(|h| *h == colony_operator::region::Health::Unknown),
        "first sight of a Lease is neither live nor failed: {:?}",
        o.health
    );
    assert!(admin.calls().is_empty());
    within(server).await.expect("server");
}

#[tokio::test]
async fn a_blocked_failover_is_reported_once_and_the_fenced_epoch_published_when_the_owner_returns()
{
    let before = initial_map();
    let published: Published = Arc::new(Mutex::new(Some(before.clone())));
    // Nobody answers fences.
    let admin = Arc::new(FakeAdmin::default());
    let steps = vec![
        get_placement(&published),
        get_leases(vec![lease("ams-0", 19), lease("ams-2", 18)]),
        event("FailingOver", "failing over the 2 slots it owned"),
        event("FailoverBlocked", "2 slots of ams-1 cannot fail over yet"),
        // Nothing else changes: a node that is down keeps its roles.
        get_placement(&published),
        get_leases(vec![lease("ams-0", 24), lease("ams-2", 23)]),
        // ams-1 is back: its followers were fenced at epoch 2, so it keeps its slots at epoch 2.
        get_placement(&published),
        get_leases(vec![
            lease("ams-0", 29),
            lease("ams-1", 29),
            lease("ams-2", 28),
        ]),
        publish(&published, &admin, move |b, m| {
            for (i, s) in m.colos["ams"].slots.iter().enumerate() {
                let old = &b.colos["ams"].slots[i];
                if old.owner == "ams-1" {
                    assert_eq!((s.owner.as_str(), s.epoch), ("ams-1", old.epoch + 1));
                    assert_eq!(s.followers, old.followers);
                } else {
                    assert_eq!(s, old);
                }
            }
        }),
    ];
    let (client, server) = mock_client(steps);
    let mut c = colo("ams", "eu", 3, 6);
    failing_since(&mut c, "ams-1", -1, 0);
    let clock = Arc::new(Mutex::new(t(20)));
    let ctx = ctx(client, admin.clone(), clock.clone());
    let colos = [c];
    let ons = [served_namespace("chat", 3, 2)];
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass");
    assert_eq!(
        o.failover_errors,
        vec![
            "2 slots of ams-1 could not fail over: too few of their followers answered".to_string()
        ]
    );
    *clock.lock().expect("clock") = t(25);
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass");
    assert_eq!(o.failover_errors.len(), 1, "still blocked");
    let metrics = ctx.metrics.encode().expect("metrics");
    assert!(
        metrics.contains("colony_operator_failovers_total{outcome=\"blocked\"} 2"),
        "counted once per blocked slot, not per pass: {metrics}"
    );
    // Kept for the Colo's status, so that an operator restart does not forget them.
    assert_eq!(
        o.fenced.values().copied().collect::<Vec<_>>(),
        [2, 2],
        "{:?}",
        o.fenced
    );
    *clock.lock().expect("clock") = t(30);
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass");
    assert!(o.failover_errors.is_empty());
    assert!(o.fenced.is_empty(), "published: {:?}", o.fenced);
    within(server).await.expect("server");
}

#[tokio::test]
async fn scaling_down_hands_over_and_steps_out_before_the_statefulset_shrinks() {
    let before = initial_map();
    let published: Published = Arc::new(Mutex::new(Some(before.clone())));
    let admin = admin_of(&["ams-0", "ams-1", "ams-2"], Lsn::new(1, 10));
    admin.apply(&before);
    let colos = vec![colo("ams", "eu", 2, 6)];
    let ons = vec![served_namespace("chat", 3, 2)];
    let all = ["ams-0", "ams-1", "ams-2"];
    let steps = vec![
        // t(0): first sight of the Leases: nothing is trusted yet.
        get_placement(&published),
        renewing(&all, 0),
        // t(5): ams-2 is live but no longer wanted: it leaves the slots it follows, and hands
        // over those it owns (published by the hand-off run).
        get_placement(&published),
        renewing(&all, 5),
        publish(&published, &admin, |_, m| {
            for s in &m.colos["ams"].slots {
                if s.owner != "ams-2" {
                    assert_eq!(s.leaving, ["ams-2"], "{s:?}");
                }
            }
        }),
        get_placement(&published),
        publish(&published, &admin, |_, m| {
            assert_eq!(m.owned_by("ams-2"), 0);
        }),
        // t(10): the owners applied the change and the others hold everything: the leaving
        // member goes; the former owner starts leaving the slots it handed over.
        get_placement(&published),
        renewing(&all, 10),
        publish(&published, &admin, |_, m| {
            for s in &m.colos["ams"].slots {
                assert!(!s.members().any(|x| x == "ams-2"), "{s:?}");
            }
        }),
        // t(15): gone from every slot.
        get_placement(&published),
        renewing(&all, 15),
        publish(&published, &admin, |_, m| {
            assert!(!m.nodes.contains_key("ams-2"));
        }),
        // t(20): stable; the Lease of the departing pod, still renewed, is left alone.
        get_placement(&published),
        renewing(&all, 20),
    ];
    let (client, server) = mock_client(steps);
    let clock = Arc::new(Mutex::new(t(0)));
    let ctx = ctx(client, admin.clone(), clock.clone());
    let mut replicas = Vec::new();
    for at in [0, 5, 10, 15, 20] {
        *clock.lock().expect("clock") = t(at);
        let o = within(pass_of(&ctx, &admin, &colos, &ons))
            .await
            .expect("pass");
        within(ctx.region("colony", "eu").settled()).await;
        let map = published.lock().expect("lock").clone();
        replicas.push(builders::statefulset_replicas("ams", 2, map.as_ref()));
        assert!(o.failover_errors.is_empty());
    }
    assert_eq!(
        replicas,
        [3, 3, 3, 2, 2],
        "the pod stays until no slot names it"
    );
    let calls = admin.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("fence")),
        "no failover: {calls:?}"
    );
    let handoffs: Vec<&String> = calls.iter().filter(|c| c.starts_with("handoff")).collect();
    assert_eq!(handoffs.len(), 2, "{handoffs:?}");
    assert!(handoffs.iter().all(|h| h.starts_with("handoff ams-2")));
    within(server).await.expect("server");
}

#[tokio::test]
async fn a_hand_off_timeout_is_retried_and_a_publish_conflict_starts_nothing() {
    hand_offs_the_owner_did_not_fence_are_retried(
        "http://ams-2.ams.colony.svc:8787/v1/admin/slots/ams/0/handoff: 503 Service Unavailable {\"error\":{\"code\":\"handoff_timeout\",\"message\":\"ams-0 did not catch up\"}}",
        "timeout",
    )
    .await;
}

/// A hand-off the owner found interrupted (a new placement moved the slot before its fence) is
/// counted as such, and, like a timeout, notes no fence to publish.
#[tokio::test]
async fn an_interrupted_hand_off_notes_no_fence() {
    hand_offs_the_owner_did_not_fence_are_retried(
        "http://ams-2.ams.colony.svc:8787/v1/admin/slots/ams/0/handoff: 409 Conflict {\"error\":{\"code\":\"handoff_interrupted\",\"message\":\"slot ams#0 stopped draining\"}}",
        "interrupted",
    )
    .await;
}

/// Every hand-off answers `answer`, one of the owner's "not fenced" answers: a first pass plans
/// nothing after a publish conflict, the next starts the hand-offs, which all end as `outcome`
/// with nothing published and no fence noted.
async fn hand_offs_the_owner_did_not_fence_are_retried(answer: &str, outcome: &str) {
    let before = initial_map();
    let published: Published = Arc::new(Mutex::new(Some(before.clone())));
    let admin = admin_of(&["ams-0", "ams-1", "ams-2"], Lsn::new(1, 10));
    admin.apply(&before);
    *admin.handoff_error.lock().expect("lock") = Some(answer.into());
    let colos = vec![colo("ams", "eu", 2, 6)];
    let ons = vec![served_namespace("chat", 3, 2)];
    let all = ["ams-0", "ams-1", "ams-2"];
    let p = published.clone();
    let steps = vec![
        get_placement(&published),
        renewing(&all, 0),
        // Someone else published meanwhile: 409, nothing is handed off on a stale map.
        get_placement(&published),
        renewing(&all, 5),
        Step::new("PUT", format!("{PLACEMENT}?fieldManager=colony-operator")).respond(
            409,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        ),
        // Next pass: published; the hand-offs time out (nothing more is published).
        Step::new("GET", PLACEMENT).respond_with(move || placement_cm(p.lock().expect("lock").as_ref().expect("map"))),
        renewing(&all, 10),
        publish(&published, &admin, |_, _| {}),
    ];
    let (client, server) = mock_client(steps);
    let clock = Arc::new(Mutex::new(t(0)));
    let ctx = ctx(client, admin.clone(), clock.clone());
    within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass 1");
    *clock.lock().expect("clock") = t(5);
    let err = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect_err("conflict");
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(admin.calls().iter().all(|c| !c.starts_with("handoff")));
    *clock.lock().expect("clock") = t(10);
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass 3");
    assert_eq!(o.handoffs_started, 2);
    within(ctx.region("colony", "eu").settled()).await;
    let metrics = ctx.metrics.encode().expect("metrics");
    assert!(
        metrics.contains(&format!(
            "colony_operator_handoffs_total{{outcome=\"{outcome}\"}} 2"
        )),
        "{metrics}"
    );
    assert!(ctx.region("colony", "eu").done().is_empty());
    assert!(
        ctx.region("colony", "eu").fenced().is_empty(),
        "no fence noted: {:?}",
        ctx.region("colony", "eu").fenced()
    );
    within(server).await.expect("server");
}

/// How many slots have another owner in `after` than in `before`.
fn owners_changed(before: &PlacementMap, after: &PlacementMap) -> usize {
    before
        .colos
        .iter()
        .map(|(colo, slots)| {
            slots
                .slots
                .iter()
                .zip(&after.colos[colo].slots)
                .filter(|(b, a)| b.owner != a.owner)
                .count()
        })
        .sum()
}

/// Two hand-offs run; the owner of the first holds it. The other is published as soon as it
/// ends — its slot takes no writes until then — and the held one once it ends too; each is a
/// replace of the map as read, moving one slot.
#[tokio::test]
async fn each_hand_off_is_published_as_soon_as_it_ends() {
    let before = initial_map();
    let published: Published = Arc::new(Mutex::new(Some(before.clone())));
    let admin = admin_of(&["ams-0", "ams-1", "ams-2"], Lsn::new(1, 10));
    admin.apply(&before);
    admin
        .hold_next_handoff
        .store(true, std::sync::atomic::Ordering::Release);
    let colos = vec![colo("ams", "eu", 2, 6)];
    let ons = vec![served_namespace("chat", 3, 2)];
    let all = ["ams-0", "ams-1", "ams-2"];
    let one_more_owner = |b: &PlacementMap, m: &PlacementMap| {
        assert_eq!(owners_changed(b, m), 1, "one hand-off per publication");
    };
    let steps = vec![
        get_placement(&published),
        renewing(&all, 0),
        get_placement(&published),
        renewing(&all, 5),
        // The pass's own publication, after which it starts the hand-offs.
        publish(&published, &admin, |_, _| {}),
        // The hand-off not held, published at once.
        get_placement(&published),
        publish(&published, &admin, one_more_owner),
        // The held one, once it ends.
        get_placement(&published),
        publish(&published, &admin, one_more_owner),
    ];
    let (client, server) = mock_client(steps);
    let clock = Arc::new(Mutex::new(t(0)));
    let ctx = ctx(client, admin.clone(), clock.clone());
    within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass 1");
    *clock.lock().expect("clock") = t(5);
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass 2");
    assert_eq!(o.handoffs_started, 2);
    let version = |p: &Published| p.lock().expect("lock").as_ref().map_or(0, |m| m.version);
    let started_at = version(&published);
    within(async {
        while version(&published) == started_at {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let held = admin
        .calls()
        .into_iter()
        .find(|c| c.starts_with("handoff"))
        .expect("the held hand-off was asked for");
    assert_eq!(
        version(&published),
        started_at + 1,
        "only the hand-off that ended is published while {held} waits"
    );
    admin
        .handoff_released
        .store(true, std::sync::atomic::Ordering::Release);
    within(ctx.region("colony", "eu").settled()).await;
    assert_eq!(version(&published), started_at + 2);
    assert_eq!(
        owners_changed(
            &before,
            published.lock().expect("lock").as_ref().expect("map")
        ),
        2
    );
    let metrics = ctx.metrics.encode().expect("metrics");
    assert!(
        metrics.contains("colony_operator_handoffs_total{outcome=\"done\"} 2"),
        "{metrics}"
    );
    within(server).await.expect("server");
}

#[tokio::test]
async fn the_lease_of_a_node_scaled_away_is_deleted_once_stale_and_unreferenced() {
    let published: Published = Arc::new(Mutex::new(Some(initial_map())));
    let mut c = colo("ams", "eu", 3, 6);
    // ams-3 was scaled away earlier; its Lease stopped changing at t(0).
    failing_since(&mut c, "ams-3", 0, 0);
    let steps = vec![
        get_placement(&published),
        get_leases(vec![
            lease("ams-0", 19),
            lease("ams-1", 19),
            lease("ams-2", 19),
            lease("ams-3", 0),
        ]),
        Step::new("DELETE", format!("{LEASES}/ams-3"))
            .check(|b| {
                assert_eq!(
                    b["preconditions"],
                    json!({"resourceVersion": "0"}),
                    "only the Lease as observed: {b}"
                )
            })
            .respond(200, lease("ams-3", 0)),
    ];
    let (client, server) = mock_client(steps);
    let admin = Arc::new(FakeAdmin::default());
    let ctx = ctx(client, admin.clone(), Arc::new(Mutex::new(t(20))));
    let colos = [c];
    let ons = [served_namespace("chat", 3, 2)];
    let o = within(pass_of(&ctx, &admin, &colos, &ons))
        .await
        .expect("pass");
    assert!(o.leases.iter().all(|l| l.name != "ams-3"));
    within(server).await.expect("server");
}

#[tokio::test]
async fn deleting_the_last_colo_stops_its_pods_deletes_their_leases_then_lets_it_go() {
    let published: Published = Arc::new(Mutex::new(Some(initial_map())));
    let mut c = with_finalizer(colo("ams", "eu", 3, 6));
    c.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(0)));
    let all = ["ams-0", "ams-1", "ams-2"];
    let mut first = lists(vec![], vec![j(&c)]);
    first.extend([
        Step::new("GET", format!("{CORE}/secrets/colony-admin-token"))
            .respond(200, token_secret(&"cd".repeat(32))),
        get_placement(&published),
        renewing(&all, 100),
        Step::new(
            "PATCH",
            "/apis/apps/v1/namespaces/colony/statefulsets/ams?fieldManager=colony-operator",
        )
        .check(|b| assert_eq!(b, &json!({"spec": {"replicas": 0}})))
        .respond(200, json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ams"}, "spec": {"selector": {}, "template": {}}, "status": {"replicas": 3}})),
        status_patch(
            |b| {
                let p = condition(&b["status"], "Progressing");
                assert_eq!(p["reason"], "Draining");
                assert!(
                    p["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("waiting for the node pods to stop (3 left)"),
                    "{p}"
                );
            },
            j(&c),
        ),
    ]);
    // Later: the pods are gone and their Leases have not changed for their duration.
    let mut second = lists(vec![], vec![j(&c)]);
    second.extend([get_placement(&published), renewing(&all, 100)]);
    for n in all {
        second.push(Step::new("DELETE", format!("{LEASES}/{n}")).respond(200, lease(n, 100)));
    }
    second.extend([
        Step::new(
            "PATCH",
            "/apis/apps/v1/namespaces/colony/statefulsets/ams?fieldManager=colony-operator",
        )
        .respond(200, json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ams"}, "spec": {"selector": {}, "template": {}}, "status": {"replicas": 0}})),
        Step::new("PATCH", format!("{NS}/colos/ams?fieldManager=colony-operator"))
            .check(|b| {
                assert_eq!(
                    b,
                    &json!({"metadata": {"finalizers": [], "resourceVersion": "41"}})
                )
            })
            .respond(200, j(&c)),
    ]);
    let mut steps = first;
    steps.extend(second);
    let (client, server) = mock_client(steps);
    let admin = Arc::new(FakeAdmin::default());
    let clock = Arc::new(Mutex::new(t(101)));
    let ctx = ctx(client, admin.clone(), clock.clone());
    let c = Arc::new(c);
    let action = within(reconcile_colo(c.clone(), ctx.clone()))
        .await
        .expect("drains");
    assert_eq!(
        action,
        Action::requeue(Settings::default().observe_interval)
    );
    *clock.lock().expect("clock") = t(130);
    let action = within(reconcile_colo(c, ctx)).await.expect("done");
    assert_eq!(action, Action::await_change());
    assert!(
        admin.calls().is_empty(),
        "no failover while the region is torn down"
    );
    within(server).await.expect("server");
}

// ---------------------------------------------------------------------------------------------
// ObjectNamespace and Jurisdiction

fn ons_status_patch(check: impl FnOnce(&Value) + Send + 'static, onto: Value) -> Step {
    Step::new(
        "PATCH",
        format!("{NS}/objectnamespaces/chat/status?fieldManager=colony-operator&force=true"),
    )
    .check(check)
    .echo_status_onto(onto)
}

#[tokio::test]
async fn an_object_namespace_with_a_missing_jurisdiction_is_not_ready_and_gets_its_keys_once() {
    let on = object_namespace("chat", Some("eu"), 3, 2);
    let on_json = j(&on);
    let steps = vec![
        Step::new("GET", format!("{NS}/jurisdictions/eu")).respond(404, not_found("jurisdiction")),
        Step::new("GET", format!("{NS}/colos")).respond(
            200,
            list(
                "ColoList",
                "colony.dev/v1alpha1",
                vec![j(&colo("ams", "eu", 3, 1024))],
            ),
        ),
        // Created blindly: the operator cannot read Secrets; 409 would mean it exists.
        Step::new("POST", format!("{CORE}/secrets?fieldManager=colony-operator"))
            .check(|b| {
                assert_eq!(b["metadata"]["name"], "colony-ids-chat");
                assert!(b["metadata"].get("ownerReferences").is_none());
                let keys = b["stringData"]["keys"].as_str().expect("keys");
                assert_eq!(keys.len(), 65);
                assert!(keys.ends_with('\n') && hex::decode(keys.trim()).is_ok());
            })
            .respond(
                409,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
            ),
        ons_status_patch(
            |b| {
                let s = &b["status"];
                let ready = condition(s, "Ready");
                assert_eq!(ready["status"], "False");
                assert_eq!(ready["reason"], "JurisdictionNotFound");
                assert!(
                    ready["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("Jurisdiction \"eu\" does not exist"),
                    "{ready}"
                );
                assert_eq!(ready["observedGeneration"], 2);
                assert_eq!(s["keysSecret"], "colony-ids-chat");
                assert_eq!(s["coloCount"], 0);
            },
            on_json,
        ),
    ];
    let (client, server) = mock_client(steps);
    let ctx = ctx(
        client,
        Arc::new(FakeAdmin::default()),
        Arc::new(Mutex::new(t(0))),
    );
    within(reconcile_namespace(Arc::new(on), ctx))
        .await
        .expect("reconciles");
    within(server).await.expect("server");
}

fn jurisdiction(regions: &[&str], colos: &[&str]) -> Value {
    json!({"apiVersion": "colony.dev/v1alpha1", "kind": "Jurisdiction",
        "metadata": {"name": "eu", "namespace": "colony", "generation": 1},
        "spec": {"regions": regions, "colos": colos}})
}

#[tokio::test]
async fn an_object_namespace_needing_more_nodes_than_its_region_has_says_so() {
    let mut on = object_namespace("chat", Some("eu"), 5, 3);
    on.status = Some(colony_operator::crd::ObjectNamespaceStatus {
        keys_secret: Some("colony-ids-chat".into()),
        ..Default::default()
    });
    let on_json = j(&on);
    let steps = vec![
        Step::new("GET", format!("{NS}/jurisdictions/eu")).respond(200, jurisdiction(&["eu"], &[])),
        Step::new("GET", format!("{NS}/colos")).respond(
            200,
            list(
                "ColoList",
                "colony.dev/v1alpha1",
                vec![
                    j(&colo("ams", "eu", 3, 1024)),
                    j(&colo("nyc", "us", 9, 1024)),
                ],
            ),
        ),
        // keysSecret is recorded: no Secret request at all.
        ons_status_patch(
            |b| {
                let ready = condition(&b["status"], "Ready");
                assert_eq!(ready["status"], "False");
                assert_eq!(ready["reason"], "TooFewNodes");
                assert_eq!(
                    ready["message"],
                    "replicas is 5 but region \"eu\" has only 3 node(s) in 1 colo(s) (ams); replicas are placed within a region: add nodes or colos there, or use fewer replicas"
                );
                assert_eq!(b["status"]["colos"], json!(["ams"]));
            },
            on_json,
        ),
    ];
    let (client, server) = mock_client(steps);
    let ctx = ctx(
        client,
        Arc::new(FakeAdmin::default()),
        Arc::new(Mutex::new(t(0))),
    );
    within(reconcile_namespace(Arc::new(on), ctx))
        .await
        .expect("reconciles");
    within(server).await.expect("server");
}

#[tokio::test]
async fn a_jurisdiction_splitting_a_region_keeps_its_namespaces_unserved() {
    let on = object_namespace("chat", Some("eu"), 3, 2);
    let on_json = j(&on);
    let jur = jurisdiction(&[], &["ams"]);
    let colos = vec![
        j(&colo("ams", "eu", 3, 1024)),
        j(&colo("fra", "eu", 3, 1024)),
    ];
    let steps = vec![
        Step::new("GET", format!("{NS}/jurisdictions/eu")).respond(200, jur.clone()),
        Step::new("GET", format!("{NS}/colos"))
            .respond(200, list("ColoList", "colony.dev/v1alpha1", colos.clone())),
        Step::new(
            "POST",
            format!("{CORE}/secrets?fieldManager=colony-operator"),
        )
        .echo(),
        ons_status_patch(
            |b| {
                let ready = condition(&b["status"], "Ready");
                assert_eq!(ready["status"], "False");
                assert_eq!(ready["reason"], "JurisdictionSplitsRegion");
                let msg = ready["message"].as_str().unwrap_or("");
                assert!(
                    msg.contains("allows colos [ams] of region \"eu\" but not [fra]"),
                    "{msg}"
                );
                assert_eq!(b["status"]["coloCount"], 0, "served nowhere");
            },
            on_json,
        ),
        // The Jurisdiction itself says so too.
        Step::new("GET", format!("{NS}/colos"))
            .respond(200, list("ColoList", "colony.dev/v1alpha1", colos)),
        Step::new(
            "PATCH",
            format!("{NS}/jurisdictions/eu/status?fieldManager=colony-operator&force=true"),
        )
        .check(|b| {
            let d = condition(&b["status"], "Degraded");
            assert_eq!(d["status"], "True");
            assert_eq!(d["reason"], "JurisdictionSplitsRegion");
        })
        .echo_status_onto(jur.clone()),
    ];
    let (client, server) = mock_client(steps);
    let ctx = ctx(
        client,
        Arc::new(FakeAdmin::default()),
        Arc::new(Mutex::new(t(0))),
    );
    within(reconcile_namespace(Arc::new(on), ctx.clone()))
        .await
        .expect("reconciles");
    let jur: colony_operator::crd::Jurisdiction = serde_json::from_value(jur).expect("jur");
    within(reconcile_jurisdiction(Arc::new(jur), ctx))
        .await
        .expect("reconciles");
    within(server).await.expect("server");
}

#[tokio::test]
async fn an_object_namespace_with_an_invalid_name_is_refused_without_keys() {
    let mut on = object_namespace("chat", None, 3, 2);
    on.metadata.name = Some("Chat_Rooms".into());
    let on_json = j(&on);
    let steps = vec![
        Step::new("GET", format!("{NS}/colos")).respond(
            200,
            list(
                "ColoList",
                "colony.dev/v1alpha1",
                vec![j(&colo("ams", "eu", 3, 1024))],
            ),
        ),
        Step::new(
            "PATCH",
            format!(
                "{NS}/objectnamespaces/Chat_Rooms/status?fieldManager=colony-operator&force=true"
            ),
        )
        .check(|b| {
            let ready = condition(&b["status"], "Ready");
            assert_eq!(ready["reason"], "InvalidSpec");
            assert!(
                ready["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("not a valid Colony namespace name"),
                "{ready}"
            );
            assert!(b["status"].get("keysSecret").is_none());
        })
        .echo_status_onto(on_json),
    ];
    let (client, server) = mock_client(steps);
    let ctx = ctx(
        client,
        Arc::new(FakeAdmin::default()),
        Arc::new(Mutex::new(t(0))),
    );
    within(reconcile_namespace(Arc::new(on), ctx))
        .await
        .expect("reconciles");
    within(server).await.expect("server");
}

mod base64_like {
    /// Standard base64, for Secret data in fixtures.
    pub fn encode(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
