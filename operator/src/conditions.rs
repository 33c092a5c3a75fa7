//! Status conditions: keyed by type, transition times kept while the status stays the same.

use crate::crd::Condition;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// A condition as a reconciler decides it, before transition times are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Desired {
            type_,
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

fn status_word(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// The new condition list: one entry per desired type, in the order given. A condition whose
/// status did not change keeps its `lastTransitionTime`; one that changed (or is new) gets `now`.
/// Conditions of other types (set by someone else) are kept unchanged after ours.
pub fn merge(
    previous: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = desired
        .iter()
        .map(|d| {
            let status = status_word(d.status).to_string();
            let since = previous
                .iter()
                .find(|p| p.type_ == d.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.to_string());
            Condition {
                type_: d.type_.to_string(),
                status,
                reason: d.reason.clone(),
                message: d.message.clone(),
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect();
    for p in previous {
        if !desired.iter().any(|d| d.type_ == p.type_) {
            out.push(p.clone());
        }
    }
    out
}

/// The current time in the RFC 3339 form conditions use (second precision).
pub fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs = now.as_second();
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .unwrap_or(now)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(t: &str, s: &str, at: &str) -> Condition {
        Condition {
            type_: t.into(),
            status: s.into(),
            reason: "R".into(),
            message: "m".into(),
            last_transition_time: at.into(),
            observed_generation: Some(1),
        }
    }

    #[test]
    fn transition_time_kept_while_status_unchanged_and_set_on_change() {
        let prev = vec![
            cond("Ready", "False", "2026-01-01T00:00:00Z"),
            cond("Progressing", "True", "2026-01-01T00:00:00Z"),
            cond("ArchiveHealthy", "True", "2025-12-31T00:00:00Z"),
        ];
        let out = merge(
            &prev,
            &[
                Desired::new(READY, true, "AllNodesReady", "3 of 3 nodes ready"),
                Desired::new(PROGRESSING, true, "Scaling", "adding a node"),
                Desired::new(DEGRADED, false, "AsExpected", ""),
            ],
            Some(7),
            "2026-02-02T00:00:00Z",
        );
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].status, "True");
        assert_eq!(out[0].last_transition_time, "2026-02-02T00:00:00Z");
        assert_eq!(out[1].last_transition_time, "2026-01-01T00:00:00Z");
        assert_eq!(out[1].reason, "Scaling");
        assert_eq!(out[2].type_, "Degraded");
        assert_eq!(out[2].last_transition_time, "2026-02-02T00:00:00Z");
        assert_eq!(out[3].type_, "ArchiveHealthy", "foreign condition kept");
        assert!(out[..3].iter().all(|c| c.observed_generation == Some(7)));
        assert!(now_rfc3339().ends_with('Z'));
    }
}
