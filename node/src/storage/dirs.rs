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
//! Files that exist when the node starts have durable names: recovery syncs the filesystem.

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Default)]
pub struct PendingDirs {
    /// Held while syncing, so that a caller that finds the set empty knows every earlier entry
    /// is durable (not merely being synced by another thread).
    dirs: Mutex<BTreeSet<PathBuf>>,
}

impl PendingDirs {
    /// Notes directories that gained entries.
    pub fn add(&self, dirs: impl IntoIterator<Item = PathBuf>) {
        let mut pending = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        pending.extend(dirs);
    }

    /// Syncs every pending directory. On an error the ones not yet synced stay pending.
    pub fn sync(&self) -> io::Result<()> {
        let mut pending = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(dir) = pending.first().cloned() {
            super::segments::sync_dir(&dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
            pending.remove(&dir);
        }
        Ok(())
    }

    /// The directories still pending, in order.
    #[cfg(test)]
    pub fn pending(&self) -> Vec<PathBuf> {
        self.dirs
            .lock()
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.dirs.lock().map(|d| d.len()).unwrap_or_default()
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
}
