//! One object's SQLite database, owned by one thread at a time.
//!
//! Configured so that the node log, not SQLite, is the durability point:
//! - `locking_mode=EXCLUSIVE` before WAL mode: the wal-index lives in heap memory, no `-shm` file,
//!   no lock syscalls per transaction (only this process ever opens the file);
//! - `synchronous=OFF`, automatic checkpoints off, and no checkpoint on close: frames reach the
//!   database file only through [`ObjectDb::checkpoint`], after the node log holds them;
//! - a WAL hook records how many frames the WAL holds after each commit, so the commit's pages can
//!   be read back from the `-wal` file and logged.

use super::authorizer::{Denial, authorize};
use crate::config::Limits;
use crate::error::ApiError;
use crate::storage::dirs::PendingDirs;
use crate::storage::record::{ObjectKey, SlotKey};
use crate::storage::wal::{CapturedCommit, FRAME_HEADER_BYTES, WalReader};
use rusqlite::config::DbConfig;
use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const PAGE_SIZE: u32 = 4096;

/// Every statement Colony prepares for itself starts with this comment. SQLite's statement cache
/// is keyed by the statement text, and the authorizer only runs when a statement is prepared, so
/// client SQL with the same text as an internal statement must never be served from the cache:
/// client statements starting with the mark are prepared afresh, under the client's rules.
pub const INTERNAL_MARK: &str = "/*colony*/";

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_nanos() as u64
}

/// What a committed transaction produced.
pub struct Committed<T> {
    pub value: T,
    /// The commit's pages, when it wrote anything.
    pub pages: Option<CapturedCommit>,
}

pub struct ObjectDb {
    conn: Connection,
    key: ObjectKey,
    /// The slot whose log this object's commits go to.
    slot: SlotKey,
    path: PathBuf,
    wal: Option<WalReader>,
    /// Frames of the WAL already captured and handed to the log.
    frames_captured: u32,
    /// Frames in the WAL after the last commit, as reported by the WAL hook.
    wal_frames: Arc<AtomicU32>,
    user_mode: Arc<AtomicBool>,
    denial: Arc<Mutex<Option<Denial>>>,
    deadline: Arc<AtomicU64>,
    db_pages: u32,
    max_pages: u64,
    kv_table: Option<bool>,
    /// Our own descriptor on the database file, to fsync it after checkpoints.
    db_file: Arc<File>,
}

fn sqlite_err(e: rusqlite::Error) -> ApiError {
    if out_of_descriptors(e.sqlite_error_code()) {
        return too_many_open_files();
    }
    ApiError::internal(format!("database error: {e}"))
}

/// An error opening `path`: 503 when the process is out of file descriptors (the node sheds
/// load; a retry once connections or objects close succeeds), 500 otherwise.
fn open_err(path: &Path, e: &std::io::Error) -> ApiError {
    if descriptors_exhausted(e) {
        return too_many_open_files();
    }
    ApiError::internal(format!("cannot open {}: {e}", path.display()))
}

fn descriptors_exhausted(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether SQLite's error `code` means the process is out of file descriptors. SQLite says
/// only "unable to open database file" (`CANTOPEN`), as for a missing directory or a denied
/// permission, so a failed open looks for itself. (A descriptor freed in between makes it a
/// 500, as before.)
fn out_of_descriptors(code: Option<ErrorCode>) -> bool {
    code == Some(ErrorCode::CannotOpen)
        && File::open("/dev/null")
            .err()
            .is_some_and(|e| descriptors_exhausted(&e))
}

fn too_many_open_files() -> ApiError {
    ApiError::unavailable(
        "too_many_open_files",
        "the node has no file descriptors left to open this object's database; retry shortly",
    )
}

/// Database files this small are checked for never having been written.
const UNWRITTEN_CHECK_BYTES: u64 = 64 << 10;

/// Empties a database file that holds nothing but zeros, and tells whether the file holds
/// nothing (missing, empty or emptied). New files' contents are not fsynced (see
/// `ObjectDb::open`), so a machine that crashed soon after creating one can leave its length on
/// disk without its first page: zeros, which SQLite refuses as "not a database". Such a file
/// holds no data by definition, and whatever was written to the object since is replayed from
/// the node log. A file with anything else in it is left for SQLite to judge.
fn empty_if_never_written(path: &Path) -> Result<bool, ApiError> {
    let fail =
        |e: std::io::Error| ApiError::internal(format!("cannot check {}: {e}", path.display()));
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(fail(e)),
    };
    if len == 0 {
        return Ok(true);
    }
    if len > UNWRITTEN_CHECK_BYTES {
        return Ok(false);
    }
    // Every database written at all starts with SQLite's 16-byte header: reopening one reads
    // just that much here.
    let mut header = [0u8; 16];
    let head = header.len().min(len as usize);
    std::fs::File::open(path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut header[..head], 0))
        .map_err(fail)?;
    if header.iter().any(|&b| b != 0) {
        return Ok(false);
    }
    let bytes = std::fs::read(path).map_err(fail)?;
    let zeros = bytes.iter().all(|&b| b == 0);
    if zeros {
        tracing::warn!(path = %path.display(), bytes = len, "a database file holds only zeros (created just before a crash); starting it empty");
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(0))
            .map_err(fail)?;
    }
    Ok(zeros)
}

