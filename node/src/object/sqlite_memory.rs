//! SQLite allocates from mimalloc, like the rest of the node, instead of from the C library.
//!
//! With glibc's allocator, freeing a large value (a 64 KiB put, say) at the top of a thread's
//! arena gives the memory back to the kernel at once (`madvise`), which on a multi-threaded
//! process flushes every core's TLB by interrupt, and the next large value faults its pages in
//! again, each zeroed by the kernel. In a profile of 64 KiB puts that cycle was about 5% of the
//! node's CPU. mimalloc keeps freed memory for reuse and returns it lazily.
//!
//! The bytes SQLite holds are counted here, not by SQLite: SQLite's own count (its "memory
//! status", on by default) takes one process-wide mutex around every allocation and free, and
//! every thread running an object allocates. Creating objects on 64 connections, futex waits and
//! wake-ups were about 7% of the node's CPU in a profile, at least 2.7% of it under SQLite's
//! malloc alone. Here each thread adds to one of a few counters on their own cache lines,
//! without a lock.

use libmimalloc_sys as mi;
use rusqlite::ffi;
use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

/// Bytes held, in a few counters on their own cache lines; a thread always adds to the same
/// one. Their sum is the total (one may go negative: memory is often freed by another thread
/// than the one that allocated it).
struct Counter {
    shards: [Shard; SHARDS],
}

const SHARDS: usize = 16;

#[repr(align(64))]
struct Shard(AtomicI64);

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

impl Counter {
    const fn new() -> Self {
        Counter {
            shards: [const { Shard(AtomicI64::new(0)) }; SHARDS],
        }
    }

    fn add(&self, delta: i64) {
        let i = SHARD
            .try_with(|s| {
                let mut i = s.get();
                if i == usize::MAX {
                    i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
                    s.set(i);
                }
                i
            })
            // A thread being torn down: any counter will do.
            .unwrap_or(0);
        self.shards[i].0.fetch_add(delta, Ordering::Relaxed);
    }

