//! A node's part in the cluster: which slots it owns or follows, its lease, its replication
//! links, and where an object lives.
//!
//! A standalone node (no control plane configured) is a cluster of one: it owns every slot of its
//! colo, with no followers, and its lease never lapses. Everything goes through the same path.

pub mod applier;
pub mod checkpointer;
pub mod control;
pub mod journal;
pub mod kubernetes;
pub mod lease;
pub mod links;
pub mod peer_client;
pub mod ring;
pub mod slot;
pub mod sync;
pub mod wire;

use self::applier::Applier;
use self::control::{ControlPlane, Heartbeat};
use self::journal::{JournalState, Line, SlotJournal};
use self::lease::Lease;
use self::links::Links;
use self::peer_client::PeerClient;
use self::slot::{Phase, Role, Slot};
use self::wire::Frame;
use crate::error::ApiError;
use crate::id::{ObjectId, tag16};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::placement::{ColoSlots, NodeInfo, PlacementMap, SlotReplicas};
use crate::storage::log::NodeLog;
use crate::storage::record::{Entry, ObjectKey, SlotKey, SlotPos};
use futures::future::BoxFuture;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

/// What the cluster needs from the node's objects.
pub trait SlotHost: Send + Sync {
    /// Closes every open object of `slot` (its owner role ended); resolves when all are closed.
    fn close_slot(&self, slot: SlotKey) -> BoxFuture<'static, ()>;
    /// A consistent copy of an owned object's database and the slot position of its last entry.
    fn snapshot(&self, object: ObjectKey) -> BoxFuture<'static, Result<(Vec<u8>, Lsn), ApiError>>;
}

/// Where a request for an object should go.
pub enum Route {
    Local(Arc<Slot>),
    Remote { node: String, address: String },
}

pub struct Cluster {
    pub admin_token: Option<String>,
    pub me: String,
    pub colo: String,
    pub region: String,
    pub advertise: String,
    pub standalone: bool,
    /// What the slots' rings (entries kept to resend) hold together.
    pub rings: Arc<ring::RingBudget>,
    pub source_address: Option<IpAddr>,
    pub lease: Lease,
    pub log: NodeLog,
    pub journal: SlotJournal,
    pub links: Links,
    pub applier: Applier,
    pub peers: PeerClient,
    pub metrics: Arc<Metrics>,
    pub namespaces: Arc<HashMap<String, Arc<Namespace>>>,
    placement: RwLock<Arc<PlacementMap>>,
    slots: RwLock<HashMap<SlotKey, Arc<Slot>>>,
    /// The slots the placement map makes this node owner of: the background tick looks at these
    /// often and at all slots only now and then.
    owned: RwLock<Vec<Arc<Slot>>>,
    /// What the journal and recovery said about each slot when the node started.
    initial: Mutex<JournalState>,
    /// Recovered entries of slots not created yet (see `Slot::new`); taken at creation.
    recovered_recent: Mutex<HashMap<SlotKey, VecDeque<Entry>>>,
    host: OnceLock<Weak<dyn SlotHost>>,
    /// Largest write quorum configured over the namespaces.
    pub configured_quorum: usize,
    ownership_log: Mutex<Option<std::fs::File>>,
    pub data_dir: PathBuf,
    syncing: Mutex<std::collections::HashSet<SlotKey>>,
}

pub struct ClusterSetup {
    /// Required on this node's admin and internal APIs, and sent to peers'.
    pub admin_token: Option<String>,
    pub me: String,
    pub colo: String,
    pub region: String,
    pub advertise: String,
    pub source_address: Option<IpAddr>,
    /// `None`: standalone.
    pub lease_duration: Option<Duration>,
    pub slot_count: u32,
    pub log: NodeLog,
    pub journal: SlotJournal,
    pub journal_state: JournalState,
    pub recovered_positions: HashMap<SlotKey, SlotPos>,
    /// Each slot's newest entries in the local log, to resend from after a restart.
    pub recovered_recent: HashMap<SlotKey, VecDeque<Entry>>,
    pub applier: Applier,
    pub metrics: Arc<Metrics>,
    pub namespaces: Arc<HashMap<String, Arc<Namespace>>>,
    pub data_dir: PathBuf,
}

/// The placement of a standalone node: it owns every slot of its colo.
pub fn standalone_placement(me: &NodeInfo, region: &str, slot_count: u32) -> PlacementMap {
    let slots = (0..slot_count)
        .map(|_| SlotReplicas::new(1, &me.name, &[]))
        .collect();
    PlacementMap {
        region: region.to_string(),
        version: 1,
        slot_count,
        replicas: 1,
        nodes: BTreeMap::from([(me.name.clone(), me.clone())]),
        colos: BTreeMap::from([(me.colo.clone(), ColoSlots { slots })]),
    }
}

fn hash_to(id: &ObjectId, n: usize) -> usize {
    let b = id.as_bytes();
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[16..24]);
    (u64::from_be_bytes(x) % n.max(1) as u64) as usize
}

