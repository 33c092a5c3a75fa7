//! Followers keep their copy of each object's database current by writing the pages of every
//! entry straight into the database file — no SQLite involved, the same way recovery does.
//!
//! One thread applies entries in order. A followed object's pages are held in memory and written
//! out every few seconds ([`WRITE_OUT_EVERY`]), so a page that many entries change is written
//! once rather than once per entry; before that, when the held pages pass [`WRITE_OUT_BYTES`];
//! and at once when the slot stops being followed (a promotion waits for its entries to be in the
//! files). The slots take turns ([`WRITE_OUT_ROUNDS`] per period), so a few files at a time are
//! written and synced, not every followed file at once: such a burst of file syncs, on a disk
//! shared with the node log, held back the log's own syncs, and with them the acknowledgements
//! of the writes that arrived meanwhile. The written files are then made durable by the
//! [`checkpointer`](super::checkpointer), which logs checkpoint markers for them so the node log
//! can retire the segments holding their entries. Directories whose entries it changes (files
//! created or removed) go into the node's [`PendingDirs`], synced before any checkpoint marker.

use super::checkpointer::{Checkpointer, DbFile, Durable};
use super::slot::{Role, Slot};
use crate::lsn::Lsn;
use crate::namespace::Namespace;
use crate::storage::dirs::PendingDirs;
use crate::storage::log::NodeLog;
use crate::storage::record::{Checkpoint, Entry, ObjectKey, PageSetView, RecordKind, SlotKey};
use crate::storage::recovery::{discard_wal, remove_database_files, replay_object};
use crate::storage::sync_failures::SyncFailures;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

enum Job {
    Apply {
        slot: Arc<Slot>,
        entry: Arc<Entry>,
        log_lsn: u64,
        floor: Option<Lsn>,
    },
    /// Write every held page now (a slot is being promoted).
    WriteOut,
    /// Make everything applied so far durable (and checkpointed), then answer.
    Flush(Sender<()>),
}

#[derive(Clone)]
pub struct Applier {
    tx: Sender<Job>,
    /// The node's directories with changed entries: the applier's and its serving objects'.
    new_dirs: Arc<PendingDirs>,
    /// The node's objects whose file failed to sync, for the same two.
    sync_failures: Arc<SyncFailures>,
    /// Makes the serving objects' checkpointed files durable and logs their markers.
    object_markers: Arc<Checkpointer>,
}

/// How long pages are held before they are written and made durable. Longer holds write a hot
/// page less often and sync fewer files, but keep more of the node log (its segments are retired
/// once the markers are logged) and leave more to replay after a crash. In the cluster benchmark
/// 3 s gave a lower replicated p99 than 1 s, and 0.3 s a higher one.
pub const WRITE_OUT_EVERY: Duration = Duration::from_secs(3);
/// Held pages past this many bytes are written out early.
pub const WRITE_OUT_BYTES: usize = 32 << 20;
/// The turns a write-out period is cut into: each slot is written out in one of them (see
/// [`round_of`]), one turn every `WRITE_OUT_EVERY / WRITE_OUT_ROUNDS`.
pub const WRITE_OUT_ROUNDS: u32 = 30;
/// After a busy stretch the applier pauses this long before looking for more work, so entries
/// arriving at thousands per second are applied in batches rather than each waking the thread
/// (wake-ups were a visible share of a follower's CPU). Promotion waits at most this much more.
const APPLY_PAUSE: Duration = Duration::from_millis(10);
/// One turn of the write-out.
const ROUND: Duration =
    Duration::from_millis(WRITE_OUT_EVERY.as_millis() as u64 / WRITE_OUT_ROUNDS as u64);

/// The turn in which `slot` is written out: the slots a node follows are spread evenly over the
/// turns (slot numbers are consecutive; the colo shifts them so colos do not share turns).
fn round_of(slot: &SlotKey) -> u32 {
    let colo = slot
        .colo
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    colo.wrapping_add(slot.slot) % WRITE_OUT_ROUNDS
}

impl Applier {
    /// `log` writes to `log_dir` (read back to rebuild a file that failed to sync); `sync_failed`
    /// counts the node's objects whose file failed to sync.
    pub fn start(
        objects_dir: PathBuf,
        namespaces: Arc<HashMap<String, Arc<Namespace>>>,
        log: NodeLog,
        log_dir: PathBuf,
        sync_failed: prometheus_client::metrics::gauge::Gauge,
    ) -> std::io::Result<Applier> {
        let (tx, rx) = mpsc::channel();
        let new_dirs = Arc::new(PendingDirs::default());
        let sync_failures = Arc::new(SyncFailures::new(sync_failed));
        let object_markers = Arc::new(Checkpointer::start(
            "colony-markers",
            log.clone(),
            new_dirs.clone(),
            sync_failures.clone(),
        )?);
        let mut worker = Worker::new(
            objects_dir,
            namespaces,
            log,
            log_dir,
            new_dirs.clone(),
            sync_failures.clone(),
        )?;
        std::thread::Builder::new()
            .name("colony-applier".into())
            .spawn(move || worker.run(rx))?;
        Ok(Applier {
            tx,
            new_dirs,
            sync_failures,
            object_markers,
        })
    }

