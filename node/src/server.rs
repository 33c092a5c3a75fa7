//! Starting a node: recover storage, open the log, serve HTTP.

use crate::cluster::applier::Applier;
use crate::cluster::control::{ControlPlane, HttpControlPlane};
use crate::cluster::journal::{Line, SlotJournal};
use crate::cluster::{Cluster, ClusterSetup, SlotHost};
use crate::config::NodeConfig;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::object::{ObjectEnv, Objects};
use crate::storage::layout;
use crate::storage::log::{self, LogRunner};
use crate::storage::record::ObjectKey;
use crate::storage::recovery::{self, RecoveryReport};
use crate::{http, keys};
use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
    #[error("storage at {path}: {source}")]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data directory {path} is in use by another colony-node{holder}: stop it, or give this node its own data directory (dataDir, or --data-dir for dev)"
    )]
    DataDirInUse { path: PathBuf, holder: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn storage_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Storage {
        path: path.to_path_buf(),
        source,
    }
}

/// A running node's state, shared by its HTTP handlers.
pub struct Node {
    pub config: NodeConfig,
    pub namespaces: HashMap<String, Arc<Namespace>>,
    pub objects: Arc<Objects>,
    pub cluster: Arc<Cluster>,
    pub metrics: Arc<Metrics>,
    pub recovery: RecoveryReport,
    _log: LogRunner,
    /// Held while the node runs (see `lock_data_dir`).
    _data_lock: fs::File,
}

impl Node {
    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.get(name)
    }
}

/// The file in the data directory that a running node holds locked.
pub const DATA_LOCK_FILE: &str = "colony.lock";

