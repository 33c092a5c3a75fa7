//! Typed errors of the reconcile paths.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serialize {what}: {message}")]
    Serialize { what: &'static str, message: String },
    #[error("the placement map in ConfigMap {name} cannot be read: {message}")]
    BadPlacementMap { name: String, message: String },
    #[error("{kind} {name} has no namespace")]
    NoNamespace { kind: &'static str, name: String },
    /// Someone else changed the object since it was read (optimistic concurrency): nothing was
    /// written; the next pass starts from a fresh read.
    #[error("{what} changed since it was read; retrying from a fresh read")]
    Conflict { what: String },
    #[error(
        "Secret {namespace}/{name} holds no usable admin token (key `token`, 32 characters or more): {hint}"
    )]
    AdminToken {
        namespace: String,
        name: String,
        hint: &'static str,
    },
    #[error(transparent)]
    NotLeader(#[from] crate::leader::NotLeader),
    #[error("{what} did not finish within {limit:?}; retrying")]
    Timeout {
        what: &'static str,
        limit: std::time::Duration,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A short CamelCase label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::Serialize { .. } => "Serialize",
            Error::BadPlacementMap { .. } => "BadPlacementMap",
            Error::NoNamespace { .. } => "NoNamespace",
            Error::Conflict { .. } => "Conflict",
            Error::AdminToken { .. } => "AdminToken",
            Error::NotLeader(_) => "NotLeader",
            Error::Timeout { .. } => "Timeout",
            Error::Invalid(_) => "Invalid",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn ser<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Serialize {
        what,
        message: e.to_string(),
    }
}
