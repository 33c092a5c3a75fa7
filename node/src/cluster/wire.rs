//! Frames of the replication stream between a slot owner and its followers.
//!
//! One connection per (owner node, follower node) carries every slot the two share, upgraded from
//! HTTP on the follower's API port. Each frame: `[len u32][crc32c u32][body]`; the CRC covers the
//! body, so a frame corrupted in flight is detected and the connection dropped (the owner then
//! probes and resends). Integers are little-endian.

use crate::lsn::Lsn;
use crate::storage::record::{Entry, RecordKind, SlotKey, SlotPos};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The replication protocol this node speaks, sent in [`Frame::Hello`] (owner → follower) and in
/// the upgrade response's [`VERSION_HEADER`] (follower → owner), so that nodes of two versions
/// can share a cluster while it is upgraded one node at a time. 1: the first; 2: adds
/// [`Frame::SyncNow`].
pub const PROTOCOL_VERSION: u8 = 2;
/// The first version that knows [`Frame::SyncNow`]: an owner sends it only to followers that
/// speak at least this, and a follower logs entries lazily only for owners that do (an older
/// owner never says when to commit).
pub const SYNC_NOW_SINCE: u8 = 2;
/// The upgrade response header in which a follower states its [`PROTOCOL_VERSION`]; a follower
/// without it speaks version 1.
pub const VERSION_HEADER: &str = "x-colony-replication-version";

/// Upper bound of one frame: an entry can be as large as a transaction (request bodies are
/// limited to 32 MiB by default; big SQL transactions can write more).
pub const MAX_FRAME: usize = 512 << 20;

/// Why a follower reports its position instead of acknowledging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FollowerState {
    /// In step; the position is where it is.
    Ok = 0,
    /// The entry did not follow the follower's position: resend from `position`, or sync.
    Gap = 1,
    /// The follower promised not to accept this epoch.
    Fenced = 2,
    /// The follower is installing a snapshot; try again later.
    Syncing = 3,
    /// The follower cannot write its log (disk full or failing).
    Failing = 4,
    /// The follower is not ready for this slot yet (e.g. closing its own copies after a demotion).
    Busy = 5,
}

impl FollowerState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => FollowerState::Ok,
            1 => FollowerState::Gap,
            2 => FollowerState::Fenced,
            3 => FollowerState::Syncing,
            4 => FollowerState::Failing,
            5 => FollowerState::Busy,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame from the connecting owner, with the protocol version it speaks (version 1
    /// nodes sent none; they read past it).
    Hello { node: String, version: u8 },
    /// An entry of the slot's log (the entry carries its slot and position), sent by the owner
    /// of `epoch`. A new owner resends entries of older epochs that only it holds (so that a
    /// quorum holds them before it serves); followers judge the sender by `epoch`, not by the
    /// entry's own epoch.
    Append {
        entry: Bytes,
        kind: RecordKind,
        epoch: u64,
    },
    /// Follower → owner: everything up to `lsn` is durable here.
    Ack { slot: SlotKey, lsn: Lsn },
    /// Owner → follower: report your position for `slot`; `epoch` is the owner's.
    Probe { slot: SlotKey, epoch: u64 },
    /// Follower → owner: its durable position, the epoch it is fenced at, and its state.
    Status {
        slot: SlotKey,
        fenced: u64,
        position: SlotPos,
        state: FollowerState,
    },
    /// Owner → follower: your position is not in my recent history: sync from a snapshot.
    SyncRequired { slot: SlotKey, epoch: u64 },
    /// Owner → follower: commit the entries sent so far now. A follower logs entries lazily
    /// (they may wait a moment to share a commit); the owner sends this after each entry to the
    /// followers it counts on for its quorum, if they speak [`SYNC_NOW_SINCE`] (a follower that
    /// does not know this frame drops the connection).
    SyncNow,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame checksum mismatch (corrupted in flight)")]
    Checksum,
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

const T_HELLO: u8 = 1;
const T_APPEND: u8 = 2;
const T_ACK: u8 = 3;
const T_PROBE: u8 = 4;
const T_STATUS: u8 = 5;
const T_SYNC: u8 = 6;
const T_SYNC_NOW: u8 = 7;

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u8(s.len().min(255) as u8);
    b.put_slice(&s.as_bytes()[..s.len().min(255)]);
}

