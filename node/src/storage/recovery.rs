//! Startup recovery: bring every object database file up to date with the durable node log.
//!
//! Object databases run with `synchronous=OFF`, so after a crash their files and `-wal` files may
//! hold anything from "last checkpoint" to "commits that were never acknowledged". The log decides:
//! every `-wal` is discarded (the caller removes them), and every entry after the object's last
//! durable checkpoint is written into its database file, page by page, in log order. Page sets
//! are full page images, so re-applying one the file already holds is harmless. A delete entry
//! removes the file, and later page sets rebuild it from nothing.
//!
//! An entry is skipped when a checkpoint marker covers it (by log position, or by slot position),
//! or when it is at or below the object's *floor* (its snapshot position after a sync): such
//! entries are older than what the file holds.
//!
//! Afterwards each file written is synced, and the directories naming them up to the data
//! directory (not one `syncfs`: see `storage::dirs`), the caller records the slot positions the
//! log established, and the old segments are retired.

use super::record::{
    Entry, ObjectKey, RecordKind, SlotKey, SlotPos, decode_checkpoint, decode_object_of,
};
use super::segments::{self, decode_record, list_segments};
use crate::lsn::Lsn;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Where the log continues.
    pub next_lsn: u64,
    pub records: usize,
    pub page_sets_applied: usize,
    pub objects_touched: usize,
    pub objects_deleted: usize,
    /// The last entry of each slot found in the log.
    pub slots: HashMap<SlotKey, SlotPos>,
    /// The newest entries of each slot found in the log, in log order (at most
    /// [`RECENT_ENTRIES`] and [`RECENT_BYTES`] each): a restarted owner resends from them to a
    /// follower a little behind, which would otherwise need a snapshot of the whole slot.
    pub recent: HashMap<SlotKey, VecDeque<Entry>>,
}

/// How many of a slot's newest entries a node keeps to resend (its ring), and recovery hands it.
pub const RECENT_ENTRIES: usize = 512;
/// The most bytes of entries kept per slot to resend.
pub const RECENT_BYTES: usize = 4 << 20;

/// Keeps the newest entries of each slot, within the limits.
#[derive(Default)]
struct Recent {
    per_slot: HashMap<SlotKey, (VecDeque<Entry>, usize)>,
}

impl Recent {
    fn push(&mut self, entry: Entry) {
        let (entries, bytes) = self.per_slot.entry(entry.slot()).or_default();
        *bytes += entry.bytes().len();
        entries.push_back(entry);
        while entries.len() > RECENT_ENTRIES || *bytes > RECENT_BYTES {
            match entries.pop_front() {
                Some(old) => *bytes -= old.bytes().len(),
                None => break,
            }
        }
    }

    fn into_map(self) -> HashMap<SlotKey, VecDeque<Entry>> {
        self.per_slot
            .into_iter()
            .map(|(slot, (entries, _))| (slot, entries))
            .collect()
    }
}

