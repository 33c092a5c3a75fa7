//! Every route of the HTTP API and its errors, against a real node process.

mod common;

use base64::Engine;
use common::{TestNode, assert_error};
use serde_json::{Value, json};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[tokio::test]
async fn dev_command_serves_the_default_namespace_and_health_routes() {
    let node = TestNode::dev(&[]).await;
    let (s, v) = node.get("/healthz").await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, v) = node.get("/readyz").await;
    assert_eq!(s, 200);
    assert_eq!(v["namespaces"], json!(["default"]));
    let (s, v) = node.post("/v1/ns/default/ids", json!({"name": "x"})).await;
    assert_eq!(s, 200, "{v}");
    // ID keys were generated once and persist: the same name maps to the same ID after restart.
    let mut node = node;
    node.restart().await;
    let (_, again) = node.post("/v1/ns/default/ids", json!({"name": "x"})).await;
    assert_eq!(again["id"], v["id"]);
}

#[tokio::test]
async fn ids_named_are_deterministic_unique_are_fresh_and_forgeries_are_refused() {
    let node = TestNode::new().await;
    let (s, a) = node
        .post("/v1/ns/default/ids", json!({"name": "room-1"}))
        .await;
    assert_eq!(s, 200, "{a}");
    let (_, b) = node
        .post("/v1/ns/default/ids", json!({"name": "room-1"}))
        .await;
    assert_eq!(a["id"], b["id"]);
    assert_eq!(a["kind"], "named");
    let named = a["id"].as_str().expect("id").to_string();
    assert_eq!(named.len(), 64);
    assert!(named.bytes().all(|c| c.is_ascii_hexdigit()));

    let (s, u1) = node.post("/v1/ns/default/ids", json!({})).await;
    assert_eq!((s, u1["kind"].as_str()), (200, Some("unique")));
    let (_, u2) = node
        .post(
            "/v1/ns/default/ids",
            json!({"jurisdiction": "eu", "locationHint": "ams"}),
        )
        .await;
    assert_ne!(u1["id"], u2["id"]);
    assert_eq!(u2["jurisdiction"], "eu");
    // A unique ID's home is this node's colo; a hint naming no colo of the region is a
    // preference that cannot be met, not an error.
    assert!(u1["colo"].is_string(), "{u1}");
    assert_eq!(u2["colo"], u1["colo"]);
    // An empty body is the same as {}.
    let r = node
        .client
        .post(node.url("/v1/ns/default/ids"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);

    // Validation route.
    let (s, v) = node.get(&format!("/v1/ns/default/ids/{named}")).await;
    assert_eq!((s, v["valid"].as_bool()), (200, Some(true)));

    // Altered, made-up and foreign IDs are refused and create nothing.
    let mut altered = named.clone().into_bytes();
    altered[63] = if altered[63] == b'0' { b'1' } else { b'0' };
    let altered = String::from_utf8(altered).expect("ascii");
    assert_error(
        &node.get(&format!("/v1/ns/default/ids/{altered}")).await,
        400,
        "invalid_id",
    );
    let put = node
        .client
        .put(node.url(&format!("/v1/ns/default/objects/{altered}/kv/k")))
        .json(&json!(1))
        .send()
        .await
        .expect("request");
    assert_eq!(put.status().as_u16(), 400);
    assert_error(
        &node
            .get(&format!("/v1/ns/default/objects/{}", "ab".repeat(32)))
            .await,
        400,
        "invalid_id",
    );
    assert_error(
        &node.get("/v1/ns/default/objects/xyz").await,
        400,
        "invalid_id",
    );
    let (_, foreign) = node
        .post("/v1/ns/other/ids", json!({"name": "room-1"}))
        .await;
    let foreign = foreign["id"].as_str().expect("id");
    assert_ne!(
        foreign, named,
        "the same name in another namespace is another ID"
    );
    assert_error(
        &node
            .post(
                &format!("/v1/ns/default/objects/{foreign}/sql"),
                json!({"sql": "SELECT 1"}),
            )
            .await,
        400,
        "invalid_id",
    );
    let (_, list) = node.get("/v1/ns/default/objects").await;
    assert_eq!(list["objects"], json!([]), "nothing was created");

    // Malformed requests.
    let r = node
        .client
        .post(node.url("/v1/ns/default/ids"))
        .body("{nope")
        .send()
        .await
        .expect("request");
    assert_error(&common::status_json(r).await, 400, "invalid_json");
    assert_error(
        &node.post("/v1/ns/default/ids", json!({"name": 5})).await,
        400,
        "invalid_request",
    );
    assert_error(
        &node.post("/v1/ns/default/ids", json!({"nmae": "x"})).await,
        400,
        "invalid_request",
    );
    assert_error(
        &node.post("/v1/ns/default/ids", json!({"name": ""})).await,
        400,
        "invalid_name",
    );
    assert_error(
        &node
            .post("/v1/ns/default/ids", json!({"jurisdiction": "EU!"}))
            .await,
        400,
        "invalid_jurisdiction",
    );
    assert_error(
        &node
            .post("/v1/ns/default/ids", json!({"locationHint": "A B"}))
            .await,
        400,
        "invalid_location_hint",
    );
    assert_error(
        &node.post("/v1/ns/nope/ids", json!({})).await,
        404,
        "unknown_namespace",
    );
}

#[tokio::test]
async fn objects_are_addressable_by_id_and_by_name_alike() {
    let node = TestNode::new().await;
    let (_, id) = node
        .post("/v1/ns/default/ids", json!({"name": "same"}))
        .await;
    let id = id["id"].as_str().expect("id");
    let r = node
        .client
        .put(node.obj("default", "same", "/kv/greeting"))
        .json(&json!("hello"))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status().as_u16(), 200);
    let (s, v) = node
        .get(&format!("/v1/ns/default/objects/{id}/kv/greeting"))
        .await;
    assert_eq!((s, v["value"].clone()), (200, json!("hello")));
    let (s, info) = node.get(&format!("/v1/ns/default/objects/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(info["id"], id);
    assert!(info["sizeBytes"].as_u64().is_some_and(|n| n > 0), "{info}");
}

#[tokio::test]
async fn sql_round_trips_every_type_exactly() {
    let node = TestNode::new().await;
    let (s, v) = node
        .sql(
            "types",
            "CREATE TABLE t(i INTEGER, r REAL, s TEXT, b BLOB, n)",
            json!([]),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"columns": [], "rows": [], "rowsRead": 0, "rowsWritten": 0})
    );
    let blob = B64.encode([0u8, 1, 2, 255]);
    let (s, v) = node
        .sql(
            "types",
            "INSERT INTO t VALUES (?, ?, ?, ?, ?), (?, ?, ?, ?, ?) RETURNING i",
            json!([i64::MAX, 1.5, "héllo", {"base64": blob}, null, i64::MIN, -0.25, "", {"base64": ""}, true]),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rowsWritten"], 2);
    assert_eq!(v["rows"], json!([[i64::MAX], [i64::MIN]]));
    let (s, v) = node
        .sql(
            "types",
            "SELECT i, r, s, b, n FROM t ORDER BY rowid",
            json!([]),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["columns"], json!(["i", "r", "s", "b", "n"]));
    assert_eq!(
        v["rows"],
        json!([
            [i64::MAX, 1.5, "héllo", {"base64": blob}, null],
            [i64::MIN, -0.25, "", {"base64": ""}, 1]
        ])
    );
    assert_eq!(v["rowsRead"], 2);
    assert_eq!(v["rowsWritten"], 0);

    // Named parameters, with or without their prefix.
    let (s, v) = node
        .sql(
            "types",
            "SELECT :a + @b AS sum, $c AS c",
            json!({"a": 2, "@b": 3, "c": "x"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rows"], json!([[5, "x"]]));

    // A batch is one transaction with one result per statement.
    let (s, v) = node
        .post(
            "/v1/ns/default/names/types/sql",
            json!({"batch": [
                {"sql": "UPDATE t SET n = 7"},
                {"sql": "SELECT count(*) FROM t WHERE n = ?", "params": [7]}
            ]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["rowsWritten"], 2);
    assert_eq!(v["results"][1]["rows"], json!([[2]]));
}

async fn count(node: &TestNode, object: &str, table: &str) -> i64 {
    let (s, v) = node
        .sql(object, &format!("SELECT count(*) FROM {table}"), json!([]))
        .await;
    assert_eq!(s, 200, "{v}");
    v["rows"][0][0].as_i64().expect("count")
}

#[tokio::test]
async fn failed_requests_change_nothing_and_say_why() {
    let node = TestNode::new().await;
    node.sql(
        "f",
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)",
        json!([]),
    )
    .await;
    node.sql("f", "INSERT INTO t VALUES (1, 'a')", json!([]))
        .await;

    // A batch whose second statement fails rolls back its first.
    let got = node
        .post(
            "/v1/ns/default/names/f/sql",
            json!({"batch": [{"sql": "INSERT INTO t VALUES (2, 'b')"}, {"sql": "INSRT nonsense"}]}),
        )
        .await;
    assert_error(&got, 400, "sql_error");
    assert!(
        got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("batch[1]")),
        "{}",
        got.1
    );
    assert_eq!(count(&node, "f", "t").await, 1);

    let got = node
        .sql("f", "INSERT INTO t VALUES (1, 'dup')", json!([]))
        .await;
    assert_error(&got, 409, "constraint_violation");
    let got = node
        .sql("f", "INSERT INTO t VALUES (3, NULL)", json!([]))
        .await;
    assert_error(&got, 409, "constraint_violation");
    for stmt in [
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT s",
        "RELEASE s",
        "ATTACH 'x.db' AS x",
        "PRAGMA journal_mode=DELETE",
        "PRAGMA synchronous=FULL",
        "SELECT * FROM _colony_kv",
        "CREATE TABLE _colony_x(a)",
        "SELECT load_extension('x')",
    ] {
        assert_error(&node.sql("f", stmt, json!([])).await, 400, "not_allowed");
    }
    assert_error(
        &node.sql("f", "SELECT 1; SELECT 2", json!([])).await,
        400,
        "sql_error",
    );
    assert_error(
        &node.sql("f", "SELECT ?", json!([1, 2])).await,
        400,
        "invalid_params",
    );
    assert_error(
        &node.sql("f", "SELECT :a", json!({"b": 1})).await,
        400,
        "invalid_params",
    );
    assert_error(
        &node.sql("f", "SELECT * FROM missing", json!([])).await,
        400,
        "sql_error",
    );
    assert_error(
        &node.sql("f", "SELECT ?", json!([[1]])).await,
        400,
        "invalid_param",
    );
    assert_error(
        &node.sql("f", "SELECT ?", json!([u64::MAX])).await,
        400,
        "invalid_param",
    );
    assert_error(
        &node
            .post("/v1/ns/default/names/f/sql", json!({"sql": 1}))
            .await,
        400,
        "invalid_request",
    );
    assert_error(
        &node.post("/v1/ns/default/names/f/sql", json!({})).await,
        400,
        "invalid_request",
    );
    // Reading table structure is fine.
    let (s, v) = node.sql("f", "PRAGMA table_info(t)", json!([])).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(2));
    assert_eq!(count(&node, "f", "t").await, 1);
    let (_, rows) = node.sql("f", "SELECT v FROM t", json!([])).await;
    assert_eq!(rows["rows"], json!([["a"]]));
}

/// A value reads back as it was stored (less whitespace) whichever way it is read — alone, in a
/// batch or in a list — and a batch put stores values as sent too: key order, number spellings
/// and numbers out of a double's range survive all of them.
#[tokio::test]
async fn key_value_reads_answer_values_as_stored_by_every_kind_of_read_and_write() {
    let node = TestNode::new().await;
    let kv = |rest: &str| node.obj("default", "raw", rest);
    let send = |req: reqwest::RequestBuilder, body: String| async move {
        let r = req
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    };
    // Each value as sent, and as it must read back (compact).
    let values = [
        (
            "order",
            "{ \"b\": 1, \"a\": [2.50, 1E2] }",
            "{\"b\":1,\"a\":[2.50,1E2]}",
        ),
        ("huge", "1e400", "1e400"),
        (
            "long",
            "123456789012345678901234567890",
            "123456789012345678901234567890",
        ),
    ];
    for (key, sent, _) in values {
        let (s, body) = send(node.client.put(kv(&format!("/kv/{key}"))), sent.to_string()).await;
        assert_eq!(s, 200, "put {key}: {body}");
    }
    let batch_put = format!(
        "{{\"put\": {{ {} }}}}",
        values
            .iter()
            .map(|(key, sent, _)| format!("\"b-{key}\": {sent}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (s, body) = send(node.client.post(kv("/kv")), batch_put).await;
    assert_eq!(s, 200, "batch put: {body}");

    for (key, _, stored) in values {
        for k in [key.to_string(), format!("b-{key}")] {
            let (s, body) = send(node.client.get(kv(&format!("/kv/{k}"))), String::new()).await;
            assert_eq!(s, 200, "get {k}: {body}");
            assert!(
                body.contains(&format!("\"value\":{stored}")),
                "get {k}: {body}"
            );
        }
    }
    let gets: Vec<String> = values
        .iter()
        .flat_map(|(key, _, _)| [key.to_string(), format!("b-{key}")])
        .collect();
    let (s, batch) = send(
        node.client.post(kv("/kv")),
        json!({ "get": gets }).to_string(),
    )
    .await;
    assert_eq!(s, 200, "batch get: {batch}");
    let (s, list) = send(node.client.get(kv("/kv")), String::new()).await;
    assert_eq!(s, 200, "list: {list}");
    for (key, _, stored) in values {
        for k in [key.to_string(), format!("b-{key}")] {
            assert!(
                batch.contains(&format!("\"{k}\":{stored}")),
                "batch get {k}: {batch}"
            );
            assert!(
                list.contains(&format!("\"key\":\"{k}\",\"value\":{stored}")),
                "list {k}: {list}"
            );
        }
    }
}

#[tokio::test]
async fn key_value_get_put_delete_list_and_batch() {
    let node = TestNode::new().await;
    let kv = |rest: &str| node.obj("default", "kv", rest);
    let put = |key: &str, v: Value| {
        let url = kv(&format!("/kv/{key}"));
        let c = node.client.clone();
        async move { common::status_json(c.put(url).json(&v).send().await.expect("put")).await }
    };
    assert_error(
        &node
            .get(&format!("/v1/ns/default/names/kv/kv/{}", "absent"))
            .await,
        404,
        "key_not_found",
    );
    let (s, v) = put("a", json!({"n": 1, "list": [1, "x", null]})).await;
    assert_eq!(s, 200, "{v}");
    // Keys may hold slashes and any UTF-8 (percent-encoded in the path).
    let (s, _) = put("dir/sub%20key%C3%A9", json!("nested")).await;
    assert_eq!(s, 200);
    let (s, v) = node
        .get("/v1/ns/default/names/kv/kv/dir/sub%20key%C3%A9")
        .await;
    assert_eq!(
        (s, v["key"].as_str(), v["value"].clone()),
        (200, Some("dir/sub keyé"), json!("nested"))
    );
    let (_, v) = node.get("/v1/ns/default/names/kv/kv/a").await;
    assert_eq!(v["value"], json!({"n": 1, "list": [1, "x", null]}));
    // A value is stored as sent, less the whitespace between tokens: it reads back as the same
    // JSON, and malformed JSON is refused.
    let pretty = "{\n  \"text\": \"two  spaces\\n\",\n  \"list\": [ 1 ,\t2 ]\n}\n";
    for (body, status) in [(pretty, 200), ("{\"open\": ", 400), ("1 2", 400)] {
        let r = node
            .client
            .put(kv("/kv/sent"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("put");
        let (s, v) = common::status_json(r).await;
        assert_eq!(s, status, "{body:?}: {v}");
    }
    let (_, v) = node.get("/v1/ns/default/names/kv/kv/sent").await;
    assert_eq!(v["value"], json!({"text": "two  spaces\n", "list": [1, 2]}));
    let r = node
        .client
        .delete(kv("/kv/a"))
        .send()
        .await
        .expect("delete");
    assert_eq!(common::status_json(r).await.1["deleted"], true);
    let r = node
        .client
        .delete(kv("/kv/a"))
        .send()
        .await
        .expect("delete");
    assert_eq!(common::status_json(r).await.1["deleted"], false);

    // Batch: delete, then put, then get (seeing the batch's own writes).
    let (s, v) = node
        .post(
            "/v1/ns/default/names/kv/kv",
            json!({"put": {"p1": 1, "p2": [2]}, "get": ["p1", "p2", "missing"], "delete": ["dir/sub keyé"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["values"], json!({"p1": 1, "p2": [2]}));
    assert_eq!(v["deleted"], 1);
    // An invalid batch writes nothing, not even its valid parts.
    let big = "x".repeat(2 << 20);
    let got = node
        .post(
            "/v1/ns/default/names/kv/kv",
            json!({"put": {"ok": 1, "big": big}}),
        )
        .await;
    assert_error(&got, 413, "limit_exceeded");
    assert!(
        got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("maxValueBytes"))
    );
    assert_error(
        &node.get("/v1/ns/default/names/kv/kv/ok").await,
        404,
        "key_not_found",
    );
    let many: Vec<String> = (0..129).map(|i| format!("k{i}")).collect();
    let got = node
        .post("/v1/ns/default/names/kv/kv", json!({"get": many}))
        .await;
    assert_error(&got, 400, "limit_exceeded");
    assert!(
        got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("maxBatchKeys"))
    );
    assert_error(
        &node
            .post(
                "/v1/ns/default/names/kv/kv",
                json!({"put": {"x": 1}, "delete": ["x"]}),
            )
            .await,
        400,
        "invalid_request",
    );
    assert_error(
        &node.post("/v1/ns/default/names/kv/kv", json!({})).await,
        400,
        "invalid_request",
    );
    let max_batch: serde_json::Map<String, Value> =
        (0..128).map(|i| (format!("m{i:03}"), json!(i))).collect();
    let (s, _) = node
        .post("/v1/ns/default/names/kv/kv", json!({"put": max_batch}))
        .await;
    assert_eq!(s, 200, "128 keys is allowed");

    // Listing: ordered by key, bounded, reversible, paged with a cursor.
    let (_, v) = node.get("/v1/ns/default/names/kv/kv?prefix=p").await;
    assert_eq!(
        v["entries"],
        json!([{"key": "p1", "value": 1}, {"key": "p2", "value": [2]}])
    );
    assert_eq!(v["cursor"], Value::Null);
    let (_, v) = node
        .get("/v1/ns/default/names/kv/kv?start=m010&end=m013")
        .await;
    let keys: Vec<&str> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    assert_eq!(keys, ["m010", "m011", "m012"]);
    let (_, v) = node
        .get("/v1/ns/default/names/kv/kv?prefix=m&reverse=true&limit=2")
        .await;
    let keys: Vec<&str> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    assert_eq!(keys, ["m127", "m126"]);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/ns/default/names/kv/kv?prefix=m&limit=50&cursor={c}"),
            None => "/v1/ns/default/names/kv/kv?prefix=m&limit=50".to_string(),
        };
        let (s, v) = node.get(&q).await;
        assert_eq!(s, 200, "{v}");
        seen.extend(
            v["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .filter_map(|e| e["key"].as_str().map(str::to_string)),
        );
        match v["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..128).map(|i| format!("m{i:03}")).collect();
    assert_eq!(seen, expected, "pages cover every key once, in order");
    assert_error(
        &node.get("/v1/ns/default/names/kv/kv?limit=0").await,
        400,
        "invalid_limit",
    );
    assert_error(
        &node.get("/v1/ns/default/names/kv/kv?limit=x").await,
        400,
        "invalid_query",
    );
    assert_error(
        &node.get("/v1/ns/default/names/kv/kv?reverse=maybe").await,
        400,
        "invalid_query",
    );
    assert_error(
        &node.get("/v1/ns/default/names/kv/kv?bogus=1").await,
        400,
        "invalid_query",
    );
    assert_error(
        &node.get("/v1/ns/default/names/kv/kv?cursor=!!").await,
        400,
        "invalid_cursor",
    );
    let r = node
        .client
        .put(kv("/kv/bad"))
        .body("{oops")
        .send()
        .await
        .expect("put");
    assert_error(&common::status_json(r).await, 400, "invalid_json");
}

#[tokio::test]
async fn limits_are_4xx_errors_that_name_the_limit_and_write_nothing() {
    let node = TestNode::serve(
        "listen: {listen}
dataDir: {data}
namespaces:
  - name: default
  - name: small
    limits: { maxDatabaseBytes: 256KiB, maxRequestBytes: 64KiB }
storage: { logSegmentBytes: 4MiB }
",
    )
    .await;
    let limit_named = |got: &(u16, Value), status: u16, limit: &str| {
        assert_error(got, status, "limit_exceeded");
        let m = got.1["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains(limit), "message should name {limit}: {m}");
    };
    node.sql("lim", "CREATE TABLE t(v)", json!([])).await;
    let key = "k".repeat(2049);
    let r = node
        .client
        .put(node.obj("default", "lim", &format!("/kv/{key}")))
        .json(&json!(1))
        .send()
        .await
        .expect("put");
    limit_named(&common::status_json(r).await, 413, "maxKeyBytes");
    let r = node
        .client
        .put(node.obj("default", "lim", "/kv/v"))
        .json(&json!("x".repeat(2 << 20)))
        .send()
        .await
        .expect("put");
    limit_named(&common::status_json(r).await, 413, "maxValueBytes");
    limit_named(
        &node
            .sql(
                "lim",
                &format!("SELECT '{}'", "x".repeat(100_000)),
                json!([]),
            )
            .await,
        413,
        "maxStatementBytes",
    );
    limit_named(
        &node.sql("lim", "SELECT 1", json!(vec![1; 101])).await,
        400,
        "maxParams",
    );
    limit_named(
        &node
            .sql("lim", "INSERT INTO t VALUES (zeroblob(2000001))", json!([]))
            .await,
        413,
        "maxRowBytes",
    );
    let blob = B64.encode(vec![7u8; 2_100_000]);
    limit_named(
        &node
            .sql("lim", "INSERT INTO t VALUES (?)", json!([{"base64": blob}]))
            .await,
        413,
        "maxRowBytes",
    );
    assert_eq!(count(&node, "lim", "t").await, 0);
    let (s, _) = node
        .sql("lim", "INSERT INTO t VALUES (zeroblob(1999000))", json!([]))
        .await;
    assert_eq!(s, 200, "just under the row limit is fine");

    // Request body size (default 32 MiB; 64 KiB in namespace `small`).
    let huge = format!(
        "{{\"sql\": \"SELECT 1\", \"params\": [\"{}\"]}}",
        "x".repeat(33 << 20)
    );
    let r = node
        .client
        .post(node.obj("default", "lim", "/sql"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("post");
    limit_named(&common::status_json(r).await, 413, "maxRequestBytes");

    // Database size: fill `small` until it refuses; the refused request leaves nothing behind.
    let small = |rest: &str| format!("/v1/ns/small/names/db{rest}");
    let (s, v) = node
        .post(&small("/sql"), json!({"sql": "CREATE TABLE f(v)"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let mut refused = None;
    for _ in 0..40 {
        let got = node
            .post(
                &small("/sql"),
                json!({"sql": "INSERT INTO f VALUES (randomblob(20000))"}),
            )
            .await;
        if got.0 != 200 {
            refused = Some(got);
            break;
        }
    }
    let refused = refused.expect("the database limit is reached");
    limit_named(&refused, 413, "maxDatabaseBytes");
    let (_, before) = node
        .post(&small("/sql"), json!({"sql": "SELECT count(*) FROM f"}))
        .await;
    let got = node
        .post(
            &small("/sql"),
            json!({"sql": "INSERT INTO f VALUES (randomblob(20000))"}),
        )
        .await;
    limit_named(&got, 413, "maxDatabaseBytes");
    let (_, after) = node
        .post(&small("/sql"), json!({"sql": "SELECT count(*) FROM f"}))
        .await;
    assert_eq!(before["rows"], after["rows"]);
    // Deleting data makes room again.
    let (s, _) = node
        .post(&small("/sql"), json!({"sql": "DELETE FROM f"}))
        .await;
    assert_eq!(s, 200);
    let (s, _) = node
        .post(
            &small("/sql"),
            json!({"sql": "INSERT INTO f VALUES (randomblob(20000))"}),
        )
        .await;
    assert_eq!(s, 200);
}

/// Sends one HTTP/1.1 request on `conn` (the whole body, without waiting for an early answer,
/// as most clients do) and reads the response: status, `Connection` header, JSON body.
async fn raw_request(
    conn: &mut tokio::net::TcpStream,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Option<String>, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: colony\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
    };
    let len: usize = header("content-length")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while got.len() < end + len {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    let json = serde_json::from_slice(&got[end..end + len]).unwrap_or(Value::Null);
    Ok((
        status,
        header("connection").map(|v| v.trim().to_string()),
        json,
    ))
}

#[tokio::test]
async fn a_client_that_sends_a_too_large_body_whole_reads_the_413_and_can_go_on() {
    let node = TestNode::serve(
        "listen: {listen}
dataDir: {data}
namespaces:
  - name: small
    limits: { maxRequestBytes: 64KiB }
",
    )
    .await;
    let path = "/v1/ns/small/names/big/sql";
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", node.port))
        .await
        .expect("connect");
    // 4 MiB past the limit: more than the kernel buffers, so the server must read it to answer.
    let big = format!(
        "{{\"sql\": \"SELECT ?\", \"params\": [\"{}\"]}}",
        "x".repeat(4 << 20)
    );
    for round in 0..3 {
        let (status, connection, body) = raw_request(&mut conn, path, big.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("round {round}: the 413 never arrived: {e}"));
        assert_eq!(status, 413, "round {round}: {body}");
        assert_eq!(body["error"]["code"], "limit_exceeded", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("maxRequestBytes"), "{message}");
        assert_eq!(connection, None, "a body read through keeps the connection");
    }
    // The same connection serves the next request, and nothing was written.
    let (status, _, body) = raw_request(
        &mut conn,
        path,
        br#"{"sql": "SELECT count(*) FROM sqlite_master"}"#,
    )
    .await
    .expect("a request after the refused ones");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"], json!([[0]]), "{body}");
}

#[tokio::test]
async fn objects_list_info_and_delete_all() {
    let mut node = TestNode::new().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = node
            .client
            .put(node.obj("default", &format!("o{i}"), "/kv/k"))
            .json(&json!(i))
            .send()
            .await
            .expect("put");
        assert_eq!(r.status().as_u16(), 200);
        let (_, id) = node
            .post("/v1/ns/default/ids", json!({"name": format!("o{i}")}))
            .await;
        ids.push(id["id"].as_str().expect("id").to_string());
    }
    // Objects that were only read hold no data and are not listed.
    assert_error(
        &node.get("/v1/ns/default/names/reader/kv/k").await,
        404,
        "key_not_found",
    );
    let (s, info) = node.get("/v1/ns/default/names/reader").await;
    assert_eq!((s, info["sizeBytes"].as_u64()), (200, Some(0)));
    ids.sort();
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/ns/default/objects?limit=2&cursor={c}"),
            None => "/v1/ns/default/objects?limit=2".to_string(),
        };
        let (s, v) = node.get(&q).await;
        assert_eq!(s, 200, "{v}");
        pages += 1;
        listed.extend(
            v["objects"]
                .as_array()
                .expect("objects")
                .iter()
                .filter_map(|o| o["id"].as_str().map(str::to_string)),
        );
        match v["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!((listed.clone(), pages), (ids.clone(), 3));
    assert_error(
        &node.get("/v1/ns/default/objects?limit=0").await,
        400,
        "invalid_query",
    );
    assert_error(
        &node.get("/v1/ns/default/objects?cursor=zz").await,
        400,
        "invalid_cursor",
    );
    let (_, other) = node.get("/v1/ns/other/objects").await;
    assert_eq!(other["objects"], json!([]));

    // Delete all of one object's data.
    let r = node
        .client
        .delete(node.obj("default", "o2", ""))
        .send()
        .await
        .expect("delete");
    let (s, v) = common::status_json(r).await;
    assert_eq!((s, v["deleted"].as_bool()), (200, Some(true)));
    assert_error(
        &node.get("/v1/ns/default/names/o2/kv/k").await,
        404,
        "key_not_found",
    );
    let (_, info) = node.get("/v1/ns/default/names/o2").await;
    assert_eq!(info["sizeBytes"], 0);
    let (_, v) = node.get("/v1/ns/default/objects?limit=10").await;
    assert_eq!(v["objects"].as_array().map(Vec::len), Some(4));

    // All of it survives kill -9: the deleted object stays deleted.
    node.restart().await;
    let (_, v) = node.get("/v1/ns/default/objects?limit=10").await;
    assert_eq!(v["objects"].as_array().map(Vec::len), Some(4));
    assert_error(
        &node.get("/v1/ns/default/names/o2/kv/k").await,
        404,
        "key_not_found",
    );
    let (_, v) = node.get("/v1/ns/default/names/o3/kv/k").await;
    assert_eq!(v["value"], 3);
    // The object can be used again after deletion.
    let (s, _) = node.sql("o2", "CREATE TABLE again(x)", json!([])).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn unknown_routes_methods_namespaces_and_metrics() {
    let node = TestNode::new().await;
    assert_error(&node.get("/nope").await, 404, "unknown_route");
    assert_error(
        &node.get("/v1/ns/default/names/x/nope").await,
        404,
        "unknown_route",
    );
    let r = node
        .client
        .patch(node.obj("default", "x", "/kv/a"))
        .send()
        .await
        .expect("patch");
    assert_error(&common::status_json(r).await, 405, "method_not_allowed");
    assert_error(
        &node.get("/v1/ns/missing/names/x/kv/a").await,
        404,
        "unknown_namespace",
    );
    assert_error(
        &node.get("/v1/ns/missing/objects").await,
        404,
        "unknown_namespace",
    );
    node.sql("m", "CREATE TABLE t(x)", json!([])).await;
    let text = node
        .client
        .get(node.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for needle in [
        "colony_http_requests_total{route=\"/v1/ns/{ns}/names/{name}/sql\",method=\"POST\",status=\"200\"} 1",
        "colony_http_request_duration_seconds_bucket{",
        "colony_objects_active",
        "colony_objects_resident",
        "colony_database_bytes",
        "colony_log_fsyncs_total",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    assert!(node.metric("colony_log_fsyncs_total").await >= 1.0);
    assert!(node.metric("colony_database_bytes").await > 0.0);
}

/// A second node started on a data directory in use refuses to start and names the holder; the
/// first keeps serving. A node killed with SIGKILL leaves no lock behind.
#[tokio::test]
async fn a_second_node_on_a_data_directory_in_use_refuses_to_start() {
    let mut node = TestNode::new().await;
    let (s, _) = node
        .post(
            "/v1/ns/default/names/locked/kv",
            json!({"put": {"k": "first node"}}),
        )
        .await;
    assert_eq!(s, 200);
    let holder = node.child.as_ref().map(|c| c.id()).expect("running");

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("second.yaml");
    let yaml = common::DEFAULT_YAML
        .replace("{listen}", &format!("127.0.0.1:{}", common::free_port()))
        .replace("{data}", &node.data.display().to_string());
    std::fs::write(&config, yaml).expect("write config");
    let second = tokio::process::Command::new(common::binary())
        .args(["serve", "--config"])
        .arg(&config)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), second)
        .await
        .expect("the second node exits")
        .expect("run colony-node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is in use by another colony-node")
            && stderr.contains(&format!("(pid {holder})")),
        "{stderr}"
    );

    let (s, v) = node.get("/v1/ns/default/names/locked/kv/k").await;
    assert_eq!((s, v["value"].clone()), (200, json!("first node")));
    node.restart().await;
    let (s, v) = node.get("/v1/ns/default/names/locked/kv/k").await;
    assert_eq!((s, v["value"].clone()), (200, json!("first node")));
}
