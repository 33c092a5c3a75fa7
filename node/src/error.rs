//! Errors as clients see them: an HTTP status and `{"error": {"code": "...", "message": "..."}}`.

use serde_json::json;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// Stable, machine-readable: `limit_exceeded`, `sql_error`, ...
    pub code: &'static str,
    pub message: String,
    /// Close the HTTP connection after answering (the request body was left unread).
    pub close_connection: bool,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            close_connection: false,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(400, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }

    /// A configured limit was exceeded; `limit` names the setting.
    pub fn limit(status: u16, limit: &str, message: impl Into<String>) -> Self {
        Self::new(
            status,
            "limit_exceeded",
            format!("{} (limit: {limit})", message.into()),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(503, code, message)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}
