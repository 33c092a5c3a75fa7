//! The slot journal: per-slot facts a node must remember across restarts, kept outside the node
//! log because the log's segments are retired once checkpointed.
//!
//! - *fences*: "I will refuse entries of any epoch below E for this slot" — a promise made to
//!   the control plane during failover; it must hold even if the node restarts right after.
//! - *positions*: the last durable entry of each slot, so a restarted node knows how far it got
//!   (the log records that would tell may already be retired; the log is only allowed to retire
//!   segments whose positions were journaled first).
//! - *floors*: after a snapshot sync, entries of an object at or below its snapshot's position
//!   must never be applied again (they are older than the snapshot).
//!
//! JSON lines, appended and fdatasynced; folded and compacted when the node starts.

use crate::id::ObjectId;
use crate::lsn::Lsn;
use crate::storage::record::{ObjectKey, SlotKey, SlotPos};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "camelCase")]
pub enum Line {
    Fence {
        colo: String,
        slot: u32,
        epoch: u64,
    },
    Position {
        colo: String,
        slot: u32,
        epoch: u64,
        seq: u64,
        chain: u64,
    },
    Floor {
        colo: String,
        slot: u32,
        ns: String,
        id: String,
        epoch: u64,
        seq: u64,
    },
    /// The slot passed every floor it had: forget them.
    ClearFloors {
        colo: String,
        slot: u32,
    },
    /// A snapshot sync began: until a later position line, the slot's files are not to be
    /// trusted and the node must sync again after a restart.
    SyncStarted {
        colo: String,
        slot: u32,
    },
}

impl Line {
    pub fn fence(slot: &SlotKey, epoch: u64) -> Line {
        Line::Fence {
            colo: slot.colo.to_string(),
            slot: slot.slot,
            epoch,
        }
    }

    pub fn position(slot: &SlotKey, pos: SlotPos) -> Line {
        Line::Position {
            colo: slot.colo.to_string(),
            slot: slot.slot,
            epoch: pos.lsn.epoch,
            seq: pos.lsn.seq,
            chain: pos.chain,
        }
    }

    pub fn floor(slot: &SlotKey, object: &ObjectKey, lsn: Lsn) -> Line {
        Line::Floor {
            colo: slot.colo.to_string(),
            slot: slot.slot,
            ns: object.namespace.to_string(),
            id: object.id.to_hex(),
            epoch: lsn.epoch,
            seq: lsn.seq,
        }
    }
}

/// What the journal says, folded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JournalState {
    pub fenced: HashMap<SlotKey, u64>,
    pub positions: HashMap<SlotKey, SlotPos>,
    /// Per slot: object -> floor.
    pub floors: HashMap<SlotKey, HashMap<ObjectKey, Lsn>>,
    /// Slots whose snapshot sync was interrupted.
    pub interrupted_syncs: std::collections::HashSet<SlotKey>,
}

impl JournalState {
    fn apply(&mut self, line: Line) {
        match line {
            Line::Fence { colo, slot, epoch } => {
                let e = self.fenced.entry(SlotKey::new(&colo, slot)).or_insert(0);
                *e = (*e).max(epoch);
            }
            Line::Position {
                colo,
                slot,
                epoch,
                seq,
                chain,
            } => {
                let key = SlotKey::new(&colo, slot);
                let pos = SlotPos {
                    lsn: Lsn::new(epoch, seq),
                    chain,
                };
                // A later line wins: positions only move back when a sync replaces history.
                self.interrupted_syncs.remove(&key);
                self.positions.insert(key, pos);
            }
            Line::Floor {
                colo,
                slot,
                ns,
                id,
                epoch,
                seq,
            } => {
                if let Ok(id) = id.parse::<ObjectId>() {
                    self.floors
                        .entry(SlotKey::new(&colo, slot))
                        .or_default()
                        .insert(ObjectKey::new(ns.into(), id), Lsn::new(epoch, seq));
                }
            }
            Line::ClearFloors { colo, slot } => {
                self.floors.remove(&SlotKey::new(&colo, slot));
            }
            Line::SyncStarted { colo, slot } => {
                let key = SlotKey::new(&colo, slot);
                self.floors.remove(&key);
                self.interrupted_syncs.insert(key);
            }
        }
    }

