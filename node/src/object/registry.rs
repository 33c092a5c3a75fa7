//! The objects of a node: finds or creates an object's actor, schedules it on a blocking thread
//! when it has work, and closes idle or least-recently-used objects to stay within limits.
//!
//! An actor runs on tokio's blocking pool only while its mailbox has work, so an object costs a
//! small struct while idle, different objects run in parallel on all cores, and a runaway
//! statement in one object (stopped by its time limit) never holds up others.

use super::actor::{Actor, Job};
use super::gate::Gate;
use super::{Reply, Request};
use crate::cluster::{Cluster, SlotHost};
use crate::config::StorageConfig;
use crate::error::ApiError;
use crate::id::ObjectId;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::storage::layout::db_path;
use crate::storage::log::NodeLog;
use crate::storage::record::ObjectKey;
use crate::storage::record::SlotKey;
use futures::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What every actor shares.
pub struct ObjectEnv {
    pub cluster: Arc<Cluster>,
    pub log: NodeLog,
    pub log_dir: PathBuf,
    pub objects_dir: PathBuf,
    pub storage: StorageConfig,
    pub metrics: Arc<Metrics>,
    /// Directories with new or removed object files (the applier's too), synced before the next
    /// checkpoint marker.
    pub new_dirs: Arc<crate::storage::dirs::PendingDirs>,
    /// Objects whose database file failed to sync (the applier's too): rebuilt from the log
    /// before they serve again, and no checkpoint marker for them until then.
    pub sync_failures: Arc<crate::storage::sync_failures::SyncFailures>,
    /// Logs a checkpoint's marker once its file and the pending directories are durable.
    pub markers: Arc<crate::cluster::checkpointer::Checkpointer>,
    resident: AtomicUsize,
    /// Opens waiting for room (see [`ObjectEnv::wait_for_room`]) wait on this; each close
    /// wakes one.
    room: Mutex<()>,
    room_freed: Condvar,
    /// Wakes the housekeeping pass early: an open found the node at its cap.
    housekeeping_wanted: tokio::sync::Notify,
    /// Client requests between their arrival at `Objects::call` and their answer.
    in_flight: AtomicUsize,
    runtime: tokio::runtime::Handle,
}

/// Past `max_open_objects` an open waits for others to close, but only once this many more are
/// open: housekeeping brings the count back under the limit every pass, and a new object
/// should not wait for that in the ordinary course. A burst of new objects faster than the pass
/// closes old ones (a pass that closed 3,500 idle objects at once took 860 ms while 2,000 new
/// objects a second arrived) would otherwise open databases until the process ran out of file
/// descriptors.
pub fn open_cap(max_open_objects: usize) -> usize {
    max_open_objects + max_open_objects / 8 + 1
}

/// An open waits at most this long for room; then it opens anyway (the cap protects file
/// descriptors, which are usually far from exhausted at the cap).
const ROOM_WAIT: Duration = Duration::from_secs(2);

/// Descriptors one open object holds: SQLite's on its database and its `-wal`, and the node's
/// own on each (to fsync the database after checkpoints, to read the `-wal`'s new frames).
pub const DESCRIPTORS_PER_OPEN_OBJECT: usize = 4;

impl ObjectEnv {
    pub fn new(
        cluster: Arc<Cluster>,
        log: NodeLog,
        log_dir: PathBuf,
        objects_dir: PathBuf,
        storage: StorageConfig,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        ObjectEnv {
            new_dirs: cluster.applier.new_dirs().clone(),
            sync_failures: cluster.applier.sync_failures().clone(),
            markers: cluster.applier.object_markers().clone(),
            cluster,
            log,
            log_dir,
            objects_dir,
            storage,
            metrics,
            resident: AtomicUsize::new(0),
            room: Mutex::new(()),
            room_freed: Condvar::new(),
            housekeeping_wanted: tokio::sync::Notify::new(),
            in_flight: AtomicUsize::new(0),
            runtime,
        }
    }

    /// `objects/<namespace>/<shard>/<id>.db` ([`crate::storage::layout`])
    pub fn db_path(&self, key: &ObjectKey) -> PathBuf {
        db_path(&self.objects_dir, key)
    }

    pub(super) fn note_opened(&self, handle: &ObjectHandle) {
        handle.open.store(true, Ordering::Relaxed);
        self.resident.fetch_add(1, Ordering::Relaxed);
        self.metrics.objects.resident.inc();
    }

