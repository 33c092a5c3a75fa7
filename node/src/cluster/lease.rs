//! The node's own heartbeat lease.
//!
//! A node serves (and acknowledges writes) only while its lease is valid: until
//! `sent + duration - margin`, where `sent` is when it sent its last renewal that the control plane
//! accepted. The control plane fails a node over only after it has *observed* no renewal for
//! `duration` on its own clock — which starts after `sent` — so a node that is cut off, paused or
//! overloaded stops by itself before anybody else takes its slots. No clocks are compared across
//! machines; only rates matter, and the margin covers them.
//!
//! A renewal also tells the node the newest placement version; the lease counts as valid again
//! only once that placement has been applied (a node resumed after SIGSTOP must first learn that
//! its slots moved).

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Lease {
    duration: Duration,
    margin: Duration,
    state: Mutex<LeaseState>,
}

struct LeaseState {
    valid_until: Option<Instant>,
    /// Placement version the control plane had at the last renewal.
    required_version: u64,
    applied_version: u64,
    /// Standalone nodes have no control plane: always valid.
    always: bool,
}

impl Lease {
    pub fn new(duration: Duration) -> Self {
        Lease {
            duration,
            margin: (duration / 5).max(Duration::from_millis(100)),
            state: Mutex::new(LeaseState {
                valid_until: None,
                required_version: 0,
                applied_version: 0,
                always: false,
            }),
        }
    }

    pub fn always_valid() -> Self {
        let l = Lease::new(Duration::from_secs(3600));
        l.lock().always = true;
        l
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// A renewal sent at `sent` was accepted; the control plane's placement is at `version`.
    pub fn renewed(&self, sent: Instant, version: u64) {
        let mut s = self.lock();
        let until = sent + self.duration.saturating_sub(self.margin);
        if s.valid_until.is_none_or(|v| until > v) {
            s.valid_until = Some(until);
        }
        s.required_version = s.required_version.max(version);
    }

    pub fn placement_applied(&self, version: u64) {
        let mut s = self.lock();
        s.applied_version = s.applied_version.max(version);
    }

    pub fn valid(&self) -> bool {
        let s = self.lock();
        s.always
            || (s.valid_until.is_some_and(|v| Instant::now() < v)
                && s.applied_version >= s.required_version)
    }

    /// Renewed, but the control plane's newest placement is not applied yet: valid again in a
    /// moment, once this node has applied it.
    pub fn catching_up_with_placement(&self) -> bool {
        let s = self.lock();
        !s.always
            && s.valid_until.is_some_and(|v| Instant::now() < v)
            && s.applied_version < s.required_version
    }

    /// How long until the lease lapses (zero if it has).
    pub fn remaining(&self) -> Duration {
        let s = self.lock();
        if s.always {
            return self.duration;
        }
        s.valid_until.map_or(Duration::ZERO, |v| {
            v.saturating_duration_since(Instant::now())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_only_between_renewal_and_its_deadline_and_after_catching_up_with_placement() {
        let lease = Lease::new(Duration::from_millis(500));
        assert!(!lease.valid(), "never renewed");
        lease.renewed(Instant::now(), 3);
        assert!(!lease.valid(), "placement version 3 not applied yet");
        lease.placement_applied(3);
        assert!(lease.valid());
        // Margin: a renewal sent long ago expires before `duration` has passed since sending.
        let old = Lease::new(Duration::from_millis(500));
        old.renewed(Instant::now() - Duration::from_millis(420), 0);
        assert!(!old.valid(), "the margin (100 ms) ends it early");
        std::thread::sleep(Duration::from_millis(450));
        assert!(!lease.valid(), "lapsed without renewal");
        assert!(Lease::always_valid().valid());
    }
}