    fn lines(&self) -> Vec<Line> {
        let mut out: Vec<Line> = Vec::new();
        let mut fenced: Vec<_> = self.fenced.iter().collect();
        fenced.sort();
        out.extend(fenced.into_iter().map(|(k, e)| Line::fence(k, *e)));
        let mut positions: Vec<_> = self.positions.iter().collect();
        positions.sort_by(|a, b| a.0.cmp(b.0));
        out.extend(positions.into_iter().map(|(k, p)| Line::position(k, *p)));
        for (slot, floors) in &self.floors {
            out.extend(floors.iter().map(|(o, l)| Line::floor(slot, o, *l)));
        }
        out.extend(self.interrupted_syncs.iter().map(|s| Line::SyncStarted {
            colo: s.colo.to_string(),
            slot: s.slot,
        }));
        out
    }
}

/// The journal file. Appends are serialized and made durable before they return.
#[derive(Clone)]
pub struct SlotJournal {
    file: Arc<Mutex<File>>,
    path: PathBuf,
}

impl SlotJournal {
    /// Opens (creating) the journal at `path`, folds it, and rewrites it compacted.
    pub fn open(path: &Path) -> io::Result<(SlotJournal, JournalState)> {
        let mut state = JournalState::default();
        match File::open(path) {
            Ok(f) => {
                for line in io::BufReader::new(f).lines() {
                    let line = line?;
                    // A torn last line (crash mid-append) is ignored: it was never acknowledged.
                    if let Ok(parsed) = serde_json::from_str::<Line>(&line) {
                        state.apply(parsed);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            for line in state.lines() {
                serde_json::to_writer(&mut f, &line).map_err(io::Error::other)?;
                f.write_all(b"\n")?;
            }
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let file = OpenOptions::new().append(true).open(path)?;
        Ok((
            SlotJournal {
                file: Arc::new(Mutex::new(file)),
                path: path.to_path_buf(),
            },
            state,
        ))
    }

    /// Appends `lines` and makes them durable.
    pub fn record(&self, lines: &[Line]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(lines.len() * 96);
        for line in lines {
            serde_json::to_writer(&mut buf, line).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&buf)?;
        f.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_folds_and_survives_reopening_and_torn_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slots.journal");
        let (j, state) = SlotJournal::open(&path).expect("open");
        assert_eq!(state, JournalState::default());
        let s = SlotKey::new("ams", 3);
        let obj = ObjectKey::new("chat".into(), ObjectId::from_bytes([1; 32]));
        j.record(&[
            Line::fence(&s, 4),
            Line::fence(&s, 2),
            Line::position(
                &s,
                SlotPos {
                    lsn: Lsn::new(4, 10),
                    chain: 9,
                },
            ),
            Line::floor(&s, &obj, Lsn::new(4, 8)),
        ])
        .expect("record");
        drop(j);
        // A torn trailing line is ignored.
        let mut f = OpenOptions::new().append(true).open(&path).expect("append");
        f.write_all(b"{\"t\":\"fence\",\"colo\":\"ams\",\"sl")
            .expect("write");
        drop(f);
        let (j, state) = SlotJournal::open(&path).expect("reopen");
        assert_eq!(state.fenced.get(&s), Some(&4));
        assert_eq!(
            state.positions.get(&s),
            Some(&SlotPos {
                lsn: Lsn::new(4, 10),
                chain: 9
            })
        );
        assert_eq!(
            state.floors.get(&s).and_then(|f| f.get(&obj)),
            Some(&Lsn::new(4, 8))
        );
        j.record(&[Line::ClearFloors {
            colo: "ams".into(),
            slot: 3,
        }])
        .expect("record");
        let (_, state) = SlotJournal::open(&path).expect("reopen");
        assert!(state.floors.is_empty());
        assert_eq!(state.fenced.get(&s), Some(&4), "compaction keeps the facts");
    }
}
