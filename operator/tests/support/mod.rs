//! Test support: YAML fixtures, sample objects, a scripted mock Kubernetes API server (kube-rs's
//! tower-test pattern) that asserts every request, and a fake node admin API.
#![allow(dead_code)]

use colony_node::lsn::Lsn;
use colony_node::placement::PlacementMap;
use colony_operator::crd::{Colo, ColoSpec, ObjectNamespace, ObjectNamespaceSpec};
use colony_operator::node_admin::{AdminConnector, NodeAdmin, SlotStatus};
use futures::future::BoxFuture;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tower_test::mock::Handle;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Compares `actual` with `operator/tests/fixtures/<name>` (YAML). With `UPDATE_FIXTURES=1` the
/// fixture is (re)written instead; review the diff before committing it.
/// A tool `scripts/install-k8s-tools` installs into target/tools/bin (or $COLONY_TOOLS_DIR/bin).
pub fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("COLONY_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools"));
    let path = dir.join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-k8s-tools (it installs helm, kubectl, kubernetes-validate and shellcheck into target/tools, or $COLONY_TOOLS_DIR)",
        path.display()
    );
    path
}

pub fn assert_fixture(name: &str, actual: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    if std::env::var_os("UPDATE_FIXTURES").is_some() {
        let text = serde_yaml::to_string(actual).expect("fixture serializes");
        std::fs::write(&path, text).expect("fixture written");
        return;
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e} (UPDATE_FIXTURES=1 writes it)",
            path.display()
        )
    });
    let expected: Value = serde_yaml::from_str(&text).expect("fixture is YAML");
    assert_eq!(
        &expected,
        actual,
        "{name} differs from its fixture; if the change is intended, rerun with UPDATE_FIXTURES=1 and review the diff\nactual:\n{}",
        serde_yaml::to_string(actual).unwrap_or_default()
    );
}

pub fn colo(name: &str, region: &str, nodes: i32, slots: i32) -> Colo {
    let mut c = Colo::new(
        name,
        ColoSpec {
            region: region.into(),
            nodes,
            image: None,
            resources: None,
            node_selector: None,
            tolerations: None,
            storage: Default::default(),
            slots,
        },
    );
    c.metadata.namespace = Some("colony".into());
    c.metadata.uid = Some(format!("uid-{name}"));
    c.metadata.generation = Some(1);
    c
}

pub fn object_namespace(
    name: &str,
    jurisdiction: Option<&str>,
    replicas: i32,
    quorum: i32,
) -> ObjectNamespace {
    let mut o = ObjectNamespace::new(
        name,
        ObjectNamespaceSpec {
            jurisdiction: jurisdiction.map(String::from),
            replicas,
            write_quorum: quorum,
            archive: Default::default(),
            limits: Default::default(),
        },
    );
    o.metadata.namespace = Some("colony".into());
    o.metadata.uid = Some(format!("uid-{name}"));
    o.metadata.generation = Some(2);
    o
}

pub fn list(kind_list: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind_list, "metadata": {"resourceVersion": "1"}, "items": items})
}

pub fn not_found(what: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{what} not found")})
}

type Check = Box<dyn FnOnce(&Value) + Send>;

/// One expected request and the answer to give.
pub struct Step {
    pub method: &'static str,
    pub path: String,
    pub check: Option<Check>,
    pub status: u16,
    pub response: Value,
    pub dynamic: Option<Box<dyn FnOnce() -> Value + Send>>,
    pub base: Option<Value>,
}

impl Step {
    pub fn new(method: &'static str, path: impl Into<String>) -> Self {
        Step {
            method,
            path: path.into(),
            check: None,
            status: 200,
            response: json!({}),
            dynamic: None,
            base: None,
        }
    }
    /// Answer a status patch with `object` carrying the patched status.
    pub fn echo_status_onto(mut self, object: Value) -> Self {
        self.status = 0;
        self.base = Some(object);
        self
    }
    /// Answer 200 with a body computed when the request arrives.
    pub fn respond_with(mut self, f: impl FnOnce() -> Value + Send + 'static) -> Self {
        self.dynamic = Some(Box::new(f));
        self
    }
    /// Assert on the request body.
    pub fn check(mut self, f: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }
    pub fn respond(mut self, status: u16, body: Value) -> Self {
        self.status = status;
        self.response = body;
        self
    }
    /// Answer with the request body itself (what an apply returns, near enough).
    pub fn echo(mut self) -> Self {
        self.status = 0;
        self
    }
}

/// Server-side apply of `path` under the operator's field manager, forced.
pub fn apply(path: &str) -> Step {
    Step::new(
        "PATCH",
        format!("{path}?fieldManager=colony-operator&force=true"),
    )
    .check(|b| {
        assert!(
            b.get("apiVersion").is_some() && b.get("kind").is_some(),
            "apply body must be a whole object: {b}"
        )
    })
    .echo()
}

fn normalize(path_and_query: &str) -> String {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort();
    if pairs.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", pairs.join("&"))
    }
}

/// A client whose API server answers `steps` in order, asserting each request; the returned
/// handle yields every request body seen, and fails if a request was missing or unexpected.
pub fn mock_client(steps: Vec<Step>) -> (Client, tokio::task::JoinHandle<Vec<(String, Value)>>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(serve(handle, steps));
    (Client::new(service, "colony"), task)
}

