//! The output gate of one object.
//!
//! An object commits locally and goes on with its next request while the node log makes the
//! commit durable. Every response is held until everything the object submitted before it is
//! durable — also reads and errors, since they may reveal state that is not durable yet. If a
//! commit fails, every response held behind it fails too, and the object must reset before it
//! serves again.
//!
//! Commits settle out of order in one case: the slot refuses a commit at once (its ownership
//! moved, or its lease lapsed) while earlier ones still wait for their quorum. The refusal must
//! not answer for those earlier commits: they went to the followers and may survive on the next
//! owner. So outcomes apply in ticket order, and each response gets the outcome as of its place.

use crate::error::ApiError;
use crate::storage::log::LogError;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Sends a held response: `Ok` once everything before it is durable, or the failure.
pub type Release = Box<dyn FnOnce(Result<(), ApiError>) + Send>;

#[derive(Default)]
struct GateState {
    submitted: u64,
    /// Every ticket up to this one has settled.
    settled: u64,
    /// Tickets settled while an earlier one still waits; applied in order once it settles.
    early: BTreeMap<u64, Result<u64, ApiError>>,
    /// The first failure among the settled tickets, in ticket order: what responses behind it get.
    failure: Option<ApiError>,
    /// Log position of the newest durable commit.
    last_lsn: u64,
    waiters: VecDeque<(u64, Release)>,
    /// Threads blocked in [`Gate::wait_settled`]. A condvar notify is a system call even when
    /// nobody waits, and `settle` runs for every commit, while blocking waits are rare.
    sleepers: usize,
}

impl GateState {
    /// Settles ticket `settled + 1` and releases the responses held behind it, each with the
    /// outcome as of its own place in the order.
    fn settle_next(
        &mut self,
        result: Result<u64, ApiError>,
        out: &mut Vec<(Release, Result<(), ApiError>)>,
    ) {
        self.settled += 1;
        match result {
            Ok(lsn) => self.last_lsn = self.last_lsn.max(lsn),
            Err(e) => {
                if self.failure.is_none() {
                    self.failure = Some(e);
                }
            }
        }
        while self
            .waiters
            .front()
            .is_some_and(|(t, _)| *t <= self.settled)
        {
            if let Some((_, release)) = self.waiters.pop_front() {
                out.push((release, self.failure.clone().map_or(Ok(()), Err)));
            }
        }
    }
}

#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    settled_cv: Condvar,
}

