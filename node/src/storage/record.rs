//! What the node log holds, and what replication ships: page sets and deletes (the *entries* of a
//! slot's replicated log), and checkpoint markers.
//!
//! A page set is the full images of the pages one transaction changed and the database size after
//! it; applying a slot's entries in order onto checkpointed database files reproduces the owner's
//! databases exactly. Every entry carries its position in its slot's log — `(epoch, seq)` and a
//! chain hash over all entries before it — so a follower can tell a missing, extra or corrupted
//! entry from the next one in line.

use crate::id::{ID_LEN, ObjectId};
use crate::lsn::Lsn;
use bytes::{Bytes, BytesMut};
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// Identifies an object on a node: its namespace and ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub id: ObjectId,
}

impl ObjectKey {
    pub fn new(namespace: Arc<str>, id: ObjectId) -> Self {
        ObjectKey { namespace, id }
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.id)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.id)
    }
}

/// A slot: the unit of ownership and of replication ordering.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub colo: Arc<str>,
    pub slot: u32,
}

impl SlotKey {
    pub fn new(colo: &str, slot: u32) -> Self {
        SlotKey {
            colo: Arc::from(colo),
            slot,
        }
    }
}

impl fmt::Debug for SlotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.colo, self.slot)
    }
}

impl fmt::Display for SlotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.colo, self.slot)
    }
}

/// A position in a slot's log with the chain hash of everything up to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotPos {
    pub lsn: Lsn,
    pub chain: u64,
}

impl SlotPos {
    pub const START: SlotPos = SlotPos {
        lsn: Lsn::ZERO,
        chain: 0,
    };
}

fn mix64(mut x: u64) -> u64 {
    // splitmix64's finaliser: a cheap, well-distributed 64-bit mix.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The chain hash after an entry: covers the previous chain, the entry's position, kind and
/// content checksum. Detects divergence, not tampering.
pub fn chain_after(prev: u64, lsn: Lsn, kind: RecordKind, content_crc: u32) -> u64 {
    mix64(
        prev ^ mix64(
            lsn.epoch
                ^ mix64(lsn.seq ^ mix64(u64::from(content_crc) | (u64::from(kind as u8) << 32))),
        ),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    PageSet = 1,
    /// The object's database file holds (and has fsynced) everything up to a log LSN.
    Checkpoint = 2,
    /// All of the object's data was deleted.
    Delete = 3,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(RecordKind::PageSet),
            2 => Some(RecordKind::Checkpoint),
            3 => Some(RecordKind::Delete),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed log record: {0}")]
pub struct DecodeError(pub &'static str);

/// A tiny cursor over a byte slice for decoding.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn short_str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let len = self.u8()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError(what))
    }
}

/// Encodes the object prefix every record payload starts with.
pub fn encode_object(out: &mut Vec<u8>, key: &ObjectKey) {
    let ns = key.namespace.as_bytes();
    out.push(ns.len() as u8);
    out.extend_from_slice(ns);
    out.extend_from_slice(key.id.as_bytes());
}

fn decode_object(r: &mut Reader<'_>) -> Result<ObjectKey, DecodeError> {
    let ns = r.short_str("namespace is not UTF-8")?;
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(r.take(ID_LEN)?);
    Ok(ObjectKey::new(Arc::from(ns), ObjectId::from_bytes(id)))
}

/// Bytes of the position block's variable part after the colo name.
const POSITION_FIXED: usize = 4 + 8 + 8 + 8;

fn encode_position(out: &mut Vec<u8>, slot: &SlotKey) -> usize {
    let colo = slot.colo.as_bytes();
    out.push(colo.len() as u8);
    out.extend_from_slice(colo);
    let at = out.len();
    out.extend_from_slice(&slot.slot.to_le_bytes());
    out.extend_from_slice(&[0u8; 24]);
    at
}

/// A replicated entry (page set or delete) as bytes, with the offsets of its parts.
///
/// Layout: `[object][colo len u8][colo][slot u32][epoch u64][seq u64][chain u64][body]`. The
/// position (epoch, seq, chain) is assigned by the slot's owner after the entry is built, so it is
/// patched in place; the content checksum covers everything except the position block.
///
/// The bytes are shared, not copied, by the entry's replication frame, its node-log record and
/// the follower's applier ([`Entry::shared_bytes`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: RecordKind,
    bytes: Bytes,
    /// Offset of the slot number (start of the fixed part of the position block).
    position_at: usize,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Entry({:?}, {} bytes)", self.kind, self.bytes.len())
    }
}

