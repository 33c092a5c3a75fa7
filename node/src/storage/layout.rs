//! Where an object's database file lives: `objects/<namespace>/<shard>/<id>.db`.
//!
//! The shard is the ID's last byte, in hex: up to 256 directories per namespace. The last bytes
//! of every ID are its MAC, uniformly distributed whatever the kind of ID, so a namespace's
//! objects spread evenly over them. Nodes before this layout sharded by the first byte, which is
//! the ID's kind: every named object of a namespace shared one directory, every unique one
//! another. [`place_object_files`] moves files found in another shard into their own when the
//! node starts, before recovery opens them.

use super::dirs::{create_dir_all_durable, entries, sync_dirs_up_to};
use super::record::ObjectKey;
use crate::id::{ID_LEN, KIND_NAMED, KIND_UNIQUE, ObjectId};
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The shard directory name of `id`.
pub fn shard(id: &ObjectId) -> String {
    format!("{:02x}", id.as_bytes()[ID_LEN - 1])
}

/// `objects/<namespace>/<shard>/<id>.db`
pub fn db_path(objects_dir: &Path, key: &ObjectKey) -> PathBuf {
    objects_dir
        .join(&*key.namespace)
        .join(shard(&key.id))
        .join(format!("{}.db", key.id.to_hex()))
}

/// The shards that can hold objects of `slot` among `slot_count` slots, or `None` for all of
/// them. An ID's slot is a number ending in its last byte modulo `slot_count` (see
/// [`ObjectId::slot`]); when `slot_count` is a power of two the slot's low bits are the byte's,
/// so a slot's objects lie in one shard (256 slots or more) or in `256 / slot_count`.
pub fn shards_of_slot(slot: u32, slot_count: u32) -> Option<Vec<String>> {
    if !slot_count.is_power_of_two() {
        return None;
    }
    let step = slot_count.min(256);
    let first = slot % step;
    Some(
        (first..256)
            .step_by(step as usize)
            .map(|byte| format!("{byte:02x}"))
            .collect(),
    )
}

/// The shards of the first-byte layout, one per kind of ID: the only directories a file of it
/// can be in, so a start reads 2 of each namespace's 256 shards rather than every file.
const OLD_SHARDS: [u8; 2] = [KIND_UNIQUE, KIND_NAMED];

/// What [`place_object_files`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Database files moved into their own shard.
    pub moved: usize,
}

/// Moves every object database file of the first-byte layout under `objects_dir` into its own
/// shard, durably. Every file first gets its new name (a hard link), the new
/// names are made durable, and only then are the old names removed and that made durable: a power
/// cut at any point leaves each file under at least one durable name, and a later start finishes
/// the move. (A rename would not do: with the old layout one directory can both gain and lose
/// names, and syncing it could make a removal durable before the matching addition.) An old name
/// found beside a new one of the same file is removed; two different files of one object stop
/// the start with an error naming both, since neither can be known to be the object's.
///
/// Only `<id>.db` moves. Its `-wal`, `-shm` and `-journal` companions stay behind for the startup
/// scan to discard (the node log supersedes them), and names that are not an object ID are left
/// alone. Must run before anything opens an object's file. A node of the older layout does not
/// find files moved this way: going back to one is not supported.
pub fn place_object_files(objects_dir: &Path) -> io::Result<Placed> {
    let mut linked: Vec<PathBuf> = Vec::new();
    let mut gained = BTreeSet::new();
    for ns_dir in subdirectories(objects_dir)? {
        for kind in OLD_SHARDS {
            let shard_dir = ns_dir.join(format!("{kind:02x}"));
            for entry in entries(&shard_dir)? {
                let name = entry.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".db"))
                    .and_then(|hex| hex.parse::<ObjectId>().ok())
                else {
                    continue;
                };
                let home = ns_dir.join(shard(&id));
                if home == shard_dir || !entry.file_type()?.is_file() {
                    continue;
                }
                create_dir_all_durable(&home)?;
                let (from, to) = (entry.path(), home.join(&name));
                match same_file(&from, &to)? {
                    Some(true) => {} // linked by an interrupted start
                    None => fs::hard_link(&from, &to).map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!(
                                "cannot link {} into {}: {e}",
                                from.display(),
                                home.display()
                            ),
                        )
                    })?,
                    Some(false) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!(
                                "{} and {} are two different files of one object; an interrupted \
                                 move leaves one file under both names, so one of them was written \
                                 by another node version. Keep the right one and remove the other",
                                from.display(),
                                to.display()
                            ),
                        ));
                    }
                }
                gained.insert(home);
                linked.push(from);
            }
        }
    }
    sync_dirs_up_to(gained, objects_dir)?;
    let mut lost = BTreeSet::new();
    for from in &linked {
        fs::remove_file(from).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot remove {}: {e}", from.display()))
        })?;
        lost.extend(from.parent().map(Path::to_path_buf));
    }
    sync_dirs_up_to(lost, objects_dir)?;
    Ok(Placed {
        moved: linked.len(),
    })
}

/// Whether `b` names the file `a` names; `None` when `b` does not exist.
fn same_file(a: &Path, b: &Path) -> io::Result<Option<bool>> {
    let b = match fs::metadata(b) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let a = fs::metadata(a)?;
    Ok(Some(a.dev() == b.dev() && a.ino() == b.ino()))
}

