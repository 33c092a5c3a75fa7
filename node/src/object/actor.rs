//! One object's actor: executes its requests in order, hands each commit to its slot (which logs
//! it and replicates it), and holds responses at the output gate until a quorum has them.

use super::db::{Committed, ObjectDb, WalReuse};
use super::gate::Gate;
use super::registry::{ObjectEnv, ObjectHandle};
use super::{Reply, Request, kv, sql};
use crate::cluster::Cluster;
use crate::cluster::checkpointer::{DbFile, Durable};
use crate::cluster::slot::Slot;
use crate::error::ApiError;
use crate::lsn::Lsn;
use crate::storage::record::{Checkpoint, Entry, ObjectKey, RecordKind, SlotPos};
use crate::storage::recovery;
use serde_json::json;
use std::fs::File;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a request may run on the caller's (async) thread before it is rolled back and
/// handed to a blocking thread with its full time limit. Most requests take tens of
/// microseconds; the hand-off to a blocking thread and back costs about as much again.
const INLINE_BUDGET: Duration = Duration::from_millis(1);

/// Work for an actor.
pub enum Job {
    Client {
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    /// Close the database (idle, evicted, or its slot moved away); the object stays addressable.
    Close(Option<oneshot::Sender<()>>),
    /// Checkpoint now (the node log wants to retire a segment).
    Checkpoint,
    /// A consistent copy of the database and the slot position it reflects (for a follower's sync).
    Snapshot(oneshot::Sender<Result<(Vec<u8>, Lsn), ApiError>>),
}

/// The state an actor keeps between requests. Small when the database is closed.
#[derive(Default)]
pub struct Actor {
    db: Option<ObjectDb>,
    /// Slot position of this object's newest entry (for checkpoint markers).
    last_lsn: Lsn,
    /// The ownership epoch the database was opened under. A database open from an earlier
    /// ownership must not serve: the files may have moved on through the follower path since.
    opened_epoch: u64,
}

/// A value read by key, answered as stored.
#[derive(serde::Serialize)]
struct KeyValue<'a> {
    key: &'a str,
    value: &'a serde_json::value::RawValue,
}

/// A page of a key/value list.
#[derive(serde::Serialize)]
struct KeyValues<'a> {
    entries: Vec<KeyValue<'a>>,
    cursor: Option<String>,
}

fn to_body(v: &impl serde::Serialize) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(|e| ApiError::internal(format!("cannot encode response: {e}")))
}

