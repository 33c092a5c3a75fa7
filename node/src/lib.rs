//! Colony's data plane: durable objects, each with its own SQLite database, served over HTTP.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod error;
pub mod http;
pub mod huge_pages;
pub mod id;
pub mod keys;
pub mod lsn;
pub mod metrics;
pub mod namespace;
pub mod object;
pub mod placement;
pub mod server;
pub mod storage;
