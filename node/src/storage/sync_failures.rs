//! Objects whose database file failed to sync, and that get no checkpoint marker until the file
//! has been rebuilt from the node log.
//!
//! When writeback of a file fails, Linux may drop the dirty pages (the cache then holds them as
//! clean, until evicted) and reports the error to a sync only once. A later sync of the same file
//! can succeed with those pages never written. A checkpoint marker logged after that later sync
//! would tell recovery the file holds entries it lost, and let the log retire them: acknowledged
//! writes gone. So the first failure marks the object here, and from then on every marker for it
//! is held back, by whichever thread would log it (the marker thread for the objects the node
//! serves, the follower's checkpointer): the log keeps every entry since the object's last good
//! marker.
//!
//! The mark goes when the file is rebuilt from those entries (a serving object does this before
//! its next request, a follower's applier at the object's next entry, a restart's recovery for
//! every object) or replaced: removed by a delete, or installed by a snapshot sync.
//!
//! Syncing a file and checking the mark happen under the object's lock, so a failure found by one
//! thread is seen by any marker logged after it.

use crate::storage::record::ObjectKey;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::io;
use std::sync::{Mutex, MutexGuard};

/// Locks shared by objects with the same hash: one per object would need cleaning up, and the
/// sections they guard are rare (a checkpoint, a rebuild).
const STRIPES: usize = 64;

pub struct SyncFailures {
    marked: Mutex<HashSet<ObjectKey>>,
    stripes: [Mutex<()>; STRIPES],
    hasher: std::collections::hash_map::RandomState,
    /// The number of marked objects, for `/metrics`, and read without a lock on every request.
    gauge: Gauge,
    /// Objects whose next sync fails, for tests of a whole node (no disk here fails on demand).
    #[cfg(test)]
    fail_next: Mutex<HashSet<ObjectKey>>,
    /// Objects marked just after the next check of their mark, for tests of a whole node.
    #[cfg(test)]
    mark_after_check: Mutex<HashSet<ObjectKey>>,
}

impl Default for SyncFailures {
    fn default() -> Self {
        SyncFailures::new(Gauge::default())
    }
}

impl SyncFailures {
    pub fn new(gauge: Gauge) -> SyncFailures {
        SyncFailures {
            marked: Mutex::default(),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            hasher: Default::default(),
            gauge,
            #[cfg(test)]
            fail_next: Mutex::default(),
            #[cfg(test)]
            mark_after_check: Mutex::default(),
        }
    }

    /// Makes the next sync of `key`'s database file fail, as a lost writeback would.
    #[cfg(test)]
    pub fn fail_next_sync(&self, key: &ObjectKey) {
        self.fail_next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
    }

    #[cfg(not(test))]
    fn run_sync(&self, _key: &ObjectKey, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        sync()
    }

    #[cfg(test)]
    fn run_sync(&self, key: &ObjectKey, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let injected = self
            .fail_next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if injected {
            return Err(io::Error::other("injected writeback error"));
        }
        sync()
    }

