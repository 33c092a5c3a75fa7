//! Positions in a slot's replicated log.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A position in a slot's log: the epoch under which it was written, then the sequence number
/// within the slot. Ordered lexicographically, so a record from a newer epoch is always "after"
/// any record of an older one — which is what failover relies on when it picks the most advanced
/// follower.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Lsn {
    pub epoch: u64,
    pub seq: u64,
}

impl Lsn {
    pub const ZERO: Lsn = Lsn { epoch: 0, seq: 0 };

    pub fn new(epoch: u64, seq: u64) -> Self {
        Lsn { epoch, seq }
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.epoch, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_epoch_orders_after_any_older_sequence() {
        assert!(Lsn::new(2, 0) > Lsn::new(1, u64::MAX));
        assert!(Lsn::new(1, 5) > Lsn::new(1, 4));
        assert_eq!(Lsn::new(3, 7).to_string(), "3/7");
    }
}
