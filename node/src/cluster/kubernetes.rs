//! The control plane on Kubernetes: the node renews its own Lease and watches the placement map
//! ConfigMap the operator publishes (see docs/control-plane.md).
//!
//! - Heartbeat: server-side apply of the `coordination.k8s.io/v1` Lease named after the node, in
//!   the pod's namespace (`holderIdentity` = node name, `leaseDurationSeconds`, `renewTime` = now),
//!   labelled with the node's colo and region so the operator can select a region's Leases. The
//!   reply carries the newest placement version known: the larger of what the watcher has seen and
//!   the `colony.dev/placement-version` annotation read right after the renewal (a metadata-only
//!   read), so a node that was paused or cut off learns that a newer map exists before its
//!   renewal counts (see `cluster::lease`). When the watcher lags, the map is fetched directly.
//! - Placement: a watch of the ConfigMap `colony-placement-<region>` (key `placement.json`, by
//!   name, so the node's Role can be limited to that one ConfigMap); the newest map is kept and
//!   [`ControlPlane::placement_after`] resolves as soon as one newer than asked is known.

use super::control::{ControlPlane, Heartbeat, HeartbeatReply, PLACEMENT_WAIT};
use crate::placement::PlacementMap;
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Field manager of the node's Lease writes.
pub const FIELD_MANAGER: &str = "colony-node";
/// Key of the placement map in its ConfigMap.
pub const PLACEMENT_KEY: &str = "placement.json";
/// Annotation of the placement ConfigMap holding the map's version (set by the operator), so
/// a node can learn the newest version without reading the whole map.
pub const VERSION_ANNOTATION: &str = "colony.dev/placement-version";
pub const LABEL_COLO: &str = "colony.dev/colo";
pub const LABEL_REGION: &str = "colony.dev/region";
/// Where Kubernetes mounts the pod's namespace (used when `COLONY_POD_NAMESPACE` is unset).
pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Watches are restarted this often (seconds), which bounds how long a silently dropped
/// connection goes unnoticed.
const WATCH_TIMEOUT_SECS: u32 = 60;

/// Name of a region's placement ConfigMap.
pub fn placement_configmap_name(region: &str) -> String {
    format!("colony-placement-{region}")
}

/// The pod's namespace: `COLONY_POD_NAMESPACE`, or the service account's namespace file.
pub fn pod_namespace() -> Result<String, String> {
    if let Some(ns) = std::env::var("COLONY_POD_NAMESPACE")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    {
        return Ok(ns);
    }
    std::fs::read_to_string(NAMESPACE_FILE)
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            format!(
                "cannot tell the pod's namespace: set COLONY_POD_NAMESPACE or run in a pod ({NAMESPACE_FILE} is missing)"
            )
        })
}

/// Connects to the cluster the node runs in (in-cluster configuration, or the kubeconfig) and
/// starts watching the region's placement map. `lease` is the node's lease duration: one
/// heartbeat (Lease write plus version read) is given at most a third of it.
pub async fn connect(region: &str, lease: Duration) -> Result<Arc<dyn ControlPlane>, String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let namespace = pod_namespace()?;
    Ok(Arc::new(KubernetesControlPlane::new(
        client, &namespace, region, lease,
    )))
}

