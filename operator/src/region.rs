//! Pure planning of a region's placement: node health from Lease observations, which slots must
//! fail over, and safe steps towards a balanced placement.
//!
//! The decisions themselves (`assign_slots`, `plan_membership`, `choose_failover`, `promote`)
//! are `colony_node::placement`'s; this module only sequences them for the operator:
//! - `assign_slots` gives a *target*; it is never published as such. Membership moves towards it
//!   one `plan_membership` step per slot and pass (learners join, catch up and vote; surplus
//!   voters leave and are removed once the rest hold everything);
//! - owners change only by failover (the owner's Lease lapsed) or by planned hand-off to a
//!   follower that is already a voter.

use crate::crd::FailingNode;
use colony_node::control::admin_client::SlotStatus;
use colony_node::lsn::Lsn;
use colony_node::placement::{
    AssignInput, FailoverError, FollowerReport, MembershipProgress, NodeInfo, PlacementMap,
    SlotReplicas, assign_slots, choose_failover, plan_membership, promote,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Lease observation

/// What the operator knows about one node's Lease right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSeen {
    /// `renewTime` as written by the node (compared as text, never against our clock); empty
    /// when there is no Lease.
    pub renew_time: String,
    /// When this operator first saw that `renew_time` (its own clock).
    pub since: Timestamp,
    /// Whether this operator has seen `renew_time` change (only then is the node live).
    pub changed: bool,
}

/// Remembers, per (Kubernetes namespace, node), when its Lease's `renewTime` last changed as
/// seen by this operator.
#[derive(Clone, Debug, Default)]
pub struct LeaseTracker {
    seen: HashMap<(String, String), LeaseSeen>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Its Lease was seen changing, and not longer ago than its duration.
    Live,
    /// Seen, but no renewal observed yet (e.g. right after an operator restart) and not yet
    /// unchanged for a whole duration: neither trusted nor failed over.
    Unknown,
    /// No Lease, and not in the placement: a pod that is starting. It gets no slots yet.
    Starting,
    /// Lease unchanged (or missing) for its whole duration since `since`.
    Failed { since: Timestamp },
}

impl Health {
    pub fn is_live(&self) -> bool {
        *self == Health::Live
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, Health::Failed { .. })
    }
}

fn key(ns: &str, node: &str) -> (String, String) {
    (ns.to_string(), node.to_string())
}

impl LeaseTracker {
    /// Restores what a previous operator process recorded in status, so a restart does not reset
    /// the failing-since clock. Ignored for nodes already tracked.
    pub fn seed(&mut self, ns: &str, failing: &[FailingNode]) {
        for f in failing {
            if let Ok(since) = f.since.parse::<Timestamp>() {
                self.seen.entry(key(ns, &f.name)).or_insert(LeaseSeen {
                    renew_time: f.renew_time.clone(),
                    since,
                    changed: false,
                });
            }
        }
    }

    /// Records an observation of a node's Lease (`None`: no Lease exists).
    pub fn observe(&mut self, ns: &str, node: &str, renew_time: Option<&str>, now: Timestamp) {
        let renew = renew_time.unwrap_or("").to_string();
        match self.seen.get_mut(&key(ns, node)) {
            Some(s) if s.renew_time == renew => {}
            Some(s) => {
                s.changed = !renew.is_empty();
                s.renew_time = renew;
                s.since = now;
            }
            None => {
                self.seen.insert(
                    key(ns, node),
                    LeaseSeen {
                        renew_time: renew,
                        since: now,
                        changed: false,
                    },
                );
            }
        }
    }

    pub fn seen(&self, ns: &str, node: &str) -> Option<&LeaseSeen> {
        self.seen.get(&key(ns, node))
    }

    pub fn forget(&mut self, ns: &str, node: &str) {
        self.seen.remove(&key(ns, node));
    }

