//! SQLite allocates from mimalloc, like the rest of the node, instead of from the C library.
//!
//! With glibc's allocator, freeing a large value (a 64 KiB put, say) at the top of a thread's
//! arena gives the memory back to the kernel at once (`madvise`), which on a multi-threaded
//! process flushes every core's TLB by interrupt, and the next large value faults its pages in
//! again, each zeroed by the kernel. In a profile of 64 KiB puts that cycle was about 5% of the
//! node's CPU. mimalloc keeps freed memory for reuse and returns it lazily.

use libmimalloc_sys as mi;
use rusqlite::ffi;
use std::ffi::{c_int, c_void};

unsafe extern "C" fn sqlite_malloc(bytes: c_int) -> *mut c_void {
    // SAFETY: mi_malloc accepts any size; SQLite never asks for a negative one.
    unsafe { mi::mi_malloc(bytes.max(0) as usize) }
}

unsafe extern "C" fn sqlite_free(p: *mut c_void) {
    // SAFETY: SQLite frees only what `sqlite_malloc`/`sqlite_realloc` returned (or null).
    unsafe { mi::mi_free(p) }
}

unsafe extern "C" fn sqlite_realloc(p: *mut c_void, bytes: c_int) -> *mut c_void {
    // SAFETY: `p` came from this allocator (SQLite's contract for xRealloc).
    unsafe { mi::mi_realloc(p, bytes.max(0) as usize) }
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

/// Points SQLite at mimalloc; `false` if SQLite was initialised already (it then keeps the C
/// library's allocator). Call before the process's first connection.
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
    rc == ffi::SQLITE_OK
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
}
