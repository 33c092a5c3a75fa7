//! Who owns and who follows each slot, and who takes over when an owner's heartbeat lapses.
//!
//! Everything here is a pure function of its inputs: the local control loop (`dev`, tests) and the
//! Kubernetes operator run the same code against different heartbeat stores and publishers.
//!
//! Model: every colo has `slot_count` slots; an object belongs to slot `id.slot(slot_count)` of its
//! home colo. Each slot has a replica set: one owner (which serves and writes) and followers, placed
//! in distinct colos of the region where possible. A [`PlacementMap`] holds this for a region and
//! is what the control plane publishes and every node watches.

use crate::lsn::Lsn;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A node as the placement map knows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique within the region (the pod name on Kubernetes).
    pub name: String,
    pub colo: String,
    /// Where its HTTP API listens, `host:port`.
    pub address: String,
}

/// The replica set of one slot.
///
/// The owner and followers are the *voters*: writes are acknowledged by a quorum of them.
/// Membership changes never break the intersection between write quorums and the read quorum
/// failover uses: a joining node is a *learner* (it receives entries, its acknowledgements do not
/// count) until it has caught up, and a departing voter is *leaving* (its acknowledgements no
/// longer count, but failover still counts it as a member) until enough remaining voters hold
/// everything. See [`plan_membership`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SlotReplicas {
    /// Bumped on every change of owner; page sets from an older epoch are refused (fencing).
    pub epoch: u64,
    pub owner: String,
    pub followers: Vec<String>,
    pub learners: Vec<String>,
    pub leaving: Vec<String>,
}

impl SlotReplicas {
    pub fn new(epoch: u64, owner: &str, followers: &[&str]) -> Self {
        SlotReplicas {
            epoch,
            owner: owner.to_string(),
            followers: followers.iter().map(|f| f.to_string()).collect(),
            learners: Vec::new(),
            leaving: Vec::new(),
        }
    }

    /// The voters: owner and followers.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.owner.as_str()).chain(self.followers.iter().map(String::as_str))
    }

    /// Every node that receives the slot's entries (voters, learners, leaving).
    pub fn receivers(&self) -> impl Iterator<Item = &str> {
        self.members()
            .chain(self.learners.iter().map(String::as_str))
            .chain(self.leaving.iter().map(String::as_str))
    }

    /// Whether `node` receives this slot's entries in any role.
    pub fn has(&self, node: &str) -> bool {
        self.receivers().any(|m| m == node)
    }

    /// Number of voters.
    pub fn len(&self) -> usize {
        1 + self.followers.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes are acknowledged once this many members (owner included) hold them durably.
    pub fn write_quorum(&self, configured: usize) -> usize {
        effective_write_quorum(configured, self.len())
    }
}

/// The write quorum actually used for a replica set of `members` nodes: the configured quorum, but
/// never more than a majority of the members present, so a region with fewer nodes than
/// `replicas` keeps accepting writes on all of them while every two quorums still intersect.
pub fn effective_write_quorum(configured: usize, members: usize) -> usize {
    configured.max(1).min(members / 2 + 1).max(1)
}

/// How many members must answer before failover may pick a new owner: enough that the answers
/// intersect every write quorum, so the most advanced answer holds every acknowledged write.
pub fn read_quorum(configured_write_quorum: usize, members: usize) -> usize {
    members + 1 - effective_write_quorum(configured_write_quorum, members)
}

/// The slots of one colo; index = slot number.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ColoSlots {
    pub slots: Vec<SlotReplicas>,
}

/// A region's placement: published by the control plane, watched by every node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::Placement", into = "wire::Placement")]
pub struct PlacementMap {
    pub region: String,
    /// Bumped on every publish; nodes ignore maps older than the one they hold.
    pub version: u64,
    pub slot_count: u32,
    /// Configured write quorum per namespace is applied by the nodes; this is the default the
    /// control plane used to place replicas.
    pub replicas: usize,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub colos: BTreeMap<String, ColoSlots>,
}