fn put_slot(b: &mut BytesMut, s: &SlotKey) {
    put_str(b, &s.colo);
    b.put_u32_le(s.slot);
}

fn put_lsn(b: &mut BytesMut, l: Lsn) {
    b.put_u64_le(l.epoch);
    b.put_u64_le(l.seq);
}

/// Appends a frame to `out` whose body `write_body` writes: the header's length and CRC are
/// filled in after it.
fn framed(out: &mut BytesMut, write_body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u32_le(0);
    write_body(out);
    let body_len = out.len() - start - 8;
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

impl Frame {
    /// Appends the framed encoding to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        framed(out, |out| self.encode_body(out));
    }

    fn encode_body(&self, out: &mut BytesMut) {
        match self {
            Frame::Hello { node, version } => {
                out.put_u8(T_HELLO);
                put_str(out, node);
                out.put_u8(*version);
            }
            Frame::Append { entry, kind, epoch } => {
                out.put_u8(T_APPEND);
                out.put_u8(*kind as u8);
                out.put_u64_le(*epoch);
                out.put_slice(entry);
            }
            Frame::Ack { slot, lsn } => {
                out.put_u8(T_ACK);
                put_slot(out, slot);
                put_lsn(out, *lsn);
            }
            Frame::Probe { slot, epoch } => {
                out.put_u8(T_PROBE);
                put_slot(out, slot);
                out.put_u64_le(*epoch);
            }
            Frame::Status {
                slot,
                fenced,
                position,
                state,
            } => {
                out.put_u8(T_STATUS);
                put_slot(out, slot);
                out.put_u64_le(*fenced);
                put_lsn(out, position.lsn);
                out.put_u64_le(position.chain);
                out.put_u8(*state as u8);
            }
            Frame::SyncRequired { slot, epoch } => {
                out.put_u8(T_SYNC);
                put_slot(out, slot);
                out.put_u64_le(*epoch);
            }
            Frame::SyncNow => out.put_u8(T_SYNC_NOW),
        }
    }

    /// Takes one frame off the front of `buf` if it holds a whole one.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        buf.advance(8);
        let mut body = buf.split_to(len).freeze();
        if crc32c::crc32c(&body) != crc {
            return Err(WireError::Checksum);
        }
        parse(&mut body).map(Some)
    }
}

fn need(b: &Bytes, n: usize) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Malformed("truncated"))
    } else {
        Ok(())
    }
}

fn get_str(b: &mut Bytes) -> Result<String, WireError> {
    need(b, 1)?;
    let n = b.get_u8() as usize;
    need(b, n)?;
    let s = b.split_to(n);
    String::from_utf8(s.to_vec()).map_err(|_| WireError::Malformed("string is not UTF-8"))
}

fn get_slot(b: &mut Bytes) -> Result<SlotKey, WireError> {
    let colo = get_str(b)?;
    need(b, 4)?;
    Ok(SlotKey::new(&colo, b.get_u32_le()))
}

fn get_lsn(b: &mut Bytes) -> Result<Lsn, WireError> {
    need(b, 16)?;
    Ok(Lsn::new(b.get_u64_le(), b.get_u64_le()))
}

fn parse(b: &mut Bytes) -> Result<Frame, WireError> {
    need(b, 1)?;
    Ok(match b.get_u8() {
        T_HELLO => Frame::Hello {
            node: get_str(b)?,
            // Version 1 sent the name alone.
            version: if b.has_remaining() { b.get_u8() } else { 1 },
        },
        T_APPEND => {
            need(b, 9)?;
            let kind = RecordKind::from_u8(b.get_u8())
                .ok_or(WireError::Malformed("unknown entry kind"))?;
            let epoch = b.get_u64_le();
            let entry = b.split_to(b.remaining());
            Frame::Append { entry, kind, epoch }
        }
        T_ACK => Frame::Ack {
            slot: get_slot(b)?,
            lsn: get_lsn(b)?,
        },
        T_PROBE => {
            let slot = get_slot(b)?;
            need(b, 8)?;
            Frame::Probe {
                slot,
                epoch: b.get_u64_le(),
            }
        }
        T_STATUS => {
            let slot = get_slot(b)?;
            need(b, 8)?;
            let fenced = b.get_u64_le();
            let lsn = get_lsn(b)?;
            need(b, 9)?;
            let chain = b.get_u64_le();
            let state = FollowerState::from_u8(b.get_u8())
                .ok_or(WireError::Malformed("unknown follower state"))?;
            Frame::Status {
                slot,
                fenced,
                position: SlotPos { lsn, chain },
                state,
            }
        }
        T_SYNC => {
            let slot = get_slot(b)?;
            need(b, 8)?;
            Frame::SyncRequired {
                slot,
                epoch: b.get_u64_le(),
            }
        }
        T_SYNC_NOW => Frame::SyncNow,
        _ => return Err(WireError::Malformed("unknown frame type")),
    })
}

