//! `POST /v1/ns/{ns}/ids` (new unique ID or ID from a name) and `GET /v1/ns/{ns}/ids/{id}`
//! (validate an ID string).

use super::{AppState, json_ok, namespace, parse_json, read_body};
use crate::config::valid_name;
use crate::error::ApiError;
use crate::id::IdKind;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IdRequest {
    name: Option<String>,
    jurisdiction: Option<String>,
    location_hint: Option<String>,
}

fn kind_name(kind: Option<IdKind>) -> &'static str {
    match kind {
        Some(IdKind::Unique) => "unique",
        Some(IdKind::Named) => "named",
        None => "unknown",
    }
}

pub async fn create(
    State(node): State<AppState>,
    Path(ns_name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let ns = namespace(&node, &ns_name)?;
    let bytes = read_body(body, ns).await?;
    let req: IdRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        IdRequest::default()
    } else {
        parse_json(&bytes)?
    };
    // A namespace confined to a jurisdiction mints every ID inside it.
    let jurisdiction = match (&req.jurisdiction, &ns.config.jurisdiction) {
        (Some(j), Some(fixed)) if j != fixed => {
            return Err(ApiError::bad_request(
                "invalid_jurisdiction",
                format!(
                    "namespace {ns_name:?} is confined to jurisdiction {fixed:?}; cannot create IDs in {j:?}"
                ),
            ));
        }
        (Some(j), _) if !valid_name(j) => {
            return Err(ApiError::bad_request(
                "invalid_jurisdiction",
                format!("jurisdiction {j:?} is not a valid name (a-z, 0-9, '-')"),
            ));
        }
        (Some(j), _) => Some(j.clone()),
        (None, fixed) => fixed.clone(),
    };
    if let Some(hint) = &req.location_hint
        && !valid_name(hint)
    {
        return Err(ApiError::bad_request(
            "invalid_location_hint",
            format!("location hint {hint:?} is not a valid colo name (a-z, 0-9, '-')"),
        ));
    }
    let placed = node.cluster.placement();
    let max_name = ns.config.limits.max_key_bytes.0 as usize;
    let id = match &req.name {
        Some(name) if name.is_empty() => {
            return Err(ApiError::bad_request(
                "invalid_name",
                "names must not be empty",
            ));
        }
        Some(name) if name.len() > max_name => {
            return Err(ApiError::limit(
                400,
                "maxKeyBytes",
                format!(
                    "the name is {} bytes, more than the {max_name} allowed",
                    name.len()
                ),
            ));
        }
        Some(name) => ns.keys.from_name(name, jurisdiction.as_deref()),
        None => {
            // Home: the hinted colo when it is one of this region's, else this node's colo (a
            // hint is a preference, as for Durable Objects, not an error when it cannot be met).
            let colo = req
                .location_hint
                .as_ref()
                .filter(|hint| placed.colos.contains_key(hint.as_str()))
                .unwrap_or(&node.config.node.colo);
            ns.keys.new_unique(colo, jurisdiction.as_deref())
        }
    };
    let home = node.cluster.home_colo(&placed, &id).ok();
    Ok(json_ok(&json!({
        "id": id.to_hex(),
        "kind": kind_name(id.kind()),
        "jurisdiction": jurisdiction,
        "colo": home,
    })))
}

pub async fn validate(
    State(node): State<AppState>,
    Path((ns_name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ns = namespace(&node, &ns_name)?;
    let id = ns
        .keys
        .verify(&id)
        .map_err(|e| ApiError::bad_request("invalid_id", e.to_string()))?;
    Ok(json_ok(&json!({
        "id": id.to_hex(),
        "valid": true,
        "kind": kind_name(id.kind()),
    })))
}
