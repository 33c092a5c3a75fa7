//! Client SQL: one statement, or a batch run as one transaction.

use super::db::{INTERNAL_MARK, Tx};
use super::values::{json_from_sql, param_from_json};
use crate::config::Limits;
use crate::error::ApiError;
use rusqlite::StatementStatus;
use rusqlite::types::Value as SqlValue;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Statements in one batch at most.
pub const MAX_BATCH_STATEMENTS: usize = 1000;

/// The body of `POST …/sql`: either `sql` (+ `params`) or `batch`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    pub sql: Option<String>,
    pub params: Option<Json>,
    pub batch: Option<Vec<SqlStatementInput>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlStatementInput {
    pub sql: String,
    #[serde(default)]
    pub params: Option<Json>,
}

/// Parameters, positional or named.
#[derive(Debug, Clone, PartialEq)]
pub enum Params {
    Positional(Vec<SqlValue>),
    Named(Vec<(String, SqlValue)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Params,
}

/// A validated SQL request.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlPlan {
    pub statements: Vec<Statement>,
    /// Answer with `{"results": [...]}` rather than one result.
    pub batch: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatementResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Json>>,
    pub rows_read: u64,
    pub rows_written: u64,
}

fn convert_params(params: Option<&Json>, at: &str, limits: &Limits) -> Result<Params, ApiError> {
    match params {
        None | Some(Json::Null) => Ok(Params::Positional(Vec::new())),
        Some(Json::Array(values)) => {
            check_param_count(values.len(), at, limits)?;
            values
                .iter()
                .enumerate()
                .map(|(i, v)| param_from_json(v, &|| format!("{at}params[{i}]")))
                .collect::<Result<_, _>>()
                .map(Params::Positional)
        }
        Some(Json::Object(map)) => {
            check_param_count(map.len(), at, limits)?;
            map.iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        param_from_json(v, &|| format!("{at}params.{k}"))?,
                    ))
                })
                .collect::<Result<_, _>>()
                .map(Params::Named)
        }
        Some(_) => Err(ApiError::bad_request(
            "invalid_params",
            format!("{at}params must be an array (positional) or an object (named)"),
        )),
    }
}

fn check_param_count(n: usize, at: &str, limits: &Limits) -> Result<(), ApiError> {
    if n > limits.max_params {
        return Err(ApiError::limit(
            400,
            "maxParams",
            format!(
                "{at}params has {n} values, more than the {} allowed",
                limits.max_params
            ),
        ));
    }
    Ok(())
}

fn check_statement(sql: &str, at: &str, limits: &Limits) -> Result<(), ApiError> {
    if sql.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("{at}sql is empty"),
        ));
    }
    if sql.len() as u64 > limits.max_statement_bytes.0 {
        return Err(ApiError::limit(
            413,
            "maxStatementBytes",
            format!(
                "{at}sql is {} bytes, more than the {} allowed",
                sql.len(),
                limits.max_statement_bytes.0
            ),
        ));
    }
    Ok(())
}

impl SqlRequest {
    /// Checks shape and limits; nothing runs unless all of it is valid.
    pub fn plan(self, limits: &Limits) -> Result<SqlPlan, ApiError> {
        match (self.sql, self.batch) {
            (Some(sql), None) => {
                check_statement(&sql, "", limits)?;
                let params = convert_params(self.params.as_ref(), "", limits)?;
                Ok(SqlPlan {
                    statements: vec![Statement { sql, params }],
                    batch: false,
                })
            }
            (None, Some(batch)) => {
                if self.params.is_some() {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        "\"params\" belongs inside each batch statement",
                    ));
                }
                if batch.is_empty() || batch.len() > MAX_BATCH_STATEMENTS {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        format!(
                            "a batch holds 1 to {MAX_BATCH_STATEMENTS} statements, not {}",
                            batch.len()
                        ),
                    ));
                }
                let statements = batch
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let at = format!("batch[{i}].");
                        check_statement(&s.sql, &at, limits)?;
                        let params = convert_params(s.params.as_ref(), &at, limits)?;
                        Ok(Statement { sql: s.sql, params })
                    })
                    .collect::<Result<_, ApiError>>()?;
                Ok(SqlPlan {
                    statements,
                    batch: true,
                })
            }
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "invalid_request",
                "give either \"sql\" or \"batch\", not both",
            )),
            (None, None) => Err(ApiError::bad_request(
                "invalid_request",
                "the body needs \"sql\" (one statement) or \"batch\" (a list of statements)",
            )),
        }
    }
}

fn with_position(mut e: ApiError, index: Option<usize>) -> ApiError {
    if let Some(i) = index {
        e.message = format!("batch[{i}]: {}", e.message);
    }
    e
}

