//! Colony's data plane: durable objects, each with its own SQLite database, served over HTTP.

pub mod config;
pub mod id;
pub mod lsn;
pub mod placement;
