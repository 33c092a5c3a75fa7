//! The node log: one append-only, group-committed log for the commits of every object on the node.
//!
//! Object databases run with `synchronous=OFF`; this log is their durability point. A dedicated
//! writer thread takes every record that arrived while the previous fsync ran, writes them with
//! one `pwrite` and makes them durable with one `fdatasync` — so the cost of an fsync is shared by
//! all commits waiting for it, whichever objects they belong to.
//!
//! A segment is retired (recycled as a spare) once every object with a record in it has
//! checkpointed past that record; the writer publishes which objects hold the oldest segment back
//! so the node can checkpoint them.

use super::record::{ObjectKey, RecordKind, SlotKey, decode_checkpoint};
use super::segments::{self, encode_record, record_size};
use crate::metrics::LogMetrics;
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
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
}

impl Default for LogShared {
    fn default() -> Self {
        LogShared {
            durable_lsn: AtomicU64::new(0),
            healthy: std::sync::atomic::AtomicBool::new(true),
            retire_limit: AtomicU64::new(0),
            blockers: Mutex::new(Vec::new()),
            live_segments: AtomicU64::new(0),
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

/// The handle the node uses to append. Cheap to clone.
#[derive(Clone)]
pub struct NodeLog {
    tx: Sender<Msg>,
    shared: Arc<LogShared>,
}

impl NodeLog {
    pub fn append(&self, append: Append) {
        if let Err(mpsc::SendError(Msg::Append(a))) = self.tx.send(Msg::Append(append)) {
            (a.done)(Err(LogError::Closed));
        }
    }

    pub fn barrier(&self, done: Completion) {
        if let Err(mpsc::SendError(Msg::Barrier(d))) = self.tx.send(Msg::Barrier(done)) {
            d(Err(LogError::Closed));
        }
    }

    /// Refuses all further entries of the slot with generation `<= fence.generation`.
    pub fn fence(&self, fence: Fence) {
        let _ = self.tx.send(Msg::Fence(fence));
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
        // The writer exits when every sender is gone; handles held elsewhere may outlive us, in
        // which case the thread is detached and ends with the process.
        if let Some(p) = self.preparer.take() {
            let _ = p.join();
        }
        drop(self.writer.take());
    }
}

/// Keeps one preallocated spare segment ready so switching segments never waits for zero-fill.
struct Spares {
    dir: PathBuf,
    segment_bytes: u64,
    ready: Mutex<Vec<PathBuf>>,
    wake: Condvar,
    stopping: std::sync::atomic::AtomicBool,
    next: AtomicU64,
}

const SPARES_KEPT: usize = 2;

impl Spares {
    fn take(&self) -> Option<PathBuf> {
        let taken = self.ready.lock().ok()?.pop();
        self.wake.notify_all();
        taken
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
        fs::rename(path, &spare)?;
        ready.push(spare);
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
                match segments::preallocate(&path, self.segment_bytes) {
                    Ok(()) => {
                        if let Ok(mut r) = self.ready.lock() {
                            r.push(path);
                        }
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot prepare a spare log segment; retrying");
                        let _ = fs::remove_file(path.with_extension("tmp"));
                        std::thread::sleep(backoff);
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
    buf: Vec<u8>,
    last_blocker_scan: Instant,
}

const MAX_BATCH_BYTES: usize = 16 << 20;

/// Starts the log with an empty segment at `start_lsn` (the end of whatever was replayed).
pub fn start(
    dir: &Path,
    segment_bytes: u64,
    start_lsn: u64,
    metrics: LogMetrics,
) -> io::Result<LogRunner> {
    fs::create_dir_all(dir)?;
    let spares = Arc::new(Spares {
        dir: dir.to_path_buf(),
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
            if let Ok(mut r) = spares.ready.lock() {
                r.push(path.clone());
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
    let (tx, rx) = mpsc::channel();
    let mut writer = Writer {
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
        buf: Vec::with_capacity(1 << 20),
        last_blocker_scan: Instant::now(),
    };
    let writer_thread = std::thread::Builder::new()
        .name("colony-log".into())
        .spawn(move || writer.run(rx))?;
    let preparer_spares = spares.clone();
    let preparer = std::thread::Builder::new()
        .name("colony-log-spares".into())
        .spawn(move || preparer_spares.run())?;
    Ok(LogRunner {
        log: Some(NodeLog { tx, shared }),
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
        Some(spare) => {
            fs::rename(&spare, path)?;
            segments::sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        }
        None => segments::preallocate(path, len)?,
    }
    OpenOptions::new().read(true).write(true).open(path)
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
    fn run(&mut self, rx: Receiver<Msg>) {
        let mut batch: Vec<Msg> = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(first) => batch.push(first),
                Err(RecvTimeoutError::Timeout) => {
                    self.reclaim();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let mut bytes = 0usize;
            while bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) => {
                        if let Msg::Append(a) = &m {
                            bytes += a.payload.len();
                        }
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
            self.reclaim();
        }
    }

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
        self.buf.clear();
        let mut buf_offset = self.offset;

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
            encode_record(&mut self.buf, lsn, a.kind, &a.payload);
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
        if self.buf.is_empty() {
            return;
        }
        if let Err(e) = self.file.write_all_at(&self.buf, at) {
            tracing::error!(error = %e, "write to the node log failed; aborting to recover from the durable log");
            std::process::abort();
        }
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            tracing::error!(error = %e, "fdatasync of the node log failed; aborting to recover from the durable log");
            std::process::abort();
        }
        self.shared.healthy.store(true, Ordering::Release);
        self.metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.fsyncs.inc();
        self.metrics.bytes.inc_by(self.buf.len() as u64);
        self.metrics
            .records_per_fsync
            .observe(unflushed.len() as f64);
        self.buf.clear();
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
        let len = self.segment_bytes.max(record);
        let path = segments::segment_path(&self.dir, start);
        self.file = open_segment(&self.spares, &path, len)?;
        self.segments.push_back(Segment {
            start,
            len,
            path,
            objects: HashMap::new(),
        });
        self.offset = 0;
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
