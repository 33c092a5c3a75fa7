//! One slot on this node: its role, its position in the slot's log, and
//! - as **owner**: the entries waiting for a write quorum and how far each follower has got;
//! - as **follower**: accepting the owner's entries in order, durably, and acknowledging them.
//!
//! Safety rests on three rules. Entries are accepted only in chain order (a follower's durable
//! position summarises everything before it). A follower fenced at epoch E refuses entries of
//! older epochs and never acknowledges them afterwards, even ones it had already accepted. And an
//! owner answers clients only while its lease is valid, once a quorum of voters holds the entry.

use super::Cluster;
use super::ring::{RING_ENTRIES, Ring, RingBudget};
use super::wire::{FollowerState, Frame, append_frame, restamped};
use crate::error::ApiError;
use crate::lsn::Lsn;
use crate::placement::{SlotReplicas, effective_write_quorum};
use crate::storage::log::{Append, Fence, LogError};
use crate::storage::record::{Entry, ObjectKey, SlotKey, SlotPos};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Called once an entry is durable on a write quorum (with its local log position) or has failed.
pub type Done = Box<dyn FnOnce(Result<u64, ApiError>) + Send>;

/// Where acknowledgements and status reports to an owner go.
pub type Replier = UnboundedSender<Frame>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Bringing a quorum of voters up to its position before serving.
    Recovering,
    Serving,
    /// Handing off: no new writes; waiting for the target to catch up.
    Draining,
    /// Its local log failed (disk full): not serving until it has caught up again as a follower.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    None,
    Follower { epoch: u64 },
    Owner { epoch: u64, phase: Phase },
}