impl ObjectDb {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(
        path: &Path,
        key: ObjectKey,
        slot: SlotKey,
        limits: &Limits,
        new_dirs: &PendingDirs,
    ) -> Result<Self, ApiError> {
        // A file with content has a parent and a durable name (see `storage::dirs`): only a new
        // one needs its directory made, and the directories whose entries it changes (its own,
        // and the parent of each directory made for it) synced before its first checkpoint.
        let new_file = empty_if_never_written(path)?;
        let mut changed_dirs: Vec<PathBuf> = Vec::new();
        if let Some(parent) = path.parent().filter(|_| new_file) {
            changed_dirs.push(parent.to_path_buf());
            changed_dirs.extend(crate::storage::dirs::create_dir_all_noting(parent).map_err(
                |e| ApiError::internal(format!("cannot create {}: {e}", parent.display())),
            )?);
        }
        configure_sqlite();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        // Without file locks ("unix-none"): an object's database has one connection, this
        // actor's, in the one process that holds the data directory (`server::lock_data_dir`),
        // and exclusive locking mode keeps the WAL index in memory. SQLite's default VFS keeps
        // every open file in one global list it searches on each open: with 20,000 objects open
        // that search was a fifth of the node's CPU, and new objects were created at 1,200/s
        // rather than 1,800/s (`colony-bench single --rss-objects 5000,20000`).
        let mut conn =
            Connection::open_with_flags_and_vfs(path, flags, c"unix-none").map_err(sqlite_err)?;
        shrink_lookaside(&conn);
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .map_err(sqlite_err)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)
            .map_err(sqlite_err)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(sqlite_err)?;
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(sqlite_err)?;
        // Before the switch to WAL: on a new file the switch is a rollback-journal transaction,
        // which at SQLite's default level fsyncs the journal (twice), its directory and the
        // database. Four fsyncs per new object made a first write cost 1.8 ms instead of 0.3,
        // and 64 objects created at once under load took up to 100 ms. The node log makes writes
        // durable, not these files: a new file that crashed unwritten is emptied above, and its
        // name is synced before its first checkpoint marker (`PendingDirs`).
        conn.pragma_update(None, "synchronous", "OFF")
            .map_err(sqlite_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(sqlite_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ApiError::internal(format!(
                "cannot switch {} to WAL mode (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch(
            "PRAGMA wal_autocheckpoint=0; PRAGMA cache_size=-1024; \
             PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY; PRAGMA trusted_schema=OFF;",
        )
        .map_err(sqlite_err)?;
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sqlite_err)?;
        let max_pages = (limits.max_database_bytes.0 / u64::from(page_size)).max(2);
        conn.pragma_update(None, "max_page_count", max_pages as i64)
            .map_err(sqlite_err)?;
        let clamp = |v: u64| v.min(i32::MAX as u64) as i32;
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, clamp(limits.max_row_bytes.0))
            .map_err(sqlite_err)?;
        conn.set_limit(
            Limit::SQLITE_LIMIT_SQL_LENGTH,
            clamp(limits.max_statement_bytes.0),
        )
        .map_err(sqlite_err)?;
        conn.set_limit(
            Limit::SQLITE_LIMIT_VARIABLE_NUMBER,
            clamp(limits.max_params as u64),
        )
        .map_err(sqlite_err)?;
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)
            .map_err(sqlite_err)?;
        conn.set_prepared_statement_cache_capacity(32);

