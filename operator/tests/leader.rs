//! Leader election against a mocked API server: every write of the Lease is a create or a
//! replace under the resourceVersion read, and the Lease is released on shutdown.

mod support;

use colony_operator::leader::{Elector, Leadership, Timing};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::{Value, json};
use std::time::Duration;
use support::{Step, mock_client, not_found};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/colony-system/leases";

fn held_by(holder: &str, rv: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "colony-operator", "namespace": "colony-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
            "renewTime": "2026-11-22T10:00:00.000000Z", "acquireTime": "2026-11-22T09:00:00.000000Z", "leaseTransitions": 4}})
}

#[tokio::test]
async fn acquire_renew_under_the_resource_version_and_release() {
    let steps = vec![
        Step::new("GET", format!("{LEASE}/colony-operator")).respond(404, not_found("lease")),
        Step::new("POST", format!("{LEASE}?"))
            .check(|b| {
                assert_eq!(b["metadata"]["name"], "colony-operator");
                assert_eq!(b["spec"]["holderIdentity"], "op-a");
                assert_eq!(b["spec"]["leaseDurationSeconds"], 15);
                assert_eq!(b["spec"]["leaseTransitions"], 0);
            })
            .echo(),
        Step::new("GET", format!("{LEASE}/colony-operator")).respond(200, held_by("op-a", "8")),
        Step::new("PUT", format!("{LEASE}/colony-operator?"))
            .check(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "8", "replace under the version read");
                assert_eq!(b["spec"]["holderIdentity"], "op-a");
                assert_eq!(b["spec"]["acquireTime"], "2026-11-22T09:00:00.000000Z", "kept while held");
                assert_eq!(b["spec"]["leaseTransitions"], 4);
                assert_ne!(b["spec"]["renewTime"], "2026-11-22T10:00:00.000000Z");
            })
            .echo(),
        // Another replica took over: a renewal conflicts, and leadership ends.
        Step::new("GET", format!("{LEASE}/colony-operator")).respond(200, held_by("op-a", "9")),
        Step::new("PUT", format!("{LEASE}/colony-operator?")).respond(
            409,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Conflict", "code": 409, "message": "modified"}),
        ),
        // Release on shutdown: only while held, holder emptied, under the version read.
        Step::new("GET", format!("{LEASE}/colony-operator")).respond(200, held_by("op-a", "11")),
        Step::new("PUT", format!("{LEASE}/colony-operator?"))
            .check(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "11");
                assert!(b["spec"].get("holderIdentity").is_none(), "{b}");
                assert_eq!(b["spec"]["leaseDurationSeconds"], 1);
            })
            .echo(),
    ];
    let (client, server) = mock_client(steps);
    let api: Api<Lease> = Api::namespaced(client, "colony-system");
    let mut e = Elector::new(
        api,
        "colony-operator",
        "op-a",
        Timing::from_lease(Duration::from_secs(15)),
    );
    let leadership = Leadership::new();
    assert!(!leadership.is_leading());
    tokio::time::timeout(Duration::from_secs(5), e.acquire(&leadership))
        .await
        .expect("acquired");
    assert!(leadership.is_leading());
    let deadline = leadership.deadline().expect("deadline");
    assert!(deadline <= tokio::time::Instant::now() + Duration::from_secs(10));
    assert_eq!(e.attempt().await.0, Some(true), "renewed");
    assert_eq!(e.attempt().await.0, Some(false), "lost");
    e.release().await.expect("released");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("in time")
        .expect("server");
}
