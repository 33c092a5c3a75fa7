//! SQLite's own diagnostics (its error log) go to the node's log.
//!
//! Without this, a failure such as "unable to open database file" reaches the client and the
//! node's log without its cause; SQLite logs the failing system call and its errno
//! (`os_unix.c:...: (24) open(...) - Too many open files`) through this hook.

use rusqlite::ffi;
use std::ffi::{CStr, c_char, c_int, c_void};

/// How loud a message SQLite logs with `code` is. Statement errors a client caused (a constraint,
/// a syntax error) are logged by SQLite too and are the client's business: debug. Failures of
/// the storage under the node are warnings.
pub fn is_storage_trouble(code: c_int) -> bool {
    matches!(
        code & 0xff,
        ffi::SQLITE_CANTOPEN
            | ffi::SQLITE_IOERR
            | ffi::SQLITE_CORRUPT
            | ffi::SQLITE_FULL
            | ffi::SQLITE_NOMEM
            | ffi::SQLITE_NOTADB
            | ffi::SQLITE_PROTOCOL
    )
}

unsafe extern "C" fn log_message(_: *mut c_void, code: c_int, message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: SQLite passes a NUL-terminated message valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    if is_storage_trouble(code) {
        tracing::warn!(target: "sqlite", code, "{text}");
    } else {
        tracing::debug!(target: "sqlite", code, "{text}");
    }
}

/// Installs the hook; `false` if SQLite was initialised already. Call before the first
/// connection opens.
pub fn install() -> bool {
    type LogFn = unsafe extern "C" fn(*mut c_void, c_int, *const c_char);
    // SAFETY: SQLITE_CONFIG_LOG takes a function pointer and a context pointer; the function
    // is thread-safe and calls no SQLite function, as SQLite requires.
    let rc = unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_LOG,
            log_message as LogFn,
            std::ptr::null_mut::<c_void>(),
        )
    };
    rc == ffi::SQLITE_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_are_warnings_and_client_mistakes_are_not() {
        assert!(is_storage_trouble(ffi::SQLITE_CANTOPEN));
        assert!(is_storage_trouble(ffi::SQLITE_IOERR_FSYNC));
        assert!(is_storage_trouble(ffi::SQLITE_FULL));
        assert!(!is_storage_trouble(ffi::SQLITE_CONSTRAINT_UNIQUE));
        assert!(!is_storage_trouble(ffi::SQLITE_ERROR));
        assert!(!is_storage_trouble(ffi::SQLITE_NOTICE));
    }
}
