//! The node log: one append-only, group-committed log for the commits of every object on the node.
//!
//! Object databases run with `synchronous=OFF`; this log is their durability point. Records queue
//! up while an fsync runs; the next committer takes all of them, writes them with one `pwrite` and
//! makes them durable with one `fdatasync` — so the cost of an fsync is shared by all commits
//! waiting for it, whichever objects they belong to. While records arrive fast, the writer
//! thread waits briefly for more before committing only one or two, unless its last wait came
//! up short: few producers ([`Gathering`]).
//!
//! The committer is usually the writer thread. The thread of a lone request (nothing else in
//! flight on the node) may commit its own record instead when no commit is under way
//! ([`NodeLog::defer_wakeups`], [`Deferred::lead`]): a sequential client then waits for one fsync
//! and no thread hand-off, which on a virtual machine costs tens of microseconds per wake-up of
//! an idle CPU. Only a thread whose own records are all that is queued leads, and only while
//! at least three quarters of recent commits found no records waiting when they ended: records
//! of other threads waiting mean the node is busy, and a leader would hold an async worker
//! through the fsync while they and other requests wait for it. Either way one committer runs
//! at a time, in queue order.
//!
//! A segment is retired (recycled as a spare) once every object with a record in it has
//! checkpointed past that record; the writer publishes which objects hold the oldest segment back
//! so the node can checkpoint them.

use super::block_buf::{BLOCK, BlockBuf, block_floor};
use super::record::{ObjectKey, RecordKind, SlotKey, decode_checkpoint};
use super::segments::{self, encode_record_into, record_size};
use crate::metrics::LogMetrics;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Called on the writer thread once a record is durable (with its LSN) or has failed.
pub type Completion = Box<dyn FnOnce(Result<u64, LogError>) + Send>;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("the disk is full: {0}")]
    DiskFull(String),
    #[error("the node log could not be written: {0}")]
    Io(String),
    #[error("an earlier write of this object was not made durable; the object must reset first")]
    Fenced,
    #[error("the node log is shutting down")]
    Closed,
}

impl LogError {
    fn from_io(e: &io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC) {
            LogError::DiskFull(e.to_string())
        } else {
            LogError::Io(e.to_string())
        }
    }
}

/// A record to append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub slot: SlotKey,
    pub generation: u64,
}

pub struct Append {
    pub kind: RecordKind,
    pub object: ObjectKey,
    /// Entries of a slot's log carry their slot and its generation: once an entry of generation
    /// `g` failed, later entries of generations `<= g` are refused, so a slot's local log never
    /// has a hole (an entry missing while later ones are durable). Checkpoint markers carry none.
    pub fence: Option<Fence>,
    pub payload: bytes::Bytes,
    pub done: Completion,
    /// The record may wait up to [`LAZY_COMMIT_DELAY`] for a commit that something else starts
    /// (see [`NodeLog::urge`]).
    pub lazy: bool,
}

enum Msg {
    Append(Append),
    /// Completes when everything submitted before it is durable.
    Barrier(Completion),
    /// Records a failure of a slot's generation (when an entry could not even be submitted).
    Fence(Fence),
}

/// State shared between the writer thread and the rest of the node.
pub struct LogShared {
    durable_lsn: AtomicU64,
    /// False after a failed write (disk full) until the next successful one.
    healthy: std::sync::atomic::AtomicBool,
    /// Segments ending at or below this LSN may be retired; others are kept (the slot positions
    /// their records establish have not been saved elsewhere yet).
    retire_limit: AtomicU64,
    /// Objects holding back the oldest segment (not yet checkpointed past their records in it).
    blockers: Mutex<Vec<ObjectKey>>,
    live_segments: AtomicU64,
    /// Recent fsync duration (moving average, microseconds): threads only lead a commit
    /// themselves while fsyncs are quick.
    fsync_micros: AtomicU64,
    /// The average fsync above which threads stop leading ([`LEAD_MAX_FSYNC_MICROS`]; tests
    /// that need leaders on any disk raise it).
    lead_max_fsync_micros: AtomicU64,
}

impl Default for LogShared {
    fn default() -> Self {
        LogShared {
            durable_lsn: AtomicU64::new(0),
            healthy: std::sync::atomic::AtomicBool::new(true),
            retire_limit: AtomicU64::new(0),
            blockers: Mutex::new(Vec::new()),
            live_segments: AtomicU64::new(0),
            fsync_micros: AtomicU64::new(0),
            lead_max_fsync_micros: AtomicU64::new(LEAD_MAX_FSYNC_MICROS),
        }
    }
}

impl LogShared {
    /// Allows retiring segments that end at or below `lsn`.
    pub fn set_retire_limit(&self, lsn: u64) {
        self.retire_limit.fetch_max(lsn, Ordering::AcqRel);
    }

