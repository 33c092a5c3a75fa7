//! Prometheus metrics of the operator (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabel, Counter>,
    pub failures: Family<FailureLabel, Counter>,
    pub durations: Family<KindLabel, Histogram>,
    pub failovers: Family<OutcomeLabel, Counter>,
    pub handoffs: Family<OutcomeLabel, Counter>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("colony_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        let failures = Family::<FailureLabel, Counter>::default();
        let durations = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let failovers = Family::<OutcomeLabel, Counter>::default();
        let handoffs = Family::<OutcomeLabel, Counter>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciliations that failed",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            durations.clone(),
        );
        registry.register(
            "failovers",
            "Slot failovers attempted, by outcome",
            failovers.clone(),
        );
        registry.register(
            "handoffs",
            "Planned slot hand-offs, by outcome",
            handoffs.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            durations,
            failovers,
            handoffs,
            leader,
        }
    }

    pub fn reconciled(&self, kind: &str, took: Duration, error: Option<&str>) {
        let k = KindLabel { kind: kind.into() };
        self.reconciles.get_or_create(&k).inc();
        self.durations.get_or_create(&k).observe(took.as_secs_f64());
        if let Some(e) = error {
            self.failures
                .get_or_create(&FailureLabel {
                    kind: kind.into(),
                    error: e.into(),
                })
                .inc();
        }
    }

    pub fn failover(&self, outcome: &str, n: u64) {
        self.failovers
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc_by(n);
    }

    pub fn handoff(&self, outcome: &str) {
        self.handoffs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