impl Cluster {
    pub fn new(setup: ClusterSetup) -> Arc<Cluster> {
        let mut initial = setup.journal_state;
        for (slot, pos) in setup.recovered_positions {
            let e = initial.positions.entry(slot).or_insert(pos);
            if pos.lsn > e.lsn {
                *e = pos;
            }
        }
        // A sync cut short left files that match no position: start the slot from nothing, so
        // its owner asks for a fresh sync.
        for slot in &initial.interrupted_syncs {
            initial.positions.insert(slot.clone(), SlotPos::START);
        }
        let me_info = NodeInfo {
            name: setup.me.clone(),
            colo: setup.colo.clone(),
            address: setup.advertise.clone(),
        };
        let standalone = setup.lease_duration.is_none();
        let placement = if standalone {
            standalone_placement(&me_info, &setup.region, setup.slot_count)
        } else {
            PlacementMap {
                region: setup.region.clone(),
                version: 0,
                slot_count: setup.slot_count,
                replicas: 1,
                nodes: BTreeMap::new(),
                colos: BTreeMap::new(),
            }
        };
        let configured_quorum = setup
            .namespaces
            .values()
            .map(|n| n.config.replication.write_quorum)
            .max()
            .unwrap_or(1);
        let ownership_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(setup.data_dir.join("ownership.log"))
            .ok();
        Arc::new(Cluster {
            me: setup.me,
            colo: setup.colo,
            region: setup.region,
            advertise: setup.advertise,
            standalone,
            rings: ring::RingBudget::new(ring::NODE_RING_BYTES),
            source_address: setup.source_address,
            lease: match setup.lease_duration {
                Some(d) => Lease::new(d),
                None => Lease::always_valid(),
            },
            log: setup.log,
            journal: setup.journal,
            links: Links::default(),
            applier: setup.applier,
            peers: PeerClient::with_token(setup.source_address, setup.admin_token.as_deref()),
            admin_token: setup.admin_token,
            metrics: setup.metrics,
            namespaces: setup.namespaces,
            placement: RwLock::new(Arc::new(placement)),
            slots: RwLock::new(HashMap::new()),
            owned: RwLock::new(Vec::new()),
            initial: Mutex::new(initial),
            recovered_recent: Mutex::new(setup.recovered_recent),
            host: OnceLock::new(),
            configured_quorum,
            ownership_log: Mutex::new(ownership_log),
            data_dir: setup.data_dir,
            syncing: Mutex::new(Default::default()),
        })
    }

    pub fn set_host(&self, host: Weak<dyn SlotHost>) {
        let _ = self.host.set(host);
    }

    fn host(&self) -> Option<Arc<dyn SlotHost>> {
        self.host.get().and_then(Weak::upgrade)
    }