    /// False while the log cannot be written (e.g. disk full).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn.load(Ordering::Acquire)
    }
    pub fn live_segments(&self) -> u64 {
        self.live_segments.load(Ordering::Relaxed)
    }
    /// Objects to checkpoint so the oldest segment can be retired.
    pub fn blockers(&self) -> Vec<ObjectKey> {
        self.blockers.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

/// Records waiting for a committer.
struct Queue {
    msgs: Vec<Msg>,
    /// A committer (the writer thread or a leading appender) is at work; it looks at the queue
    /// again when it is done, so appends meanwhile need not wake anybody.
    busy: bool,
    /// The writer thread waits for work.
    writer_waiting: bool,
    /// The writer thread gathers records for a commit ([`Gathering`]): wake it only once
    /// [`GATHER_RECORDS`] records or [`GATHER_BYTES`] payload bytes are queued.
    gathering: bool,
    /// How long the writer thread gathers at most, after how long a pause the log counts as
    /// idle, and how long lazy records wait ([`GATHER_WINDOW`], [`GATHER_IDLE`],
    /// [`LAZY_COMMIT_DELAY`]; tests lengthen them).
    gather_times: GatherTimes,
    /// Live `NodeLog` handles; the writer thread exits when none is left and the queue is empty.
    handles: usize,
    /// How often recent commits ended with records of others waiting: a moving average, in
    /// [`BUSY_ALWAYS`]ths. See [`LEAD_MAX_BUSY_SHARE`].
    busy_share: usize,
    /// Something queued is to be committed now: a record that is not lazy, a barrier, a fence,
    /// or an [`NodeLog::urge`]. Otherwise the queued records wait until `lazy_until`.
    urgent: bool,
    /// When the oldest queued lazy record's wait ends.
    lazy_until: Option<Instant>,
    /// When a waiting writer thread wakes by itself (`None`: it waits to be woken).
    writer_wakes_at: Option<Instant>,
}

impl Queue {
    /// The payload bytes of the queued records (called with a few queued: see [`Gathering`]).
    fn payload_bytes(&self) -> usize {
        self.msgs
            .iter()
            .take(GATHER_RECORDS)
            .map(|m| match m {
                Msg::Append(a) => a.payload.len(),
                _ => 0,
            })
            .sum()
    }

    /// A gathering writer has what it waits for: enough records, or enough bytes.
    fn gathered_enough(&self) -> bool {
        fills_a_commit(self.msgs.len(), self.payload_bytes())
    }

    /// Only lazy records are queued, and their wait is not over.
    fn lazy_wait(&self, now: Instant) -> Option<Instant> {
        if self.urgent || self.msgs.is_empty() {
            return None;
        }
        self.lazy_until.filter(|until| *until > now)
    }

    /// A waiting writer thread must be woken for what is queued: it would not otherwise look at
    /// the queue before the lazy records' wait ends. `gathered`: the urgent records are enough
    /// for a commit the writer gathers for.
    fn writer_must_wake(&self, gathered: bool) -> bool {
        if self.busy || !self.writer_waiting || self.msgs.is_empty() {
            return false;
        }
        if self.urgent {
            return gathered;
        }
        self.lazy_until
            .is_some_and(|until| self.writer_wakes_at.is_none_or(|at| at > until))
    }

    /// Takes a batch (see [`Core::take_batch`]); an emptied queue has nothing urgent or lazy.
    fn taken(&mut self) {
        if self.msgs.is_empty() {
            self.urgent = false;
            self.lazy_until = None;
        }
    }

    /// A commit ended: the queue is free again, and the average notes whether records of
    /// others were waiting for it.
    fn end_commit(&mut self) {
        self.busy = false;
        let waited = if self.msgs.is_empty() { 0 } else { BUSY_ALWAYS };
        self.busy_share = (self.busy_share * 7 + waited) / 8;
    }
}

/// What the handles and the writer thread share: the queue, and the writer state that only the
/// current committer touches.
struct Core {
    queue: Mutex<Queue>,
    wake: Condvar,
    writer: Mutex<Writer>,
}

thread_local! {
    /// The log (its `Core` address) whose wake-ups this thread defers; 0 for none.
    static DEFERRING: Cell<usize> = const { Cell::new(0) };
    /// Records this thread queued while deferring its wake-ups.
    static DEFERRED_RECORDS: Cell<usize> = const { Cell::new(0) };
}

impl Core {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn address(&self) -> usize {
        self as *const Core as usize
    }

    /// This thread defers its wake-ups for this log ([`NodeLog::defer_wakeups`]).
    fn deferring(&self) -> bool {
        DEFERRING.with(|d| d.get()) == self.address()
    }

    fn push(&self, msg: Msg) {
        let lazy = matches!(&msg, Msg::Append(a) if a.lazy);
        let mut q = self.queue();
        q.msgs.push(msg);
        if !lazy {
            q.urgent = true;
        } else if q.lazy_until.is_none() {
            q.lazy_until = Some(Instant::now() + q.gather_times.lazy);
        }
        let deferred = self.deferring();
        if deferred {
            DEFERRED_RECORDS.with(|n| n.set(n.get() + 1));
        }
        let enough = !q.gathering || q.gathered_enough();
        if !deferred && q.writer_must_wake(enough) {
            drop(q);
            self.wake.notify_one();
        }
    }

    /// Everything queued is to be committed now.
    fn urge(&self) {
        let mut q = self.queue();
        if q.msgs.is_empty() {
            return;
        }
        q.urgent = true;
        if !self.deferring() && q.writer_must_wake(true) {
            drop(q);
            self.wake.notify_one();
        }
    }

    /// Takes the next batch (at most `MAX_BATCH_BYTES` of payload, at least one message) and
    /// marks the queue busy. The caller checked that it is not busy and not empty.
    fn take_batch(q: &mut Queue) -> Vec<Msg> {
        q.busy = true;
        let mut bytes = 0usize;
        let mut n = 0;
        for m in &q.msgs {
            if n > 0 && bytes >= MAX_BATCH_BYTES {
                break;
            }
            if let Msg::Append(a) = m {
                bytes += a.payload.len();
            }
            n += 1;
        }
        let batch = q.msgs.drain(..n).collect();
        q.taken();
        batch
    }

    fn commit(&self, batch: &mut Vec<Msg>) {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        writer.commit(batch);
        writer.reclaim();
    }

    /// Commits what is queued on this thread unless a committer is at work already (it will
    /// take the queue next) or records other than this thread's `own` are queued (they wake the
    /// writer thread instead), then hands anything that arrived meanwhile to the writer thread.
    fn lead(&self, own: usize) {
        let mut batch = {
            let mut q = self.queue();
            if q.busy || q.msgs.is_empty() {
                return;
            }
            // Lazy records wait for the writer thread, or for a commit led by an urgent one.
            if !q.urgent || q.msgs.len() > own || q.busy_share > LEAD_MAX_BUSY_SHARE {
                drop(q);
                self.kick();
                return;
            }
            Self::take_batch(&mut q)
        };
        // Released even if a completion panics on this (borrowed) thread: a queue left busy
        // would stop the log.
        let _release = Release(self);
        self.commit(&mut batch);
    }

    /// Wakes the writer thread for whatever is queued, unless a committer is at work already
    /// (or the writer will look at lazy records in time by itself).
    fn kick(&self) {
        let q = self.queue();
        if q.writer_must_wake(true) {
            drop(q);
            self.wake.notify_one();
        }
    }

    /// Waits up to `window` for [`GATHER_RECORDS`] records (or [`GATHER_BYTES`] payload bytes)
    /// to be queued, or for another committer (a leading appender) to start.
    fn gather<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue>,
        window: Duration,
    ) -> MutexGuard<'a, Queue> {
        let deadline = Instant::now() + window;
        q.gathering = true;
        while !q.busy && !q.gathered_enough() && Instant::now() < deadline {
            q = self.wait_until(q, deadline).0;
        }
        q.gathering = false;
        q
    }

    /// The writer thread waits until `until`, or until woken; true when it was not woken (as
    /// far as the condition variable tells).
    fn wait_until<'a>(
        &'a self,
        mut q: MutexGuard<'a, Queue>,
        until: Instant,
    ) -> (MutexGuard<'a, Queue>, bool) {
        q.writer_waiting = true;
        q.writer_wakes_at = Some(until);
        let left = until.saturating_duration_since(Instant::now());
        let (mut q, timeout) = self
            .wake
            .wait_timeout(q, left)
            .unwrap_or_else(|p| p.into_inner());
        q.writer_waiting = false;
        q.writer_wakes_at = None;
        (q, timeout.timed_out())
    }

    /// The writer thread: commits whatever is queued; reclaims segments when idle.
    fn run_writer(&self) {
        let mut gathering = Gathering::new(Instant::now());
        let mut q = self.queue();
        loop {
            if !q.busy
                && let Some(until) = q.lazy_wait(Instant::now())
                && q.handles > 0
            {
                q = self.wait_until(q, until).0;
                continue;
            }
            if !q.busy
                && q.urgent
                && let Some(window) = gathering.wait(
                    q.msgs.len(),
                    q.payload_bytes(),
                    Instant::now(),
                    q.gather_times,
                )
            {
                q = self.gather(q, window);
                // Short of the count with nobody else committing: the window passed.
                gathering.gathered(q.busy || q.gathered_enough());
            }
            if !q.busy && !q.msgs.is_empty() {
                let mut batch = Self::take_batch(&mut q);
                gathering.took(batch.len(), Instant::now());
                drop(q);
                self.commit(&mut batch);
                q = self.queue();
                q.end_commit();
                continue;
            }
            if q.handles == 0 && q.msgs.is_empty() && !q.busy {
                return;
            }
            let (guard, timed_out) =
                self.wait_until(q, Instant::now() + Duration::from_millis(200));
            q = guard;
            if timed_out && !q.busy && q.msgs.is_empty() {
                q.busy = true;
                drop(q);
                self.writer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reclaim();
                q = self.queue();
                q.busy = false;
            }
        }
    }
}

/// Ends a leading appender's commit: the queue is free again, and the writer thread takes
/// whatever arrived meanwhile.
struct Release<'a>(&'a Core);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let mut q = self.0.queue();
        q.end_commit();
        if !q.msgs.is_empty() && q.writer_waiting {
            drop(q);
            self.0.wake.notify_one();
        }
    }
}

/// The longest a lazy record waits for a commit that something else starts. Followers log the
/// entries of the followers an owner does not count on for its quorum lazily: see
/// [`NodeLog::urge`].
const LAZY_COMMIT_DELAY: Duration = Duration::from_millis(2);

/// A commit of fewer records than this may wait for more ([`Gathering`]).
const GATHER_RECORDS: usize = 4;
/// After a wait came up short, gathering resumes once a commit takes this many records by
/// itself: producers clearly outnumber what a wait asks for.
const GATHER_REARM: usize = 2 * GATHER_RECORDS;
/// ... unless this many payload bytes are queued: big records fill an fsync by themselves.
const GATHER_BYTES: usize = 32 << 10;
/// The longest a commit waits for more records: about the length of one fsync on the
/// benchmark machine (300-400 us under load), so a record waits at most about one more.
const GATHER_WINDOW: Duration = Duration::from_micros(300);
/// A commit waits only when at least this many more records are expected within the window.
const GATHER_EXPECTED: f64 = 2.0;
/// ... and only when the last commit started this recently (the rate is that of a busy spell).
const GATHER_IDLE: Duration = Duration::from_millis(5);

/// Whether `records` queued records of `bytes` payload bytes are worth a commit without waiting.
fn fills_a_commit(records: usize, bytes: usize) -> bool {
    records >= GATHER_RECORDS || bytes >= GATHER_BYTES
}