    /// Where a serving object submits a checkpointed file and its marker: the marker is logged
    /// once the file and the node's pending directories are durable.
    pub fn object_markers(&self) -> &Arc<Checkpointer> {
        &self.object_markers
    }

    /// Directories whose entries changed and are not yet durable, for the whole node: both
    /// checkpointers sync them before they log a marker.
    pub fn new_dirs(&self) -> &Arc<PendingDirs> {
        &self.new_dirs
    }

    /// Objects whose database file failed to sync, for the whole node: neither checkpointer logs
    /// a marker for one until it is rebuilt.
    pub fn sync_failures(&self) -> &Arc<SyncFailures> {
        &self.sync_failures
    }

    pub fn apply(&self, slot: Arc<Slot>, entry: Arc<Entry>, log_lsn: u64, floor: Option<Lsn>) {
        let _ = self.tx.send(Job::Apply {
            slot,
            entry,
            log_lsn,
            floor,
        });
    }

    /// Asks for every held page to be written now, without waiting: a promoted slot counts its
    /// entries as applied only once they are in the files.
    pub fn write_out(&self) {
        let _ = self.tx.send(Job::WriteOut);
    }

    /// Blocks until everything queued so far is applied and durable.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

struct Worker {
    objects_dir: PathBuf,
    log_dir: PathBuf,
    namespaces: Arc<HashMap<String, Arc<Namespace>>>,
    checkpointer: Checkpointer,
    /// Pages applied but not yet written, per object.
    held: HashMap<ObjectKey, HeldPages>,
    held_bytes: usize,
    /// Slots with entries not yet written: the newest such entry's position, noted as applied
    /// once it is in the files.
    unwritten: HashMap<SlotKey, (Arc<Slot>, Lsn)>,
    /// Objects changed since the last write-out: log position and slot position of their last
    /// entry (what their checkpoint marker will say once the file is durable).
    dirty: HashMap<ObjectKey, (u64, Lsn)>,
    /// The objects with held pages or a marker to log, by the slot of their entries: what the
    /// slot's turn writes out.
    by_slot: HashMap<SlotKey, HashSet<ObjectKey>>,
    /// Directories whose entries changed and are not yet durable (files created or removed).
    new_dirs: Arc<PendingDirs>,
    sync_failures: Arc<SyncFailures>,
    /// The next turn, and when it is due.
    round: u32,
    next_round: Instant,
}

impl Worker {
    fn new(
        objects_dir: PathBuf,
        namespaces: Arc<HashMap<String, Arc<Namespace>>>,
        log: NodeLog,
        log_dir: PathBuf,
        new_dirs: Arc<PendingDirs>,
        sync_failures: Arc<SyncFailures>,
    ) -> std::io::Result<Worker> {
        Ok(Worker {
            objects_dir,
            log_dir,
            namespaces,
            checkpointer: Checkpointer::start(
                "colony-checkpoint",
                log,
                new_dirs.clone(),
                sync_failures.clone(),
            )?,
            held: HashMap::new(),
            held_bytes: 0,
            unwritten: HashMap::new(),
            dirty: HashMap::new(),
            new_dirs,
            sync_failures,
            by_slot: HashMap::new(),
            round: 0,
            next_round: Instant::now() + ROUND,
        })
    }

    fn run(&mut self, rx: Receiver<Job>) {
        let mut worked = false;
        loop {
            let next = match rx.try_recv() {
                Ok(job) => Ok(job),
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) if worked => {
                    worked = false;
                    std::thread::sleep(APPLY_PAUSE);
                    continue;
                }
                Err(TryRecvError::Empty) if self.by_slot.is_empty() => {
                    let job = rx.recv().map_err(|_| RecvTimeoutError::Disconnected);
                    // Idle until now: the turns start again from here.
                    self.next_round = Instant::now() + ROUND;
                    job
                }
                Err(TryRecvError::Empty) => {
                    rx.recv_timeout(self.next_round.saturating_duration_since(Instant::now()))
                }
            };
            match next {
                Ok(Job::Apply {
                    slot,
                    entry,
                    log_lsn,
                    floor,
                }) => {
                    let lsn = entry.lsn();
                    self.take_entry(&slot.key, &entry, log_lsn, floor);
                    // Anything but a follower (a recovering owner catching up) needs its entries
                    // in the files now.
                    let followed = matches!(slot.role(), Role::Follower { .. });
                    let e = self
                        .unwritten
                        .entry(slot.key.clone())
                        .or_insert((slot, lsn));
                    e.1 = e.1.max(lsn);
                    if !followed || self.held_bytes > WRITE_OUT_BYTES {
                        self.retrying(Worker::write_held);
                    }
                    worked = true;
                }
                Ok(Job::WriteOut) => self.retrying(Worker::write_held),
                Ok(Job::Flush(done)) => {
                    self.write_out(Some(done));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.write_out(None);
                    self.checkpointer.stop();
                    return;
                }
            }
            self.take_turns();
        }
    }