    /// `known` = the node is in the published placement (so a missing Lease means it is gone, not
    /// that it is still starting).
    pub fn health(
        &self,
        ns: &str,
        node: &str,
        known: bool,
        duration: Duration,
        now: Timestamp,
    ) -> Health {
        let Some(s) = self.seen.get(&key(ns, node)) else {
            return Health::Starting;
        };
        if s.renew_time.is_empty() && !known {
            return Health::Starting;
        }
        let unchanged = now.duration_since(s.since);
        if unchanged >= SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX) {
            Health::Failed { since: s.since }
        } else if s.changed {
            Health::Live
        } else {
            Health::Unknown
        }
    }

    /// Nodes whose Lease has not changed for at least `threshold`: what is kept in status.
    pub fn failing(
        &self,
        ns: &str,
        nodes: &[String],
        threshold: Duration,
        now: Timestamp,
    ) -> Vec<FailingNode> {
        let threshold = SignedDuration::try_from(threshold).unwrap_or(SignedDuration::MAX);
        let mut out: Vec<FailingNode> = nodes
            .iter()
            .filter_map(|n| {
                let s = self.seen.get(&key(ns, n))?;
                (now.duration_since(s.since) >= threshold).then(|| FailingNode {
                    name: n.clone(),
                    renew_time: s.renew_time.clone(),
                    since: s.since.to_string(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The region as the planner sees it

/// A node the operator knows of: a pod it wants, a node the placement names, or the holder of
/// a node Lease of the region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub info: NodeInfo,
    pub health: Health,
    /// Its pod is wanted (ordinal below its Colo's `nodes`, Colo not being deleted). A node
    /// that is not wanted hands its slots over and leaves its replica sets.
    pub wanted: bool,
}

pub type Nodes = BTreeMap<String, NodeView>;

fn is_live(nodes: &Nodes, name: &str) -> bool {
    nodes.get(name).is_some_and(|n| n.health.is_live())
}

fn is_failed(nodes: &Nodes, name: &str) -> bool {
    nodes.get(name).is_some_and(|n| n.health.is_failed())
}

/// A colo whose slots the region places: a Colo of the region, or a colo that is gone but
/// whose slots (the objects homed there) are still in the map and are served by the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColoView {
    pub name: String,
    pub slots: u32,
}

// ---------------------------------------------------------------------------------------------
// Failover

/// A slot whose owner's Lease lapsed: it must fail over to one of its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverTask {
    pub colo: String,
    pub slot: u32,
    pub replicas: SlotReplicas,
    /// The epoch members are fenced at: the one the new owner will have.
    pub fence_epoch: u64,
    /// Followers and leaving members worth asking (those not known to have failed).
    pub ask: Vec<NodeInfo>,
}

/// Slots of `map` whose owner has failed. Departing nodes that are alive are not failures:
/// their slots move by hand-off.
pub fn failover_tasks(map: &PlacementMap, nodes: &Nodes) -> Vec<FailoverTask> {
    let mut out = Vec::new();
    for (colo, slots) in &map.colos {
        for (i, s) in slots.slots.iter().enumerate() {
            if !is_failed(nodes, &s.owner) {
                continue;
            }
            let ask = s
                .followers
                .iter()
                .chain(&s.leaving)
                .filter(|f| !is_failed(nodes, f))
                .filter_map(|f| map.node(f).or_else(|| nodes.get(f).map(|n| &n.info)))
                .cloned()
                .collect();
            out.push(FailoverTask {
                colo: colo.clone(),
                slot: i as u32,
                replicas: s.clone(),
                fence_epoch: s.epoch + 1,
                ask,
            });
        }
    }
    out
}

/// What came of one slot's failover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverOutcome {
    pub colo: String,
    pub slot: u32,
    pub from: String,
    pub result: Result<SlotReplicas, FailoverError>,
}

/// Picks the new owners from the members' fence answers (`answers[i]` belongs to `tasks[i]`).
pub fn decide_failovers(
    tasks: &[FailoverTask],
    answers: &[Vec<FollowerReport>],
    write_quorum: usize,
) -> Vec<FailoverOutcome> {
    tasks
        .iter()
        .zip(answers)
        .map(|(t, reports)| FailoverOutcome {
            colo: t.colo.clone(),
            slot: t.slot,
            from: t.replicas.owner.clone(),
            result: choose_failover(&t.replicas, reports, write_quorum),
        })
        .collect()
}

/// Writes the successful failovers into `map` (where the slot is still as it was decided on).
pub fn apply_failovers(map: &mut PlacementMap, outcomes: &[FailoverOutcome]) {
    for o in outcomes {
        if let (Ok(new), Some(colo)) = (&o.result, map.colos.get_mut(&o.colo))
            && let Some(slot) = colo.slots.get_mut(o.slot as usize)
            && slot.owner == o.from
            && slot.epoch + 1 == new.epoch
        {
            *slot = new.clone();
        }
    }
}

/// A follower's fence answer for `choose_failover`.
pub fn report(node: &str, durable: Option<Lsn>) -> FollowerReport {
    FollowerReport {
        node: node.to_string(),
        durable,
    }
}

// ---------------------------------------------------------------------------------------------
// Membership progress

/// What the owner and the members of a slot reported, for `plan_membership`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotProgress {
    /// The placement version the owner has applied.
    pub owner_placement_version: u64,
    /// The owner's durable position, read before the members' (so a member at or past it holds
    /// every write acknowledged before the members were asked).
    pub owner_durable: Lsn,
    /// Each member's durable position.
    pub members: BTreeMap<String, Lsn>,
}

impl SlotProgress {
    pub fn caught_up(&self, node: &str) -> bool {
        self.members
            .get(node)
            .is_some_and(|d| *d >= self.owner_durable)
    }
}

/// The admin calls one slot's progress needs: the owner first, then its learners and followers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressQuery {
    pub colo: String,
    pub slot: u32,
    pub epoch: u64,
    pub owner: NodeInfo,
    pub members: Vec<NodeInfo>,
}