/// Runs one statement within the current transaction.
pub fn execute(
    tx: &mut Tx<'_>,
    statement: &Statement,
    index: Option<usize>,
) -> Result<StatementResult, ApiError> {
    let conn = tx.user();
    let internal_looking = statement.sql.trim_start().starts_with(INTERNAL_MARK);
    let (mut fresh, mut cached);
    let stmt: &mut rusqlite::Statement<'_> = if internal_looking {
        match conn.prepare(&statement.sql) {
            Ok(s) => {
                fresh = s;
                &mut fresh
            }
            Err(e) => return Err(with_position(tx.map_error(e), index)),
        }
    } else {
        match conn.prepare_cached(&statement.sql) {
            Ok(s) => {
                cached = s;
                &mut cached
            }
            Err(e) => return Err(with_position(tx.map_error(e), index)),
        }
    };
    let bind = |stmt: &mut rusqlite::Statement<'_>| -> Result<(), ApiError> {
        match &statement.params {
            Params::Positional(values) => {
                let expected = stmt.parameter_count();
                if values.len() != expected {
                    return Err(ApiError::bad_request(
                        "invalid_params",
                        format!(
                            "the statement has {expected} parameters but {} were given",
                            values.len()
                        ),
                    ));
                }
                for (i, v) in values.iter().enumerate() {
                    stmt.raw_bind_parameter(i + 1, v)
                        .map_err(|e| tx.map_error(e))?;
                }
            }
            Params::Named(values) => {
                for (name, v) in values {
                    let index = ["", ":", "@", "$"].iter().find_map(|prefix| {
                        stmt.parameter_index(&format!("{prefix}{name}"))
                            .ok()
                            .flatten()
                    });
                    let Some(index) = index else {
                        return Err(ApiError::bad_request(
                            "invalid_params",
                            format!("the statement has no parameter named {name:?}"),
                        ));
                    };
                    stmt.raw_bind_parameter(index, v)
                        .map_err(|e| tx.map_error(e))?;
                }
            }
        }
        Ok(())
    };
    stmt.clear_bindings();
    bind(stmt).map_err(|e| with_position(e, index))?;
    let columns: Vec<String> = stmt.column_names().map(str::to_string).collect();
    let ncols = columns.len();
    let readonly = stmt.readonly();
    let scans_before = stmt.get_status(StatementStatus::FullscanStep);
    let changes_before = conn.total_changes();
    let mut rows_out: Vec<Vec<Json>> = Vec::new();
    let step_result: Result<(), rusqlite::Error> = (|| {
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next()? {
            let mut out = Vec::with_capacity(ncols);
            for i in 0..ncols {
                out.push(json_from_sql(row.get_ref(i)?));
            }
            rows_out.push(out);
        }
        Ok(())
    })();
    if let Err(e) = step_result {
        return Err(with_position(tx.map_error(e), index));
    }
    // A full scan of n rows steps forward n - 1 times; rows returned count as read too.
    let steps = (stmt.get_status(StatementStatus::FullscanStep) - scans_before).max(0) as u64;
    let scanned = if steps > 0 { steps + 1 } else { 0 };
    let rows_written = if readonly {
        0
    } else {
        conn.total_changes() - changes_before
    };
    Ok(StatementResult {
        rows_read: scanned.max(rows_out.len() as u64),
        rows_written,
        columns,
        rows: rows_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(v: Json) -> Result<SqlPlan, ApiError> {
        serde_json::from_value::<SqlRequest>(v)
            .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?
            .plan(&Limits::default())
    }

    #[test]
    fn plans_single_statements_and_batches() {
        let p = plan(json!({"sql": "SELECT ?", "params": [1]})).expect("valid");
        assert!(!p.batch);
        assert_eq!(
            p.statements[0].params,
            Params::Positional(vec![SqlValue::Integer(1)])
        );
        let p = plan(
            json!({"batch": [{"sql": "SELECT 1"}, {"sql": "SELECT :a", "params": {"a": "x"}}]}),
        )
        .expect("valid");
        assert!(p.batch);
        assert_eq!(
            p.statements[1].params,
            Params::Named(vec![("a".into(), SqlValue::Text("x".into()))])
        );
    }

    #[test]
    fn refuses_malformed_requests_with_reasons() {
        let msg = |v: Json| plan(v).expect_err("invalid").message;
        assert!(msg(json!({})).contains("needs \"sql\""));
        assert!(msg(json!({"sql": "x", "batch": []})).contains("not both"));
        assert!(msg(json!({"batch": []})).contains("1 to 1000"));
        assert!(msg(json!({"sql": "  "})).contains("empty"));
        assert!(msg(json!({"sql": "SELECT 1", "params": 3})).contains("array"));
        assert!(msg(json!({"sql": "x".repeat(100_001)})).contains("maxStatementBytes"));
        assert!(msg(json!({"sql": "SELECT 1", "params": vec![1; 101]})).contains("maxParams"));
        assert!(
            msg(json!({"batch": [{"sql": "SELECT 1", "params": [[1]]}]}))
                .contains("batch[0].params[0]")
        );
    }
}
