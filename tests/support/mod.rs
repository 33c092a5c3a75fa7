//! Support code shared by the root package's integration tests. Each test target includes this
//! module and uses only part of it.
#![allow(dead_code)]

pub mod cluster;
/// The node package's power-cut disk, shared rather than copied.
#[path = "../../node/tests/lazy_disk/mod.rs"]
pub mod lazy_disk;
pub mod linearizability;
pub mod netproxy;
