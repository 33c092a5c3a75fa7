//! Durable objects: each an actor that owns one SQLite database and runs its requests one at a
//! time, in arrival order.

mod actor;
pub mod authorizer;
pub mod db;
#[cfg(test)]
mod failed_sync_tests;
pub mod gate;
pub mod kv;
mod registry;
pub mod sql;
mod sqlite_log;
mod sqlite_memory;
pub mod values;

pub use crate::storage::layout::db_path;
/// For the cluster's tests: an object's submission through its gate, without an actor.
#[cfg(test)]
pub(crate) use actor::submit_behind_gate;
pub use registry::{DESCRIPTORS_PER_OPEN_OBJECT, ObjectEnv, Objects, open_cap};

use crate::error::ApiError;

/// What a client asks of an object, validated already.
pub enum Request {
    Sql(sql::SqlPlan),
    KvGet(String),
    KvPut {
        key: String,
        encoded: String,
    },
    KvDelete(String),
    KvList(kv::ListOptions),
    KvBatch {
        batch: kv::KvBatch,
        puts: Vec<(String, String)>,
    },
    Info,
    DeleteAll,
}

/// A response body (JSON) or an error.
pub type Reply = Result<Vec<u8>, ApiError>;