    fn lock_object(&self, key: &ObjectKey) -> MutexGuard<'_, ()> {
        let stripe = (self.hasher.hash_one(key) % STRIPES as u64) as usize;
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self) -> MutexGuard<'_, HashSet<ObjectKey>> {
        self.marked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key`'s file failed to sync and has not been rebuilt since. Cheap when no object
    /// is marked.
    pub fn is_marked(&self, key: &ObjectKey) -> bool {
        let marked = self.gauge.get() > 0 && self.set().contains(key);
        #[cfg(test)]
        if self
            .mark_after_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
        {
            // Not `mark_failed`: callers may hold the object's lock already.
            self.mark(key);
        }
        marked
    }

    /// Marks `key` right after the next check of its mark answers (unmarked): as if a sync of its
    /// file failed on another thread in that moment, which no test can time.
    #[cfg(test)]
    pub fn mark_after_next_check(&self, key: &ObjectKey) {
        self.mark_after_check
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
    }

    fn mark(&self, key: &ObjectKey) {
        if self.set().insert(key.clone()) {
            self.gauge.inc();
        }
    }

    fn unmark(&self, key: &ObjectKey) {
        if self.set().remove(key) {
            self.gauge.dec();
        }
    }

    fn held_back(key: &ObjectKey) -> io::Error {
        io::Error::other(format!(
            "{key}: an earlier sync of its database failed; its markers wait until the file is rebuilt from the log"
        ))
    }

    /// Syncs `key`'s database file with `sync`, for a marker to follow. A failure marks the
    /// object; a marked object is not synced at all.
    pub fn sync_file(
        &self,
        key: &ObjectKey,
        sync: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let _object = self.lock_object(key);
        if self.is_marked(key) {
            return Err(Self::held_back(key));
        }
        self.run_sync(key, sync).map_err(|e| {
            self.mark(key);
            tracing::error!(object = %key, error = %e, "a database file failed to sync; its checkpoint markers are held back until it is rebuilt from the node log");
            io::Error::new(e.kind(), format!("{key}: {e}"))
        })
    }

    /// Logs `key`'s marker with `log`, unless the object was marked since its file was synced.
    pub fn log_marker(&self, key: &ObjectKey, log: impl FnOnce()) -> io::Result<()> {
        let _object = self.lock_object(key);
        if self.is_marked(key) {
            return Err(Self::held_back(key));
        }
        log();
        Ok(())
    }

    /// Rebuilds a marked object's file with `rebuild` (which must leave it durable), and
    /// unmarks it if that worked. Whether it rebuilt: an object unmarked meanwhile is left alone.
    pub fn repair(
        &self,
        key: &ObjectKey,
        rebuild: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<bool> {
        let _object = self.lock_object(key);
        if !self.is_marked(key) {
            return Ok(false);
        }
        rebuild()?;
        self.unmark(key);
        tracing::info!(object = %key, "database rebuilt from the node log after a failed sync; its markers resume");
        Ok(true)
    }

    /// Marks `key` as if its sync had failed: a rebuild of its file failed, and the file may lack
    /// pages the log still has.
    pub fn mark_failed(&self, key: &ObjectKey) {
        let _object = self.lock_object(key);
        self.mark(key);
    }

    /// The object's files were removed (a delete): nothing of them is left to lose.
    pub fn forget(&self, key: &ObjectKey) {
        let _object = self.lock_object(key);
        self.unmark(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;

    fn key(n: u8) -> ObjectKey {
        ObjectKey::new("ns".into(), ObjectId::from_bytes([n; 32]))
    }

    fn failing() -> io::Result<()> {
        Err(io::Error::other("injected writeback error"))
    }

    /// After one failed sync, the object's later syncs are not even tried and its markers are
    /// held back, whatever a later sync would say; other objects are not affected.
    #[test]
    fn a_failed_sync_holds_back_the_objects_markers_until_a_rebuild() {
        let gauge = Gauge::default();
        let failures = SyncFailures::new(gauge.clone());
        let (a, b) = (key(1), key(2));
        let mut logged = Vec::new();

        failures.sync_file(&a, || Ok(())).expect("a clean sync");
        failures.log_marker(&a, || logged.push(1)).expect("logged");
        assert!(failures.sync_file(&a, failing).is_err());
        assert!(failures.is_marked(&a) && !failures.is_marked(&b));
        assert_eq!(gauge.get(), 1, "reported in the metrics");

        let mut tried = false;
        let later = failures.sync_file(&a, || {
            tried = true;
            Ok(())
        });
        assert!(
            later.is_err() && !tried,
            "a marked object's file is not synced"
        );
        assert!(failures.log_marker(&a, || logged.push(2)).is_err());
        failures
            .sync_file(&b, || Ok(()))
            .expect("another object syncs");
        failures
            .log_marker(&b, || logged.push(3))
            .expect("and logs");
        assert_eq!(logged, vec![1, 3]);

        assert!(failures.repair(&a, failing).is_err());
        assert!(failures.is_marked(&a), "a failed rebuild keeps the mark");
        assert!(failures.repair(&a, || Ok(())).expect("rebuilt"));
        assert!(!failures.is_marked(&a));
        assert_eq!(gauge.get(), 0);
        failures
            .log_marker(&a, || logged.push(4))
            .expect("markers resume");
        assert_eq!(logged, vec![1, 3, 4]);
    }

    /// A sync that succeeded does not let a marker through once another thread has found the
    /// file failing in between: the check is made again when the marker is logged.
    #[test]
    fn a_failure_found_between_a_sync_and_its_marker_holds_the_marker_back() {
        let failures = SyncFailures::default();
        let a = key(1);
        failures.sync_file(&a, || Ok(())).expect("synced");
        assert!(
            failures.sync_file(&a, failing).is_err(),
            "another thread's sync"
        );
        let mut logged = false;
        assert!(failures.log_marker(&a, || logged = true).is_err());
        assert!(!logged);
    }

    #[test]
    fn a_removed_object_is_forgotten_and_repairing_an_unmarked_one_does_nothing() {
        let failures = SyncFailures::default();
        let a = key(1);
        let _ = failures.sync_file(&a, failing);
        failures.forget(&a);
        assert!(!failures.is_marked(&a));
        let mut rebuilt = false;
        let repaired = failures
            .repair(&a, || {
                rebuilt = true;
                Ok(())
            })
            .expect("nothing to do");
        assert!(!rebuilt && !repaired);
    }
}