    fn total(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// SQLite's bytes.
static SQLITE_BYTES: Counter = Counter::new();
/// Whether SQLite allocates through this module (and so is counted here).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Bytes SQLite holds now (as mimalloc sizes its blocks).
pub fn bytes_in_use() -> i64 {
    if INSTALLED.load(Ordering::Relaxed) {
        SQLITE_BYTES.total()
    } else {
        // SQLite kept the C library's allocator, and its own count.
        // SAFETY: sqlite3_memory_used has no preconditions.
        unsafe { ffi::sqlite3_memory_used() }
    }
}

fn usable(p: *mut c_void) -> i64 {
    // SAFETY: callers pass only non-null blocks from mimalloc.
    unsafe { mi::mi_usable_size(p) as i64 }
}

fn malloc_counted(counter: &Counter, bytes: c_int) -> *mut c_void {
    // SAFETY: mi_malloc accepts any size; SQLite never asks for a negative one.
    let p = unsafe { mi::mi_malloc(bytes.max(0) as usize) };
    if !p.is_null() {
        counter.add(usable(p));
    }
    p
}

/// # Safety
/// `p` is null or a live block from `malloc_counted`/`realloc_counted` on the same counter.
unsafe fn free_counted(counter: &Counter, p: *mut c_void) {
    if p.is_null() {
        return;
    }
    counter.add(-usable(p));
    // SAFETY: the caller's contract.
    unsafe { mi::mi_free(p) }
}

/// # Safety
/// As for [`free_counted`].
unsafe fn realloc_counted(counter: &Counter, p: *mut c_void, bytes: c_int) -> *mut c_void {
    let before = if p.is_null() { 0 } else { usable(p) };
    // SAFETY: the caller's contract.
    let q = unsafe { mi::mi_realloc(p, bytes.max(0) as usize) };
    if !q.is_null() {
        counter.add(usable(q) - before);
    }
    // On failure `p` is still allocated, and still counted.
    q
}

unsafe extern "C" fn sqlite_malloc(bytes: c_int) -> *mut c_void {
    malloc_counted(&SQLITE_BYTES, bytes)
}

unsafe extern "C" fn sqlite_free(p: *mut c_void) {
    // SAFETY: SQLite frees only what `sqlite_malloc`/`sqlite_realloc` returned (or null).
    unsafe { free_counted(&SQLITE_BYTES, p) }
}

unsafe extern "C" fn sqlite_realloc(p: *mut c_void, bytes: c_int) -> *mut c_void {
    // SAFETY: `p` came from this allocator (SQLite's contract for xRealloc).
    unsafe { realloc_counted(&SQLITE_BYTES, p, bytes) }
}

unsafe extern "C" fn sqlite_size(p: *mut c_void) -> c_int {
    // SAFETY: `p` came from this allocator; SQLite's allocations stay below 2^31 bytes.
    let size = unsafe { mi::mi_usable_size(p) };
    c_int::try_from(size).unwrap_or(c_int::MAX)
}

unsafe extern "C" fn sqlite_roundup(bytes: c_int) -> c_int {
    // SAFETY: mi_good_size only computes a size class.
    let size = unsafe { mi::mi_good_size(bytes.max(0) as usize) };
    c_int::try_from(size).unwrap_or(bytes)
}

unsafe extern "C" fn sqlite_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn sqlite_shutdown(_: *mut c_void) {}

/// Points SQLite at mimalloc, counted here, and turns SQLite's own count (and its mutex) off;
/// `false` if SQLite was initialised already (it then keeps the C library's allocator and its
/// own count). Call before the process's first connection.
pub fn use_mimalloc() -> bool {
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(sqlite_malloc),
        xFree: Some(sqlite_free),
        xRealloc: Some(sqlite_realloc),
        xSize: Some(sqlite_size),
        xRoundup: Some(sqlite_roundup),
        xInit: Some(sqlite_init),
        xShutdown: Some(sqlite_shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: SQLite copies the methods before returning, and refuses (SQLITE_MISUSE) once it
    // has been initialised, so no memory from the old allocator can reach the new one.
    let rc = unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_MALLOC,
            &methods as *const ffi::sqlite3_mem_methods,
        )
    };
    if rc != ffi::SQLITE_OK {
        return false;
    }
    INSTALLED.store(true, Ordering::Relaxed);
    // SAFETY: as above, before initialisation; SQLITE_CONFIG_MEMSTATUS takes one int.
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as c_int) };
    if rc != ffi::SQLITE_OK {
        tracing::warn!(
            rc,
            "SQLite keeps counting its memory under its global mutex"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocator_answers_sizes_sqlite_relies_on() {
        // SAFETY: each pointer comes from these functions and is freed once.
        unsafe {
            let p = sqlite_malloc(100);
            assert!(!p.is_null());
            assert!(sqlite_size(p) >= 100);
            assert!(sqlite_roundup(100) >= 100);
            std::ptr::write_bytes(p.cast::<u8>(), 7, 100);
            let q = sqlite_realloc(p, 70_000);
            assert!(!q.is_null());
            assert!(sqlite_size(q) >= 70_000);
            assert_eq!(*q.cast::<u8>().add(99), 7, "realloc keeps the contents");
            sqlite_free(q);
            sqlite_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn every_byte_counted_in_is_counted_out_whichever_thread_frees_it() {
        let counter: &'static Counter = Box::leak(Box::new(Counter::new()));
        let a = malloc_counted(counter, 1000);
        let b = malloc_counted(counter, 50_000);
        assert_eq!(counter.total(), usable(a) + usable(b));
        assert!(counter.total() >= 51_000);
        let (a, b) = (a as usize, b as usize);
        let grown = std::thread::spawn(move || {
            let (a, b) = (a as *mut c_void, b as *mut c_void);
            // SAFETY: live blocks of this counter, freed and resized on another thread than the
            // one that allocated them.
            unsafe {
                free_counted(counter, a);
                realloc_counted(counter, b, 200_000) as usize
            }
        })
        .join()
        .expect("thread") as *mut c_void;
        assert!(usable(grown) >= 200_000);
        assert_eq!(counter.total(), usable(grown));
        // SAFETY: as above.
        unsafe { free_counted(counter, grown) };
        assert_eq!(counter.total(), 0);
    }

    #[test]
    fn sqlite_memory_is_counted_here_once_installed() {
        crate::object::db::configure_sqlite();
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (zeroblob(100000));")
            .expect("write");
        assert!(INSTALLED.load(Ordering::Relaxed));
        assert!(bytes_in_use() > 100_000, "{}", bytes_in_use());
        // SQLite's own count is off: it no longer takes its mutex on every allocation.
        // SAFETY: sqlite3_memory_used has no preconditions.
        assert_eq!(unsafe { ffi::sqlite3_memory_used() }, 0);
    }
}
