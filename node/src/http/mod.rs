//! The client-facing HTTP API, versioned under `/v1`, JSON in and out.

mod admin;
mod body;
mod ids;
pub(crate) mod internal;
mod objects;

use crate::error::ApiError;
use crate::metrics::HttpLabels;
use crate::namespace::Namespace;
use crate::server::Node;
use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Instant;

pub type AppState = Arc<Node>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut resp = json_response(status, body);
        if self.close_connection {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn json_ok(value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => ApiError::internal(format!("cannot encode response: {e}")).into_response(),
    }
}

/// Parses a JSON body into `T`: malformed JSON and wrong shapes are 400s that say what is wrong.
pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = match e.classify() {
            serde_json::error::Category::Data => "invalid_request",
            _ => "invalid_json",
        };
        ApiError::bad_request(code, format!("request body: {e}"))
    })
}

/// Reads a request body up to the namespace's limit.
pub async fn read_body(body: Body, ns: &Namespace) -> Result<axum::body::Bytes, ApiError> {
    body::read_limited(body, ns.config.limits.max_request_bytes.0 as usize).await
}

pub fn namespace<'a>(node: &'a Node, name: &str) -> Result<&'a Arc<Namespace>, ApiError> {
    node.namespace(name).ok_or_else(|| {
        let known: Vec<&str> = node.namespaces.keys().map(String::as_str).collect();
        ApiError::not_found(
            "unknown_namespace",
            format!(
                "namespace {name:?} is not served here (known: {})",
                known.join(", ")
            ),
        )
    })
}

async fn healthz() -> Response {
    json_ok(&serde_json::json!({"status": "ok"}))
}

/// Ready when the node can serve: standalone always; in a cluster once it holds a valid lease and
/// has a placement. Reports when the region has fewer nodes than the replicas wanted.
async fn readyz(State(node): State<AppState>) -> Response {
    let cl = &node.cluster;
    let map = cl.placement();
    let wanted = node
        .namespaces
        .values()
        .map(|n| n.config.replication.replicas)
        .max()
        .unwrap_or(1);
    let ready = cl.standalone || (cl.lease.valid() && map.version > 0 && cl.healthy());
    let under = !cl.standalone && map.nodes.len() < wanted;
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "node": node.config.node.name,
        "colo": node.config.node.colo,
        "region": node.config.node.region,
        "namespaces": node.namespaces.keys().collect::<Vec<_>>(),
        "mode": if cl.standalone { "standalone" } else { "cluster" },
        "leaseValid": cl.lease.valid(),
        "placementVersion": map.version,
        "nodesInRegion": map.nodes.len(),
        "replicasWanted": wanted,
        "underReplicated": under,
        "note": if under {
            Some(format!("the region has {} nodes, fewer than the {wanted} replicas wanted: every node holds a copy", map.nodes.len()))
        } else {
            None
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => json_response(status, bytes),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

async fn metrics(State(node): State<AppState>) -> Response {
    let mut resp = Response::new(Body::from(node.metrics.encode()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(
        "unknown_route",
        format!(
            "no route for {} {} (the API lives under /v1)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        405,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Counts and times every request by route template, method and status.
async fn track(State(node): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let labels = HttpLabels {
        route,
        method,
        status: resp.status().as_u16(),
    };
    node.metrics.http.requests.get_or_create(&labels).inc();
    node.metrics
        .http
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// With an admin token configured, `/v1/admin` and `/v1/internal` answer only requests that carry
/// it (`Authorization: Bearer <token>`), compared in constant time.
async fn require_token(State(node): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &node.cluster.admin_token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let same = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return ApiError::new(
                401,
                "unauthorized",
                "this API needs the cluster's admin token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

pub fn router(node: AppState) -> Router {
    // Node-to-node and control-plane routes: token-protected when a token is configured.
    let cluster_api = Router::new()
        .route("/v1/admin/status", get(admin::status))
        .route("/v1/admin/locate/{ns}/{id}", get(admin::locate))
        .route("/v1/admin/slots/{colo}/{slot}", get(admin::slot_report))
        .route("/v1/admin/slots/{colo}/{slot}/fence", post(admin::fence))
        .route(
            "/v1/admin/slots/{colo}/{slot}/handoff",
            post(admin::handoff),
        )
        .route("/v1/internal/replicate", get(internal::replicate))
        .route(
            "/v1/internal/slots/{colo}/{slot}/manifest",
            get(internal::manifest),
        )
        .route(
            "/v1/internal/objects/{ns}/{id}/snapshot",
            get(internal::snapshot),
        )
        .route_layer(middleware::from_fn_with_state(node.clone(), require_token));
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/ns/{ns}/ids", post(ids::create))
        .route("/v1/ns/{ns}/ids/{id}", get(ids::validate))
        .route("/v1/ns/{ns}/objects", get(objects::list_objects))
        .merge(cluster_api)
        .merge(objects::routes("/v1/ns/{ns}/objects/{id}"))
        .merge(objects::routes("/v1/ns/{ns}/names/{name}"))
        .route_layer(middleware::from_fn_with_state(node.clone(), track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    api.with_state(node)
}
