//! Object routes, addressed by ID (`/objects/{id}`) or by name (`/names/{name}`).

use super::{AppState, json_ok, json_response, namespace, parse_json, read_body};
use crate::cluster::Route;
use crate::error::ApiError;
use crate::id::ObjectId;
use crate::namespace::Namespace;
use crate::object::kv::{self, KvBatch, ListOptions};
use crate::object::sql::SqlRequest;
use crate::object::{Reply, Request};
use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The routes under one object prefix (`{id}` or `{name}` form).
pub fn routes(prefix: &str) -> Router<AppState> {
    Router::new()
        .route(prefix, get(info).delete(delete_all))
        .route(&format!("{prefix}/sql"), post(sql))
        .route(&format!("{prefix}/kv"), get(kv_list).post(kv_batch))
        .route(
            &format!("{prefix}/kv/{{*key}}"),
            get(kv_get).put(kv_put).delete(kv_delete),
        )
}

/// The namespace and verified object ID a request addresses.
fn resolve(
    node: &AppState,
    params: &HashMap<String, String>,
) -> Result<(Arc<Namespace>, ObjectId), ApiError> {
    let ns_name = params.get("ns").map_or("", String::as_str);
    let ns = namespace(node, ns_name)?.clone();
    let id = if let Some(id) = params.get("id") {
        ns.keys
            .verify(id)
            .map_err(|e| ApiError::bad_request("invalid_id", e.to_string()))?
    } else if let Some(name) = params.get("name") {
        if name.len() as u64 > ns.config.limits.max_key_bytes.0 {
            return Err(ApiError::limit(
                400,
                "maxKeyBytes",
                "the object name is too long",
            ));
        }
        ns.keys.from_name(name, ns.config.jurisdiction.as_deref())
    } else {
        return Err(ApiError::bad_request(
            "invalid_id",
            "no object ID or name in the path",
        ));
    };
    Ok((ns, id))
}

fn respond(reply: Reply) -> Response {
    match reply {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => e.into_response(),
    }
}

/// Marks a request forwarded by another node (it is not forwarded again).
pub const FORWARDED_HEADER: &str = "x-colony-forwarded";

/// What forwarding needs to know about the incoming request.
pub struct Incoming {
    method: Method,
    path_and_query: String,
    forwarded: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for Incoming {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Incoming {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string()),
            forwarded: parts.headers.contains_key(FORWARDED_HEADER),
        })
    }
}

/// How long a request that meets ownership on the move — an owner that has not learned the
/// newest placement yet, or a new owner still recovering — is routed again before the client
/// gets the `not_owner` error. Safe: `not_owner` means the request was applied nowhere.
const MOVING_OWNERSHIP_WAIT: Duration = Duration::from_secs(3);
const REROUTE_PAUSE: Duration = Duration::from_millis(25);

/// Sends the request on to the object's owner and relays its answer; also says whether the
/// answer was `not_owner` (the request was not applied; route again).
async fn forward(node: &AppState, address: &str, inc: &Incoming, body: Bytes) -> (Response, bool) {
    if inc.forwarded {
        let refusal = ApiError::unavailable(
            "not_owner",
            "the request was forwarded to a node that does not own the object (ownership is moving); retry",
        );
        return (refusal.into_response(), true);
    }
    node.metrics.replication.forwarded.inc();
    let url = format!("http://{address}{}", inc.path_and_query);
    match node
        .cluster
        .peers
        .send(
            inc.method.clone(),
            &url,
            &[(FORWARDED_HEADER, "1")],
            body,
            Duration::from_secs(120),
        )
        .await
    {
        Ok(resp) => {
            let not_owner = resp.status == StatusCode::SERVICE_UNAVAILABLE
                && serde_json::from_slice::<serde_json::Value>(&resp.body)
                    .is_ok_and(|v| v["error"]["code"] == "not_owner");
            let mut out = Response::new(Body::from(resp.body));
            *out.status_mut() = resp.status;
            if let Some(ct) = resp.headers.get(axum::http::header::CONTENT_TYPE) {
                out.headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, ct.clone());
            }
            (out, not_owner)
        }
        Err(e) => {
            let unreachable = ApiError::unavailable(
                "owner_unreachable",
                format!("the object's owner did not answer: {e}"),
            );
            (unreachable.into_response(), false)
        }
    }
}

/// Resolves the object, reads the body (with the namespace's limit), and serves the request here
/// if this node owns the object, or forwards it to the owner.
async fn dispatch(
    node: &AppState,
    params: &HashMap<String, String>,
    inc: Incoming,
    body: Option<Body>,
    build: impl FnOnce(&Namespace, &[u8]) -> Result<Request, ApiError>,
) -> Response {
    let (ns, id) = match resolve(node, params) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let bytes = match body {
        Some(b) => match read_body(b, &ns).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        },
        None => Bytes::new(),
    };
    let mut build = Some(build);
    let deadline = Instant::now() + MOVING_OWNERSHIP_WAIT;
    loop {
        match node.cluster.route(&id) {
            Err(e) => return e.into_response(),
            Ok(Route::Remote { address, .. }) => {
                let (response, not_owner) = forward(node, &address, &inc, bytes.clone()).await;
                if !not_owner || inc.forwarded || Instant::now() >= deadline {
                    return response;
                }
                tokio::time::sleep(REROUTE_PAUSE).await;
            }
            Ok(Route::Local(_)) => {
                let Some(build) = build.take() else {
                    return ApiError::unavailable(
                        "not_owner",
                        "ownership of the object is moving; retry",
                    )
                    .into_response();
                };
                let request = match build(&ns, &bytes) {
                    Ok(r) => r,
                    Err(e) => return e.into_response(),
                };
                let reply = node.objects.call(&ns, id, request, bytes.len()).await;
                // Ownership moved between routing and execution: forward to the new owner once
                // this node's placement names it (it may lag behind the move). A forwarded request
                // is refused at once instead: the node that forwarded it routes it again.
                if let Err(e) = &reply
                    && e.code == "not_owner"
                    && !inc.forwarded
                {
                    while Instant::now() < deadline
                        && matches!(node.cluster.route(&id), Ok(Route::Local(_)))
                    {
                        tokio::time::sleep(REROUTE_PAUSE).await;
                    }
                    if Instant::now() < deadline {
                        continue;
                    }
                }
                return respond(reply);
            }
        }
    }
}