        let wal_frames = Arc::new(AtomicU32::new(0));
        let frames = wal_frames.clone();
        conn.wal_hook(Some(
            move |_: &mut rusqlite::hooks::Wal, n: std::ffi::c_int| {
                frames.store(n.max(0) as u32, Ordering::Release);
                Ok(())
            },
        ))
        .map_err(sqlite_err)?;

        let user_mode = Arc::new(AtomicBool::new(false));
        let denial: Arc<Mutex<Option<Denial>>> = Arc::new(Mutex::new(None));
        let (mode_flag, denial_slot) = (user_mode.clone(), denial.clone());
        conn.authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
            let (verdict, why) = authorize(&ctx, mode_flag.load(Ordering::Relaxed));
            if let (Some(why), Ok(mut slot)) = (why, denial_slot.lock()) {
                *slot = Some(why);
            }
            verdict
        }))
        .map_err(sqlite_err)?;

        let deadline = Arc::new(AtomicU64::new(0));
        let d = deadline.clone();
        conn.progress_handler(
            1000,
            Some(move || {
                let at = d.load(Ordering::Relaxed);
                at != 0 && nanos_since_epoch(Instant::now()) > at
            }),
        )
        .map_err(sqlite_err)?;

        let db_pages: u32 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(sqlite_err)?;
        let db_file = Arc::new(File::open(path).map_err(|e| open_err(path, &e))?);
        // Opened now, not at the first commit: a commit that SQLite made but the node could not
        // read from the WAL (no descriptor left) would be visible here but in no page set.
        // Opening a database in WAL mode creates its `-wal`; should it be missing, the first
        // commit opens the reader (`capture`).
        let wal_path = wal_path_of(path);
        let wal = match WalReader::open(&wal_path, PAGE_SIZE) {
            Ok(reader) => Some(reader),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(open_err(&wal_path, &e)),
        };
        new_dirs.add(changed_dirs);
        Ok(ObjectDb {
            conn,
            key,
            slot,
            path: path.to_path_buf(),
            wal,
            frames_captured: 0,
            wal_frames,
            user_mode,
            denial,
            deadline,
            db_pages,
            max_pages,
            kv_table: None,
            db_file,
        })
    }

    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    pub fn slot(&self) -> &SlotKey {
        &self.slot
    }

    /// Reads the whole database file (after a checkpoint it is the object's state).
    pub fn read_file(&self) -> Result<Vec<u8>, ApiError> {
        std::fs::read(&self.path)
            .map_err(|e| ApiError::internal(format!("cannot read {}: {e}", self.path.display())))
    }

    pub fn page_size(&self) -> u32 {
        PAGE_SIZE
    }

    /// Database size in bytes as of the last commit.
    pub fn size_bytes(&self) -> u64 {
        u64::from(self.db_pages) * u64::from(PAGE_SIZE)
    }

    /// True when the database has no table, index, view or trigger: an object that was only
    /// read. (Switching a new file to WAL mode writes an empty first page, so size alone
    /// cannot tell.)
    pub fn is_empty(&self) -> Result<bool, ApiError> {
        self.user_mode.store(false, Ordering::Relaxed);
        self.conn
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM sqlite_schema)", [], |r| {
                r.get(0)
            })
            .map_err(sqlite_err)
    }

    /// Bytes of frames in the WAL not yet checkpointed.
    pub fn wal_bytes(&self) -> u64 {
        u64::from(self.frames_captured) * (FRAME_HEADER_BYTES + u64::from(PAGE_SIZE))
    }

    pub fn has_kv_table(&mut self) -> Result<bool, ApiError> {
        if let Some(known) = self.kv_table {
            return Ok(known);
        }
        let exists: bool = self
            .conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
                [super::kv::KV_TABLE],
                |r| r.get(0),
            )
            .map_err(sqlite_err)?;
        self.kv_table = Some(exists);
        Ok(exists)
    }

    pub fn set_kv_table_created(&mut self) {
        self.kv_table = Some(true);
    }

    /// Runs `work` in one transaction. On success the transaction commits and its pages are
    /// captured from the WAL; on any error it rolls back and nothing stays visible.
    pub fn transaction<T>(
        &mut self,
        time_limit: Duration,
        work: impl FnOnce(&mut Tx<'_>) -> Result<T, ApiError>,
    ) -> Result<Committed<T>, ApiError> {
        self.user_mode.store(false, Ordering::Relaxed);
        if let Ok(mut d) = self.denial.lock() {
            *d = None;
        }
        if !self.conn.is_autocommit() {
            // Never expected: a transaction left open would fail every request from now on.
            tracing::error!(object = %self.key, "a transaction was left open; rolling it back");
            self.conn.execute_batch("ROLLBACK").map_err(sqlite_err)?;
        }
        // The time limit covers the request's own statements only. An interrupted BEGIN may
        // leave its transaction open, and an interrupted COMMIT may have committed already: a
        // request would then be reported rolled back (and run again) although it took effect.
        let begun = self
            .conn
            .prepare_cached("/*colony*/ BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]));
        if let Err(e) = begun {
            return Err(self.map_error(e));
        }
        self.deadline.store(
            nanos_since_epoch(Instant::now() + time_limit),
            Ordering::Relaxed,
        );
        let kv_before = self.kv_table;
        let result = {
            let mut tx = Tx { db: self };
            work(&mut tx)
        };
        self.deadline.store(0, Ordering::Relaxed);
        self.user_mode.store(false, Ordering::Relaxed);
        let committed = result.and_then(|value| {
            match self
                .conn
                .prepare_cached("/*colony*/ COMMIT")
                .and_then(|mut s| s.execute([]))
            {
                Ok(_) => Ok(value),
                Err(e) => Err(self.map_error(e)),
            }
        });
        match committed {
            Ok(value) => {
                let pages = self.capture()?;
                Ok(Committed { value, pages })
            }
            Err(e) => {
                if !self.conn.is_autocommit()
                    && let Err(rb) = self.conn.execute_batch("ROLLBACK")
                {
                    tracing::error!(object = %self.key, error = %rb, "rollback failed");
                }
                self.kv_table = kv_before;
                Err(e)
            }
        }
    }

    /// Reads the frames the last commit appended to the WAL.
    fn capture(&mut self) -> Result<Option<CapturedCommit>, ApiError> {
        let frames = self.wal_frames.load(Ordering::Acquire);
        if frames <= self.frames_captured {
            return Ok(None);
        }
        if self.wal.is_none() {
            let wal_path = wal_path_of(&self.path);
            // Not a 503 `too_many_open_files` as at open: SQLite has committed by now, and a
            // retry could apply the request twice.
            self.wal = Some(WalReader::open(&wal_path, PAGE_SIZE).map_err(|e| {
                ApiError::internal(format!("cannot open {}: {e}", wal_path.display()))
            })?);
        }
        let Some(wal) = self.wal.as_mut() else {
            return Ok(None);
        };
        let captured = wal
            .capture(&self.key, &self.slot, self.frames_captured, frames)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.frames_captured = frames;
        self.db_pages = captured.db_pages;
        Ok(Some(captured))
    }

    /// Copies every WAL frame into the database file and empties the WAL. Only call once the
    /// node log holds every captured commit durably. The database file is *not* synced here:
    /// the caller syncs the returned handle (off the actor's thread) before it records the
    /// checkpoint, since until then the node log still covers everything.
    pub fn checkpoint(&mut self, mode: WalReuse) -> Result<Option<Arc<File>>, ApiError> {
        if self.frames_captured == 0 {
            return Ok(None);
        }
        let pragma = match mode {
            WalReuse::Keep => "PRAGMA wal_checkpoint(RESTART)",
            WalReuse::Release => "PRAGMA wal_checkpoint(TRUNCATE)",
        };
        let (busy, _, _): (i64, i64, i64) = self
            .conn
            .query_row(pragma, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sqlite_err)?;
        if busy != 0 {
            return Err(ApiError::internal("checkpoint could not complete"));
        }
        self.frames_captured = 0;
        self.wal_frames.store(0, Ordering::Release);
        Ok(Some(self.db_file.clone()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_pages(&self) -> u64 {
        self.max_pages
    }

    /// Maps a SQLite error to what the client should see.
    pub fn map_error(&self, e: rusqlite::Error) -> ApiError {
        let denial = self.denial.lock().ok().and_then(|mut d| d.take());
        // SQLITE_FULL means either the disk or max_page_count; inside the failing transaction
        // the page count tells which.
        let at_page_limit = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull)
            && self
                .conn
                .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
                .is_ok_and(|pages| pages as u64 + 16 >= self.max_pages);
        map_sqlite_error(e, denial, at_page_limit)
    }
}

/// Process-wide SQLite settings; must run before the first connection opens (later calls are
/// refused by SQLite and ignored), so every open runs it first. SQLite allocates from mimalloc
/// and its memory is counted without its global mutex (see `sqlite_memory`). By
/// default each connection's page cache allocates 20 pages up front (~88 KB); with thousands of
/// small objects open that is most of the node's memory, so pages are allocated as they are used
/// instead.
pub fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !super::sqlite_memory::use_mimalloc() {
            tracing::warn!(
                "SQLite was initialised before it could be configured; it allocates from the C library"
            );
        }
        if !super::sqlite_log::install() {
            tracing::warn!("SQLite was initialised before its log could be routed to the node's");
        }
        // SAFETY: SQLITE_CONFIG_PAGECACHE with a null buffer only sets the initial page count; it
        // runs before the process's first database opens (every open calls this first).
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_PAGECACHE,
                std::ptr::null_mut::<std::ffi::c_void>(),
                0i32,
                0i32,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::warn!(
                rc,
                "SQLite was initialised before it could be configured; page caches allocate in bulk"
            );
        }
    });
}