/// Locks the data directory for this process, and writes its pid into the lock file for the
/// error another node would report. Two nodes on one directory would append to one node log and
/// write the same databases, which are opened without SQLite's file locks (`ObjectDb::open`).
fn lock_data_dir(data: &Path) -> Result<fs::File, StartError> {
    use std::io::{Read, Seek, Write};
    let path = data.join(DATA_LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(storage_err(&path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StartError::DataDirInUse {
                path: data.to_path_buf(),
                holder: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(storage_err(&path)(e)),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(storage_err(&path))?;
    Ok(file)
}

/// Lets the node hold one file descriptor per open database file and more.
fn raise_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Descriptors kept for everything else: sockets, log segments, directories being synced.
const RESERVED_DESCRIPTORS: u64 = 1024;
const DESCRIPTORS_PER_OPEN_OBJECT: u64 = crate::object::DESCRIPTORS_PER_OPEN_OBJECT as u64;

/// The most objects the node may keep open under a file-descriptor limit: even with
/// `object::open_cap` of that many open (where new opens start to wait), their descriptors and
/// the reserve fit the limit.
pub fn max_open_objects_for(fd_limit: u64) -> usize {
    let fit = fd_limit.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_OPEN_OBJECT;
    // open_cap(n) = n + n/8 + 1 <= fit holds for n = (fit - 1) * 8 / 9.
    (fit.saturating_sub(1) * 8 / 9).max(16) as usize
}

fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

/// Walks `objects/<ns>/<shard>/<id>.db`: discards every `-wal`/`-shm`/`-journal` (the node log
/// supersedes them) and every `.sync` a snapshot install left unfinished, removes empty database
/// files, and indexes the rest. Returns total database bytes.
fn scan_objects(
    objects_dir: &Path,
    namespaces: &HashMap<String, Arc<Namespace>>,
) -> std::io::Result<u64> {
    let mut bytes = 0u64;
    let Ok(ns_dirs) = fs::read_dir(objects_dir) else {
        return Ok(0);
    };
    for ns_dir in ns_dirs {
        let ns_dir = ns_dir?;
        let ns_name = ns_dir.file_name().to_string_lossy().to_string();
        let ns = namespaces.get(&ns_name);
        for shard in fs::read_dir(ns_dir.path())? {
            for entry in fs::read_dir(shard?.path())? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                if name.ends_with("-wal")
                    || name.ends_with("-shm")
                    || name.ends_with("-journal")
                    || name.ends_with(".sync")
                {
                    fs::remove_file(entry.path())?;
                    continue;
                }
                let Some(hex) = name.strip_suffix(".db") else {
                    continue;
                };
                let len = entry.metadata()?.len();
                if len == 0 || (len <= 4096 && schema_is_empty(&entry.path())?) {
                    fs::remove_file(entry.path())?;
                    continue;
                }
                bytes += len;
                if let (Some(ns), Ok(id)) = (ns, hex.parse()) {
                    ns.mark_has_data(id);
                }
            }
        }
    }
    Ok(bytes)
}

/// Whether a one-page database file has an empty schema: page 1 holds the `sqlite_schema` root
/// after the 100-byte file header, and bytes 103..105 of the file count its cells.
fn schema_is_empty(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut cells = [0u8; 2];
    match fs::File::open(path)?.read_exact_at(&mut cells, 103) {
        Ok(()) => Ok(u16::from_be_bytes(cells) == 0),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(true),
        Err(e) => Err(e),
    }
}

/// Recovers storage and starts serving; returns once the node listens.
pub async fn start(config: NodeConfig) -> Result<(Arc<Node>, tokio::net::TcpListener), StartError> {
    config.validate()?;
    crate::object::db::configure_sqlite();
    raise_file_limit();
    let data = config.data_dir.clone();
    let log_dir = data.join("log");
    let objects_dir = data.join("objects");
    crate::storage::dirs::create_dir_all_durable(&objects_dir)
        .map_err(storage_err(&objects_dir))?;
    let data_lock = lock_data_dir(&data)?;

    let mut namespaces = HashMap::new();
    for ns in &config.namespaces {
        let keys = match &config.keys_dir {
            Some(dir) => keys::load(dir, &ns.name)?,
            None => keys::load_or_generate(&data.join("keys"), &ns.name)?,
        };
        namespaces.insert(ns.name.clone(), Arc::new(Namespace::new(ns.clone(), keys)));
    }

    // The slot journal first: recovery must honour snapshot floors, and records the positions
    // it finds there before it retires the old log.
    let (journal, journal_state) =
        SlotJournal::open(&data.join("slots.journal")).map_err(storage_err(&data))?;
    let floors: HashMap<ObjectKey, Lsn> = journal_state
        .floors
        .values()
        .flat_map(|f| f.iter().map(|(k, v)| (k.clone(), *v)))
        .collect();
    let (mut report, db_bytes) = {
        let (logs, objs) = (log_dir.clone(), objects_dir.clone());
        let namespaces = namespaces.clone();
        let journal = journal.clone();
        // Without a control plane the node is standalone (see `Cluster::new`) and resends to
        // nobody: recovery keeps no entries for its slots' rings.
        let clustered = config.cluster.is_some();
        tokio::task::spawn_blocking(move || -> Result<(RecoveryReport, u64), StartError> {
            // Before recovery opens any file: it looks for each where this layout puts it.
            let placed = layout::place_object_files(&objs).map_err(storage_err(&objs))?;
            if placed.moved > 0 {
                tracing::info!(
                    files = placed.moved,
                    "moved object databases into the shard directories of their IDs"
                );
            }
            let report = recovery::recover(
                &logs,
                |key: &ObjectKey| crate::object::db_path(&objs, key),
                &floors,
                clustered,
                |report| {
                    let lines: Vec<Line> = report
                        .slots
                        .iter()
                        .map(|(k, p)| Line::position(k, *p))
                        .collect();
                    journal.record(&lines)
                },
            )
            .map_err(storage_err(&logs))?;
            let bytes = scan_objects(&objs, &namespaces).map_err(storage_err(&objs))?;
            Ok((report, bytes))
        })
        .await
        .map_err(|e| StartError::Storage {
            path: log_dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })??
    };
    if report.records > 0 {
        tracing::info!(
            records = report.records,
            page_sets = report.page_sets_applied,
            objects = report.objects_touched,
            "recovered object databases from the node log"
        );
    }

    let metrics = Metrics::new();
    metrics.objects.database_bytes.set(db_bytes as i64);
    let runner = log::start(
        &log_dir,
        config.storage.log_segment_bytes.0,
        report.next_lsn,
        metrics.log.clone(),
    )
    .map_err(storage_err(&log_dir))?;
    let mut storage = config.storage.clone();
    let fd_budget = max_open_objects_for(open_file_limit());
    if storage.max_open_objects > fd_budget {
        tracing::info!(
            configured = storage.max_open_objects,
            allowed = fd_budget,
            "limiting open objects to what the file-descriptor limit allows"
        );
        storage.max_open_objects = fd_budget;
    }
    let namespaces = Arc::new(namespaces);
    let applier = Applier::start(
        objects_dir.clone(),
        namespaces.clone(),
        runner.log(),
        log_dir.clone(),
        metrics.objects.sync_failed.clone(),
    )
    .map_err(storage_err(&objects_dir))?;
    let admin_token = match &config.admin_token_file {
        Some(path) => {
            let t = fs::read_to_string(path)
                .map_err(storage_err(path))?
                .trim()
                .to_string();
            if t.len() < 16 {
                return Err(StartError::Config(crate::config::ConfigError::Invalid(
                    format!(
                        "the admin token in {} is shorter than 16 characters",
                        path.display()
                    ),
                )));
            }
            Some(t)
        }
        None => None,
    };
    let cluster = Cluster::new(ClusterSetup {
        admin_token,
        me: config.node.name.clone(),
        colo: config.node.colo.clone(),
        region: config.node.region.clone(),
        advertise: config.advertised(),
        source_address: config.cluster.as_ref().and_then(|c| c.source_address),
        lease_duration: config.cluster.as_ref().map(|c| c.lease_duration.0),
        slot_count: config.slot_count,
        log: runner.log(),
        journal,
        journal_state,
        recovered_positions: report.slots.clone(),
        recovered_recent: std::mem::take(&mut report.recent),
        applier,
        metrics: metrics.clone(),
        namespaces: namespaces.clone(),
        data_dir: data.clone(),
    });
    let env = Arc::new(ObjectEnv::new(
        cluster.clone(),
        runner.log(),
        log_dir,
        objects_dir,
        storage,
        metrics.clone(),
        tokio::runtime::Handle::current(),
    ));
    let objects = Objects::new(env);
    let host: Arc<dyn SlotHost> = objects.clone();
    cluster.set_host(Arc::downgrade(&host));
    cluster
        .links
        .bind(&cluster, tokio::runtime::Handle::current());
    objects.spawn_housekeeping((*namespaces).clone(), Duration::from_millis(250));
    let control: Option<Arc<dyn ControlPlane>> = match config.cluster.as_ref() {
        None => None,
        Some(c) if c.control == crate::config::KUBERNETES_CONTROL => Some(
            crate::cluster::kubernetes::connect(&config.node.region, c.lease_duration.0)
                .await
                .map_err(|e| {
                    StartError::Config(crate::config::ConfigError::Invalid(format!(
                        "cannot reach Kubernetes: {e}"
                    )))
                })?,
        ),
        Some(c) => Some(
            Arc::new(HttpControlPlane::new(&c.control, cluster.peers.clone()))
                as Arc<dyn ControlPlane>,
        ),
    };
    cluster.spawn_background(control);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let node = Arc::new(Node {
        config,
        namespaces: (*namespaces).clone(),
        objects,
        cluster,
        metrics,
        recovery: report,
        _log: runner,
        _data_lock: data_lock,
    });
    Ok((node, listener))
}

/// Serves the HTTP API until `shutdown` resolves.
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = http::router(node);
    axum::serve(without_nagle(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Accepted connections send small writes at once. With Nagle's algorithm on, a follower's acks
/// (and any reply written in more than one piece) can wait for the peer's delayed ACK, about
/// 40 ms on Linux, which showed as a 50 ms p99 on replicated writes.
pub fn without_nagle(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::open_cap;

    #[test]
    fn open_objects_at_their_cap_fit_the_descriptor_limit_with_the_reserve() {
        for limit in [2_048u64, 4_096, 20_000, 65_536, 1_048_576] {
            let n = max_open_objects_for(limit);
            let used = |n: usize| open_cap(n) as u64 * DESCRIPTORS_PER_OPEN_OBJECT;
            assert!(
                used(n) + RESERVED_DESCRIPTORS <= limit,
                "limit {limit}: {n} objects"
            );
            // And no more could: the budget is not needlessly small.
            assert!(
                used(n + 2) + RESERVED_DESCRIPTORS > limit,
                "limit {limit}: {n} objects"
            );
        }
        // 20,000 (this machine's limit) still allows the default 4,096.
        assert!(max_open_objects_for(20_000) >= 4_096);
        // A limit below the reserve still lets a few objects open.
        assert_eq!(max_open_objects_for(512), 16);
    }
}
