//! Makes database files durable, then logs checkpoint markers for them so the node log can retire
//! the segments that held their entries. Two run on each node: one for the applier's writes, one
//! for the checkpoints of the objects the node serves.
//!
//! Each written file is synced on its own (`fdatasync`), and each directory whose entries changed.
//! An earlier version synced the whole filesystem (`syncfs`) once a second: on a machine running
//! several nodes that also forced out every other node's unsynced SQLite files, and the foreground
//! log syncs queued behind that burst — the replicated p99 latency nearly halved without it.
//!
//! It runs on its own thread so the applier keeps applying (a promotion waits on the applier, not
//! on durability: the entries are durable in the log already), and a serving object keeps
//! serving. Everything submitted while it works is done as one batch, with one sync of the
//! pending directories. (Serving objects used to sync and log on a blocking thread each: under a
//! burst of checkpoints hundreds of them queued for the directories, and new objects, which open
//! their files on blocking threads too, waited for a free one.)
//!
//! A file that fails to sync marks its object in the node's [`SyncFailures`]: no marker for it,
//! from this batch or a later one, until the file is rebuilt from the log (see there).
//!
//! The directories whose entries the applier changed are the node's [`PendingDirs`], the same
//! set a serving object's checkpoint syncs before its marker: after a promotion the new owner may
//! checkpoint a file the applier created before this thread has got to it, and its marker must not
//! come before the file's name is durable either.

use crate::storage::dirs::PendingDirs;
use crate::storage::log::{Append, NodeLog};
use crate::storage::record::{Checkpoint, RecordKind, encode_checkpoint};
use crate::storage::sync_failures::SyncFailures;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};

/// Files written since the last batch, each with the marker to log once it is durable.
pub struct Durable {
    pub files: Vec<(DbFile, Checkpoint)>,
    /// Answered once the batch is done (synced, or failed and logged).
    pub done: Option<Sender<()>>,
}

/// What a marker waits for.
pub enum DbFile {
    /// A file the applier wrote, synced through a descriptor opened for the sync. One removed
    /// since counts as synced: only a later entry of its stream (a delete, or a snapshot sync that
    /// dropped the object) removes a followed file.
    Path(PathBuf),
    /// A serving object's checkpointed file, synced through the object's own descriptor: also
    /// when the file has been removed since (a close removes a file whose schema is empty, and
    /// until that removal is durable a power cut brings back the name with whatever content was
    /// synced), and a writeback error stays on the inode the descriptor holds open.
    Open { path: PathBuf, file: Arc<File> },
    /// Nothing to sync: a delete's marker, or a rebuild that synced the file itself.
    Nothing,
}

pub struct Checkpointer {
    tx: Option<Sender<Durable>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Descriptors submitted files hold until their sync ([`DbFile::Open`]): closed objects'
    /// files wait here, and under a burst of closes they number in the hundreds, which the
    /// node's open-object cap must count (see `ObjectEnv::wait_for_room`).
    held: Arc<AtomicUsize>,
}

fn descriptors_in(files: &[(DbFile, Checkpoint)]) -> usize {
    files
        .iter()
        .filter(|(f, _)| matches!(f, DbFile::Open { .. }))
        .count()
}

impl Checkpointer {
    /// `name` names its thread.
    pub fn start(
        name: &str,
        log: NodeLog,
        new_dirs: Arc<PendingDirs>,
        sync_failures: Arc<SyncFailures>,
    ) -> std::io::Result<Checkpointer> {
        let (tx, rx) = mpsc::channel();
        let held = Arc::new(AtomicUsize::new(0));
        let held_by_thread = held.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&log, &new_dirs, &sync_failures, &held_by_thread, rx))?;
        Ok(Checkpointer {
            tx: Some(tx),
            thread: Some(thread),
            held,
        })
    }

    pub fn submit(&self, batch: Durable) {
        if batch.files.is_empty() && batch.done.is_none() {
            return;
        }
        if let Some(tx) = &self.tx {
            let n = descriptors_in(&batch.files);
            self.held.fetch_add(n, Ordering::Relaxed);
            if tx.send(batch).is_err() {
                self.held.fetch_sub(n, Ordering::Relaxed);
            }
        }
    }

    /// File descriptors held by files waiting for their sync.
    pub fn descriptors_held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Finishes the batches submitted so far.
    pub fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    log: &NodeLog,
    new_dirs: &PendingDirs,
    failures: &SyncFailures,
    held: &AtomicUsize,
    rx: Receiver<Durable>,
) {
    while let Ok(first) = rx.recv() {
        let mut files = first.files;
        let mut done: Vec<Sender<()>> = first.done.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            files.extend(more.files);
            done.extend(more.done);
        }
        let descriptors = descriptors_in(&files);
        let markers = make_durable(files, new_dirs, failures, sync_data);
        // The files, and their descriptors, were dropped in `make_durable`.
        held.fetch_sub(descriptors, Ordering::Relaxed);
        for c in markers {
            let logged = failures.log_marker(&c.object, || {
                log.append(Append {
                    kind: RecordKind::Checkpoint,
                    object: c.object.clone(),
                    fence: None,
                    payload: encode_checkpoint(&c).into(),
                    lazy: false,
                    done: Box::new(|_| {}),
                })
            });
            if let Err(e) = logged {
                tracing::warn!(error = %e, "checkpoint marker held back");
            }
        }
        for d in done {
            let _ = d.send(());
        }
    }
}

