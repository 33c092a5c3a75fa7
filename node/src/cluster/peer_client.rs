//! A pooled HTTP/1.1 client for node-to-node and node-to-control-plane calls (forwarding, admin,
//! snapshots, heartbeats). Outgoing connections can be bound to a source address, so that on
//! loopback each node is recognisable by its IP (the fault-injection tests rely on it).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::IpAddr;
use std::time::Duration;

#[derive(Clone)]
pub struct PeerClient {
    client: Client<HttpConnector, Full<Bytes>>,
    /// Sent as `Authorization: Bearer` on every request (peers' admin and internal APIs).
    token: Option<std::sync::Arc<str>>,
}

/// An answer: status, headers, body.
pub struct PeerResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl PeerClient {
    pub fn new(source: Option<IpAddr>) -> Self {
        Self::with_token(source, None)
    }

    pub fn with_token(source: Option<IpAddr>, token: Option<&str>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_local_address(source);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        PeerClient {
            client,
            token: token.map(std::sync::Arc::from),
        }
    }

    /// Sends a request; errors (connection, timeout) are strings naming what failed.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<PeerResponse, String> {
        let mut builder = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        if let Some(t) = &self.token {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = builder
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .map_err(|e| format!("bad request to {url}: {e}"))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("{url}: {e}"))?
                .to_bytes();
            Ok(PeerResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
    }

    /// POSTs JSON and parses a JSON answer; non-2xx answers are errors carrying the body.
    pub async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<T, String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let resp = self
            .send(Method::POST, url, &[], bytes.into(), timeout)
            .await?;
        json_of(url, resp)
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, String> {
        let resp = self
            .send(Method::GET, url, &[], Bytes::new(), timeout)
            .await?;
        json_of(url, resp)
    }
}

fn json_of<T: serde::de::DeserializeOwned>(url: &str, resp: PeerResponse) -> Result<T, String> {
    if !resp.status.is_success() {
        return Err(format!(
            "{url}: {} {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
                .chars()
                .take(300)
                .collect::<String>()
        ));
    }
    serde_json::from_slice(&resp.body).map_err(|e| format!("{url}: bad JSON answer: {e}"))
}