async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    steps: Vec<Step>,
) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    let total = steps.len();
    for (i, step) in steps.into_iter().enumerate() {
        let expected = format!("{} {}", step.method, normalize(&step.path));
        let Some((req, send)) = handle.next_request().await else {
            panic!("request {}/{total} never came: expected {expected}", i + 1);
        };
        let actual = format!(
            "{} {}",
            req.method(),
            normalize(
                &req.uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default()
            )
        );
        assert_eq!(actual, expected, "request {}/{total}", i + 1);
        let bytes = req.into_body().collect_bytes().await.expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        if let Some(check) = step.check {
            check(&body);
        }
        let (status, response) = if let Some(f) = step.dynamic {
            (200, f())
        } else if step.status == 0 {
            // An apply answers with the object, which always has metadata.
            let mut echoed = match step.base {
                Some(mut base) => {
                    base["status"] = body["status"].clone();
                    base
                }
                None => body.clone(),
            };
            if let Some(o) = echoed.as_object_mut() {
                o.entry("metadata")
                    .or_insert_with(|| json!({"name": "echoed"}));
            }
            (200, echoed)
        } else {
            (step.status, step.response)
        };
        seen.push((actual, body));
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(
                    serde_json::to_vec(&response).expect("response serializes"),
                ))
                .expect("response builds"),
        );
    }
    seen
}

/// A node admin API whose nodes answer from tables; records every call. Node names are the
/// first label of the address (`ams-1.ams.colony.svc:8787` → `ams-1`).
#[derive(Default)]
pub struct FakeAdmin {
    /// (node, colo, slot) → durable position; missing = see `default_durable`.
    pub durable: Mutex<BTreeMap<(String, String, u32), Lsn>>,
    /// Per node: the durable position of every slot; missing = the node does not answer.
    pub default_durable: Mutex<BTreeMap<String, Lsn>>,
    /// The placement the nodes have applied (slot reports follow it: role, epoch, version).
    pub applied: Mutex<Option<PlacementMap>>,
    /// Answer every hand-off with this error.
    pub handoff_error: Mutex<Option<String>>,
    /// When set, the next hand-off asked for waits (clearing it) until `handoff_released`.
    pub hold_next_handoff: std::sync::atomic::AtomicBool,
    pub handoff_released: std::sync::atomic::AtomicBool,
    pub calls: Mutex<Vec<String>>,
}

impl FakeAdmin {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
    pub fn apply(&self, map: &PlacementMap) {
        *self.applied.lock().expect("lock") = Some(map.clone());
    }
    fn answer(&self, node: &str, colo: &str, slot: u32) -> Option<Lsn> {
        let d = self.durable.lock().expect("lock");
        d.get(&(node.to_string(), colo.to_string(), slot))
            .copied()
            .or_else(|| {
                self.default_durable
                    .lock()
                    .expect("lock")
                    .get(node)
                    .copied()
            })
    }
}

pub fn node_of(address: &str) -> String {
    address.split('.').next().unwrap_or(address).to_string()
}

impl NodeAdmin for FakeAdmin {
    fn fence<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
        epoch: u64,
    ) -> BoxFuture<'a, Result<Lsn, String>> {
        let node = node_of(address);
        self.calls
            .lock()
            .expect("lock")
            .push(format!("fence {node} {colo}/{slot} epoch={epoch}"));
        let r = self
            .answer(&node, colo, slot)
            .ok_or_else(|| format!("{address}: connection refused"));
        Box::pin(async move { r })
    }
    fn handoff<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
        to: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<Lsn, String>> {
        let node = node_of(address);
        self.calls.lock().expect("lock").push(format!(
            "handoff {node} {colo}/{slot} to={to} epoch={epoch}"
        ));
        let err = self.handoff_error.lock().expect("lock").clone();
        let r = match err {
            Some(e) => Err(e),
            None => self
                .answer(&node, colo, slot)
                .ok_or_else(|| format!("{address}: connection refused")),
        };
        let held = self
            .hold_next_handoff
            .swap(false, std::sync::atomic::Ordering::AcqRel);
        Box::pin(async move {
            while held
                && !self
                    .handoff_released
                    .load(std::sync::atomic::Ordering::Acquire)
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            r
        })
    }
    fn status<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
    ) -> BoxFuture<'a, Result<SlotStatus, String>> {
        let node = node_of(address);
        self.calls
            .lock()
            .expect("lock")
            .push(format!("status {node} {colo}/{slot}"));
        let applied = self.applied.lock().expect("lock").clone();
        let r = self
            .answer(&node, colo, slot)
            .map(|durable| {
                let s = applied.as_ref().and_then(|m| m.replicas_of(colo, slot));
                SlotStatus {
                    role: match s {
                        Some(s) if s.owner == node => "owner".into(),
                        Some(s) if s.has(&node) => "follower".into(),
                        _ => "none".into(),
                    },
                    epoch: s.map_or(0, |s| s.epoch),
                    durable,
                    appended: durable,
                    placement_version: applied.as_ref().map_or(0, |m| m.version),
                }
            })
            .ok_or_else(|| format!("{address}: connection refused"));
        Box::pin(async move { r })
    }
}

/// Hands out one fake admin client and records the tokens it was given.
pub struct FakeConnector {
    pub admin: Arc<FakeAdmin>,
    pub tokens: Mutex<Vec<String>>,
}

impl FakeConnector {
    pub fn new(admin: Arc<FakeAdmin>) -> Self {
        FakeConnector {
            admin,
            tokens: Mutex::new(Vec::new()),
        }
    }
}

impl AdminConnector for FakeConnector {
    fn connect(&self, token: &str) -> Arc<dyn NodeAdmin> {
        self.tokens.lock().expect("lock").push(token.to_string());
        self.admin.clone()
    }
}
