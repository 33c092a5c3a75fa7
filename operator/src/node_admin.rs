//! How the operator reaches the nodes' admin API (`/v1/admin/slots/...`, see
//! docs/control-plane.md): the node crate's own client (`colony_node::control::admin_client`,
//! the one the local control plane uses), carrying the admin token of the nodes' Kubernetes
//! namespace.

use colony_node::cluster::peer_client::PeerClient;
pub use colony_node::control::admin_client::{
    HttpNodeAdmin, NodeAdmin, SlotStatus, Unfenced, unfenced_answer,
};
use std::sync::Arc;
use std::time::Duration;

/// Makes the admin client for the nodes of one Kubernetes namespace, given its admin token.
pub trait AdminConnector: Send + Sync {
    fn connect(&self, token: &str) -> Arc<dyn NodeAdmin>;
}

/// Plain HTTP to the nodes' advertised addresses, with `Authorization: Bearer <token>`.
pub struct HttpAdminConnector {
    pub timeout: Duration,
}

impl AdminConnector for HttpAdminConnector {
    fn connect(&self, token: &str) -> Arc<dyn NodeAdmin> {
        Arc::new(HttpNodeAdmin::new(
            PeerClient::with_token(None, Some(token)),
            self.timeout,
        ))
    }
}
