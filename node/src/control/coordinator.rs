//! The local control plane: keeps the nodes' heartbeats, places slots, fails over the slots of a
//! node whose heartbeat lapsed, and hands slots back to their home colo once it is healthy again.
//! `colony-node dev` runs it next to the nodes; the tests run it as its own process. On
//! Kubernetes the operator does the same job with the same pure functions.
//!
//! Replica sets stay as placed: a node that goes away stays a member of its slots (it rejoins and
//! catches up when it returns). Permanent membership changes are the operator's business
//! (`placement::plan_membership`).

use super::admin_client::{NodeAdmin, unfenced_answer};
use crate::error::ApiError;
use crate::lsn::Lsn;
use crate::placement::{
    AssignInput, FollowerReport, NodeInfo, PlacementMap, SlotReplicas, assign_slots,
    choose_failover,
};
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub region: String,
    pub lease: Duration,
    pub slot_count: u32,
    pub replicas: usize,
    pub write_quorum: usize,
    /// Wait for this many nodes before the first placement (or 30 s).
    pub expect_nodes: usize,
    /// Where the placement map is kept across restarts of the coordinator.
    pub state_file: Option<PathBuf>,
}

struct Seen {
    info: NodeInfo,
    last: Instant,
    /// Healthy without interruption since.
    since: Instant,
}

struct State {
    nodes: BTreeMap<String, Seen>,
    /// Shared: the control loop reads it ten times a second, and a copy of thousands of
    /// replica sets each time was most of the control plane's CPU.
    map: Arc<PlacementMap>,
    started: Instant,
    blocked: HashSet<(String, u32)>,
    /// Slots whose followers were fenced at a newer epoch than the map shows (a failover that
    /// could not finish). The owner's entries are refused there now, so the epoch must be
    /// published, whoever ends up owning it.
    fenced: HashMap<(String, u32), u64>,
    /// Slots moved by an explicit hand-off: balancing leaves their owner alone until it fails.
    pinned: HashSet<(String, u32)>,
    /// The inputs (map version, settled nodes, pinned slots) for which the last hand-back pass
    /// found nothing to move: the same inputs need no new balancing computation.
    balanced: Option<(u64, Vec<String>, usize)>,
    /// A batch of hand-backs is running in the background.
    handing_back: bool,
    /// Slots with a hand-off under way, explicit or a hand-back: one at a time per slot, for
    /// two at once would race to publish and could leave the owner draining for neither.
    handing_off: HashSet<(String, u32)>,
}

pub struct Coordinator {
    pub cfg: CoordinatorConfig,
    state: Mutex<State>,
    pub changed: tokio::sync::Notify,
    admin: Arc<dyn NodeAdmin>,
    failovers: std::sync::atomic::AtomicU64,
    handoffs: std::sync::atomic::AtomicU64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub colo: String,
    pub address: String,
    pub healthy: bool,
    pub last_heartbeat_ms_ago: u64,
    pub slots_owned: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub region: String,
    pub placement_version: u64,
    pub lease_ms: u64,
    pub nodes: Vec<NodeStatus>,
    pub failovers: u64,
    pub handoffs: u64,
    /// Every healthy node has settled and the last hand-back pass over the current placement
    /// found nothing to move: locality and balance are restored after the last failover.
    pub balanced: bool,
}

