//! Colony's Kubernetes operator: the CRD types, pure builders of the Kubernetes objects a `Colo`
//! needs, the placement and failover planning around `colony_node::placement`, and thin adapters
//! (reconcilers, Lease watching, the node admin client, leader election) that do the I/O.

pub mod builders;
pub mod conditions;
pub mod context;
pub mod crd;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod node_admin;
pub mod pass;
pub mod reconcile;
pub mod region;
pub mod run;
pub mod server;
pub mod serving;
pub mod settings;