    /// Writes out the slots whose turn has come: after a stall (a disk that kept refusing) every
    /// turn missed, so a whole period behind means every slot.
    fn take_turns(&mut self) {
        if self.by_slot.is_empty() {
            return;
        }
        let now = Instant::now();
        while now >= self.next_round {
            let round = self.round;
            let due: Vec<SlotKey> = self
                .by_slot
                .keys()
                .filter(|k| round_of(k) == round)
                .cloned()
                .collect();
            if !due.is_empty() {
                self.write_out_slots(&due);
            }
            self.round = (self.round + 1) % WRITE_OUT_ROUNDS;
            self.next_round += ROUND;
        }
    }

    /// Writes the held pages of `slots`' objects, then hands their files to the checkpointer.
    fn write_out_slots(&mut self, slots: &[SlotKey]) {
        self.retrying(|w| w.write_pages(Some(slots)));
        let mut files = Vec::new();
        for key in slots {
            for object in self.by_slot.remove(key).unwrap_or_default() {
                if let Some(file) = self.marker_of(object) {
                    files.push(file);
                }
            }
        }
        self.checkpointer.submit(Durable { files, done: None });
    }

    /// The file to make durable for `object`'s marker, if it has one to log.
    fn marker_of(&mut self, object: ObjectKey) -> Option<(DbFile, Checkpoint)> {
        let (upto, slot_lsn) = self.dirty.remove(&object)?;
        let path = self.path_of(&object);
        Some((
            DbFile::Path(path),
            Checkpoint {
                object,
                upto,
                slot_lsn,
            },
        ))
    }

