//! Hybrid logical clock (Kulkarni et al., 2014) driven by wall time passed in.

use serde::{Deserialize, Serialize};

/// A hybrid logical timestamp: wall-clock milliseconds plus a logical counter
/// that orders events within the same millisecond. Ordered lexicographically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HlcTimestamp {
    /// Milliseconds since the Unix epoch, as far as this clock knows.
    pub wall_ms: u64,
    /// Tie-breaker among events with the same `wall_ms`.
    pub logical: u32,
}

impl HlcTimestamp {
    /// The smallest timestamp strictly greater than `self`.
    pub fn successor(self) -> HlcTimestamp {
        match self.logical.checked_add(1) {
            Some(l) => HlcTimestamp {
                wall_ms: self.wall_ms,
                logical: l,
            },
            None => HlcTimestamp {
                wall_ms: self.wall_ms.saturating_add(1),
                logical: 0,
            },
        }
    }
}

/// Errors of the hybrid logical clock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// A remote timestamp is further ahead of local wall time than allowed.
    #[error("remote timestamp {remote_ms} ms is {ahead_ms} ms ahead of local wall time (limit {limit_ms} ms)")]
    TooFarAhead {
        /// The remote wall component.
        remote_ms: u64,
        /// How far ahead of local wall time it is.
        ahead_ms: u64,
        /// The configured bound.
        limit_ms: u64,
    },
}

/// A hybrid logical clock. It never reads a clock itself: every call takes
/// the current wall time, so it runs the same under the simulator's virtual
/// time and the server's system clock.
///
/// ```
/// use lattice_core::clock::{Hlc, HlcTimestamp};
/// let mut hlc = Hlc::new(1_000);
/// let t1 = hlc.now(50);
/// let t2 = hlc.now(40); // the wall clock went backwards: still monotonic
/// assert!(t2 > t1);
/// // A remote timestamp one hour ahead is refused.
/// let far = HlcTimestamp { wall_ms: 50 + 3_600_000, logical: 0 };
/// assert!(hlc.observe(50, far).is_err());
/// ```
#[derive(Clone, Debug)]
pub struct Hlc {
    last: HlcTimestamp,
    max_ahead_ms: u64,
}

impl Hlc {
    /// A clock that refuses remote timestamps more than `max_ahead_ms` ahead
    /// of local wall time.
    pub fn new(max_ahead_ms: u64) -> Self {
        Hlc {
            last: HlcTimestamp::default(),
            max_ahead_ms,
        }
    }

    /// A timestamp for a local event at wall time `wall_ms`, greater than
    /// every timestamp this clock produced or observed before.
    pub fn now(&mut self, wall_ms: u64) -> HlcTimestamp {
        self.last = if wall_ms > self.last.wall_ms {
            HlcTimestamp { wall_ms, logical: 0 }
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Merges a remote timestamp and returns a timestamp greater than both
    /// it and everything before, or an error if `remote` is too far ahead.
    pub fn observe(&mut self, wall_ms: u64, remote: HlcTimestamp) -> Result<HlcTimestamp, ClockError> {
        let ahead = remote.wall_ms.saturating_sub(wall_ms);
        if ahead > self.max_ahead_ms {
            return Err(ClockError::TooFarAhead {
                remote_ms: remote.wall_ms,
                ahead_ms: ahead,
                limit_ms: self.max_ahead_ms,
            });
        }
        let base = self.last.max(remote);
        self.last = if wall_ms > base.wall_ms {
            HlcTimestamp { wall_ms, logical: 0 }
        } else {
            base.successor()
        };
        Ok(self.last)
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> HlcTimestamp {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn strictly_monotonic(steps in proptest::collection::vec((0u64..1000, any::<bool>(), 0u64..1500), 1..100)) {
            let mut hlc = Hlc::new(1000);
            let mut prev = HlcTimestamp::default();
            for (wall, remote, rwall) in steps {
                let t = if remote {
                    let r = HlcTimestamp { wall_ms: rwall, logical: 3 };
                    match hlc.observe(wall, r) {
                        Ok(t) => { prop_assert!(t > r); t }
                        Err(ClockError::TooFarAhead { .. }) => { prop_assert!(rwall > wall + 1000); continue }
                    }
                } else {
                    hlc.now(wall)
                };
                prop_assert!(t > prev);
                prop_assert!(t.wall_ms >= wall);
                prev = t;
            }
        }
    }

    #[test]
    fn bound_is_configurable() {
        let mut hlc = Hlc::new(10);
        let r = HlcTimestamp {
            wall_ms: 111,
            logical: 0,
        };
        assert!(matches!(
            hlc.observe(100, r),
            Err(ClockError::TooFarAhead {
                ahead_ms: 11,
                limit_ms: 10,
                ..
            })
        ));
        assert!(hlc.observe(101, r).is_ok());
    }
}
