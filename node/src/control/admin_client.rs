//! The control plane's client for the node admin API (`/v1/admin/slots/...`, see
//! docs/control-plane.md), behind a trait so control logic can be tested without nodes.

use crate::cluster::peer_client::PeerClient;
use crate::lsn::Lsn;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Durable {
    pub durable: Lsn,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotStatus {
    pub role: String,
    pub epoch: u64,
    pub durable: Lsn,
    /// The last entry handed to the node's log (owner: the newest entry of the slot).
    #[serde(default)]
    pub appended: Lsn,
    #[serde(default)]
    pub placement_version: u64,
}

pub trait NodeAdmin: Send + Sync {
    /// Fences the slot at `epoch` on the node at `address`; its last durable position.
    fn fence<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
        epoch: u64,
    ) -> BoxFuture<'a, Result<Lsn, String>>;
    /// Asks the owner at `address` to hand the slot to `to` at `epoch`.
    fn handoff<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
        to: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<Lsn, String>>;
    fn status<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
    ) -> BoxFuture<'a, Result<SlotStatus, String>>;
}

pub struct HttpNodeAdmin {
    client: PeerClient,
    timeout: Duration,
}

impl HttpNodeAdmin {
    pub fn new(client: PeerClient, timeout: Duration) -> Self {
        HttpNodeAdmin { client, timeout }
    }
}

impl NodeAdmin for HttpNodeAdmin {
    fn fence<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
        epoch: u64,
    ) -> BoxFuture<'a, Result<Lsn, String>> {
        Box::pin(async move {
            let url = format!("http://{address}/v1/admin/slots/{colo}/{slot}/fence");
            let d: Durable = self
                .client
                .post_json(&url, &json!({"epoch": epoch}), self.timeout)
                .await?;
            Ok(d.durable)
        })
    }

    fn handoff<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
        to: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<Lsn, String>> {
        Box::pin(async move {
            let url = format!("http://{address}/v1/admin/slots/{colo}/{slot}/handoff");
            // The owner waits up to 8 s for the target to catch up.
            let d: Durable = self
                .client
                .post_json(
                    &url,
                    &json!({"to": to, "epoch": epoch}),
                    self.timeout + Duration::from_secs(10),
                )
                .await?;
            Ok(d.durable)
        })
    }

    fn status<'a>(
        &'a self,
        address: &'a str,
        colo: &'a str,
        slot: u32,
    ) -> BoxFuture<'a, Result<SlotStatus, String>> {
        Box::pin(async move {
            let url = format!("http://{address}/v1/admin/slots/{colo}/{slot}");
            self.client.get_json(&url, self.timeout).await
        })
    }
}

/// Whether an admin error is the node's `handoff_timeout` answer (503: the target did not catch
/// up in time; the owner never fenced itself, serves on, and the hand-off may simply be retried).
/// Any other failure may have fenced the owner, its answer lost on the way.
///
/// Matched on the status and the start of the node's error body as the client reports them
/// (`{url}: 503 Service Unavailable {"error":{"code":"handoff_timeout",...`), not on the word
/// anywhere: a false match would skip publishing an epoch the owner may be fenced at. The body
/// is cut at 300 characters, but its code comes first.
pub fn is_handoff_timeout(error: &str) -> bool {
    error.contains(HANDOFF_TIMEOUT_ANSWER)
}

const HANDOFF_TIMEOUT_ANSWER: &str =
    r#": 503 Service Unavailable {"error":{"code":"handoff_timeout","#;

#[cfg(test)]
mod tests {
    use super::is_handoff_timeout;

    /// Only the node's own 503 `handoff_timeout` answer counts: the word elsewhere (a colo so
    /// named, another error's message) must not, or a fence the owner may hold goes unpublished.
    #[test]
    fn only_the_owners_503_handoff_timeout_answer_counts_as_one() {
        let url = "http://10.0.0.1:8787/v1/admin/slots/ams/3/handoff";
        let answer = |status: &str, code: &str, message: &str| {
            format!(r#"{url}: {status} {{"error":{{"code":"{code}","message":"{message}"}}}}"#)
        };
        assert!(is_handoff_timeout(&answer(
            "503 Service Unavailable",
            "handoff_timeout",
            "ams-0 did not catch up"
        )));
        for not_one in [
            answer("500 Internal Server Error", "internal", "handoff_timeout"),
            answer(
                "503 Service Unavailable",
                "handoff_settling",
                "after handoff_timeout",
            ),
            answer("409 Conflict", "handoff_timeout", "not a real answer"),
            format!("{url}: no answer within 18s"),
            "http://handoff_timeout:1/v1/admin/slots/x/0/handoff: connection refused".to_string(),
        ] {
            assert!(!is_handoff_timeout(&not_one), "{not_one}");
        }
    }
}