#[derive(Clone, Copy, Debug)]
struct GatherTimes {
    window: Duration,
    idle: Duration,
    /// How long lazy records wait ([`LAZY_COMMIT_DELAY`]).
    lazy: Duration,
}

impl Default for GatherTimes {
    fn default() -> Self {
        GatherTimes {
            window: GATHER_WINDOW,
            idle: GATHER_IDLE,
            lazy: LAZY_COMMIT_DELAY,
        }
    }
}

/// Decides when the writer thread waits briefly for more records before a commit.
///
/// Under load a node's log commits back to back and records arrive in bursts (one replication
/// read carries several entries), so many commits took only one or two records: in the 5-node
/// benchmark with 1000 objects, 30% of a node's fsyncs synced a single record. Each fsync costs
/// CPU (the flush, its completion interrupt and kernel worker, thread switches), and the other
/// nodes on the machine wanted that CPU. When records arrive fast enough that a few more are
/// expected within about one fsync's time, waiting for them makes fewer, fuller commits; there
/// it cut a node's fsyncs by a third. A lone writer (records far apart) never waits.
///
/// A fast rate does not mean more records can come, though: with three clients writing in a
/// loop, their three records arrive together and no fourth follows until they are answered, so
/// every commit waited out the window (one node took 5,100 writes/s instead of 8,300 at three
/// connections). So a wait that ends short of [`GATHER_RECORDS`] disarms the rule until a
/// commit takes [`GATHER_REARM`] records by itself, which few producers never make (at five
/// connections re-arming at the count itself still cost a fifth of the throughput).
struct Gathering {
    /// Records per second taken by recent commits (moving average).
    rate: f64,
    last_take: Instant,
    /// The last wait reached its count, or a commit since took [`GATHER_REARM`] records.
    armed: bool,
}

impl Gathering {
    fn new(now: Instant) -> Self {
        Gathering {
            rate: 0.0,
            last_take: now,
            armed: true,
        }
    }

    /// How long to wait for more records before committing `queued` records of `bytes` payload
    /// bytes, if at all.
    fn wait(
        &self,
        queued: usize,
        bytes: usize,
        now: Instant,
        times: GatherTimes,
    ) -> Option<Duration> {
        let busy = now.saturating_duration_since(self.last_take) < times.idle;
        let expected_more = self.rate * times.window.as_secs_f64();
        (self.armed
            && queued > 0
            && !fills_a_commit(queued, bytes)
            && busy
            && expected_more >= GATHER_EXPECTED)
            .then_some(times.window)
    }

    /// A wait ended: with its count reached (or the queue taken by another committer), or not.
    fn gathered(&mut self, reached: bool) {
        self.armed = reached;
    }

    /// A commit took `n` records at `now`.
    fn took(&mut self, n: usize, now: Instant) {
        if n >= GATHER_REARM {
            self.armed = true;
        }
        let since = now
            .saturating_duration_since(self.last_take)
            .as_secs_f64()
            .max(1e-6);
        self.last_take = now;
        self.rate = self.rate * 0.875 + (n as f64 / since) * 0.125;
    }
}

/// The handle the node uses to append. Cheap to clone.
pub struct NodeLog {
    core: Arc<Core>,
    shared: Arc<LogShared>,
}

impl Clone for NodeLog {
    fn clone(&self) -> Self {
        self.core.queue().handles += 1;
        NodeLog {
            core: self.core.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl Drop for NodeLog {
    fn drop(&mut self) {
        let mut q = self.core.queue();
        q.handles -= 1;
        if q.handles == 0 {
            drop(q);
            self.core.wake.notify_one();
        }
    }
}

/// While alive, appends by this thread wake no committer: the thread will commit them itself
/// ([`Deferred::lead`]) or, when dropped, wake the writer thread for them.
pub struct Deferred<'a> {
    core: &'a Core,
    shared: &'a LogShared,
    previous: usize,
    /// The thread's count of deferred records before this guard (guards may nest).
    previous_records: usize,
}

/// The busy share of a log whose every commit ends with records of others waiting.
const BUSY_ALWAYS: usize = 256;

/// Threads lead commits only while at most a quarter of the recent commits ended with records
/// of others waiting. Other records arriving during commits mean other work on the node: a
/// leader then holds an async worker through an fsync that, on a busy CPU, takes several times
/// longer on that thread than on the writer thread, and every record queued meanwhile waits
/// for it. A thread that is the node's only source of records (a sequential client, or a
/// follower streaming from one owner) keeps leading. Measured with 64 clients on 5 nodes: at
/// half, workers still led a quarter of the fsyncs; at a quarter, 3 %; followers streaming from
/// one busy owner kept leading either way.
const LEAD_MAX_BUSY_SHARE: usize = BUSY_ALWAYS / 4;

/// Threads lead commits only while fsyncs take less than this; when the disk is slow, waiting
/// for it is the writer thread's job.
const LEAD_MAX_FSYNC_MICROS: u64 = 2_000;

impl Deferred<'_> {
    /// Commits the queued records on this thread (fsync included, completions run here) unless
    /// a commit is under way already, other threads' records are queued too, or fsyncs are
    /// slow. For threads that would otherwise only wait.
    pub fn lead(self) {
        let limit = self.shared.lead_max_fsync_micros.load(Ordering::Relaxed);
        if self.shared.fsync_micros.load(Ordering::Relaxed) > limit {
            return; // dropped: wakes the writer thread
        }
        let own = self.restore();
        self.core.lead(own);
        std::mem::forget(self);
    }

    /// Ends the deferral on this thread; returns how many records it queued under this guard.
    fn restore(&self) -> usize {
        DEFERRING.with(|d| d.set(self.previous));
        DEFERRED_RECORDS.with(|n| n.replace(self.previous_records))
    }
}

impl Drop for Deferred<'_> {
    fn drop(&mut self) {
        self.restore();
        self.core.kick();
    }
}

impl NodeLog {
    pub fn append(&self, append: Append) {
        self.core.push(Msg::Append(append));
    }

    /// Commits every record queued so far without waiting out lazy records' delay.
    ///
    /// An owner waits for `writeQuorum - 1` followers' acknowledgements. With every follower
    /// syncing each entry at once, the others' fsyncs were work nobody waited for, on disks and
    /// CPUs the quorum needed. So followers log entries lazily, and the owner tells the followers
    /// it counts on to commit now; the others' entries share fewer, fuller commits. With 5 nodes
    /// on one machine this cut two of the five nodes' fsyncs from about 1,800/s to 500/s under
    /// one sequential writer, and raised the throughput of 64 KiB writes from 64 connections by
    /// about an eighth.
    pub fn urge(&self) {
        self.core.urge();
    }

    /// Sets how long lazy records wait ([`LAZY_COMMIT_DELAY`]), for tests elsewhere.
    #[cfg(test)]
    pub fn set_lazy_delay(&self, delay: Duration) {
        self.core.queue().gather_times.lazy = delay;
    }

    pub fn barrier(&self, done: Completion) {
        self.core.push(Msg::Barrier(done));
    }

    /// Refuses all further entries of the slot with generation `<= fence.generation`.
    pub fn fence(&self, fence: Fence) {
        self.core.push(Msg::Fence(fence));
    }

    /// Defers the wake-ups of this thread's appends until the returned guard leads or drops.
    pub fn defer_wakeups(&self) -> Deferred<'_> {
        let previous = DEFERRING.with(|d| d.replace(self.core.address()));
        let previous_records = DEFERRED_RECORDS.with(|n| n.replace(0));
        Deferred {
            core: &self.core,
            shared: &self.shared,
            previous,
            previous_records,
        }
    }

    pub fn shared(&self) -> &Arc<LogShared> {
        &self.shared
    }

    /// Blocks until everything appended so far is durable.
    pub fn sync(&self) -> Result<(), LogError> {
        let (tx, rx) = mpsc::channel();
        self.barrier(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().map_err(|_| LogError::Closed)?.map(|_| ())
    }
}

/// Owns the writer and spare-preparer threads; dropping it stops them after pending work.
pub struct LogRunner {
    log: Option<NodeLog>,
    writer: Option<JoinHandle<()>>,
    spares: Arc<Spares>,
    preparer: Option<JoinHandle<()>>,
}

impl LogRunner {
    pub fn log(&self) -> NodeLog {
        match &self.log {
            Some(l) => l.clone(),
            None => unreachable!("log handle is present until drop"),
        }
    }
}

