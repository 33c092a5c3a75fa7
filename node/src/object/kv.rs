//! Key/value storage inside the object's own SQLite database, so key/value operations and SQL
//! share transactions. Keys are UTF-8 strings ordered bytewise; values are any JSON.

use super::db::Tx;
use crate::config::Limits;
use crate::error::ApiError;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as CURSOR_B64;
use rusqlite::OptionalExtension;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

pub const KV_TABLE: &str = "_colony_kv";
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS _colony_kv (key BLOB PRIMARY KEY NOT NULL, value TEXT NOT NULL) WITHOUT ROWID";
pub const DEFAULT_LIST_LIMIT: usize = 1000;
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Checks a key against the limits.
pub fn check_key(key: &str, limits: &Limits) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_key",
            "keys must not be empty",
        ));
    }
    if key.len() as u64 > limits.max_key_bytes.0 {
        return Err(ApiError::limit(
            413,
            "maxKeyBytes",
            format!(
                "key is {} bytes, more than the {} allowed",
                key.len(),
                limits.max_key_bytes.0
            ),
        ));
    }
    Ok(())
}

/// A value as the client sent it (`sent`, already checked to be JSON), stored without the
/// whitespace between its tokens, and checked with its key against the limits. Parsing values
/// into a tree only to write them out again took over a tenth of a node's CPU with 64 KiB values.
/// Numbers and string escapes stay as sent; reads return them as JSON values all the same.
pub fn encode_sent_value(key: &str, sent: &str, limits: &Limits) -> Result<String, ApiError> {
    check_key(key, limits)?;
    check_value_size(key, compact_json(sent), limits)
}

/// Valid JSON text without the whitespace between tokens (what a compact writer would print,
/// number and escape spellings aside).
pub fn compact_json(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    // Start of the run of bytes not yet copied.
    let mut from = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                // Skip the string: to its closing quote, stepping over escapes.
                i += 1;
                while let Some(at) = memchr::memchr2(b'"', b'\\', &b[i..]) {
                    i += at;
                    if b[i] == b'\\' {
                        i += 2;
                    } else {
                        break;
                    }
                }
                i += 1;
            }
            b' ' | b'\t' | b'\n' | b'\r' => {
                out.push_str(&text[from..i]);
                while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
                    i += 1;
                }
                from = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[from.min(b.len())..]);
    out
}

fn check_value_size(key: &str, text: String, limits: &Limits) -> Result<String, ApiError> {
    let total = (key.len() + text.len()) as u64;
    if total > limits.max_value_bytes.0 {
        return Err(ApiError::limit(
            413,
            "maxValueBytes",
            format!(
                "key {key:?} with its value is {total} bytes, more than the {} allowed",
                limits.max_value_bytes.0
            ),
        ));
    }
    Ok(text)
}

fn ensure_table(tx: &mut Tx<'_>) -> Result<(), ApiError> {
    if !tx.db().has_kv_table()? {
        tx.internal()
            .execute_batch(CREATE_TABLE)
            .map_err(|e| tx.map_error(e))?;
        tx.db().set_kv_table_created();
    }
    Ok(())
}

/// A stored value, answered as stored: checking its text is cheaper than building the value and
/// writing it out again, and every read answers the same spelling (key order, numbers — even
/// those out of a double's range, which a value tree would refuse).
fn stored_value(text: String) -> Result<Box<RawValue>, ApiError> {
    RawValue::from_string(text)
        .map_err(|e| ApiError::internal(format!("stored value is not JSON: {e}")))
}

/// The value under `key`, as stored.
pub fn get(tx: &mut Tx<'_>, key: &str) -> Result<Option<Box<RawValue>>, ApiError> {
    if !tx.db().has_kv_table()? {
        return Ok(None);
    }
    let text: Option<String> = {
        let conn = tx.internal();
        let mut stmt = conn
            .prepare_cached("/*colony*/ SELECT value FROM _colony_kv WHERE key = ?1")
            .map_err(tx_err)?;
        stmt.query_row([key.as_bytes()], |r| r.get(0))
            .optional()
            .map_err(tx_err)?
    };
    text.map(stored_value).transpose()
}

fn tx_err(e: rusqlite::Error) -> ApiError {
    super::db::map_sqlite_error(e, None, false)
}

