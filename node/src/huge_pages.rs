//! The node turns transparent huge pages off for itself.
//!
//! mimalloc asks the kernel for huge pages (`madvise(MADV_HUGEPAGE)`) on the memory it maps, and
//! gives each thread its own heap. The node runs objects on many threads (up to a hundred or more
//! under load), so a thread that touched a few kilobytes got a whole 2 MiB page: with 64 objects
//! just created the node held 49 MB, 34 MB of it in huge pages, against 24 MB without. After
//! touching 100,000 objects its RSS was 600-650 MB with them and 520-550 MB without
//! (`colony-bench single --workloads z --rss-objects 100000`). The node's memory is small
//! scattered pieces (SQLite pages and connections, one set per open object): huge pages buy it
//! nothing measurable and cost it memory.
//!
//! `PR_SET_THP_DISABLE` applies to the whole process at fault time, so it also covers memory
//! mapped before this runs, and hosts whose THP setting is `always` rather than `madvise`.
//! Setting `MIMALLOC_ALLOW_THP` in the environment leaves the choice to mimalloc (which reads that
//! variable itself): `MIMALLOC_ALLOW_THP=1` keeps huge pages.

use std::ffi::OsStr;

/// Whether the node should turn huge pages off, given `MIMALLOC_ALLOW_THP` from the environment:
/// yes unless the operator chose.
pub fn should_disable(allow_thp_env: Option<&OsStr>) -> bool {
    allow_thp_env.is_none()
}

/// Turns transparent huge pages off for this process unless the environment chose otherwise.
/// Linux only; elsewhere it does nothing.
pub fn configure() -> std::io::Result<()> {
    if !should_disable(std::env::var_os("MIMALLOC_ALLOW_THP").as_deref()) {
        return Ok(());
    }
    disable()
}

#[cfg(target_os = "linux")]
fn disable() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes one integer argument (the remaining ones must be 0) and
    // only sets a flag on this process's memory map.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn disable() -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_decides_only_when_the_environment_does_not() {
        assert!(should_disable(None));
        assert!(!should_disable(Some(OsStr::new("1"))));
        assert!(!should_disable(Some(OsStr::new("0"))));
    }
}