/// Lookaside slots per connection and their size. SQLite's default (100 slots of 1200 bytes,
/// allocated up front) costs 120 KB per open database; a node keeps thousands open, and a few
/// small slots serve the short statements objects run just as well.
const LOOKASIDE_SLOT_BYTES: i32 = 128;
const LOOKASIDE_SLOTS: i32 = 32;

fn shrink_lookaside(conn: &Connection) {
    // SAFETY: the handle is valid for the connection's lifetime; SQLITE_DBCONFIG_LOOKASIDE with
    // a null buffer makes SQLite allocate the arena itself, and is called before any statement
    // exists, so no lookaside memory is in use.
    unsafe {
        let db = conn.handle();
        rusqlite::ffi::sqlite3_db_config(
            db,
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            LOOKASIDE_SLOT_BYTES,
            LOOKASIDE_SLOTS,
        );
    }
}

/// What a checkpoint does with the `-wal` file it has emptied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalReuse {
    /// Keep its blocks: the next commits overwrite them from the start. For an object that is
    /// writing: growing a truncated file again allocates blocks and has the filesystem zero
    /// the part of each new block a frame does not fill (frames are 24 bytes longer than a
    /// page, so most of them straddle two blocks).
    Keep,
    /// Truncate it to nothing, returning its space: for an object closing (idle or evicted) or
    /// being copied.
    Release,
}

