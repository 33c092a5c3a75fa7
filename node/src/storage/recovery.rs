//! Startup recovery: bring every object database file up to date with the durable node log.
//!
//! Object databases run with `synchronous=OFF`, so after a crash their files and `-wal` files may
//! hold anything from "last checkpoint" to "commits that were never acknowledged". The log decides:
//! every `-wal` is discarded (the caller removes them before this runs), and every page set after
//! the object's last durable checkpoint marker is written into its database file, page by page,
//! in log order. Page sets are full page images, so re-applying one that the file already holds
//! is harmless. A delete record removes the file, and later page sets rebuild it from nothing.
//!
//! Afterwards the files are made durable with one `syncfs` (instead of an fsync per object) and
//! the old segments are retired: nothing in them is needed any more.

use super::record::{ObjectKey, PageSetView, RecordKind, decode_checkpoint, decode_object_of};
use super::segments::{self, decode_record, list_segments};
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
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

/// Rebuilds one object's database file from the durable log (below `upto`): used when a commit
/// could not be made durable and the object's in-memory and `-wal` state must be forgotten. The
/// caller has closed the database and discarded its `-wal`.
pub fn replay_object(log_dir: &Path, key: &ObjectKey, db: &Path, upto: u64) -> io::Result<usize> {
    let mut checkpointed = 0u64;
    scan(log_dir, upto, |_, kind, payload| {
        if kind == RecordKind::Checkpoint
            && let Ok((k, at)) = decode_checkpoint(payload)
            && k == *key
        {
            checkpointed = checkpointed.max(at);
        }
        Ok(())
    })?;
    let mut file: Option<File> = None;
    let mut len: Option<u64> = None;
    let mut applied = 0;
    scan(log_dir, upto, |lsn, kind, payload| {
        if lsn <= checkpointed || kind == RecordKind::Checkpoint {
            return Ok(());
        }
        if decode_object_of(payload).ok().as_ref() != Some(key) {
            return Ok(());
        }
        match kind {
            RecordKind::Delete => {
                file = None;
                len = None;
                remove_database_files(db)?;
            }
            RecordKind::PageSet => {
                let view = PageSetView::decode(payload)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if file.is_none() {
                    if let Some(parent) = db.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    file = Some(
                        OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(db)?,
                    );
                }
                if let Some(f) = &file {
                    let size = u64::from(view.header.page_size);
                    for (pgno, page) in view.pages() {
                        f.write_all_at(page, u64::from(pgno - 1) * size)?;
                    }
                }
                len = Some(u64::from(view.header.db_pages) * u64::from(view.header.page_size));
                applied += 1;
            }
            RecordKind::Checkpoint => {}
        }
        Ok(())
    })?;
    if let (Some(f), Some(len)) = (file, len) {
        f.set_len(len)?;
        f.sync_all()?;
    }
    Ok(applied)
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

const OPEN_FILES: usize = 256;

/// Replays the log in `log_dir` into the database files `locate` names, then retires the log.
pub fn recover(
    log_dir: &Path,
    locate: impl Fn(&ObjectKey) -> PathBuf,
) -> io::Result<RecoveryReport> {
    fs::create_dir_all(log_dir)?;
    let mut report = RecoveryReport::default();

    // Pass 1: the newest durable checkpoint of every object.
    let mut checkpointed: HashMap<ObjectKey, u64> = HashMap::new();
    scan(log_dir, u64::MAX, |_, kind, payload| {
        if kind == RecordKind::Checkpoint
            && let Ok((key, upto)) = decode_checkpoint(payload)
        {
            let e = checkpointed.entry(key).or_insert(0);
            *e = (*e).max(upto);
        }
        Ok(())
    })?;

    // Pass 2: apply what comes after it.
    let mut files: HashMap<ObjectKey, File> = HashMap::new();
    let mut final_len: HashMap<ObjectKey, u64> = HashMap::new();
    let mut deleted: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let next_lsn = scan(log_dir, u64::MAX, |lsn, kind, payload| {
        report.records += 1;
        let Ok(key) = decode_object_of(payload) else {
            return Ok(());
        };
        if checkpointed.get(&key).is_some_and(|&c| lsn <= c) {
            return Ok(());
        }
        match kind {
            RecordKind::Checkpoint => {}
            RecordKind::Delete => {
                files.remove(&key);
                final_len.remove(&key);
                let path = locate(&key);
                remove_database_files(&path)?;
                deleted.insert(key);
            }
            RecordKind::PageSet => {
                let view = PageSetView::decode(payload)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if !files.contains_key(&key) {
                    if files.len() >= OPEN_FILES {
                        files.clear();
                    }
                    let path = locate(&key);
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                        dirs.insert(parent.to_path_buf());
                    }
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&path)?;
                    files.insert(key.clone(), f);
                }
                if let Some(f) = files.get(&key) {
                    let size = u64::from(view.header.page_size);
                    for (pgno, page) in view.pages() {
                        f.write_all_at(page, u64::from(pgno - 1) * size)?;
                    }
                }
                final_len.insert(
                    key.clone(),
                    u64::from(view.header.db_pages) * u64::from(view.header.page_size),
                );
                deleted.remove(&key);
                report.page_sets_applied += 1;
            }
        }
        Ok(())
    })?;
    drop(files);
    for (key, len) in &final_len {
        let f = OpenOptions::new().write(true).open(locate(key))?;
        f.set_len(*len)?;
    }
    report.objects_touched = final_len.len();
    report.objects_deleted = deleted.len();
    report.next_lsn = next_lsn;

    // One syncfs makes every file written above durable; then directory entries.
    if report.records > 0 {
        let root = File::open(log_dir)?;
        // SAFETY: syncfs takes any open file descriptor on the filesystem to sync.
        if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        for d in &dirs {
            segments::sync_dir(d)?;
        }
    }

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
