//! What every reconciler shares: the client, settings, the leadership, the node admin clients,
//! the Lease tracker, and the per-region state of hand-offs; plus the thin write helpers.

use crate::builders;
use crate::error::{Error, Result};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::node_admin::{AdminConnector, NodeAdmin};
use crate::region::{LeaseTracker, PlannedHandoff};
use crate::settings::{FIELD_MANAGER, Settings};
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

/// Locks a std mutex, carrying on with the data of a panicked holder (nothing here is left
/// half-updated by a panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hand-offs of one region: those running, and those done but not yet published.
#[derive(Default)]
struct Handoffs {
    in_flight: BTreeSet<(String, u32)>,
    done: Vec<PlannedHandoff>,
}

/// Per (Kubernetes namespace, region) state.
pub struct RegionState {
    /// Held by a region pass and by the publication of completed hand-offs; never while a
    /// hand-off runs.
    pub lock: tokio::sync::Mutex<()>,
    handoffs: Mutex<Handoffs>,
    /// Slots whose members may be fenced at a newer epoch than the map shows (see
    /// `region::finish_fenced`).
    fenced: Mutex<BTreeMap<(String, u32), u64>>,
    /// Number of hand-off batches running (tests wait for zero).
    running: watch::Sender<usize>,
}

impl Default for RegionState {
    fn default() -> Self {
        RegionState {
            lock: tokio::sync::Mutex::new(()),
            handoffs: Mutex::new(Handoffs::default()),
            fenced: Mutex::new(BTreeMap::new()),
            running: watch::channel(0).0,
        }
    }
}

impl RegionState {
    /// Slots with a hand-off in flight.
    pub fn busy(&self) -> BTreeSet<(String, u32)> {
        lock(&self.handoffs).in_flight.clone()
    }

    /// Completed hand-offs not published yet.
    pub fn done(&self) -> Vec<PlannedHandoff> {
        lock(&self.handoffs).done.clone()
    }

    /// Forgets completed hand-offs once a map including them (or superseding them) is out.
    pub fn clear_done(&self, published: &[PlannedHandoff]) {
        lock(&self.handoffs).done.retain(|h| !published.contains(h));
    }

    /// Slots fenced at an epoch the map may not show yet.
    pub fn fenced(&self) -> BTreeMap<(String, u32), u64> {
        lock(&self.fenced).clone()
    }

    /// Members of `colo`'s `slot` were (or may have been) fenced at `epoch`.
    pub fn note_fenced(&self, colo: &str, slot: u32, epoch: u64) {
        let mut f = lock(&self.fenced);
        let e = f.entry((colo.to_string(), slot)).or_insert(epoch);
        *e = (*e).max(epoch);
    }

    pub(crate) fn settle_fenced(&self, settled: &[(String, u32)]) {
        let mut f = lock(&self.fenced);
        for k in settled {
            f.remove(k);
        }
    }

    pub(crate) fn begin(&self, batch: &[PlannedHandoff]) {
        let mut h = lock(&self.handoffs);
        h.in_flight
            .extend(batch.iter().map(|x| (x.colo.clone(), x.slot)));
        self.running.send_modify(|n| *n += 1);
    }

    pub(crate) fn completed(&self, done: Vec<PlannedHandoff>) {
        lock(&self.handoffs).done.extend(done);
    }

    /// Frees the slots of hand-offs that ended (and were published, if done) while their batch
    /// runs on.
    pub(crate) fn release(&self, ended: &[PlannedHandoff]) {
        let mut h = lock(&self.handoffs);
        for x in ended {
            h.in_flight.remove(&(x.colo.clone(), x.slot));
        }
    }