pub fn wal_path_of(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Classifies a SQLite error: the client's mistake (4xx, with SQLite's message) or ours (5xx).
pub fn map_sqlite_error(
    e: rusqlite::Error,
    denial: Option<Denial>,
    at_page_limit: bool,
) -> ApiError {
    use rusqlite::Error as E;
    // Refusals by the authorizer surface as several error shapes; the recorded reason decides.
    if let Some(why) = denial.as_ref()
        && e.to_string().contains("not authorized")
    {
        return ApiError::bad_request("not_allowed", why.0.clone());
    }
    match e {
        E::SqliteFailure(f, msg) => {
            let msg = msg.unwrap_or_else(|| f.to_string());
            if names_reserved_table(&msg) {
                return reserved_table_error();
            }
            match f.code {
                ErrorCode::OperationInterrupted => ApiError::limit(
                    408,
                    "requestTimeLimit",
                    "the request ran longer than its time limit and was rolled back",
                ),
                ErrorCode::TooBig => ApiError::limit(
                    413,
                    "maxRowBytes",
                    format!("a string, blob or row is too large: {msg}"),
                ),
                ErrorCode::DiskFull if at_page_limit => ApiError::limit(
                    413,
                    "maxDatabaseBytes",
                    "the object's database would grow past its size limit",
                ),
                ErrorCode::DiskFull => {
                    ApiError::new(507, "storage_full", "the node's disk is full")
                }
                ErrorCode::AuthorizationForStatementDenied => {
                    let why = denial.map_or_else(|| "statement not allowed".to_string(), |d| d.0);
                    ApiError::bad_request("not_allowed", why)
                }
                ErrorCode::ConstraintViolation => ApiError::new(409, "constraint_violation", msg),
                ErrorCode::TypeMismatch
                | ErrorCode::ParameterOutOfRange
                | ErrorCode::Unknown
                | ErrorCode::ReadOnly => ApiError::bad_request("sql_error", msg),
                ErrorCode::ApiMisuse => ApiError::bad_request("sql_error", msg),
                ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen => {
                    if out_of_descriptors(Some(f.code)) {
                        return too_many_open_files();
                    }
                    ApiError::internal(format!("storage error: {msg}"))
                }
                ErrorCode::OutOfMemory => {
                    ApiError::unavailable("out_of_memory", "the node is out of memory")
                }
                _ => ApiError::bad_request("sql_error", msg),
            }
        }
        E::MultipleStatement => ApiError::bad_request(
            "sql_error",
            "only one statement per \"sql\"; send several as a \"batch\"",
        ),
        E::InvalidParameterCount(given, expected) => ApiError::bad_request(
            "invalid_params",
            format!("the statement has {expected} parameters but {given} were given"),
        ),
        E::InvalidParameterName(name) => ApiError::bad_request(
            "invalid_params",
            format!("the statement has no parameter named {name:?}"),
        ),
        E::SqlInputError { msg, .. } if names_reserved_table(&msg) => reserved_table_error(),
        E::SqlInputError {
            msg, sql, offset, ..
        } => ApiError::bad_request(
            "sql_error",
            format!("{msg} (at offset {offset} of {:?})", truncate(&sql, 200)),
        ),
        E::InvalidColumnType(..) | E::InvalidColumnIndex(_) | E::InvalidColumnName(_) => {
            ApiError::bad_request("sql_error", e.to_string())
        }
        other => ApiError::internal(format!("database error: {other}")),
    }
}