impl Entry {
    /// A delete of all of `object`'s data, in `slot`.
    pub fn delete(object: &ObjectKey, slot: &SlotKey) -> Entry {
        let mut bytes = Vec::with_capacity(96);
        encode_object(&mut bytes, object);
        let position_at = encode_position(&mut bytes, slot);
        Entry {
            kind: RecordKind::Delete,
            bytes: bytes.into(),
            position_at,
        }
    }

    /// Parses the envelope of a page-set or delete payload (the body is checked by
    /// [`PageSetView::decode`]).
    pub fn from_bytes(kind: RecordKind, bytes: impl Into<Bytes>) -> Result<Entry, DecodeError> {
        let bytes = bytes.into();
        if kind == RecordKind::Checkpoint {
            return Err(DecodeError("a checkpoint is not a replicated entry"));
        }
        let mut r = Reader { buf: &bytes };
        decode_object(&mut r)?;
        r.short_str("colo is not UTF-8")?;
        let position_at = bytes.len() - r.buf.len();
        r.take(POSITION_FIXED)?;
        Ok(Entry {
            kind,
            bytes,
            position_at,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The entry's bytes, sharing its allocation.
    pub fn shared_bytes(&self) -> Bytes {
        self.bytes.clone()
    }

    pub fn object(&self) -> ObjectKey {
        // The envelope was validated on construction.
        decode_object(&mut Reader { buf: &self.bytes })
            .unwrap_or_else(|_| unreachable!("validated envelope"))
    }

    pub fn slot(&self) -> SlotKey {
        let mut r = Reader { buf: &self.bytes };
        let _ = decode_object(&mut r);
        let colo = r.short_str("colo").unwrap_or_default();
        let slot = r.u32().unwrap_or_default();
        SlotKey::new(colo, slot)
    }

    fn read_u64(&self, at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(a)
    }

    pub fn lsn(&self) -> Lsn {
        Lsn::new(
            self.read_u64(self.position_at + 4),
            self.read_u64(self.position_at + 12),
        )
    }

    pub fn chain(&self) -> u64 {
        self.read_u64(self.position_at + 20)
    }

    /// CRC-32C of the entry without its position block.
    pub fn content_crc(&self) -> u32 {
        let head = &self.bytes[..self.position_at + 4];
        let body = &self.bytes[self.position_at + POSITION_FIXED..];
        crc32c::crc32c_append(crc32c::crc32c(head), body)
    }

    /// Assigns the entry's place in its slot's log after `prev`; returns its new position.
    pub fn place_after(&mut self, prev: SlotPos, lsn: Lsn) -> SlotPos {
        let chain = chain_after(prev.chain, lsn, self.kind, self.content_crc());
        let at = self.position_at;
        // The owner places an entry it just built, before anything shares it: no copy then.
        let mut bytes = std::mem::take(&mut self.bytes)
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        bytes[at + 4..at + 12].copy_from_slice(&lsn.epoch.to_le_bytes());
        bytes[at + 12..at + 20].copy_from_slice(&lsn.seq.to_le_bytes());
        bytes[at + 20..at + 28].copy_from_slice(&chain.to_le_bytes());
        self.bytes = bytes.freeze();
        SlotPos { lsn, chain }
    }

    /// True if this entry follows `prev` in its slot's log (its chain hash proves it).
    pub fn follows(&self, prev: SlotPos) -> bool {
        self.lsn() > prev.lsn
            && chain_after(prev.chain, self.lsn(), self.kind, self.content_crc()) == self.chain()
    }

    pub fn position(&self) -> SlotPos {
        SlotPos {
            lsn: self.lsn(),
            chain: self.chain(),
        }
    }

    /// The body after the position block.
    fn body(&self) -> &[u8] {
        &self.bytes[self.position_at + POSITION_FIXED..]
    }
}

/// How the page region of a page set is stored.
const PAGES_RAW: u8 = 0;
const PAGES_LZ4: u8 = 1;

/// Builds a page-set entry: pages are collected, then the page region is LZ4-compressed when that
/// helps. Most pages of small databases are largely empty, and the cost of an fdatasync grows with
/// the bytes it flushes (about 0.2 ms for a few KiB, 0.7 ms or more for 64 KiB here), so
/// compression is what lets many concurrent commits share one fsync cheaply.
///
/// Body: `[page_size u32][db_pages u32][page_count u32][encoding u8][raw_len u32][data]`, the raw
/// page region being `([pgno u32][page])*`.
pub struct PageSetBuilder {
    object: ObjectKey,
    slot: SlotKey,
    pages: Vec<u8>,
    count: u32,
    page_size: u32,
    db_pages: u32,
}

impl PageSetBuilder {
    pub fn new(
        object: &ObjectKey,
        slot: &SlotKey,
        page_size: u32,
        db_pages: u32,
        expected_pages: usize,
    ) -> Self {
        PageSetBuilder {
            object: object.clone(),
            slot: slot.clone(),
            pages: Vec::with_capacity(expected_pages * (4 + page_size as usize)),
            count: 0,
            page_size,
            db_pages,
        }
    }

    pub fn push(&mut self, pgno: u32, page: &[u8]) {
        debug_assert_eq!(page.len(), self.page_size as usize);
        self.pages.extend_from_slice(&pgno.to_le_bytes());
        self.pages.extend_from_slice(page);
        self.count += 1;
    }

    pub fn page_count(&self) -> u32 {
        self.count
    }

    pub fn finish(self) -> Entry {
        let compressed = lz4_flex::block::compress(&self.pages);
        let (encoding, data) = if compressed.len() < self.pages.len() * 9 / 10 {
            (PAGES_LZ4, &compressed[..])
        } else {
            (PAGES_RAW, &self.pages[..])
        };
        let mut bytes = Vec::with_capacity(96 + data.len());
        encode_object(&mut bytes, &self.object);
        let position_at = encode_position(&mut bytes, &self.slot);
        bytes.extend_from_slice(&self.page_size.to_le_bytes());
        bytes.extend_from_slice(&self.db_pages.to_le_bytes());
        bytes.extend_from_slice(&self.count.to_le_bytes());
        bytes.push(encoding);
        bytes.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        bytes.extend_from_slice(data);
        Entry {
            kind: RecordKind::PageSet,
            bytes: bytes.into(),
            position_at,
        }
    }
}

/// Header of a page set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSetHeader {
    pub object: ObjectKey,
    pub slot: SlotKey,
    pub position: SlotPos,
    pub page_size: u32,
    /// Database size in pages after this commit.
    pub db_pages: u32,
    pub page_count: u32,
}

/// A decoded page set. Its pages borrow from the payload when stored raw.
pub struct PageSetView<'a> {
    pub header: PageSetHeader,
    pages: Cow<'a, [u8]>,
}

impl<'a> PageSetView<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { buf: payload };
        let object = decode_object(&mut r)?;
        let colo = r.short_str("colo is not UTF-8")?;
        let slot = r.u32()?;
        let epoch = r.u64()?;
        let seq = r.u64()?;
        let chain = r.u64()?;
        let page_size = r.u32()?;
        let db_pages = r.u32()?;
        let page_count = r.u32()?;
        let encoding = r.u8()?;
        let raw_len = r.u32()? as usize;
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(DecodeError("bad page size"));
        }
        let need = page_count as usize * (4 + page_size as usize);
        if raw_len != need {
            return Err(DecodeError("page data length does not match page count"));
        }
        let pages: Cow<'a, [u8]> = match encoding {
            PAGES_RAW => Cow::Borrowed(r.buf),
            PAGES_LZ4 => Cow::Owned(
                lz4_flex::block::decompress(r.buf, raw_len)
                    .map_err(|_| DecodeError("corrupt compressed pages"))?,
            ),
            _ => return Err(DecodeError("unknown page encoding")),
        };
        if pages.len() != need {
            return Err(DecodeError("page data length does not match page count"));
        }
        Ok(PageSetView {
            header: PageSetHeader {
                object,
                slot: SlotKey::new(colo, slot),
                position: SlotPos {
                    lsn: Lsn::new(epoch, seq),
                    chain,
                },
                page_size,
                db_pages,
                page_count,
            },
            pages,
        })
    }

    /// `(page number, page image)` pairs.
    pub fn pages(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        let size = self.header.page_size as usize;
        self.pages.chunks_exact(4 + size).map(|chunk| {
            let pgno = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            (pgno, &chunk[4..])
        })
    }
}