    pub fn placement(&self) -> Arc<PlacementMap> {
        self.placement
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn address_of(&self, node: &str) -> Option<String> {
        self.placement().node(node).map(|n| n.address.clone())
    }

    /// The slot, created with what the journal and recovery know about it and the role the
    /// current placement gives it.
    pub fn slot(self: &Arc<Self>, key: &SlotKey) -> Arc<Slot> {
        if let Some(s) = self.slots.read().ok().and_then(|m| m.get(key).cloned()) {
            return s;
        }
        let (slot, created) = {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            match slots.get(key) {
                Some(s) => (s.clone(), false),
                None => {
                    let init = self.initial.lock().unwrap_or_else(|p| p.into_inner());
                    let recent = self
                        .recovered_recent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(key)
                        .unwrap_or_default();
                    let s = Arc::new(Slot::new(
                        key.clone(),
                        init.fenced.get(key).copied().unwrap_or(0),
                        init.positions.get(key).copied().unwrap_or_default(),
                        init.floors.get(key).cloned().unwrap_or_default(),
                        recent,
                        self.rings.clone(),
                    ));
                    slots.insert(key.clone(), s.clone());
                    (s, true)
                }
            }
        };
        if created {
            let map = self.placement();
            if let Some(r) = map.replicas_of(&key.colo, key.slot)
                && r.has(&self.me)
            {
                slot.set_replicas(self, Some(r), self.configured_quorum);
            }
        }
        slot
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The share of all slots that background tick `round` sweeps (see [`sweep_share`]). Shares
    /// follow the map's order, which a newly created slot can reshuffle: while slots are being
    /// created (placement changes) one may be missed for a second; once they stop, every slot is
    /// swept once a second again.
    fn slots_to_sweep(&self, round: u64) -> Vec<Arc<Slot>> {
        self.slots
            .read()
            .map(|m| {
                let share = sweep_share(m.len(), round, SWEEP_ROUNDS);
                m.values()
                    .skip(share.start)
                    .take(share.len())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The home colo of an object: encoded in unique IDs; named IDs are spread over the region's
    /// colos by hash (a directory of first-use colos is future work).
    pub fn home_colo(&self, map: &PlacementMap, id: &ObjectId) -> Result<String, ApiError> {
        match id.home_colo_tag() {
            Some(tag) => map
                .colos
                .keys()
                .find(|c| tag16("colo", c) == tag)
                .cloned()
                .ok_or_else(|| {
                    ApiError::new(
                        421,
                        "wrong_region",
                        format!(
                            "object {id} belongs to a colo outside region {:?}",
                            map.region
                        ),
                    )
                }),
            None => {
                let colos: Vec<&String> = map.colos.keys().collect();
                if colos.is_empty() {
                    return Err(ApiError::unavailable(
                        "no_placement",
                        "the cluster has not placed any slots yet; retry shortly",
                    ));
                }
                Ok(colos[hash_to(id, colos.len())].clone())
            }
        }
    }

    pub fn slot_key_of(&self, id: &ObjectId) -> Result<SlotKey, ApiError> {
        let map = self.placement();
        let colo = self.home_colo(&map, id)?;
        Ok(SlotKey::new(&colo, id.slot(map.slot_count)))
    }

    /// Where requests for `id` go now.
    pub fn route(self: &Arc<Self>, id: &ObjectId) -> Result<Route, ApiError> {
        let map = self.placement();
        let colo = self.home_colo(&map, id)?;
        let slot_no = id.slot(map.slot_count);
        let Some(replicas) = map.replicas_of(&colo, slot_no) else {
            return Err(ApiError::unavailable(
                "no_placement",
                "the slot has no owner yet; retry shortly",
            ));
        };
        if replicas.owner == self.me {
            return Ok(Route::Local(self.slot(&SlotKey::new(&colo, slot_no))));
        }
        match map.node(&replicas.owner) {
            Some(n) => Ok(Route::Remote {
                node: n.name.clone(),
                address: n.address.clone(),
            }),
            None => Err(ApiError::unavailable(
                "no_placement",
                "the slot's owner is unknown; retry shortly",
            )),
        }
    }

    /// The slot of `key` if this node can hand out snapshots of it (see [`Slot::can_snapshot`]).
    pub fn snapshot_slot(self: &Arc<Self>, key: &ObjectKey) -> Result<Arc<Slot>, ApiError> {
        let slot_key = self.slot_key_of(&key.id)?;
        let slot = self.slot(&slot_key);
        if slot.can_snapshot() && self.lease.valid() {
            Ok(slot)
        } else {
            Err(ApiError::unavailable(
                "not_owner",
                format!("this node does not serve slot {slot_key} right now; retry"),
            ))
        }
    }

    /// The slot of `key`, if this node serves it now; waits (up to 3 s) while ownership is on
    /// the move towards or away from this node, so a request arriving then is not refused
    /// needlessly.
    pub fn serving_slot(self: &Arc<Self>, key: &ObjectKey) -> Result<Arc<Slot>, ApiError> {
        let slot_key = self.slot_key_of(&key.id)?;
        let slot = self.slot(&slot_key);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if slot.serving() && self.lease.valid() {
                return Ok(slot);
            }
            // Moments that pass by themselves: recovery or a hand-off under way, a new map
            // applied partly (see `placement_names_me_owner`), or one announced by the lease's
            // renewal and not applied yet.
            let role = slot.role();
            let moving = matches!(
                role,
                Role::Owner {
                    phase: Phase::Recovering | Phase::Draining,
                    ..
                }
            ) || (!matches!(role, Role::Owner { .. })
                && self.placement_names_me_owner(&slot_key))
                || self.lease.catching_up_with_placement();
            if !moving || Instant::now() > deadline {
                let why = if !self.lease.valid() {
                    "its lease is not current"
                } else {
                    "ownership moved"
                };
                return Err(ApiError::unavailable(
                    "not_owner",
                    format!("this node does not serve slot {slot_key} right now ({why}); retry"),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the current placement map names this node the owner of `key`. Between storing a
    /// new map and giving each slot its role (`apply_placement` walks thousands of slots),
    /// requests already route here while the slot is still a follower; they wait for the role
    /// instead of being refused (a refused request waits for the map to name another owner,
    /// which it never will).
    fn placement_names_me_owner(&self, key: &SlotKey) -> bool {
        self.placement()
            .replicas_of(&key.colo, key.slot)
            .is_some_and(|r| r.owner == self.me)
    }

    /// The slot of `key` if this node serves it at this moment; never waits.
    pub fn serving_slot_now(self: &Arc<Self>, key: &ObjectKey) -> Option<Arc<Slot>> {
        let slot = self.slot(&self.slot_key_of(&key.id).ok()?);
        (slot.serving() && self.lease.valid()).then_some(slot)
    }

    /// Applies a newer placement map: roles of every slot this node is in (or was in).
    pub fn apply_placement(self: &Arc<Self>, map: PlacementMap) {
        let current = self.placement();
        if map.version <= current.version && !current.colos.is_empty() {
            return;
        }
        let version = map.version;
        let map = Arc::new(map);
        if let Ok(mut p) = self.placement.write() {
            *p = map.clone();
        }
        let mut touched: HashSet<SlotKey> = HashSet::new();
        let mut owned = Vec::new();
        for (colo, slots) in &map.colos {
            for (i, r) in slots.slots.iter().enumerate() {
                if r.has(&self.me) {
                    let key = SlotKey::new(colo, i as u32);
                    let slot = self.slot(&key);
                    slot.set_replicas(self, Some(r), self.configured_quorum);
                    if r.owner == self.me {
                        owned.push(slot);
                    }
                    touched.insert(key);
                }
            }
        }
        if let Ok(mut o) = self.owned.write() {
            *o = owned;
        }
        // Slots this node no longer takes part in.
        for slot in self.slots() {
            if !touched.contains(&slot.key) && slot.role() != Role::None {
                slot.set_replicas(self, None, self.configured_quorum);
            }
        }
        // Every slot this node takes part in exists now, seeded; the recovered entries of any
        // other slot would only take memory (up to 4 MiB a slot).
        if !touched.is_empty()
            && let Ok(mut recent) = self.recovered_recent.lock()
            && !recent.is_empty()
        {
            *recent = HashMap::new();
        }
        self.lease.placement_applied(version);
        tracing::info!(version, slots = touched.len(), "placement applied");
    }

    pub fn on_link_up(self: &Arc<Self>, node: &str) {
        for slot in self.slots() {
            slot.on_link_up(self, node);
        }
    }

    pub fn on_frame_from_follower(self: &Arc<Self>, node: &str, frame: Frame) {
        match frame {
            Frame::Ack { slot, lsn } => self.slot(&slot).on_ack(self, node, lsn),
            Frame::Status {
                slot,
                fenced,
                position,
                state,
            } => self
                .slot(&slot)
                .on_status(self, node, fenced, position, state),
            other => tracing::debug!(node, ?other, "unexpected frame from a follower"),
        }
    }

    /// Closes this node's open objects of a slot it stopped owning, then lets entries apply.
    pub fn close_local_objects(self: &Arc<Self>, slot: Arc<Slot>) {
        let Some(host) = self.host() else {
            slot.closed_local_objects();
            return;
        };
        let fut = host.close_slot(slot.key.clone());
        tokio::spawn(async move {
            fut.await;
            slot.closed_local_objects();
        });
    }

    pub fn snapshot(
        &self,
        object: ObjectKey,
    ) -> BoxFuture<'static, Result<(Vec<u8>, Lsn), ApiError>> {
        match self.host() {
            Some(h) => h.snapshot(object),
            None => Box::pin(async {
                Err(ApiError::unavailable(
                    "shutting_down",
                    "the node is shutting down",
                ))
            }),
        }
    }

    /// Records that this node accepted writes for `slot` as owner in `epoch` (for audits and the
    /// split-brain check of the fault-injection tests).
    pub fn note_owner_epoch(&self, slot: &SlotKey, epoch: u64) {
        if let Ok(mut f) = self.ownership_log.lock()
            && let Some(f) = f.as_mut()
        {
            let _ = writeln!(f, "{} {} {} {}", self.me, slot.colo, slot.slot, epoch);
        }
    }

    /// Starts a snapshot sync of `slot` from its owner unless one is running.
    pub fn start_sync(self: &Arc<Self>, slot: SlotKey) {
        {
            let mut running = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
            if !running.insert(slot.clone()) {
                return;
            }
        }
        let cl = self.clone();
        tokio::spawn(async move {
            let result = sync::sync_slot(&cl, &slot).await;
            if let Err(e) = &result {
                tracing::warn!(%slot, error = %e, "snapshot sync failed; the owner will ask again");
            }
            cl.syncing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&slot);
        });
    }

    pub fn metrics_log_failure(&self) {
        self.metrics.replication.log_failures.inc();
    }
    pub fn metrics_sync_required(&self) {
        self.metrics.replication.syncs_requested.inc();
    }
    pub fn metrics_resend(&self) {
        self.metrics.replication.resends.inc();
    }
    pub fn metrics_resend_skipped(&self) {
        self.metrics.replication.resends_skipped.inc();
    }
    pub fn metrics_gap(&self) {
        self.metrics.replication.gaps.inc();
    }
    pub fn metrics_corrupt_frame(&self) {
        self.metrics.replication.corrupt_frames.inc();
    }

    /// A node whose log cannot be written stops renewing its lease: its slots move elsewhere.
    pub fn healthy(&self) -> bool {
        self.log.shared().healthy()
    }

    /// Every voter-or-receiver slot's durable position, journaled so restarts know them.
    fn save_positions(&self, saved: &mut HashMap<SlotKey, SlotPos>) {
        let upto = self.log.shared().durable_lsn();
        let mut lines = Vec::new();
        let mut changed = Vec::new();
        for slot in self.slots() {
            let st = slot.lock();
            let pos = st.durable;
            let floors_passed = !st.floors.is_empty() && st.floors.values().all(|f| pos.lsn >= *f);
            drop(st);
            if saved.get(&slot.key) != Some(&pos) {
                lines.push(Line::position(&slot.key, pos));
                changed.push((slot.key.clone(), pos));
            }
            if floors_passed {
                slot.lock().floors.clear();
                lines.push(Line::ClearFloors {
                    colo: slot.key.colo.to_string(),
                    slot: slot.key.slot,
                });
            }
        }
        match self.journal.record(&lines) {
            Ok(()) => {
                saved.extend(changed);
                // Records up to `upto` no longer carry the only copy of a slot position.
                self.log.shared().set_retire_limit(upto);
            }
            Err(e) => tracing::error!(error = %e, "cannot journal slot positions"),
        }
    }

    /// Background work: lease renewal, placement watch, releasing and probing, position saving.
    pub fn spawn_background(self: &Arc<Self>, control: Option<Arc<dyn ControlPlane>>) {
        let cl = self.clone();
        tokio::spawn(async move {
            let mut saved = HashMap::new();
            let mut tick = tokio::time::interval(BACKGROUND_TICK);
            let mut last_save = Instant::now();
            let mut round = 0u64;
            loop {
                tick.tick().await;
                // Owners by the map every tick; every slot once a second, for roles that lag the
                // map (and nodes without a control plane, which have no map).
                let owned = cl.owned.read().map(|o| o.clone()).unwrap_or_default();
                for slot in owned.iter().chain(&cl.slots_to_sweep(round)) {
                    slot.poke(&cl);
                }
                round = round.wrapping_add(1);
                cl.metrics
                    .replication
                    .ring_bytes
                    .set(cl.rings.bytes() as i64);
                if last_save.elapsed() > Duration::from_secs(2) {
                    last_save = Instant::now();
                    let c = cl.clone();
                    let mut s = std::mem::take(&mut saved);
                    saved = tokio::task::spawn_blocking(move || {
                        c.save_positions(&mut s);
                        s
                    })
                    .await
                    .unwrap_or_default();
                }
            }
        });
        let Some(control) = control else { return };
        let cl = self.clone();
        let hb_control = control.clone();
        tokio::spawn(async move {
            let period = cl.lease.duration() / 3;
            let hb = Heartbeat {
                node: NodeInfo {
                    name: cl.me.clone(),
                    colo: cl.colo.clone(),
                    address: cl.advertise.clone(),
                },
                region: cl.region.clone(),
                lease_ms: cl.lease.duration().as_millis() as u64,
            };
            loop {
                if cl.healthy() {
                    let sent = Instant::now();
                    match hb_control.heartbeat(&hb).await {
                        Ok(reply) => cl.lease.renewed(sent, reply.placement_version),
                        Err(e) => tracing::warn!(error = %e, "heartbeat not renewed"),
                    }
                } else {
                    tracing::warn!("the node log cannot be written: not renewing the lease");
                }
                tokio::time::sleep(period).await;
            }
        });
        let cl = self.clone();
        tokio::spawn(async move {
            loop {
                let after = cl.placement().version;
                match control.placement_after(after).await {
                    Ok(Some(map)) => {
                        let c = cl.clone();
                        let _ = tokio::task::spawn_blocking(move || c.apply_placement(map)).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot fetch the placement map");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
    }
}

/// How often the background loop pokes the slots this node owns.
const BACKGROUND_TICK: Duration = Duration::from_millis(50);
/// Ticks over which the background loop sweeps every slot once (20 × 50 ms: once a second).
const SWEEP_ROUNDS: u64 = 20;

/// Which of `len` slots tick `round` sweeps: a `rounds`-th of them, in turn, so that any
/// `rounds` consecutive ticks cover every slot once.
///
/// Spread rather than all at once: a node holds thousands of slots (1024 per colo, times the
/// colos it replicates), and poking every one in a single tick took a third of a millisecond of
/// one CPU each second, which showed in replicated write latency at the 99th percentile.
fn sweep_share(len: usize, round: u64, rounds: u64) -> std::ops::Range<usize> {
    let rounds = rounds.max(1);
    let k = (round % rounds) as u128;
    let bound = |k: u128| (len as u128 * k / rounds as u128) as usize;
    bound(k)..bound(k + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any `rounds` consecutive ticks sweep every slot exactly once, in shares that differ by at
    /// most one slot — whether there are fewer slots than rounds, a multiple of them, or neither.
    #[test]
    fn consecutive_sweep_rounds_cover_every_slot_once_in_even_shares() {
        for len in [0usize, 1, 7, 19, 20, 21, 1024, 5120, 5121] {
            for first in [0u64, 3, 19, 20, 1_000_003] {
                let mut seen = vec![0u32; len];
                let mut sizes = Vec::new();
                for i in 0..SWEEP_ROUNDS {
                    let share = sweep_share(len, first + i, SWEEP_ROUNDS);
                    sizes.push(share.len());
                    for s in share {
                        seen[s] += 1;
                    }
                }
                assert!(
                    seen.iter().all(|&n| n == 1),
                    "{len} slots from round {first}: {seen:?}"
                );
                let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
                assert!(
                    hi.zip(lo).is_some_and(|(h, l)| h - l <= 1),
                    "{len} slots: uneven shares {sizes:?}"
                );
            }
        }
        assert_eq!(
            sweep_share(10, 0, 0),
            0..10,
            "zero rounds sweeps everything"
        );
    }

    /// Applies `map` on another thread a moment from now, as a node does while requests for the
    /// slots it changes keep arriving.
    fn apply_shortly(cluster: &Arc<Cluster>, map: PlacementMap) -> std::thread::JoinHandle<()> {
        let cluster = cluster.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cluster.apply_placement(map);
        })
    }

    /// Node "n1" of colo "c" (4 slots) over real files in `dir`, with no control plane: tests
    /// give it leases and placement maps themselves. Keep the runner: it stops the log.
    fn node_n1(dir: &std::path::Path) -> (crate::storage::log::LogRunner, Arc<Cluster>) {
        node_n1_with_lease(dir, Some(Duration::from_secs(10)))
    }

    /// Node n1; a `lease_duration` of `None` makes it standalone.
    fn node_n1_with_lease(
        dir: &std::path::Path,
        lease_duration: Option<Duration>,
    ) -> (crate::storage::log::LogRunner, Arc<Cluster>) {
        let metrics = Metrics::new();
        let runner = crate::storage::log::start(&dir.join("log"), 64 << 10, 0, metrics.log.clone())
            .expect("log");
        let (journal, journal_state) =
            SlotJournal::open(&dir.join("slots.journal")).expect("journal");
        let namespaces = Arc::new(HashMap::new());
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects).expect("objects dir");
        let applier = Applier::start(
            objects,
            namespaces.clone(),
            runner.log(),
            dir.join("log"),
            metrics.objects.sync_failed.clone(),
        )
        .expect("applier");
        let cluster = Cluster::new(ClusterSetup {
            admin_token: None,
            me: "n1".into(),
            colo: "c".into(),
            region: "r".into(),
            advertise: "127.0.0.1:1".into(),
            source_address: None,
            lease_duration,
            slot_count: 4,
            log: runner.log(),
            journal,
            journal_state,
            recovered_positions: HashMap::new(),
            recovered_recent: HashMap::new(),
            applier,
            metrics,
            namespaces,
            data_dir: dir.to_path_buf(),
        });
        (runner, cluster)
    }

    /// Version `version` of a map of nodes n1 and n2 that gives every slot of colo "c" to
    /// `owner` at `epoch`, with `followers`.
    fn every_slot(version: u64, epoch: u64, owner: &str, followers: &[&str]) -> PlacementMap {
        let node = |name: &str| NodeInfo {
            name: name.into(),
            colo: "c".into(),
            address: "127.0.0.1:1".into(),
        };
        PlacementMap {
            region: "r".into(),
            version,
            slot_count: 4,
            replicas: 1 + followers.len(),
            nodes: ["n1", "n2"]
                .into_iter()
                .map(|n| (n.to_string(), node(n)))
                .collect(),
            colos: BTreeMap::from([(
                "c".to_string(),
                ColoSlots {
                    slots: (0..4)
                        .map(|_| SlotReplicas::new(epoch, owner, followers))
                        .collect(),
                },
            )]),
        }
    }

    /// [`node_n1`], given every slot at epoch 1 with no followers (version 1 of the map); an
    /// object and its slot.
    fn n1_owning_every_slot_alone(
        dir: &std::path::Path,
    ) -> (
        crate::storage::log::LogRunner,
        Arc<Cluster>,
        ObjectKey,
        Arc<Slot>,
    ) {
        let (runner, cluster) = node_n1(dir);
        let object = ObjectKey::new("ns".into(), ObjectId::from_bytes([7; 32]));
        cluster.lease.renewed(Instant::now(), 1);
        cluster.apply_placement(every_slot(1, 1, "n1", &[]));
        let slot = cluster.serving_slot(&object).expect("n1 owns the slot");
        (runner, cluster, object, slot)
    }

    /// Writes an entry for `object` through `slot`, owned by this node alone (write quorum 1),
    /// and waits until it is acknowledged; its position.
    fn write_alone(cluster: &Arc<Cluster>, slot: &Arc<Slot>, object: &ObjectKey) -> SlotPos {
        let (answered, answer) = std::sync::mpsc::channel();
        let entry = crate::storage::record::Entry::delete(object, &slot.key);
        let pos = slot
            .append(
                cluster,
                entry,
                1,
                false,
                Box::new(move |r| {
                    let _ = answered.send(r);
                }),
            )
            .expect("appended");
        answer
            .recv_timeout(Duration::from_secs(10))
            .expect("answered")
            .expect("acknowledged");
        pos
    }

    /// A follower logs entries lazily only for an owner that tells it when to commit them: from
    /// an owner of protocol version 1 (its hello carries no version) an entry is acknowledged at
    /// once, although lazy records here would wait a minute; from a version 2 owner it waits for
    /// the owner's `SyncNow`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_logs_lazily_only_for_an_owner_that_says_when_to_commit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster) = node_n1(dir.path());
        cluster.log.set_lazy_delay(Duration::from_secs(60));
        cluster.lease.renewed(Instant::now(), 1);
        cluster.apply_placement(every_slot(1, 1, "n2", &["n1"]));
        // Reads frames until an ack arrives (true) or `wait` passes (false).
        async fn acked_within(owner: &mut tokio::io::DuplexStream, wait: Duration) -> bool {
            let mut buf = bytes::BytesMut::new();
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if let Some(f) = Frame::decode(&mut buf).expect("whole frames") {
                    assert!(matches!(f, Frame::Ack { .. }), "unexpected answer {f:?}");
                    return true;
                }
                match tokio::time::timeout_at(deadline, owner.read_buf(&mut buf)).await {
                    Ok(read) => assert!(read.expect("read") > 0, "the follower hung up"),
                    Err(_) => return false,
                }
            }
        }
        for (version, slot) in [(1u8, 0u32), (wire::PROTOCOL_VERSION, 1)] {
            let (mut owner, follower) = tokio::io::duplex(1 << 20);
            let served = tokio::spawn(crate::http::internal::serve_stream(
                cluster.clone(),
                follower,
            ));
            let key = SlotKey::new("c", slot);
            let object = ObjectKey::new("ns".into(), ObjectId::from_bytes([slot as u8; 32]));
            let mut entry = Entry::delete(&object, &key);
            entry.place_after(SlotPos::START, Lsn::new(1, 1));
            let mut out = bytes::BytesMut::new();
            Frame::Hello {
                node: "n2".into(),
                version,
            }
            .encode(&mut out);
            wire::append_frame(&entry, 1).encode(&mut out);
            owner.write_all(&out).await.expect("send");
            if version < wire::SYNC_NOW_SINCE {
                assert!(
                    acked_within(&mut owner, Duration::from_secs(10)).await,
                    "an old owner's entry is committed at once"
                );
            } else {
                assert!(
                    !acked_within(&mut owner, Duration::from_millis(500)).await,
                    "a lazy entry waits for the owner's word"
                );
                let mut sync_now = bytes::BytesMut::new();
                Frame::SyncNow.encode(&mut sync_now);
                owner.write_all(&sync_now).await.expect("send");
                assert!(
                    acked_within(&mut owner, Duration::from_secs(10)).await,
                    "committed once told to"
                );
            }
            drop(owner);
            served.await.expect("the stream ends with its owner");
        }
        drop(cluster);
        drop(runner);
    }

    /// A request that routes to this node in the moment between storing a placement map that
    /// makes it owner and giving the slot that role waits for the role and is served; refused,
    /// it had waited out its whole rerouting time (3 s) for a map naming another owner.
    #[test]
    fn a_request_in_the_moment_before_the_slot_takes_its_new_role_waits_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster) = node_n1(dir.path());
        let placement = every_slot;
        let object = ObjectKey::new("ns".into(), ObjectId::from_bytes([7; 32]));
        // n1 follows every slot of n2's.
        cluster.lease.renewed(Instant::now(), 1);
        cluster.apply_placement(placement(1, 1, "n2", &["n1"]));

        // Version 2 gives every slot to n1 alone (a slot given that role serves at once).
        // `apply_placement` stores the map, and gives the slots their roles a moment later.
        // (Not announced by a renewal here, so that the lease stays valid: that case is next.)
        *cluster.placement.write().expect("placement") = Arc::new(placement(2, 2, "n1", &[]));
        let applying = apply_shortly(&cluster, placement(3, 2, "n1", &[]));
        let answer = cluster.serving_slot(&object);
        applying.join().expect("apply");
        let slot = answer.expect("served once the slot took its role, not refused");
        assert!(slot.serving());

        // Announced but not applied yet: the lease is not valid for a moment; a request waits.
        cluster.lease.renewed(Instant::now(), 4);
        let applying = apply_shortly(&cluster, placement(4, 2, "n1", &[]));
        let answer = cluster.serving_slot(&object);
        applying.join().expect("apply");
        assert!(answer.is_ok(), "served once version 4 was applied");

        // A slot the map gives to another node is refused at once.
        cluster.lease.renewed(Instant::now(), 5);
        cluster.apply_placement(placement(5, 3, "n2", &[]));
        let started = Instant::now();
        let Err(refused) = cluster.serving_slot(&object) else {
            panic!("served a slot the map gives to n2");
        };
        assert_eq!(refused.code, "not_owner");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused without waiting: {:?}",
            started.elapsed()
        );
        drop(runner);
    }

    /// An owner published again at a newer epoch — as the control plane does after a hand-off
    /// whose answer was lost, at the epoch the owner may have fenced itself at — serves again
    /// once it has recovered. Its own durable writes are in its database already, so recovery
    /// must count them as applied rather than wait for the applier, which has nothing to apply.
    #[test]
    fn an_owner_published_again_at_a_newer_epoch_counts_its_own_writes_as_applied_and_serves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster, object, slot) = n1_owning_every_slot_alone(dir.path());
        write_alone(&cluster, &slot, &object);

        cluster.lease.renewed(Instant::now(), 2);
        cluster.apply_placement(every_slot(2, 2, "n1", &[]));
        let report = slot.report();
        assert_eq!(
            (report.role, report.phase, report.epoch),
            ("owner", Some(Phase::Serving), 2),
            "durable {} applied {}",
            report.durable,
            report.applied
        );
        assert!(cluster.serving_slot(&object).is_ok());
        drop(runner);
    }

    /// An owner's lease lapses while a write waits for its quorum; the object's next write is
    /// refused at once. Submitted through the object's gate as the actor does, the refusal must
    /// not answer for the waiting write: that one went to the followers and may survive on the
    /// next owner. Answered "not applied" (`not_owner`), a client saw its write served by the
    /// next owner after being told it had no effect (a fault-suite run found this). Once the
    /// slot moves away, both are answered `indeterminate`.
    #[test]
    fn a_write_refused_after_the_lease_lapsed_does_not_answer_for_one_still_waiting() {
        use crate::object::gate::Gate;
        use crate::object::submit_behind_gate;
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster) = node_n1_with_lease(dir.path(), Some(Duration::from_millis(1500)));
        let object = ObjectKey::new("ns".into(), ObjectId::from_bytes([7; 32]));
        cluster.lease.renewed(Instant::now(), 1);
        cluster.apply_placement(every_slot(1, 1, "n1", &[]));
        // Same owner and epoch, now with a voting follower that never answers: quorum 2 waits.
        cluster.lease.renewed(Instant::now(), 2);
        cluster.apply_placement(every_slot(2, 1, "n1", &["n2"]));
        let slot = cluster.serving_slot(&object).expect("n1 serves the slot");

        let gate = Arc::new(Gate::default());
        let responses: Vec<_> = (0..2)
            .map(|i| {
                if i == 0 {
                    // Valid for 1.2 s from here: the first write goes in well within it.
                    cluster.lease.renewed(Instant::now(), 2);
                } else {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while cluster.lease.valid() {
                        assert!(Instant::now() < deadline, "the lease never lapsed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                let entry = crate::storage::record::Entry::delete(&object, &slot.key);
                let submitted = submit_behind_gate(&gate, &slot, &cluster, entry, 2, false, || {});
                if let Err(e) = submitted {
                    assert_eq!((i, e.code), (1, "not_owner"), "only the second is refused");
                }
                let (tx, rx) = std::sync::mpsc::channel();
                gate.hold(Box::new(move |r| {
                    let _ = tx.send(r.map_err(|e| e.code));
                }));
                rx
            })
            .collect();
        assert!(gate.failed(), "the object resets before it executes more");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            responses[0].try_recv().is_err(),
            "the waiting write is not answered by the refusal"
        );

        cluster.lease.renewed(Instant::now(), 3);
        cluster.apply_placement(every_slot(3, 2, "n2", &["n1"]));
        for (i, rx) in responses.iter().enumerate() {
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(5)),
                Ok(Err("indeterminate")),
                "write {i}"
            );
        }
        drop(runner);
    }

    /// A standalone node keeps no entries to resend (nothing ever receives from it); a node of a
    /// cluster that owns a slot alone keeps them, for a follower that comes back.
    #[test]
    fn only_a_clustered_owner_keeps_entries_to_resend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster) = node_n1_with_lease(dir.path(), None);
        assert!(cluster.standalone);
        let object = ObjectKey::new("ns".into(), ObjectId::from_bytes([7; 32]));
        let slot = cluster.serving_slot(&object).expect("n1 owns the slot");
        for _ in 0..3 {
            write_alone(&cluster, &slot, &object);
        }
        assert_eq!(slot.ring_len(), 0);
        drop(runner);

        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster, object, slot) = n1_owning_every_slot_alone(dir.path());
        assert!(!cluster.standalone);
        for _ in 0..3 {
            write_alone(&cluster, &slot, &object);
        }
        assert_eq!(slot.ring_len(), 3);
        drop(runner);
    }

    /// Every frame that reaches a follower ahead of its position answers with the same gap, so a
    /// follower that fell behind with many frames in flight (or whose log keeps failing) reports
    /// one gap after another. The owner resends its recent entries once for them, not once per
    /// gap — that flood kept a follower just back from a full disk from being acknowledged for
    /// many seconds — and again only after a second, or once the link has reconnected.
    #[test]
    fn an_owner_resends_to_a_follower_once_for_a_run_of_gaps_at_the_same_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster, object, slot) = n1_owning_every_slot_alone(dir.path());
        let positions: Vec<SlotPos> = (0..3)
            .map(|_| write_alone(&cluster, &slot, &object))
            .collect();
        // n2 joins as a follower at the same epoch; it holds only the first entry.
        cluster.lease.renewed(Instant::now(), 2);
        cluster.apply_placement(every_slot(2, 1, "n1", &["n2"]));
        let resends = || cluster.metrics.replication.resends.get();
        let skipped = || cluster.metrics.replication.resends_skipped.get();
        let status = |state: crate::cluster::wire::FollowerState| {
            slot.on_status(&cluster, "n2", 1, positions[0], state)
        };
        let gap = || status(crate::cluster::wire::FollowerState::Gap);
        let stream = || {
            slot.report()
                .followers
                .iter()
                .find(|f| f.node == "n2")
                .map(|f| f.stream)
        };

        gap();
        assert_eq!((resends(), skipped()), (1, 0), "the first gap is answered");
        for _ in 0..5 {
            gap();
        }
        assert_eq!((resends(), skipped()), (1, 5), "its echoes are not");
        slot.on_link_up(&cluster, "n2");
        gap();
        assert_eq!(
            (resends(), skipped()),
            (2, 5),
            "a new connection gets the resend again"
        );
        std::thread::sleep(slot::RESEND_INTERVAL + Duration::from_millis(50));
        gap();
        assert_eq!(
            (resends(), skipped()),
            (3, 5),
            "and so does a gap a second later"
        );

        // The follower's log fails and drops what was resent: the echoes of the frames still
        // in flight are paced and leave it out of the stream, and its answer to the next probe
        // gets the resend at once, though the last went out less than a second before.
        status(crate::cluster::wire::FollowerState::Failing);
        gap();
        assert_eq!((resends(), skipped()), (3, 6));
        assert_eq!(stream(), Some(slot::Stream::Probing));
        status(crate::cluster::wire::FollowerState::Ok);
        assert_eq!(
            (resends(), skipped()),
            (4, 6),
            "a probe's answer is not paced"
        );
        assert_eq!(stream(), Some(slot::Stream::Streaming));
        drop(runner);
    }

    /// A slot runs one hand-off at a time. A second one, started while the first waits for its
    /// target, is refused with 409 `handoff_in_progress` and changes nothing: its drain guard
    /// could put the slot back to serving while the first one fenced it, and a write taken then
    /// could be acknowledged without the new owner. Once the first ends (here its caller gives
    /// up), the next may start; one whose target has everything fences the slot at its epoch. A
    /// hand-off's fence on a slot that is not draining fences nothing.
    #[test]
    fn a_slot_runs_one_hand_off_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster, object, slot) = n1_owning_every_slot_alone(dir.path());
        let written = write_alone(&cluster, &slot, &object);
        // n2 joins as a follower at the same epoch; it never answers, so it is not streaming.
        cluster.lease.renewed(Instant::now(), 2);
        cluster.apply_placement(every_slot(2, 1, "n1", &["n2"]));
        let handing_off = || slot.report().handing_off;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let first = tokio::spawn({
                let (slot, cluster) = (slot.clone(), cluster.clone());
                async move {
                    slot.handoff(&cluster, "n2", 2, Duration::from_secs(60))
                        .await
                }
            });
            while handing_off().is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let Err(second) = tokio::time::timeout(
                Duration::from_secs(1),
                slot.handoff(&cluster, "n2", 2, Duration::from_secs(60)),
            )
            .await
            .expect("answered at once, not waiting beside the first") else {
                panic!("a second hand-off ran beside the first");
            };
            assert_eq!((second.status, second.code), (409, "handoff_in_progress"));
            let report = slot.report();
            assert_eq!(
                (report.role, report.phase, report.epoch, report.fenced),
                ("owner", Some(Phase::Serving), 1, 1),
                "the first still waits for n2, serving"
            );
            assert_eq!(report.handing_off.as_deref(), Some("n2"));

            first.abort();
            assert!(first.await.is_err(), "the first hand-off was still waiting");
            assert_eq!(handing_off(), None, "an abandoned hand-off ends");
            let Err(third) = slot
                .handoff(&cluster, "n2", 2, Duration::from_millis(50))
                .await
            else {
                panic!("n2 never streamed, yet the slot was handed to it");
            };
            assert_eq!(third.code, "handoff_timeout", "{}", third.message);

            // A hand-off's fence, reached by a slot that is not draining (a new placement
            // moved it in the moment before): refused, and nothing fenced.
            let Err(interrupted) = slot.fence_drained(&cluster, 2, "n2") else {
                panic!("fenced a slot that was serving");
            };
            assert_eq!(
                (interrupted.status, interrupted.code),
                (409, "handoff_interrupted")
            );
            let report = slot.report();
            assert_eq!(
                (report.role, report.phase, report.fenced),
                ("owner", Some(Phase::Serving), 1)
            );

            // n2 reports it holds everything: the next hand-off drains and fences.
            slot.on_status(
                &cluster,
                "n2",
                1,
                written,
                crate::cluster::wire::FollowerState::Ok,
            );
            let handed = slot
                .handoff(&cluster, "n2", 2, Duration::from_secs(10))
                .await
                .expect("handed off");
            assert_eq!(handed, written);
        });
        let report = slot.report();
        assert_eq!((report.role, report.fenced), ("none", 2));
        assert_eq!(report.handing_off, None);
        drop(runner);
    }

    /// A follower that takes the replication upgrade and then drops the connection at once (the
    /// first five times; then it keeps one open for 1.5 s): the owner's link waits longer before
    /// each new attempt instead of reconnecting in a tight loop, and after a link that stayed up
    /// it reconnects at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_dropped_right_after_the_upgrade_backs_off_and_a_stable_one_reconnects_at_once()
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let (runner, cluster) = node_n1(dir.path());
        cluster
            .links
            .bind(&cluster, tokio::runtime::Handle::current());
        let follower = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut map = every_slot(1, 1, "n1", &["n2"]);
        if let Some(n2) = map.nodes.get_mut("n2") {
            n2.address = follower.local_addr().expect("addr").to_string();
        }
        cluster.lease.renewed(Instant::now(), 1);
        cluster.apply_placement(map);
        // Starts the link (the frame itself is dropped while the link is down).
        cluster.links.send(
            "n2",
            Frame::Hello {
                node: "n1".into(),
                version: wire::PROTOCOL_VERSION,
            },
        );

        const DROPPED_AT_ONCE: usize = 5;
        // When each connection was accepted and when it was closed.
        let mut accepted = Vec::new();
        let mut closed = Vec::new();
        while accepted.len() < DROPPED_AT_ONCE + 2 {
            let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), follower.accept())
                .await
                .expect("the link connects again")
                .expect("accept");
            accepted.push(Instant::now());
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                let n = conn.read(&mut byte).await.expect("read the upgrade");
                assert_eq!(n, 1, "the link sent a whole upgrade request");
                head.push(byte[0]);
            }
            conn.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: colony-replication\r\n\r\n",
            )
            .await
            .expect("answer the upgrade");
            if accepted.len() > DROPPED_AT_ONCE {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            // Before the close: the link cannot see it sooner, so each measured wait is at
            // least the link's.
            closed.push(Instant::now());
            drop(conn);
        }
        // Each of the first reconnections waits at least the backoff: 50 ms, doubling.
        let waits: Vec<Duration> = (1..=DROPPED_AT_ONCE)
            .map(|i| accepted[i] - closed[i - 1])
            .collect();
        for (i, wait) in waits.iter().enumerate() {
            let least = Duration::from_millis(50 << i);
            assert!(
                *wait >= least,
                "reconnection {} after {wait:?}, sooner than {least:?}: {waits:?}",
                i + 1
            );
        }
        // The link that stayed up 1.5 s reconnects at once, not after the grown backoff (800 ms).
        let again = accepted[DROPPED_AT_ONCE + 1] - closed[DROPPED_AT_ONCE];
        assert!(
            again < Duration::from_millis(500),
            "a stable link reconnected after {again:?}"
        );
        drop(runner);
    }
}