impl Actor {
    pub fn process(&mut self, job: Job, handle: &Arc<ObjectHandle>, env: &ObjectEnv) {
        if handle.gate.failed() {
            self.reset(handle, env);
        }
        match job {
            Job::Client { request, reply } => {
                let time_limit = handle.ns.config.limits.request_time_limit.0;
                let result = env
                    .cluster
                    .serving_slot(&handle.key)
                    .and_then(|slot| self.execute(&slot, &request, time_limit, true, handle, env));
                // Every response waits at the gate, errors included: they may reveal state that
                // is not durable yet.
                handle.gate.hold(Box::new(move |durable| {
                    let _ = reply.send(durable.and(result));
                }));
                self.maybe_checkpoint(false, WalReuse::Keep, handle, env);
            }
            Job::Close(done) => {
                self.close(handle, env);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Job::Checkpoint => self.maybe_checkpoint(true, WalReuse::Keep, handle, env),
            Job::Snapshot(reply) => {
                let _ = reply.send(self.snapshot(handle, env));
            }
        }
    }

    /// Runs a client request on the calling thread within [`INLINE_BUDGET`], when the database
    /// is open and sound. Gives the job back — nothing written, the transaction rolled back — when
    /// it cannot run here or ran out of budget; the caller then queues it for a blocking thread.
    pub fn process_inline(
        &mut self,
        job: Job,
        handle: &Arc<ObjectHandle>,
        env: &ObjectEnv,
    ) -> Option<Job> {
        let Job::Client { request, reply } = job else {
            return Some(job);
        };
        let full_limit = handle.ns.config.limits.request_time_limit.0;
        // Only what cannot wait: a slot that is not serving right now (recovering, moving)
        // makes the request wait, which is a blocking thread's job.
        let slot = env
            .cluster
            .serving_slot_now(&handle.key)
            .filter(|slot| slot.owner_epoch().unwrap_or(0) == self.opened_epoch);
        let Some(slot) = slot else {
            return Some(Job::Client { request, reply });
        };
        if matches!(request, Request::DeleteAll)
            || full_limit <= INLINE_BUDGET
            || self.db.is_none()
            || handle.gate.failed()
            || env.sync_failures.is_marked(&handle.key)
        {
            return Some(Job::Client { request, reply });
        }
        let result = self.execute(&slot, &request, INLINE_BUDGET, false, handle, env);
        if result.as_ref().is_err_and(|e| e.status == 408) {
            env.metrics.objects.inline_reruns.inc();
            return Some(Job::Client { request, reply });
        }
        env.metrics.objects.inline.inc();
        handle.gate.hold(Box::new(move |durable| {
            let _ = reply.send(durable.and(result));
        }));
        None
    }

    /// Whether the WAL has grown past the checkpoint threshold.
    pub fn wants_checkpoint(&self, env: &ObjectEnv) -> bool {
        self.db
            .as_ref()
            .is_some_and(|db| db.wal_bytes() >= env.storage.checkpoint_wal_bytes.0)
    }

    /// Opens the database if it is not open. `may_block`: this thread may wait (not an async
    /// worker running a request inline), as repairing a database that failed to sync does.
    fn open(
        &mut self,
        handle: &ObjectHandle,
        env: &ObjectEnv,
        slot: &Slot,
        may_block: bool,
    ) -> Result<&mut ObjectDb, ApiError> {
        let epoch = slot.owner_epoch().unwrap_or(0);
        if self.db.is_some() && self.opened_epoch != epoch {
            tracing::warn!(object = %handle.key, opened = self.opened_epoch, now = epoch, "database open from an earlier ownership; rebuilding it from the log");
            // Not a checkpoint: the WAL may predate entries written into the file since.
            self.rebuild_or_mark(handle, env);
        }
        if env.sync_failures.is_marked(&handle.key) {
            if !may_block {
                // Marked meanwhile: `process_inline` reruns every 408 on a blocking thread, so
                // this never reaches the client; its own code keeps it apart from a real time
                // limit in logs.
                return Err(ApiError::new(
                    408,
                    "rebuild_first",
                    "the database needs a rebuild first, on a blocking thread",
                ));
            }
            self.repair_failed_sync(handle, env);
            if env.sync_failures.is_marked(&handle.key) {
                return Err(ApiError::unavailable(
                    "storage_failed",
                    "the object's database could not be rebuilt after a storage error; try again later",
                ));
            }
        }
        if self.db.is_none() {
            if may_block {
                env.wait_for_room();
            }
            self.opened_epoch = epoch;
            let path = env.db_path(&handle.key);
            let db = ObjectDb::open(
                &path,
                handle.key.clone(),
                slot.key.clone(),
                &handle.ns.config.limits,
                &env.new_dirs,
            )?;
            env.metrics.objects.opens.inc();
            env.note_opened(handle);
            tracing::debug!(object = %handle.key, slot = %slot.key, epoch, size = db.size_bytes(), "opened");
            self.db = Some(db);
        }
        match self.db.as_mut() {
            Some(db) => Ok(db),
            None => Err(ApiError::internal("database did not open")),
        }
    }

    /// Hands a committed entry to the slot; its response waits for the quorum.
    fn submit(
        &mut self,
        entry: Entry,
        slot: &Arc<Slot>,
        handle: &Arc<ObjectHandle>,
        env: &ObjectEnv,
    ) {
        let ns = handle.ns.clone();
        let id = handle.key.id;
        let deleting = entry.kind == RecordKind::Delete;
        let quorum = handle.ns.config.replication.write_quorum;
        // A lone request (nothing else in flight on the node, nothing queued for this object)
        // would only wait: its thread writes the entry to the followers and commits the log
        // itself rather than waking the link tasks and the writer thread — hand-offs less for a
        // sequential client. Under concurrency, the thread goes on executing, and the link tasks
        // and the writer thread group the work.
        let lone = env.in_flight() <= 1 && !handle.has_queued_jobs();
        let deferred = env.log.defer_wakeups();
        let on_durable = move || {
            if !deleting {
                ns.mark_has_data(id);
            }
        };
        let submitted = submit_behind_gate(
            &handle.gate,
            slot,
            &env.cluster,
            entry,
            quorum,
            lone,
            on_durable,
        );
        if let Ok(pos) = submitted {
            self.last_lsn = pos.lsn;
        }
        if lone {
            deferred.lead();
        } else {
            drop(deferred);
        }
    }

    fn execute(
        &mut self,
        slot: &Arc<Slot>,
        request: &Request,
        time_limit: Duration,
        may_block: bool,
        handle: &Arc<ObjectHandle>,
        env: &ObjectEnv,
    ) -> Reply {
        if let Request::DeleteAll = request {
            return self.delete_all(handle, env, slot);
        }
        let db = self.open(handle, env, slot, may_block)?;
        let size_before = db.size_bytes();
        let committed: Committed<Vec<u8>> = match request {
            Request::Sql(plan) => db.transaction(time_limit, |tx| {
                if plan.batch {
                    let results = plan
                        .statements
                        .iter()
                        .enumerate()
                        .map(|(i, s)| sql::execute(tx, s, Some(i)))
                        .collect::<Result<Vec<_>, _>>()?;
                    to_body(&json!({ "results": results }))
                } else {
                    let Some(statement) = plan.statements.first() else {
                        return Err(ApiError::bad_request("invalid_request", "no statement"));
                    };
                    to_body(&sql::execute(tx, statement, None)?)
                }
            })?,
            Request::KvGet(key) => db.transaction(time_limit, |tx| match kv::get(tx, key)? {
                Some(value) => to_body(&KeyValue { key, value: &value }),
                None => Err(ApiError::not_found(
                    "key_not_found",
                    format!("no value under key {key:?}"),
                )),
            })?,
            Request::KvPut { key, encoded } => db.transaction(time_limit, |tx| {
                kv::put(tx, key, encoded)?;
                to_body(&json!({ "key": key, "stored": true }))
            })?,
            Request::KvDelete(key) => db.transaction(time_limit, |tx| {
                let deleted = kv::delete(tx, key)?;
                to_body(&json!({ "key": key, "deleted": deleted }))
            })?,
            Request::KvList(opts) => db.transaction(time_limit, |tx| {
                let page = kv::list(tx, opts)?;
                let entries: Vec<_> = page
                    .entries
                    .iter()
                    .map(|(key, value)| KeyValue { key, value })
                    .collect();
                to_body(&KeyValues {
                    entries,
                    cursor: page.cursor,
                })
            })?,
            Request::KvBatch { batch, puts } => {
                db.transaction(time_limit, |tx| to_body(&kv::apply_batch(tx, batch, puts)?))?
            }
            Request::Info => Committed {
                value: to_body(&json!({
                    "id": handle.key.id.to_hex(),
                    "namespace": &*handle.key.namespace,
                    "sizeBytes": if db.is_empty()? { 0 } else { db.size_bytes() },
                }))?,
                pages: None,
            },
            Request::DeleteAll => unreachable!("handled above"),
        };
        let size_after = db.size_bytes();
        env.metrics
            .objects
            .database_bytes
            .inc_by(size_after as i64 - size_before as i64);
        if let Some(pages) = committed.pages {
            self.submit(pages.entry, slot, handle, env);
        }
        Ok(committed.value)
    }

    /// Deletes all of the object's data: the delete is made durable on a quorum first, then the
    /// files go, so a crash in between replays the delete rather than resurrecting half a
    /// database.
    fn delete_all(
        &mut self,
        handle: &Arc<ObjectHandle>,
        env: &ObjectEnv,
        slot: &Arc<Slot>,
    ) -> Reply {
        let size = self.db.as_ref().map_or(0, ObjectDb::size_bytes);
        self.submit(Entry::delete(&handle.key, &slot.key), slot, handle, env);
        let delete_lsn = handle.gate.wait_settled()?;
        if self.db.take().is_some() {
            env.note_closed(handle);
        }
        let path = env.db_path(&handle.key);
        let existed = path.exists();
        recovery::remove_database_files(&path)
            .map_err(|e| ApiError::internal(format!("cannot remove {}: {e}", path.display())))?;
        env.sync_failures.forget(&handle.key);
        // The marker lets the log drop the delete entry, so the removal must be durable first:
        // otherwise a power cut could bring the old database back with nothing left to delete it.
        // No directory: the object never had a file. A pending directory that does not exist
        // would hold back every marker of the node.
        if let Some(dir) = path.parent().filter(|d| d.is_dir()) {
            env.new_dirs.add([dir.to_path_buf()]);
        }
        log_marker_once_durable(env, None, handle.key.clone(), delete_lsn, self.last_lsn);
        handle.ns.mark_empty(&handle.key.id);
        env.metrics.objects.database_bytes.dec_by(size as i64);
        to_body(&json!({ "id": handle.key.id.to_hex(), "deleted": existed }))
    }

    /// Checkpoints the WAL into the database file once it is large (or when `force`d), but only
    /// frames the node log already holds durably. Only a closing object releases its `-wal`
    /// file's space: forced checkpoints also come to busy objects (a WAL past the threshold,
    /// or one holding back the node log's retirement), which would grow it again at once.
    fn maybe_checkpoint(
        &mut self,
        force: bool,
        reuse: WalReuse,
        handle: &ObjectHandle,
        env: &ObjectEnv,
    ) {
        if env.sync_failures.is_marked(&handle.key) {
            // No marker could be logged; the log may want this object's entries retired.
            if env.cluster.serving_slot_now(&handle.key).is_some() {
                self.repair_failed_sync(handle, env);
            } else if self.db.is_some() {
                // Not serving: the applier repairs the file if the slot is followed here. The
                // `-wal` must not outlive the connection (SQLite would replay it over the
                // rebuilt file at the next open); the log holds everything in it.
                let _ = handle.gate.wait_settled();
                self.db = None;
                env.note_closed(handle);
                if let Err(e) = recovery::discard_wal(&env.db_path(&handle.key)) {
                    tracing::error!(object = %handle.key, error = %e, "cannot discard the -wal of a database that failed to sync");
                }
            }
            return;
        }
        let threshold = env.storage.checkpoint_wal_bytes.0;
        let Some(db) = self.db.as_mut() else { return };
        let wal = db.wal_bytes();
        if wal == 0 || (!force && wal < threshold) {
            return;
        }
        // Without waiting, only when everything is durable already; past 4x the threshold (or
        // when forced), wait for the quorum.
        if handle.gate.pending() && !force && wal < threshold.saturating_mul(4) {
            return;
        }
        let Ok(upto) = handle.gate.wait_settled() else {
            return;
        };
        match db.checkpoint(reuse) {
            Ok(Some(file)) => {
                env.metrics.objects.checkpoints.inc();
                // Only the log position: the object's newest slot position may belong to an entry
                // that never became durable, and a skip by slot position could hide its successor.
                log_marker_once_durable(env, Some(file), handle.key.clone(), upto, Lsn::ZERO);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(object = %handle.key, error = %e, "checkpoint failed; will retry")
            }
        }
    }

    /// For a follower's snapshot sync: the database as of now, and the slot position it reflects
    /// (every entry of this object up to the slot's current position is in it: only this actor
    /// produces them).
    fn snapshot(
        &mut self,
        handle: &ObjectHandle,
        env: &ObjectEnv,
    ) -> Result<(Vec<u8>, Lsn), ApiError> {
        let slot = env.cluster.snapshot_slot(&handle.key)?;
        let path = env.db_path(&handle.key);
        if self.db.is_none() && !path.exists() {
            return Err(ApiError::not_found("no_object", "the object holds no data"));
        }
        self.open(handle, env, &slot, true)?;
        handle.gate.wait_settled()?;
        let Some(db) = self.db.as_mut() else {
            return Err(ApiError::internal("database did not open"));
        };
        db.checkpoint(WalReuse::Release)?;
        let bytes = db.read_file()?;
        let lsn = slot.lock().appended.lsn;
        Ok((bytes, lsn))
    }

    fn close(&mut self, handle: &ObjectHandle, env: &ObjectEnv) {
        if self.db.is_none() {
            return;
        }
        self.maybe_checkpoint(true, WalReuse::Release, handle, env);
        if handle.gate.failed() {
            self.reset(handle, env);
        }
        let empty = self
            .db
            .as_ref()
            .is_some_and(|db| db.wal_bytes() == 0 && db.is_empty().unwrap_or(false));
        if self.db.take().is_some() {
            env.note_closed(handle);
            env.metrics.objects.evictions.inc();
        }
        if empty {
            // Opened only to be read: it holds no data, so leave nothing behind.
            let _ = recovery::remove_database_files(&env.db_path(&handle.key));
        }
    }

    /// After a commit could not be made durable on a quorum: forget everything not in the local
    /// log, rebuild the database file from it, and serve again.
    fn reset(&mut self, handle: &ObjectHandle, env: &ObjectEnv) {
        env.metrics.objects.resets.inc();
        let _ = handle.gate.wait_settled();
        self.rebuild_or_mark(handle, env);
        handle.gate.clear_failure();
        tracing::warn!(object = %handle.key, "object reset after a write did not reach a quorum");
    }

    /// The database file failed to sync (here, or in the follower's checkpointer before a
    /// promotion): pages of it may be lost while the cache still shows them. Rebuilt from the
    /// node log, which kept every entry since the last good marker, before anything reads it;
    /// then a marker lets the log retire those entries. Only on a node serving the object (the
    /// applier writes a followed one's file). If the rebuild fails, the next open tries again.
    fn repair_failed_sync(&mut self, handle: &ObjectHandle, env: &ObjectEnv) {
        if handle.gate.wait_settled().is_err() {
            return; // a failed write resets the object first (see `process`)
        }
        let mut replayed_below = 0;
        let rebuilt = env.sync_failures.repair(&handle.key, || {
            replayed_below = self.rebuild(handle, env)?;
            Ok(())
        });
        if let Ok(true) = rebuilt {
            env.metrics.objects.resets.inc();
            // The replay synced the file (and may have created it): it holds every record of
            // the object below `replayed_below`.
            if let Some(dir) = env.db_path(&handle.key).parent() {
                env.new_dirs.add([dir.to_path_buf()]);
            }
            if replayed_below > 0 {
                let upto = replayed_below - 1;
                log_marker_once_durable(env, None, handle.key.clone(), upto, Lsn::ZERO);
            }
        }
    }

    /// [`Actor::rebuild`], outside a repair: a rebuild that fails (its replay's sync included)
    /// leaves a file that may lack pages, so the object is marked like one whose sync failed.
    fn rebuild_or_mark(&mut self, handle: &ObjectHandle, env: &ObjectEnv) {
        if self.rebuild(handle, env).is_err() {
            env.sync_failures.mark_failed(&handle.key);
        }
    }

    /// Closes the database without checkpointing, discards its WAL, and replays the node log
    /// into the file: afterwards the file holds exactly what the log holds durably, synced.
    /// Returns the log position the replay read up to (records below it).
    fn rebuild(&mut self, handle: &ObjectHandle, env: &ObjectEnv) -> std::io::Result<u64> {
        if self.db.take().is_some() {
            env.note_closed(handle);
        }
        let path = env.db_path(&handle.key);
        let below = env.log.shared().durable_lsn();
        let replayed = recovery::discard_wal(&path)
            .and_then(|()| recovery::replay_object(&env.log_dir, &handle.key, &path, below, None));
        if let Err(e) = &replayed {
            tracing::error!(object = %handle.key, error = %e, "cannot rebuild the object from the node log");
        }
        replayed.map(|_| below)
    }
}

/// Hands a committed entry to its slot behind the object's output gate. The commit's ticket
/// settles once a quorum holds the entry (after `on_durable`), or fails with the slot's error.
/// If the slot refuses the entry at once (ownership moved, or the lease lapsed), the ticket
/// fails at once: the gate then fails, and the object resets before its next request. The
/// refusal answers only this commit and those after it; earlier ones keep their own outcome
/// (see [`Gate`]).
pub(crate) fn submit_behind_gate(
    gate: &Arc<Gate>,
    slot: &Arc<Slot>,
    cluster: &Arc<Cluster>,
    entry: Entry,
    quorum: usize,
    lone: bool,
    on_durable: impl FnOnce() + Send + 'static,
) -> Result<SlotPos, ApiError> {
    let ticket = gate.submit();
    let settles = gate.clone();
    let done = Box::new(move |result: Result<u64, ApiError>| {
        if result.is_ok() {
            on_durable();
        }
        settles.settle(ticket, result);
    });
    slot.append(cluster, entry, quorum, lone, done)
        .inspect_err(|e| gate.settle(ticket, Err(e.clone())))
}

/// Logs the object's checkpoint marker once `file` (the checkpointed database, if any) and the
/// node's pending directories are durable (see `storage::dirs`), on the node's marker thread so
/// the object keeps serving meanwhile. Until then, or if that fails, the log keeps covering it.
fn log_marker_once_durable(
    env: &ObjectEnv,
    file: Option<Arc<File>>,
    object: ObjectKey,
    upto: u64,
    slot_lsn: Lsn,
) {
    let file = match file {
        Some(file) => DbFile::Open {
            path: env.db_path(&object),
            file,
        },
        None => DbFile::Nothing,
    };
    env.markers.submit(Durable {
        files: vec![(
            file,
            Checkpoint {
                object,
                upto,
                slot_lsn,
            },
        )],
        done: None,
    });
}