/// The directories directly in `dir` (none when it does not exist).
fn subdirectories(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in entries(dir)? {
        if entry.file_type()?.is_dir() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn id(first: u8, last: u8) -> ObjectId {
        let mut bytes = [0x5au8; ID_LEN];
        bytes[0] = first;
        bytes[ID_LEN - 1] = last;
        ObjectId::from_bytes(bytes)
    }

    fn key(ns: &str, id: ObjectId) -> ObjectKey {
        ObjectKey::new(Arc::from(ns), id)
    }

    /// Where the layout before this one put a file: the shard was the first byte.
    fn old_path(objects: &Path, key: &ObjectKey) -> PathBuf {
        let hex = key.id.to_hex();
        objects
            .join(&*key.namespace)
            .join(&hex[..2])
            .join(format!("{hex}.db"))
    }

    fn write(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }

    #[test]
    fn the_shard_is_the_last_byte_of_the_id() {
        let k = key("default", id(2, 0xab));
        let path = db_path(Path::new("/data/objects"), &k);
        assert_eq!(
            path,
            PathBuf::from(format!("/data/objects/default/ab/{}.db", k.id.to_hex()))
        );
        assert_eq!(shard(&id(1, 0x07)), "07");
    }

    #[test]
    fn a_slot_s_objects_lie_in_the_shards_named_for_it() {
        for slot_count in 1..=2048u32 {
            for _ in 0..64 {
                let id = ObjectId::from_bytes(rand::random());
                let slot = id.slot(slot_count);
                match shards_of_slot(slot, slot_count) {
                    None => assert!(!slot_count.is_power_of_two(), "{slot_count}"),
                    Some(shards) => {
                        assert!(
                            shards.contains(&shard(&id)),
                            "{id} (slot {slot} of {slot_count}) is in shard {}, not in {shards:?}",
                            shard(&id)
                        );
                        assert_eq!(shards.len(), (256 / slot_count).max(1) as usize);
                    }
                }
            }
        }
        // Every shard belongs to exactly one slot of a power-of-two count.
        for slot_count in [1u32, 2, 64, 256, 1024] {
            let mut all: Vec<String> = (0..slot_count)
                .flat_map(|s| shards_of_slot(s, slot_count).expect("power of two"))
                .collect();
            all.sort();
            let expected: Vec<String> = (0..256)
                .map(|b| format!("{b:02x}"))
                .flat_map(|b| std::iter::repeat_n(b, (slot_count / 256).max(1) as usize))
                .collect();
            assert_eq!(all, expected, "{slot_count}");
        }
    }

    #[test]
    fn files_of_the_first_byte_layout_move_into_their_own_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = dir.path().join("objects");
        let named = key("default", id(2, 0xab));
        let unique = key("other", id(1, 0x10));
        // The last byte equals the first: the old and the new shard are the same directory.
        let already_home = key("default", id(2, 0x02));
        for (k, content) in [
            (&named, "named"),
            (&unique, "unique"),
            (&already_home, "home"),
        ] {
            write(&old_path(&objects, k), content);
        }
        let wal = old_path(&objects, &named).with_extension("db-wal");
        write(&wal, "wal");
        let stranger = objects.join("default/02/notes.txt");
        write(&stranger, "not an object");

        let placed = place_object_files(&objects).expect("place");
        assert_eq!(placed, Placed { moved: 2 });
        assert_eq!(
            fs::read_to_string(db_path(&objects, &named)).expect("named"),
            "named"
        );
        assert_eq!(
            fs::read_to_string(db_path(&objects, &unique)).expect("unique"),
            "unique"
        );
        assert_eq!(
            fs::read_to_string(db_path(&objects, &already_home)).expect("home"),
            "home"
        );
        assert!(!old_path(&objects, &named).exists());
        assert!(!old_path(&objects, &unique).exists());
        // Companions and strangers stay where they were, for the startup scan.
        assert!(wal.exists());
        assert!(stranger.exists());

        // A second start has nothing to move.
        assert_eq!(
            place_object_files(&objects).expect("again"),
            Placed::default()
        );
    }

    #[test]
    fn a_move_interrupted_after_the_new_name_is_finished_by_the_next_start() {
        // A power cut after the new name became durable and before the old one's removal did
        // leaves the file under both names.
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = dir.path().join("objects");
        let k = key("default", id(2, 0xcd));
        write(&old_path(&objects, &k), "data");
        fs::create_dir_all(db_path(&objects, &k).parent().expect("parent")).expect("mkdir");
        fs::hard_link(old_path(&objects, &k), db_path(&objects, &k)).expect("link");

        assert_eq!(
            place_object_files(&objects).expect("place"),
            Placed { moved: 1 }
        );
        assert!(!old_path(&objects, &k).exists());
        assert_eq!(
            fs::read_to_string(db_path(&objects, &k)).expect("read"),
            "data"
        );
    }

    #[test]
    fn two_different_files_of_one_object_stop_the_start_and_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = dir.path().join("objects");
        let k = key("default", id(2, 0xee));
        write(&old_path(&objects, &k), "old");
        write(&db_path(&objects, &k), "new");

        let err = place_object_files(&objects).expect_err("two files");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        let message = err.to_string();
        assert!(message.contains(&k.id.to_hex()), "{message}");
        assert!(message.contains("two different files"), "{message}");
        assert_eq!(
            fs::read_to_string(old_path(&objects, &k)).expect("old"),
            "old"
        );
        assert_eq!(
            fs::read_to_string(db_path(&objects, &k)).expect("new"),
            "new"
        );
    }

    #[test]
    fn no_objects_directory_is_nothing_to_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            place_object_files(&dir.path().join("objects")).expect("place"),
            Placed::default()
        );
    }
}