impl PlacementMap {
    pub fn replicas_of(&self, colo: &str, slot: u32) -> Option<&SlotReplicas> {
        self.colos.get(colo)?.slots.get(slot as usize)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Sets `colo`'s `slot` to `next`, a hand-off's outcome, only if the slot still has the owner
    /// and epoch of `from`, where the hand-off started: had it failed over meanwhile, its new
    /// owner holds that epoch already, and publishing `next` too would give the epoch two
    /// owners. Whether it did.
    pub fn replace_if_unchanged(
        &mut self,
        colo: &str,
        slot: u32,
        from: &SlotReplicas,
        next: SlotReplicas,
    ) -> bool {
        match self
            .colos
            .get_mut(colo)
            .and_then(|c| c.slots.get_mut(slot as usize))
        {
            Some(s) if s.owner == from.owner && s.epoch == from.epoch => {
                *s = next;
                true
            }
            _ => false,
        }
    }

    /// Number of slots (over all colos) that `node` owns.
    pub fn owned_by(&self, node: &str) -> usize {
        self.colos
            .values()
            .flat_map(|c| c.slots.iter())
            .filter(|s| s.owner == node)
            .count()
    }
}

/// The compact wire form: nodes listed once, slots as `[epoch, owner, follower...]` node indices,
/// which keeps a 1024-slot colo around 20 KB of JSON (a ConfigMap holds at most 1 MiB).
mod wire {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Placement {
        pub region: String,
        pub version: u64,
        pub slot_count: u32,
        pub replicas: usize,
        pub nodes: Vec<NodeInfo>,
        pub colos: BTreeMap<String, Vec<Vec<u64>>>,
        /// Sparse: colo -> slot -> node indices, for the rare slots changing membership.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub learners: BTreeMap<String, BTreeMap<u32, Vec<u64>>>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub leaving: BTreeMap<String, BTreeMap<u32, Vec<u64>>>,
    }

    impl From<PlacementMap> for Placement {
        fn from(map: PlacementMap) -> Self {
            let index: HashMap<&str, u64> = map
                .nodes
                .keys()
                .enumerate()
                .map(|(i, n)| (n.as_str(), i as u64))
                .collect();
            let idx = |n: &str| index.get(n).copied().unwrap_or(u64::MAX);
            let colos = map
                .colos
                .iter()
                .map(|(colo, slots)| {
                    let rows = slots
                        .slots
                        .iter()
                        .map(|s| {
                            let mut row = vec![s.epoch, idx(&s.owner)];
                            row.extend(s.followers.iter().map(|f| idx(f)));
                            row
                        })
                        .collect();
                    (colo.clone(), rows)
                })
                .collect();
            let sparse = |pick: fn(&SlotReplicas) -> &Vec<String>| {
                let mut out: BTreeMap<String, BTreeMap<u32, Vec<u64>>> = BTreeMap::new();
                for (colo, slots) in &map.colos {
                    for (i, s) in slots.slots.iter().enumerate() {
                        let list = pick(s);
                        if !list.is_empty() {
                            out.entry(colo.clone())
                                .or_default()
                                .insert(i as u32, list.iter().map(|n| idx(n)).collect());
                        }
                    }
                }
                out
            };
            let learners = sparse(|s| &s.learners);
            let leaving = sparse(|s| &s.leaving);
            Placement {
                region: map.region,
                version: map.version,
                slot_count: map.slot_count,
                replicas: map.replicas,
                nodes: map.nodes.into_values().collect(),
                colos,
                learners,
                leaving,
            }
        }
    }

    impl TryFrom<Placement> for PlacementMap {
        type Error = String;