impl Drop for LogRunner {
    fn drop(&mut self) {
        self.log = None;
        self.spares.stop();
        // The writer exits when every handle is gone; handles held elsewhere may outlive us, in
        // which case the thread is detached and ends with the process.
        if let Some(p) = self.preparer.take() {
            let _ = p.join();
        }
        drop(self.writer.take());
    }
}

/// Keeps preallocated spare segments ready, so switching segments never waits for zero-fill.
/// Each is held open, and so is the log's directory, so that the switch needs no new file
/// descriptor either: a node that has run out of them (a burst of client connections) keeps
/// committing, where an `EMFILE` at a segment switch failed every write of its batch.
struct Spares {
    dir: PathBuf,
    /// The log's filesystem takes direct I/O: segments are opened with it.
    direct: bool,
    /// The log's directory, held open to sync after a spare is renamed into place.
    dir_handle: File,
    segment_bytes: u64,
    ready: Mutex<Vec<(PathBuf, File)>>,
    wake: Condvar,
    stopping: std::sync::atomic::AtomicBool,
    next: AtomicU64,
}

const SPARES_KEPT: usize = 2;

impl Spares {
    /// Takes a ready spare. The preparer is woken by [`Spares::replace_taken`] once the segment
    /// it replaces is closed, not here: on a node out of descriptors, the one that segment
    /// frees is what the preparer needs, and woken at once it failed for want of it, then
    /// waited out a backoff in which the log could fill the next segment too.
    fn take(&self) -> Option<(PathBuf, File)> {
        self.ready.lock().ok()?.pop()
    }

    /// Wakes the preparer to replace a taken spare.
    fn replace_taken(&self) {
        self.wake.notify_all();
    }

