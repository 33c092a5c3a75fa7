//! Leader election on a `coordination.k8s.io/v1` Lease: only the holder acts.
//!
//! - Another holder's Lease is taken over only after its `renewTime` was observed unchanged for
//!   *that Lease's* `leaseDurationSeconds` on this process's own clock.
//! - The holder renews every `retry` period, each attempt cut off after at most `retry`; a
//!   successful renewal sent at `t` lets it act until `t + renew_deadline`, strictly less than the
//!   lease duration, so it stops acting before anyone else may take over ([`Leadership`]).
//! - Every write of the Lease is a replace carrying the `resourceVersion` read: two candidates
//!   can never both believe they wrote it.
//! - On shutdown the holder releases the Lease (empty holder), so a successor need not wait.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The timing of the election, derived from the lease duration like client-go's defaults
/// (15 s lease → 10 s renew deadline, 2.5 s retry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub lease: Duration,
    /// How long after sending a successful renewal the holder may still act.
    pub renew_deadline: Duration,
    /// How often the holder renews (and candidates look), and the limit of one attempt.
    pub retry: Duration,
}

impl Timing {
    pub fn from_lease(lease: Duration) -> Self {
        Timing {
            lease,
            renew_deadline: lease * 2 / 3,
            retry: (lease / 6).max(Duration::from_millis(100)),
        }
    }
}

/// What to do with the leader Lease, given what it says now (pure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// The holder stopped renewing (or released it): take it over.
    TakeOver,
    /// Someone else holds it and renews it: wait.
    Wait,
}

/// Tracks the current holder's renewals as this process sees them.
#[derive(Clone, Debug, Default)]
pub struct Observer {
    last: Option<(String, Instant)>,
}

impl Observer {
    /// `duration` is used only when the Lease does not state its own.
    pub fn decide(
        &mut self,
        lease: Option<&LeaseSpec>,
        me: &str,
        duration: Duration,
        now: Instant,
    ) -> Decision {
        let Some(spec) = lease else {
            return Decision::Create;
        };
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder == me {
            return Decision::Renew;
        }
        if holder.is_empty() {
            return Decision::TakeOver;
        }
        let theirs = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(duration, Duration::from_secs);
        let key = format!(
            "{holder}|{}",
            spec.renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default()
        );
        match &self.last {
            Some((k, since)) if *k == key => {
                if now.duration_since(*since) >= theirs {
                    Decision::TakeOver
                } else {
                    Decision::Wait
                }
            }
            _ => {
                self.last = Some((key, now));
                Decision::Wait
            }
        }
    }
}

/// Until when this process may act as the leader; shared by everything that acts.
#[derive(Clone, Debug)]
pub struct Leadership {
    until: Arc<watch::Sender<Option<Instant>>>,
}

/// The action was not done, or was cut off: this process cannot prove it leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not the leader (or leadership could not be proven in time)")]
pub struct NotLeader;

impl Default for Leadership {
    fn default() -> Self {
        Self::new()
    }
}

impl Leadership {
    /// Not leading until [`Leadership::extend`] is called.
    pub fn new() -> Self {
        Leadership {
            until: Arc::new(watch::channel(None).0),
        }
    }

    /// Leading for a very long time (tests, and tools that run without election).
    pub fn unconditional() -> Self {
        let l = Self::new();
        l.extend(Instant::now() + Duration::from_secs(100 * 365 * 86400));
        l
    }

    /// Leading until `until` (never shortened by this call).
    pub fn extend(&self, until: Instant) {
        self.until.send_if_modified(|cur| {
            if cur.is_none_or(|c| until > c) {
                *cur = Some(until);
                true
            } else {
                false
            }
        });
    }

    /// Stops leading now.
    pub fn revoke(&self) {
        self.until.send_replace(None);
    }

    pub fn deadline(&self) -> Option<Instant> {
        *self.until.borrow()
    }