impl Coordinator {
    pub fn new(cfg: CoordinatorConfig, admin: Arc<dyn NodeAdmin>) -> Arc<Self> {
        let map = cfg
            .state_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<PlacementMap>(&b).ok())
            .unwrap_or_else(|| PlacementMap {
                region: cfg.region.clone(),
                version: 0,
                slot_count: cfg.slot_count,
                replicas: cfg.replicas,
                nodes: BTreeMap::new(),
                colos: BTreeMap::new(),
            });
        Arc::new(Coordinator {
            cfg,
            state: Mutex::new(State {
                nodes: BTreeMap::new(),
                map: Arc::new(map),
                started: Instant::now(),
                blocked: HashSet::new(),
                fenced: HashMap::new(),
                pinned: HashSet::new(),
                balanced: None,
                handing_back: false,
                handing_off: HashSet::new(),
            }),
            changed: tokio::sync::Notify::new(),
            admin,
            failovers: 0.into(),
            handoffs: 0.into(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node renewed its lease; returns the current placement version.
    pub fn heartbeat(&self, node: NodeInfo) -> u64 {
        let now = Instant::now();
        let mut st = self.lock();
        let lease = self.cfg.lease;
        let seen = st.nodes.entry(node.name.clone()).or_insert(Seen {
            info: node.clone(),
            last: now,
            since: now,
        });
        if now.duration_since(seen.last) >= lease {
            seen.since = now;
        }
        seen.last = now;
        seen.info = node;
        st.map.version
    }

    pub fn placement(&self) -> PlacementMap {
        (*self.lock().map).clone()
    }

    pub fn status(&self) -> Status {
        let st = self.lock();
        let now = Instant::now();
        let healthy: Vec<&String> = st
            .nodes
            .values()
            .filter(|s| now.duration_since(s.last) < self.cfg.lease)
            .map(|s| &s.info.name)
            .collect();
        let balanced = st.balanced.as_ref().is_some_and(|(version, settled, _)| {
            *version == st.map.version
                && settled.len() == healthy.len()
                && healthy.iter().all(|n| settled.contains(n))
        });
        Status {
            region: self.cfg.region.clone(),
            placement_version: st.map.version,
            lease_ms: self.cfg.lease.as_millis() as u64,
            nodes: st
                .nodes
                .values()
                .map(|s| NodeStatus {
                    name: s.info.name.clone(),
                    colo: s.info.colo.clone(),
                    address: s.info.address.clone(),
                    healthy: now.duration_since(s.last) < self.cfg.lease,
                    last_heartbeat_ms_ago: now.duration_since(s.last).as_millis() as u64,
                    slots_owned: st.map.owned_by(&s.info.name),
                })
                .collect(),
            failovers: self.failovers.load(std::sync::atomic::Ordering::Relaxed),
            handoffs: self.handoffs.load(std::sync::atomic::Ordering::Relaxed),
            balanced,
        }
    }

    fn healthy(&self, st: &State) -> Vec<NodeInfo> {
        let now = Instant::now();
        st.nodes
            .values()
            .filter(|s| now.duration_since(s.last) < self.cfg.lease)
            .map(|s| s.info.clone())
            .collect()
    }

    fn publish(&self, st: &mut State, mut map: PlacementMap) {
        map.version = st.map.version + 1;
        if let Some(path) = &self.cfg.state_file
            && let Ok(bytes) = serde_json::to_vec(&map)
        {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, path))
                .is_err()
            {
                tracing::warn!(path = %path.display(), "cannot save the placement map");
            }
        }
        tracing::info!(version = map.version, "placement published");
        st.map = Arc::new(map);
        self.changed.notify_waiters();
    }

    /// One pass of the control loop.
    pub async fn pass(self: &Arc<Self>) {
        let (healthy, map, started) = {
            let st = self.lock();
            (self.healthy(&st), st.map.clone(), st.started)
        };
        if map.version == 0 || map.colos.is_empty() {
            let ready = healthy.len() >= self.cfg.expect_nodes.max(1)
                || (!healthy.is_empty() && started.elapsed() > Duration::from_secs(30));
            if ready {
                self.place_initially(&healthy);
            }
            return;
        }
        self.refresh_addresses(&healthy);
        if self.fail_over(&healthy, &map).await {
            return;
        }
        if self.finish_fenced_epochs(&healthy) {
            return;
        }
        self.hand_back(&healthy, &map).await;
    }

    fn place_initially(&self, healthy: &[NodeInfo]) {
        let mut colos: Vec<&str> = healthy.iter().map(|n| n.colo.as_str()).collect();
        colos.sort();
        colos.dedup();
        let mut placed = BTreeMap::new();
        for colo in colos {
            match assign_slots(&AssignInput {
                colo,
                slot_count: self.cfg.slot_count,
                replicas: self.cfg.replicas,
                nodes: healthy,
                previous: None,
            }) {
                Ok(a) => {
                    if a.under_replicated {
                        tracing::warn!(
                            nodes = healthy.len(),
                            replicas = self.cfg.replicas,
                            "fewer nodes than replicas: every node holds a copy of every slot"
                        );
                    }
                    placed.insert(colo.to_string(), a.slots);
                }
                Err(e) => tracing::error!(colo, error = %e, "cannot place slots"),
            }
        }
        let map = PlacementMap {
            region: self.cfg.region.clone(),
            version: 0,
            slot_count: self.cfg.slot_count,
            replicas: self.cfg.replicas,
            nodes: healthy
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            colos: placed,
        };
        let mut st = self.lock();
        self.publish(&mut st, map);
    }

    /// Known nodes that changed address (restarted elsewhere) are republished.
    ///
    /// This runs every pass (10 times a second) and nearly always finds nothing to do, so it
    /// looks before it copies: a copy of the map is every slot's replica set (thousands of
    /// strings), and making one per pass cost the control plane most of a millisecond of CPU each
    /// time, which on a small machine showed up in the nodes' write latency every 100 ms.
    fn refresh_addresses(&self, healthy: &[NodeInfo]) {
        let mut st = self.lock();
        let moved: Vec<&NodeInfo> = healthy
            .iter()
            .filter(|n| {
                st.map
                    .nodes
                    .get(&n.name)
                    .is_none_or(|known| known.address != n.address)
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        // A node that joins later serves nothing until the operator (or a restart of `dev`)
        // places it; it is listed so others can reach it.
        let mut map = (*st.map).clone();
        for n in moved {
            map.nodes.insert(n.name.clone(), n.clone());
        }
        self.publish(&mut st, map);
    }

    /// Moves every slot whose owner's heartbeat lapsed to its most advanced follower. True if
    /// any slot failed over (the map was republished).
    async fn fail_over(&self, healthy: &[NodeInfo], map: &PlacementMap) -> bool {
        let alive: HashSet<&str> = healthy.iter().map(|n| n.name.as_str()).collect();
        let failing: Vec<(String, u32, SlotReplicas)> = map
            .colos
            .iter()
            .flat_map(|(colo, slots)| {
                slots
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| !alive.contains(r.owner.as_str()))
                    .map(move |(i, r)| (colo.clone(), i as u32, r.clone()))
            })
            .collect();
        if failing.is_empty() {
            return false;
        }
        let started = Instant::now();
        let quorum = self.cfg.write_quorum;
        let results: Vec<(String, u32, Option<SlotReplicas>)> = futures::stream::iter(failing)
            .map(|(colo, slot, replicas)| {
                let nodes = &map.nodes;
                let alive = &alive;
                async move {
                    let epoch = replicas.epoch + 1;
                    self.lock().fenced.insert((colo.clone(), slot), epoch);
                    let asked: Vec<String> = replicas
                        .followers
                        .iter()
                        .chain(&replicas.leaving)
                        .filter(|n| alive.contains(n.as_str()))
                        .cloned()
                        .collect();
                    let answers = futures::future::join_all(asked.iter().map(|n| {
                        let address = nodes.get(n).map(|i| i.address.clone()).unwrap_or_default();
                        let colo = colo.clone();
                        async move {
                            let durable: Option<Lsn> =
                                self.admin.fence(&address, &colo, slot, epoch).await.ok();
                            FollowerReport {
                                node: n.clone(),
                                durable,
                            }
                        }
                    }))
                    .await;
                    let chosen = match choose_failover(&replicas, &answers, quorum) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            let mut st = self.lock();
                            if st.blocked.insert((colo.clone(), slot)) {
                                tracing::warn!(colo, slot, error = %e, "failover blocked");
                            }
                            None
                        }
                    };
                    (colo, slot, chosen)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut st = self.lock();
        let mut next = (*st.map).clone();
        let mut moved = 0;
        for (colo, slot, chosen) in results {
            let Some(chosen) = chosen else { continue };
            if let Some(s) = next
                .colos
                .get_mut(&colo)
                .and_then(|c| c.slots.get_mut(slot as usize))
            {
                st.blocked.remove(&(colo.clone(), slot));
                st.fenced.remove(&(colo.clone(), slot));
                st.pinned.remove(&(colo.clone(), slot));
                *s = chosen;
                moved += 1;
            }
        }
        if moved > 0 {
            self.failovers
                .fetch_add(moved, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                slots = moved,
                took_ms = started.elapsed().as_millis() as u64,
                "failed over"
            );
            self.publish(&mut st, next);
            return true;
        }
        false
    }

    /// Publishes the epochs that followers were fenced at by failovers that could not finish, once
    /// the owner is healthy again (it keeps the slot; it recovers at the new epoch). True if the
    /// map was republished.
    fn finish_fenced_epochs(&self, healthy: &[NodeInfo]) -> bool {
        let alive: HashSet<&str> = healthy.iter().map(|n| n.name.as_str()).collect();
        let mut st = self.lock();
        if st.fenced.is_empty() {
            return false;
        }
        let mut next = (*st.map).clone();
        let mut settled = Vec::new();
        for ((colo, slot), epoch) in st.fenced.iter() {
            if let Some(s) = next
                .colos
                .get_mut(colo)
                .and_then(|c| c.slots.get_mut(*slot as usize))
            {
                if s.epoch >= *epoch {
                    settled.push((colo.clone(), *slot));
                } else if alive.contains(s.owner.as_str()) {
                    s.epoch = *epoch;
                    settled.push((colo.clone(), *slot));
                }
            }
        }
        for k in &settled {
            st.fenced.remove(k);
            st.blocked.remove(k);
        }
        if next == *st.map {
            return false;
        }
        tracing::info!(
            slots = settled.len(),
            "republished slots at the epoch their followers were fenced at"
        );
        self.publish(&mut st, next);
        true
    }

    /// Restores locality and balance after failovers: where the balanced placement of the settled
    /// nodes (healthy for a while) names another owner — a home-colo node again, or a node that
    /// returned — the slot moves there by planned hand-off, without losing writes. Placement keeps
    /// current owners where it can, so only the slots that failed over (or their share) move.
    async fn hand_back(self: &Arc<Self>, healthy: &[NodeInfo], map: &Arc<PlacementMap>) {
        let (settled, pinned) = {
            let st = self.lock();
            let settled = healthy
                .iter()
                .filter(|n| {
                    st.nodes
                        .get(&n.name)
                        .is_some_and(|s| s.since.elapsed() > Duration::from_secs(2))
                })
                .cloned()
                .collect::<Vec<NodeInfo>>();
            (settled, st.pinned.clone())
        };
        let inputs = (
            map.version,
            settled.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
            pinned.len(),
        );
        if self.lock().balanced.as_ref() == Some(&inputs) {
            return;
        }
        let mut moves = Vec::new();
        for (colo, slots) in &map.colos {
            if !settled.iter().any(|n| n.colo == *colo) {
                continue;
            }
            let Ok(target) = assign_slots(&AssignInput {
                colo,
                slot_count: map.slot_count,
                replicas: map.replicas,
                nodes: &settled,
                previous: Some(slots),
            }) else {
                continue;
            };
            for (i, (cur, tgt)) in slots.slots.iter().zip(&target.slots.slots).enumerate() {
                let owner_ok = settled.iter().any(|n| n.name == cur.owner);
                let is_pinned = pinned.contains(&(colo.clone(), i as u32));
                if owner_ok
                    && !is_pinned
                    && tgt.owner != cur.owner
                    && cur.followers.contains(&tgt.owner)
                {
                    moves.push((colo.clone(), i as u32, cur.clone(), tgt.owner.clone()));
                }
            }
        }
        if moves.is_empty() {
            self.lock().balanced = Some(inputs);
            return;
        }
        // The hand-offs run in the background, so failovers — which the next passes decide —
        // never wait behind them (a hand-off to a node that just died takes the owner's whole
        // timeout). One batch at a time.
        let in_flight = {
            let mut st = self.lock();
            if st.handing_back {
                return;
            }
            // A slot an explicit hand-off is moving waits for the next pass: by then it is
            // pinned where that hand-off put it, or free again. So does one that hand-off moved
            // since this pass read the map.
            moves.retain(|(colo, slot, cur, _)| {
                let key = (colo.clone(), *slot);
                !st.handing_off.contains(&key)
                    && !st.pinned.contains(&key)
                    && st.map.replicas_of(colo, *slot) == Some(cur)
            });
            moves.truncate(64);
            if moves.is_empty() {
                return;
            }
            st.handing_back = true;
            let slots: Vec<(String, u32)> =
                moves.iter().map(|(c, s, ..)| (c.clone(), *s)).collect();
            st.handing_off.extend(slots.iter().cloned());
            // Ends the batch and frees its slots however the task ends.
            HandoffsInFlight {
                coordinator: self.clone(),
                slots,
                batch: true,
            }
        };
        let this = self.clone();
        let map = map.clone();
        tokio::spawn(async move {
            // Frees each slot as its hand-off ends, and the rest when the batch ends (or drops).
            let mut in_flight = in_flight;
            let mut ended = futures::stream::iter(moves)
                .map(|(colo, slot, cur, to)| {
                    let (this, map) = (&this, &map);
                    async move {
                        let address = map
                            .nodes
                            .get(&cur.owner)
                            .map(|n| n.address.clone())
                            .unwrap_or_default();
                        let epoch = cur.epoch + 1;
                        match this.admin.handoff(&address, &colo, slot, &to, epoch).await {
                            Ok(_) => {
                                let next = handed_to(&cur, &to);
                                (colo, slot, Some((cur, next)))
                            }
                            Err(e) => {
                                // Unless the owner said it did not fence itself (it timed out,
                                // or the slot stopped draining), it may have fenced itself at
                                // `epoch` though its answer did not arrive: that epoch must be
                                // published.
                                if unfenced_answer(&e).is_none() {
                                    this.note_fencing(&colo, slot, epoch);
                                }
                                tracing::debug!(colo, slot, to, error = %e, "hand-back not done yet");
                                (colo, slot, None)
                            }
                        }
                    }
                })
                .buffer_unordered(16)
                // The hand-offs that ended together, published together.
                .ready_chunks(64);
            // Each slot is published as soon as its own hand-off ends: its owner has fenced
            // itself, and the slot takes no writes until its target is published as owner, so
            // it must not wait for the batch's slowest hand-off (up to the owner's timeout).
            while let Some(chunk) = ended.next().await {
                let mut st = this.lock();
                let mut next = (*st.map).clone();
                let mut moved = 0u64;
                for (colo, slot, outcome) in chunk {
                    let key = (colo, slot);
                    in_flight.release(&mut st, &key);
                    let Some((before, after)) = outcome else {
                        continue;
                    };
                    if next.replace_if_unchanged(&key.0, key.1, &before, after) {
                        moved += 1;
                    }
                    st.fenced.remove(&key);
                }
                if moved == 0 {
                    continue;
                }
                this.handoffs
                    .fetch_add(moved, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(slots = moved, "handed slots back to their home colo");
                this.publish(&mut st, next);
            }
        });
    }

    pub async fn admin_handoff(
        &self,
        address: &str,
        colo: &str,
        slot: u32,
        to: &str,
        epoch: u64,
    ) -> Result<Lsn, String> {
        self.admin.handoff(address, colo, slot, to, epoch).await
    }

    /// Publishes a new replica set for one slot, chosen by an explicit hand-off that started
    /// from `from` — only if the slot still has that owner and epoch (false otherwise: it failed
    /// over meanwhile). Balancing leaves the slot alone until its owner fails.
    pub fn replace_slot(
        &self,
        colo: &str,
        slot: u32,
        from: &SlotReplicas,
        replicas: SlotReplicas,
    ) -> bool {
        let mut st = self.lock();
        let mut next = (*st.map).clone();
        if !next.replace_if_unchanged(colo, slot, from, replicas) {
            return false;
        }
        st.pinned.insert((colo.to_string(), slot));
        st.fenced.remove(&(colo.to_string(), slot));
        self.handoffs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish(&mut st, next);
        true
    }

    /// Marks a slot as being handed off until the returned guard drops; 409
    /// `handoff_in_progress` while another hand-off of it (explicit or a hand-back) runs.
    pub fn begin_handoff(
        &self,
        colo: &str,
        slot: u32,
    ) -> Result<HandoffsInFlight<&Coordinator>, ApiError> {
        let key = (colo.to_string(), slot);
        if !self.lock().handing_off.insert(key.clone()) {
            return Err(ApiError::new(
                409,
                "handoff_in_progress",
                format!("{colo}#{slot} is being handed off already; retry once that ends"),
            ));
        }
        Ok(HandoffsInFlight {
            coordinator: self,
            slots: vec![key],
            batch: false,
        })
    }

    /// Notes that the owner of a slot may fence itself at `epoch` (a hand-off under way).
    pub fn note_fencing(&self, colo: &str, slot: u32, epoch: u64) {
        self.lock().fenced.insert((colo.to_string(), slot), epoch);
    }

    /// The epoch a slot's owner may have fenced itself at, not yet published.
    pub fn pending_fence(&self, colo: &str, slot: u32) -> Option<u64> {
        self.lock().fenced.get(&(colo.to_string(), slot)).copied()
    }

    /// Runs the control loop forever.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.pass().await;
        }
    }
}

/// Slots marked as being handed off, free again when this drops; for a hand-back `batch`, the
/// next batch may start then too.
pub struct HandoffsInFlight<C: std::ops::Deref<Target = Coordinator>> {
    coordinator: C,
    slots: Vec<(String, u32)>,
    batch: bool,
}

impl<C: std::ops::Deref<Target = Coordinator>> HandoffsInFlight<C> {
    /// Frees one slot now, under the coordinator's lock (`st`), and forgets it: dropping this
    /// later must not free it again, since another hand-off may have marked it by then.
    fn release(&mut self, st: &mut State, key: &(String, u32)) {
        st.handing_off.remove(key);
        self.slots.retain(|k| k != key);
    }
}

impl<C: std::ops::Deref<Target = Coordinator>> Drop for HandoffsInFlight<C> {
    fn drop(&mut self) {
        let mut st = self.coordinator.lock();
        for key in &self.slots {
            st.handing_off.remove(key);
        }
        if self.batch {
            st.handing_back = false;
        }
    }
}

/// The replica set after a planned hand-off to `to` (a follower): epoch bumped, roles swapped.
pub fn handed_to(cur: &SlotReplicas, to: &str) -> SlotReplicas {
    crate::placement::promote(cur, to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::admin_client::SlotStatus;
    use futures::future::BoxFuture;

    /// Node admin API of well-behaved followers. Hand-offs fail at once with `fail_with` when it
    /// is set; otherwise they finish once the test sets `released`, and left unset they hang, as
    /// when the hand-off's target dies mid-way and the owner waits. `tried` counts them.
    #[derive(Default)]
    struct HandoffsWait {
        released: std::sync::atomic::AtomicBool,
        fail_with: Option<&'static str>,
        /// Only the first this many tries fail with `fail_with` (all of them if `None`).
        fail_times: Option<u64>,
        tried: std::sync::atomic::AtomicU64,
        /// Each hand-off asked for: its slot and target.
        calls: std::sync::Mutex<Vec<(u32, String)>>,
        /// When set, only hand-offs of this slot wait for `released`; others finish at once.
        held_slot: std::sync::Mutex<Option<u32>>,
    }

    impl HandoffsWait {
        fn calls_for(&self, slot: u32) -> usize {
            let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
            calls.iter().filter(|(s, _)| *s == slot).count()
        }
    }

    impl NodeAdmin for HandoffsWait {
        fn fence<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: u32,
            epoch: u64,
        ) -> BoxFuture<'a, Result<Lsn, String>> {
            Box::pin(async move { Ok(Lsn::new(epoch - 1, 7)) })
        }
        fn handoff<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            slot: u32,
            to: &'a str,
            epoch: u64,
        ) -> BoxFuture<'a, Result<Lsn, String>> {
            self.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((slot, to.to_string()));
            let try_number = self
                .tried
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                if let Some(error) = self.fail_with
                    && self.fail_times.is_none_or(|n| try_number < n)
                {
                    return Err(error.to_string());
                }
                let held = *self.held_slot.lock().unwrap_or_else(|p| p.into_inner());
                while held.is_none_or(|h| h == slot)
                    && !self.released.load(std::sync::atomic::Ordering::Acquire)
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(Lsn::new(epoch - 1, 7))
            })
        }
        fn status<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: u32,
        ) -> BoxFuture<'a, Result<SlotStatus, String>> {
            Box::pin(async { Err("not used".to_string()) })
        }
    }

    /// A coordinator of 12 slots, 3 replicas, quorum 2, for 3 nodes, running its control loop.
    fn coordinator(lease: Duration, admin: Arc<dyn NodeAdmin>) -> Arc<Coordinator> {
        let c = Coordinator::new(
            CoordinatorConfig {
                region: "r".to_string(),
                lease,
                slot_count: 12,
                replicas: 3,
                write_quorum: 2,
                expect_nodes: 3,
                state_file: None,
            },
            admin,
        );
        tokio::spawn(c.clone().run());
        c
    }

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            colo: "x".to_string(),
            address: format!("{name}:1"),
        }
    }

    fn owned_by(c: &Coordinator, name: &str) -> usize {
        c.status()
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map_or(0, |n| n.slots_owned)
    }

    /// Beats for `alive` every 100 ms until `done` holds or `within` passes; whether it held.
    async fn beat_until(
        c: &Coordinator,
        alive: &[&str],
        within: Duration,
        done: impl Fn(&Coordinator) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            for n in alive {
                c.heartbeat(node(n));
            }
            if done(c) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// The slots that balancing would hand back to `to` now, as the control loop computes them.
    fn hand_backs_to(c: &Coordinator, all: &[&str], to: &str) -> Vec<(String, u32)> {
        let map = c.placement();
        let nodes: Vec<NodeInfo> = all.iter().map(|n| node(n)).collect();
        let mut moves = Vec::new();
        for (colo, slots) in &map.colos {
            let target = assign_slots(&AssignInput {
                colo,
                slot_count: map.slot_count,
                replicas: map.replicas,
                nodes: &nodes,
                previous: Some(slots),
            })
            .expect("assignment");
            for (i, (cur, tgt)) in slots.slots.iter().zip(&target.slots.slots).enumerate() {
                if tgt.owner == to && cur.owner != to && cur.followers.iter().any(|f| f == to) {
                    moves.push((colo.clone(), i as u32));
                }
            }
        }
        moves
    }

    /// Nodes a, b and c own their slots; c goes silent until its slots failed over, then beats
    /// again until balancing would hand at least two of them back — before c has settled, so no
    /// hand-back has started. The coordinator (1 s leases), its admin, and how many slots c
    /// owned at first.
    async fn c_back_after_its_slots_failed_over() -> (Arc<Coordinator>, Arc<HandoffsWait>, usize) {
        let lease = Duration::from_secs(1);
        let admin = Arc::new(HandoffsWait::default());
        let c = coordinator(lease, admin.clone());
        let all = ["a", "b", "c"];
        wait_all_own_slots(&c, &all).await;
        let homes_of_c = owned_by(&c, "c");
        assert!(beat_until(&c, &["a", "b"], lease * 4, |c| owned_by(c, "c") == 0).await);
        assert!(
            beat_until(&c, &all, Duration::from_secs(1), |c| hand_backs_to(
                c, &all, "c"
            )
            .len()
                >= 2)
            .await,
            "balancing would hand slots back to c"
        );
        assert_eq!(
            admin.tried.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "no hand-back started yet: c has not settled"
        );
        (c, admin, homes_of_c)
    }

    /// Beats for `nodes` until each owns slots (the initial placement).
    async fn wait_all_own_slots(c: &Coordinator, nodes: &[&str]) {
        assert!(
            beat_until(c, nodes, Duration::from_secs(5), |c| nodes
                .iter()
                .all(|n| owned_by(c, n) > 0))
            .await,
            "initial placement: {:?}",
            c.status()
                .nodes
                .iter()
                .map(|n| n.slots_owned)
                .collect::<Vec<_>>()
        );
    }

    /// A node that comes back at another address is republished once, with that address; passes
    /// that find every address as the map has it publish nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_at_a_new_address_is_republished_once_and_a_steady_cluster_never() {
        let c = coordinator(Duration::from_secs(5), Arc::new(HandoffsWait::default()));
        let all = ["a", "b", "c"];
        wait_all_own_slots(&c, &all).await;
        let placed = c.placement().version;
        // Several passes (one every 100 ms) with nothing changed.
        beat_until(&c, &all, Duration::from_millis(500), |_| false).await;
        assert_eq!(
            c.placement().version,
            placed,
            "republished with nothing changed"
        );
        let moved = NodeInfo {
            address: "b:2".to_string(),
            ..node("b")
        };
        c.heartbeat(moved.clone());
        let deadline = Instant::now() + Duration::from_secs(2);
        while c.placement().nodes.get("b") != Some(&moved) {
            assert!(Instant::now() < deadline, "b's new address never published");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(c.placement().version, placed + 1);
        for _ in 0..5 {
            c.heartbeat(moved.clone());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let map = c.placement();
        assert_eq!(
            map.version,
            placed + 1,
            "republished again for the same move"
        );
        assert_eq!(map.nodes.get("a"), Some(&node("a")), "a kept its address");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_back_that_never_finishes_does_not_hold_up_a_failover() {
        let lease = Duration::from_secs(1);
        let c = coordinator(lease, Arc::new(HandoffsWait::default()));
        let all = ["a", "b", "c"];
        wait_all_own_slots(&c, &all).await;
        // c goes silent: its slots fail over to a and b.
        assert!(
            beat_until(&c, &["a", "b"], lease * 4, |c| owned_by(c, "c") == 0).await,
            "c's slots failed over"
        );
        // c returns; once it has settled the control loop starts handing slots back to it, and
        // those hand-offs never finish.
        assert!(
            !beat_until(&c, &all, Duration::from_secs(3), |c| owned_by(c, "c") > 0).await,
            "no hand-off finishes, so c owns nothing yet"
        );
        // Now b dies: its slots must fail over within about a lease plus the hand-back budget,
        // not wait behind hand-offs that never end.
        let died = Instant::now();
        assert!(
            beat_until(
                &c,
                &["a", "c"],
                lease * 3 + Duration::from_secs(2),
                |c| owned_by(c, "b") == 0
            )
            .await,
            "b's slots did not fail over within {:?} while hand-backs hung",
            died.elapsed()
        );
        assert!(c.status().failovers > 0);
    }

    /// A slot owned by "a" and followed by "b": its colo, number and replica set.
    fn a_slot_a_owns_and_b_follows(c: &Coordinator) -> (String, u32, SlotReplicas) {
        let map = c.placement();
        map.colos
            .iter()
            .flat_map(|(colo, cs)| {
                cs.slots
                    .iter()
                    .enumerate()
                    .map(move |(i, r)| (colo.clone(), i as u32, r.clone()))
            })
            .find(|(_, _, r)| r.owner == "a" && r.followers.iter().any(|f| f == "b"))
            .expect("a slot that a owns and b follows")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_off_overtaken_by_a_failover_is_not_published() {
        let lease = Duration::from_secs(1);
        let admin = Arc::new(HandoffsWait::default());
        let c = coordinator(lease, admin.clone());
        wait_all_own_slots(&c, &["a", "b", "c"]).await;
        let (colo, slot, before) = a_slot_a_owns_and_b_follows(&c);
        // An explicit hand-off to b starts; a dies while it drains, and the slot fails over.
        let handoff = tokio::spawn({
            let (c, colo) = (c.clone(), colo.clone());
            async move { c.handoff(&colo, slot, "b").await }
        });
        assert!(
            beat_until(&c, &["b", "c"], lease * 4, |c| c
                .placement()
                .replicas_of(&colo, slot)
                .is_some_and(|r| r.owner != "a"))
            .await,
            "the slot failed over"
        );
        let failed_over = c
            .placement()
            .replicas_of(&colo, slot)
            .cloned()
            .expect("slot");
        assert!(failed_over.epoch > before.epoch);
        // The old owner's answer arrives late: publishing its target now would put a second
        // owner at an epoch the failover may have used.
        admin
            .released
            .store(true, std::sync::atomic::Ordering::Release);
        let err = handoff
            .await
            .expect("the hand-off task ends")
            .expect_err("a hand-off overtaken by a failover is refused");
        assert_eq!(
            (err.status, err.code),
            (409, "slot_moved"),
            "{}",
            err.message
        );
        assert_eq!(c.placement().replicas_of(&colo, slot), Some(&failed_over));
    }

    /// Fails c's slots over, brings c back and lets hand-backs to it fail with `error` for a
    /// while; the epochs of all slots before and after.
    async fn epochs_around_failed_hand_backs(error: &'static str) -> (Vec<u64>, Vec<u64>) {
        let lease = Duration::from_secs(1);
        let admin = Arc::new(HandoffsWait {
            fail_with: Some(error),
            ..HandoffsWait::default()
        });
        let c = coordinator(lease, admin.clone());
        let all = ["a", "b", "c"];
        wait_all_own_slots(&c, &all).await;
        assert!(
            beat_until(&c, &["a", "b"], lease * 4, |c| owned_by(c, "c") == 0).await,
            "c's slots failed over"
        );
        let epochs = |c: &Coordinator| {
            let map = c.placement();
            map.colos
                .values()
                .flat_map(|cs| cs.slots.iter().map(|r| r.epoch))
                .collect::<Vec<_>>()
        };
        let before = epochs(&c);
        assert!(
            beat_until(&c, &all, Duration::from_secs(6), |_| admin
                .tried
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 3)
            .await,
            "hand-backs to c were tried"
        );
        // A pass or two to publish whatever the failures call for.
        beat_until(&c, &all, Duration::from_millis(500), |_| false).await;
        (before, epochs(&c))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_back_the_owner_timed_out_leaves_its_epoch_alone_and_any_other_failure_bumps_it()
    {
        // The owner never fenced itself: republishing it at a new epoch would only send it
        // through recovery again.
        let (before, after) = epochs_around_failed_hand_backs(
            r#"http://a:1/v1/admin/slots/x/0/handoff: 503 Service Unavailable {"error":{"code":"handoff_timeout","message":"c did not catch up"}}"#,
        )
        .await;
        assert_eq!(before, after);
        // Nor did it when the slot stopped draining under it.
        let (before, after) = epochs_around_failed_hand_backs(
            r#"http://a:1/v1/admin/slots/x/0/handoff: 409 Conflict {"error":{"code":"handoff_interrupted","message":"slot x#0 stopped draining"}}"#,
        )
        .await;
        assert_eq!(before, after);
        // Lost answer: the owner may have fenced itself at the hand-off's epoch, which must be
        // published before anything else can serve the slot.
        let (before, after) = epochs_around_failed_hand_backs("connection reset by peer").await;
        assert!(
            before.iter().zip(&after).any(|(b, a)| a > b),
            "{before:?} -> {after:?}"
        );
        assert!(before.iter().zip(&after).all(|(b, a)| a >= b));
    }

    /// A hand-off retried after one whose answer was lost (the owner may have fenced itself at
    /// the next epoch) waits until the control loop has published that epoch, then goes through.
    /// Started at once, it would hand off at that very epoch and, taking longer than a loop pass,
    /// lose to the republish with 409 `slot_moved` on every try.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_off_retried_after_a_lost_answer_waits_for_the_republish_then_goes_through() {
        let lease = Duration::from_secs(10);
        let admin = Arc::new(HandoffsWait {
            fail_with: Some("connection reset by peer"),
            fail_times: Some(1),
            ..HandoffsWait::default()
        });
        let c = coordinator(lease, admin.clone());
        let all = ["a", "b", "c"];
        wait_all_own_slots(&c, &all).await;
        let (colo, slot, before) = a_slot_a_owns_and_b_follows(&c);

        let lost = c.handoff(&colo, slot, "b").await.expect_err("answer lost");
        assert_eq!((lost.status, lost.code), (503, "handoff_failed"));
        // Retries, as a client would; the owner takes 300 ms to drain each time.
        let released_later = {
            let admin = admin.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                admin
                    .released
                    .store(true, std::sync::atomic::Ordering::Release);
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let published = loop {
            for n in all {
                c.heartbeat(node(n));
            }
            match c.handoff(&colo, slot, "b").await {
                Ok(published) => break published,
                Err(e) => assert_eq!(
                    (e.status, e.code),
                    (503, "handoff_settling"),
                    "{}",
                    e.message
                ),
            }
            assert!(Instant::now() < deadline, "the hand-off never went through");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        released_later.await.expect("release");
        assert_eq!(published.owner, "b");
        assert_eq!(
            published.epoch,
            before.epoch + 2,
            "after the republish at the lost hand-off's epoch"
        );
        assert_eq!(c.placement().replicas_of(&colo, slot), Some(&published));
    }

    /// An explicit hand-off the owner answered with its own `handoff_timeout` (or
    /// `handoff_interrupted`) changed nothing: the owner never fenced itself, so the slot keeps
    /// its epoch (a republish would only send the owner through recovery), the answer is passed
    /// on, and a retry starts at once, with no `handoff_settling` wait, at the next epoch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_explicit_hand_off_the_owner_timed_out_keeps_the_epoch_and_may_be_retried_at_once() {
        explicit_hand_off_the_owner_did_not_fence(
            r#"http://a:1/v1/admin/slots/x/0/handoff: 503 Service Unavailable {"error":{"code":"handoff_timeout","message":"b did not catch up"}}"#,
            (503, "handoff_timeout"),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_explicit_hand_off_the_owner_found_interrupted_keeps_the_epoch_too() {
        explicit_hand_off_the_owner_did_not_fence(
            r#"http://a:1/v1/admin/slots/x/0/handoff: 409 Conflict {"error":{"code":"handoff_interrupted","message":"slot x#0 stopped draining"}}"#,
            (409, "handoff_interrupted"),
        )
        .await;
    }

    async fn explicit_hand_off_the_owner_did_not_fence(
        answer: &'static str,
        passed_on: (u16, &'static str),
    ) {
        let lease = Duration::from_secs(10);
        let admin = Arc::new(HandoffsWait {
            released: std::sync::atomic::AtomicBool::new(true),
            fail_with: Some(answer),
            fail_times: Some(1),
            ..HandoffsWait::default()
        });
        let c = coordinator(lease, admin);
        let all = ["a", "b", "c"];
        wait_all_own_slots(&c, &all).await;
        let (colo, slot, before) = a_slot_a_owns_and_b_follows(&c);

        let refused = c.handoff(&colo, slot, "b").await.expect_err("not done");
        assert_eq!(
            (refused.status, refused.code),
            passed_on,
            "{}",
            refused.message
        );
        assert_eq!(c.pending_fence(&colo, slot), None, "no fence to publish");
        // Loop passes that would republish a noted fence.
        beat_until(&c, &all, Duration::from_millis(500), |_| false).await;
        assert_eq!(c.placement().replicas_of(&colo, slot), Some(&before));

        let published = c.handoff(&colo, slot, "b").await.expect("retried at once");
        assert_eq!(
            (published.owner.as_str(), published.epoch),
            ("b", before.epoch + 1)
        );
    }

    /// A slot runs one hand-off at a time: a second explicit one is refused with 409
    /// `handoff_in_progress` without reaching the owner, and the hand-backs that start meanwhile
    /// leave that slot alone. (Two at once would race to publish, and one's giving up could put
    /// the owner back to serving while the other fenced it.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_being_handed_off_gets_no_second_hand_off_nor_a_hand_back() {
        let all = ["a", "b", "c"];
        let (c, admin, homes_of_c) = c_back_after_its_slots_failed_over().await;
        let (colo, slot) = hand_backs_to(&c, &all, "c")[0].clone();

        // An explicit hand-off of one of them to c, which waits for the owner; hand-offs of
        // other slots finish at once.
        *admin.held_slot.lock().expect("held slot") = Some(slot);
        let explicit = tokio::spawn({
            let (c, colo) = (c.clone(), colo.clone());
            async move { c.handoff(&colo, slot, "c").await }
        });
        while admin.calls_for(slot) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = tokio::time::timeout(Duration::from_secs(1), c.handoff(&colo, slot, "c"))
            .await
            .expect("answered at once, not waiting for the owner")
            .expect_err("a second hand-off of the slot");
        assert_eq!(
            (second.status, second.code),
            (409, "handoff_in_progress"),
            "{}",
            second.message
        );
        // c settles, and its other slots are handed back to it.
        assert!(
            beat_until(&c, &all, Duration::from_secs(5), |c| owned_by(c, "c")
                == homes_of_c - 1)
            .await,
            "c's other slots were handed back: {:?}",
            admin.calls.lock().expect("calls")
        );
        beat_until(&c, &all, Duration::from_millis(500), |_| false).await;
        assert_eq!(
            admin.calls_for(slot),
            1,
            "only the explicit hand-off reached the owner"
        );

        admin
            .released
            .store(true, std::sync::atomic::Ordering::Release);
        let published = explicit
            .await
            .expect("the hand-off task ends")
            .expect("handed off");
        assert_eq!(published.owner, "c");
        assert!(
            beat_until(&c, &all, Duration::from_secs(5), |c| owned_by(c, "c")
                == homes_of_c)
            .await,
            "the hand-backs finished"
        );
        assert_eq!(
            admin.calls_for(slot),
            1,
            "and none of them moved that slot again"
        );
        assert_eq!(c.placement().replicas_of(&colo, slot), Some(&published));
    }

    /// A hand-back batch publishes each slot as soon as its own hand-off ends: the owner has
    /// fenced itself, and the slot takes no writes until its target is published, so it must
    /// not wait for the batch's slowest hand-off. A slot is free for an explicit hand-off as soon
    /// as its own hand-back ended, while the batch runs on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hand_back_batch_publishes_each_slot_as_its_hand_off_ends() {
        let all = ["a", "b", "c"];
        let (c, admin, homes_of_c) = c_back_after_its_slots_failed_over().await;
        let moves = hand_backs_to(&c, &all, "c");
        // The hand-back of one slot waits for its owner; the others end at once.
        let (held_colo, held) = moves[0].clone();
        *admin.held_slot.lock().expect("held slot") = Some(held);
        assert!(
            beat_until(&c, &all, Duration::from_secs(5), |c| owned_by(c, "c")
                == homes_of_c - 1)
            .await,
            "the slots whose hand-backs ended are published while one still runs: c owns {} of {}",
            owned_by(&c, "c"),
            homes_of_c - 1
        );
        assert_eq!(admin.calls_for(held), 1, "the held hand-back started");
        assert_ne!(
            c.placement()
                .replicas_of(&held_colo, held)
                .map(|r| r.owner.clone()),
            Some("c".to_string()),
            "the held slot is not published before its hand-off ends"
        );
        // While the batch runs, a slot whose hand-back ended takes an explicit hand-off; the
        // held one does not.
        let (colo, done) = moves[1].clone();
        let away = c
            .placement()
            .replicas_of(&colo, done)
            .and_then(|r| r.followers.first().cloned())
            .expect("a follower");
        let moved = tokio::time::timeout(Duration::from_secs(1), c.handoff(&colo, done, &away))
            .await
            .expect("answered at once")
            .expect("an explicit hand-off of a slot whose hand-back ended");
        assert_eq!(moved.owner, away);
        let busy = tokio::time::timeout(Duration::from_secs(1), c.handoff(&held_colo, held, "c"))
            .await
            .expect("answered at once")
            .expect_err("the held slot is still being handed back");
        assert_eq!((busy.status, busy.code), (409, "handoff_in_progress"));
        // The held hand-back ends, and that slot is published too.
        admin
            .released
            .store(true, std::sync::atomic::Ordering::Release);
        assert!(
            beat_until(&c, &all, Duration::from_secs(5), |c| c
                .placement()
                .replicas_of(&held_colo, held)
                .is_some_and(|r| r.owner == "c"))
            .await,
            "the held slot is published once its hand-off ends"
        );
        assert_eq!(admin.calls_for(held), 1);
    }
}