impl Entry {
    /// Decodes the pages of a page-set entry.
    pub fn page_set(&self) -> Result<PageSetView<'_>, DecodeError> {
        if self.kind != RecordKind::PageSet {
            return Err(DecodeError("not a page set"));
        }
        let _ = self.body();
        PageSetView::decode(&self.bytes)
    }
}

/// A checkpoint marker: the object's database file holds everything up to log position `upto`,
/// and up to slot position `slot_lsn` (entries of the object at or before it must never be applied
/// again, even if they appear later in the log — as after a snapshot sync).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub object: ObjectKey,
    pub upto: u64,
    pub slot_lsn: Lsn,
}

pub fn encode_checkpoint(c: &Checkpoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_object(&mut out, &c.object);
    out.extend_from_slice(&c.upto.to_le_bytes());
    out.extend_from_slice(&c.slot_lsn.epoch.to_le_bytes());
    out.extend_from_slice(&c.slot_lsn.seq.to_le_bytes());
    out
}

pub fn decode_checkpoint(payload: &[u8]) -> Result<Checkpoint, DecodeError> {
    let mut r = Reader { buf: payload };
    let object = decode_object(&mut r)?;
    let upto = r.u64()?;
    let epoch = r.u64()?;
    let seq = r.u64()?;
    Ok(Checkpoint {
        object,
        upto,
        slot_lsn: Lsn::new(epoch, seq),
    })
}