/// Slots changing membership (learners or leaving members) whose owner is live.
pub fn progress_queries(map: &PlacementMap, nodes: &Nodes) -> Vec<ProgressQuery> {
    let info = |n: &str| map.node(n).cloned();
    let mut out = Vec::new();
    for (colo, slots) in &map.colos {
        for (i, s) in slots.slots.iter().enumerate() {
            if (s.learners.is_empty() && s.leaving.is_empty()) || !is_live(nodes, &s.owner) {
                continue;
            }
            let Some(owner) = info(&s.owner) else {
                continue;
            };
            let members = s
                .learners
                .iter()
                .chain(&s.followers)
                .filter(|m| !is_failed(nodes, m))
                .filter_map(|m| info(m))
                .collect();
            out.push(ProgressQuery {
                colo: colo.clone(),
                slot: i as u32,
                epoch: s.epoch,
                owner,
                members,
            });
        }
    }
    out
}

/// The progress of a slot from its owner's and members' reports; `None` unless the owner
/// reports itself the slot's owner at the epoch the placement gives it.
pub fn slot_progress(
    q: &ProgressQuery,
    owner: &SlotStatus,
    members: &[(String, SlotStatus)],
) -> Option<SlotProgress> {
    (owner.role == "owner" && owner.epoch == q.epoch).then(|| SlotProgress {
        owner_placement_version: owner.placement_version,
        owner_durable: owner.durable,
        members: members
            .iter()
            .map(|(n, s)| (n.clone(), s.durable))
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Planning

/// A hand-off to ask `from` (the owner) for; on success the slot is `promote(slot, to)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedHandoff {
    pub colo: String,
    pub slot: u32,
    pub from: String,
    pub to: String,
    /// The epoch the owner fences itself at and `to` owns the slot with.
    pub epoch: u64,
}

/// Everything [`plan`] needs.
pub struct PlanInput<'a> {
    /// The current placement (as published, with this pass's failovers and completed hand-offs
    /// applied).
    pub map: &'a PlacementMap,
    /// The version of the map as published (what owners must have applied).
    pub published_version: u64,
    pub colos: &'a [ColoView],
    pub nodes: &'a Nodes,
    pub progress: &'a BTreeMap<(String, u32), SlotProgress>,
    /// Slots with a hand-off in flight: left alone.
    pub busy: &'a BTreeSet<(String, u32)>,
    pub replicas: usize,
    pub write_quorum: usize,
    /// Slots changing membership at once, at most.
    pub max_changing: usize,
    /// Hand-offs to start, at most.
    pub max_handoffs: usize,
}

/// The result of [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The placement to publish now (only safe steps applied).
    pub map: PlacementMap,
    /// Hand-offs to start now (their slots are unchanged in `map`).
    pub handoffs: Vec<PlannedHandoff>,
    /// Colos whose slots could not be placed for the first time (no live node in the region).
    pub unplaced: Vec<String>,
    pub under_replicated: bool,
    /// Slots whose balanced owner is another live node (hand-offs still to come).
    pub unbalanced: usize,
    /// Slots changing membership in `map`.
    pub changing: usize,
}

