//! Support code shared by the root package's integration tests. Each test target includes this
//! module and uses only part of it.
#![allow(dead_code)]

pub mod cluster;
pub mod linearizability;
pub mod netproxy;