/// The object a record of any kind is about.
pub fn decode_object_of(payload: &[u8]) -> Result<ObjectKey, DecodeError> {
    decode_object(&mut Reader { buf: payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ObjectKey {
        ObjectKey::new(Arc::from("chat"), ObjectId::from_bytes([7; 32]))
    }

    fn slot() -> SlotKey {
        SlotKey::new("ams", 17)
    }

    #[test]
    fn placing_a_fresh_entry_patches_it_in_place_and_never_changes_a_shared_copy() {
        let mut b = PageSetBuilder::new(&key(), &slot(), 512, 9, 2);
        b.push(1, &[1u8; 512]);
        let mut entry = b.finish();
        let before = entry.bytes().as_ptr();
        let pos = entry.place_after(SlotPos::START, Lsn::new(3, 1));
        assert_eq!(entry.bytes().as_ptr(), before, "not copied");
        assert_eq!(entry.position(), pos);

        // Shared (as with its frame or log record): placing it again must leave the sharer as
        // it was.
        let shared = entry.shared_bytes();
        let snapshot = shared.to_vec();
        let pos2 = entry.place_after(pos, Lsn::new(3, 2));
        assert_eq!(&shared[..], &snapshot[..]);
        assert_ne!(entry.bytes(), &shared[..]);
        assert_eq!(entry.position(), pos2);
        assert!(entry.follows(pos));
    }

    #[test]
    fn page_sets_round_trip_with_their_position() {
        let mut b = PageSetBuilder::new(&key(), &slot(), 512, 9, 2);
        b.push(1, &[1u8; 512]);
        b.push(9, &[9u8; 512]);
        let mut entry = b.finish();
        let pos = entry.place_after(SlotPos::START, Lsn::new(3, 1));
        assert_eq!(entry.position(), pos);
        assert!(entry.follows(SlotPos::START));
        let view = PageSetView::decode(entry.bytes()).expect("decodes");
        assert_eq!(
            view.header,
            PageSetHeader {
                object: key(),
                slot: slot(),
                position: pos,
                page_size: 512,
                db_pages: 9,
                page_count: 2
            }
        );
        let pages: Vec<(u32, u8)> = view.pages().map(|(n, p)| (n, p[0])).collect();
        assert_eq!(pages, vec![(1, 1), (9, 9)]);
        assert_eq!(decode_object_of(entry.bytes()), Ok(key()));
        let again =
            Entry::from_bytes(RecordKind::PageSet, entry.bytes().to_vec()).expect("envelope");
        assert_eq!(again, entry);
        assert_eq!(again.slot(), slot());
        assert_eq!(again.object(), key());
    }

    #[test]
    fn the_chain_detects_missing_reordered_and_altered_entries() {
        let make = |fill: u8| {
            let mut b = PageSetBuilder::new(&key(), &slot(), 512, 1, 1);
            b.push(1, &[fill; 512]);
            b.finish()
        };
        let mut e1 = make(1);
        let p1 = e1.place_after(SlotPos::START, Lsn::new(1, 1));
        let mut e2 = make(2);
        let p2 = e2.place_after(p1, Lsn::new(1, 2));
        assert!(e2.follows(p1));
        assert!(!e2.follows(SlotPos::START), "e1 missing");
        assert!(!e1.follows(p2), "out of order");
        // The same position reached through a different history does not chain.
        let mut other = make(3);
        let q1 = other.place_after(SlotPos::START, Lsn::new(1, 1));
        assert_ne!(q1.chain, p1.chain);
        assert!(!e2.follows(q1));
        // A flipped bit in the content breaks the chain.
        let mut bytes = e2.bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let altered = Entry::from_bytes(RecordKind::PageSet, bytes).expect("envelope");
        assert!(!altered.follows(p1));
    }

    #[test]
    fn compressible_pages_are_stored_compressed_and_others_raw() {
        let mut b = PageSetBuilder::new(&key(), &slot(), 4096, 1, 1);
        b.push(1, &[0u8; 4096]);
        let small = b.finish();
        assert!(
            small.bytes().len() < 200,
            "an empty page compresses: {} bytes",
            small.bytes().len()
        );
        let mut noise = vec![0u8; 4096];
        let mut x = 0x9e37_79b9u32;
        for byte in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
        let mut b = PageSetBuilder::new(&key(), &slot(), 4096, 1, 1);
        b.push(1, &noise);
        let raw = b.finish();
        assert!(raw.bytes().len() > 4096);
        let view = raw.page_set().expect("decodes");
        assert_eq!(view.pages().next().map(|(_, p)| p.to_vec()), Some(noise));
    }

    #[test]
    fn truncated_or_inconsistent_entries_are_rejected() {
        let mut b = PageSetBuilder::new(&key(), &slot(), 512, 1, 1);
        b.push(1, &[0u8; 512]);
        let entry = b.finish();
        let bytes = entry.bytes();
        assert!(PageSetView::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(PageSetView::decode(&bytes[..10]).is_err());
        assert!(Entry::from_bytes(RecordKind::PageSet, bytes[..30].to_vec()).is_err());
        assert!(Entry::from_bytes(RecordKind::Checkpoint, bytes.to_vec()).is_err());
    }

    #[test]
    fn checkpoints_and_deletes_round_trip() {
        let c = Checkpoint {
            object: key(),
            upto: 12345,
            slot_lsn: Lsn::new(2, 9),
        };
        assert_eq!(decode_checkpoint(&encode_checkpoint(&c)), Ok(c));
        let mut d = Entry::delete(&key(), &slot());
        d.place_after(SlotPos::START, Lsn::new(1, 1));
        assert_eq!(d.object(), key());
        assert_eq!(d.slot(), slot());
        assert_eq!(d.lsn(), Lsn::new(1, 1));
        assert!(d.follows(SlotPos::START));
    }
}