/// Calls `visit` for every valid record of the log in `dir` below `upto`, in LSN order; returns
/// the LSN just past the last segment. A segment retired while the scan runs is skipped: it held
/// only records that were checkpointed.
pub fn scan(
    dir: &Path,
    upto: u64,
    mut visit: impl FnMut(u64, RecordKind, &[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut next = 0u64;
    for (start, path) in list_segments(dir)? {
        if start >= upto {
            break;
        }
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut offset = 0usize;
        while let Some((rec, after)) = decode_record(&data, start, offset) {
            if rec.lsn >= upto {
                break;
            }
            visit(rec.lsn, rec.kind, rec.payload)?;
            offset = after;
        }
        next = next.max(start + data.len() as u64);
    }
    Ok(next)
}

/// Up to where an object's file is known to hold its entries.
#[derive(Clone, Copy, Default)]
struct Covered {
    /// Log position of the newest entry a checkpoint marker covers (inclusive). `None` when there
    /// is no marker: the record at log position 0 is an entry like any other, and a default of 0
    /// skipped it (the first commit of the first object a node wrote, schema page and all).
    upto: Option<u64>,
    /// Slot position: the newest marker's, or the floor set by a snapshot sync.
    slot_lsn: Lsn,
}

impl Covered {
    fn covers(&self, log_lsn: u64, slot_lsn: Lsn) -> bool {
        self.upto.is_some_and(|u| log_lsn <= u) || slot_lsn <= self.slot_lsn
    }
}

fn covered_by_markers(
    log_dir: &Path,
    upto: u64,
    only: Option<&ObjectKey>,
    floors: &HashMap<ObjectKey, Lsn>,
) -> io::Result<HashMap<ObjectKey, Covered>> {
    let mut covered: HashMap<ObjectKey, Covered> = floors
        .iter()
        .filter(|(k, _)| only.is_none_or(|o| o == *k))
        .map(|(k, f)| {
            (
                k.clone(),
                Covered {
                    upto: None,
                    slot_lsn: *f,
                },
            )
        })
        .collect();
    scan(log_dir, upto, |_, kind, payload| {
        if kind == RecordKind::Checkpoint
            && let Ok(c) = decode_checkpoint(payload)
            && only.is_none_or(|o| *o == c.object)
        {
            let e = covered.entry(c.object).or_default();
            e.upto = Some(e.upto.map_or(c.upto, |u| u.max(c.upto)));
            e.slot_lsn = e.slot_lsn.max(c.slot_lsn);
        }
        Ok(())
    })?;
    Ok(covered)
}

/// Applies entries to database files, keeping a bounded set of descriptors.
struct FileApplier<'a, F: Fn(&ObjectKey) -> PathBuf> {
    locate: &'a F,
    files: HashMap<ObjectKey, File>,
    final_len: HashMap<ObjectKey, u64>,
    deleted: BTreeSet<ObjectKey>,
    dirs: BTreeSet<PathBuf>,
    applied: usize,
}

const OPEN_FILES: usize = 256;

impl<F: Fn(&ObjectKey) -> PathBuf> FileApplier<'_, F> {
    fn apply(&mut self, entry: &Entry) -> io::Result<()> {
        let key = entry.object();
        match entry.kind {
            RecordKind::Checkpoint => {}
            RecordKind::Delete => {
                self.files.remove(&key);
                self.final_len.remove(&key);
                let path = (self.locate)(&key);
                remove_database_files(&path)?;
                // No directory: the object never had a file, and there is nothing to sync.
                if let Some(parent) = path.parent().filter(|d| d.is_dir()) {
                    self.dirs.insert(parent.to_path_buf());
                }
                self.deleted.insert(key);
            }
            RecordKind::PageSet => {
                let view = entry
                    .page_set()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if !self.files.contains_key(&key) {
                    if self.files.len() >= OPEN_FILES {
                        self.files.clear();
                    }
                    let path = (self.locate)(&key);
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                        self.dirs.insert(parent.to_path_buf());
                    }
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&path)?;
                    self.files.insert(key.clone(), f);
                }
                if let Some(f) = self.files.get(&key) {
                    let size = u64::from(view.header.page_size);
                    for (pgno, page) in view.pages() {
                        f.write_all_at(page, u64::from(pgno - 1) * size)?;
                    }
                }
                self.final_len.insert(
                    key.clone(),
                    u64::from(view.header.db_pages) * u64::from(view.header.page_size),
                );
                self.deleted.remove(&key);
                self.applied += 1;
            }
        }
        Ok(())
    }

    /// Sets final sizes.
    fn finish(&mut self) -> io::Result<()> {
        self.files.clear();
        for (key, len) in &self.final_len {
            let f = OpenOptions::new().write(true).open((self.locate)(key))?;
            f.set_len(*len)?;
        }
        Ok(())
    }

    /// Makes every file written durable, then the names in their directories up to `root`.
    fn sync(&self, root: &Path) -> io::Result<()> {
        for key in self.final_len.keys() {
            let path = (self.locate)(key);
            File::open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        }
        super::dirs::sync_dirs_up_to(self.dirs.iter().cloned(), root).map(|_| ())
    }
}

