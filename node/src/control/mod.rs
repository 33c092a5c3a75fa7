//! The local control plane (`colony-node control`, and inside `colony-node dev`): a coordinator
//! with a small HTTP API that nodes heartbeat to and watch the placement map from.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/control/heartbeat` | `{"node": {name, colo, address}, "region", "leaseMs"}` → `{"placementVersion"}` |
//! | `GET /v1/control/placement?after=V` | the map once its version exceeds V (waits up to 10 s; 204 if none) |
//! | `GET /v1/control/status` | nodes, health, slots owned, failovers, hand-offs |
//! | `POST /v1/control/handoff` | `{"colo", "slot", "to"}`: move a slot's ownership to a follower, losing no write |

pub mod admin_client;
pub mod coordinator;
pub mod dev;

use self::admin_client::{Unfenced, unfenced_answer};
use self::coordinator::Coordinator;
use crate::cluster::control::{Heartbeat, HeartbeatReply, PLACEMENT_WAIT};
use crate::error::ApiError;
use crate::http::{json_ok, json_response, parse_json};
use crate::placement::promote;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use std::sync::Arc;

async fn heartbeat(State(c): State<Arc<Coordinator>>, body: Bytes) -> Result<Response, ApiError> {
    let hb: Heartbeat = parse_json(&body)?;
    if hb.region != c.cfg.region {
        return Err(ApiError::bad_request(
            "wrong_region",
            format!(
                "this control plane runs region {:?}, not {:?}",
                c.cfg.region, hb.region
            ),
        ));
    }
    let version = c.heartbeat(hb.node);
    Ok(json_ok(&HeartbeatReply {
        placement_version: version,
    }))
}

async fn placement(
    State(c): State<Arc<Coordinator>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let after: u64 = q
        .as_deref()
        .and_then(|q| q.strip_prefix("after="))
        .map(|v| v.parse())
        .transpose()
        .map_err(|_| {
            ApiError::bad_request("invalid_query", "after must be a placement version number")
        })?
        .unwrap_or(0);
    let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
    loop {
        let notified = c.changed.notified();
        let map = c.placement();
        if map.version > after {
            return Ok(json_ok(&map));
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

async fn status(State(c): State<Arc<Coordinator>>) -> Response {
    json_ok(&c.status())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoffRequest {
    colo: String,
    slot: u32,
    to: String,
}

async fn handoff(State(c): State<Arc<Coordinator>>, body: Bytes) -> Result<Response, ApiError> {
    let req: HandoffRequest = parse_json(&body)?;
    let replicas = c.handoff(&req.colo, req.slot, &req.to).await?;
    Ok(json_ok(&serde_json::json!({
        "colo": req.colo,
        "slot": req.slot,
        "owner": replicas.owner,
        "epoch": replicas.epoch,
        "followers": replicas.followers,
    })))
}

pub fn router(c: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/v1/control/heartbeat", post(heartbeat))
        .route("/v1/control/placement", get(placement))
        .route("/v1/control/status", get(status))
        .route("/v1/control/handoff", post(handoff))
        .route(
            "/healthz",
            get(|| async { json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()) }),
        )
        .with_state(c)
}

impl Coordinator {
    /// An explicit hand-off of a slot to one of its followers (drain, transfer, bump epoch).
    pub async fn handoff(
        &self,
        colo: &str,
        slot: u32,
        to: &str,
    ) -> Result<crate::placement::SlotReplicas, ApiError> {
        // Before reading the map: a hand-back of this slot publishes before it lets go.
        let _in_flight = self.begin_handoff(colo, slot)?;
        let map = self.placement();
        let cur = map.replicas_of(colo, slot).cloned().ok_or_else(|| {
            ApiError::not_found(
                "unknown_slot",
                format!("no slot {colo}#{slot} in the placement"),
            )
        })?;
        if cur.owner == to {
            return Ok(cur);
        }
        if !cur.followers.iter().any(|f| f == to) {
            return Err(ApiError::bad_request(
                "not_a_follower",
                format!(
                    "{to} is not a follower of {colo}#{slot} (followers: {})",
                    cur.followers.join(", ")
                ),
            ));
        }
        // An earlier attempt failed with an answer other than the owner's own "not fenced" ones
        // (`handoff_timeout`, `handoff_interrupted`; a lost answer looks like any other failure), so the owner may have fenced itself at
        // the next epoch, and the control loop is about to republish the slot there. Starting
        // now would hand off at that same epoch and lose the race to the republish (409
        // `slot_moved`) whenever the hand-off takes longer than a loop pass.
        let settling = self.pending_fence(colo, slot).filter(|e| *e > cur.epoch);
        if let Some(epoch) = settling {
            return Err(ApiError::unavailable(
                "handoff_settling",
                format!(
                    "{colo}#{slot} is being republished at epoch {epoch} after an earlier hand-off failed; retry in a moment"
                ),
            ));
        }
        let address = map
            .node(&cur.owner)
            .map(|n| n.address.clone())
            .ok_or_else(|| ApiError::internal("the owner has no address"))?;
        if let Err(e) = self
            .admin_handoff(&address, colo, slot, to, cur.epoch + 1)
            .await
        {
            // The owner's own answers that it did not fence itself: it serves on at its epoch (or
            // a new placement moved the slot), and republishing it at a newer one would only
            // send it through recovery.
            match unfenced_answer(&e) {
                Some(Unfenced::TimedOut) => {
                    return Err(ApiError::unavailable("handoff_timeout", e));
                }
                Some(Unfenced::Interrupted) => {
                    return Err(ApiError::new(409, "handoff_interrupted", e));
                }
                None => {}
            }
            // Any other failure may have fenced the owner, its answer lost on the way.
            self.note_fencing(colo, slot, cur.epoch + 1);
            return Err(ApiError::unavailable("handoff_failed", e));
        }
        let next = promote(&cur, to);
        if !self.replace_slot(colo, slot, &cur, next.clone()) {
            // A failover moved the slot while the owner handed it over: the map's epoch may be
            // the very epoch of this hand-off, and publishing the target too would give it two
            // owners. The old owner fenced itself at that epoch; the new map already covers it.
            self.note_fencing(colo, slot, cur.epoch + 1);
            return Err(ApiError::new(
                409,
                "slot_moved",
                format!(
                    "{colo}#{slot} changed owner or epoch during the hand-off (a failover?); \
                     the hand-off was not published, retry against the current owner"
                ),
            ));
        }
        Ok(next)
    }
}