fn in_change(s: &SlotReplicas) -> bool {
    !s.learners.is_empty() || !s.leaving.is_empty()
}

/// One safe step of the whole region towards the balanced placement of its nodes:
/// - a colo not placed yet gets its initial placement on the live wanted nodes (no data yet);
/// - a slot whose balanced owner is already a voting follower (and live) is handed off;
/// - otherwise the slot takes one `plan_membership` step towards its balanced replica set,
///   limited to `max_changing` slots in change at once;
/// - slots whose owner is not live, or with a hand-off in flight, are left as they are.
///
/// Placement candidates are the wanted nodes that are live, and the wanted nodes already in
/// the map whatever their health: a node that is down keeps its roles (its pod comes back), and
/// an operator restart (every Lease `Unknown`) moves nothing.
pub fn plan(i: &PlanInput<'_>) -> Plan {
    let mut map = i.map.clone();
    map.replicas = i.replicas;
    let live_wanted: Vec<NodeInfo> = i
        .nodes
        .values()
        .filter(|n| n.wanted && n.health.is_live())
        .map(|n| n.info.clone())
        .collect();
    let candidates: Vec<NodeInfo> = i
        .nodes
        .values()
        .filter(|n| n.wanted && (n.health.is_live() || i.map.nodes.contains_key(&n.info.name)))
        .map(|n| n.info.clone())
        .collect();
    let mut changing = i
        .map
        .colos
        .values()
        .flat_map(|c| &c.slots)
        .filter(|s| in_change(s))
        .count();
    let mut handoff_budget = i.max_handoffs;
    let mut handoffs = Vec::new();
    let mut unplaced = Vec::new();
    let mut under_replicated = false;
    let mut unbalanced = 0;
    for colo in i.colos {
        let previous = i
            .map
            .colos
            .get(&colo.name)
            .filter(|p| p.slots.len() == colo.slots as usize);
        let Some(prev) = previous else {
            match assign_slots(&AssignInput {
                colo: &colo.name,
                slot_count: colo.slots,
                replicas: i.replicas,
                nodes: &live_wanted,
                previous: None,
            }) {
                Ok(a) => {
                    under_replicated |= a.under_replicated;
                    map.colos.insert(colo.name.clone(), a.slots);
                }
                Err(_) => unplaced.push(colo.name.clone()),
            }
            continue;
        };
        let Ok(target) = assign_slots(&AssignInput {
            colo: &colo.name,
            slot_count: colo.slots,
            replicas: i.replicas,
            nodes: &candidates,
            previous: Some(prev),
        }) else {
            // No candidate anywhere in the region: nothing to move towards.
            continue;
        };
        under_replicated |= target.under_replicated;
        let mut next = prev.clone();
        for (idx, (c, t)) in prev.slots.iter().zip(&target.slots.slots).enumerate() {
            let slot_key = (colo.name.clone(), idx as u32);
            if i.busy.contains(&slot_key) || !is_live(i.nodes, &c.owner) {
                continue;
            }
            if t.owner != c.owner {
                let to_live = is_live(i.nodes, &t.owner);
                if to_live {
                    unbalanced += 1;
                }
                if to_live && c.followers.contains(&t.owner) {
                    if handoff_budget > 0 {
                        handoff_budget -= 1;
                        handoffs.push(PlannedHandoff {
                            colo: colo.name.clone(),
                            slot: idx as u32,
                            from: c.owner.clone(),
                            to: t.owner.clone(),
                            epoch: c.epoch + 1,
                        });
                    }
                    continue;
                }
            }
            let progress = i.progress.get(&slot_key);
            let caught_up = |n: &str| progress.is_some_and(|p| p.caught_up(n));
            let step = plan_membership(
                c,
                t,
                &MembershipProgress {
                    caught_up: &caught_up,
                    owner_applied_current: progress
                        .is_some_and(|p| p.owner_placement_version >= i.published_version),
                    configured_write_quorum: i.write_quorum,
                },
            );
            if step == *c {
                continue;
            }
            if !in_change(c) {
                if changing >= i.max_changing {
                    continue;
                }
                changing += 1;
            }
            next.slots[idx] = step;
        }
        map.colos.insert(colo.name.clone(), next);
    }
    map.nodes = referenced_nodes(&map, i.nodes, &i.map.nodes);
    let changing = map
        .colos
        .values()
        .flat_map(|c| &c.slots)
        .filter(|s| in_change(s))
        .count();
    Plan {
        map,
        handoffs,
        unplaced,
        under_replicated,
        unbalanced,
        changing,
    }
}