/// `fdatasync` of a file the applier wrote; one removed since counts as synced (see
/// [`DbFile::Path`]).
fn sync_data(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(f) => f.sync_data(),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Syncs the files with `sync` and then the pending directories, and returns the markers that
/// may be logged. A file whose sync failed may have lost pages, so its entries stay in the log,
/// unmarked, and so do those of every later batch, until the file is rebuilt (its object is
/// marked in `failures`); a failed directory sync holds back every marker of the batch (a new
/// file's name may not be durable).
pub fn make_durable(
    files: Vec<(DbFile, Checkpoint)>,
    dirs: &PendingDirs,
    failures: &SyncFailures,
    sync: impl Fn(&Path) -> io::Result<()>,
) -> Vec<Checkpoint> {
    let mut ok = Vec::with_capacity(files.len());
    for (file, checkpoint) in files {
        let synced = failures.sync_file(&checkpoint.object, || match &file {
            DbFile::Path(path) => sync(path),
            DbFile::Open { file, .. } => file.sync_data(),
            DbFile::Nothing => Ok(()),
        });
        match synced {
            Ok(()) => ok.push(checkpoint),
            Err(e) => {
                let path = match &file {
                    DbFile::Path(path) | DbFile::Open { path, .. } => path.display().to_string(),
                    DbFile::Nothing => String::new(),
                };
                tracing::error!(object = %checkpoint.object, file = %path, error = %e, "cannot sync a database file; its log entries are kept");
            }
        }
    }
    if let Err(e) = dirs.sync() {
        tracing::error!(error = %e, "cannot sync a directory of database files; the log keeps their entries");
        return Vec::new();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;
    use crate::lsn::Lsn;
    use crate::storage::record::ObjectKey;

    fn marker(n: u8) -> Checkpoint {
        Checkpoint {
            object: ObjectKey::new("ns".into(), ObjectId::from_bytes([n; 32])),
            upto: u64::from(n),
            slot_lsn: Lsn::new(1, u64::from(n)),
        }
    }

    /// Descriptors of submitted open files count as held until their batch is done.
    #[test]
    fn open_files_count_as_held_descriptors_until_synced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let runner = crate::storage::log::start_for_test(&tmp.path().join("log"));
        let pending = Arc::new(PendingDirs::default());
        // A directory that does not exist yet holds the batches back (in the thread's loop,
        // after the files were dropped): their descriptors are released all the same.
        let missing = tmp.path().join("not-yet");
        pending.add([missing]);
        let checkpointer = Checkpointer::start(
            "test-markers",
            runner.log(),
            pending,
            Arc::new(SyncFailures::default()),
        )
        .expect("start");
        let path = tmp.path().join("o.db");
        std::fs::write(&path, b"pages").expect("write");
        let open = || DbFile::Open {
            path: path.clone(),
            file: Arc::new(File::open(&path).expect("open")),
        };
        assert_eq!(checkpointer.descriptors_held(), 0);
        let (tx, rx) = mpsc::channel();
        // The thread may be done before the count is read: while queued it is at most 2.
        let files = vec![
            (open(), marker(1)),
            (open(), marker(2)),
            (DbFile::Nothing, marker(3)),
        ];
        assert_eq!(descriptors_in(&files), 2);
        checkpointer.submit(Durable {
            files,
            done: Some(tx),
        });
        let held_while_queued = checkpointer.descriptors_held();
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("answered");
        assert!(held_while_queued <= 2);
        assert_eq!(checkpointer.descriptors_held(), 0, "released once synced");
    }

    /// The thread end to end: what is submitted is logged once durable, every batch is answered,
    /// and a batch held back by a directory that cannot be synced logs nothing (the log keeps
    /// covering its files; their next checkpoint brings a new marker).
    #[test]
    fn submitted_markers_are_logged_once_their_files_and_directories_are_durable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log_dir = tmp.path().join("log");
        let runner = crate::storage::log::start_for_test(&log_dir);
        let log = runner.log();
        let pending = Arc::new(PendingDirs::default());
        let failures = Arc::new(SyncFailures::default());
        let mut checkpointer =
            Checkpointer::start("test-markers", log.clone(), pending.clone(), failures)
                .expect("start");
        let file = tmp.path().join("o.db");
        std::fs::write(&file, b"pages").expect("write");
        let logged = || {
            log.sync().expect("log sync");
            crate::storage::recovery::checkpoint_markers(&log_dir)
                .iter()
                .map(|c| c.upto)
                .collect::<Vec<_>>()
        };
        let submit = |n: u8| {
            let (tx, rx) = mpsc::channel();
            checkpointer.submit(Durable {
                files: vec![(DbFile::Path(file.clone()), marker(n))],
                done: Some(tx),
            });
            rx
        };

        let missing = tmp.path().join("not-yet");
        pending.add([missing.clone()]);
        let answers = [submit(1), submit(2)];
        for a in answers {
            a.recv_timeout(std::time::Duration::from_secs(10))
                .expect("answered");
        }
        assert_eq!(logged(), Vec::<u64>::new(), "held back by the directory");
        assert_eq!(pending.pending(), vec![missing.clone()]);

        std::fs::create_dir(&missing).expect("mkdir");
        let answers = [submit(3), submit(4)];
        for a in answers {
            a.recv_timeout(std::time::Duration::from_secs(10))
                .expect("answered");
        }
        assert_eq!(logged(), vec![3, 4]);
        assert!(pending.is_empty());
        checkpointer.stop();
    }

    /// Written files and removed ones (their delete comes later) get their markers, but only
    /// once every pending directory is synced: one that cannot be holds back the whole batch.
    #[test]
    fn markers_wait_for_every_pending_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let written = tmp.path().join("written.db");
        std::fs::write(&written, b"pages").expect("write");
        let removed = tmp.path().join("removed.db");
        let files = || {
            vec![
                (DbFile::Path(written.clone()), marker(1)),
                (DbFile::Path(removed.clone()), marker(2)),
            ]
        };
        let pending = PendingDirs::default();
        let missing = tmp.path().join("not-yet");
        pending.add([tmp.path().to_path_buf(), missing.clone()]);

        let failures = SyncFailures::default();
        assert!(
            make_durable(files(), &pending, &failures, sync_data).is_empty(),
            "a directory that cannot be synced holds back every marker"
        );
        assert_eq!(pending.pending(), vec![missing.clone()]);

        std::fs::create_dir(&missing).expect("mkdir");
        let ok = make_durable(files(), &pending, &failures, sync_data);
        assert_eq!(
            ok.iter().map(|c| c.upto).collect::<Vec<_>>(),
            vec![1, 2],
            "both markers once the directories are durable"
        );
        assert!(pending.is_empty());
    }

    /// A file whose sync fails keeps its entries in the log: no marker for it in that batch, nor
    /// in a later one whose sync of it succeeds (Linux reports a lost writeback only once), until
    /// it is rebuilt. The other files of the batches are not held back.
    #[test]
    fn a_file_that_failed_to_sync_gets_no_later_marker_until_rebuilt() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (good, bad) = (tmp.path().join("good.db"), tmp.path().join("bad.db"));
        std::fs::write(&good, b"pages").expect("write");
        std::fs::write(&bad, b"pages").expect("write");
        // Markers for the same two objects (1 and 2), at log position `n`.
        let at = |object: u8, n: u64| Checkpoint {
            upto: n,
            ..marker(object)
        };
        let batch = |n: u64| {
            vec![
                (DbFile::Path(good.clone()), at(1, n)),
                (DbFile::Path(bad.clone()), at(2, n + 1)),
            ]
        };
        let pending = PendingDirs::default();
        let failures = SyncFailures::default();
        let bad_fails = |p: &Path| {
            if p == bad {
                Err(io::Error::other("injected writeback error"))
            } else {
                sync_data(p)
            }
        };
        let uptos = |ok: Vec<Checkpoint>| ok.iter().map(|c| c.upto).collect::<Vec<_>>();

        assert_eq!(
            uptos(make_durable(batch(1), &pending, &failures, bad_fails)),
            vec![1]
        );
        assert!(failures.is_marked(&marker(2).object));
        assert!(!failures.is_marked(&marker(1).object));
        assert_eq!(
            uptos(make_durable(batch(3), &pending, &failures, sync_data)),
            vec![3],
            "a later clean sync of the failed file does not bring its marker back"
        );
        failures
            .repair(&marker(2).object, || Ok(()))
            .expect("rebuilt");
        assert_eq!(
            uptos(make_durable(batch(5), &pending, &failures, sync_data)),
            vec![5, 6]
        );
    }
}