fn entry_lsn(kind: RecordKind, payload: &[u8]) -> Option<(SlotKey, SlotPos)> {
    let e = Entry::from_bytes(kind, payload.to_vec()).ok()?;
    Some((e.slot(), e.position()))
}

/// Rebuilds one object's database file from the durable log (below `upto`): used when a commit
/// could not be made durable and the object's in-memory and `-wal` state must be forgotten. The
/// caller has closed the database and discarded its `-wal`.
pub fn replay_object(
    log_dir: &Path,
    key: &ObjectKey,
    db: &Path,
    upto: u64,
    floor: Option<Lsn>,
) -> io::Result<usize> {
    let floors: HashMap<ObjectKey, Lsn> = floor.map(|f| (key.clone(), f)).into_iter().collect();
    let covered = covered_by_markers(log_dir, upto, Some(key), &floors)?;
    let c = covered.get(key).copied().unwrap_or_default();
    let locate = |_: &ObjectKey| db.to_path_buf();
    let mut applier = FileApplier {
        locate: &locate,
        files: HashMap::new(),
        final_len: HashMap::new(),
        deleted: BTreeSet::new(),
        dirs: BTreeSet::new(),
        applied: 0,
    };
    scan(log_dir, upto, |lsn, kind, payload| {
        if kind == RecordKind::Checkpoint || decode_object_of(payload).ok().as_ref() != Some(key) {
            return Ok(());
        }
        match entry_lsn(kind, payload) {
            Some((_, p)) if c.covers(lsn, p.lsn) => Ok(()),
            _ => Entry::from_bytes(kind, payload.to_vec())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
                .and_then(|entry| applier.apply(&entry)),
        }
    })?;
    applier.finish()?;
    if db.exists() {
        File::open(db)?.sync_all()?;
    }
    Ok(applier.applied)
}

/// The checkpoint markers in the log in `log_dir` (written so far), in log order.
#[cfg(test)]
pub fn checkpoint_markers(log_dir: &Path) -> Vec<super::record::Checkpoint> {
    let mut found = Vec::new();
    scan(log_dir, u64::MAX, |_, kind, payload| {
        if kind == RecordKind::Checkpoint {
            found.push(decode_checkpoint(payload).map_err(io::Error::other)?);
        }
        Ok(())
    })
    .expect("scan the log");
    found
}

