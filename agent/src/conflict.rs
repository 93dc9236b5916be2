//! Conflicts: the same address wanted on two ENIs (a pod on each of two nodes holds it). EC2
//! lets either node move it, so two agents that each take it back as soon as they see it gone
//! move it back and forth for ever. After an address this agent assigned was taken away while
//! its pod still holds it, the agent takes it back once; if it is taken away again it waits
//! [`FIRST_WAIT`], doubling each time, and shows the conflict (gauge, status `conflict`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use multus_eni_ec2::model::EniId;

/// The wait after the second time an address is taken away.
pub const FIRST_WAIT: Duration = Duration::from_secs(300);
/// The longest wait (5 min · 2⁶ ≈ 5 h).
const MAX_DOUBLINGS: u32 = 6;

/// One address that was taken away from this agent's ENI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Our ENI.
    pub eni: EniId,
    /// How often this agent took it back.
    pub takes: u32,
    /// Not before then; `None`: may be taken back now.
    pub retry_at: Option<Instant>,
    /// The ENI it was taken back from, when known.
    pub other: Option<EniId>,
    /// Away from our ENI now.
    away: bool,
}

/// The conflicts of the node, by address.
#[derive(Debug, Default)]
pub struct Conflicts {
    by_address: BTreeMap<IpAddr, Conflict>,
}

impl Conflicts {
    /// `address`, assigned by this agent on `eni` and still wanted there, is not on it now.
    /// Returns true when this is news (it was on the ENI at the last look): worth one log line.
    pub fn away(&mut self, eni: &str, address: IpAddr, now: Instant) -> bool {
        let c = self.by_address.entry(address).or_insert_with(|| Conflict {
            eni: eni.to_string(),
            takes: 0,
            retry_at: None,
            other: None,
            away: false,
        });
        if c.away {
            return false;
        }
        c.away = true;
        c.retry_at = (c.takes > 0).then(|| {
            let doublings = (c.takes - 1).min(MAX_DOUBLINGS);
            now + FIRST_WAIT * 2u32.pow(doublings)
        });
        true
    }

    /// The address is on our ENI again (taken back, or never really gone).
    pub fn back(&mut self, address: IpAddr) {
        if let Some(c) = self.by_address.get_mut(&address) {
            c.away = false;
            c.retry_at = None;
        }
    }

    /// This agent assigned it again, taking it from `other`.
    pub fn took_back(&mut self, address: IpAddr, other: Option<EniId>) {
        if let Some(c) = self.by_address.get_mut(&address) {
            c.takes += 1;
            c.away = false;
            c.retry_at = None;
            if other.is_some() {
                c.other = other;
            }
        }
    }

    /// Whether `address` was seen away from this agent's ENI (another ENI holds it).
    pub fn is_away(&self, address: IpAddr) -> bool {
        self.by_address.get(&address).is_some_and(|c| c.away)
    }

    /// Whether an assign of `address` may go out now.
    pub fn may_assign(&self, address: IpAddr, now: Instant) -> bool {
        self.waiting(address, now).is_none()
    }

    /// The conflict of `address` while it waits.
    pub fn waiting(&self, address: IpAddr, now: Instant) -> Option<&Conflict> {
        self.by_address
            .get(&address)
            .filter(|c| c.away && c.retry_at.is_some_and(|t| t > now))
    }

    /// Addresses in conflict now: away and waiting.
    pub fn count(&self, now: Instant) -> usize {
        self.by_address
            .keys()
            .filter(|a| self.waiting(**a, now).is_some())
            .count()
    }

    /// When the first wait ends.
    pub fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.by_address
            .values()
            .filter_map(|c| c.retry_at.filter(|t| *t > now && c.away))
            .min()
    }

    /// The pod let go of the address: nothing to fight over any more.
    pub fn forget(&mut self, address: IpAddr) {
        self.by_address.remove(&address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_back_once_then_waits_five_minutes_doubling() {
        let a: IpAddr = IpAddr::from([10, 0, 1, 20]);
        let mut c = Conflicts::default();
        let t0 = Instant::now();
        assert!(c.away("eni-1", a, t0));
        assert!(!c.away("eni-1", a, t0), "seen away again: not news");
        assert!(
            c.may_assign(a, t0),
            "the first time it is taken back at once"
        );
        c.took_back(a, Some("eni-other".into()));
        assert_eq!(c.count(t0), 0);
        assert!(c.away("eni-1", a, t0));
        assert!(!c.may_assign(a, t0));
        assert_eq!(c.count(t0), 1);
        assert_eq!(c.next_retry(t0), Some(t0 + FIRST_WAIT));
        assert_eq!(
            c.waiting(a, t0).and_then(|x| x.other.clone()).as_deref(),
            Some("eni-other")
        );
        let t1 = t0 + FIRST_WAIT;
        assert!(c.may_assign(a, t1));
        c.took_back(a, None);
        c.away("eni-1", a, t1);
        assert_eq!(c.next_retry(t1), Some(t1 + FIRST_WAIT * 2), "doubling");
        c.back(a);
        assert_eq!(c.count(t1), 0);
        c.forget(a);
        assert!(c.away("eni-1", a, t1));
        assert!(c.may_assign(a, t1), "forgotten: a fresh start");
    }
}
