//! Per-address backoff for addresses EC2 rejected (outside the subnet, over the ENI's limit):
//! tried again after [`FIRST_RETRY`], doubling to [`MAX_RETRY`], not at every resync for ever
//! and not holding back the other addresses of their ENI.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The first wait after a rejection.
pub const FIRST_RETRY: Duration = Duration::from_secs(10);
/// The longest wait.
pub const MAX_RETRY: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone)]
struct Retry {
    attempts: u32,
    until: Instant,
    reason: String,
}

/// Rejected addresses (or prefixes, in prefix mode) and when each may be tried again.
#[derive(Debug)]
pub struct RetryBook<K = IpAddr> {
    by_address: BTreeMap<K, Retry>,
}

impl<K> Default for RetryBook<K> {
    fn default() -> Self {
        Self {
            by_address: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Copy> RetryBook<K> {
    /// EC2 rejected `address` with `reason`.
    pub fn rejected(&mut self, address: K, reason: String, now: Instant) {
        let attempts = self.by_address.get(&address).map_or(0, |r| r.attempts) + 1;
        let wait = FIRST_RETRY
            .saturating_mul(2u32.saturating_pow(attempts - 1))
            .min(MAX_RETRY);
        self.by_address.insert(
            address,
            Retry {
                attempts,
                until: now + wait,
                reason,
            },
        );
    }

    /// Whether `address` may be tried now.
    pub fn may_try(&self, address: K, now: Instant) -> bool {
        self.by_address.get(&address).is_none_or(|r| r.until <= now)
    }

    /// The last rejection's reason.
    pub fn reason(&self, address: K) -> Option<String> {
        self.by_address.get(&address).map(|r| r.reason.clone())
    }

    /// Accepted, or no longer wanted.
    pub fn forget(&mut self, address: K) {
        self.by_address.remove(&address);
    }

    /// Keeps only what `keep` says (what is still wanted).
    pub fn retain(&mut self, mut keep: impl FnMut(K) -> bool) {
        self.by_address.retain(|k, _| keep(*k));
    }

    /// When the first wait ends.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.by_address
            .values()
            .map(|r| r.until)
            .filter(|t| *t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_address_waits_alone_and_longer_each_time() {
        let bad = IpAddr::from([10, 0, 1, 99]);
        let good = IpAddr::from([10, 0, 1, 20]);
        let mut book = RetryBook::default();
        let t0 = Instant::now();
        book.rejected(bad, "InvalidParameterValue".into(), t0);
        assert!(!book.may_try(bad, t0));
        assert!(book.may_try(good, t0), "others are not held back");
        assert_eq!(book.next_due(t0), Some(t0 + FIRST_RETRY));
        assert!(book.may_try(bad, t0 + FIRST_RETRY));
        book.rejected(bad, "again".into(), t0 + FIRST_RETRY);
        assert_eq!(book.next_due(t0), Some(t0 + FIRST_RETRY * 3));
        assert_eq!(book.reason(bad).as_deref(), Some("again"));
        for _ in 0..20 {
            book.rejected(bad, "again".into(), t0);
        }
        assert_eq!(book.next_due(t0), Some(t0 + MAX_RETRY));
        book.forget(bad);
        assert!(book.may_try(bad, t0));
    }
}