    pub(super) fn note_closed(&self, handle: &ObjectHandle) {
        handle.open.store(false, Ordering::Relaxed);
        self.resident.fetch_sub(1, Ordering::Relaxed);
        self.metrics.objects.resident.dec();
        // Under the lock: a waiter that saw no room is either not yet checking (and will see
        // the new count) or already waiting (and is woken).
        let _room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        self.room_freed.notify_one();
    }

    /// Whether the open objects, with the descriptors closed objects' files hold until their
    /// checkpoint's sync, fill `cap` objects' worth of descriptors.
    fn at_cap(&self, cap: usize) -> bool {
        self.resident() * DESCRIPTORS_PER_OPEN_OBJECT + self.markers.descriptors_held()
            >= cap * DESCRIPTORS_PER_OPEN_OBJECT
    }

    /// Called on a blocking thread before a database opens: while the node holds
    /// [`open_cap`] databases, asks housekeeping to close idle ones now and waits (at most
    /// [`ROOM_WAIT`]) until one has closed.
    pub(super) fn wait_for_room(&self) {
        let cap = open_cap(self.storage.max_open_objects);
        if !self.at_cap(cap) {
            return;
        }
        self.metrics.objects.open_waits.inc();
        self.housekeeping_wanted.notify_one();
        let deadline = Instant::now() + ROOM_WAIT;
        let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        while self.at_cap(cap) {
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(
                    resident = self.resident(),
                    cap,
                    "no object closed in time; opening past the cap"
                );
                return;
            }
            // Closes wake a waiter; files leaving the checkpointer's queue do not, so look
            // again every few milliseconds.
            let slice = (deadline - now).min(Duration::from_millis(5));
            room = match self.room_freed.wait_timeout(room, slice) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
    }

    pub fn resident(&self) -> usize {
        self.resident.load(Ordering::Relaxed)
    }

    /// Client requests being served by this node's objects right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a client request in `ObjectEnv::in_flight` while alive (its future may be dropped).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct HandleState {
    mailbox: VecDeque<Job>,
    running: bool,
    /// Taken out of the map: enqueuers must look the object up again.
    removed: bool,
    /// The actor, while no thread runs it.
    actor: Option<Actor>,
}

pub struct ObjectHandle {
    pub key: ObjectKey,
    pub ns: Arc<Namespace>,
    pub gate: Arc<Gate>,
    state: Mutex<HandleState>,
    last_used_ms: AtomicU64,
    open: AtomicBool,
}

impl ObjectHandle {
    fn state(&self) -> MutexGuard<'_, HandleState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether jobs wait in the mailbox (the running thread has more to do).
    pub(super) fn has_queued_jobs(&self) -> bool {
        !self.state().mailbox.is_empty()
    }
}

/// Requests larger than this always run on a blocking thread: their statements and commits may
/// take long enough to hold up the async thread's other connections.
const INLINE_MAX_BYTES: usize = 16 << 10;

/// All objects of the node.
pub struct Objects {
    map: Mutex<HashMap<ObjectKey, Arc<ObjectHandle>>>,
    env: Arc<ObjectEnv>,
}

impl Objects {
    pub fn new(env: Arc<ObjectEnv>) -> Arc<Self> {
        Arc::new(Objects {
            map: Mutex::new(HashMap::new()),
            env,
        })
    }

    pub fn env(&self) -> &Arc<ObjectEnv> {
        &self.env
    }

