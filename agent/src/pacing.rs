//! The pace of a node's assigns, to the account and not only to the node: every Assign and
//! Unassign of the account draws from one bucket (refill 5 calls/s, shared with the VPC CNI). A
//! node whose calls are throttled halves its rate of calls per ENI (doubles the interval, up to
//! twice the base); each call that goes through adds back a tenth of the base rate (additive
//! increase, multiplicative decrease, as TCP). Nodes that all see throttling in a rollout spend
//! fewer of the account's tokens together instead of each spending its retries on an empty
//! bucket. While slowed, each gap is jittered (±20 %) so that nodes paced alike do not call in
//! lockstep.
//!
//! Why no slower than twice the base: in the model of a 1,000-pod rollout on 50 nodes
//! (bench/pace_model.py, docs/scale.md "Pacing") four times the base saved no more throttled
//! calls and made the tail after the last pod 7 s longer. Releases are not paced this way: the
//! address is already unusable, and holding it only delays the IPAM's reuse; they go at half the
//! base interval, so that a mass deletion (pods' namespaces go over a second or two) is off the
//! ENI in two calls without waiting out a rollout's pace.

use std::time::Duration;

/// The slowest pace, in base intervals (of at least 1 s).
const SLOWEST_IN_BASES: u32 = 2;

/// The rate of calls per ENI, between the base (`--batch-interval`) and half of it.
#[derive(Debug, Clone)]
pub struct Pacing {
    base: Duration,
    /// Calls per second per ENI now.
    rate: f64,
}

// === impl Pacing ===

impl Pacing {
    /// The base pace: one call per ENI every `base` (zero: group commit alone, slowed to one
    /// call per ENI every one or two seconds under throttling).
    pub fn new(base: Duration) -> Self {
        Self {
            base,
            rate: Self::rate_of(base),
        }
    }

    fn rate_of(interval: Duration) -> f64 {
        1.0 / interval.as_secs_f64().max(0.001)
    }

    /// EC2 throttled a call: half the rate, down to half the base (of at least 1 s).
    pub fn throttled(&mut self) {
        let floor = self.base.max(Duration::from_secs(1));
        let slowest = Self::rate_of(floor * SLOWEST_IN_BASES);
        let start = self.rate.min(Self::rate_of(floor));
        self.rate = (start / 2.0).max(slowest);
    }

    /// A call went through: a tenth of the base rate back, up to the base.
    pub fn succeeded(&mut self) {
        let base = Self::rate_of(self.base);
        self.rate = (self.rate + base / 10.0).min(base);
    }

    /// The interval between two assign calls for one ENI now.
    pub fn interval(&self) -> Duration {
        if self.rate >= Self::rate_of(self.base) {
            return self.base;
        }
        Duration::from_secs_f64(1.0 / self.rate)
    }

    /// The base interval (`--batch-interval`).
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The interval between two calls of releases only: half the base, whatever the pace.
    pub fn release_interval(&self) -> Duration {
        self.base / 2
    }

    /// `interval` jittered by `unit` (in [0, 1)): ±20 %.
    pub fn jittered(interval: Duration, unit: f64) -> Duration {
        interval.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_halves_the_rate_and_successes_win_it_back_a_tenth_at_a_time() {
        let mut p = Pacing::new(Duration::from_secs(3));
        assert_eq!(p.interval(), Duration::from_secs(3));
        p.throttled();
        assert_eq!(p.interval(), Duration::from_secs(6));
        for _ in 0..100 {
            p.throttled();
        }
        assert_eq!(
            p.interval(),
            Duration::from_secs(6),
            "never slower than twice the base"
        );
        let mut successes = 0;
        while p.interval() > Duration::from_secs(3) {
            p.succeeded();
            successes += 1;
        }
        assert_eq!(
            successes, 5,
            "back to the base in steps of a tenth (additive)"
        );
        assert_eq!(p.base(), Duration::from_secs(3));
        assert_eq!(p.release_interval(), Duration::from_millis(1500));
    }

    #[test]
    fn group_commit_alone_is_slowed_from_one_call_a_second() {
        let mut p = Pacing::new(Duration::ZERO);
        assert_eq!(p.interval(), Duration::ZERO);
        p.throttled();
        assert_eq!(p.interval(), Duration::from_secs(2));
        for _ in 0..20 {
            p.succeeded();
        }
        assert_eq!(p.interval(), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let i = Duration::from_secs(10);
        assert_eq!(Pacing::jittered(i, 0.0), Duration::from_secs(8));
        assert_eq!(Pacing::jittered(i, 0.5), Duration::from_secs(10));
        assert!(Pacing::jittered(i, 0.999) < Duration::from_secs(12));
    }
}