/// Removes a database's `-wal` and `-shm`, whose content the node log supersedes.
pub fn discard_wal(db: &Path) -> io::Result<()> {
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        match fs::remove_file(PathBuf::from(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Replays the log in `log_dir` into the database files `locate` names; `before_retire` records
/// the slot positions the log established (it runs after the files are durable), then the old
/// segments are retired. `keep_recent`: collect each slot's newest entries for the report (a
/// standalone node, which resends to nobody, does not).
pub fn recover(
    log_dir: &Path,
    locate: impl Fn(&ObjectKey) -> PathBuf,
    floors: &HashMap<ObjectKey, Lsn>,
    keep_recent: bool,
    before_retire: impl FnOnce(&RecoveryReport) -> io::Result<()>,
) -> io::Result<RecoveryReport> {
    super::dirs::create_dir_all_durable(log_dir)?;
    let mut report = RecoveryReport::default();
    let covered = covered_by_markers(log_dir, u64::MAX, None, floors)?;
    let mut applier = FileApplier {
        locate: &locate,
        files: HashMap::new(),
        final_len: HashMap::new(),
        deleted: BTreeSet::new(),
        dirs: BTreeSet::new(),
        applied: 0,
    };
    let mut recent = Recent::default();
    let next_lsn = scan(log_dir, u64::MAX, |lsn, kind, payload| {
        report.records += 1;
        if kind == RecordKind::Checkpoint {
            return Ok(());
        }
        let Ok(entry) = Entry::from_bytes(kind, payload.to_vec()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed entry at log position {lsn}"),
            ));
        };
        let pos = entry.position();
        let e = report.slots.entry(entry.slot()).or_insert(pos);
        if pos.lsn > e.lsn {
            *e = pos;
        }
        let covered = covered
            .get(&entry.object())
            .is_some_and(|c| c.covers(lsn, pos.lsn));
        if !covered {
            applier.apply(&entry)?;
        }
        if keep_recent {
            recent.push(entry);
        }
        Ok(())
    })?;
    applier.finish()?;
    report.page_sets_applied = applier.applied;
    report.objects_touched = applier.final_len.len();
    report.objects_deleted = applier.deleted.len();
    report.next_lsn = next_lsn;
    report.recent = recent.into_map();

    // Every file written above, then the directories that name them, up to the data directory:
    // the previous run may have created a file, or the directory holding it, and died before
    // syncing its name (see `storage::dirs`); its entries were replayed here, so it is listed.
    // A file whose entries a marker covers was synced, and its name, before the marker.
    applier.sync(log_dir.parent().unwrap_or(log_dir))?;
    before_retire(&report)?;

    // Everything the log held is now in the database files: retire its segments as spares.
    let old = list_segments(log_dir)?;
    for (i, (_, path)) in old.iter().enumerate() {
        if i < 2 {
            fs::rename(path, segments::spare_path(log_dir, 900_000 + i as u64))?;
        } else {
            fs::remove_file(path)?;
        }
    }
    segments::sync_dir(log_dir)?;
    Ok(report)
}

/// Removes a database file and its SQLite companions.
pub fn remove_database_files(db: &Path) -> io::Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        match fs::remove_file(PathBuf::from(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;
    use crate::storage::record::{Checkpoint, PageSetBuilder, encode_checkpoint};
    use crate::storage::segments::{encode_record, segment_path};
    use std::sync::Arc;

    const PAGE: u32 = 512;

    fn object(n: u8) -> ObjectKey {
        ObjectKey::new(Arc::from("ns"), ObjectId::from_bytes([n; 32]))
    }

    /// A page set of `object` at slot position 1/`seq` writing `pages` (each filled with
    /// `fill`) into a database of `db_pages` pages.
    fn page_set(object: &ObjectKey, seq: u64, pages: &[u32], fill: u8, db_pages: u32) -> Vec<u8> {
        let mut b = PageSetBuilder::new(object, &SlotKey::new("c", 0), PAGE, db_pages, 2);
        for p in pages {
            b.push(*p, &[fill; PAGE as usize]);
        }
        let mut e = b.finish();
        e.place_after(SlotPos::START, Lsn::new(1, seq));
        e.bytes().to_vec()
    }

    /// Writes `records` as the node log in `dir`, the first at log position 0.
    fn write_log(dir: &Path, records: &[(RecordKind, Vec<u8>)]) {
        fs::create_dir_all(dir).expect("log dir");
        let mut buf = Vec::new();
        for (kind, payload) in records {
            let lsn = buf.len() as u64;
            encode_record(&mut buf, lsn, *kind, payload);
        }
        fs::write(segment_path(dir, 0), &buf).expect("segment");
    }

    fn checkpoint(object: &ObjectKey, upto: u64) -> (RecordKind, Vec<u8>) {
        let c = Checkpoint {
            object: object.clone(),
            upto,
            slot_lsn: Lsn::ZERO,
        };
        (RecordKind::Checkpoint, encode_checkpoint(&c))
    }

    /// First byte of each page of a database file.
    fn page_fills(db: &Path) -> Vec<u8> {
        let bytes = fs::read(db).expect("database file");
        bytes.chunks(PAGE as usize).map(|p| p[0]).collect()
    }

    /// A delete of an object that never had a file (a client may delete any ID) has no
    /// directory to sync: recovery replays it and goes on. It used to fail, and the node with it.
    #[test]
    fn a_delete_of_an_object_without_a_directory_is_replayed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("log");
        let objects = tmp.path().join("objects");
        let a = object(1);
        let mut delete = Entry::delete(&a, &SlotKey::new("c", 0));
        delete.place_after(SlotPos::START, Lsn::new(1, 1));
        write_log(&log, &[(RecordKind::Delete, delete.bytes().to_vec())]);
        let locate = |k: &ObjectKey| objects.join(k.id.to_hex()).join("x.db");
        let report = recover(&log, locate, &HashMap::new(), true, |_| Ok(())).expect("recover");
        assert_eq!(report.objects_deleted, 1);
        assert!(!objects.exists(), "nothing was created for it");
    }

    /// Recovery hands a clustered node each slot's newest entries for its resend ring; for a
    /// standalone node it keeps none, and replays the same.
    #[test]
    fn recent_entries_are_kept_only_when_asked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = object(1);
        for keep in [true, false] {
            let log = tmp.path().join(format!("log-{keep}"));
            write_log(
                &log,
                &[
                    (RecordKind::PageSet, page_set(&a, 1, &[1, 2], 1, 2)),
                    (RecordKind::PageSet, page_set(&a, 2, &[2], 2, 2)),
                ],
            );
            let db = tmp.path().join(format!("a-{keep}.db"));
            let report =
                recover(&log, |_| db.clone(), &HashMap::new(), keep, |_| Ok(())).expect("recover");
            assert_eq!(report.page_sets_applied, 2);
            assert_eq!(page_fills(&db), vec![1, 2]);
            let kept: usize = report.recent.values().map(VecDeque::len).sum();
            assert_eq!(kept, if keep { 2 } else { 0 }, "keep_recent: {keep}");
        }
    }

    #[test]
    fn the_first_record_of_the_log_is_replayed_when_no_marker_covers_it() {
        // The node's very first commit (an object's schema page among it) sits at log position
        // 0; it used to be taken as covered by a marker that did not exist.
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("log");
        let a = object(1);
        write_log(
            &log,
            &[
                (RecordKind::PageSet, page_set(&a, 1, &[1, 2], 1, 2)),
                (RecordKind::PageSet, page_set(&a, 2, &[2], 2, 2)),
            ],
        );
        let db = tmp.path().join("a.db");
        let applied = replay_object(&log, &a, &db, u64::MAX, None).expect("replay");
        assert_eq!(applied, 2);
        assert_eq!(page_fills(&db), vec![1, 2]);

        // Startup recovery, with a snapshot floor below both entries (an entry for the object
        // in the floors used to mean "covered up to log position 0" as well).
        let db2 = tmp.path().join("a2.db");
        let floors = HashMap::from([(a.clone(), Lsn::ZERO)]);
        let report = recover(&log, |_| db2.clone(), &floors, true, |_| Ok(())).expect("recover");
        assert_eq!(report.page_sets_applied, 2);
        assert_eq!(page_fills(&db2), vec![1, 2]);
    }

    #[test]
    fn a_marker_covers_entries_up_to_and_including_its_position() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("log");
        let a = object(1);
        let b = object(2);
        // a's first entry at 0 is checkpointed (marker upto 0); its second is not. b has no
        // marker. a's file stands for what the checkpoint wrote (pages of 9s): replay must
        // leave page 1 alone and bring page 2 up to date.
        let first_b = page_set(&b, 1, &[1], 7, 1);
        let records = [
            (RecordKind::PageSet, page_set(&a, 1, &[1, 2], 1, 2)),
            (RecordKind::PageSet, first_b),
            checkpoint(&a, 0),
            (RecordKind::PageSet, page_set(&a, 2, &[2], 2, 2)),
        ];
        write_log(&log, &records);
        let db_a = tmp.path().join("a.db");
        fs::write(&db_a, vec![9u8; 2 * PAGE as usize]).expect("checkpointed file");
        let applied = replay_object(&log, &a, &db_a, u64::MAX, None).expect("replay");
        assert_eq!(applied, 1, "only the entry after the marker");
        assert_eq!(page_fills(&db_a), vec![9, 2]);
        let db_b = tmp.path().join("b.db");
        assert_eq!(
            replay_object(&log, &b, &db_b, u64::MAX, None).expect("replay"),
            1
        );
        assert_eq!(page_fills(&db_b), vec![7]);
    }
}