    /// Offers a retired segment for reuse; returns it back if there are enough spares.
    fn offer(&self, path: &Path) -> io::Result<bool> {
        let Ok(mut ready) = self.ready.lock() else {
            return Ok(false);
        };
        if ready.len() >= SPARES_KEPT {
            return Ok(false);
        }
        let spare = segments::spare_path(&self.dir, self.next.fetch_add(1, Ordering::Relaxed));
        // Opened before the rename: a descriptor that cannot be had leaves the segment to be
        // removed, as when enough spares are kept.
        let file = open_segment_file(path, self.direct)?;
        fs::rename(path, &spare)?;
        ready.push((spare, file));
        Ok(true)
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    fn run(&self) {
        let mut backoff = Duration::from_millis(100);
        while !self.stopping.load(Ordering::Acquire) {
            let need = self.ready.lock().map(|r| r.is_empty()).unwrap_or(false);
            if need {
                let path =
                    segments::spare_path(&self.dir, self.next.fetch_add(1, Ordering::Relaxed));
                match segments::preallocate(&path, self.segment_bytes)
                    .and_then(|()| open_segment_file(&path, self.direct))
                {
                    Ok(file) => {
                        if let Ok(mut r) = self.ready.lock() {
                            r.push((path, file));
                        }
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot prepare a spare log segment; retrying");
                        let _ = fs::remove_file(path.with_extension("tmp"));
                        // Prepared but not opened (out of descriptors): not left behind.
                        let _ = fs::remove_file(&path);
                        // A segment switch (which closes a file) cuts the backoff short.
                        if let Ok(guard) = self.ready.lock() {
                            let _ = self.wake.wait_timeout(guard, backoff);
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            if let Ok(guard) = self.ready.lock() {
                let _ = self.wake.wait_timeout(guard, Duration::from_millis(500));
            }
        }
    }
}

struct Segment {
    start: u64,
    len: u64,
    path: PathBuf,
    /// Highest LSN of a page set or delete per object in this segment.
    objects: HashMap<ObjectKey, u64>,
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    file: File,
    /// Offset of the next record within the current (last) segment.
    offset: u64,
    segments: VecDeque<Segment>,
    checkpointed: HashMap<ObjectKey, u64>,
    fenced: HashMap<SlotKey, u64>,
    spares: Arc<Spares>,
    shared: Arc<LogShared>,
    metrics: LogMetrics,
    /// The current segment's bytes from the start of the block holding `synced` to `offset`:
    /// the last, partly filled block already written (so that the next write can rewrite it
    /// whole, as direct I/O writes whole blocks), then the records of the commit under way.
    buf: BlockBuf,
    /// Offset in the current segment up to which records are written and synced.
    synced: u64,
    last_blocker_scan: Instant,
}

const MAX_BATCH_BYTES: usize = 16 << 20;

/// A log in `dir` with small segments and metrics nobody reads, for tests.
#[cfg(test)]
pub fn start_for_test(dir: &Path) -> LogRunner {
    let metrics = crate::metrics::Metrics::new();
    start(dir, 64 << 10, 0, metrics.log.clone()).expect("start a node log")
}

/// Starts the log with an empty segment at `start_lsn` (the end of whatever was replayed).
pub fn start(
    dir: &Path,
    segment_bytes: u64,
    start_lsn: u64,
    metrics: LogMetrics,
) -> io::Result<LogRunner> {
    super::dirs::create_dir_all_durable(dir)?;
    let direct = segments::takes_direct_io(dir);
    start_writing(dir, segment_bytes, start_lsn, metrics, direct)
}

/// [`start`] with the choice of direct I/O made: `direct` only where the filesystem takes it.
/// The page-cache path is chosen here by tests too, since the test machines' filesystems all
/// take direct I/O and the path would otherwise go unexercised.
fn start_writing(
    dir: &Path,
    segment_bytes: u64,
    start_lsn: u64,
    metrics: LogMetrics,
    direct: bool,
) -> io::Result<LogRunner> {
    // Whole blocks: direct writes end on block boundaries.
    let segment_bytes = segment_bytes.next_multiple_of(BLOCK as u64);
    metrics.direct_io.set(i64::from(direct));
    if direct {
        tracing::info!(dir = %dir.display(), "the node log writes with direct I/O");
    } else {
        tracing::warn!(dir = %dir.display(), "the node log's filesystem refuses direct I/O; it writes through the page cache");
    }
    let spares = Arc::new(Spares {
        dir: dir.to_path_buf(),
        direct,
        dir_handle: File::open(dir)?,
        segment_bytes,
        ready: Mutex::new(Vec::new()),
        wake: Condvar::new(),
        stopping: false.into(),
        next: AtomicU64::new(0),
    });
    // Reuse spares left by an earlier run when they have the right size; drop the others.
    let mut next_spare = 0;
    for path in segments::list_spares(dir)? {
        let ok = fs::metadata(&path)
            .map(|m| m.len() == segment_bytes)
            .unwrap_or(false);
        let ready_len = spares.ready.lock().map(|r| r.len()).unwrap_or(SPARES_KEPT);
        if ok && ready_len < SPARES_KEPT && path.extension().is_some_and(|e| e == "log") {
            let file = open_segment_file(&path, direct)?;
            if let Ok(mut r) = spares.ready.lock() {
                r.push((path.clone(), file));
            }
            next_spare += 1;
        } else {
            fs::remove_file(&path)?;
        }
    }
    spares.next.store(
        next_spare + 1_000_000 * (start_lsn / segment_bytes.max(1) % 1000),
        Ordering::Relaxed,
    );

    let path = segments::segment_path(dir, start_lsn);
    let file = open_segment(&spares, &path, segment_bytes)?;
    let shared = Arc::new(LogShared::default());
    shared.durable_lsn.store(start_lsn, Ordering::Release);
    shared.live_segments.store(1, Ordering::Relaxed);
    let writer = Writer {
        dir: dir.to_path_buf(),
        segment_bytes,
        file,
        offset: 0,
        segments: VecDeque::from([Segment {
            start: start_lsn,
            len: segment_bytes,
            path,
            objects: HashMap::new(),
        }]),
        checkpointed: HashMap::new(),
        fenced: HashMap::new(),
        spares: spares.clone(),
        shared: shared.clone(),
        metrics,
        buf: BlockBuf::with_capacity(1 << 20),
        synced: 0,
        last_blocker_scan: Instant::now(),
    };
    let core = Arc::new(Core {
        queue: Mutex::new(Queue {
            msgs: Vec::new(),
            busy: false,
            writer_waiting: false,
            gathering: false,
            gather_times: GatherTimes::default(),
            handles: 1,
            busy_share: 0,
            urgent: false,
            lazy_until: None,
            writer_wakes_at: None,
        }),
        wake: Condvar::new(),
        writer: Mutex::new(writer),
    });
    let writer_core = core.clone();
    let writer_thread = std::thread::Builder::new()
        .name("colony-log".into())
        .spawn(move || writer_core.run_writer())?;
    let preparer_spares = spares.clone();
    let preparer = std::thread::Builder::new()
        .name("colony-log-spares".into())
        .spawn(move || preparer_spares.run())?;
    Ok(LogRunner {
        log: Some(NodeLog { core, shared }),
        writer: Some(writer_thread),
        spares,
        preparer: Some(preparer),
    })
}

/// Opens `path` as a fresh segment of at least `len` bytes: a ready spare renamed into place
/// when one fits, otherwise a newly preallocated file.
fn open_segment(spares: &Spares, path: &Path, len: u64) -> io::Result<File> {
    let spare = if len == spares.segment_bytes {
        spares.take()
    } else {
        None
    };
    match spare {
        Some((spare, file)) => {
            fs::rename(&spare, path)?;
            spares.dir_handle.sync_all()?;
            Ok(file)
        }
        None => {
            segments::preallocate(path, len)?;
            open_segment_file(path, spares.direct)
        }
    }
}

/// Opens a segment file of a log whose filesystem takes direct I/O (`direct`, found by
/// [`segments::takes_direct_io`] at start) or not.
fn open_segment_file(path: &Path, direct: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = if direct { libc::O_DIRECT } else { 0 };
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
}

struct Pending {
    done: Completion,
    result: Result<u64, LogError>,
}

/// A record encoded into the write buffer but not yet durable.
struct Unflushed {
    pending: usize,
    object: ObjectKey,
    lsn: u64,
    kind: RecordKind,
    marker: Option<(ObjectKey, u64)>,
}

impl Writer {
    fn current(&self) -> &Segment {
        match self.segments.back() {
            Some(s) => s,
            None => unreachable!("the writer always has a current segment"),
        }
    }

    /// Writes and syncs one batch, then completes its requests in order.
    fn commit(&mut self, batch: &mut Vec<Msg>) {
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        let mut unflushed: Vec<Unflushed> = Vec::new();
        let mut failure: Option<LogError> = None;
        // The buffer starts with the last block written, partly filled (see `buf`).
        let mut buf_offset = block_floor(self.offset);

        for msg in batch.drain(..) {
            let a = match msg {
                Msg::Barrier(done) => {
                    pending.push(Pending {
                        done,
                        result: Ok(0),
                    });
                    continue;
                }
                Msg::Fence(f) => {
                    self.fence_slot(Some(&f));
                    continue;
                }
                Msg::Append(a) => a,
            };
            let fenced = a.fence.as_ref().is_some_and(|f| {
                self.fenced
                    .get(&f.slot)
                    .is_some_and(|&min| f.generation < min)
            });
            let refused = match &failure {
                Some(e) => Some(e.clone()),
                None => fenced.then_some(LogError::Fenced),
            };
            if let Some(err) = refused {
                self.fence_slot(a.fence.as_ref());
                pending.push(Pending {
                    done: a.done,
                    result: Err(err),
                });
                continue;
            }
            let size = record_size(a.payload.len()) as u64;
            if self.offset + size > self.current().len {
                // Seal the current segment durably before anything lands in the next one, so a
                // valid record in a later segment implies every earlier one is complete.
                self.flush(buf_offset, &mut unflushed, &mut pending);
                if let Err(e) = self.switch_segment(size) {
                    tracing::error!(error = %e, "cannot move to a new log segment");
                    self.shared.healthy.store(false, Ordering::Release);
                    let err = LogError::from_io(&e);
                    failure = Some(err.clone());
                    self.fence_slot(a.fence.as_ref());
                    pending.push(Pending {
                        done: a.done,
                        result: Err(err),
                    });
                    continue;
                }
                buf_offset = self.offset;
            }
            let lsn = self.current().start + self.offset;
            encode_record_into(self.buf.grow(size as usize), lsn, a.kind, &a.payload);
            self.offset += size;
            let marker = match a.kind {
                RecordKind::Checkpoint => decode_checkpoint(&a.payload)
                    .ok()
                    .map(|c| (c.object, c.upto)),
                _ => None,
            };
            unflushed.push(Unflushed {
                pending: pending.len(),
                object: a.object,
                lsn,
                kind: a.kind,
                marker,
            });
            pending.push(Pending {
                done: a.done,
                result: Ok(lsn),
            });
        }
        self.flush(buf_offset, &mut unflushed, &mut pending);
        for p in pending {
            (p.done)(p.result);
        }
    }

    /// Marks a slot's generation as failed: later entries of that generation are refused.
    fn fence_slot(&mut self, fence: Option<&Fence>) {
        if let Some(f) = fence {
            let e = self.fenced.entry(f.slot.clone()).or_insert(0);
            *e = (*e).max(f.generation + 1);
        }
    }

    /// Writes the buffered records at `at` (offset in the current segment), fdatasyncs, and
    /// settles them: their objects are recorded against the current segment, their checkpoint
    /// markers take effect.
    ///
    /// Segments are preallocated, so a write here cannot run out of space: an error is the disk
    /// failing. After a failed write or fsync the kernel may have dropped dirty pages while
    /// reporting them clean, so nothing written since the last good fsync can be trusted; the
    /// process stops and recovery replays what is known durable (PostgreSQL's policy since 2018).
    fn flush(&mut self, at: u64, unflushed: &mut Vec<Unflushed>, pending: &mut [Pending]) {
        if self.offset == self.synced {
            return;
        }
        if let Err(e) = self.file.write_all_at(self.buf.padded(), at) {
            tracing::error!(error = %e, "write to the node log failed; aborting to recover from the durable log");
            std::process::abort();
        }
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            tracing::error!(error = %e, "fdatasync of the node log failed; aborting to recover from the durable log");
            std::process::abort();
        }
        self.shared.healthy.store(true, Ordering::Release);
        let took = started.elapsed();
        let micros = took.as_micros().min(u64::MAX as u128) as u64;
        let average = self.shared.fsync_micros.load(Ordering::Relaxed);
        self.shared
            .fsync_micros
            .store((average * 7 + micros) / 8, Ordering::Relaxed);
        self.metrics.fsync_seconds.observe(took.as_secs_f64());
        self.metrics.fsyncs.inc();
        self.metrics.bytes.inc_by(self.offset - self.synced);
        self.metrics
            .records_per_fsync
            .observe(unflushed.len() as f64);
        self.synced = self.offset;
        self.buf.keep_partial_block();
        let durable = self.current().start + self.offset;
        self.shared.durable_lsn.store(durable, Ordering::Release);
        for u in unflushed.drain(..) {
            debug_assert!(pending[u.pending].result.is_ok());
            match u.kind {
                RecordKind::PageSet | RecordKind::Delete => {
                    if let Some(seg) = self.segments.back_mut() {
                        seg.objects.insert(u.object, u.lsn);
                    }
                }
                RecordKind::Checkpoint => {
                    if let Some((key, upto)) = u.marker {
                        let e = self.checkpointed.entry(key).or_insert(0);
                        *e = (*e).max(upto);
                    }
                }
            }
        }
    }

    fn switch_segment(&mut self, record: u64) -> io::Result<()> {
        let start = self.current().start + self.offset;
        let len = self
            .segment_bytes
            .max(record.next_multiple_of(BLOCK as u64));
        let path = segments::segment_path(&self.dir, start);
        // The old segment's file closes here, before the preparer is woken (see `Spares::take`).
        self.file = open_segment(&self.spares, &path, len)?;
        self.spares.replace_taken();
        self.segments.push_back(Segment {
            start,
            len,
            path,
            objects: HashMap::new(),
        });
        self.offset = 0;
        self.synced = 0;
        self.buf.clear();
        self.shared
            .live_segments
            .store(self.segments.len() as u64, Ordering::Relaxed);
        self.metrics.segments.set(self.segments.len() as i64);
        Ok(())
    }

    fn front_reclaimable(&self) -> bool {
        let limit = self.shared.retire_limit.load(Ordering::Acquire);
        self.segments.len() > 1
            && self.segments.front().is_some_and(|s| {
                s.start + s.len <= limit
                    && s.objects
                        .iter()
                        .all(|(k, lsn)| self.checkpointed.get(k).is_some_and(|c| c >= lsn))
            })
    }

    /// Retires the oldest segments whose records are all checkpointed, and publishes what holds
    /// the oldest one back otherwise.
    fn reclaim(&mut self) {
        while self.front_reclaimable() {
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            let recycled =
                seg.len == self.segment_bytes && self.spares.offer(&seg.path).unwrap_or(false);
            if !recycled && let Err(e) = fs::remove_file(&seg.path) {
                tracing::warn!(error = %e, path = %seg.path.display(), "cannot remove a retired log segment");
            }
            // Checkpoint positions before the oldest live segment no longer matter.
            let oldest = self.segments.front().map_or(0, |s| s.start);
            self.checkpointed.retain(|_, upto| *upto >= oldest);
            self.shared
                .live_segments
                .store(self.segments.len() as u64, Ordering::Relaxed);
            self.metrics.segments.set(self.segments.len() as i64);
        }
        if self.segments.len() > 1 && self.last_blocker_scan.elapsed() > Duration::from_millis(200)
        {
            self.last_blocker_scan = Instant::now();
            let blockers: Vec<ObjectKey> = self
                .segments
                .front()
                .map(|s| {
                    s.objects
                        .iter()
                        .filter(|(k, lsn)| self.checkpointed.get(*k).is_none_or(|c| c < *lsn))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            if let Ok(mut b) = self.shared.blockers.lock() {
                *b = blockers;
            }
        } else if self.segments.len() == 1
            && let Ok(mut b) = self.shared.blockers.lock()
        {
            b.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;
    use crate::storage::recovery;
    use std::collections::BTreeMap;

    fn object(n: u8) -> ObjectKey {
        ObjectKey::new("ns".into(), ObjectId::from_bytes([n; 32]))
    }

    /// A page-set record of object `n`, outside any slot.
    fn page_set(n: u8, payload: bytes::Bytes, done: Completion) -> Append {
        Append {
            kind: RecordKind::PageSet,
            object: object(n),
            fence: None,
            payload,
            lazy: false,
            done,
        }
    }

    /// A log in `dir` with segments of `segment_bytes`, its metrics, and a handle to it.
    fn started(
        dir: &Path,
        segment_bytes: u64,
    ) -> (Arc<crate::metrics::Metrics>, LogRunner, NodeLog) {
        let metrics = crate::metrics::Metrics::new();
        let runner = start(dir, segment_bytes, 0, metrics.log.clone()).expect("start");
        let log = runner.log();
        (metrics, runner, log)
    }

    /// A log with small segments (commits by leaders can switch segments too) whose threads
    /// lead however slow this machine's disk is: CI's fsyncs can average over the limit, and
    /// then nobody would lead.
    fn start_leading(dir: &Path) -> (Arc<crate::metrics::Metrics>, LogRunner, NodeLog) {
        let (metrics, runner, log) = started(dir, 64 << 10);
        log.shared
            .lead_max_fsync_micros
            .store(u64::MAX, Ordering::Relaxed);
        (metrics, runner, log)
    }

    /// Threads that lead their own commits and threads that leave them to the writer thread
    /// append at once, across segment switches: every record completes durably, each thread's
    /// records keep their order, and the log on disk holds exactly what was acknowledged.
    #[test]
    fn leading_appenders_and_the_writer_thread_commit_everything_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (metrics, runner, log) = start_leading(dir.path());
        let (tx, rx) = mpsc::channel::<(u8, u32, bool, Result<u64, LogError>)>();
        const PER_THREAD: u32 = 400;
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let log = log.clone();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let me = std::thread::current().id();
                    for i in 0..PER_THREAD {
                        let payload = format!("thread {t} record {i}").repeat(20);
                        let tx = tx.clone();
                        let deferred = log.defer_wakeups();
                        log.append(page_set(
                            t,
                            payload.into_bytes().into(),
                            Box::new(move |r| {
                                let own = std::thread::current().id() == me;
                                let _ = tx.send((t, i, own, r));
                            }),
                        ));
                        // Threads 0 and 1 lead; 2 and 3 wake the writer thread.
                        if t < 2 {
                            deferred.lead();
                        } else {
                            drop(deferred);
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        for t in threads {
            t.join().expect("appender");
        }
        let mut acknowledged: BTreeMap<u64, (u8, u32)> = BTreeMap::new();
        let mut last: HashMap<u8, u64> = HashMap::new();
        let mut led = [0u32; 4];
        for _ in 0..4 * PER_THREAD {
            let (t, i, own, r) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("every append completes");
            let lsn = r.expect("durable");
            assert!(
                last.get(&t).is_none_or(|&prev| prev < lsn),
                "thread {t}'s record {i} at {lsn} is not after its previous one"
            );
            last.insert(t, lsn);
            if own {
                led[usize::from(t)] += 1;
            }
            assert!(
                acknowledged.insert(lsn, (t, i)).is_none(),
                "LSN {lsn} twice"
            );
        }
        // How many records the leaders committed themselves depends on timing (the writer thread,
        // kept busy by threads 2 and 3, often holds the log when they try); that leading
        // commits on the leader is checked on an idle log below.
        assert_eq!(led[2] + led[3], 0, "threads that do not lead never commit");
        assert!(log.shared().durable_lsn() > *acknowledged.keys().last().expect("records"));
        assert!(metrics.log.segments.get() > 1, "segments switched");
        drop(log);
        drop(runner);

        let mut on_disk: BTreeMap<u64, String> = BTreeMap::new();
        recovery::scan(dir.path(), u64::MAX, |lsn, _, payload| {
            on_disk.insert(lsn, String::from_utf8_lossy(payload).into_owned());
            Ok(())
        })
        .expect("scan");
        assert_eq!(on_disk.len(), acknowledged.len());
        for (lsn, (t, i)) in acknowledged {
            assert_eq!(
                on_disk.get(&lsn),
                Some(&format!("thread {t} record {i}").repeat(20)),
                "record at {lsn}"
            );
        }
    }

    /// Records of every size, from a few bytes to more than a segment, committed one at a time
    /// (so consecutive commits share blocks) and several at once: all read back as written, and
    /// the log writes with direct I/O wherever its filesystem takes it.
    #[test]
    fn records_of_any_size_read_back_whether_committed_alone_or_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A segment size off the block size: rounded up to whole blocks.
        let (metrics, runner, log) = started(dir.path(), (64 << 10) + 100);
        let direct = segments::takes_direct_io(dir.path());
        assert_eq!(metrics.log.direct_io.get(), i64::from(direct));
        assert_eq!(open_segments_direct(dir.path()), vec![direct]);
        records_of_any_size_read_back(dir.path(), &metrics, runner, log, direct);
    }

    /// The same through the page cache, as on a filesystem that refuses direct I/O.
    #[test]
    fn records_of_any_size_read_back_through_the_page_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = crate::metrics::Metrics::new();
        let runner = start_writing(dir.path(), (64 << 10) + 100, 0, metrics.log.clone(), false)
            .expect("start");
        assert_eq!(metrics.log.direct_io.get(), 0);
        assert_eq!(open_segments_direct(dir.path()), vec![false]);
        let log = runner.log();
        records_of_any_size_read_back(dir.path(), &metrics, runner, log, false);
    }

    /// For each segment file (not spare) this process has open in `dir`: whether it is open
    /// with `O_DIRECT`, read from the flags in `/proc/self/fdinfo`.
    fn open_segments_direct(dir: &Path) -> Vec<bool> {
        let dir = dir.canonicalize().expect("dir");
        let segments = segments::list_segments(&dir).expect("segments");
        let mut direct = Vec::new();
        for fd in fs::read_dir("/proc/self/fd").expect("fds").flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if !segments.iter().any(|(_, path)| *path == target) {
                continue;
            }
            let info = fs::read_to_string(Path::new("/proc/self/fdinfo").join(fd.file_name()))
                .expect("fdinfo");
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i32::from_str_radix(f.trim(), 8).ok())
                .expect("flags");
            direct.push(flags & libc::O_DIRECT != 0);
        }
        direct
    }

    fn records_of_any_size_read_back(
        dir: &Path,
        metrics: &crate::metrics::Metrics,
        runner: LogRunner,
        log: NodeLog,
        direct: bool,
    ) {
        let sizes: Vec<usize> = [0, 1, 7, 100, 4000, 4096, 5000, 20_000, 70_000, 200_000, 3]
            .into_iter()
            .cycle()
            .take(60)
            .collect();
        let payload =
            |i: usize, len: usize| -> Vec<u8> { (0..len).map(|j| (i * 31 + j) as u8).collect() };
        let (tx, rx) = mpsc::channel();
        let mut expected = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let tx = tx.clone();
            log.append(page_set(
                1,
                payload(i, len).into(),
                Box::new(move |r| {
                    let _ = tx.send((i, r));
                }),
            ));
            expected.push(payload(i, len));
            // The first half waits for each commit; the second half queues up.
            if i < sizes.len() / 2 {
                let (j, r) = rx.recv_timeout(Duration::from_secs(10)).expect("done");
                assert_eq!(j, i);
                r.expect("durable");
            }
        }
        for _ in sizes.len() / 2..sizes.len() {
            let (_, r) = rx.recv_timeout(Duration::from_secs(10)).expect("done");
            r.expect("durable");
        }
        assert!(metrics.log.segments.get() > 2, "segments switched");
        // Segments taken from the spares after a switch are open the same way.
        assert_eq!(open_segments_direct(dir), vec![direct]);
        drop(log);
        drop(runner);
        let mut on_disk = Vec::new();
        recovery::scan(dir, u64::MAX, |_, _, payload| {
            on_disk.push(payload.to_vec());
            Ok(())
        })
        .expect("scan");
        assert_eq!(on_disk.len(), expected.len());
        for (i, (got, want)) in on_disk.iter().zip(&expected).enumerate() {
            assert!(got == want, "record {i} of {} bytes", want.len());
        }
    }

    /// Appends one record under a deferral guard, leads or drops the guard, and tells which
    /// thread committed the record.
    fn commit_one(log: &NodeLog, lead: bool) -> std::thread::ThreadId {
        let (tx, rx) = mpsc::channel();
        let deferred = log.defer_wakeups();
        log.append(page_set(
            9,
            bytes::Bytes::from_static(b"page set"),
            Box::new(move |r| {
                let _ = tx.send((std::thread::current().id(), r));
            }),
        ));
        if lead {
            deferred.lead();
        } else {
            drop(deferred);
        }
        let (committer, result) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the append completes");
        assert!(result.is_ok(), "{result:?}");
        committer
    }

    /// Who commits a deferred append: the appending thread when it leads on an idle log; the
    /// writer thread when the appender drops its guard instead, or leads while fsyncs are slow.
    #[test]
    fn a_deferred_append_is_committed_by_its_leader_or_else_by_the_writer_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_metrics, _runner, log) = started(dir.path(), 64 << 10);
        let here = std::thread::current().id();
        let append = |lead: bool| commit_one(&log, lead);

        // Leading, whatever this machine's disk is like. The writer thread takes the record
        // instead when it happens to be awake (starting, or its idle timer) between the append
        // and the lead, so this tries a few times; one commit on this thread shows it works.
        log.shared
            .lead_max_fsync_micros
            .store(u64::MAX, Ordering::Relaxed);
        let led = (0..20).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            append(true) == here
        });
        assert!(
            led,
            "a thread that leads on an idle log commits its own record"
        );

        log.shared
            .lead_max_fsync_micros
            .store(LEAD_MAX_FSYNC_MICROS, Ordering::Relaxed);
        assert_ne!(
            append(false),
            here,
            "a dropped guard leaves it to the writer thread"
        );
        log.shared
            .fsync_micros
            .store(LEAD_MAX_FSYNC_MICROS + 1, Ordering::Relaxed);
        assert_ne!(
            append(true),
            here,
            "on a slow disk the writer thread commits it"
        );
    }

