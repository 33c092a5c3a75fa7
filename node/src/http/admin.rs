//! `/v1/admin`: what the control plane calls (slot reports, fencing, hand-offs) and the node's
//! own status. See docs/control-plane.md.

use super::{AppState, json_ok, parse_json};
use crate::cluster::slot::Role;
use crate::error::ApiError;
use crate::lsn::Lsn;
use crate::storage::record::SlotKey;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

fn slot_key(node: &AppState, colo: &str, slot: u32) -> Result<SlotKey, ApiError> {
    let map = node.cluster.placement();
    if slot >= map.slot_count && !map.colos.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_slot",
            format!(
                "slot {slot} does not exist: colos have {} slots",
                map.slot_count
            ),
        ));
    }
    Ok(SlotKey::new(colo, slot))
}

/// `GET /v1/admin/slots/{colo}/{slot}`
pub async fn slot_report(
    State(node): State<AppState>,
    Path((colo, slot)): Path<(String, u32)>,
) -> Result<Response, ApiError> {
    let key = slot_key(&node, &colo, slot)?;
    let report = node.cluster.slot(&key).report();
    Ok(json_ok(&json!({
        "role": report.role,
        "phase": report.phase,
        "epoch": report.epoch,
        "fenced": report.fenced,
        "durable": report.durable,
        "appended": report.appended,
        "applied": report.applied,
        "pending": report.pending,
        "followers": report.followers,
        "placementVersion": node.cluster.placement().version,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceRequest {
    epoch: u64,
}

/// `POST /v1/admin/slots/{colo}/{slot}/fence {"epoch": E}`: refuse epochs below E from now on
/// (durably), and report the last durable position.
pub async fn fence(
    State(node): State<AppState>,
    Path((colo, slot)): Path<(String, u32)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: FenceRequest = parse_json(&body)?;
    let key = slot_key(&node, &colo, slot)?;
    let s = node.cluster.slot(&key);
    let cluster = node.cluster.clone();
    let pos = tokio::task::spawn_blocking(move || s.fence(&cluster, req.epoch))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(json_ok(&json!({"durable": pos.lsn, "chain": pos.chain})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandoffRequest {
    to: String,
    epoch: u64,
}

/// `POST /v1/admin/slots/{colo}/{slot}/handoff {"to": node, "epoch": E}`: on the owner, stop
/// writes, bring `to` up to date, fence itself at E. The control plane then publishes `to`.
pub async fn handoff(
    State(node): State<AppState>,
    Path((colo, slot)): Path<(String, u32)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: HandoffRequest = parse_json(&body)?;
    let key = slot_key(&node, &colo, slot)?;
    let s = node.cluster.slot(&key);
    let pos = s
        .handoff(&node.cluster, &req.to, req.epoch, Duration::from_secs(8))
        .await?;
    Ok(json_ok(&json!({"durable": pos.lsn, "chain": pos.chain})))
}

/// `GET /v1/admin/status`: the node's view of itself.
pub async fn status(State(node): State<AppState>) -> Response {
    let cl = &node.cluster;
    let map = cl.placement();
    let (mut owned, mut serving, mut following) = (0usize, 0usize, 0usize);
    let mut lag = Lsn::ZERO;
    for s in cl.slots() {
        match s.role() {
            Role::Owner { .. } => {
                owned += 1;
                if s.serving() {
                    serving += 1;
                }
            }
            Role::Follower { .. } => {
                following += 1;
                lag = lag.max(s.durable().lsn);
            }
            Role::None => {}
        }
    }
    json_ok(&json!({
        "node": cl.me,
        "colo": cl.colo,
        "region": cl.region,
        "standalone": cl.standalone,
        "placementVersion": map.version,
        "leaseValid": cl.lease.valid(),
        "leaseRemainingMs": cl.lease.remaining().as_millis() as u64,
        "logHealthy": cl.healthy(),
        "slotsOwned": owned,
        "slotsServing": serving,
        "slotsFollowing": following,
        "nodesInRegion": map.nodes.len(),
        "replicas": map.replicas,
    }))
}

/// `GET /v1/admin/locate/{ns}/{id}`: where an object lives — its slot and replica set.
pub async fn locate(
    State(node): State<AppState>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ns = super::namespace(&node, &ns)?;
    let id = ns
        .keys
        .verify(&id)
        .map_err(|e| ApiError::bad_request("invalid_id", e.to_string()))?;
    let key = node.cluster.slot_key_of(&id)?;
    let map = node.cluster.placement();
    let replicas = map.replicas_of(&key.colo, key.slot);
    Ok(json_ok(&json!({
        "colo": &*key.colo,
        "slot": key.slot,
        "epoch": replicas.map(|r| r.epoch),
        "owner": replicas.map(|r| r.owner.clone()),
        "followers": replicas.map(|r| r.followers.clone()),
        "placementVersion": map.version,
    })))
}