pub fn api_error_of(e: &LogError) -> ApiError {
    match e {
        LogError::DiskFull(m) => ApiError::new(
            507,
            "storage_full",
            format!("the write could not be made durable: disk full ({m})"),
        ),
        LogError::Io(m) => ApiError::internal(format!("the write could not be made durable: {m}")),
        LogError::Fenced => ApiError::unavailable(
            "object_reset",
            "an earlier write of this object could not be made durable; the object was reset, retry",
        ),
        LogError::Closed => ApiError::unavailable("shutting_down", "the node is shutting down"),
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a commit about to be logged; returns its ticket for [`Gate::settle`].
    pub fn submit(&self) -> u64 {
        let mut s = self.lock();
        s.submitted += 1;
        s.submitted
    }

    /// Called when the log has made commit `ticket` durable or failed it, usually in ticket
    /// order (see the module comment for the exception).
    pub fn settle(&self, ticket: u64, result: Result<u64, ApiError>) {
        let (released, sleepers) = {
            let mut s = self.lock();
            let mut out = Vec::new();
            // The usual case, the next ticket in order, goes without the map.
            if ticket == s.settled + 1 {
                s.settle_next(result, &mut out);
                loop {
                    let next = s.settled + 1;
                    let Some(result) = s.early.remove(&next) else {
                        break;
                    };
                    s.settle_next(result, &mut out);
                }
            } else if ticket > s.settled {
                s.early.insert(ticket, result);
            }
            (out, s.sleepers > 0)
        };
        if sleepers {
            self.settled_cv.notify_all();
        }
        for (release, result) in released {
            release(result);
        }
    }

    /// Runs `release` once everything submitted so far is durable (at once if it already is).
    pub fn hold(&self, release: Release) {
        let mut s = self.lock();
        if s.settled >= s.submitted {
            let result = s.failure.clone().map_or(Ok(()), Err);
            drop(s);
            release(result);
        } else {
            let target = s.submitted;
            s.waiters.push_back((target, release));
        }
    }

    pub fn pending(&self) -> bool {
        let s = self.lock();
        s.settled < s.submitted
    }

    /// Blocks until everything submitted is settled; the newest durable LSN, or the failure.
    pub fn wait_settled(&self) -> Result<u64, ApiError> {
        let mut s = self.lock();
        while s.settled < s.submitted {
            s.sleepers += 1;
            s = self
                .settled_cv
                .wait(s)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            s.sleepers -= 1;
        }
        match &s.failure {
            Some(e) => Err(e.clone()),
            None => Ok(s.last_lsn),
        }
    }

    /// Whether a commit failed, even one whose turn has not come: the database holds a change
    /// that is not in the log, so the object must reset before it executes anything else.
    pub fn failed(&self) -> bool {
        let s = self.lock();
        s.failure.is_some() || s.early.values().any(Result::is_err)
    }

    /// After a reset (which waits until everything submitted has settled): the object serves
    /// again.
    pub fn clear_failure(&self) {
        self.lock().failure = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;

    fn recorder() -> (Release, mpsc::Receiver<Result<(), ApiError>>) {
        let (tx, rx) = mpsc::channel();
        (
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
            rx,
        )
    }

    #[test]
    fn responses_wait_for_everything_submitted_before_them() {
        let gate = Gate::default();
        let (r0, rx0) = recorder();
        gate.hold(r0);
        assert_eq!(
            rx0.try_recv(),
            Ok(Ok(())),
            "nothing pending: released at once"
        );
        let t1 = gate.submit();
        let (r1, rx1) = recorder();
        gate.hold(r1);
        let t2 = gate.submit();
        let (r2, rx2) = recorder();
        gate.hold(r2);
        assert!(rx1.try_recv().is_err() && rx2.try_recv().is_err());
        gate.settle(t1, Ok(100));
        assert_eq!(rx1.try_recv(), Ok(Ok(())));
        assert!(
            rx2.try_recv().is_err(),
            "still waiting for the second commit"
        );
        gate.settle(t2, Ok(200));
        assert_eq!(rx2.try_recv(), Ok(Ok(())));
        assert_eq!(gate.wait_settled(), Ok(200));
    }

    #[test]
    fn a_failed_commit_fails_everything_held_behind_it_until_cleared() {
        let gate = Arc::new(Gate::default());
        let t1 = gate.submit();
        let (r1, rx1) = recorder();
        gate.hold(r1);
        let t2 = gate.submit();
        let (r2, rx2) = recorder();
        gate.hold(r2);
        gate.settle(
            t1,
            Err(api_error_of(&LogError::DiskFull("no space".into()))),
        );
        assert_eq!(
            rx1.try_recv().map(|r| r.map_err(|e| e.status)),
            Ok(Err(507))
        );
        gate.settle(t2, Err(api_error_of(&LogError::Fenced)));
        assert_eq!(
            rx2.try_recv().map(|r| r.map_err(|e| e.status)),
            Ok(Err(507)),
            "the first failure is reported"
        );
        assert!(gate.failed());
        assert!(gate.wait_settled().is_err());
        gate.clear_failure();
        let (r3, rx3) = recorder();
        gate.hold(r3);
        assert_eq!(rx3.try_recv(), Ok(Ok(())));
    }

    type Held = (u64, mpsc::Receiver<Result<(), ApiError>>);

    /// A gate with two commits submitted, each with a response held behind it.
    fn two_held_commits() -> (Gate, [Held; 2]) {
        let gate = Gate::default();
        let held = [(); 2].map(|()| {
            let ticket = gate.submit();
            let (release, rx) = recorder();
            gate.hold(release);
            (ticket, rx)
        });
        (gate, held)
    }

    /// The slot refuses a commit at once (its lease lapsed) while an earlier one waits for its
    /// quorum. The earlier response must get its own outcome: answering it with the refusal
    /// told a client "not applied" about a write the next owner then served.
    #[test]
    fn a_commit_refused_at_once_does_not_answer_for_earlier_ones() {
        let refused = || ApiError::unavailable("not_owner", "lease lapsed");
        let indeterminate = || ApiError::unavailable("indeterminate", "moved before a quorum");

        // The earlier commit reaches its quorum: it succeeds, the refused one fails.
        let (gate, [(t1, rx1), (t2, rx2)]) = two_held_commits();
        gate.settle(t2, Err(refused()));
        assert!(gate.failed(), "the object must reset before executing more");
        assert!(rx1.try_recv().is_err(), "the first commit has not settled");
        assert!(rx2.try_recv().is_err(), "held behind the first commit");
        assert!(gate.pending());
        gate.settle(t1, Ok(10));
        assert_eq!(rx1.try_recv(), Ok(Ok(())));
        assert_eq!(
            rx2.try_recv().map(|r| r.map_err(|e| e.code)),
            Ok(Err("not_owner"))
        );
        assert_eq!(gate.wait_settled().map_err(|e| e.code), Err("not_owner"));

        // The earlier commit's outcome is unknown: both responses say so, not "not applied".
        let (gate, [(t1, rx1), (t2, rx2)]) = two_held_commits();
        gate.settle(t2, Err(refused()));
        gate.settle(t1, Err(indeterminate()));
        for rx in [rx1, rx2] {
            assert_eq!(
                rx.try_recv().map(|r| r.map_err(|e| e.code)),
                Ok(Err("indeterminate"))
            );
        }
        gate.clear_failure();
        assert!(!gate.failed());
        let (r3, rx3) = recorder();
        gate.hold(r3);
        assert_eq!(rx3.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn wait_settled_blocks_until_the_log_answers() {
        let gate = Arc::new(Gate::default());
        let t = gate.submit();
        let g = gate.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(g.wait_settled()));
        // Settle only once the waiter sleeps on the condvar: the wake-up is what is tested.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while gate.lock().sleepers == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never slept"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(rx.try_recv().is_err(), "nothing settled yet");
        gate.settle(t, Ok(7));
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Ok(Ok(7)),
            "the sleeping waiter is woken"
        );
        assert_eq!(gate.lock().sleepers, 0);
    }
}