    /// Runs `step` until it succeeds: applied entries cannot be skipped, so a failing disk stops
    /// the applier (and, through the slots' applied positions, promotions) until it recovers.
    fn retrying(&mut self, mut step: impl FnMut(&mut Worker) -> std::io::Result<()>) {
        let mut backoff = Duration::from_millis(50);
        while let Err(e) = step(self) {
            tracing::error!(error = %e, "cannot write followed entries to their database files; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Writes every held page, then hands every file written since its slot's last turn to the
    /// checkpointer (`done` answers once they are durable).
    fn write_out(&mut self, done: Option<Sender<()>>) {
        self.retrying(Worker::write_held);
        self.by_slot.clear();
        let objects: Vec<ObjectKey> = self.dirty.keys().cloned().collect();
        let files = objects
            .into_iter()
            .filter_map(|object| self.marker_of(object))
            .collect();
        self.checkpointer.submit(Durable { files, done });
    }

    /// Takes an entry into the held pages, unless a snapshot sync's `floor` covers it. The entry
    /// is durable in the log, but the file must hold it before the slot counts it as applied (a
    /// promotion waits for that): retries until the disk takes it — later entries wait in line.
    fn take_entry(&mut self, slot: &SlotKey, entry: &Entry, log_lsn: u64, floor: Option<Lsn>) {
        let object = entry.object();
        if self.sync_failures.is_marked(&object) {
            self.repair(&object, log_lsn, floor);
        }
        match floor {
            Some(f) if entry.lsn() <= f => self.mark_covered(object.clone(), log_lsn, f),
            _ => self.retrying(|w| w.apply(entry, log_lsn)),
        }
        match self.by_slot.get_mut(slot) {
            Some(objects) => {
                objects.insert(object);
            }
            None => {
                self.by_slot.insert(slot.clone(), HashSet::from([object]));
            }
        }
    }

    /// Notes an entry the installed snapshot file already holds (up to slot position `floor`) for
    /// the next write-out's marker. The snapshot's own marker comes before this entry's record in
    /// the log, and the node log retires its oldest segment first: without a marker past the
    /// record, an object that took no later entry would keep that segment, and every newer one,
    /// until a restart or a promotion.
    fn mark_covered(&mut self, object: ObjectKey, log_lsn: u64, floor: Lsn) {
        let marker = self.dirty.entry(object).or_insert((log_lsn, floor));
        marker.0 = marker.0.max(log_lsn);
        marker.1 = marker.1.max(floor);
    }

    /// Rebuilds a followed object's file that failed to sync from the node log: every record of
    /// it below `log_lsn`, the entry about to be taken (entries are taken in log order, so these
    /// are all it has taken), so its markers can resume. Pages held for it belong to entries
    /// the replay includes; their write-out rewrites the same content. On failure it stays
    /// marked and the next entry tries again.
    fn repair(&mut self, key: &ObjectKey, log_lsn: u64, floor: Option<Lsn>) {
        let path = self.path_of(key);
        let log_dir = &self.log_dir;
        let rebuilt = self.sync_failures.repair(key, || {
            // A `-wal` left from an ownership would be replayed over the file at the next open.
            discard_wal(&path)?;
            replay_object(log_dir, key, &path, log_lsn, floor).map(|_| ())
        });
        // The replay may have created the file: its name must be durable before a marker.
        if let (Ok(true), Some(dir)) = (&rebuilt, path.parent()) {
            self.new_dirs.add([dir.to_path_buf()]);
        }
        if let Err(e) = rebuilt {
            tracing::error!(object = %key, error = %e, "cannot rebuild a followed database from the node log; retrying at its next entry");
        }
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        crate::object::db_path(&self.objects_dir, key)
    }

    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(name).cloned()
    }

    /// Takes an entry into the held pages (a delete is carried out at once).
    fn apply(&mut self, entry: &Entry, log_lsn: u64) -> std::io::Result<()> {
        let key = entry.object();
        match entry.kind {
            RecordKind::Delete => {
                if let Some(h) = self.held.remove(&key) {
                    self.held_bytes -= h.bytes();
                }
                let path = self.path_of(&key);
                remove_database_files(&path)?;
                self.sync_failures.forget(&key);
                // No directory: the object never had a file here (see `Actor::delete_all`).
                if let Some(dir) = path.parent().filter(|d| d.is_dir()) {
                    self.new_dirs.add([dir.to_path_buf()]);
                }
                if let Some(ns) = self.namespace(&key.namespace) {
                    ns.mark_empty(&key.id);
                }
            }
            RecordKind::PageSet => {
                let view = entry
                    .page_set()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                let held = self.held.entry(key.clone()).or_default();
                let before = held.bytes();
                held.take(&view);
                self.held_bytes = self.held_bytes - before + held.bytes();
                if let Some(ns) = self.namespace(&key.namespace) {
                    ns.mark_has_data(key.id);
                }
            }
            RecordKind::Checkpoint => return Ok(()),
        }
        self.dirty.insert(key, (log_lsn, entry.lsn()));
        Ok(())
    }

    /// Writes every held page into its database file and notes the slots' entries as applied.
    /// An object whose file cannot be written keeps its pages (the caller retries).
    fn write_held(&mut self) -> std::io::Result<()> {
        self.write_pages(None)
    }

    /// Writes the held pages of `slots`' objects (of every object: `None`) into their database
    /// files and notes those slots' entries as applied. An object whose file cannot be written
    /// keeps its pages (the caller retries).
    fn write_pages(&mut self, slots: Option<&[SlotKey]>) -> std::io::Result<()> {
        let keys: Vec<ObjectKey> = match slots {
            None => self.held.keys().cloned().collect(),
            Some(slots) => slots
                .iter()
                .filter_map(|s| self.by_slot.get(s))
                .flatten()
                .filter(|o| self.held.contains_key(*o))
                .cloned()
                .collect(),
        };
        for key in keys {
            let path = self.path_of(&key);
            if let Some(dir) = path.parent() {
                // The directories made for it; its own gains the file, noted below.
                self.new_dirs
                    .add(crate::storage::dirs::create_dir_all_noting(dir)?);
            }
            let existed = path.exists();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            if !existed && let Some(dir) = path.parent() {
                self.new_dirs.add([dir.to_path_buf()]);
            }
            if let Some(held) = self.held.get(&key) {
                held.write_to(&file)?;
            }
            if let Some(h) = self.held.remove(&key) {
                self.held_bytes -= h.bytes();
            }
        }
        match slots {
            None => {
                for (_, (slot, lsn)) in self.unwritten.drain() {
                    slot.note_applied(lsn);
                }
            }
            Some(slots) => {
                for key in slots {
                    if let Some((slot, lsn)) = self.unwritten.remove(key) {
                        slot.note_applied(lsn);
                    }
                }
            }
        }
        Ok(())
    }
}

/// One object's pages applied since they were last written: the newest image of each page, and
/// the database's size. Writing them reproduces exactly what writing each entry in turn would.
#[derive(Default)]
pub struct HeldPages {
    page_size: u64,
    pages: BTreeMap<u32, Vec<u8>>,
    /// Database size in pages after the newest entry.
    db_pages: u32,
    /// The smallest size an entry left the database at since the last write: the file is cut
    /// there first, so pages past it that no later entry wrote read as zeros, as they would
    /// after writing entry by entry.
    smallest: Option<u32>,
}

impl HeldPages {
    pub fn take(&mut self, view: &PageSetView<'_>) {
        self.page_size = u64::from(view.header.page_size);
        let size = view.header.db_pages;
        if self.smallest.is_none_or(|s| size < s) {
            // Cut here: pages past it held from earlier entries are gone.
            self.smallest = Some(size);
            self.pages.retain(|pgno, _| *pgno <= size);
        }
        self.db_pages = size;
        for (pgno, page) in view.pages() {
            match self.pages.get_mut(&pgno) {
                Some(held) if held.len() == page.len() => held.copy_from_slice(page),
                _ => {
                    self.pages.insert(pgno, page.to_vec());
                }
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.pages.len() * self.page_size as usize
    }

    pub fn write_to(&self, file: &File) -> std::io::Result<()> {
        let len = file.metadata()?.len();
        if let Some(s) = self.smallest {
            let cut = u64::from(s) * self.page_size;
            if cut < len {
                file.set_len(cut)?;
            }
        }
        for (pgno, page) in &self.pages {
            file.write_all_at(page, u64::from(pgno - 1) * self.page_size)?;
        }
        let want = u64::from(self.db_pages) * self.page_size;
        if file.metadata()?.len() != want {
            file.set_len(want)?;
        }
        Ok(())
    }
}

/// Writes one entry's pages the plain way (what [`HeldPages`] must match).
#[cfg(test)]
fn write_entry(file: &File, view: &PageSetView<'_>) -> std::io::Result<()> {
    let size = u64::from(view.header.page_size);
    for (pgno, page) in view.pages() {
        file.write_all_at(page, u64::from(pgno - 1) * size)?;
    }
    file.set_len(u64::from(view.header.db_pages) * size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;
    use crate::storage::record::{PageSetBuilder, SlotPos, encode_checkpoint};

    const PAGE: u32 = 512;

    fn entry(seq: u64, pages: &[(u32, u8)], db_pages: u32) -> Entry {
        entry_in(7, 0, seq, pages, db_pages)
    }

    /// An entry of object `[object; 32]` in slot `slot` of colo `c`.
    fn entry_in(object: u8, slot: u32, seq: u64, pages: &[(u32, u8)], db_pages: u32) -> Entry {
        let object = ObjectKey::new(Arc::from("ns"), ObjectId::from_bytes([object; 32]));
        let mut b = PageSetBuilder::new(&object, &SlotKey::new("c", slot), PAGE, db_pages, 2);
        for (pgno, fill) in pages {
            let mut page = vec![*fill; PAGE as usize];
            page[1] = seq as u8;
            b.push(*pgno, &page);
        }
        let mut e = b.finish();
        e.place_after(SlotPos::START, Lsn::new(1, seq));
        e
    }

    /// Applies `entries` held (written after entry `i` when bit `i` of `splits` is set, and at
    /// the end) and one by one, and returns both files' bytes.
    fn both_ways(entries: &[Entry], splits: u32) -> (Vec<u8>, Vec<u8>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(tmp.path().join(name))
                .expect("file")
        };
        let (held_file, plain_file) = (open("held.db"), open("plain.db"));
        let mut held = HeldPages::default();
        for (i, e) in entries.iter().enumerate() {
            let view = e.page_set().expect("page set");
            held.take(&view);
            write_entry(&plain_file, &view).expect("plain write");
            if splits & (1 << i) != 0 {
                held.write_to(&held_file).expect("held write");
                held = HeldPages::default();
            }
        }
        held.write_to(&held_file).expect("held write");
        (
            std::fs::read(tmp.path().join("held.db")).expect("read"),
            std::fs::read(tmp.path().join("plain.db")).expect("read"),
        )
    }

    /// Writes the held pages out and waits until the checkpointer has made them durable.
    fn write_out_and_wait(worker: &mut Worker) {
        let (done, answered) = mpsc::channel();
        worker.write_out(Some(done));
        answered
            .recv_timeout(Duration::from_secs(10))
            .expect("the checkpointer answers");
    }

    #[test]
    fn held_pages_write_the_same_file_as_entries_written_one_by_one() {
        let cases: Vec<Vec<Entry>> = vec![
            // The same page changed again and again, the database growing.
            vec![
                entry(1, &[(1, 1), (2, 1)], 2),
                entry(2, &[(2, 2)], 2),
                entry(3, &[(2, 3), (3, 3)], 3),
                entry(4, &[(1, 4)], 3),
            ],
            // Shrunk (pages 3-4 cut), then grown again writing only page 5: pages 3-4 must read
            // as zeros, not as their images from before the cut.
            vec![
                entry(1, &[(1, 1), (2, 1), (3, 1), (4, 1)], 4),
                entry(2, &[(1, 2)], 2),
                entry(3, &[(5, 3)], 5),
            ],
            // Shrunk twice, the second time further.
            vec![
                entry(1, &[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)], 5),
                entry(2, &[(1, 2)], 4),
                entry(3, &[(1, 3)], 2),
                entry(4, &[(4, 4)], 4),
            ],
        ];
        for (n, entries) in cases.iter().enumerate() {
            // Every way of cutting the entries into write-outs.
            for splits in 0..1u32 << (entries.len() - 1) {
                let (held, plain) = both_ways(entries, splits);
                assert_eq!(
                    held, plain,
                    "case {n}, written out after the entries in {splits:b}: held pages differ"
                );
            }
        }
    }

    /// The applier's new directories and files go into the node's shared set: a serving object
    /// syncs that set before its checkpoint marker, and after a promotion the new owner's first
    /// marker for a file the applier created may come before the applier's own write-out. The
    /// write-out's checkpointer syncs the set as well, and a delete adds its directory again.
    #[test]
    fn directories_the_applier_changes_stay_pending_on_the_node_until_synced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let metrics = crate::metrics::Metrics::new();
        let runner =
            crate::storage::log::start(&tmp.path().join("log"), 64 << 10, 0, metrics.log.clone())
                .expect("log");
        let objects = tmp.path().join("objects");
        std::fs::create_dir_all(&objects).expect("objects dir");
        let new_dirs = Arc::new(PendingDirs::default());
        let mut worker = Worker::new(
            objects.clone(),
            Arc::new(HashMap::new()),
            runner.log(),
            tmp.path().join("log"),
            new_dirs.clone(),
            Arc::new(SyncFailures::default()),
        )
        .expect("worker");
        let first = entry(1, &[(1, 1)], 1);
        worker.apply(&first, 10).expect("apply");
        assert!(new_dirs.is_empty(), "nothing is created before a write-out");
        worker.write_held().expect("write held pages");
        let file = crate::object::db_path(&objects, &first.object());
        assert!(file.exists(), "the applier created {}", file.display());
        let shard = file.parent().expect("shard dir").to_path_buf();
        let namespace = shard.parent().expect("namespace dir").to_path_buf();
        assert_eq!(
            new_dirs.pending(),
            vec![objects.clone(), namespace.clone(), shard.clone()],
            "the directories created, and the existing one that gained the first of them"
        );

        write_out_and_wait(&mut worker);
        assert!(new_dirs.is_empty(), "the write-out synced them");

        let mut delete = Entry::delete(&first.object(), &SlotKey::new("c", 0));
        delete.place_after(SlotPos::START, Lsn::new(1, 2));
        worker.apply(&delete, 11).expect("apply the delete");
        assert!(!file.exists(), "the delete removed the file");
        assert_eq!(
            new_dirs.pending(),
            vec![shard],
            "the directory that lost the file"
        );
    }

    #[test]
    fn a_page_changed_by_many_entries_is_held_once() {
        let mut held = HeldPages::default();
        for seq in 1..=100 {
            held.take(&entry(seq, &[(2, 9)], 2).page_set().expect("page set"));
        }
        assert_eq!(held.bytes(), PAGE as usize);
    }

    /// A worker on a test log in `dir`: the log, its directory, the objects directory, the worker.
    fn worker_in(
        dir: &std::path::Path,
        failures: Arc<SyncFailures>,
    ) -> (crate::storage::log::LogRunner, PathBuf, PathBuf, Worker) {
        let log_dir = dir.join("log");
        let runner = crate::storage::log::start_for_test(&log_dir);
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects).expect("objects dir");
        let worker = Worker::new(
            objects.clone(),
            Arc::new(HashMap::new()),
            runner.log(),
            log_dir.clone(),
            Arc::new(PendingDirs::default()),
            failures,
        )
        .expect("worker");
        (runner, log_dir, objects, worker)
    }

    /// Logs `payload` as a follower logs a record, and returns its log position once durable.
    fn log_record(log: &NodeLog, kind: RecordKind, object: ObjectKey, payload: &[u8]) -> u64 {
        let (tx, rx) = mpsc::channel();
        log.append(crate::storage::log::Append {
            kind,
            object,
            fence: None,
            payload: bytes::Bytes::copy_from_slice(payload),
            lazy: false,
            done: Box::new(move |r| {
                let _ = tx.send(r.expect("logged"));
            }),
        });
        log.sync().expect("log sync");
        rx.recv().expect("log position")
    }

    /// After a snapshot sync the stream may bring entries the installed file already holds (at
    /// or below the object's floor). They are logged but not applied, and still need a marker:
    /// the sync's own marker comes before them, and the log retires its oldest segment first, so
    /// one such entry of an object that then went idle kept every later segment on disk.
    #[test]
    fn an_entry_under_a_snapshot_floor_gets_a_marker_and_its_log_segment_retires() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, log_dir, objects, mut worker) =
            worker_in(tmp.path(), Arc::new(SyncFailures::default()));
        runner.log().shared().set_retire_limit(u64::MAX);
        // The installed snapshot: the object as of slot position 1.5, durable.
        let skipped = entry(4, &[(1, 0x44)], 1);
        let object = skipped.object();
        let file = crate::object::db_path(&objects, &object);
        std::fs::create_dir_all(file.parent().expect("dir")).expect("object dir");
        let installed = vec![0x55u8; PAGE as usize];
        std::fs::write(&file, &installed).expect("install");
        let floor = Lsn::new(1, 5);