async fn call(
    node: &AppState,
    params: &HashMap<String, String>,
    inc: Incoming,
    request: impl FnOnce(&Namespace) -> Result<Request, ApiError>,
) -> Response {
    dispatch(node, params, inc, None, |ns, _| request(ns)).await
}

async fn call_with_body(
    node: &AppState,
    params: &HashMap<String, String>,
    inc: Incoming,
    body: Body,
    request: impl FnOnce(&Namespace, &[u8]) -> Result<Request, ApiError>,
) -> Response {
    dispatch(node, params, inc, Some(body), request).await
}

async fn info(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
) -> Response {
    call(&node, &p, inc, |_| Ok(Request::Info)).await
}

async fn delete_all(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
) -> Response {
    call(&node, &p, inc, |_| Ok(Request::DeleteAll)).await
}

async fn sql(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
    body: Body,
) -> Response {
    call_with_body(&node, &p, inc, body, |ns, bytes| {
        let req: SqlRequest = parse_json(bytes)?;
        Ok(Request::Sql(req.plan(&ns.config.limits)?))
    })
    .await
}

fn key_param(p: &HashMap<String, String>, ns: &Namespace) -> Result<String, ApiError> {
    let key = p.get("key").cloned().unwrap_or_default();
    kv::check_key(&key, &ns.config.limits)?;
    Ok(key)
}

async fn kv_get(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
) -> Response {
    let params = p.clone();
    call(&node, &p, inc, move |ns| {
        Ok(Request::KvGet(key_param(&params, ns)?))
    })
    .await
}

async fn kv_put(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
    body: Body,
) -> Response {
    let params = p.clone();
    call_with_body(&node, &p, inc, body, move |ns, bytes| {
        let key = key_param(&params, ns)?;
        let value: &serde_json::value::RawValue = parse_json(bytes)?;
        let encoded = kv::encode_sent_value(&key, value.get(), &ns.config.limits)?;
        Ok(Request::KvPut { key, encoded })
    })
    .await
}

async fn kv_delete(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
) -> Response {
    let params = p.clone();
    call(&node, &p, inc, move |ns| {
        Ok(Request::KvDelete(key_param(&params, ns)?))
    })
    .await
}

/// `?prefix=&start=&end=&reverse=&limit=&cursor=`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    prefix: Option<String>,
    start: Option<String>,
    end: Option<String>,
    reverse: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn parse_list_query(raw: Option<&str>) -> Result<ListOptions, ApiError> {
    let q: ListQuery = serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("query string: {e} (allowed: prefix, start, end, reverse, limit, cursor)"),
        )
    })?;
    let reverse = match q.reverse.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("reverse must be true or false, not {other:?}"),
            ));
        }
    };
    let limit = q
        .limit
        .map(|l| {
            l.parse::<usize>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("limit must be a positive integer, not {l:?}"),
                )
            })
        })
        .transpose()?;
    Ok(ListOptions {
        prefix: q.prefix,
        start: q.start,
        end: q.end,
        reverse,
        limit,
        cursor: q.cursor,
    })
}

async fn kv_list(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
    RawQuery(q): RawQuery,
) -> Response {
    call(&node, &p, inc, move |_| {
        Ok(Request::KvList(parse_list_query(q.as_deref())?))
    })
    .await
}

async fn kv_batch(
    State(node): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    inc: Incoming,
    body: Body,
) -> Response {
    call_with_body(&node, &p, inc, body, |ns, bytes| {
        let batch: KvBatch = parse_json(bytes)?;
        let puts = kv::validate_batch(&batch, &ns.config.limits)?;
        Ok(Request::KvBatch { batch, puts })
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectsQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

const DEFAULT_OBJECTS_PAGE: usize = 100;
const MAX_OBJECTS_PAGE: usize = 1000;

/// `GET /v1/ns/{ns}/objects?limit=&cursor=`: the namespace's objects that hold data, by ID.
pub async fn list_objects(
    State(node): State<AppState>,
    Path(ns_name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let ns = namespace(&node, &ns_name)?;
    let q: ObjectsQuery = serde_urlencoded::from_str(q.as_deref().unwrap_or("")).map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("query string: {e} (allowed: limit, cursor)"),
        )
    })?;
    let limit = match q.limit {
        None => DEFAULT_OBJECTS_PAGE,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_OBJECTS_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("limit must be between 1 and {MAX_OBJECTS_PAGE}, not {l:?}"),
                ));
            }
        },
    };
    let after = q
        .cursor
        .map(|c| {
            c.parse::<ObjectId>().map_err(|_| {
                ApiError::bad_request("invalid_cursor", "cursor is not one this API returned")
            })
        })
        .transpose()?;
    let (page, more) = ns.list(after.as_ref(), limit);
    let cursor = if more {
        page.last().map(ObjectId::to_hex)
    } else {
        None
    };
    let objects: Vec<_> = page.iter().map(|id| json!({"id": id.to_hex()})).collect();
    Ok(json_ok(&json!({"objects": objects, "cursor": cursor})))
}
