//! How the node's allocator (mimalloc) gives memory back to the kernel.
//!
//! mimalloc returns freed memory to the kernel (`madvise(MADV_DONTNEED)`) once it has been free
//! for its purge delay, 1 s by default. Under steady writes of large values the node frees and
//! reuses the same memory all the time, so every second it handed back memory it needed again at
//! once: each `madvise` on a multi-threaded process flushes every core's TLB by interrupt, and the
//! memory then faults back in page by page, each page zeroed by the kernel. In the cluster
//! benchmark's 64 KiB writes (5 nodes) that was about 2,000 page faults a second; with a 10 s
//! delay about 550, and under 400 with purging off. The 10 s keeps the memory of a busy node while
//! it is busy and still gives it back soon after a burst.
//!
//! `MIMALLOC_PURGE_DELAY` (or its older name `MIMALLOC_RESET_DELAY`) in the environment, in
//! milliseconds (-1: never), overrides the node's choice.

use std::ffi::{OsStr, c_long};

/// How long memory stays free before it goes back to the kernel, in milliseconds.
pub const PURGE_DELAY_MS: c_long = 10_000;

/// mimalloc's option number for the purge delay (`mi_option_purge_delay` in `mimalloc.h`; the
/// Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay to set, given the two environment variables mimalloc reads for it: none when
/// either is set, so the operator's value stands.
pub fn purge_delay(purge_env: Option<&OsStr>, reset_env: Option<&OsStr>) -> Option<c_long> {
    match (purge_env, reset_env) {
        (None, None) => Some(PURGE_DELAY_MS),
        _ => None,
    }
}

/// Sets the node's purge delay unless the environment sets one. Call it at start-up.
pub fn configure() {
    let purge = std::env::var_os("MIMALLOC_PURGE_DELAY");
    let reset = std::env::var_os("MIMALLOC_RESET_DELAY");
    if let Some(ms) = purge_delay(purge.as_deref(), reset.as_deref()) {
        // SAFETY: setting an option is a plain store mimalloc allows at any time; the purge
        // delay is read afresh at every purge it schedules.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms) }
    }
}

/// The purge delay mimalloc uses now, in milliseconds.
pub fn current_purge_delay() -> c_long {
    // SAFETY: reading an option has no preconditions.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_sets_its_delay_only_when_the_environment_does_not() {
        assert_eq!(purge_delay(None, None), Some(PURGE_DELAY_MS));
        assert_eq!(purge_delay(Some(OsStr::new("-1")), None), None);
        assert_eq!(purge_delay(None, Some(OsStr::new("250"))), None);
        assert_eq!(
            purge_delay(Some(OsStr::new("0")), Some(OsStr::new("5"))),
            None
        );
    }

    #[test]
    fn the_option_number_is_mimallocs_purge_delay() {
        let purge = std::env::var_os("MIMALLOC_PURGE_DELAY");
        let reset = std::env::var_os("MIMALLOC_RESET_DELAY");
        let Some(ms) = purge_delay(purge.as_deref(), reset.as_deref()) else {
            return; // the environment chose the delay; mimalloc's own default is not in force
        };
        // mimalloc's default for the option is 1,000 ms: any other value means the number names
        // another option.
        let before = current_purge_delay();
        assert!(
            before == 1_000 || before == ms,
            "option {MI_OPTION_PURGE_DELAY} reads {before}, not a purge delay"
        );
        configure();
        assert_eq!(current_purge_delay(), ms);
    }
}
