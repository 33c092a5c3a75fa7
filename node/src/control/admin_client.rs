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

/// A failed hand-off the owner answered itself, saying it did not fence itself for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfenced {
    /// 503 `handoff_timeout`: the target did not catch up in time; the owner serves on, and the
    /// hand-off may simply be retried.
    TimedOut,
    /// 409 `handoff_interrupted`: the slot stopped draining (a new placement) before the fence.
    Interrupted,
}

/// Which of the owner's own "not fenced" answers an admin error is, if any. Any other failure
/// may have fenced the owner, its answer lost on the way, and that epoch must be published.
///
/// Matched on the status and the start of the node's error body as the client reports them
/// (`{url}: 503 Service Unavailable {"error":{"code":"handoff_timeout",...`), not on the word
/// anywhere: a false match would skip publishing an epoch the owner may be fenced at. The body
/// is cut at 300 characters, but its code comes first.
pub fn unfenced_answer(error: &str) -> Option<Unfenced> {
    if error.contains(r#": 503 Service Unavailable {"error":{"code":"handoff_timeout","#) {
        Some(Unfenced::TimedOut)
    } else if error.contains(r#": 409 Conflict {"error":{"code":"handoff_interrupted","#) {
        Some(Unfenced::Interrupted)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{Unfenced, unfenced_answer};

    /// Only the node's own 503 `handoff_timeout` and 409 `handoff_interrupted` answers count: the
    /// words elsewhere (a colo so named, another error's message, another status) must not, or a
    /// fence the owner may hold goes unpublished.
    #[test]
    fn only_the_owners_own_answers_count_as_unfenced() {
        let url = "http://10.0.0.1:8787/v1/admin/slots/ams/3/handoff";
        let answer = |status: &str, code: &str, message: &str| {
            format!(r#"{url}: {status} {{"error":{{"code":"{code}","message":"{message}"}}}}"#)
        };
        assert_eq!(
            unfenced_answer(&answer(
                "503 Service Unavailable",
                "handoff_timeout",
                "ams-0 did not catch up"
            )),
            Some(Unfenced::TimedOut)
        );
        assert_eq!(
            unfenced_answer(&answer(
                "409 Conflict",
                "handoff_interrupted",
                "slot ams#3 stopped draining"
            )),
            Some(Unfenced::Interrupted)
        );
        for not_one in [
            answer("500 Internal Server Error", "internal", "handoff_timeout"),
            answer(
                "503 Service Unavailable",
                "handoff_settling",
                "after handoff_timeout",
            ),
            answer("409 Conflict", "handoff_timeout", "not a real answer"),
            answer(
                "503 Service Unavailable",
                "handoff_interrupted",
                "not one either",
            ),
            answer("409 Conflict", "handoff_in_progress", "handoff_interrupted"),
            format!("{url}: no answer within 18s"),
            "http://handoff_timeout:1/v1/admin/slots/x/0/handoff: connection refused".to_string(),
        ] {
            assert_eq!(unfenced_answer(&not_one), None, "{not_one}");
        }
    }
}