pub fn put(tx: &mut Tx<'_>, key: &str, encoded: &str) -> Result<(), ApiError> {
    ensure_table(tx)?;
    let result = tx
        .internal()
        .prepare_cached("/*colony*/ INSERT INTO _colony_kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
        .and_then(|mut s| s.execute(rusqlite::params![key.as_bytes(), encoded]));
    result.map(|_| ()).map_err(|e| tx.map_error(e))
}

/// Deletes a key; true if it existed.
pub fn delete(tx: &mut Tx<'_>, key: &str) -> Result<bool, ApiError> {
    if !tx.db().has_kv_table()? {
        return Ok(false);
    }
    let result = tx
        .internal()
        .prepare_cached("/*colony*/ DELETE FROM _colony_kv WHERE key = ?1")
        .and_then(|mut s| s.execute([key.as_bytes()]));
    result.map(|n| n > 0).map_err(|e| tx.map_error(e))
}

/// Options of a list: all bounds are keys; `cursor` continues a previous page.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOptions {
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    #[serde(default)]
    pub reverse: bool,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

pub struct ListPage {
    pub entries: Vec<(String, Box<RawValue>)>,
    /// Present when there are more entries: pass it back as `cursor`.
    pub cursor: Option<String>,
}

/// The smallest byte string greater than every string starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub fn decode_cursor(cursor: &str) -> Result<Vec<u8>, ApiError> {
    CURSOR_B64
        .decode(cursor)
        .map_err(|_| ApiError::bad_request("invalid_cursor", "cursor is not one this API returned"))
}

pub fn list(tx: &mut Tx<'_>, opts: &ListOptions) -> Result<ListPage, ApiError> {
    let limit = opts.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
        ));
    }
    let cursor = opts.cursor.as_deref().map(decode_cursor).transpose()?;
    if !tx.db().has_kv_table()? {
        return Ok(ListPage {
            entries: Vec::new(),
            cursor: None,
        });
    }
    // Lower bound (inclusive) and upper bound (exclusive), as bytes.
    let mut lower: Option<Vec<u8>> = opts.start.as_ref().map(|s| s.as_bytes().to_vec());
    let mut upper: Option<Vec<u8>> = opts.end.as_ref().map(|s| s.as_bytes().to_vec());
    if let Some(prefix) = &opts.prefix {
        let p = prefix.as_bytes().to_vec();
        if lower.as_ref().is_none_or(|l| *l < p) {
            lower = Some(p.clone());
        }
        if let Some(pe) = prefix_end(&p)
            && upper.as_ref().is_none_or(|u| *u > pe)
        {
            upper = Some(pe);
        }
    }
    let (after, before) = match (&cursor, opts.reverse) {
        (Some(c), false) => (Some(c.clone()), None),
        (Some(c), true) => (None, Some(c.clone())),
        (None, _) => (None, None),
    };
    let sql = format!(
        "/*colony*/ SELECT key, value FROM _colony_kv WHERE (?1 IS NULL OR key >= ?1) AND (?2 IS NULL OR key < ?2) \
         AND (?3 IS NULL OR key > ?3) AND (?4 IS NULL OR key < ?4) ORDER BY key {} LIMIT ?5",
        if opts.reverse { "DESC" } else { "ASC" }
    );
    let rows: Vec<(Vec<u8>, String)> = {
        let conn = tx.internal();
        let mut stmt = conn.prepare_cached(&sql).map_err(tx_err)?;
        let mapped = stmt
            .query_map(
                rusqlite::params![lower, upper, after, before, (limit + 1) as i64],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?)),
            )
            .map_err(tx_err)?;
        mapped.collect::<Result<_, _>>().map_err(tx_err)?
    };
    let more = rows.len() > limit;
    let mut entries = Vec::with_capacity(rows.len().min(limit));
    let mut last_key: Option<Vec<u8>> = None;
    for (k, v) in rows.into_iter().take(limit) {
        let key = String::from_utf8(k.clone())
            .map_err(|_| ApiError::internal("stored key is not UTF-8"))?;
        entries.push((key, stored_value(v)?));
        last_key = Some(k);
    }
    Ok(ListPage {
        entries,
        cursor: if more {
            last_key.map(|k| CURSOR_B64.encode(k))
        } else {
            None
        },
    })
}

/// A multi-key request: deletes, then puts, then gets (so gets see the request's own writes).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvBatch {
    #[serde(default)]
    pub get: Vec<String>,
    /// Values as sent: stored like a single put's.
    #[serde(default)]
    pub put: BTreeMap<String, Box<RawValue>>,
    #[serde(default)]
    pub delete: Vec<String>,
}

/// The answer to a key/value batch: the values it read, by key, and how many keys it deleted.
#[derive(serde::Serialize)]
pub struct BatchResult {
    pub values: BTreeMap<String, Box<RawValue>>,
    pub deleted: usize,
}