    fn map(&self) -> MutexGuard<'_, HashMap<ObjectKey, Arc<ObjectHandle>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, ns: &Arc<Namespace>, key: &ObjectKey) -> Arc<ObjectHandle> {
        let mut map = self.map();
        if let Some(h) = map.get(key) {
            return h.clone();
        }
        let h = Arc::new(ObjectHandle {
            key: key.clone(),
            ns: ns.clone(),
            gate: Arc::new(Gate::default()),
            state: Mutex::new(HandleState {
                mailbox: VecDeque::new(),
                running: false,
                removed: false,
                actor: Some(Actor::default()),
            }),
            last_used_ms: AtomicU64::new(now_ms()),
            open: AtomicBool::new(false),
        });
        map.insert(key.clone(), h.clone());
        h
    }

    /// Queues `job` on the object's mailbox and makes sure a thread runs it.
    fn enqueue(&self, ns: &Arc<Namespace>, id: ObjectId, job: Job) {
        let key = ObjectKey::new(ns.name.clone(), id);
        loop {
            let handle = self.handle(ns, &key);
            let mut st = handle.state();
            if st.removed {
                continue;
            }
            st.mailbox.push_back(job);
            handle.last_used_ms.store(now_ms(), Ordering::Relaxed);
            if !st.running {
                st.running = true;
                drop(st);
                self.env.metrics.objects.active.inc();
                let env = self.env.clone();
                self.env.runtime.spawn_blocking(move || run(handle, env));
            }
            return;
        }
    }

    /// Queues `job` like [`Objects::enqueue`], but runs the object on this (blocking) thread
    /// when no thread runs it yet. Housekeeping closes many objects in one pass (all that went
    /// idle together, or an eighth of them past the memory limit): a blocking thread each grew the
    /// runtime's pool to its 512 threads; here they close one after another.
    fn run_here(&self, handle: &Arc<ObjectHandle>, job: Job) {
        let mut st = handle.state();
        if st.removed {
            return; // no longer tracked: nothing open to close
        }
        st.mailbox.push_back(job);
        if st.running {
            return; // its thread takes the job
        }
        st.running = true;
        drop(st);
        self.env.metrics.objects.active.inc();
        run(handle.clone(), self.env.clone());
    }

    /// Runs `job` on this (async) thread when its object is idle — nothing queued, no thread
    /// running it, database open — and it finishes within the inline budget; otherwise queues it
    /// for a blocking thread, or gives it back when the object was not idle. Saves two thread
    /// hand-offs per request (to a blocking thread and back), which on these machines cost more
    /// than a short statement. Only on a multi-threaded runtime, whose other workers keep serving
    /// while this one runs SQLite.
    fn run_inline(&self, ns: &Arc<Namespace>, id: ObjectId, job: Job) -> Option<Job> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !multi_thread {
            return Some(job);
        }
        let key = ObjectKey::new(ns.name.clone(), id);
        let handle = self.handle(ns, &key);
        let mut actor = {
            let mut st = handle.state();
            if st.removed || st.running || !st.mailbox.is_empty() {
                return Some(job);
            }
            let Some(actor) = st.actor.take() else {
                return Some(job);
            };
            st.running = true;
            actor
        };
        handle.last_used_ms.store(now_ms(), Ordering::Relaxed);
        self.env.metrics.objects.active.inc();
        let left = actor.process_inline(job, &handle, &self.env);
        let mut st = handle.state();
        if let Some(job) = left {
            // Arrived first: ahead of anything queued meanwhile.
            st.mailbox.push_front(job);
        }
        if actor.wants_checkpoint(&self.env) {
            st.mailbox.push_back(Job::Checkpoint);
        }
        st.actor = Some(actor);
        if st.mailbox.is_empty() {
            st.running = false;
            drop(st);
            self.env.metrics.objects.active.dec();
        } else {
            drop(st);
            let env = self.env.clone();
            self.env.runtime.spawn_blocking(move || run(handle, env));
        }
        None
    }

    /// Sends a request to an object and waits for its (durable) answer. Requests of up to
    /// `INLINE_MAX_BYTES` may run on the calling thread (see `run_inline`).
    pub async fn call(
        &self,
        ns: &Arc<Namespace>,
        id: ObjectId,
        request: Request,
        request_bytes: usize,
    ) -> Reply {
        let _in_flight = InFlight::enter(&self.env.in_flight);
        let (tx, rx) = oneshot::channel();
        let job = Job::Client { request, reply: tx };
        let job = if request_bytes <= INLINE_MAX_BYTES {
            self.run_inline(ns, id, job)
        } else {
            Some(job)
        };
        if let Some(job) = job {
            self.enqueue(ns, id, job);
        }
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("the object stopped before answering")))
    }

    /// Closes idle objects, keeps the number of open objects and SQLite's memory within limits,
    /// drops the bookkeeping of closed objects, and checkpoints objects that hold the oldest log
    /// segment back. Run periodically.
    pub fn housekeep(&self, namespaces: &HashMap<String, Arc<Namespace>>) {
        let now = now_ms();
        let idle_ms = self.env.storage.idle_timeout.0.as_millis() as u64;
        let handles: Vec<Arc<ObjectHandle>> = self.map().values().cloned().collect();
        let mut open_idle: Vec<(u64, Arc<ObjectHandle>)> = Vec::new();
        let mut closed: Vec<Arc<ObjectHandle>> = Vec::new();
        for h in handles {
            let busy = {
                let st = h.state();
                st.running || !st.mailbox.is_empty()
            };
            if busy {
                continue;
            }
            let last = h.last_used_ms.load(Ordering::Relaxed);
            if !h.open.load(Ordering::Relaxed) {
                closed.push(h);
            } else if now.saturating_sub(last) >= idle_ms {
                self.run_here(&h, Job::Close(None));
            } else {
                open_idle.push((last, h));
            }
        }
        // Least recently used first, until within the open-object and memory limits.
        let max_open = self.env.storage.max_open_objects;
        let memory_limit = self.env.storage.memory_limit.0 as i64;
        self.env
            .metrics
            .objects
            .sqlite_memory
            .set(super::sqlite_memory::bytes_in_use());
        let mut excess = self.env.resident().saturating_sub(max_open);
        if super::sqlite_memory::bytes_in_use() > memory_limit {
            excess = excess.max(self.env.resident() / 8 + 1);
        }
        if excess > 0 {
            open_idle.sort_by_key(|(last, _)| *last);
            for (_, h) in open_idle.into_iter().take(excess) {
                self.run_here(&h, Job::Close(None));
            }
        }
        if !closed.is_empty() {
            let mut map = self.map();
            for h in closed {
                let mut st = h.state();
                if !st.running
                    && st.mailbox.is_empty()
                    && !h.open.load(Ordering::Relaxed)
                    && !h.gate.pending()
                {
                    st.removed = true;
                    map.remove(&h.key);
                }
            }
        }
        for key in self.env.log.shared().blockers() {
            if let Some(ns) = namespaces.get(&*key.namespace) {
                self.enqueue(ns, key.id, Job::Checkpoint);
            }
        }
    }

    /// Runs [`Objects::housekeep`] every `period` until the process ends.
    pub fn spawn_housekeeping(
        self: &Arc<Self>,
        namespaces: HashMap<String, Arc<Namespace>>,
        period: Duration,
    ) {
        let objects = Arc::downgrade(self);
        let env = self.env.clone();
        self.env.runtime.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = env.housekeeping_wanted.notified() => {}
                }
                let Some(objects) = objects.upgrade() else {
                    return;
                };
                let ns = namespaces.clone();
                // The scan locks mutexes and may touch many handles: keep it off the async workers.
                let _ = tokio::task::spawn_blocking(move || objects.housekeep(&ns)).await;
            }
        });
    }

    /// Number of objects with bookkeeping in memory.
    pub fn tracked(&self) -> usize {
        self.map().len()
    }
}

