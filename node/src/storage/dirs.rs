//! Directories whose entries changed (object database files created or removed) and are not yet
//! durable. One set per node: serving objects, the follower's applier and a delete all add to it.
//!
//! A new object's database file is not synced when it is created: the node log makes its writes
//! durable. Its *name* must be durable before a checkpoint marker says the file holds the
//! object's entries (the log then stops covering them); a file's removal must be durable before
//! the marker that lets the log drop the delete. So the directories whose entries changed are
//! noted here and synced, all pending ones at once, before the next marker is logged, whichever
//! thread logs it. One
//! directory sync then serves every object created in it meanwhile, off the request path, where
//! SQLite's creation of a file had cost four fsyncs per new object.
//!
//! Files that exist when the node starts have durable names: recovery syncs the directories of
//! every file it replays into, up to the data directory ([`sync_dirs_up_to`]).
//!
//! Nothing here relies on `syncfs`: it syncs every filesystem on Linux, but not a FUSE one (the
//! kernel passes it only to virtiofs), and it reports write-back errors less reliably than a
//! sync of each file; PostgreSQL's default for the same job is a sync per file, too.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `mkdir -p` whose result survives a power cut: each directory created is synced into its
/// parent (the one that existed included). Returns the directories whose entries it changed.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let changed = create_dir_all_noting(dir)?;
    for parent in &changed {
        super::segments::sync_dir(parent)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", parent.display())))?;
    }
    Ok(changed)
}

/// `mkdir -p`, returning the directories whose entries it changed — the parent of each directory
/// it created, the deepest first — for the caller to sync now or before it relies on them
/// (see [`PendingDirs`]).
pub fn create_dir_all_noting(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(up) if !up.as_os_str().is_empty() => d = up,
            _ => break,
        }
    }
    if missing.is_empty() && !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir)?;
    // A relative path's first component lives in the current directory.
    Ok(missing
        .iter()
        .filter_map(|m| m.parent())
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .collect())
}

/// Syncs each of `dirs` and every directory between it and `root` (`root` included), each once:
/// a name a previous run created and had not synced, at whatever depth, becomes durable.
/// Directories outside `root` are synced alone. Returns the directories synced, in order.
pub fn sync_dirs_up_to(
    dirs: impl IntoIterator<Item = PathBuf>,
    root: &Path,
) -> io::Result<Vec<PathBuf>> {
    let mut all = BTreeSet::new();
    for dir in dirs {
        let mut d = dir.as_path();
        all.insert(d.to_path_buf());
        while d != root && d.starts_with(root) {
            let Some(up) = d.parent() else { break };
            all.insert(up.to_path_buf());
            d = up;
        }
    }
    // Deepest first, as a crash between two syncs then leaves nothing named that is not there.
    let order: Vec<PathBuf> = all.into_iter().rev().collect();
    for dir in &order {
        super::segments::sync_dir(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    }
    Ok(order)
}

/// The entries of `dir`, none when it does not exist or is not a directory. Any other error
/// names the directory: a listing that cannot be read is not an empty one.
pub fn entries(dir: &Path) -> io::Result<Vec<std::fs::DirEntry>> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", dir.display()));
    match std::fs::read_dir(dir) {
        Ok(listing) => listing.map(|e| e.map_err(with_path)).collect(),
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(with_path(e)),
    }
}

#[derive(Default)]
pub struct PendingDirs {
    /// Directories noted and not yet taken by a sync. Held only briefly: a new object notes its
    /// directory on its first request, which must not wait for a sync (object creation under
    /// load was capped at about 1,100/s by that wait, with hundreds of threads queued on it).
    dirs: Mutex<BTreeSet<PathBuf>>,
    /// Held by the one sync running. A sync starts after the running one ends, so when it returns
    /// every directory noted before it was called is durable: synced by an earlier sync, or by
    /// this one (a sync that fails puts back what it had not synced).
    syncing: Mutex<()>,
}

impl PendingDirs {
    fn dirs(&self) -> std::sync::MutexGuard<'_, BTreeSet<PathBuf>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes directories that gained entries.
    pub fn add(&self, dirs: impl IntoIterator<Item = PathBuf>) {
        self.dirs().extend(dirs);
    }