/// SQLite reports a missing reserved table before the authorizer sees the statement.
fn names_reserved_table(msg: &str) -> bool {
    msg.contains("no such table: _colony_") || msg.contains("no such table: main._colony_")
}

fn reserved_table_error() -> ApiError {
    ApiError::bad_request(
        "not_allowed",
        "tables named _colony_* are reserved for Colony (key/value storage lives there)",
    )
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Access to the database inside one transaction.
pub struct Tx<'a> {
    db: &'a mut ObjectDb,
}

impl Tx<'_> {
    /// The connection for Colony's own statements (KV table, bookkeeping).
    pub fn internal(&self) -> &Connection {
        self.db.user_mode.store(false, Ordering::Relaxed);
        &self.db.conn
    }

    /// The connection for client-supplied SQL: reserved tables, transaction control, ATTACH
    /// and most PRAGMAs are refused while it is in use.
    pub fn user(&self) -> &Connection {
        self.db.user_mode.store(true, Ordering::Relaxed);
        &self.db.conn
    }

    pub fn map_error(&self, e: rusqlite::Error) -> ApiError {
        self.db.map_error(e)
    }

    pub fn db(&mut self) -> &mut ObjectDb {
        self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;
    use crate::object::sql::{self, SqlPlan, SqlRequest};
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    fn plan(sql: &str, limits: &Limits) -> SqlPlan {
        serde_json::from_value::<SqlRequest>(serde_json::json!({ "sql": sql }))
            .expect("request")
            .plan(limits)
            .expect("plan")
    }

    fn open_db(dir: &Path) -> ObjectDb {
        ObjectDb::open(
            &dir.join("o.db"),
            ObjectKey::new("ns".into(), ObjectId::from_bytes([7; 32])),
            SlotKey::new("c", 0),
            &Limits::default(),
            &PendingDirs::default(),
        )
        .expect("open")
    }

    /// A file left all zeros by a crash just after its creation opens as an empty database
    /// and takes writes; a file with other bytes in it is not emptied.
    #[test]
    fn a_database_file_of_only_zeros_opens_empty_and_other_damage_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits::default();
        let path = dir.path().join("o.db");
        std::fs::write(&path, vec![0u8; PAGE_SIZE as usize]).expect("write zeros");
        let mut db = open_db(dir.path());
        let create = plan("CREATE TABLE t(x INTEGER)", &limits);
        db.transaction(Duration::from_secs(10), |tx| {
            sql::execute(tx, &create.statements[0], None)
        })
        .expect("a write to the emptied file");
        drop(db);

        // Without the WAL (recovery discards them), which holds a good first page by now.
        crate::storage::recovery::discard_wal(&path).expect("discard the WAL");
        let mut garbage = vec![0u8; PAGE_SIZE as usize];
        garbage[4000] = 1;
        std::fs::write(&path, &garbage).expect("write garbage");
        let opened = ObjectDb::open(
            &path,
            ObjectKey::new("ns".into(), ObjectId::from_bytes([7; 32])),
            SlotKey::new("c", 0),
            &limits,
            &PendingDirs::default(),
        );
        assert!(opened.is_err(), "a damaged file is reported, not emptied");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            garbage,
            "the damaged file is untouched"
        );
    }

    /// A new file's directory, and each directory made for it, await a sync before its first
    /// checkpoint; reopening a file that holds data adds none.
    #[test]
    fn a_new_database_file_notes_the_directories_it_changed_and_a_reopen_none() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join("a").join("b").join("o.db");
        let limits = Limits::default();
        let key = ObjectKey::new("ns".into(), ObjectId::from_bytes([7; 32]));
        let pending = PendingDirs::default();
        let mut db = ObjectDb::open(&path, key.clone(), SlotKey::new("c", 0), &limits, &pending)
            .expect("open a new file");
        assert_eq!(
            pending.len(),
            3,
            "b (the file's), a (made for b), the root (made for a)"
        );
        let create = plan("CREATE TABLE t(x INTEGER)", &limits);
        db.transaction(Duration::from_secs(10), |tx| {
            sql::execute(tx, &create.statements[0], None)
        })
        .expect("write");
        db.checkpoint(WalReuse::Release).expect("checkpoint");
        drop(db);
        pending.sync().expect("sync");

        ObjectDb::open(&path, key, SlotKey::new("c", 0), &limits, &pending).expect("reopen");
        assert!(
            pending.is_empty(),
            "a file with data has a durable name already"
        );
    }

    /// A checkpoint of a writing object keeps the `-wal` file's blocks and the next commits
    /// overwrite them from the start, captured correctly (their pages, applied to the
    /// checkpointed file as a follower does, give the new contents); a releasing checkpoint
    /// truncates the file.
    #[test]
    fn a_kept_wal_is_overwritten_from_its_start_and_a_released_one_is_emptied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits::default();
        let long = Duration::from_secs(10);
        let mut db = open_db(dir.path());
        let wal = wal_path_of(db.path());
        let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let write = |db: &mut ObjectDb, sql: &str| {
            let p = plan(sql, &limits);
            db.transaction(long, |tx| sql::execute(tx, &p.statements[0], None))
                .expect(sql)
                .pages
        };
        write(&mut db, "CREATE TABLE t(v TEXT)");
        write(&mut db, "INSERT INTO t VALUES (printf('%.*c', 20000, 'a'))");
        write(&mut db, "UPDATE t SET v = printf('%.*c', 20000, 'b')");
        let grown = wal_len();
        assert!(db.checkpoint(WalReuse::Keep).expect("checkpoint").is_some());
        assert_eq!(wal_len(), grown, "a kept WAL keeps its length");
        let base = db.read_file().expect("read the checkpointed file");

        let captured = write(&mut db, "UPDATE t SET v = printf('%.*c', 20000, 'c')")
            .expect("the update wrote pages");
        assert_eq!(
            wal_len(),
            grown,
            "the commit overwrote the WAL from its start"
        );
        let copy = dir.path().join("copy.db");
        std::fs::write(&copy, &base).expect("write the copy");
        let file = OpenOptions::new()
            .write(true)
            .open(&copy)
            .expect("open the copy");
        let set = captured.entry.page_set().expect("a page set");
        for (pgno, page) in set.pages() {
            file.write_all_at(page, u64::from(pgno - 1) * u64::from(PAGE_SIZE))
                .expect("apply a page");
        }
        file.set_len(u64::from(captured.db_pages) * u64::from(PAGE_SIZE))
            .expect("size the copy");
        let v: String = Connection::open(&copy)
            .and_then(|c| c.query_row("SELECT v FROM t", [], |r| r.get(0)))
            .expect("read the copy");
        assert_eq!(v, "c".repeat(20000));

        assert!(
            db.checkpoint(WalReuse::Release)
                .expect("checkpoint")
                .is_some()
        );
        assert_eq!(wal_len(), 0, "a released WAL is emptied");
    }

    /// Defence in depth: a transaction somehow left open is rolled back (its writes gone)
    /// before the next request, which then runs normally instead of failing forever.
    #[test]
    fn a_transaction_left_open_is_rolled_back_before_the_next_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits::default();
        let mut db = open_db(dir.path());
        let long = Duration::from_secs(10);
        let create = plan("CREATE TABLE t(x INTEGER)", &limits);
        db.transaction(long, |tx| sql::execute(tx, &create.statements[0], None))
            .expect("create");
        db.conn
            .execute_batch("BEGIN; INSERT INTO t VALUES (1);")
            .expect("leave a transaction open");
        assert!(!db.conn.is_autocommit());
        let count = plan("SELECT count(*) FROM t", &limits);
        let result = db
            .transaction(long, |tx| sql::execute(tx, &count.statements[0], None))
            .expect("the next request runs");
        assert_eq!(result.value.rows, vec![vec![serde_json::json!(0)]]);
        assert!(db.conn.is_autocommit());
    }

    /// Time limits of every length, down to a few nanoseconds, interrupt the request at every
    /// point of its transaction. An interrupted request must leave nothing behind: no open
    /// transaction (which failed every later request of the object with "cannot start a
    /// transaction within a transaction" once a limit interrupted a cached BEGIN), and no
    /// effect (an interrupted COMMIT may have committed already).
    #[test]
    fn a_request_stopped_by_its_time_limit_leaves_no_transaction_and_no_effect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits::default();
        let mut db = open_db(dir.path());
        let long = Duration::from_secs(10);
        let create = plan(
            "CREATE TABLE counter(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
            &limits,
        );
        db.transaction(long, |tx| sql::execute(tx, &create.statements[0], None))
            .expect("create");
        let increment = plan(
            "INSERT INTO counter(id, n) VALUES (1, 1) ON CONFLICT(id) DO UPDATE SET n = n + 1 RETURNING n",
            &limits,
        );
        let (mut applied, mut interrupted) = (0i64, 0u64);
        for i in 0..20_000u64 {
            let limit = Duration::from_nanos(i % 20_000);
            match db.transaction(limit, |tx| sql::execute(tx, &increment.statements[0], None)) {
                Ok(_) => applied += 1,
                Err(e) if e.status == 408 => interrupted += 1,
                Err(e) => panic!("increment {i} with a limit of {limit:?}: {e:?}"),
            }
            assert!(db.conn.is_autocommit(), "a transaction was left open");
        }
        assert!(interrupted > 0, "no request was interrupted");
        let read = plan("SELECT n FROM counter WHERE id = 1", &limits);
        let result = db
            .transaction(long, |tx| sql::execute(tx, &read.statements[0], None))
            .expect("read");
        assert_eq!(result.value.rows, vec![vec![serde_json::json!(applied)]]);
    }
}