    /// Ends a batch: frees the slots it has not released yet (`rest`).
    pub(crate) fn end(&self, rest: &[PlannedHandoff]) {
        self.release(rest);
        self.running.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Waits until no hand-off batch of the region runs (and its results were published).
    pub async fn settled(&self) {
        let mut rx = self.running.subscribe();
        // The sender lives in `self`: this cannot fail while we hold `&self`.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// What has been reported already (events and counters count episodes, not passes).
#[derive(Default)]
pub(crate) struct Reported {
    /// (namespace, node) whose failover has been announced.
    pub failing_over: BTreeSet<(String, String)>,
    /// (namespace, colo, slot) whose failover is blocked.
    pub blocked: BTreeSet<(String, String, u32)>,
}

/// Everything a reconciler needs; shared by all of them.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub connector: Arc<dyn AdminConnector>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every reconcile, pass and hand-off runs under it (see `Leadership::run`).
    pub leadership: Leadership,
    tracker: Mutex<LeaseTracker>,
    regions: Mutex<HashMap<(String, String), Arc<RegionState>>>,
    admins: Mutex<HashMap<String, Arc<dyn NodeAdmin>>>,
    pub(crate) reported: Mutex<Reported>,
    clock: Box<dyn Fn() -> Timestamp + Send + Sync>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        connector: Arc<dyn AdminConnector>,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        leadership: Leadership,
    ) -> Self {
        Context {
            client,
            settings,
            connector,
            recorder,
            metrics,
            leadership,
            tracker: Mutex::new(LeaseTracker::default()),
            regions: Mutex::new(HashMap::new()),
            admins: Mutex::new(HashMap::new()),
            reported: Mutex::new(Reported::default()),
            clock: Box::new(Timestamp::now),
        }
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    pub fn now_text(&self) -> String {
        let now = self.now();
        Timestamp::from_second(now.as_second())
            .unwrap_or(now)
            .to_string()
    }

    pub fn region(&self, ns: &str, region: &str) -> Arc<RegionState> {
        lock(&self.regions)
            .entry((ns.to_string(), region.to_string()))
            .or_default()
            .clone()
    }

    pub fn with_tracker<T>(&self, f: impl FnOnce(&mut LeaseTracker) -> T) -> T {
        f(&mut lock(&self.tracker))
    }

    /// The admin client for the nodes of `ns`, with the namespace's admin token: read from
    /// the Secret `colony-admin-token`, which is created (once, never rotated) when missing.
    pub async fn node_admin(&self, ns: &str) -> Result<Arc<dyn NodeAdmin>> {
        if let Some(a) = lock(&self.admins).get(ns) {
            return Ok(a.clone());
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let bad = |hint| Error::AdminToken {
            namespace: ns.to_string(),
            name: builders::ADMIN_TOKEN_SECRET.to_string(),
            hint,
        };
        let fix = "fix it, or delete it to have a new one made, then restart the operator and the node pods";
        let token = match secrets.get_opt(builders::ADMIN_TOKEN_SECRET).await? {
            Some(s) => builders::read_admin_token(&s).ok_or_else(|| bad(fix))?,
            None => {
                let token = hex::encode(colony_node::id::IdKeys::generate_key());
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..PostParams::default()
                };
                match secrets
                    .create(&pp, &builders::admin_token_secret(ns, &token)?)
                    .await
                {
                    Ok(_) => token,
                    // Created meanwhile (by a previous leader): that one is the token.
                    Err(kube::Error::Api(s)) if s.code == 409 => secrets
                        .get(builders::ADMIN_TOKEN_SECRET)
                        .await
                        .ok()
                        .and_then(|s| builders::read_admin_token(&s))
                        .ok_or_else(|| bad(fix))?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let admin = self.connector.connect(&token);
        lock(&self.admins).insert(ns.to_string(), admin.clone());
        Ok(admin)
    }

    /// A node refused the admin token (401): the Secret was replaced. The next reconcile
    /// reads it again.
    pub fn admin_refused(&self, ns: &str, error: &str) {
        if error.contains(" 401 ") && lock(&self.admins).remove(ns).is_some() {
            tracing::warn!(
                namespace = ns,
                "a node refused the admin token; reading it again"
            );
        }
    }

    pub async fn event(&self, on: &ObjectReference, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: "Failover".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, on).await {
            tracing::warn!(reason, error = %e, "cannot publish event");
        }
    }
}

/// Server-side apply under the operator's field manager, taking ownership of conflicting fields.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    Ok(api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Server-side apply of `status` on the status subresource.
pub async fn apply_status<K>(api: &Api<K>, name: &str, status: serde_json::Value) -> Result<()>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

pub fn ns_of<K: Resource>(obj: &K, kind: &'static str) -> Result<String> {
    obj.namespace().ok_or_else(|| Error::NoNamespace {
        kind,
        name: obj.name_any(),
    })
}

pub fn to_value<T: Serialize>(what: &'static str, v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(crate::error::ser(what))
}