    /// Syncs every pending directory. On an error the ones not yet synced stay pending.
    pub fn sync(&self) -> io::Result<()> {
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let taken = std::mem::take(&mut *self.dirs());
        let mut left = taken.into_iter();
        while let Some(dir) = left.next() {
            if let Err(e) = super::segments::sync_dir(&dir) {
                let mut dirs = self.dirs();
                dirs.insert(dir.clone());
                dirs.extend(left);
                return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display())));
            }
        }
        Ok(())
    }

    /// The directories still pending, in order.
    #[cfg(test)]
    pub fn pending(&self) -> Vec<PathBuf> {
        self.dirs().iter().cloned().collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.dirs().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_mkdir_syncs_the_parent_of_each_directory_it_creates() {
        let root = tempfile::tempdir().expect("tempdir");
        let deep = root.path().join("a/b/c");
        let changed = create_dir_all_durable(&deep).expect("mkdir -p");
        assert!(deep.is_dir());
        assert_eq!(
            changed,
            vec![
                root.path().join("a/b"),
                root.path().join("a"),
                root.path().to_path_buf()
            ]
        );
        assert_eq!(
            create_dir_all_durable(&deep).expect("again"),
            Vec::<PathBuf>::new(),
            "nothing to create, nothing synced"
        );
        let file = root.path().join("f");
        std::fs::write(&file, b"x").expect("file");
        assert!(
            create_dir_all_durable(&file.join("d")).is_err(),
            "a file in the way is an error"
        );
        assert!(
            create_dir_all_durable(&file).is_err(),
            "a file where the directory should be is an error"
        );
    }

    #[test]
    fn syncing_up_to_a_root_syncs_every_directory_between_once() {
        let root = tempfile::tempdir().expect("tempdir");
        let (a, b) = (root.path().join("x/a"), root.path().join("x/b"));
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        let x = root.path().join("x");
        assert_eq!(
            sync_dirs_up_to([a.clone(), b.clone(), a.clone()], root.path()).expect("sync"),
            vec![b, a, x, root.path().to_path_buf()],
            "each once, every one between, the deepest first"
        );
        let outside = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            sync_dirs_up_to([outside.path().to_path_buf()], root.path()).expect("sync"),
            vec![outside.path().to_path_buf()],
            "a directory outside the root alone"
        );
        let gone = root.path().join("x/gone");
        let err = sync_dirs_up_to([gone.clone()], root.path()).expect_err("missing directory");
        assert!(
            err.to_string().contains(&gone.display().to_string()),
            "the error names the directory: {err}"
        );
    }

    #[test]
    fn pending_directories_are_synced_once_and_a_failure_keeps_them() {
        let root = tempfile::tempdir().expect("tempdir");
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir(&a).expect("mkdir");
        std::fs::create_dir(&b).expect("mkdir");
        let pending = PendingDirs::default();
        pending.add([a.clone(), b.clone(), a.clone()]);
        assert_eq!(pending.len(), 2);
        pending.sync().expect("sync");
        assert!(pending.is_empty());

        let gone = root.path().join("gone");
        pending.add([gone.clone(), a]);
        assert!(pending.sync().is_err(), "a directory that cannot be synced");
        assert_eq!(
            pending.len(),
            1,
            "the directory that could not be synced stays pending, the other one is done"
        );
        std::fs::create_dir(&gone).expect("mkdir");
        pending.sync().expect("sync once it exists");
        assert!(pending.is_empty());
    }

    #[test]
    fn noting_a_directory_does_not_wait_for_a_running_sync_and_the_next_sync_takes_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let pending = std::sync::Arc::new(PendingDirs::default());
        // A sync under way, as far as everyone else can tell.
        let running = pending.syncing.lock().expect("sync turn");
        let (noted_tx, noted_rx) = std::sync::mpsc::channel();
        let noter = {
            let (pending, dir) = (pending.clone(), root.path().to_path_buf());
            std::thread::spawn(move || {
                pending.add([dir]);
                noted_tx.send(()).expect("send");
            })
        };
        noted_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("add returned while a sync was running");
        noter.join().expect("noter");

        let (synced_tx, synced_rx) = std::sync::mpsc::channel();
        let syncer = {
            let pending = pending.clone();
            std::thread::spawn(move || synced_tx.send(pending.sync()).expect("send"))
        };
        assert!(
            synced_rx
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a second sync waits for the running one"
        );
        assert_eq!(pending.len(), 1, "nothing taken yet");
        drop(running);
        synced_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the second sync ran")
            .expect("synced");
        syncer.join().expect("syncer");
        assert!(pending.is_empty());
    }
}
