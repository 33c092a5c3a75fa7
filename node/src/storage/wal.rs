//! Captures a commit's pages from the SQLite write-ahead log the object database just appended to.
//!
//! SQLite's WAL file is a 32-byte header followed by frames of a 24-byte header and one page. A
//! frame header holds the page number and, on the last frame of a commit, the database size in
//! pages after the commit. SQLite's WAL hook reports the number of valid frames after each commit;
//! the frames between the previous count and the new one are exactly that commit's pages (a page
//! written twice within it appears twice, and the later frame wins).

use super::record::{Entry, ObjectKey, PageSetBuilder, SlotKey};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const WAL_HEADER_BYTES: u64 = 32;
pub const FRAME_HEADER_BYTES: u64 = 24;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("cannot read the write-ahead log: {0}")]
    Io(#[from] std::io::Error),
    #[error("write-ahead log frames {from}..{to} do not end with a commit frame")]
    NoCommitFrame { from: u32, to: u32 },
}

/// A read handle on one object's `-wal` file.
pub struct WalReader {
    file: File,
    page_size: u32,
    buf: Vec<u8>,
}

/// The pages of one commit, ready to be placed in its slot's log.
pub struct CapturedCommit {
    pub entry: Entry,
    pub db_pages: u32,
    pub page_count: u32,
}

impl WalReader {
    pub fn open(wal_path: &Path, page_size: u32) -> std::io::Result<Self> {
        Ok(WalReader {
            file: File::open(wal_path)?,
            page_size,
            buf: Vec::new(),
        })
    }

    fn frame_bytes(&self) -> u64 {
        FRAME_HEADER_BYTES + u64::from(self.page_size)
    }

    /// Reads frames `from..to` (0-based) and builds the page-set payload for `object`.
    pub fn capture(
        &mut self,
        object: &ObjectKey,
        slot: &SlotKey,
        from: u32,
        to: u32,
    ) -> Result<CapturedCommit, WalError> {
        let frame = self.frame_bytes() as usize;
        let count = to.saturating_sub(from) as usize;
        self.buf.resize(count * frame, 0);
        let offset = WAL_HEADER_BYTES + u64::from(from) * frame as u64;
        self.file.read_exact_at(&mut self.buf, offset)?;

        let header = |i: usize| {
            let h = &self.buf[i * frame..i * frame + FRAME_HEADER_BYTES as usize];
            let pgno = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let db_size = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            (pgno, db_size)
        };
        let db_pages = match count.checked_sub(1).map(header) {
            Some((_, size)) if size > 0 => size,
            _ => return Err(WalError::NoCommitFrame { from, to }),
        };
        // Latest frame per page; pages past the new end of the database are dropped (truncation).
        let mut latest: Vec<(u32, usize)> = (0..count)
            .map(|i| (header(i).0, i))
            .filter(|(pgno, _)| *pgno >= 1 && *pgno <= db_pages)
            .collect();
        latest.sort_by_key(|&(pgno, i)| (pgno, std::cmp::Reverse(i)));
        latest.dedup_by_key(|(pgno, _)| *pgno);

        let mut builder = PageSetBuilder::new(object, slot, self.page_size, db_pages, latest.len());
        for (pgno, i) in &latest {
            let start = i * frame + FRAME_HEADER_BYTES as usize;
            builder.push(*pgno, &self.buf[start..start + self.page_size as usize]);
        }
        let page_count = builder.page_count();
        Ok(CapturedCommit {
            entry: builder.finish(),
            db_pages,
            page_count,
        })
    }
}
