//! The operator's admin calls: the node crate's client, carrying the namespace's admin token,
//! against a local stand-in for the node's admin API that refuses calls without it.

use axum::Json;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use colony_node::lsn::Lsn;
use colony_operator::node_admin::{AdminConnector, HttpAdminConnector, Unfenced, unfenced_answer};
use serde_json::{Value, json};
use std::time::Duration;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn authorized(h: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    if h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}")) {
        Ok(())
    } else {
        Err((StatusCode::UNAUTHORIZED, r#"{"error":"unauthorized"}"#))
    }
}

async fn node() -> String {
    let app = axum::Router::new()
        .route(
            "/v1/admin/slots/{colo}/{slot}/fence",
            post(|h: HeaderMap, Path((colo, slot)): Path<(String, u32)>, Json(b): Json<Value>| async move {
                authorized(&h)?;
                assert_eq!((colo.as_str(), slot), ("ams", 7));
                Ok::<_, (StatusCode, &'static str)>(Json(json!({"durable": {"epoch": b["epoch"].as_u64().unwrap_or(1) - 1, "seq": 42}, "chain": 0})))
            }),
        )
        .route(
            "/v1/admin/slots/{colo}/{slot}/handoff",
            post(|h: HeaderMap, Json(b): Json<Value>| async move {
                authorized(&h)?;
                if b["to"] == "ams-2" && b["epoch"] == 9 {
                    Ok(Json(json!({"durable": {"epoch": 9, "seq": 1}, "chain": 0})))
                } else if b["to"] == "ams-3" {
                    Err((StatusCode::CONFLICT, r#"{"error":{"code":"handoff_interrupted","message":"slot ams#7 stopped draining"}}"#))
                } else {
                    Err((StatusCode::SERVICE_UNAVAILABLE, r#"{"error":{"code":"handoff_timeout","message":"ams-0 did not catch up"}}"#))
                }
            }),
        )
        .route(
            "/v1/admin/slots/{colo}/{slot}",
            get(|h: HeaderMap| async move {
                authorized(&h)?;
                Ok::<_, (StatusCode, &'static str)>(Json(json!({"role": "follower", "phase": null, "epoch": 3, "fenced": 3,
                    "durable": {"epoch": 3, "seq": 8}, "appended": {"epoch": 3, "seq": 8}, "applied": {"epoch": 3, "seq": 8},
                    "pending": 0, "followers": [], "placementVersion": 12})))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    addr.to_string()
}

#[tokio::test]
async fn fence_handoff_and_report_carry_the_admin_token() {
    let address = node().await;
    let connector = HttpAdminConnector {
        timeout: Duration::from_secs(5),
    };
    let admin = connector.connect(TOKEN);
    assert_eq!(
        admin.fence(&address, "ams", 7, 5).await.expect("fence"),
        Lsn::new(4, 42)
    );
    assert_eq!(
        admin
            .handoff(&address, "ams", 7, "ams-2", 9)
            .await
            .expect("handoff"),
        Lsn::new(9, 1)
    );
    let timed_out = admin
        .handoff(&address, "ams", 7, "ams-0", 9)
        .await
        .expect_err("timed out");
    assert_eq!(
        unfenced_answer(&timed_out),
        Some(Unfenced::TimedOut),
        "{timed_out}"
    );
    let interrupted = admin
        .handoff(&address, "ams", 7, "ams-3", 9)
        .await
        .expect_err("interrupted");
    assert_eq!(
        unfenced_answer(&interrupted),
        Some(Unfenced::Interrupted),
        "{interrupted}"
    );
    let r = admin.status(&address, "ams", 7).await.expect("status");
    assert_eq!(
        (r.role.as_str(), r.epoch, r.durable, r.placement_version),
        ("follower", 3, Lsn::new(3, 8), 12)
    );
    // Without the token, the node refuses.
    let stranger = connector.connect("not-the-token-0000000000000000000");
    let refused = stranger
        .status(&address, "ams", 7)
        .await
        .expect_err("refused");
    assert!(refused.contains("401"), "{refused}");
    assert_eq!(unfenced_answer(&refused), None);
    assert!(admin.fence("127.0.0.1:1", "ams", 0, 1).await.is_err());
}
