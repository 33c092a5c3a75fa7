//! JSON ⇄ SQLite values.
//!
//! JSON null, booleans (as 0/1), numbers (integers exact to 64 bits, others as doubles) and strings
//! map directly; blobs travel as `{"base64": "..."}`.

use crate::error::ApiError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rusqlite::types::{Value as SqlValue, ValueRef};
use serde_json::{Map, Number, Value as Json};

/// Converts a bound parameter; `what` names it in errors (e.g. `params[2]`).
pub fn param_from_json(v: &Json, what: &dyn Fn() -> String) -> Result<SqlValue, ApiError> {
    Ok(match v {
        Json::Null => SqlValue::Null,
        Json::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                SqlValue::Integer(i)
            } else if n.is_u64() {
                return Err(ApiError::bad_request(
                    "invalid_param",
                    format!(
                        "{}: integer {n} does not fit in a signed 64-bit integer",
                        what()
                    ),
                ));
            } else {
                SqlValue::Real(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => SqlValue::Text(s.clone()),
        Json::Object(map) => match (map.len(), map.get("base64")) {
            (1, Some(Json::String(b64))) => SqlValue::Blob(BASE64.decode(b64).map_err(|e| {
                ApiError::bad_request(
                    "invalid_param",
                    format!("{}: invalid base64 in blob: {e}", what()),
                )
            })?),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_param",
                    format!(
                        "{}: objects are only allowed as blobs, {{\"base64\": \"...\"}}",
                        what()
                    ),
                ));
            }
        },
        Json::Array(_) => {
            return Err(ApiError::bad_request(
                "invalid_param",
                format!(
                    "{}: arrays cannot be bound; pass one value per parameter",
                    what()
                ),
            ));
        }
    })
}

/// Converts a column value for the response.
pub fn json_from_sql(v: ValueRef<'_>) -> Json {
    match v {
        ValueRef::Null => Json::Null,
        ValueRef::Integer(i) => Json::Number(Number::from(i)),
        ValueRef::Real(f) => Number::from_f64(f).map_or(Json::Null, Json::Number),
        ValueRef::Text(t) => Json::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => {
            let mut m = Map::with_capacity(1);
            m.insert("base64".into(), Json::String(BASE64.encode(b)));
            Json::Object(m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Json) -> Result<SqlValue, ApiError> {
        param_from_json(&v, &|| "params[0]".to_string())
    }

    #[test]
    fn parameters_convert_exactly() {
        assert_eq!(p(json!(null)), Ok(SqlValue::Null));
        assert_eq!(p(json!(true)), Ok(SqlValue::Integer(1)));
        assert_eq!(p(json!(i64::MAX)), Ok(SqlValue::Integer(i64::MAX)));
        assert_eq!(p(json!(i64::MIN)), Ok(SqlValue::Integer(i64::MIN)));
        assert_eq!(p(json!(1.5)), Ok(SqlValue::Real(1.5)));
        assert_eq!(p(json!("x")), Ok(SqlValue::Text("x".into())));
        assert_eq!(p(json!({"base64": "AAE="})), Ok(SqlValue::Blob(vec![0, 1])));
    }

    #[test]
    fn unsupported_parameters_say_why() {
        let e = p(json!(u64::MAX)).expect_err("too big");
        assert!(
            e.message.contains("params[0]") && e.message.contains("64-bit"),
            "{e}"
        );
        assert!(p(json!([1])).expect_err("array").message.contains("arrays"));
        assert!(
            p(json!({"x": 1}))
                .expect_err("object")
                .message
                .contains("blobs")
        );
        assert!(
            p(json!({"base64": "!!"}))
                .expect_err("bad b64")
                .message
                .contains("base64")
        );
    }

    #[test]
    fn columns_convert_exactly() {
        assert_eq!(json_from_sql(ValueRef::Integer(i64::MIN)), json!(i64::MIN));
        assert_eq!(json_from_sql(ValueRef::Real(2.5)), json!(2.5));
        assert_eq!(json_from_sql(ValueRef::Real(f64::INFINITY)), json!(null));
        assert_eq!(json_from_sql(ValueRef::Text(b"hi")), json!("hi"));
        assert_eq!(
            json_from_sql(ValueRef::Blob(&[0, 1])),
            json!({"base64": "AAE="})
        );
    }
}