        let log_lsn = log_record(&runner.log(), skipped.kind, object.clone(), skipped.bytes());
        worker.take_entry(&skipped.slot(), &skipped, log_lsn, Some(floor));
        write_out_and_wait(&mut worker);
        runner.log().sync().expect("log sync");
        assert_eq!(
            std::fs::read(&file).expect("read"),
            installed,
            "the entry is not applied over the newer file"
        );
        let markers = crate::storage::recovery::checkpoint_markers(&log_dir);
        assert_eq!(
            markers,
            vec![Checkpoint {
                object: object.clone(),
                upto: log_lsn,
                slot_lsn: floor,
            }],
            "one marker past the skipped record, at the file's slot position"
        );

        // Another object's record too big for the first segment, and its marker: nothing else
        // holds the first segment back.
        let other = ObjectKey::new(Arc::from("ns"), ObjectId::from_bytes([8; 32]));
        let big = vec![0xa5u8; 80 << 10];
        let big_lsn = log_record(&runner.log(), RecordKind::PageSet, other.clone(), &big);
        let marker = encode_checkpoint(&Checkpoint {
            object: other.clone(),
            upto: big_lsn,
            slot_lsn: Lsn::new(1, 9),
        });
        log_record(&runner.log(), RecordKind::Checkpoint, other, &marker);
        let shared = runner.log().shared().clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.live_segments() > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            shared.live_segments(),
            1,
            "older segments retired; held back by {:?}",
            shared.blockers()
        );
    }

    /// A followed file whose sync failed (its pages may be lost while the cache shows them) is
    /// rebuilt from the node log when its next entry arrives, and then holds exactly what applying
    /// every entry in turn gives; its markers resume.
    #[test]
    fn a_followed_file_that_failed_to_sync_is_rebuilt_from_the_log_at_its_next_entry() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let failures = Arc::new(SyncFailures::default());
        let (runner, log_dir, objects, mut worker) = worker_in(tmp.path(), failures.clone());
        let entries = [
            entry(1, &[(1, 0xa1), (2, 0xa2)], 2),
            entry(2, &[(2, 0xb2), (3, 0xb3)], 3),
            entry(3, &[(1, 0xc1)], 3),
        ];
        // Logged as a follower logs them, at the log positions the applier is given.
        let log_lsns: Vec<u64> = entries
            .iter()
            .map(|e| log_record(&runner.log(), e.kind, e.object(), e.bytes()))
            .collect();

        for (e, lsn) in entries.iter().zip(&log_lsns).take(2) {
            worker.take_entry(&e.slot(), e, *lsn, None);
        }
        worker.write_held().expect("write held pages");
        let file = crate::object::db_path(&objects, &entries[0].object());
        let written = std::fs::read(&file).expect("read");
        // The failed writeback: the pages are gone from the disk, and the sync said so once.
        std::fs::write(&file, vec![0u8; written.len()]).expect("lose the pages");
        let failing = || Err(std::io::Error::other("injected writeback error"));
        assert!(failures.sync_file(&entries[0].object(), failing).is_err());

        worker.take_entry(&entries[2].slot(), &entries[2], log_lsns[2], None);
        worker.write_held().expect("write held pages");
        assert!(!failures.is_marked(&entries[0].object()), "rebuilt");
        let expected = tmp.path().join("expected.db");
        let plain = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&expected)
            .expect("file");
        for e in &entries {
            write_entry(&plain, &e.page_set().expect("page set")).expect("plain write");
        }
        assert_eq!(
            std::fs::read(&file).expect("read"),
            std::fs::read(&expected).expect("read"),
            "the rebuilt file holds every entry"
        );
        // Its markers resume: the write-out's checkpointer logs one covering the last entry.
        write_out_and_wait(&mut worker);
        runner.log().sync().expect("log sync");
        let markers = crate::storage::recovery::checkpoint_markers(&log_dir);
        assert_eq!(
            markers.iter().map(|c| c.upto).collect::<Vec<_>>(),
            vec![log_lsns[2]]
        );
    }

    #[test]
    fn the_slots_of_a_colo_take_the_write_out_turns_evenly() {
        let mut turns = vec![0; WRITE_OUT_ROUNDS as usize];
        for slot in 0..WRITE_OUT_ROUNDS * 4 {
            turns[round_of(&SlotKey::new("colo-a", slot)) as usize] += 1;
        }
        assert_eq!(turns, vec![4; WRITE_OUT_ROUNDS as usize]);
    }

    /// A turn writes out the held pages of its own slots only, and logs their markers once the
    /// files are durable; the other slot's pages stay held (and its entries unmarked) until its
    /// turn or a full write-out.
    #[test]
    fn a_turn_writes_out_only_its_own_slots_and_logs_their_markers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (runner, log_dir, objects, mut worker) =
            worker_in(tmp.path(), Arc::new(SyncFailures::default()));
        let (mine, other) = (
            entry_in(7, 0, 1, &[(1, 0x71)], 1),
            entry_in(8, 1, 1, &[(1, 0x81)], 1),
        );
        assert_ne!(round_of(&mine.slot()), round_of(&other.slot()));
        let lsns: Vec<u64> = [&mine, &other]
            .iter()
            .map(|e| log_record(&runner.log(), e.kind, e.object(), e.bytes()))
            .collect();
        worker.take_entry(&mine.slot(), &mine, lsns[0], None);
        worker.take_entry(&other.slot(), &other, lsns[1], None);

        // The turn of `mine`'s slot is due.
        worker.round = round_of(&mine.slot());
        worker.next_round = Instant::now();
        worker.take_turns();

        let file = |e: &Entry| crate::object::db_path(&objects, &e.object());
        let mut page = vec![0x71u8; PAGE as usize];
        page[1] = 1;
        assert_eq!(std::fs::read(file(&mine)).expect("written"), page);
        assert!(!file(&other).exists(), "the other slot waits for its turn");
        assert_eq!(
            worker.by_slot.keys().cloned().collect::<Vec<_>>(),
            vec![other.slot()]
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut markers = Vec::new();
        while markers.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            runner.log().sync().expect("log sync");
            markers = crate::storage::recovery::checkpoint_markers(&log_dir);
        }
        assert_eq!(
            markers,
            vec![Checkpoint {
                object: mine.object(),
                upto: lsns[0],
                slot_lsn: mine.lsn(),
            }],
            "a marker for the slot whose turn it was, and none for the other"
        );

        // A full write-out (a flush, a promotion) takes the rest.
        write_out_and_wait(&mut worker);
        runner.log().sync().expect("log sync");
        assert!(file(&other).exists());
        assert_eq!(
            crate::storage::recovery::checkpoint_markers(&log_dir)
                .iter()
                .map(|c| c.upto)
                .collect::<Vec<_>>(),
            lsns
        );
        assert!(worker.by_slot.is_empty());
    }

    /// An applier that fell more than a whole period behind its turns (a disk that kept
    /// refusing) takes every turn it missed, so every slot is written, and its next turn is
    /// ahead of it again.
    #[test]
    fn an_applier_a_whole_period_behind_takes_every_missed_turn() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_runner, _log_dir, objects, mut worker) =
            worker_in(tmp.path(), Arc::new(SyncFailures::default()));
        let entries = [
            entry_in(7, 0, 1, &[(1, 0x71)], 1),
            entry_in(8, 1, 1, &[(1, 0x81)], 1),
        ];
        for e in &entries {
            worker.take_entry(&e.slot(), e, 1, None);
        }
        worker.next_round = Instant::now() - WRITE_OUT_EVERY - ROUND;
        worker.take_turns();
        for e in &entries {
            assert!(crate::object::db_path(&objects, &e.object()).exists());
        }
        assert!(worker.by_slot.is_empty() && worker.held.is_empty());
        assert!(worker.next_round > Instant::now(), "the turns start again");
    }
}