        fn try_from(w: Placement) -> Result<Self, String> {
            let names: Vec<String> = w.nodes.iter().map(|n| n.name.clone()).collect();
            let name = |i: u64| -> Result<String, String> {
                names.get(i as usize).cloned().ok_or_else(|| {
                    format!(
                        "slot refers to node #{i}, but only {} nodes are listed",
                        names.len()
                    )
                })
            };
            let mut colos = BTreeMap::new();
            for (colo, rows) in w.colos {
                if rows.len() != w.slot_count as usize {
                    return Err(format!(
                        "colo {colo:?} lists {} slots, expected slotCount = {}",
                        rows.len(),
                        w.slot_count
                    ));
                }
                let mut slots = Vec::with_capacity(rows.len());
                for (i, row) in rows.into_iter().enumerate() {
                    if row.len() < 2 {
                        return Err(format!(
                            "colo {colo:?} slot {i}: expected [epoch, owner, followers...]"
                        ));
                    }
                    slots.push(SlotReplicas {
                        epoch: row[0],
                        owner: name(row[1])?,
                        followers: row[2..]
                            .iter()
                            .map(|&f| name(f))
                            .collect::<Result<_, _>>()?,
                        learners: Vec::new(),
                        leaving: Vec::new(),
                    });
                }
                colos.insert(colo, ColoSlots { slots });
            }
            for (sparse, is_learners) in [(&w.learners, true), (&w.leaving, false)] {
                for (colo, per_slot) in sparse {
                    for (slot, list) in per_slot {
                        let Some(s) = colos
                            .get_mut(colo)
                            .and_then(|c: &mut ColoSlots| c.slots.get_mut(*slot as usize))
                        else {
                            return Err(format!(
                                "membership change for unknown slot {colo}#{slot}"
                            ));
                        };
                        let names = list
                            .iter()
                            .map(|&n| name(n))
                            .collect::<Result<Vec<_>, _>>()?;
                        if is_learners {
                            s.learners = names;
                        } else {
                            s.leaving = names;
                        }
                    }
                }
            }
            let mut nodes = BTreeMap::new();
            for n in w.nodes {
                if nodes.insert(n.name.clone(), n).is_some() {
                    return Err("a node is listed twice".to_string());
                }
            }
            Ok(PlacementMap {
                region: w.region,
                version: w.version,
                slot_count: w.slot_count,
                replicas: w.replicas,
                nodes,
                colos,
            })
        }
    }
}

/// What [`assign_slots`] needs to know.
#[derive(Clone, Debug)]
pub struct AssignInput<'a> {
    /// The home colo whose slots are being placed.
    pub colo: &'a str,
    pub slot_count: u32,
    /// Replica set size wanted (owner included).
    pub replicas: usize,
    /// Healthy nodes of the whole region (any colo).
    pub nodes: &'a [NodeInfo],
    /// The current placement of this colo, if any: kept as far as possible.
    pub previous: Option<&'a ColoSlots>,
}

/// The result of [`assign_slots`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub slots: ColoSlots,
    /// Slots whose owner differs from `previous`.
    pub owners_moved: usize,
    /// Follower roles that differ from `previous`.
    pub followers_moved: usize,
    /// True when the region has fewer healthy nodes than `replicas`: every node is used.
    pub under_replicated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no healthy node in region to own the slots of colo {0:?}")]
    NoNodes(String),
    #[error("slot count must be at least 1")]
    NoSlots,
}

/// Places the slots of one colo on the healthy nodes of its region.
///
/// Owners come from the colo's own nodes (the whole region's when the colo has none), each owning
/// `slot_count / n` or one more; followers come from other colos first so a replica set spans as
/// many colos as possible, with follower roles balanced across nodes. Starting from `previous`,
/// an owner or follower keeps its slot unless it is gone or over its share, so only the slots of
/// nodes that left, or the surplus needed to fill a new node, move. An owner change bumps the
/// slot's epoch.
pub fn assign_slots(input: &AssignInput<'_>) -> Result<Assignment, PlacementError> {
    if input.slot_count == 0 {
        return Err(PlacementError::NoSlots);
    }
    let mut region: Vec<&NodeInfo> = input.nodes.iter().collect();
    region.sort();
    region.dedup_by(|a, b| a.name == b.name);
    if region.is_empty() {
        return Err(PlacementError::NoNodes(input.colo.to_string()));
    }
    let home: Vec<&NodeInfo> = region
        .iter()
        .copied()
        .filter(|n| n.colo == input.colo)
        .collect();
    let owner_candidates = if home.is_empty() {
        region.clone()
    } else {
        home
    };
    let previous = input
        .previous
        .filter(|p| p.slots.len() == input.slot_count as usize);

    let owners = assign_owners(input.slot_count as usize, &owner_candidates, previous);
    let colo_of: HashMap<&str, &str> = region
        .iter()
        .map(|n| (n.name.as_str(), n.colo.as_str()))
        .collect();
    let followers_wanted = input.replicas.saturating_sub(1).min(region.len() - 1);
    let followers = assign_followers(&owners, followers_wanted, &region, &colo_of, previous);

    let mut owners_moved = 0;
    let mut followers_moved = 0;
    let slots = owners
        .into_iter()
        .zip(followers)
        .enumerate()
        .map(|(i, (owner, followers))| {
            let prev = previous.map(|p| &p.slots[i]);
            let epoch = match prev {
                Some(p) if p.owner == owner => p.epoch,
                Some(p) => {
                    owners_moved += 1;
                    p.epoch + 1
                }
                None => 1,
            };
            if let Some(p) = prev {
                followers_moved += followers
                    .iter()
                    .filter(|f| !p.followers.contains(f))
                    .count();
            }
            SlotReplicas {
                epoch,
                owner,
                followers,
                learners: Vec::new(),
                leaving: Vec::new(),
            }
        })
        .collect();
    Ok(Assignment {
        slots: ColoSlots { slots },
        owners_moved,
        followers_moved,
        under_replicated: region.len() < input.replicas,
    })
}