/// The node table of `map`: every node some slot refers to in any role, described from `nodes`
/// (what the operator knows now) or else from `previous`.
fn referenced_nodes(
    map: &PlacementMap,
    nodes: &Nodes,
    previous: &BTreeMap<String, NodeInfo>,
) -> BTreeMap<String, NodeInfo> {
    let mut out = BTreeMap::new();
    for slots in map.colos.values() {
        for s in &slots.slots {
            for m in s.receivers() {
                if out.contains_key(m) {
                    continue;
                }
                if let Some(info) = nodes.get(m).map(|n| &n.info).or_else(|| previous.get(m)) {
                    out.insert(m.to_string(), info.clone());
                }
            }
        }
    }
    out
}

/// Applies the completed hand-offs that still match the slot (same owner, `to` still a voter,
/// epoch not moved meanwhile); returns how many were applied.
pub fn apply_handoffs(map: &mut PlacementMap, done: &[PlannedHandoff]) -> usize {
    let mut applied = 0;
    for h in done {
        if let Some(slot) = map
            .colos
            .get_mut(&h.colo)
            .and_then(|c| c.slots.get_mut(h.slot as usize))
            && slot.owner == h.from
            && slot.epoch + 1 == h.epoch
            && slot.followers.contains(&h.to)
        {
            *slot = promote(slot, &h.to);
            applied += 1;
        }
    }
    applied
}

/// Publishes the epochs members were fenced at when the slot did not move (a failover that
/// could not finish, a hand-off whose answer was lost): those members now refuse the owner's
/// older epoch, so once the owner is live again the slot is given that epoch (same owner).
/// Returns the entries of `fenced` that are settled: the map is at or past their epoch.
pub fn finish_fenced(
    map: &mut PlacementMap,
    fenced: &BTreeMap<(String, u32), u64>,
    nodes: &Nodes,
) -> Vec<(String, u32)> {
    let mut settled = Vec::new();
    for ((colo, slot), epoch) in fenced {
        let Some(s) = map
            .colos
            .get_mut(colo)
            .and_then(|c| c.slots.get_mut(*slot as usize))
        else {
            settled.push((colo.clone(), *slot));
            continue;
        };
        if s.epoch >= *epoch {
            settled.push((colo.clone(), *slot));
        } else if is_live(nodes, &s.owner) {
            s.epoch = *epoch;
            settled.push((colo.clone(), *slot));
        }
    }
    settled
}

/// True when two maps place every slot the same way (versions aside).
pub fn same_placement(a: &PlacementMap, b: &PlacementMap) -> bool {
    a.region == b.region
        && a.slot_count == b.slot_count
        && a.replicas == b.replicas
        && a.nodes == b.nodes
        && a.colos == b.colos
}

/// An empty map for a region not published yet.
pub fn empty_map(region: &str, slot_count: u32, replicas: usize) -> PlacementMap {
    PlacementMap {
        region: region.to_string(),
        version: 0,
        slot_count,
        replicas,
        nodes: BTreeMap::new(),
        colos: BTreeMap::new(),
    }
}

/// Whether any slot of `map` still refers to a node of `colo` (in any role).
pub fn refers_to_colo(map: &PlacementMap, colo: &str) -> bool {
    map.nodes.values().any(|n| n.colo == colo)
}

/// A node Lease of the region, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRef {
    pub name: String,
    /// From the Lease's `colony.dev/colo` label.
    pub colo: String,
    pub resource_version: Option<String>,
}

/// Node Leases to delete: those of nodes that are not wanted, that no slot refers to any more
/// (or every colo of the region is going: `teardown`), and whose Lease has been unchanged for
/// its whole duration — so never the Lease of a pod that is still running or terminating.
pub fn orphan_leases(
    leases: &[LeaseRef],
    nodes: &Nodes,
    map: &PlacementMap,
    teardown: bool,
) -> Vec<LeaseRef> {
    leases
        .iter()
        .filter(|l| {
            nodes
                .get(&l.name)
                .is_some_and(|n| !n.wanted && n.health.is_failed())
                && (teardown || !map.nodes.contains_key(&l.name))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;