/// Builds an append frame for an entry, sent by the owner of `epoch`.
pub fn append_frame(entry: &Entry, epoch: u64) -> Frame {
    Frame::Append {
        entry: entry.shared_bytes(),
        kind: entry.kind,
        epoch,
    }
}

/// The same frame as sent by the owner of `epoch` (resending from the ring after an epoch change).
pub fn restamped(frame: &Frame, epoch: u64) -> Frame {
    match frame {
        Frame::Append { entry, kind, .. } => Frame::Append {
            entry: entry.clone(),
            kind: *kind,
            epoch,
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        let slot = SlotKey::new("ams", 7);
        vec![
            Frame::Hello {
                node: "ams-0".into(),
                version: PROTOCOL_VERSION,
            },
            Frame::Append {
                entry: Bytes::from_static(b"entry bytes"),
                kind: RecordKind::PageSet,
                epoch: 6,
            },
            Frame::Ack {
                slot: slot.clone(),
                lsn: Lsn::new(3, 9),
            },
            Frame::Probe {
                slot: slot.clone(),
                epoch: 4,
            },
            Frame::Status {
                slot: slot.clone(),
                fenced: 5,
                position: SlotPos {
                    lsn: Lsn::new(4, 2),
                    chain: 77,
                },
                state: FollowerState::Gap,
            },
            Frame::SyncRequired { slot, epoch: 6 },
            Frame::SyncNow,
        ]
    }

    #[test]
    fn frames_round_trip_back_to_back_and_in_pieces() {
        let mut buf = BytesMut::new();
        for f in all_frames() {
            f.encode(&mut buf);
        }
        let bytes = buf.freeze();
        // Feed one byte at a time: partial frames wait for more.
        let mut incoming = BytesMut::new();
        let mut out = Vec::new();
        for b in bytes.iter() {
            incoming.put_u8(*b);
            while let Some(f) = Frame::decode(&mut incoming).expect("valid") {
                out.push(f);
            }
        }
        assert_eq!(out, all_frames());
    }

    /// A version 1 owner's hello (the name alone) reads as version 1; a version 1 follower reads
    /// a newer hello's name and stops there, as its decoder ignores what follows the name.
    #[test]
    fn hellos_of_both_versions_read_back() {
        let mut old = BytesMut::new();
        framed(&mut old, |body| {
            body.put_u8(T_HELLO);
            put_str(body, "ams-1");
        });
        assert_eq!(
            Frame::decode(&mut old),
            Ok(Some(Frame::Hello {
                node: "ams-1".into(),
                version: 1
            }))
        );

        let mut new = BytesMut::new();
        Frame::Hello {
            node: "ams-2".into(),
            version: PROTOCOL_VERSION,
        }
        .encode(&mut new);
        let mut body = new.split_off(8).freeze();
        assert_eq!(body.get_u8(), T_HELLO);
        assert_eq!(get_str(&mut body), Ok("ams-2".to_string()));
        assert_eq!(body.remaining(), 1, "only the version follows the name");
    }

    #[test]
    fn a_corrupted_frame_is_detected() {
        let mut buf = BytesMut::new();
        Frame::Ack {
            slot: SlotKey::new("ams", 1),
            lsn: Lsn::new(1, 1),
        }
        .encode(&mut buf);
        for i in 8..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                Frame::decode(&mut bad),
                Err(WireError::Checksum),
                "byte {i}"
            );
        }
        let mut huge = BytesMut::from(&(u32::MAX).to_le_bytes()[..]);
        huge.put_u32_le(0);
        assert!(matches!(
            Frame::decode(&mut huge),
            Err(WireError::TooLarge(_))
        ));
    }
}