    /// A thread leads only a batch of its own records: when another thread's record waits in
    /// the queue too (the node is busy), it leaves the commit to the writer thread, which
    /// commits both.
    #[test]
    fn a_thread_does_not_lead_while_records_of_other_threads_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_metrics, _runner, log) = start_leading(dir.path());
        let here = std::thread::current().id();
        // The writer thread's idle timer may commit the other thread's record before this
        // thread leads; that attempt shows nothing, and the test tries again.
        for _ in 0..5 {
            let (done_tx, done_rx) = mpsc::channel();
            // Another thread queues a record and holds its guard: nobody is woken for it.
            let (queued_tx, queued_rx) = mpsc::channel();
            let (release_tx, release_rx) = mpsc::channel::<()>();
            let other = std::thread::spawn({
                let log = log.clone();
                let done_tx = done_tx.clone();
                move || {
                    let deferred = log.defer_wakeups();
                    log.append(page_set(
                        1,
                        bytes::Bytes::from_static(b"the other thread's"),
                        Box::new(move |r| {
                            let _ = done_tx.send(("other", std::thread::current().id(), r));
                        }),
                    ));
                    let _ = queued_tx.send(());
                    let _ = release_rx.recv_timeout(Duration::from_secs(10));
                    drop(deferred);
                }
            });
            queued_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the other thread queued its record");
            let deferred = log.defer_wakeups();
            log.append(page_set(
                2,
                bytes::Bytes::from_static(b"this thread's"),
                Box::new(move |r| {
                    let _ = done_tx.send(("own", std::thread::current().id(), r));
                }),
            ));
            // Already committed: the timer got there first.
            let disturbed = done_rx.try_recv().is_ok();
            if disturbed {
                drop(deferred);
            } else {
                deferred.lead();
            }
            // The rest complete, by the writer thread, while the other thread still holds its
            // guard.
            let completions: Vec<_> = (0..2 - usize::from(disturbed))
                .map(|_| {
                    done_rx
                        .recv_timeout(Duration::from_secs(5))
                        .expect("both records complete")
                })
                .collect();
            let _ = release_tx.send(());
            other.join().expect("other thread");
            if disturbed {
                continue;
            }
            for (whose, committer, result) in completions {
                assert!(result.is_ok(), "{whose}: {result:?}");
                assert_ne!(committer, here, "{whose} record committed by the leader");
            }
            return;
        }
        panic!("the writer thread's timer took the other record in every attempt");
    }

    /// After commits that ended with records of others waiting (a busy node), a thread leaves
    /// even a lone record of its own to the writer thread; once commits end with nothing
    /// waiting again, it leads again.
    #[test]
    fn a_thread_does_not_lead_while_records_keep_arriving_during_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_metrics, _runner, log) = start_leading(dir.path());
        let here = std::thread::current().id();
        // Each append first lets the writer thread fall asleep: one still awake after the last
        // commit takes a record before its thread can lead (on a loaded machine, often).
        let append = |lead: bool| {
            std::thread::sleep(Duration::from_millis(5));
            commit_one(&log, lead)
        };
        // A chain of records, each appended by the completion of the one before: every commit
        // but the last ends with the next record waiting.
        fn chained(log: NodeLog, left: u8, done: mpsc::Sender<Result<u64, LogError>>) -> Append {
            page_set(
                left,
                bytes::Bytes::from_static(b"chained"),
                Box::new(move |r| {
                    if left == 0 || r.is_err() {
                        let _ = done.send(r);
                    } else {
                        log.append(chained(log.clone(), left - 1, done));
                    }
                }),
            )
        }
        let (done_tx, done_rx) = mpsc::channel();
        log.append(chained(log.clone(), 16, done_tx));
        let last = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the chain completes");
        assert!(last.is_ok(), "{last:?}");
        assert!(
            log.core.queue().busy_share > LEAD_MAX_BUSY_SHARE,
            "commits that end with records waiting mark the node busy"
        );
        assert_ne!(
            append(true),
            here,
            "on a busy node the writer thread commits even a lone record"
        );
        // Each commit that ends with nothing waiting lowers the share: within a few, the thread
        // leads.
        let led = (0..40).any(|_| append(true) == here);
        assert!(
            led,
            "once commits end with nothing waiting, a thread leads its own"
        );
    }

    /// The writer thread waits for more records only while records arrive fast, a few at a
    /// time: not for a lone writer, not after a pause, not once enough records or bytes are
    /// queued.
    #[test]
    fn a_commit_waits_for_more_records_only_while_they_arrive_fast() {
        let times = GatherTimes::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut g = Gathering::new(t0);
        assert_eq!(g.wait(1, 100, ms(0), times), None, "no rate known yet");
        // A lone writer: one record a millisecond (0.3 expected within the window).
        for i in 1..=50 {
            g.took(1, ms(i));
        }
        assert_eq!(
            g.wait(1, 100, ms(50), times),
            None,
            "a lone writer never waits"
        );
        // A busy node: ten records a millisecond.
        for i in 51..=100 {
            g.took(10, ms(i));
        }
        assert_eq!(g.wait(1, 100, ms(100), times), Some(GATHER_WINDOW));
        assert_eq!(
            g.wait(GATHER_RECORDS - 1, 100, ms(100), times),
            Some(GATHER_WINDOW)
        );
        assert_eq!(
            g.wait(GATHER_RECORDS, 100, ms(100), times),
            None,
            "enough records"
        );
        assert_eq!(
            g.wait(1, GATHER_BYTES, ms(100), times),
            None,
            "enough bytes"
        );
        assert_eq!(g.wait(0, 0, ms(100), times), None, "nothing to commit");
        assert_eq!(
            g.wait(1, 100, ms(100) + GATHER_IDLE, times),
            None,
            "after a pause the rate is stale"
        );
        // The rate follows the load down: a lone writer again soon stops waiting.
        for i in 0..40 {
            g.took(1, ms(200 + i));
        }
        assert_eq!(g.wait(1, 100, ms(240), times), None);
        // Few producers: a wait that ends short of the count disarms the rule, however fast the
        // records come; a commit that takes GATHER_REARM records by itself arms it again.
        for i in 0..50 {
            g.took(10, ms(300 + i));
        }
        assert_eq!(g.wait(1, 100, ms(350), times), Some(GATHER_WINDOW));
        g.gathered(false);
        g.took(GATHER_RECORDS - 1, ms(351));
        assert_eq!(
            g.wait(1, 100, ms(351), times),
            None,
            "the last wait came up short"
        );
        g.took(GATHER_REARM - 1, ms(352));
        assert_eq!(
            g.wait(1, 100, ms(352), times),
            None,
            "no commit has taken enough records since"
        );
        g.took(GATHER_REARM, ms(353));
        assert_eq!(
            g.wait(1, 100, ms(353), times),
            Some(GATHER_WINDOW),
            "armed again"
        );
        g.gathered(true);
        assert_eq!(
            g.wait(1, 100, ms(353), times),
            Some(GATHER_WINDOW),
            "a wait that reached its count keeps the rule armed"
        );
    }

    /// On a busy log a lone record waits for company: the writer thread commits it together
    /// with the next ones, with one fsync, as soon as enough have arrived, and commits a record
    /// for which no company comes once the window has passed.
    #[test]
    fn a_busy_log_gathers_records_into_one_commit_and_never_holds_one_past_the_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (metrics, runner, log) = started(dir.path(), 1 << 20);
        let window = Duration::from_secs(1);
        log.core.queue().gather_times = GatherTimes {
            window,
            idle: Duration::from_secs(60),
            lazy: LAZY_COMMIT_DELAY,
        };
        let (tx, rx) = mpsc::channel::<Result<u64, LogError>>();
        let append_payload = |n: u8, payload: bytes::Bytes| {
            let tx = tx.clone();
            log.append(page_set(
                n,
                payload,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            ));
        };
        let append = |n: u8| append_payload(n, bytes::Bytes::from_static(b"record"));
        let wait_for = |n: usize, within: Duration| {
            for _ in 0..n {
                let r = rx.recv_timeout(within).expect("record committed");
                assert!(r.is_ok(), "{r:?}");
            }
        };
        // `n` records commit well before the window ends, all with one fsync.
        let committed_together = |n: usize, since: Instant, fsyncs: u64, why: &str| {
            wait_for(n, Duration::from_secs(10));
            assert!(since.elapsed() < window / 2, "{why}");
            assert_eq!(
                metrics.log.fsyncs.get(),
                fsyncs + 1,
                "one fsync for the {n}"
            );
        };
        // Records appended in fours: the writer thread learns that they arrive fast.
        for round in 0..8 {
            for n in 0..GATHER_RECORDS as u8 {
                append(round * 8 + n);
            }
            wait_for(GATHER_RECORDS, Duration::from_secs(10));
        }
        let fsyncs = metrics.log.fsyncs.get();
        append(100);
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a lone record on a busy log waits for company"
        );
        for n in 1..GATHER_RECORDS as u8 {
            append(100 + n);
        }
        committed_together(
            GATHER_RECORDS,
            Instant::now(),
            fsyncs,
            "the writer thread commits once enough records are queued, not at the window's end",
        );
        // A big record fills a commit by itself: it ends a lone record's wait at once.
        let fsyncs = metrics.log.fsyncs.get();
        append(104);
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the lone record waits for company again"
        );
        let big = Instant::now();
        append_payload(105, bytes::Bytes::from(vec![7u8; GATHER_BYTES]));
        committed_together(2, big, fsyncs, "a big record ends the wait, not the window");
        let lone = Instant::now();
        append(110);
        wait_for(1, Duration::from_secs(10));
        assert!(
            lone.elapsed() >= window / 2,
            "still busy: the lone record waited for company"
        );
        // None came: the next lone record does not wait (three clients writing in a loop would
        // otherwise wait out every window).
        let next = Instant::now();
        append(111);
        wait_for(1, Duration::from_secs(10));
        assert!(
            next.elapsed() < window / 2,
            "a wait that came up short disarms gathering"
        );
        drop(log);
        drop(runner);
    }

    /// A lazy record waits for a commit that something else starts — an urgent record, or an
    /// urge — or else for its delay; a thread leads a commit of lazy records only once urged.
    #[test]
    fn lazy_records_wait_for_an_urgent_commit_or_their_delay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (metrics, runner, log) = started(dir.path(), 1 << 20);
        let delay = Duration::from_secs(1);
        log.set_lazy_delay(delay);
        log.shared
            .lead_max_fsync_micros
            .store(u64::MAX, Ordering::Relaxed);
        let here = std::thread::current().id();
        let (tx, rx) = mpsc::channel();
        let append = |n: u8, lazy: bool| {
            let tx = tx.clone();
            log.append(Append {
                lazy,
                ..page_set(
                    n,
                    bytes::Bytes::from_static(b"page set"),
                    Box::new(move |r| {
                        let _ = tx.send((n, std::thread::current().id(), r));
                    }),
                )
            });
        };
        let committed = |n: u8| {
            let (got, committer, r) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the record commits");
            assert!(r.is_ok(), "{r:?}");
            assert_eq!(got, n, "records commit in order");
            committer
        };

        let alone = Instant::now();
        append(1, true);
        assert!(
            rx.recv_timeout(delay / 4).is_err(),
            "a lone lazy record waits"
        );
        committed(1);
        assert!(alone.elapsed() >= delay / 2, "it waited out its delay");

        let fsyncs = metrics.log.fsyncs.get();
        let started = Instant::now();
        append(2, true);
        append(3, false);
        committed(2);
        committed(3);
        assert!(
            started.elapsed() < delay / 2,
            "an urgent record's commit takes the lazy one along"
        );
        assert_eq!(metrics.log.fsyncs.get(), fsyncs + 1, "in one fsync");

        let started = Instant::now();
        append(4, true);
        log.urge();
        committed(4);
        assert!(started.elapsed() < delay / 2, "an urge commits it at once");

        // As a follower's reading thread: lazy records and an urge under its guard, then it
        // leads. Without the urge, the guard leaves the records to wait out their delay.
        let deferred = log.defer_wakeups();
        append(5, true);
        deferred.lead();
        assert!(
            rx.recv_timeout(delay / 4).is_err(),
            "a thread does not lead lazy records"
        );
        committed(5);
        // The writer thread may be awake (its idle timer) between the append and the lead, so
        // this tries a few times; one commit on this thread shows that an urged thread leads.
        let led = (6..26).any(|n| {
            std::thread::sleep(Duration::from_millis(5));
            let deferred = log.defer_wakeups();
            append(n, true);
            log.urge();
            deferred.lead();
            committed(n) == here
        });
        assert!(led, "an urged thread leads the commit of its lazy records");
        drop(log);
        drop(runner);
    }
}
