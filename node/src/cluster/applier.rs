//! Followers keep their copy of each object's database current by writing the pages of every
//! entry straight into the database file — no SQLite involved, the same way recovery does.
//!
//! One thread applies entries in order. Writes go to the page cache; every second the applier
//! makes them durable with one `syncfs` and logs checkpoint markers for the objects it touched, so
//! the node log can retire the segments holding their entries.

use super::slot::Slot;
use crate::lsn::Lsn;
use crate::namespace::Namespace;
use crate::storage::log::{Append, NodeLog};
use crate::storage::record::{Checkpoint, Entry, ObjectKey, RecordKind, encode_checkpoint};
use crate::storage::recovery::remove_database_files;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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
    /// Make everything applied so far durable (and checkpointed), then answer.
    Flush(Sender<()>),
}

#[derive(Clone)]
pub struct Applier {
    tx: Sender<Job>,
}

const OPEN_FILES: usize = 256;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// After a busy stretch the applier pauses this long before looking for more work, so entries
/// arriving at thousands per second are applied in batches rather than each waking the thread
/// (wake-ups were a visible share of a follower's CPU). Promotion waits at most this much more.
const APPLY_PAUSE: Duration = Duration::from_millis(10);

impl Applier {
    pub fn start(
        objects_dir: PathBuf,
        namespaces: Arc<HashMap<String, Arc<Namespace>>>,
        log: NodeLog,
    ) -> std::io::Result<Applier> {
        let (tx, rx) = mpsc::channel();
        let mut worker = Worker {
            objects_dir,
            namespaces,
            log,
            files: HashMap::new(),
            dirty: HashMap::new(),
            last_flush: Instant::now(),
        };
        std::thread::Builder::new()
            .name("colony-applier".into())
            .spawn(move || worker.run(rx))?;
        Ok(Applier { tx })
    }

    pub fn apply(&self, slot: Arc<Slot>, entry: Arc<Entry>, log_lsn: u64, floor: Option<Lsn>) {
        let _ = self.tx.send(Job::Apply {
            slot,
            entry,
            log_lsn,
            floor,
        });
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
    namespaces: Arc<HashMap<String, Arc<Namespace>>>,
    log: NodeLog,
    files: HashMap<ObjectKey, (File, u64)>,
    /// Objects applied since the last flush: log position and slot position of their last entry.
    dirty: HashMap<ObjectKey, (u64, Lsn)>,
    last_flush: Instant,
}

impl Worker {
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
                Err(TryRecvError::Empty) => rx.recv_timeout(FLUSH_EVERY),
            };
            match next {
                Ok(Job::Apply {
                    slot,
                    entry,
                    log_lsn,
                    floor,
                }) => {
                    let lsn = entry.lsn();
                    if floor.is_none_or(|f| lsn > f) {
                        // The entry is durable in the log, but the file must hold it before the
                        // slot counts it as applied (a promotion waits for that): retry until the
                        // disk takes it — later entries wait in line.
                        let mut backoff = Duration::from_millis(50);
                        while let Err(e) = self.apply(&entry, log_lsn) {
                            tracing::error!(slot = %slot.key, error = %e, "cannot apply an entry to its database file; retrying");
                            self.files.clear();
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                    slot.note_applied(lsn);
                    worked = true;
                }
                Ok(Job::Flush(done)) => {
                    self.flush();
                    let _ = done.send(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
            if self.last_flush.elapsed() >= FLUSH_EVERY {
                self.flush();
            }
        }
    }

    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        crate::object::db_path(&self.objects_dir, key)
    }

    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(name).cloned()
    }

    fn apply(&mut self, entry: &Entry, log_lsn: u64) -> std::io::Result<()> {
        let key = entry.object();
        match entry.kind {
            RecordKind::Delete => {
                self.files.remove(&key);
                remove_database_files(&self.path_of(&key))?;
                if let Some(ns) = self.namespace(&key.namespace) {
                    ns.mark_empty(&key.id);
                }
            }
            RecordKind::PageSet => {
                let view = entry
                    .page_set()
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                if !self.files.contains_key(&key) {
                    if self.files.len() >= OPEN_FILES {
                        self.files.clear();
                    }
                    let path = self.path_of(&key);
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&path)?;
                    let len = f.metadata()?.len();
                    self.files.insert(key.clone(), (f, len));
                }
                if let Some((f, len)) = self.files.get_mut(&key) {
                    let size = u64::from(view.header.page_size);
                    for (pgno, page) in view.pages() {
                        f.write_all_at(page, u64::from(pgno - 1) * size)?;
                    }
                    let want = u64::from(view.header.db_pages) * size;
                    if *len != want {
                        f.set_len(want)?;
                        *len = want;
                    }
                }
                if let Some(ns) = self.namespace(&key.namespace) {
                    ns.mark_has_data(key.id);
                }
            }
            RecordKind::Checkpoint => return Ok(()),
        }
        self.dirty.insert(key, (log_lsn, entry.lsn()));
        Ok(())
    }

    /// Makes applied pages durable, then records checkpoints for them.
    fn flush(&mut self) {
        self.last_flush = Instant::now();
        // Descriptors are not kept across flushes: a promoted slot's files are opened by SQLite
        // next, and closing our descriptor later would drop the process's locks on them.
        self.files.clear();
        if self.dirty.is_empty() {
            return;
        }
        if let Err(e) = syncfs(&self.objects_dir) {
            tracing::error!(error = %e, "syncfs of object databases failed; checkpoints deferred");
            return;
        }
        for (object, (upto, slot_lsn)) in self.dirty.drain() {
            let c = Checkpoint {
                object: object.clone(),
                upto,
                slot_lsn,
            };
            self.log.append(Append {
                kind: RecordKind::Checkpoint,
                object,
                fence: None,
                payload: encode_checkpoint(&c).into(),
                done: Box::new(|_| {}),
            });
        }
    }
}

fn syncfs(dir: &Path) -> std::io::Result<()> {
    let f = File::open(dir)?;
    // SAFETY: syncfs takes any open descriptor on the filesystem to sync.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
