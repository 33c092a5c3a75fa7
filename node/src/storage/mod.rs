//! Durability: the node log, the record format it shares with replication and archiving, WAL
//! capture, and recovery.

pub mod block_buf;
pub mod dirs;
pub mod layout;
pub mod log;
pub mod record;
pub mod recovery;
pub mod segments;
pub mod sync_failures;
pub mod wal;
