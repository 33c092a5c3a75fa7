//! Snapshot sync: a follower whose position is not in its owner's recent history (too far
//! behind, or diverged after a failover) replaces its copy of the slot with the owner's.
//!
//! 1. Stop taking entries for the slot and let the applier finish what it has.
//! 2. Ask the owner for a manifest: its position `P` first, then every object of the slot it holds
//!    (an object with an entry at or before `P` already has a file when the list is taken).
//! 3. Fetch each object's database as of its last entry `L` and install it; an object that only
//!    this node has is deleted. `L` may be newer than `P`: entries of that object up to `L` that
//!    still arrive in the stream are skipped (the object's *floor*, journaled).
//! 4. Make the files durable (each synced before it is renamed into place, then the directories
//!    naming them), journal the floors and the new position `P`, and resume: the owner streams
//!    from `P`.

use super::Cluster;
use crate::error::ApiError;
use crate::id::ObjectId;
use crate::lsn::Lsn;
use crate::storage::dirs::entries;
use crate::storage::layout;
use crate::storage::log::Append;
use crate::storage::record::{
    Checkpoint, ObjectKey, RecordKind, SlotKey, SlotPos, encode_checkpoint,
};
use crate::storage::recovery::remove_database_files;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestObject {
    pub namespace: String,
    pub id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub epoch: u64,
    pub seq: u64,
    pub chain: u64,
    pub objects: Vec<ManifestObject>,
}

/// Header carrying a snapshot's slot position (`epoch/seq`).
pub const SNAPSHOT_LSN_HEADER: &str = "x-colony-lsn";

/// Objects of `slot` with a database file under `objects_dir`. Only the shards that can hold
/// them are read (with the default 1,024 slots, one directory of 256 per namespace). A directory
/// that cannot be read is an error, not an empty one: a follower deletes what the owner's list
/// leaves out.
pub fn local_objects(
    cl: &Cluster,
    objects_dir: &Path,
    slot: &SlotKey,
) -> std::io::Result<Vec<ObjectKey>> {
    let mut out = Vec::new();
    let map = cl.placement();
    let wanted = layout::shards_of_slot(slot.slot, map.slot_count);
    for ns in entries(objects_dir)? {
        if !ns.file_type()?.is_dir() {
            continue;
        }
        let ns_name = ns.file_name().to_string_lossy().to_string();
        let shard_dirs: Vec<PathBuf> = match &wanted {
            Some(shards) => shards.iter().map(|s| ns.path().join(s)).collect(),
            None => entries(&ns.path())?.iter().map(|s| s.path()).collect(),
        };
        for shard in shard_dirs {
            for f in entries(&shard)? {
                let name = f.file_name().to_string_lossy().to_string();
                let Some(Ok(id)) = name.strip_suffix(".db").map(str::parse::<ObjectId>) else {
                    continue;
                };
                let in_slot = cl
                    .home_colo(&map, &id)
                    .is_ok_and(|colo| *colo == *slot.colo && id.slot(map.slot_count) == slot.slot);
                if in_slot {
                    out.push(ObjectKey::new(ns_name.as_str().into(), id));
                }
            }
        }
    }
    Ok(out)
}

/// The owner's side: its position, then the objects it holds (see the module comment for why
/// this order makes the list complete).
pub fn manifest(cl: &Arc<Cluster>, slot: &SlotKey) -> Result<Manifest, ApiError> {
    let s = cl.slot(slot);
    // Only an owner whose files hold all it has (see `Slot::can_snapshot`), its position read
    // under the same lock: before its applier
    // has written every object's file, the list would miss some, and a follower deletes what the
    // manifest does not list.
    let Some(pos) = s.snapshot_position() else {
        return Err(ApiError::unavailable(
            "not_owner",
            format!("this node does not serve slot {slot} right now"),
        ));
    };
    let objects = local_objects(cl, &cl.data_dir.join("objects"), slot)
        .map_err(|e| ApiError::internal(format!("cannot list the objects of slot {slot}: {e}")))?
        .into_iter()
        .map(|o| ManifestObject {
            namespace: o.namespace.to_string(),
            id: o.id.to_hex(),
        })
        .collect();
    Ok(Manifest {
        epoch: pos.lsn.epoch,
        seq: pos.lsn.seq,
        chain: pos.chain,
        objects,
    })
}

fn parse_lsn(v: &str) -> Option<Lsn> {
    let (e, s) = v.split_once('/')?;
    Some(Lsn::new(e.parse().ok()?, s.parse().ok()?))
}

/// Runs a sync of `slot` from its current owner.
pub async fn sync_slot(cl: &Arc<Cluster>, key: &SlotKey) -> Result<(), String> {
    let map = cl.placement();
    let owner = map
        .replicas_of(&key.colo, key.slot)
        .map(|r| r.owner.clone())
        .ok_or("the slot has no owner")?;
    if owner == cl.me {
        return Err("this node owns the slot".into());
    }
    let address = cl
        .address_of(&owner)
        .ok_or("the owner's address is unknown")?;
    let slot = cl.slot(key);
    slot.set_syncing(true);
    let result = run(cl, key, &owner, &address).await;
    slot.set_syncing(false);
    if let Ok(pos) = &result {
        cl.metrics.replication.syncs_completed.inc();
        tracing::info!(slot = %key, from = owner, position = %pos.lsn, "snapshot sync complete");
    }
    result.map(|_| ())
}