fn assign_owners(
    slot_count: usize,
    candidates: &[&NodeInfo],
    previous: Option<&ColoSlots>,
) -> Vec<String> {
    let n = candidates.len();
    let base = slot_count / n;
    let extra = slot_count % n;
    let mut current: HashMap<&str, usize> =
        candidates.iter().map(|c| (c.name.as_str(), 0)).collect();
    if let Some(prev) = previous {
        for s in &prev.slots {
            if let Some(c) = current.get_mut(s.owner.as_str()) {
                *c += 1;
            }
        }
    }
    // The `extra` one-more shares go to the nodes that already own the most, so fewer slots move.
    let mut by_load: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
    by_load.sort_by(|a, b| current[b].cmp(&current[a]).then(a.cmp(b)));
    let quota: HashMap<&str, usize> = by_load
        .iter()
        .enumerate()
        .map(|(i, name)| (*name, base + usize::from(i < extra)))
        .collect();

    let mut assigned: HashMap<&str, usize> =
        candidates.iter().map(|c| (c.name.as_str(), 0)).collect();
    let mut owners: Vec<Option<String>> = vec![None; slot_count];
    if let Some(prev) = previous {
        for (i, s) in prev.slots.iter().enumerate() {
            let name = s.owner.as_str();
            if let (Some(q), Some(a)) = (quota.get(name), assigned.get_mut(name))
                && *a < *q
            {
                *a += 1;
                owners[i] = Some(s.owner.clone());
            }
        }
    }
    for owner in owners.iter_mut().filter(|o| o.is_none()) {
        let pick = by_load
            .iter()
            .copied()
            .filter(|n| assigned[n] < quota[n])
            .max_by(|a, b| {
                (quota[a] - assigned[a])
                    .cmp(&(quota[b] - assigned[b]))
                    .then(b.cmp(a))
            })
            .unwrap_or(by_load[0]);
        if let Some(a) = assigned.get_mut(pick) {
            *a += 1;
        }
        *owner = Some(pick.to_string());
    }
    owners.into_iter().map(Option::unwrap_or_default).collect()
}

fn distinct_colos<'a>(
    members: impl Iterator<Item = &'a str>,
    colo_of: &HashMap<&str, &'a str>,
) -> usize {
    members
        .filter_map(|m| colo_of.get(m))
        .collect::<BTreeSet<_>>()
        .len()
}

