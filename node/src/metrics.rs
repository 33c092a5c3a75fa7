//! Prometheus metrics of a node, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route template, e.g. `/v1/ns/{ns}/objects/{id}/sql`.
    pub route: String,
    pub method: String,
    pub status: u16,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: Family<HttpLabels, Counter>,
    pub duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
}

#[derive(Clone)]
pub struct LogMetrics {
    pub fsyncs: Counter,
    pub fsync_seconds: Histogram,
    pub bytes: Counter,
    pub records_per_fsync: Histogram,
    pub segments: Gauge,
    /// 1 when the log writes with direct I/O, 0 through the page cache.
    pub direct_io: Gauge,
}

#[derive(Clone)]
pub struct ObjectMetrics {
    /// Objects with a request queued or running.
    pub active: Gauge,
    /// Objects whose database is open.
    pub resident: Gauge,
    /// Bytes of all object databases on this node.
    pub database_bytes: Gauge,
    /// Heap memory SQLite holds for open databases (page caches, schemas, statements).
    pub sqlite_memory: Gauge,
    pub opens: Counter,
    /// Opens that first waited for other objects to close (the node held its cap of open
    /// databases).
    pub open_waits: Counter,
    pub evictions: Counter,
    pub checkpoints: Counter,
    pub resets: Counter,
    /// Objects whose database file failed to sync and awaits a rebuild from the node log.
    pub sync_failed: Gauge,
    /// Requests run on the async thread that received them (object idle, within the budget).
    pub inline: Counter,
    /// Requests that outran the inline budget, were rolled back and ran again on a blocking
    /// thread.
    pub inline_reruns: Counter,
}

#[derive(Clone, Default)]
pub struct ReplicationMetrics {
    /// Entries a follower could not accept in order (missing or diverged entries).
    pub gaps: Counter,
    /// Replication frames whose checksum failed (corrupted in flight).
    pub corrupt_frames: Counter,
    /// Snapshot syncs this node (as owner) asked followers to run.
    pub syncs_requested: Counter,
    /// Times this node (as owner) resent its recent entries to a follower that was behind.
    pub resends: Counter,
    /// Resends not made because the same one had just been sent (see `RESEND_INTERVAL`).
    pub resends_skipped: Counter,
    /// Snapshot syncs this node (as follower) completed.
    pub syncs_completed: Counter,
    /// Entries the local log could not write (disk full or failing).
    pub log_failures: Counter,
    /// Requests forwarded to the owner of their object.
    pub forwarded: Counter,
    /// Bytes of entries all slots keep in memory to resend to followers a little behind.
    pub ring_bytes: Gauge,
}

/// All metrics of a node, registered in one registry.
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub log: LogMetrics,
    pub objects: ObjectMetrics,
    pub replication: ReplicationMetrics,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("colony");
        let http = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route, method and status",
            http.duration.clone(),
        );
        let log = LogMetrics {
            fsyncs: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_02, 2.0, 16)),
            bytes: Counter::default(),
            records_per_fsync: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            segments: Gauge::default(),
            direct_io: Gauge::default(),
        };
        registry.register(
            "log_fsyncs",
            "fdatasync calls on the node log",
            log.fsyncs.clone(),
        );
        registry.register(
            "log_fsync_duration_seconds",
            "Time spent in fdatasync of the node log",
            log.fsync_seconds.clone(),
        );
        registry.register(
            "log_written_bytes",
            "Bytes written to the node log",
            log.bytes.clone(),
        );
        registry.register(
            "log_records_per_fsync",
            "Records made durable by one fdatasync (group commit)",
            log.records_per_fsync.clone(),
        );
        registry.register(
            "log_segments",
            "Live node log segments",
            log.segments.clone(),
        );
        registry.register(
            "log_direct_io",
            "1 when the node log writes with direct I/O (its filesystem takes O_DIRECT), else 0",
            log.direct_io.clone(),
        );
        let objects = ObjectMetrics {
            active: Gauge::default(),
            resident: Gauge::default(),
            database_bytes: Gauge::default(),
            sqlite_memory: Gauge::default(),
            opens: Counter::default(),
            open_waits: Counter::default(),
            evictions: Counter::default(),
            checkpoints: Counter::default(),
            resets: Counter::default(),
            sync_failed: Gauge::default(),
            inline: Counter::default(),
            inline_reruns: Counter::default(),
        };
        registry.register(
            "objects_active",
            "Objects with a request queued or running",
            objects.active.clone(),
        );
        registry.register(
            "objects_sync_failed",
            "Objects whose database file failed to sync; their checkpoint markers wait until it is rebuilt from the node log",
            objects.sync_failed.clone(),
        );
        registry.register(
            "objects_resident",
            "Objects whose database is open",
            objects.resident.clone(),
        );
        registry.register(
            "database_bytes",
            "Bytes of all object databases on this node",
            objects.database_bytes.clone(),
        );
        registry.register(
            "sqlite_memory_bytes",
            "Heap memory SQLite holds for open object databases",
            objects.sqlite_memory.clone(),
        );
        registry.register(
            "object_opens",
            "Object databases opened",
            objects.opens.clone(),
        );
        registry.register(
            "object_open_waits",
            "Object databases that waited to open until others closed (the node held its cap of open databases)",
            objects.open_waits.clone(),
        );
        registry.register(
            "object_evictions",
            "Object databases closed for being idle or to stay within the memory limit",
            objects.evictions.clone(),
        );
        registry.register(
            "object_checkpoints",
            "Object WAL checkpoints",
            objects.checkpoints.clone(),
        );
        registry.register(
            "object_requests_inline",
            "Requests run on the thread that received them (their object idle), without a hand-off to a blocking thread",
            objects.inline.clone(),
        );
        registry.register(
            "object_requests_inline_reruns",
            "Requests that outran the inline time budget, were rolled back and ran again on a blocking thread",
            objects.inline_reruns.clone(),
        );
        registry.register(
            "object_resets",
            "Objects reset after a write could not be made durable",
            objects.resets.clone(),
        );
        let replication = ReplicationMetrics::default();
        registry.register(
            "replication_gaps",
            "Entries a follower could not accept in order (missing or diverged entries)",
            replication.gaps.clone(),
        );
        registry.register(
            "replication_corrupt_frames",
            "Replication frames whose checksum failed (corrupted in flight)",
            replication.corrupt_frames.clone(),
        );
        registry.register(
            "replication_syncs_requested",
            "Snapshot syncs this node asked followers to run (their position was not in its recent history)",
            replication.syncs_requested.clone(),
        );
        registry.register(
            "replication_resends",
            "Times this node resent its recent entries to a follower that reported being behind",
            replication.resends.clone(),
        );
        registry.register(
            "replication_resends_skipped",
            "Resends not made because the same one had been sent less than a second before",
            replication.resends_skipped.clone(),
        );
        registry.register(
            "replication_syncs_completed",
            "Snapshot syncs this node completed as a follower",
            replication.syncs_completed.clone(),
        );
        registry.register(
            "replication_log_failures",
            "Entries the local log could not write (disk full or failing)",
            replication.log_failures.clone(),
        );
        registry.register(
            "requests_forwarded",
            "Requests forwarded to the owner of their object",
            replication.forwarded.clone(),
        );
        registry.register(
            "replication_ring_bytes",
            "Bytes of entries kept in memory to resend to followers a little behind",
            replication.ring_bytes.clone(),
        );
        Arc::new(Metrics {
            registry,
            http,
            log,
            objects,
            replication,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