    pub fn is_leading(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() < d)
    }

    /// Resolves once leadership can no longer be proven.
    pub async fn lost(&self) {
        let mut rx = self.until.subscribe();
        loop {
            let deadline = *rx.borrow_and_update();
            match deadline {
                Some(d) if Instant::now() < d => {
                    tokio::select! {
                        () = tokio::time::sleep_until(d) => {}
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Runs `action` only while leading: refused when not leading, and cut off (dropped) the
    /// moment leadership can no longer be proven.
    pub async fn run<F: Future>(&self, action: F) -> Result<F::Output, NotLeader> {
        if !self.is_leading() {
            return Err(NotLeader);
        }
        tokio::select! {
            out = action => Ok(out),
            () = self.lost() => Err(NotLeader),
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observer: Observer,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        Elector {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observer: Observer::default(),
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: whether this process holds the Lease afterwards. Conflicts (someone else wrote
    /// first) count as not holding it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let decision = self.observer.decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            self.timing.lease,
            Instant::now(),
        );
        let result = match (decision, current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Decision::Renew, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                lease.spec = Some(self.spec(old.lease_transitions.unwrap_or(0), old.acquire_time));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            (Decision::TakeOver, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                lease.spec = Some(self.spec(old.lease_transitions.unwrap_or(0) + 1, None));
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One bounded attempt: `Some(true)` renewed or acquired (leading until the returned
    /// deadline), `Some(false)` someone else holds it, `None` no answer in time or an error.
    pub async fn attempt(&mut self) -> (Option<bool>, Instant) {
        let sent = Instant::now();
        let deadline = sent + self.timing.renew_deadline;
        let limit = self.timing.retry;
        match tokio::time::timeout(limit, self.try_acquire_or_renew()).await {
            Ok(Ok(held)) => (Some(held), deadline),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election round failed");
                (None, deadline)
            }
            Err(_) => {
                tracing::warn!(limit = ?limit, "leader election round timed out");
                (None, deadline)
            }
        }
    }

    /// Waits until this process holds the Lease; then `leadership` is extended.
    pub async fn acquire(&mut self, leadership: &Leadership) {
        loop {
            if let (Some(true), until) = self.attempt().await {
                leadership.extend(until);
                return;
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews every `retry` until the Lease is lost (someone else holds it) or cannot be renewed
    /// before the renew deadline; then revokes `leadership` and returns.
    pub async fn keep(&mut self, leadership: &Leadership) {
        loop {
            tokio::time::sleep(self.timing.retry).await;
            match self.attempt().await {
                (Some(true), until) => leadership.extend(until),
                (Some(false), _) => {
                    tracing::error!("another replica holds the leader Lease");
                    break;
                }
                (None, _) => {
                    if !leadership.is_leading() {
                        tracing::error!("could not renew the leader Lease before its deadline");
                        break;
                    }
                }
            }
        }
        leadership.revoke();
    }

    /// Gives the Lease up (holder emptied) if this process holds it, so that a successor takes
    /// over at once. Bounded by one retry period.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let release = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            match self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        };
        match tokio::time::timeout(self.timing.retry.max(Duration::from_secs(1)), release).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("could not release the leader Lease in time");
                Ok(())
            }
        }
    }
}

/// This replica's identity: the pod name when known, else the host name plus a random suffix,
/// never a constant two replicas could share.
pub fn identity(pod_name: Option<String>) -> String {
    if let Some(name) = pod_name.filter(|n| !n.trim().is_empty()) {
        return name;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "colony-operator".to_string());
    let random = colony_node::id::IdKeys::generate_key();
    format!("{host}-{}", hex::encode(&random[..6]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renew: i64, duration: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(
                Timestamp::from_second(renew).unwrap_or(Timestamp::UNIX_EPOCH),
            )),
            lease_duration_seconds: duration,
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn takes_over_only_after_the_holder_stops_renewing_for_its_own_duration() {
        let d = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut o = Observer::default();
        assert_eq!(o.decide(None, "me", d, t0), Decision::Create);
        assert_eq!(
            o.decide(Some(&spec("me", 1, None)), "me", d, t0),
            Decision::Renew
        );
        assert_eq!(
            o.decide(Some(&spec("other", 1, None)), "me", d, t0),
            Decision::Wait
        );
        let t1 = t0 + Duration::from_secs(10);
        // The holder renewed: the clock restarts.
        assert_eq!(
            o.decide(Some(&spec("other", 2, None)), "me", d, t1),
            Decision::Wait
        );
        assert_eq!(
            o.decide(
                Some(&spec("other", 2, None)),
                "me",
                d,
                t1 + Duration::from_secs(14)
            ),
            Decision::Wait
        );
        assert_eq!(
            o.decide(
                Some(&spec("other", 2, None)),
                "me",
                d,
                t1 + Duration::from_secs(15)
            ),
            Decision::TakeOver
        );
        assert_eq!(
            o.decide(Some(&spec("", 2, None)), "me", d, t0),
            Decision::TakeOver,
            "a released Lease is free"
        );
        // The holder states a longer duration than ours: that one counts.
        let mut o = Observer::default();
        let long = spec("other", 3, Some(40));
        assert_eq!(o.decide(Some(&long), "me", d, t0), Decision::Wait);
        assert_eq!(
            o.decide(Some(&long), "me", d, t0 + Duration::from_secs(39)),
            Decision::Wait
        );
        assert_eq!(
            o.decide(Some(&long), "me", d, t0 + Duration::from_secs(40)),
            Decision::TakeOver
        );
    }

    #[test]
    fn the_holder_stops_acting_before_anyone_may_take_over() {
        for secs in [2, 15, 60] {
            let t = Timing::from_lease(Duration::from_secs(secs));
            assert!(t.renew_deadline < t.lease);
            assert!(t.retry < t.renew_deadline);
        }
        assert_ne!(identity(None), identity(None), "no shared default identity");
        assert_eq!(
            identity(Some("colony-operator-7d9f".into())),
            "colony-operator-7d9f"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn actions_are_refused_without_leadership_and_cut_off_when_it_lapses() {
        let l = Leadership::new();
        assert_eq!(l.run(async { 1 }).await, Err(NotLeader));
        l.extend(Instant::now() + Duration::from_secs(10));
        assert_eq!(l.run(async { 2 }).await, Ok(2));
        let slow = l.run(tokio::time::sleep(Duration::from_secs(30)));
        let started = Instant::now();
        assert_eq!(slow.await, Err(NotLeader));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Renewals extend a running action's allowance.
        let l = Leadership::new();
        l.extend(Instant::now() + Duration::from_secs(10));
        let renewer = {
            let l = l.clone();
            tokio::spawn(async move {
                for _ in 0..4 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    l.extend(Instant::now() + Duration::from_secs(10));
                }
            })
        };
        assert_eq!(
            l.run(tokio::time::sleep(Duration::from_secs(25))).await,
            Ok(())
        );
        renewer.await.expect("renewer");
        l.revoke();
        assert!(!l.is_leading());
    }
}