fn assign_followers(
    owners: &[String],
    wanted: usize,
    region: &[&NodeInfo],
    colo_of: &HashMap<&str, &str>,
    previous: Option<&ColoSlots>,
) -> Vec<Vec<String>> {
    let mut load: BTreeMap<&str, usize> = region.iter().map(|n| (n.name.as_str(), 0)).collect();
    let colos_with_nodes: BTreeSet<&str> = region.iter().map(|n| n.colo.as_str()).collect();

    // Pass 1: keep the previous followers that are still healthy and not the owner, unless a
    // follower shares a colo already represented while an unrepresented colo is available.
    let mut sets: Vec<Vec<String>> = Vec::with_capacity(owners.len());
    for (i, owner) in owners.iter().enumerate() {
        let mut chosen: Vec<String> = Vec::new();
        if let Some(prev) = previous {
            let mut used: BTreeSet<&str> =
                colo_of.get(owner.as_str()).copied().into_iter().collect();
            for f in &prev.slots[i].followers {
                if chosen.len() == wanted {
                    break;
                }
                let Some(colo) = colo_of.get(f.as_str()).copied() else {
                    continue;
                };
                if f == owner || chosen.contains(f) {
                    continue;
                }
                let unused_colo_available = colos_with_nodes.iter().any(|c| !used.contains(c));
                if used.contains(colo) && unused_colo_available {
                    continue;
                }
                used.insert(colo);
                chosen.push(f.clone());
            }
        }
        for f in &chosen {
            if let Some(l) = load.get_mut(f.as_str()) {
                *l += 1;
            }
        }
        sets.push(chosen);
    }

    // Pass 2: fill each set, preferring an unrepresented colo, then the least loaded node.
    for (owner, chosen) in owners.iter().zip(sets.iter_mut()) {
        while chosen.len() < wanted {
            let used: BTreeSet<&str> = std::iter::once(owner.as_str())
                .chain(chosen.iter().map(String::as_str))
                .filter_map(|m| colo_of.get(m).copied())
                .collect();
            let pick = region
                .iter()
                .filter(|n| n.name != *owner && !chosen.contains(&n.name))
                .min_by_key(|n| {
                    (
                        used.contains(n.colo.as_str()),
                        load[n.name.as_str()],
                        &n.name,
                    )
                });
            let Some(pick) = pick else { break };
            if let Some(l) = load.get_mut(pick.name.as_str()) {
                *l += 1;
            }
            chosen.push(pick.name.clone());
        }
    }

    // Pass 3: even out follower roles (a node that just joined has none) without reducing any
    // replica set's colo diversity. Each step moves one role from the busiest to the idlest node.
    let max_steps = owners.len() * wanted.max(1);
    for _ in 0..max_steps {
        let Some((&busiest, &hi)) = load
            .iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))
        else {
            break;
        };
        let Some((&idlest, &lo)) = load.iter().min_by_key(|(n, l)| (**l, **n)) else {
            break;
        };
        if hi <= lo + 1 {
            break;
        }
        let movable = owners.iter().zip(sets.iter()).position(|(owner, set)| {
            if owner == idlest
                || set.iter().any(|f| f == idlest)
                || !set.iter().any(|f| f == busiest)
            {
                return false;
            }
            let before = distinct_colos(
                std::iter::once(owner.as_str()).chain(set.iter().map(String::as_str)),
                colo_of,
            );
            let after = distinct_colos(
                std::iter::once(owner.as_str())
                    .chain(set.iter().map(String::as_str).filter(|f| *f != busiest))
                    .chain(std::iter::once(idlest)),
                colo_of,
            );
            after >= before
        });
        let Some(slot) = movable else { break };
        for f in sets[slot].iter_mut() {
            if f == busiest {
                *f = idlest.to_string();
            }
        }
        if let Some(l) = load.get_mut(busiest) {
            *l -= 1;
        }
        if let Some(l) = load.get_mut(idlest) {
            *l += 1;
        }
    }
    sets
}

/// A follower's answer to "what is your last durable position in this slot?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowerReport {
    pub node: String,
    /// `None`: the follower did not answer (down, cut off, or timed out).
    pub durable: Option<Lsn>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    #[error("slot has no followers to fail over to")]
    NoFollowers,
    #[error(
        "only {answered} of the slot's replicas answered; {needed} are needed to be sure no acknowledged write is lost"
    )]
    NotEnoughAnswers { answered: usize, needed: usize },
}

/// Picks the new owner of a slot whose owner's heartbeat lapsed.
///
/// Requires answers from enough followers that they intersect every write quorum (so one of them
/// holds every acknowledged write), picks the most advanced (ties broken by the smaller name),
/// bumps the epoch, and keeps the failed owner as a follower so it can catch up when it returns.
pub fn choose_failover(
    slot: &SlotReplicas,
    reports: &[FollowerReport],
    configured_write_quorum: usize,
) -> Result<SlotReplicas, FailoverError> {
    if slot.followers.is_empty() && slot.leaving.is_empty() {
        return Err(FailoverError::NoFollowers);
    }
    // Leaving members still count: writes they acknowledged before they started leaving may be
    // held by fewer than a quorum of the remaining voters.
    let members = slot.len() + slot.leaving.len();
    let needed = read_quorum(configured_write_quorum, members);
    let answers: BTreeMap<&str, Lsn> = reports
        .iter()
        .filter(|r| {
            r.node != slot.owner
                && (slot.followers.contains(&r.node) || slot.leaving.contains(&r.node))
        })
        .filter_map(|r| r.durable.map(|lsn| (r.node.as_str(), lsn)))
        .collect();
    if answers.len() < needed {
        return Err(FailoverError::NotEnoughAnswers {
            answered: answers.len(),
            needed,
        });
    }
    let chosen = answers
        .iter()
        .max_by(|(na, la), (nb, lb)| la.cmp(lb).then(nb.cmp(na)))
        .map(|(n, _)| n.to_string())
        .ok_or(FailoverError::NoFollowers)?;
    Ok(promote(slot, &chosen))
}