struct Pending {
    pos: SlotPos,
    needed: usize,
    /// Local log position once durable here.
    log_lsn: Option<u64>,
    done: Option<Done>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Stream {
    /// Waiting for the follower to report its position.
    Probing,
    Streaming,
    /// The follower is installing a snapshot.
    Syncing,
}

struct Progress {
    node: String,
    /// Counts towards the write quorum (a follower, not a learner or leaving member).
    votes: bool,
    acked: Lsn,
    stream: Stream,
    /// When `stream` last changed, or (streaming) when `acked` last moved.
    since: Instant,
    /// When this follower was last told to sync. Kept apart from `since`, which every re-probe
    /// resets: a follower whose sync failed was never asked again while re-probes kept coming.
    sync_asked: Option<Instant>,
    /// The position the owner last resent its recent entries from, and when (see
    /// [`RESEND_INTERVAL`]).
    resent: Option<(SlotPos, Instant)>,
}

/// The streaming followers an entry goes to, each with whether the owner counts on it for the
/// quorum of `needed` voters (the owner among them): the voters furthest along, up to
/// `needed - 1`, first in placement order among equals. These commit the entry at once; the
/// others log it lazily (see [`crate::storage::log::NodeLog::urge`]). A follower that stalls
/// falls behind within the lazy delay, and the next entry counts on another.
fn counted_on(progress: &[Progress], needed: usize) -> Vec<(&str, bool)> {
    let streaming: Vec<&Progress> = progress
        .iter()
        .filter(|p| p.stream == Stream::Streaming)
        .collect();
    let mut voters: Vec<usize> = (0..streaming.len())
        .filter(|&i| streaming[i].votes)
        .collect();
    // Stable: equals keep placement order.
    voters.sort_by(|&a, &b| streaming[b].acked.cmp(&streaming[a].acked));
    voters.truncate(needed.saturating_sub(1));
    streaming
        .iter()
        .enumerate()
        .map(|(i, p)| (p.node.as_str(), voters.contains(&i)))
        .collect()
}

/// A follower that still needs a snapshot sync this long after being told is told again (its
/// previous attempt may have failed, e.g. while this owner was still recovering).
const SYNC_REASK: Duration = Duration::from_secs(2);

/// A streaming follower whose acknowledgements have not moved for this long while it is behind
/// is probed again: the frames resent to it may have been dropped with a reconnecting link.
const STALLED_FOLLOWER: Duration = Duration::from_secs(1);

/// The owner resends its recent entries from the same position to a follower that reports a gap
/// at most this often (again at once when the follower answers a probe, or once the link
/// reconnects). A resend takes time to arrive, and every frame that reaches the follower before
/// the resend does answers with the same gap: resending for each of those answers sent the whole
/// tail again per frame in flight, and a follower whose log kept failing (a full disk) drew
/// megabytes of resends per second, behind which its acknowledgements waited for many seconds
/// after it had recovered.
pub(crate) const RESEND_INTERVAL: Duration = Duration::from_secs(1);

pub struct SlotState {
    pub role: Role,
    /// Entries of epochs below this are refused (a durable promise, see [`Slot::fence`]).
    pub fenced: u64,
    /// Last entry handed to the local log.
    pub appended: SlotPos,
    /// Last entry durable in the local log.
    pub durable: SlotPos,
    /// Follower: last entry written into the database files.
    pub applied: Lsn,
    /// Generation for log fencing: bumped after a local log failure.
    generation: u64,
    pending: VecDeque<Pending>,
    progress: Vec<Progress>,
    /// Entries kept to resend to receivers a little behind.
    ring: Ring,
    /// The replica set this node last applied from the placement map.
    pub replicas: Option<SlotReplicas>,
    /// Write quorum configured (largest over the namespaces), for serving decisions.
    pub configured_quorum: usize,
    /// Follower: a snapshot sync is running.
    pub syncing: bool,
    /// Follower after a demotion: local copies are still open as owner objects.
    pub closing: bool,
    /// Follower: entries of an object at or below its floor are not applied (snapshot sync).
    pub floors: HashMap<ObjectKey, Lsn>,
    /// First epoch this node accepted writes in as owner (recorded once per epoch).
    accepted_epoch: u64,
    /// Owner: the target of the hand-off in progress. One at a time: a second one's drain
    /// guard could put the slot back to serving while the first fences it.
    handing_off: Option<String>,
}

pub struct Slot {
    pub key: SlotKey,
    state: Mutex<SlotState>,
    /// Woken whenever the slot's role or phase changes.
    pub changed: tokio::sync::Notify,
}

/// What the admin API reports about a slot.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotReport {
    pub colo: String,
    pub slot: u32,
    pub role: &'static str,
    pub phase: Option<Phase>,
    pub epoch: u64,
    pub fenced: u64,
    pub durable: Lsn,
    pub appended: Lsn,
    pub applied: Lsn,
    pub pending: usize,
    pub followers: Vec<FollowerReport>,
    /// Owner: the target of the hand-off in progress, if one is.
    pub handing_off: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FollowerReport {
    pub node: String,
    pub votes: bool,
    pub acked: Lsn,
    pub stream: Stream,
}

fn not_owner(key: &SlotKey, why: &str) -> ApiError {
    ApiError::unavailable(
        "not_owner",
        format!("this node does not serve slot {key} right now ({why}); retry"),
    )
}

impl Slot {
    /// A slot at `position`; `recent` are its newest entries in the local log (see
    /// [`seed_ring`]); its ring shares the node's `rings` budget.
    pub fn new(
        key: SlotKey,
        fenced: u64,
        position: SlotPos,
        floors: HashMap<ObjectKey, Lsn>,
        recent: VecDeque<Entry>,
        rings: Arc<RingBudget>,
    ) -> Self {
        let mut state = SlotState {
            role: Role::None,
            fenced,
            appended: position,
            durable: position,
            applied: position.lsn,
            generation: 0,
            pending: VecDeque::new(),
            progress: Vec::new(),
            ring: Ring::new(position, rings),
            replicas: None,
            configured_quorum: 1,
            syncing: false,
            closing: false,
            floors,
            accepted_epoch: 0,
            handing_off: None,
        };
        seed_ring(&mut state, recent);
        Slot {
            key,
            state: Mutex::new(state),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// The epoch this node owns the slot in, if it does.
    pub fn owner_epoch(&self) -> Option<u64> {
        match self.lock().role {
            Role::Owner { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    pub fn durable(&self) -> SlotPos {
        self.lock().durable
    }

    /// True if this node serves the slot now (owner, serving, not fenced).
    pub fn serving(&self) -> bool {
        let st = self.lock();
        matches!(st.role, Role::Owner { epoch, phase: Phase::Serving } if epoch >= st.fenced)
    }

    /// Whether this node's copy of the slot is complete and can be handed to a syncing follower:
    /// a serving owner; one draining for a hand-off (it takes no new writes, but the hand-off
    /// target may itself need a snapshot before it can catch up — refusing it then made every
    /// hand-back to a diverged follower time out, over and over); or one recovering whose files
    /// hold everything it has. A recovering owner waits for a quorum to hold its entries, and a
    /// follower that needs a snapshot can only get it from the owner: when the other voters were
    /// gone, refusing it left the slot unavailable for good (after a power cut of every node, one
    /// of which never came back). The owner is the most advanced voter of its epoch, so a
    /// snapshot of it takes nothing from a follower that an acknowledgement depends on.
    pub fn can_snapshot(&self) -> bool {
        self.snapshot_position().is_some()
    }

    /// The position a snapshot of the slot would be at, when this node can hand one out (see
    /// [`Slot::can_snapshot`]).
    pub fn snapshot_position(&self) -> Option<SlotPos> {
        let st = self.lock();
        let complete = st.appended == st.durable && st.applied >= st.durable.lsn;
        let can = match st.role {
            Role::Owner { epoch, phase } if epoch >= st.fenced => match phase {
                Phase::Serving | Phase::Draining => true,
                Phase::Recovering => complete,
                Phase::Failed => false,
            },
            _ => false,
        };
        can.then_some(st.appended)
    }

    // ----- owner side -----

    /// Places a committed entry in the slot's log, logs it locally and sends it to the followers.
    /// `done` runs once `needed` voters (this node included) hold it durably. `lone`: nothing
    /// else is in flight, so this thread writes the entry to the followers' sockets itself.
    pub fn append(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        mut entry: Entry,
        configured_quorum: usize,
        lone: bool,
        done: Done,
    ) -> Result<SlotPos, ApiError> {
        let mut st = self.lock();
        let epoch = match st.role {
            Role::Owner {
                epoch,
                phase: Phase::Serving,
            } if epoch >= st.fenced => epoch,
            Role::Owner {
                phase: Phase::Failed,
                ..
            } => {
                return Err(ApiError::new(
                    507,
                    "storage_full",
                    "this node cannot write its log (disk full?); the slot moves to another node",
                ));
            }
            _ => return Err(not_owner(&self.key, "ownership moved")),
        };
        if !cl.lease.valid() {
            return Err(not_owner(&self.key, "its lease is not current"));
        }
        let voters = st.replicas.as_ref().map_or(1, SlotReplicas::len);
        let needed = effective_write_quorum(configured_quorum, voters);
        let prev = st.appended;
        let pos = entry.place_after(prev, Lsn::new(epoch, prev.lsn.seq + 1));
        st.appended = pos;
        if st.accepted_epoch < epoch {
            st.accepted_epoch = epoch;
            cl.note_owner_epoch(&self.key, epoch);
        }
        let frame = append_frame(&entry, epoch);
        let object = entry.object();
        let kind = entry.kind;
        let bytes = entry.shared_bytes();
        cl.links
            .send_append(&counted_on(&st.progress, needed), &frame, lone);
        st.ring.push(frame, pos, !cl.standalone);
        st.pending.push_back(Pending {
            pos,
            needed,
            log_lsn: None,
            done: Some(done),
        });
        // Logged while holding the slot lock, so the local log has the slot's entries in order.
        let slot = self.clone();
        let cl2 = cl.clone();
        cl.log.append(Append {
            kind,
            object,
            fence: Some(Fence {
                slot: self.key.clone(),
                generation: st.generation,
            }),
            payload: bytes,
            lazy: false,
            done: Box::new(move |r| slot.on_local_durable(&cl2, pos, r)),
        });
        Ok(pos)
    }

    fn on_local_durable(&self, cl: &Arc<Cluster>, pos: SlotPos, result: Result<u64, LogError>) {
        let mut st = self.lock();
        let released = match result {
            Ok(log_lsn) => {
                if pos.lsn > st.durable.lsn {
                    st.durable = pos;
                }
                // Written by this node's own SQLite: its database already holds the entry, as
                // the applier's writes do for followed entries. Without this, an owner that was
                // published again at a newer epoch (a hand-off that failed after fencing) waited
                // in recovery for an applier that had nothing to apply, and never served.
                if pos.lsn > st.applied {
                    st.applied = pos.lsn;
                }
                if let Some(p) = st.pending.iter_mut().find(|p| p.pos.lsn == pos.lsn) {
                    p.log_lsn = Some(log_lsn);
                }
                if !matches!(st.role, Role::Owner { .. }) {
                    // Written as follower.
                    Vec::new()
                } else {
                    take_released(&mut st, cl)
                }
            }
            Err(e) => {
                // The local log refused or failed: nothing after this entry is in it. Stop serving
                // and fail what waits; a standalone node resumes at once, a clustered one lets its
                // lease lapse (see `Cluster::healthy`) so a follower takes over.
                tracing::error!(slot = %self.key, error = %e, "an entry could not be logged locally");
                cl.metrics_log_failure();
                st.generation += 1;
                let err = crate::object::gate::api_error_of(&e);
                let failed: Vec<Done> = st
                    .pending
                    .drain(..)
                    .filter_map(|mut p| p.done.take())
                    .collect();
                if cl.standalone {
                    st.appended = st.durable;
                    let durable = st.durable;
                    st.ring.reset(durable);
                } else if let Role::Owner { epoch, .. } = st.role {
                    st.role = Role::Owner {
                        epoch,
                        phase: Phase::Failed,
                    };
                }
                drop(st);
                for d in failed {
                    d(Err(err.clone()));
                }
                self.changed.notify_waiters();
                return;
            }
        };
        drop(st);
        for (d, r) in released {
            d(r);
        }
    }

    /// A follower reports everything up to `lsn` durable.
    pub fn on_ack(&self, cl: &Arc<Cluster>, node: &str, lsn: Lsn) {
        let mut st = self.lock();
        if let Some(p) = st.progress.iter_mut().find(|p| p.node == node)
            && lsn > p.acked
        {
            p.acked = lsn;
            p.since = Instant::now();
        }
        let released = take_released(&mut st, cl);
        drop(st);
        for (d, r) in released {
            d(r);
        }
    }

    /// Releases what can be released (e.g. after the lease was renewed).
    pub fn poke(&self, cl: &Arc<Cluster>) {
        let mut st = self.lock();
        // Keeps an idle slot's ring within its share while the node's rings are over budget.
        st.ring.trim(!cl.standalone);
        let recovering = matches!(
            st.role,
            Role::Owner {
                phase: Phase::Recovering,
                ..
            }
        );
        // The common case, an idle or streaming slot, costs one lock: this runs for every owned
        // slot 20 times a second.
        let appended = st.appended.lsn;
        let stalled = |p: &Progress| {
            p.stream == Stream::Streaming
                && p.acked < appended
                && p.since.elapsed() > STALLED_FOLLOWER
        };
        if !matches!(st.role, Role::Owner { .. })
            || (!recovering
                && st.pending.is_empty()
                && st
                    .progress
                    .iter()
                    .all(|p| p.stream == Stream::Streaming && !stalled(p)))
        {
            return;
        }
        let released = take_released(&mut st, cl);
        let recovering_done = recovering && recovered(&st);
        if recovering_done && let Role::Owner { epoch, .. } = st.role {
            st.role = Role::Owner {
                epoch,
                phase: Phase::Serving,
            };
            tracing::info!(slot = %self.key, epoch, durable = %st.durable.lsn, applied = %st.applied, "serving");
        }
        let reprobe: Vec<String> = st
            .progress
            .iter_mut()
            .filter(|p| {
                (p.stream != Stream::Streaming && p.since.elapsed() > Duration::from_millis(300))
                    || stalled(p)
            })
            .map(|p| {
                p.since = Instant::now();
                p.node.clone()
            })
            .collect();
        let epoch = match st.role {
            Role::Owner { epoch, .. } => epoch,
            _ => 0,
        };
        drop(st);
        if recovering_done {
            self.changed.notify_waiters();
        }
        for node in reprobe {
            cl.links.send(
                &node,
                Frame::Probe {
                    slot: self.key.clone(),
                    epoch,
                },
            );
        }
        for (d, r) in released {
            d(r);
        }
    }

    /// A follower reports its position (answer to a probe, a gap, a fence...).
    pub fn on_status(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        node: &str,
        fenced: u64,
        position: SlotPos,
        state: FollowerState,
    ) {
        let mut st = self.lock();
        let Role::Owner { epoch, .. } = st.role else {
            return;
        };
        if fenced > epoch {
            // A newer epoch exists: this node is no longer the owner, whatever its map says.
            tracing::warn!(slot = %self.key, epoch, newer = fenced, from = node, "fenced by a newer epoch; stepping down");
            let failed = step_down(&mut st, Role::None);
            drop(st);
            fail_all(failed, &self.key);
            cl.close_local_objects(self.clone());
            self.changed.notify_waiters();
            return;
        }
        let appended = st.appended;
        let Some(idx) = st.progress.iter().position(|p| p.node == node) else {
            return;
        };
        match state {
            FollowerState::Syncing | FollowerState::Busy | FollowerState::Failing => {
                let p = &mut st.progress[idx];
                p.stream = if state == FollowerState::Syncing {
                    Stream::Syncing
                } else {
                    Stream::Probing
                };
                p.since = Instant::now();
            }
            FollowerState::Ok | FollowerState::Gap | FollowerState::Fenced => {
                if position == appended {
                    let p = &mut st.progress[idx];
                    p.acked = p.acked.max(position.lsn);
                    p.stream = Stream::Streaming;
                } else if let Some(from) = st.ring.index_after(position) {
                    // Only gaps are paced: a frame ahead of the follower's position answers with
                    // one, so a resend in flight draws one per frame. `Ok` answers a probe, which
                    // `poke` and reconnects already pace, and a probe may follow a log failure
                    // that threw the last resend away.
                    let resent_lately = state != FollowerState::Ok
                        && st.progress[idx].resent.is_some_and(|(at, when)| {
                            at == position && when.elapsed() < RESEND_INTERVAL
                        });
                    let p = &mut st.progress[idx];
                    p.acked = p.acked.max(position.lsn);
                    if resent_lately {
                        // Nothing new is on its way: a follower not streaming stays so, and is
                        // probed again shortly.
                        cl.metrics_resend_skipped();
                    } else {
                        // Sent as this epoch's owner, whichever epoch wrote them: a new owner's
                        // tail from the old epoch must reach a quorum before it serves.
                        let frames: Vec<Frame> = st
                            .ring
                            .frames_from(from)
                            .map(|f| restamped(f, epoch))
                            .collect();
                        for f in frames {
                            cl.links.send(node, f);
                        }
                        // A resend is awaited (a gap, a new owner's recovery): no lazy delay.
                        cl.links.send_sync_now(node);
                        cl.metrics_resend();
                        let p = &mut st.progress[idx];
                        p.resent = Some((position, Instant::now()));
                        // The resend gets a full stall interval to be acknowledged.
                        p.since = Instant::now();
                        p.stream = Stream::Streaming;
                    }
                } else {
                    let p = &mut st.progress[idx];
                    if p.stream != Stream::Syncing
                        || p.sync_asked.is_none_or(|t| t.elapsed() > SYNC_REASK)
                    {
                        p.stream = Stream::Syncing;
                        p.since = Instant::now();
                        p.sync_asked = Some(Instant::now());
                        cl.links.send(
                            node,
                            Frame::SyncRequired {
                                slot: self.key.clone(),
                                epoch,
                            },
                        );
                        cl.metrics_sync_required();
                        tracing::warn!(
                            slot = %self.key,
                            follower = node,
                            at = %position.lsn,
                            owner_at = %appended.lsn,
                            "follower diverged or fell too far behind; repairing it with a snapshot sync"
                        );
                    }
                }
            }
        }
        let released = take_released(&mut st, cl);
        drop(st);
        for (d, r) in released {
            d(r);
        }
    }

    /// The link to `node` (re)connected: ask it where it is.
    pub fn on_link_up(&self, cl: &Arc<Cluster>, node: &str) {
        let mut st = self.lock();
        let Role::Owner { epoch, .. } = st.role else {
            return;
        };
        if let Some(p) = st.progress.iter_mut().find(|p| p.node == node) {
            p.stream = Stream::Probing;
            p.since = Instant::now();
            // Whatever was resent went down with the old connection.
            p.resent = None;
            drop(st);
            cl.links.send(
                node,
                Frame::Probe {
                    slot: self.key.clone(),
                    epoch,
                },
            );
        }
    }

    // ----- follower side -----

    /// An entry arrived from the owner of `sender_epoch` (at least the entry's own epoch).
    pub fn on_append(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        entry: Entry,
        sender_epoch: u64,
        lazy: bool,
        reply: &Replier,
    ) {
        let mut st = self.lock();
        let status = |st: &SlotState, state: FollowerState| Frame::Status {
            slot: self.key.clone(),
            fenced: st.fenced,
            position: st.durable,
            state,
        };
        if st.syncing {
            let _ = reply.send(status(&st, FollowerState::Syncing));
            return;
        }
        if sender_epoch < st.fenced {
            let _ = reply.send(status(&st, FollowerState::Fenced));
            return;
        }
        match st.role {
            Role::Owner { epoch, .. } if sender_epoch <= epoch => {
                let _ = reply.send(status(&st, FollowerState::Fenced));
                return;
            }
            Role::Owner { .. } => {
                // A newer owner exists and this node's map lags: stop owning.
                let failed = step_down(
                    &mut st,
                    Role::Follower {
                        epoch: sender_epoch,
                    },
                );
                st.closing = true;
                drop(st);
                fail_all(failed, &self.key);
                cl.close_local_objects(self.clone());
                self.changed.notify_waiters();
                let st = self.lock();
                let _ = reply.send(status(&st, FollowerState::Busy));
                return;
            }
            _ => {}
        }
        if st.closing {
            let _ = reply.send(status(&st, FollowerState::Busy));
            return;
        }
        if !cl.log.shared().healthy() && st.appended != st.durable {
            let _ = reply.send(status(&st, FollowerState::Failing));
            return;
        }
        if !entry.follows(st.appended) {
            if entry.lsn() <= st.appended.lsn && st.ring.has(entry.position()) {
                return; // a resend of something already here
            }
            cl.metrics_gap();
            let _ = reply.send(status(&st, FollowerState::Gap));
            return;
        }
        let pos = entry.position();
        st.appended = pos;
        st.fenced = st.fenced.max(sender_epoch);
        let frame = append_frame(&entry, sender_epoch);
        st.ring.push(frame, pos, true);
        let slot = self.clone();
        let cl2 = cl.clone();
        let reply = reply.clone();
        let object = entry.object();
        let kind = entry.kind;
        let shared = Arc::new(entry);
        let for_apply = shared.clone();
        cl.log.append(Append {
            kind,
            object,
            fence: Some(Fence {
                slot: self.key.clone(),
                generation: st.generation,
            }),
            payload: shared.shared_bytes(),
            // From an owner that sends `Frame::SyncNow`: committed at once only when it counts on
            // this node.
            lazy,
            done: Box::new(move |r| {
                slot.on_follower_durable(&cl2, pos, sender_epoch, r, for_apply, &reply)
            }),
        });
    }

    fn on_follower_durable(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        pos: SlotPos,
        sender_epoch: u64,
        result: Result<u64, LogError>,
        entry: Arc<Entry>,
        reply: &Replier,
    ) {
        let mut st = self.lock();
        match result {
            Ok(log_lsn) => {
                if pos.lsn > st.durable.lsn {
                    st.durable = pos;
                }
                // Never acknowledge to an owner of an epoch this node has since been fenced
                // against: the fence answer reported a position, and acknowledging more would
                // let the old owner count a vote the failover did not see.
                if sender_epoch >= st.fenced {
                    let _ = reply.send(Frame::Ack {
                        slot: self.key.clone(),
                        lsn: pos.lsn,
                    });
                }
                let floor = st.floors.get(&entry.object()).copied();
                drop(st);
                cl.applier.apply(self.clone(), entry, log_lsn, floor);
            }
            Err(e) => {
                tracing::warn!(slot = %self.key, error = %e, "follower could not log an entry");
                cl.metrics_log_failure();
                st.generation += 1;
                st.appended = st.durable;
                let durable = st.durable;
                st.ring.reset(durable);
                let _ = reply.send(Frame::Status {
                    slot: self.key.clone(),
                    fenced: st.fenced,
                    position: st.durable,
                    state: FollowerState::Failing,
                });
            }
        }
    }

    /// The applier wrote an entry into the database files.
    pub fn note_applied(&self, lsn: Lsn) {
        let mut st = self.lock();
        if lsn > st.applied {
            st.applied = lsn;
        }
    }

    /// A probe from the owner: report where this node is.
    pub fn status_frame(&self) -> Frame {
        let st = self.lock();
        let state = if st.syncing {
            FollowerState::Syncing
        } else if st.closing {
            FollowerState::Busy
        } else {
            FollowerState::Ok
        };
        Frame::Status {
            slot: self.key.clone(),
            fenced: st.fenced,
            position: st.durable,
            state,
        }
    }

    // ----- control -----

    /// Promises to refuse entries of epochs below `epoch` (durably, before answering) and
    /// reports the last durable position. An owner fenced at a newer epoch steps down.
    pub fn fence(self: &Arc<Self>, cl: &Arc<Cluster>, epoch: u64) -> Result<SlotPos, ApiError> {
        self.fence_if(cl, epoch, |_| Ok(()))
    }

    /// [`Slot::fence`], once `allowed` accepts the slot's state, checked under the same lock.
    fn fence_if(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        epoch: u64,
        allowed: impl FnOnce(&SlotState) -> Result<(), ApiError>,
    ) -> Result<SlotPos, ApiError> {
        let (pos, failed, stepped_down) = {
            let mut st = self.lock();
            allowed(&st)?;
            if epoch > st.fenced {
                cl.journal
                    .record(&[super::journal::Line::fence(&self.key, epoch)])
                    .map_err(|e| {
                        ApiError::internal(format!("cannot record the fence durably: {e}"))
                    })?;
                st.fenced = epoch;
            }
            let (failed, stepped_down) = match st.role {
                Role::Owner { epoch: mine, .. } if mine < epoch => {
                    (step_down(&mut st, Role::None), true)
                }
                _ => (Vec::new(), false),
            };
            (st.durable, failed, stepped_down)
        };
        fail_all(failed, &self.key);
        if stepped_down {
            cl.close_local_objects(self.clone());
        }
        self.changed.notify_waiters();
        Ok(pos)
    }

    /// Applies the slot's replica set from a new placement map.
    pub fn set_replicas(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        replicas: Option<&SlotReplicas>,
        configured_quorum: usize,
    ) {
        let me = cl.me.as_str();
        let mut st = self.lock();
        st.configured_quorum = configured_quorum;
        let new_role = match replicas {
            Some(r) if r.owner == me && r.epoch >= st.fenced => match st.role {
                Role::Owner { epoch, phase } if epoch == r.epoch => Role::Owner { epoch, phase },
                _ => Role::Owner {
                    epoch: r.epoch,
                    phase: Phase::Recovering,
                },
            },
            Some(r) if r.has(me) && r.owner != me => Role::Follower { epoch: r.epoch },
            _ => Role::None,
        };
        let old = st.role;
        st.replicas = replicas.cloned();
        let mut failed = Vec::new();
        let mut close = false;
        let mut probes = Vec::new();
        match (old, new_role) {
            (Role::Owner { epoch: a, .. }, Role::Owner { epoch: b, .. }) if a == b => {}
            (_, Role::Owner { epoch, .. }) => {
                // Promotion: recover before serving.
                failed = step_down(&mut st, new_role);
                st.fenced = st.fenced.max(epoch);
                st.closing = false;
                tracing::info!(slot = %self.key, epoch, durable = %st.durable.lsn, applied = %st.applied, "became owner; recovering");
            }
            (Role::Owner { .. }, _) => {
                failed = step_down(&mut st, new_role);
                st.closing = true;
                close = true;
                tracing::info!(slot = %self.key, durable = %st.durable.lsn, "no longer owner");
            }
            _ => st.role = new_role,
        }
        // Keep the owner's view of its receivers in step with the map.
        if let (Role::Owner { epoch, .. }, Some(r)) = (st.role, replicas) {
            let receivers: Vec<(String, bool)> = r
                .receivers()
                .filter(|n| *n != me)
                .map(|n| (n.to_string(), r.followers.iter().any(|f| f == n)))
                .collect();
            st.progress
                .retain(|p| receivers.iter().any(|(n, _)| *n == p.node));
            for (node, votes) in receivers {
                match st.progress.iter_mut().find(|p| p.node == node) {
                    Some(p) => p.votes = votes,
                    None => {
                        st.progress.push(Progress {
                            node: node.clone(),
                            votes,
                            acked: Lsn::ZERO,
                            stream: Stream::Probing,
                            since: Instant::now(),
                            sync_asked: None,
                            resent: None,
                        });
                        probes.push(node);
                    }
                }
            }
            if !matches!(old, Role::Owner { .. }) {
                for p in st.progress.iter_mut() {
                    p.stream = Stream::Probing;
                    p.since = Instant::now();
                    if !probes.contains(&p.node) {
                        probes.push(p.node.clone());
                    }
                }
            }
            // Alone (standalone, or a one-node region): nothing to recover from.
            if st.progress.is_empty()
                && st.applied >= st.durable.lsn
                && let Role::Owner {
                    phase: Phase::Recovering,
                    ..
                } = st.role
            {
                st.role = Role::Owner {
                    epoch,
                    phase: Phase::Serving,
                };
            }
        }
        st.ring.trim(!cl.standalone);
        let epoch = match st.role {
            Role::Owner { epoch, .. } => epoch,
            _ => 0,
        };
        let promoted = matches!(st.role, Role::Owner { .. }) && !matches!(old, Role::Owner { .. });
        drop(st);
        if promoted {
            // The followed entries the applier still holds must be in the files before the
            // slot can serve (recovery waits for `applied`).
            cl.applier.write_out();
        }
        fail_all(failed, &self.key);
        if close {
            cl.close_local_objects(self.clone());
        }
        for node in probes {
            cl.links.send(
                &node,
                Frame::Probe {
                    slot: self.key.clone(),
                    epoch,
                },
            );
        }
        self.changed.notify_waiters();
    }

    /// Local owner objects of the slot are closed: the files belong to the follower path now.
    pub fn closed_local_objects(&self) {
        self.lock().closing = false;
        self.changed.notify_waiters();
    }

    /// Planned hand-off to `to`: wait, still serving, until `to` streams and is close behind;
    /// then stop taking writes, wait until everything is on a quorum and `to` holds it all, and
    /// fence this node at `epoch`. The control plane then publishes `to`.
    ///
    /// Writes stop only for the last stretch: a target that first needs a snapshot sync (a node
    /// that just came back, the usual target of a hand-back) would otherwise hold every write to
    /// the slot for as long as its sync takes, or the whole `timeout` before giving up.
    pub async fn handoff(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        to: &str,
        epoch: u64,
        timeout: Duration,
    ) -> Result<SlotPos, ApiError> {
        let deadline = Instant::now() + timeout;
        let _one_at_a_time = self.begin_handoff(to)?;
        self.wait_for_handoff(to, timeout, deadline, |st| {
            self.check_handoff(st, to, epoch)?;
            Ok(st.progress.iter().find(|p| p.node == to).is_some_and(|p| {
                close_enough_to_drain(p.stream, p.acked, st.appended.lsn, st.ring.base().lsn)
            }))
        })
        .await?;
        {
            let mut st = self.lock();
            self.check_handoff(&st, to, epoch)?;
            if let Role::Owner { epoch: mine, .. } = st.role {
                st.role = Role::Owner {
                    epoch: mine,
                    phase: Phase::Draining,
                };
            }
        }
        self.changed.notify_waiters();
        // Whatever ends this hand-off short of the fence — the timeout below, a fence that cannot
        // be journaled, or the caller giving up and dropping this future — the slot serves again.
        let _resume = ResumeUnlessFenced(self);
        self.wait_for_handoff(to, timeout, deadline, |st| Ok(drained_for(st, to)))
            .await?;
        self.fence_drained(cl, epoch, to)
    }

    /// The hand-off's fence at `epoch`, for `to`: checked again under the fence's own lock, only
    /// a slot still draining, with nothing taken since the wait saw it drained, may be fenced and
    /// handed over. Otherwise 409 `handoff_interrupted`, and this hand-off fenced nothing.
    pub(super) fn fence_drained(
        self: &Arc<Self>,
        cl: &Arc<Cluster>,
        epoch: u64,
        to: &str,
    ) -> Result<SlotPos, ApiError> {
        self.fence_if(cl, epoch, |st| match st.role {
            Role::Owner {
                phase: Phase::Draining,
                ..
            } if drained_for(st, to) => Ok(()),
            _ => Err(ApiError::new(
                409,
                "handoff_interrupted",
                format!(
                    "slot {} stopped draining before it could be handed to {to} (a new placement?); this hand-off did not fence it",
                    self.key
                ),
            )),
        })
    }

    /// Marks a hand-off to `to` as the slot's one hand-off in progress until the returned guard
    /// drops; 409 `handoff_in_progress` while another one runs.
    fn begin_handoff(&self, to: &str) -> Result<HandoffInProgress<'_>, ApiError> {
        let mut st = self.lock();
        if let Some(other) = &st.handing_off {
            return Err(ApiError::new(
                409,
                "handoff_in_progress",
                format!(
                    "slot {} is being handed off to {other} already; retry once that ends",
                    self.key
                ),
            ));
        }
        st.handing_off = Some(to.to_string());
        Ok(HandoffInProgress(self))
    }

    /// A draining owner whose hand-off did not fence it goes back to serving: nothing changed
    /// hands. (After a fence the node is no longer owner, and this does nothing.)
    fn resume_serving(&self) {
        let mut st = self.lock();
        if let Role::Owner {
            epoch: mine,
            phase: Phase::Draining,
        } = st.role
        {
            st.role = Role::Owner {
                epoch: mine,
                phase: Phase::Serving,
            };
            drop(st);
            self.changed.notify_waiters();
        }
    }

    /// Checks `ready` on the slot's state every 10 ms until it holds (or fails); past `deadline`,
    /// 503 `handoff_timeout`. Either way the slot keeps serving afterwards: a drained slot is
    /// resumed by the hand-off's guard.
    async fn wait_for_handoff(
        &self,
        to: &str,
        timeout: Duration,
        deadline: Instant,
        ready: impl Fn(&SlotState) -> Result<bool, ApiError>,
    ) -> Result<(), ApiError> {
        loop {
            {
                let st = self.lock();
                if ready(&st)? {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(ApiError::unavailable(
                        "handoff_timeout",
                        format!(
                            "{to} did not catch up with slot {} within {timeout:?} ({}); the slot keeps its owner, which serves on",
                            self.key,
                            handoff_target_state(&st, to)
                        ),
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether this node may hand the slot off to `to` at `epoch`: it owns the slot below that
    /// epoch (not failed), and `to` is a voting follower.
    fn check_handoff(&self, st: &SlotState, to: &str, epoch: u64) -> Result<(), ApiError> {
        match st.role {
            Role::Owner { epoch: mine, phase } if mine < epoch && phase != Phase::Failed => {
                if st.progress.iter().any(|p| p.node == to && p.votes) {
                    Ok(())
                } else {
                    Err(ApiError::new(
                        409,
                        "not_a_follower",
                        format!("{to} is not a voting member of slot {}", self.key),
                    ))
                }
            }
            _ => Err(ApiError::new(
                409,
                "not_owner",
                format!(
                    "this node does not own slot {} below epoch {epoch}",
                    self.key
                ),
            )),
        }
    }

    /// Entries kept to resend.
    #[cfg(test)]
    pub fn ring_len(&self) -> usize {
        self.lock().ring.len()
    }

    pub fn report(&self) -> SlotReport {
        let st = self.lock();
        let (role, phase, epoch) = match st.role {
            Role::None => ("none", None, 0),
            Role::Follower { epoch } => ("follower", None, epoch),
            Role::Owner { epoch, phase } => ("owner", Some(phase), epoch),
        };
        SlotReport {
            colo: self.key.colo.to_string(),
            slot: self.key.slot,
            role,
            phase,
            epoch,
            fenced: st.fenced,
            durable: st.durable.lsn,
            appended: st.appended.lsn,
            applied: st.applied,
            pending: st.pending.len(),
            followers: st
                .progress
                .iter()
                .map(|p| FollowerReport {
                    node: p.node.clone(),
                    votes: p.votes,
                    acked: p.acked,
                    stream: p.stream,
                })
                .collect(),
            handing_off: st.handing_off.clone(),
        }
    }

    /// Follower: a snapshot sync finished at `position`; entries continue from there.
    pub fn reset_position(&self, position: SlotPos, floors: HashMap<ObjectKey, Lsn>) {
        let mut st = self.lock();
        st.appended = position;
        st.durable = position;
        st.applied = position.lsn;
        st.ring.reset(position);
        st.floors = floors;
        st.generation += 1;
    }

    pub fn set_syncing(&self, syncing: bool) {
        self.lock().syncing = syncing;
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }
}

/// Fills the ring of a slot just created from the entries its local log holds, so that after a
/// restart the node resends to a follower a little behind instead of sending it a snapshot of the
/// whole slot. Only entries provably its history: the newest must be at the slot's position, and
/// each earlier one is kept while the next one's chain hash follows from it. The oldest of those
/// is the ring's base (its predecessor is unknown, so it cannot itself be resent).
fn seed_ring(st: &mut SlotState, recent: VecDeque<Entry>) {
    let entries = Vec::from(recent);
    let Some(last) = entries.last() else { return };
    if last.position() != st.appended {
        return;
    }
    let mut first = entries.len() - 1;
    while first > 0 && entries[first].follows(entries[first - 1].position()) {
        first -= 1;
    }
    st.ring.set_base(entries[first].position());
    for entry in &entries[first + 1..] {
        st.ring.push(
            append_frame(entry, entry.lsn().epoch),
            entry.position(),
            true,
        );
    }
}

/// Whether a recovering owner has a write quorum of voters at its position.
fn recovered(st: &SlotState) -> bool {
    let voters = st.replicas.as_ref().map_or(1, SlotReplicas::len);
    let needed = effective_write_quorum(st.configured_quorum, voters);
    let holders = 1 + st
        .progress
        .iter()
        .filter(|p| p.votes && p.acked >= st.durable.lsn && p.stream == Stream::Streaming)
        .count();
    holders >= needed && st.appended == st.durable && st.applied >= st.durable.lsn
}

/// Where a hand-off's target stands, as the owner sees it: for the error of a hand-off that timed
/// out, so that whoever retries it can tell a target still syncing from one that stopped
/// answering.
fn handoff_target_state(st: &SlotState, to: &str) -> String {
    let owner = format!(
        "owner appended {}, {} waiting for a quorum",
        st.appended.lsn,
        st.pending.len()
    );
    match st.progress.iter().find(|p| p.node == to) {
        Some(p) => {
            let stream = match p.stream {
                Stream::Streaming => "streaming",
                Stream::Probing => "being probed",
                Stream::Syncing => "syncing a snapshot",
            };
            format!(
                "{to} is {stream}, acknowledged {} ({} entries behind); {owner}",
                p.acked,
                st.appended.lsn.seq.saturating_sub(p.acked.seq)
            )
        }
        None => format!("{to} is no longer a member; {owner}"),
    }
}

/// A draining owner may fence itself for `to`: nothing waits for a quorum, and `to` holds every
/// entry.
fn drained_for(st: &SlotState, to: &str) -> bool {
    let caught_up = st
        .progress
        .iter()
        .any(|p| p.node == to && p.acked >= st.appended.lsn);
    st.pending.is_empty() && caught_up
}

/// A hand-off may stop the slot's writes once its target is this close: streaming (not probing
/// or installing a snapshot), at most [`RING_ENTRIES`] entries behind (the most the owner keeps
/// to resend), and not behind the oldest entry the owner's ring still holds (`ring_base`; the
/// node's ring budget may have trimmed it). What remains then takes moments, not a sync's
/// seconds.
fn close_enough_to_drain(stream: Stream, acked: Lsn, appended: Lsn, ring_base: Lsn) -> bool {
    stream == Stream::Streaming
        && acked.seq.saturating_add(RING_ENTRIES as u64) >= appended.seq
        && acked.seq >= ring_base.seq
}

/// Pops every pending entry (in order) that a quorum holds, while the lease is valid.
fn take_released(st: &mut SlotState, cl: &Cluster) -> Vec<(Done, Result<u64, ApiError>)> {
    let mut out = Vec::new();
    if !cl.lease.valid() {
        return out;
    }
    // The owner's own copy is always one of the votes: its objects' checkpoints rely on it.
    while let Some(front) = st.pending.front() {
        let Some(log_lsn) = front.log_lsn else { break };
        let votes = 1 + st
            .progress
            .iter()
            .filter(|p| p.votes && p.acked >= front.pos.lsn)
            .count();
        if votes < front.needed {
            break;
        }
        if let Some(mut p) = st.pending.pop_front()
            && let Some(done) = p.done.take()
        {
            out.push((done, Ok(log_lsn)));
        }
    }
    out
}

/// Leaves the owner role: the waiting entries' outcome is unknown to this node now. Unless it
/// becomes owner again at once, its open copies must close before followed entries may be
/// written into the same files (callers then call `Cluster::close_local_objects`).
fn step_down(st: &mut SlotState, role: Role) -> Vec<Done> {
    if !matches!(role, Role::Owner { .. }) {
        st.closing = true;
    }
    st.role = role;
    st.progress.clear();
    st.pending
        .drain(..)
        .filter_map(|mut p| p.done.take())
        .collect()
}

fn fail_all(failed: Vec<Done>, key: &SlotKey) {
    for d in failed {
        d(Err(ApiError::unavailable(
            "indeterminate",
            format!(
                "ownership of slot {key} moved before this write reached a quorum; it may or may not have been applied"
            ),
        )));
    }
}

/// Drop guard of a hand-off: see [`Slot::resume_serving`].
struct ResumeUnlessFenced<'a>(&'a Slot);

impl Drop for ResumeUnlessFenced<'_> {
    fn drop(&mut self) {
        self.0.resume_serving();
    }
}

/// Drop guard of a hand-off: see [`Slot::begin_handoff`].
struct HandoffInProgress<'a>(&'a Slot);

impl Drop for HandoffInProgress<'_> {
    fn drop(&mut self) {
        self.0.lock().handing_off = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;

    fn follower(node: &str, votes: bool, acked: u64, stream: Stream) -> Progress {
        Progress {
            node: node.into(),
            votes,
            acked: Lsn::new(1, acked),
            stream,
            since: Instant::now(),
            sync_asked: None,
            resent: None,
        }
    }

    /// An owner counts on the `needed - 1` voters furthest along (placement order among
    /// equals); the rest of its streaming followers, learners included, log the entry lazily,
    /// and followers not streaming get nothing.
    #[test]
    fn an_owner_counts_on_the_voters_furthest_along() {
        use Stream::*;
        let progress = vec![
            follower("a", true, 10, Streaming),
            follower("b", true, 12, Streaming),
            follower("c", true, 12, Streaming),
            follower("d", false, 20, Streaming),
            follower("e", true, 30, Probing),
        ];
        assert_eq!(
            counted_on(&progress, 3),
            vec![("a", false), ("b", true), ("c", true), ("d", false)]
        );
        assert_eq!(
            counted_on(&progress, 2),
            vec![("a", false), ("b", true), ("c", false), ("d", false)],
            "equals: the first in placement order"
        );
        assert_eq!(
            counted_on(&progress, 5),
            vec![("a", true), ("b", true), ("c", true), ("d", false)],
            "more needed than voters streaming: every voter, and still not the learner"
        );
        assert_eq!(
            counted_on(&progress, 1),
            vec![("a", false), ("b", false), ("c", false), ("d", false)],
            "an owner that is its own quorum counts on nobody"
        );
        assert!(counted_on(&[], 3).is_empty());
    }

    /// `n` delete entries of one slot, each placed after the one before.
    fn chain(n: u64, from: SlotPos) -> Vec<Entry> {
        let object = ObjectKey::new(Arc::from("ns"), ObjectId::from_bytes([3; 32]));
        let slot = SlotKey::new("c", 0);
        let mut prev = from;
        (0..n)
            .map(|i| {
                let mut e = Entry::delete(&object, &slot);
                prev = e.place_after(prev, Lsn::new(1, from.lsn.seq + i + 1));
                e
            })
            .collect()
    }

    fn ring_of(position: SlotPos, recent: Vec<Entry>) -> (Vec<SlotPos>, SlotPos) {
        let slot = Slot::new(
            SlotKey::new("c", 0),
            0,
            position,
            HashMap::new(),
            recent.into(),
            RingBudget::new(super::super::ring::NODE_RING_BYTES),
        );
        let st = slot.lock();
        (st.ring.positions().collect(), st.ring.base())
    }

    #[test]
    fn a_slot_resends_from_the_recovered_entries_that_chain_to_its_position() {
        let entries = chain(5, SlotPos::START);
        let positions: Vec<SlotPos> = entries.iter().map(Entry::position).collect();
        // All chain to the position: every one but the oldest (the base) can be resent.
        assert_eq!(
            ring_of(positions[4], entries.clone()),
            (positions[1..].to_vec(), positions[0])
        );
        // The log's newest entry is not the slot's position (a sync moved it): nothing.
        assert_eq!(
            ring_of(positions[3], entries.clone()),
            (vec![], positions[3])
        );
        // Another history's entries before a break in the chain are left out.
        let mut mixed = chain(3, SlotPos::START);
        let tail = chain(3, positions[1]);
        let tail_positions: Vec<SlotPos> = tail.iter().map(Entry::position).collect();
        mixed.extend(tail);
        assert_eq!(
            ring_of(tail_positions[2], mixed),
            (tail_positions[1..].to_vec(), tail_positions[0])
        );
        // A later position whose chain hash does not follow from the entry before it.
        let mut forged = chain(3, SlotPos::START);
        let elsewhere = SlotPos {
            lsn: Lsn::new(1, 3),
            chain: 0x5eed,
        };
        let tail = chain(2, elsewhere);
        let tail_positions: Vec<SlotPos> = tail.iter().map(Entry::position).collect();
        forged.extend(tail);
        assert_eq!(
            ring_of(tail_positions[1], forged),
            (vec![tail_positions[1]], tail_positions[0])
        );
        assert_eq!(ring_of(SlotPos::START, vec![]), (vec![], SlotPos::START));
    }

    #[test]
    fn a_hand_off_drains_only_for_a_streaming_target_within_the_resend_window() {
        let appended = Lsn::new(3, 10_000);
        let behind = |n: u64| Lsn::new(3, 10_000 - n);
        let window = RING_ENTRIES as u64;
        for stream in [Stream::Probing, Stream::Syncing] {
            assert!(
                !close_enough_to_drain(stream, appended, appended, Lsn::ZERO),
                "{stream:?}"
            );
        }
        assert!(close_enough_to_drain(
            Stream::Streaming,
            appended,
            appended,
            Lsn::ZERO
        ));
        assert!(close_enough_to_drain(
            Stream::Streaming,
            behind(window),
            appended,
            Lsn::ZERO
        ));
        assert!(!close_enough_to_drain(
            Stream::Streaming,
            behind(window + 1),
            appended,
            Lsn::ZERO
        ));
        // Positions count on across epochs: an ack from the previous epoch compares by sequence.
        assert!(close_enough_to_drain(
            Stream::Streaming,
            Lsn::new(2, 9_990),
            appended,
            Lsn::ZERO
        ));
        assert!(!close_enough_to_drain(
            Stream::Streaming,
            Lsn::default(),
            appended,
            Lsn::ZERO
        ));
        // A target within the window but behind what the owner's trimmed ring holds.
        assert!(!close_enough_to_drain(
            Stream::Streaming,
            behind(10),
            appended,
            behind(5)
        ));
        assert!(close_enough_to_drain(
            Stream::Streaming,
            behind(5),
            appended,
            behind(5)
        ));
    }
}
