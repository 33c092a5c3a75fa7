//! How a node talks to its control plane: renewing its heartbeat and learning the placement map.
//!
//! Behind a small trait, so the local coordinator (`colony-node control`, used by `dev` and the
//! tests) and Kubernetes (Leases and a ConfigMap) plug in the same way.

use super::peer_client::PeerClient;
use crate::placement::{NodeInfo, PlacementMap};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub node: NodeInfo,
    pub region: String,
    pub lease_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReply {
    /// The newest placement version the control plane has published.
    pub placement_version: u64,
}

pub trait ControlPlane: Send + Sync + 'static {
    /// Renews the node's lease.
    fn heartbeat<'a>(&'a self, hb: &'a Heartbeat) -> BoxFuture<'a, Result<HeartbeatReply, String>>;

    /// The placement map once its version exceeds `after` (waiting a while for one), or `None`
    /// if nothing newer appeared meanwhile.
    fn placement_after(&self, after: u64) -> BoxFuture<'_, Result<Option<PlacementMap>, String>>;
}

/// The local coordinator's HTTP API.
pub struct HttpControlPlane {
    base: String,
    client: PeerClient,
}

impl HttpControlPlane {
    pub fn new(base: &str, client: PeerClient) -> Self {
        HttpControlPlane {
            base: base.trim_end_matches('/').to_string(),
            client,
        }
    }
}

/// How long a placement long-poll waits on the coordinator.
pub const PLACEMENT_WAIT: Duration = Duration::from_secs(10);

impl ControlPlane for HttpControlPlane {
    fn heartbeat<'a>(&'a self, hb: &'a Heartbeat) -> BoxFuture<'a, Result<HeartbeatReply, String>> {
        Box::pin(async move {
            let url = format!("{}/v1/control/heartbeat", self.base);
            let timeout = Duration::from_millis((hb.lease_ms / 3).max(200));
            self.client.post_json(&url, hb, timeout).await
        })
    }

    fn placement_after(&self, after: u64) -> BoxFuture<'_, Result<Option<PlacementMap>, String>> {
        Box::pin(async move {
            let url = format!("{}/v1/control/placement?after={after}", self.base);
            let resp = self
                .client
                .send(
                    hyper::Method::GET,
                    &url,
                    &[],
                    bytes::Bytes::new(),
                    PLACEMENT_WAIT + Duration::from_secs(5),
                )
                .await?;
            match resp.status.as_u16() {
                200 => serde_json::from_slice(&resp.body)
                    .map(Some)
                    .map_err(|e| format!("{url}: bad placement map: {e}")),
                204 => Ok(None),
                s => Err(format!(
                    "{url}: {s} {}",
                    String::from_utf8_lossy(&resp.body)
                )),
            }
        })
    }
}