impl SlotHost for Objects {
    fn close_slot(&self, slot: SlotKey) -> BoxFuture<'static, ()> {
        let open: Vec<Arc<ObjectHandle>> = self
            .map()
            .values()
            .filter(|h| h.open.load(Ordering::Relaxed) || h.state().running)
            .filter(|h| {
                self.env
                    .cluster
                    .slot_key_of(&h.key.id)
                    .is_ok_and(|k| k == slot)
            })
            .cloned()
            .collect();
        let mut waits = Vec::with_capacity(open.len());
        for h in open {
            let (tx, rx) = oneshot::channel();
            self.enqueue(&h.ns, h.key.id, Job::Close(Some(tx)));
            waits.push(rx);
        }
        Box::pin(async move {
            for w in waits {
                let _ = w.await;
            }
        })
    }

    fn snapshot(&self, object: ObjectKey) -> BoxFuture<'static, Result<(Vec<u8>, Lsn), ApiError>> {
        let Some(ns) = self.env.cluster.namespaces.get(&*object.namespace).cloned() else {
            return Box::pin(async {
                Err(ApiError::not_found(
                    "unknown_namespace",
                    "namespace not served here",
                ))
            });
        };
        let (tx, rx) = oneshot::channel();
        self.enqueue(&ns, object.id, Job::Snapshot(tx));
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(ApiError::internal("the object stopped before answering")))
        })
    }
}

/// An actor's thread: drains the mailbox, then parks the actor back in its handle.
fn run(handle: Arc<ObjectHandle>, env: Arc<ObjectEnv>) {
    let mut actor = handle.state().actor.take().unwrap_or_default();
    loop {
        let job = {
            let mut st = handle.state();
            match st.mailbox.pop_front() {
                Some(job) => job,
                None => {
                    st.running = false;
                    st.actor = Some(actor);
                    break;
                }
            }
        };
        actor.process(job, &handle, &env);
    }
    env.metrics.objects.active.dec();
}
