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

use super::record::{ObjectKey, RecordKind, decode_checkpoint};
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
pub struct Append {
    pub kind: RecordKind,
    pub object: ObjectKey,
    /// The object's reset generation: once a record of generation `g` failed, records of
    /// generations `<= g` are refused, so nothing that built on a lost commit is ever logged.
    pub generation: u64,
    pub payload: Vec<u8>,
    pub done: Completion,
}

enum Msg {
    Append(Append),
    /// Completes when everything submitted before it is durable.
    Barrier(Completion),
    /// Records a failure of an object's generation (when a commit could not even be submitted).
    Fence(ObjectKey, u64),
}

/// State shared between the writer thread and the rest of the node.
#[derive(Default)]
pub struct LogShared {
    durable_lsn: AtomicU64,
    /// Objects holding back the oldest segment (not yet checkpointed past their records in it).
    blockers: Mutex<Vec<ObjectKey>>,
    live_segments: AtomicU64,
}

impl LogShared {
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

    /// Refuses all further records of `object` with generation `<= generation`.
    pub fn fence(&self, object: ObjectKey, generation: u64) {
        let _ = self.tx.send(Msg::Fence(object, generation));
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
    fenced: HashMap<ObjectKey, u64>,
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
    generation: u64,
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
                Msg::Fence(object, generation) => {
                    self.fence_object(&object, generation);
                    continue;
                }
                Msg::Append(a) => a,
            };
            let refused = match &failure {
                Some(e) => Some(e.clone()),
                None => self
                    .fenced
                    .get(&a.object)
                    .is_some_and(|&min| a.generation < min)
                    .then_some(LogError::Fenced),
            };
            if let Some(err) = refused {
                self.fence_object(&a.object, a.generation);
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
                let sealed = self
                    .flush(buf_offset, &mut unflushed, &mut pending)
                    .and_then(|()| self.switch_segment(size));
                if let Err(e) = sealed {
                    tracing::error!(error = %e, "cannot move to a new log segment");
                    failure = Some(LogError::from_io(&e));
                    self.fail_unflushed(&mut unflushed, &mut pending, failure.clone());
                    self.fence_object(&a.object, a.generation);
                    pending.push(Pending {
                        done: a.done,
                        result: Err(failure.clone().unwrap_or(LogError::Closed)),
                    });
                    continue;
                }
                buf_offset = self.offset;
            }
            let lsn = self.current().start + self.offset;
            encode_record(&mut self.buf, lsn, a.kind, &a.payload);
            self.offset += size;
            let marker = match a.kind {
                RecordKind::Checkpoint => decode_checkpoint(&a.payload).ok(),
                _ => None,
            };
            unflushed.push(Unflushed {
                pending: pending.len(),
                object: a.object,
                generation: a.generation,
                lsn,
                kind: a.kind,
                marker,
            });
            pending.push(Pending {
                done: a.done,
                result: Ok(lsn),
            });
        }

        if failure.is_none()
            && let Err(e) = self.flush(buf_offset, &mut unflushed, &mut pending)
        {
            tracing::error!(error = %e, "node log write failed");
            self.fail_unflushed(&mut unflushed, &mut pending, Some(LogError::from_io(&e)));
            // Nothing of the failed write counts; the next batch overwrites the same bytes.
            self.offset = buf_offset;
        }
        for p in pending {
            (p.done)(p.result);
        }
    }

    /// Fails every record still in the buffer and fences its object's generation.
    fn fail_unflushed(
        &mut self,
        unflushed: &mut Vec<Unflushed>,
        pending: &mut [Pending],
        err: Option<LogError>,
    ) {
        let err = err.unwrap_or(LogError::Closed);
        for u in unflushed.drain(..) {
            self.fence_object(&u.object, u.generation);
            pending[u.pending].result = Err(err.clone());
        }
        self.buf.clear();
    }

    /// Marks `object` as failed at `generation`: later records of that generation are refused.
    fn fence_object(&mut self, object: &ObjectKey, generation: u64) {
        let e = self.fenced.entry(object.clone()).or_insert(0);
        *e = (*e).max(generation + 1);
    }

    /// Writes the buffered records at `at` (offset in the current segment), fdatasyncs, and
    /// settles them: their objects are recorded against the current segment, their checkpoint
    /// markers take effect.
    fn flush(
        &mut self,
        at: u64,
        unflushed: &mut Vec<Unflushed>,
        pending: &mut [Pending],
    ) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.buf, at)?;
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages while reporting
            // them clean; nothing written since the last good fsync can be trusted. Stop, and
            // let recovery replay what is known durable (the policy PostgreSQL adopted).
            tracing::error!(error = %e, "fdatasync of the node log failed; aborting to recover from the durable log");
            std::process::abort();
        }
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
        Ok(())
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
        self.segments.len() > 1
            && self.segments.front().is_some_and(|s| {
                s.objects
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