/// The replica set after `new_owner` (a follower, or a leaving member) takes over: epoch bumped,
/// the old owner demoted to follower in its place.
pub fn promote(slot: &SlotReplicas, new_owner: &str) -> SlotReplicas {
    let mut followers: Vec<String> = slot
        .followers
        .iter()
        .filter(|f| *f != new_owner)
        .cloned()
        .collect();
    followers.push(slot.owner.clone());
    SlotReplicas {
        epoch: slot.epoch + 1,
        owner: new_owner.to_string(),
        followers,
        learners: slot.learners.clone(),
        leaving: slot
            .leaving
            .iter()
            .filter(|l| *l != new_owner)
            .cloned()
            .collect(),
    }
}

/// What [`plan_membership`] needs to know about the slot's members right now.
pub struct MembershipProgress<'a> {
    /// Whether a node holds durably everything the owner has (as last reported by both).
    pub caught_up: &'a dyn Fn(&str) -> bool,
    /// Whether the owner has applied the currently published membership (so acknowledgements
    /// from members marked leaving no longer count there).
    pub owner_applied_current: bool,
    pub configured_write_quorum: usize,
}

/// One safe step from the current replica set of a slot towards a target membership (owner and
/// followers from [`assign_slots`]); publish it, then call again with fresh progress.
///
/// - a target member not in the set joins as a learner; a learner that caught up becomes a
///   follower (adding a voter only grows the read quorum, so intersections hold);
/// - a follower not in the target becomes *leaving* once a replacement voter exists (voters never
///   drop below the target count), and is removed only when the owner applied that change and a
///   write quorum of the remaining voters holds everything — until then failover still counts it;
/// - the owner and epoch never change here: ownership moves by hand-off ([`handoffs`]).
pub fn plan_membership(
    current: &SlotReplicas,
    target: &SlotReplicas,
    progress: &MembershipProgress<'_>,
) -> SlotReplicas {
    let wanted: Vec<&str> = target.members().collect();
    let mut next = current.clone();
    // Joiners, and leaving members that are wanted again, start as learners.
    for m in &wanted {
        if !next.has(m) {
            next.learners.push(m.to_string());
        }
    }
    let rejoining: Vec<String> = next
        .leaving
        .iter()
        .filter(|l| wanted.contains(&l.as_str()))
        .cloned()
        .collect();
    next.leaving.retain(|l| !rejoining.contains(l));
    next.learners.extend(rejoining);
    next.learners
        .retain(|l| wanted.contains(&l.as_str()) && *l != next.owner);
    // Learners that caught up vote.
    let (ready, waiting): (Vec<String>, Vec<String>) = next
        .learners
        .iter()
        .cloned()
        .partition(|l| (progress.caught_up)(l));
    next.followers.extend(ready);
    next.learners = waiting;
    // Surplus voters start leaving, one replacement at a time.
    let departing: Vec<String> = next
        .followers
        .iter()
        .filter(|f| !wanted.contains(&f.as_str()))
        .cloned()
        .collect();
    for d in departing {
        if next.len() > wanted.len().max(1) {
            next.followers.retain(|f| *f != d);
            next.leaving.push(d);
        }
    }
    // Leaving members go once the remaining voters hold everything, as a quorum.
    if progress.owner_applied_current && !current.leaving.is_empty() {
        let holders = 1 + next
            .followers
            .iter()
            .filter(|f| (progress.caught_up)(f))
            .count();
        if holders >= effective_write_quorum(progress.configured_write_quorum, next.len()) {
            let removable: Vec<String> = current.leaving.clone();
            next.leaving.retain(|l| !removable.contains(l));
        }
    }
    next
}

/// A planned move of a slot's ownership between two live nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handoff {
    pub slot: u32,
    pub from: String,
    pub to: String,
}

/// The hand-offs that bring `current` to `target` owners (e.g. to restore locality after a
/// failover once the home colo's node is back). Only slots whose target owner is already in the
/// current replica set qualify: it holds the data and can be caught up before the epoch bump.
pub fn handoffs(current: &ColoSlots, target: &ColoSlots) -> Vec<Handoff> {
    current
        .slots
        .iter()
        .zip(&target.slots)
        .enumerate()
        .filter(|(_, (c, t))| c.owner != t.owner && c.followers.contains(&t.owner))
        .map(|(i, (c, t))| Handoff {
            slot: i as u32,
            from: c.owner.clone(),
            to: t.owner.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