/// Validates a batch fully before anything is written; returns the encoded puts.
pub fn validate_batch(batch: &KvBatch, limits: &Limits) -> Result<Vec<(String, String)>, ApiError> {
    let keys = batch.get.len() + batch.put.len() + batch.delete.len();
    if keys == 0 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "a key/value batch needs at least one of \"get\", \"put\", \"delete\"",
        ));
    }
    if keys > limits.max_batch_keys {
        return Err(ApiError::limit(
            400,
            "maxBatchKeys",
            format!(
                "the batch names {keys} keys, more than the {} allowed",
                limits.max_batch_keys
            ),
        ));
    }
    for k in batch.get.iter().chain(batch.delete.iter()) {
        check_key(k, limits)?;
    }
    if let Some(k) = batch
        .delete
        .iter()
        .find(|k| batch.put.contains_key(k.as_str()))
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("key {k:?} is both put and deleted in one batch"),
        ));
    }
    batch
        .put
        .iter()
        .map(|(k, v)| Ok((k.clone(), encode_sent_value(k, v.get(), limits)?)))
        .collect()
}

pub fn apply_batch(
    tx: &mut Tx<'_>,
    batch: &KvBatch,
    puts: &[(String, String)],
) -> Result<BatchResult, ApiError> {
    let mut deleted = 0;
    for k in &batch.delete {
        deleted += usize::from(delete(tx, k)?);
    }
    for (k, v) in puts {
        put(tx, k, v)?;
    }
    let mut values = BTreeMap::new();
    for k in &batch.get {
        if let Some(v) = get(tx, k)? {
            values.insert(k.clone(), v);
        }
    }
    Ok(BatchResult { values, deleted })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).expect("JSON")
    }

    #[test]
    fn sent_values_lose_only_the_whitespace_between_tokens() {
        let cases = [
            ("1", "1"),
            ("\"spaced out \\\" quote\"", "\"spaced out \\\" quote\""),
            (
                "{ \"b c\" : [ 1 , 2.5 , null , true ] ,\n\t\"a\": \"x \\\\\" }",
                "{\"b c\":[1,2.5,null,true],\"a\":\"x \\\\\"}",
            ),
            (
                "[\"ends in a backslash \\\\\", \"\\\\\\\"\", \" \", \"\"]",
                "[\"ends in a backslash \\\\\",\"\\\\\\\"\",\" \",\"\"]",
            ),
            (
                "{\"unicode\" : \"d\u{e9}j\u{e0} vu \u{1F980}\", \"n\": {\"d\": [[ ], { }]}}",
                "{\"unicode\":\"d\u{e9}j\u{e0} vu \u{1F980}\",\"n\":{\"d\":[[],{}]}}",
            ),
            ("[\r\n  {\"k\":\"v\"}\r\n]", "[{\"k\":\"v\"}]"),
        ];
        for (sent, want) in cases {
            let compact = compact_json(sent);
            assert_eq!(compact, want, "sent {sent:?}");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&compact).expect("still JSON"),
                serde_json::from_str::<serde_json::Value>(sent).expect("valid JSON"),
                "sent {sent:?}"
            );
        }
    }

    #[test]
    fn a_sent_value_is_measured_compact_against_the_limit() {
        let limits = Limits::default();
        let max = limits.max_value_bytes.0 as usize;
        // Over the limit as sent, under it without the padding.
        let padded = format!("[\"{}\"{}]", "v".repeat(max - 100), " ".repeat(200));
        let stored = encode_sent_value("k", &padded, &limits).expect("fits compact");
        assert_eq!(stored.len(), max - 100 + 4);
        let big = format!("\"{}\"", "v".repeat(max));
        let e = encode_sent_value("k", &big, &limits).expect_err("too big");
        assert!(e.message.contains("maxValueBytes"), "{e}");
        let e = encode_sent_value("", "1", &limits).expect_err("empty key");
        assert_eq!(e.code, "invalid_key");
    }

    #[test]
    fn prefix_end_is_the_next_byte_string() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn batches_are_validated_before_anything_runs() {
        let limits = Limits::default();
        let mut b = KvBatch::default();
        assert!(validate_batch(&b, &limits).is_err());
        b.get = (0..129).map(|i| format!("k{i}")).collect();
        let e = validate_batch(&b, &limits).expect_err("too many keys");
        assert!(e.message.contains("maxBatchKeys"), "{e}");
        b.get = vec!["a".into()];
        b.delete = vec!["x".into()];
        b.put.insert("x".into(), raw("null"));
        assert!(
            validate_batch(&b, &limits)
                .expect_err("conflict")
                .message
                .contains("both put and deleted")
        );
        b.delete.clear();
        b.put
            .insert("big".into(), raw(&format!("{:?}", "v".repeat(3 << 20))));
        assert!(
            validate_batch(&b, &limits)
                .expect_err("value")
                .message
                .contains("maxValueBytes")
        );
    }
}