async fn run(
    cl: &Arc<Cluster>,
    key: &SlotKey,
    owner: &str,
    address: &str,
) -> Result<SlotPos, String> {
    let slot = cl.slot(key);
    // Whatever was queued for this slot must land before snapshots replace the files.
    let applier = cl.applier.clone();
    tokio::task::spawn_blocking(move || applier.flush())
        .await
        .map_err(|e| e.to_string())?;
    // From here until the final position is journaled, a restart must sync again.
    let journal = cl.journal.clone();
    let started = super::journal::Line::SyncStarted {
        colo: key.colo.to_string(),
        slot: key.slot,
    };
    tokio::task::spawn_blocking(move || journal.record(&[started]))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot journal the sync start: {e}"))?;
    let base = format!("http://{address}");
    let manifest: Manifest = cl
        .peers
        .get_json(
            &format!(
                "{base}/v1/internal/slots/{}/{}/manifest",
                key.colo, key.slot
            ),
            Duration::from_secs(30),
        )
        .await?;
    let objects_dir = cl.data_dir.join("objects");
    // Directories whose entries the sync changes, synced before the floors are journaled.
    let mut changed_dirs: HashSet<std::path::PathBuf> = HashSet::new();
    let mut floors: HashMap<ObjectKey, Lsn> = HashMap::new();
    let mut wanted: HashSet<ObjectKey> = HashSet::new();
    for o in &manifest.objects {
        let id: ObjectId =
            o.id.parse()
                .map_err(|_| format!("bad object id {} in manifest", o.id))?;
        let object = ObjectKey::new(o.namespace.as_str().into(), id);
        let url = format!(
            "{base}/v1/internal/objects/{}/{}/snapshot",
            o.namespace, o.id
        );
        let resp = cl
            .peers
            .send(
                hyper::Method::GET,
                &url,
                &[],
                bytes::Bytes::new(),
                Duration::from_secs(60),
            )
            .await?;
        if resp.status.as_u16() == 404 {
            continue; // deleted meanwhile: a delete entry follows in the stream
        }
        if !resp.status.is_success() {
            return Err(format!("{url}: {}", resp.status));
        }
        let lsn = resp
            .headers
            .get(SNAPSHOT_LSN_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_lsn)
            .ok_or_else(|| format!("{url}: no {SNAPSHOT_LSN_HEADER} header"))?;
        let path = crate::object::db_path(&objects_dir, &object);
        changed_dirs.extend(path.parent().map(Path::to_path_buf));
        let body = resp.body;
        let p = path.clone();
        tokio::task::spawn_blocking(move || install(&p, &body))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot install {}: {e}", path.display()))?;
        if let Some(ns) = cl.namespaces.get(&o.namespace) {
            ns.mark_has_data(id);
        }
        floors.insert(object.clone(), lsn);
        wanted.insert(object);
    }
    // What only this node had is not the owner's history.
    let locals = local_objects(cl, &objects_dir, key)
        .map_err(|e| format!("cannot list this node's objects of the slot: {e}"))?;
    for local in locals {
        if !wanted.contains(&local) {
            let path = crate::object::db_path(&objects_dir, &local);
            remove_database_files(&path).map_err(|e| e.to_string())?;
            changed_dirs.extend(path.parent().map(Path::to_path_buf));
            if let Some(ns) = cl.namespaces.get(&*local.namespace) {
                ns.mark_empty(&local.id);
            }
        }
    }
    let position = SlotPos {
        lsn: Lsn::new(manifest.epoch, manifest.seq),
        chain: manifest.chain,
    };
    let root = cl.data_dir.clone();
    tokio::task::spawn_blocking(move || crate::storage::dirs::sync_dirs_up_to(changed_dirs, &root))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot sync the synced objects' directories: {e}"))?;
    // Installed files are new and durable: an earlier failed sync of the old ones lost nothing
    // they still need.
    for object in floors.keys() {
        cl.applier.sync_failures().forget(object);
    }
    let mut lines: Vec<super::journal::Line> = floors
        .iter()
        .map(|(o, l)| super::journal::Line::floor(key, o, *l))
        .collect();
    lines.push(super::journal::Line::position(key, position));
    let journal = cl.journal.clone();
    tokio::task::spawn_blocking(move || journal.record(&lines))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot journal the sync: {e}"))?;
    // Installed files are durable: older log records of these objects must not be replayed.
    let upto = cl.log.shared().durable_lsn();
    for (object, lsn) in &floors {
        let c = Checkpoint {
            object: object.clone(),
            upto,
            slot_lsn: *lsn,
        };
        cl.log.append(Append {
            kind: RecordKind::Checkpoint,
            object: object.clone(),
            fence: None,
            payload: encode_checkpoint(&c).into(),
            lazy: false,
            done: Box::new(|_| {}),
        });
    }
    slot.reset_position(position, floors);
    tracing::debug!(slot = %key, owner, "installed the owner's snapshot");
    Ok(position)
}

/// Replaces a database file atomically, its content durable, and drops stale companions. The new
/// name is durable once the caller syncs the directory.
fn install(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        crate::storage::dirs::create_dir_all_durable(dir)?;
    }
    let tmp = path.with_extension("sync");
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    crate::storage::recovery::discard_wal(path)
}