/// The node's Lease as applied on every heartbeat (pure).
pub fn lease_object(hb: &Heartbeat, namespace: &str, now: Timestamp) -> Lease {
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "colony-node".to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "colony".to_string(),
        ),
        (LABEL_COLO.to_string(), hb.node.colo.clone()),
        (LABEL_REGION.to_string(), hb.region.clone()),
    ]);
    let seconds = hb.lease_ms.div_ceil(1000).clamp(1, i32::MAX as u64) as i32;
    Lease {
        metadata: ObjectMeta {
            name: Some(hb.node.name.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(hb.node.name.clone()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

/// The placement map held by a ConfigMap (`None`: no map in it yet).
pub fn read_placement(cm: &ConfigMap, region: &str) -> Result<Option<PlacementMap>, String> {
    let Some(text) = cm.data.as_ref().and_then(|d| d.get(PLACEMENT_KEY)) else {
        return Ok(None);
    };
    let map: PlacementMap = serde_json::from_str(text).map_err(|e| {
        format!(
            "the placement map in ConfigMap {:?} cannot be read: {e}",
            cm.metadata.name
        )
    })?;
    if map.region != region {
        return Err(format!(
            "ConfigMap {:?} holds the placement of region {:?}, not {region:?}",
            cm.metadata.name, map.region
        ));
    }
    Ok(Some(map))
}

/// Keeps `map` if it is newer than the one held; true if it was.
fn offer(newest: &watch::Sender<Option<Arc<PlacementMap>>>, map: PlacementMap) -> bool {
    newest.send_if_modified(|cur| {
        if cur.as_ref().is_none_or(|c| map.version > c.version) {
            *cur = Some(Arc::new(map));
            true
        } else {
            false
        }
    })
}

/// [`ControlPlane`] backed by the Kubernetes API.
pub struct KubernetesControlPlane {
    leases: Api<Lease>,
    configmaps: Api<ConfigMap>,
    namespace: String,
    region: String,
    configmap: String,
    call_timeout: Duration,
    newest: watch::Sender<Option<Arc<PlacementMap>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for KubernetesControlPlane {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl KubernetesControlPlane {
    /// Uses `client` for the Leases and ConfigMaps of `namespace` and starts the placement watch
    /// (so it must be called inside a Tokio runtime; the watch stops when this is dropped).
    pub fn new(client: kube::Client, namespace: &str, region: &str, lease: Duration) -> Self {
        let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let configmap = placement_configmap_name(region);
        let (newest, _) = watch::channel(None);
        let watcher = tokio::spawn(watch_placement(
            configmaps.clone(),
            configmap.clone(),
            region.to_string(),
            newest.clone(),
        ));
        KubernetesControlPlane {
            leases: Api::namespaced(client, namespace),
            configmaps,
            namespace: namespace.to_string(),
            region: region.to_string(),
            configmap,
            call_timeout: (lease / 3).max(Duration::from_millis(200)),
            newest,
            watcher,
        }
    }

    fn known_version(&self) -> u64 {
        self.newest.borrow().as_ref().map_or(0, |m| m.version)
    }

    /// The version the operator last published, from the ConfigMap's annotation; fetches the
    /// map itself when the watch has not delivered it yet.
    async fn published_version(&self) -> Result<u64, String> {
        let meta = self
            .configmaps
            .get_metadata_opt(&self.configmap)
            .await
            .map_err(|e| format!("cannot read ConfigMap {}: {e}", self.configmap))?;
        let published = meta
            .and_then(|m| m.metadata.annotations)
            .and_then(|a| a.get(VERSION_ANNOTATION).cloned())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if published > self.known_version() {
            match self.configmaps.get_opt(&self.configmap).await {
                Ok(Some(cm)) => match read_placement(&cm, &self.region) {
                    Ok(Some(map)) => {
                        offer(&self.newest, map);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring the placement map"),
                },
                Ok(None) => {}
                // The watch will bring it; the node waits for it before serving.
                Err(e) => tracing::warn!(error = %e, "cannot fetch the placement map"),
            }
        }
        Ok(published.max(self.known_version()))
    }
}

async fn watch_placement(
    api: Api<ConfigMap>,
    name: String,
    region: String,
    newest: watch::Sender<Option<Arc<PlacementMap>>>,
) {
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_TIMEOUT_SECS);
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                match read_placement(&cm, &region) {
                    Ok(Some(map)) => {
                        offer(&newest, map);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring the placement map"),
                }
            }
            // A deleted map changes nothing: the node keeps the newest it has.
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, configmap = %name, "watching the placement map"),
        }
    }
}

impl ControlPlane for KubernetesControlPlane {
    fn heartbeat<'a>(&'a self, hb: &'a Heartbeat) -> BoxFuture<'a, Result<HeartbeatReply, String>> {
        Box::pin(async move {
            if hb.region != self.region {
                return Err(format!(
                    "this control plane watches region {:?}, not {:?}",
                    self.region, hb.region
                ));
            }
            let lease = lease_object(hb, &self.namespace, Timestamp::now());
            let call = async {
                self.leases
                    .patch(
                        &hb.node.name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&lease),
                    )
                    .await
                    .map_err(|e| format!("cannot renew Lease {}: {e}", hb.node.name))?;
                let placement_version = self.published_version().await.map_err(|e| {
                    format!("Lease renewed, but the newest placement version is unknown: {e}")
                })?;
                Ok(HeartbeatReply { placement_version })
            };
            tokio::time::timeout(self.call_timeout, call)
                .await
                .map_err(|_| {
                    format!(
                        "the Kubernetes API did not answer the heartbeat within {:?}",
                        self.call_timeout
                    )
                })?
        })
    }

    fn placement_after(&self, after: u64) -> BoxFuture<'_, Result<Option<PlacementMap>, String>> {
        Box::pin(async move {
            let mut rx = self.newest.subscribe();
            let newer = tokio::time::timeout(
                PLACEMENT_WAIT,
                rx.wait_for(|m| m.as_ref().is_some_and(|m| m.version > after)),
            )
            .await;
            match newer {
                Ok(Ok(map)) => Ok(map.as_deref().cloned()),
                Ok(Err(_)) => Err("the placement watch stopped".to_string()),
                Err(_) => Ok(None),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{ColoSlots, NodeInfo, SlotReplicas};
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::sync::Mutex;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// One request the mocked API server received.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        query: String,
        accept: String,
        body: Value,
    }

    impl Seen {
        fn is_watch(&self) -> bool {
            self.query.split('&').any(|p| p == "watch=true")
        }
        fn is_metadata_only(&self) -> bool {
            self.accept.contains("as=PartialObjectMetadata")
        }
    }

    type Answer = Box<dyn Fn(&Seen) -> Option<(u16, Value)> + Send>;

    /// A mocked API server: answers each request with `answer` and records it; a request
    /// answered with `None` stays pending (an open watch).
    fn mock(answer: Answer) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(serve(handle, seen.clone(), answer));
        (kube::Client::new(service, "colony"), seen)
    }

    async fn serve(mut handle: Handle, seen: Arc<Mutex<Vec<Seen>>>, answer: Answer) {
        let mut pending = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let s = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or("").to_string(),
                accept: parts
                    .headers
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let reply = answer(&s);
            seen.lock().expect("lock").push(s);
            match reply {
                Some((status, body)) => send.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(body_bytes(&body)))
                        .expect("response"),
                ),
                None => pending.push(send),
            }
        }
    }

    /// JSON, except that a JSON string is sent as is (watch event lines).
    fn body_bytes(v: &Value) -> Vec<u8> {
        match v {
            Value::String(s) => s.clone().into_bytes(),
            other => serde_json::to_vec(other).expect("serializes"),
        }
    }

    fn map(version: u64) -> PlacementMap {
        let node = NodeInfo {
            name: "ams-0".into(),
            colo: "ams".into(),
            address: "ams-0.ams.colony.svc:8787".into(),
        };
        PlacementMap {
            region: "eu".into(),
            version,
            slot_count: 1,
            replicas: 1,
            nodes: BTreeMap::from([(node.name.clone(), node)]),
            colos: BTreeMap::from([(
                "ams".to_string(),
                ColoSlots {
                    slots: vec![SlotReplicas::new(1, "ams-0", &[])],
                },
            )]),
        }
    }

    fn configmap(version: u64) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "colony-placement-eu", "namespace": "colony",
                "resourceVersion": version.to_string(),
                "annotations": {VERSION_ANNOTATION: version.to_string()}},
            "data": {PLACEMENT_KEY: serde_json::to_string(&map(version)).expect("serializes")},
        })
    }

    fn list(items: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "3"}, "items": items})
    }

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            node: NodeInfo {
                name: "ams-0".into(),
                colo: "ams".into(),
                address: "ams-0.ams.colony.svc:8787".into(),
            },
            region: "eu".into(),
            lease_ms: 2500,
        }
    }

    const CONFIGMAPS: &str = "/api/v1/namespaces/colony/configmaps";
    const CONFIGMAP: &str = "/api/v1/namespaces/colony/configmaps/colony-placement-eu";
    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/colony/leases/ams-0";

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("done in time")
    }

    #[test]
    fn the_lease_names_the_node_states_its_duration_and_carries_colo_and_region() {
        let now: Timestamp = "2026-11-22T10:00:00.123456Z".parse().expect("time");
        let lease = lease_object(&heartbeat(), "colony", now);
        assert_eq!(
            serde_json::to_value(&lease).expect("serializes"),
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "ams-0", "namespace": "colony", "labels": {
                    "app.kubernetes.io/name": "colony-node", "app.kubernetes.io/part-of": "colony",
                    "colony.dev/colo": "ams", "colony.dev/region": "eu"}},
                "spec": {"holderIdentity": "ams-0", "leaseDurationSeconds": 3,
                    "renewTime": "2026-11-22T10:00:00.123456Z"},
            })
        );
    }

    #[test]
    fn only_newer_maps_replace_the_one_held_and_foreign_regions_are_refused() {
        let (tx, rx) = watch::channel(None);
        assert!(offer(&tx, map(4)));
        assert!(!offer(&tx, map(3)), "an older map is ignored");
        assert!(!offer(&tx, map(4)), "so is the same version");
        assert!(offer(&tx, map(5)));
        assert_eq!(rx.borrow().as_ref().map(|m| m.version), Some(5));
        let mut cm: ConfigMap = serde_json::from_value(configmap(2)).expect("configmap");
        assert_eq!(read_placement(&cm, "eu"), Ok(Some(map(2))));
        assert!(
            read_placement(&cm, "us")
                .expect_err("wrong region")
                .contains("region \"eu\"")
        );
        cm.data = None;
        assert_eq!(read_placement(&cm, "eu"), Ok(None));
    }

    #[tokio::test]
    async fn the_watch_keeps_the_newest_map_and_placement_after_waits_for_a_newer_one() {
        let (client, seen) = mock(Box::new(|s: &Seen| {
            assert_eq!((s.method.as_str(), s.path.as_str()), ("GET", CONFIGMAPS));
            assert!(
                s.query
                    .contains("fieldSelector=metadata.name%3Dcolony-placement-eu"),
                "only the region's map is watched: {}",
                s.query
            );
            if !s.is_watch() {
                return Some((200, list(vec![configmap(3)])));
            }
            if s.query.contains("resourceVersion=3&") || s.query.ends_with("resourceVersion=3") {
                let line = json!({"type": "MODIFIED", "object": configmap(4)});
                return Some((200, Value::String(format!("{line}\n"))));
            }
            None
        }));
        let cp = KubernetesControlPlane::new(client, "colony", "eu", Duration::from_secs(3));
        let first = within(cp.placement_after(0))
            .await
            .expect("no error")
            .expect("a map");
        assert!(first.version >= 3);
        let second = within(cp.placement_after(3))
            .await
            .expect("no error")
            .expect("a map");
        assert_eq!(second, map(4));
        let seen = seen.lock().expect("lock").clone();
        let watch = seen.iter().find(|s| s.is_watch()).expect("a watch");
        assert!(watch.query.contains("timeoutSeconds=60"), "{}", watch.query);
        assert!(
            seen.iter().all(|s| s.method == "GET"),
            "watching writes nothing: {seen:?}"
        );
    }

    /// An API server whose placement watch stays silent; `other` answers everything else.
    fn quiet_watch(other: impl Fn(&Seen) -> Option<(u16, Value)> + Send + 'static) -> Answer {
        Box::new(move |s: &Seen| {
            if s.path == CONFIGMAPS {
                return if s.is_watch() {
                    None
                } else {
                    Some((200, list(vec![])))
                };
            }
            other(s)
        })
    }

    fn requests_besides_the_watch(seen: &Mutex<Vec<Seen>>) -> Vec<Seen> {
        seen.lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path != CONFIGMAPS)
            .cloned()
            .collect()
    }

    #[tokio::test]
    async fn a_heartbeat_applies_the_lease_and_reports_the_newest_published_version() {
        let (client, seen) = mock(quiet_watch(|s| {
            match (s.method.as_str(), s.path.as_str()) {
                ("PATCH", LEASE) => Some((200, s.body.clone())),
                ("GET", CONFIGMAP) if s.is_metadata_only() => Some((
                    200,
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": {"name": "colony-placement-eu", "annotations": {VERSION_ANNOTATION: "7"}}}),
                )),
                ("GET", CONFIGMAP) => Some((200, configmap(7))),
                _ => panic!("unexpected request {s:?}"),
            }
        }));
        let cp = KubernetesControlPlane::new(client, "colony", "eu", Duration::from_secs(3));
        let reply = within(cp.heartbeat(&heartbeat())).await.expect("renewed");
        assert_eq!(reply.placement_version, 7, "the published version");
        // The watch had not delivered version 7: it was fetched, so the node can apply it now.
        let m = within(cp.placement_after(6))
            .await
            .expect("no error")
            .expect("a map");
        assert_eq!(m, map(7));

        let seen = requests_besides_the_watch(&seen);
        let calls: Vec<(&str, &str, &str, bool)> = seen
            .iter()
            .map(|s| {
                (
                    s.method.as_str(),
                    s.path.as_str(),
                    s.query.as_str(),
                    s.is_metadata_only(),
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                (
                    "PATCH",
                    LEASE,
                    "&force=true&fieldManager=colony-node",
                    false
                ),
                ("GET", CONFIGMAP, "", true),
                ("GET", CONFIGMAP, "", false),
            ]
        );
        let body = &seen[0].body;
        assert_eq!(body["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(body["kind"], "Lease");
        assert_eq!(body["metadata"]["name"], "ams-0");
        assert_eq!(body["metadata"]["labels"]["colony.dev/region"], "eu");
        assert_eq!(body["spec"]["holderIdentity"], "ams-0");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 3);
        let renewed: Timestamp = body["spec"]["renewTime"]
            .as_str()
            .expect("renewTime")
            .parse()
            .expect("a time");
        assert!(Timestamp::now().duration_since(renewed).as_secs() < 5);
    }

    #[tokio::test]
    async fn without_a_published_map_the_heartbeat_reports_version_zero() {
        let (client, seen) = mock(quiet_watch(|s| {
            match (s.method.as_str(), s.path.as_str()) {
                ("PATCH", LEASE) => Some((200, s.body.clone())),
                ("GET", CONFIGMAP) => Some((
                    404,
                    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                )),
                _ => panic!("unexpected request {s:?}"),
            }
        }));
        let cp = KubernetesControlPlane::new(client, "colony", "eu", Duration::from_secs(3));
        let reply = within(cp.heartbeat(&heartbeat())).await.expect("renewed");
        assert_eq!(reply.placement_version, 0);
        assert_eq!(
            requests_besides_the_watch(&seen).len(),
            2,
            "no map to fetch"
        );
    }

    #[tokio::test]
    async fn a_lease_that_cannot_be_written_or_a_foreign_region_is_an_error() {
        let (client, seen) = mock(quiet_watch(|s| {
            match (s.method.as_str(), s.path.as_str()) {
                ("PATCH", LEASE) => Some((
                    403,
                    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "leases \"ams-0\" is forbidden"}),
                )),
                _ => panic!("unexpected request {s:?}"),
            }
        }));
        let cp = KubernetesControlPlane::new(client, "colony", "eu", Duration::from_secs(3));
        let err = within(cp.heartbeat(&heartbeat()))
            .await
            .expect_err("refused");
        assert!(err.contains("cannot renew Lease ams-0"), "{err}");
        assert_eq!(
            requests_besides_the_watch(&seen).len(),
            1,
            "no version read after a failed renewal"
        );
        let mut foreign = heartbeat();
        foreign.region = "us".into();
        let err = within(cp.heartbeat(&foreign)).await.expect_err("refused");
        assert!(err.contains("not \"us\""), "{err}");
        assert_eq!(requests_besides_the_watch(&seen).len(), 1, "nothing sent");
    }

    #[tokio::test]
    async fn a_heartbeat_the_api_does_not_answer_fails_within_a_third_of_the_lease() {
        let (client, _seen) = mock(quiet_watch(|_| None));
        let cp = KubernetesControlPlane::new(client, "colony", "eu", Duration::from_millis(600));
        let started = std::time::Instant::now();
        let err = within(cp.heartbeat(&heartbeat()))
            .await
            .expect_err("timed out");
        assert!(err.contains("did not answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
