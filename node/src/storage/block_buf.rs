//! A write buffer for direct I/O: its memory starts on a [`BLOCK`] boundary and writes from it
//! are padded to whole blocks, as `O_DIRECT` requires of the memory, length and file offset of
//! every transfer.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The unit of direct I/O here: a multiple of every logical block size in use (512 or 4096)
/// and of the page size.
pub const BLOCK: usize = 4096;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// Bytes in whole, aligned blocks. The storage only grows (zeroed when it does) and is reused:
/// [`BlockBuf::grow`] hands out bytes that still hold what an earlier use wrote, for the caller
/// to overwrite, so filling the buffer costs one pass over the bytes, not a zeroing first.
pub struct BlockBuf {
    blocks: Vec<Block>,
    len: usize,
}

/// `n` rounded down to a block boundary.
pub fn block_floor(n: u64) -> u64 {
    n - n % BLOCK as u64
}

impl BlockBuf {
    pub fn with_capacity(bytes: usize) -> Self {
        BlockBuf {
            blocks: vec![Block([0; BLOCK]); bytes.div_ceil(BLOCK)],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Lengthens the buffer by `n` bytes and returns them; the caller writes every one.
    pub fn grow(&mut self, n: usize) -> &mut [u8] {
        let start = self.len;
        let end = start + n;
        let blocks = end.div_ceil(BLOCK);
        if blocks > self.blocks.len() {
            self.blocks.resize(blocks, Block([0; BLOCK]));
        }
        self.len = end;
        &mut self.blocks.as_mut_bytes()[start..end]
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.grow(bytes.len()).copy_from_slice(bytes);
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.blocks.as_bytes()[..self.len]
    }

    /// The content, zero-padded to the next block boundary: what a direct write takes.
    pub fn padded(&mut self) -> &[u8] {
        let end = self.len.div_ceil(BLOCK) * BLOCK;
        let bytes = self.blocks.as_mut_bytes();
        bytes[self.len..end].fill(0);
        &bytes[..end]
    }

    /// Keeps only the bytes of the last, partly filled block, moved to the front (nothing when
    /// the content ends on a block boundary): the next write starts on that block again.
    pub fn keep_partial_block(&mut self) {
        let from = block_floor(self.len as u64) as usize;
        self.blocks.as_mut_bytes().copy_within(from..self.len, 0);
        self.len -= from;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_come_out_aligned_and_padded_to_whole_blocks() {
        let mut buf = BlockBuf::with_capacity(0);
        assert!(buf.padded().is_empty(), "nothing to write");
        buf.extend_from_slice(&[7; 10]);
        assert_eq!(buf.as_bytes(), &[7; 10]);
        let padded = buf.padded();
        assert_eq!(
            padded.as_ptr() as usize % BLOCK,
            0,
            "memory starts on a block"
        );
        assert_eq!(padded.len(), BLOCK);
        assert!(padded[10..].iter().all(|&b| b == 0), "zero padding");

        // Grows past a block: the storage grows, the content stays.
        let more = buf.grow(BLOCK);
        assert_eq!(more.len(), BLOCK);
        more.fill(9);
        assert_eq!(buf.len(), BLOCK + 10);
        assert_eq!(&buf.as_bytes()[..10], &[7; 10]);
        assert_eq!(buf.padded().len(), 2 * BLOCK);
        assert_eq!(buf.padded().as_ptr() as usize % BLOCK, 0);
    }

    #[test]
    fn the_partly_filled_last_block_moves_to_the_front() {
        let mut buf = BlockBuf::with_capacity(BLOCK);
        buf.extend_from_slice(&[1; BLOCK]);
        buf.extend_from_slice(&[2; 100]);
        buf.keep_partial_block();
        assert_eq!(buf.as_bytes(), &[2; 100]);
        // Padding written meanwhile does not outlive the next fill.
        let _ = buf.padded();
        buf.extend_from_slice(&[3; 50]);
        assert_eq!(&buf.as_bytes()[..100], &[2; 100]);
        assert_eq!(&buf.as_bytes()[100..], &[3; 50]);

        // Content ending on a block boundary leaves nothing.
        buf.clear();
        buf.extend_from_slice(&[4; 2 * BLOCK]);
        buf.keep_partial_block();
        assert!(buf.is_empty());
    }

    #[test]
    fn block_floor_rounds_down() {
        assert_eq!(block_floor(0), 0);
        assert_eq!(block_floor(4095), 0);
        assert_eq!(block_floor(4096), 4096);
        assert_eq!(block_floor(10_000), 8192);
    }
}
