//! Conflicts: the same address wanted on two ENIs (a pod on each of two nodes holds it). EC2
//! lets either node move it, so two agents that each take it back as soon as they see it gone
//! move it back and forth for ever. This agent takes an address from another Multus ENI once;
//! each later take waits [`FIRST_WAIT`] after the previous one, doubling, and the conflict shows
//! (gauge, status `conflict`).
//!
//! The history is kept per address, not per pod: a pod that lets go of the address and takes it
//! again, or an agent restart (the history is in the checkpoint), does not reset it. It decays
//! once it has been calm (the address not seen taken away) for its current wait. Taking an
//! address nobody holds (an exclusive assign) is never a take and never waits.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use multus_eni_ec2::model::EniId;
use serde::{Deserialize, Serialize};

/// The wait after the first take before the next one.
pub const FIRST_WAIT: Duration = Duration::from_secs(300);
/// The longest wait (5 min · 2⁶ ≈ 5 h).
const MAX_DOUBLINGS: u32 = 6;
/// While a take waits, how often the agent asks whether the other holder let go (a Describe,
/// then an assign that takes nothing only if nobody holds the address).
pub const EXCLUSIVE_EVERY: Duration = Duration::from_secs(60);

/// The wait after `takes` takes.
fn wait_after(takes: u32) -> Duration {
    FIRST_WAIT * 2u32.pow(takes.saturating_sub(1).min(MAX_DOUBLINGS))
}

/// One address this agent took from another ENI, or that was taken from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Our ENI.
    pub eni: EniId,
    /// How often this agent took it from another ENI.
    pub takes: u32,
    /// When this agent last took it (`None`: never; it was only seen taken away).
    pub last_take: Option<Instant>,
    /// The ENI it was taken from, when known.
    pub other: Option<EniId>,
    /// Seen away from our ENI while a pod of this node wants it there.
    away: bool,
    /// When an assign that takes nothing was last tried while the take waited.
    last_exclusive: Option<Instant>,
}

/// A conflict as the checkpoint keeps it: wall-clock time survives a restart, `Instant` does
/// not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConflict {
    pub eni: EniId,
    pub takes: u32,
    /// Seconds since the Unix epoch.
    pub last_take_unix: Option<u64>,
    pub other: Option<EniId>,
    pub away: bool,
}

/// The conflicts of the node, by address.
#[derive(Debug, Default)]
pub struct Conflicts {
    by_address: BTreeMap<IpAddr, Conflict>,
}

// === impl Conflict ===

impl Conflict {
    /// Until when a take must wait (`None`: it may go now).
    pub fn retry_at(&self) -> Option<Instant> {
        (self.takes > 0)
            .then(|| self.last_take.map(|t| t + wait_after(self.takes)))
            .flatten()
    }
}

// === impl Conflicts ===

impl Conflicts {
    /// `address`, ours on `eni` and still wanted there, is not on it now. Returns true when
    /// this is news (it was on the ENI at the last look): worth one log line.
    pub fn away(&mut self, eni: &str, address: IpAddr) -> bool {
        let c = self.entry(eni, address);
        !std::mem::replace(&mut c.away, true)
    }

    /// The address is on our ENI again (taken back, or never really gone).
    pub fn back(&mut self, address: IpAddr) {
        if let Some(c) = self.by_address.get_mut(&address) {
            c.away = false;
        }
    }

    /// This agent took `address` onto `eni` from `other` (a move), at `now`.
    pub fn took(&mut self, eni: &str, address: IpAddr, other: Option<EniId>, now: Instant) {
        let c = self.entry(eni, address);
        c.takes += 1;
        c.last_take = Some(now);
        c.away = false;
        if other.is_some() {
            c.other = other;
        }
    }

    /// Another Multus ENI (`other`) holds `address` and this agent may not take it now: the
    /// address is away for us, a conflict while the wait lasts.
    pub fn held_by(&mut self, eni: &str, address: IpAddr, other: EniId) {
        let c = self.entry(eni, address);
        c.away = true;
        c.other = Some(other);
    }

    fn entry(&mut self, eni: &str, address: IpAddr) -> &mut Conflict {
        let c = self.by_address.entry(address).or_insert_with(|| Conflict {
            eni: eni.to_string(),
            takes: 0,
            last_take: None,
            other: None,
            away: false,
            last_exclusive: None,
        });
        if c.eni != eni {
            // The address is wanted on another of our ENIs now: the history is the address's.
            c.eni = eni.to_string();
        }
        c
    }

    /// Whether `address` was seen away from this agent's ENI (another ENI holds it).
    pub fn is_away(&self, address: IpAddr) -> bool {
        self.by_address.get(&address).is_some_and(|c| c.away)
    }

    /// Whether this agent may take `address` from another ENI now: never taken, or its last
    /// take is older than its wait (whether or not the address was seen away since: a pod that
    /// let go of it and holds it again does not start a new fight).
    pub fn may_take(&self, address: IpAddr, now: Instant) -> bool {
        self.by_address
            .get(&address)
            .and_then(Conflict::retry_at)
            .is_none_or(|t| now >= t)
    }

    /// The conflict of `address` while a take of it must wait and it is away from our ENI.
    pub fn waiting(&self, address: IpAddr, now: Instant) -> Option<&Conflict> {
        self.by_address
            .get(&address)
            .filter(|c| c.away && c.retry_at().is_some_and(|t| t > now))
    }

    /// Whether an assign that takes nothing may go out for `address` while its take waits
    /// (every [`EXCLUSIVE_EVERY`]): the other holder may have let go of it.
    pub fn may_try_exclusive(&self, address: IpAddr, now: Instant) -> bool {
        self.by_address
            .get(&address)
            .is_none_or(|c| c.last_exclusive.is_none_or(|t| now >= t + EXCLUSIVE_EVERY))
    }

    /// An assign that takes nothing was queued for `address` at `now`.
    pub fn tried_exclusive(&mut self, address: IpAddr, now: Instant) {
        if let Some(c) = self.by_address.get_mut(&address) {
            c.last_exclusive = Some(now);
        }
    }

    /// When the next assign that takes nothing may go for an address whose take waits.
    pub fn next_exclusive(&self, now: Instant) -> Option<Instant> {
        self.by_address
            .iter()
            .filter(|(a, _)| self.waiting(**a, now).is_some())
            .filter_map(|(_, c)| c.last_exclusive.map(|t| t + EXCLUSIVE_EVERY))
            .filter(|t| *t > now)
            .min()
    }

    /// Addresses in conflict now: away and waiting.
    pub fn count(&self, now: Instant) -> usize {
        self.by_address
            .keys()
            .filter(|a| self.waiting(**a, now).is_some())
            .count()
    }

    /// When the first wait of an address that is away ends.
    pub fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.by_address
            .values()
            .filter(|c| c.away)
            .filter_map(Conflict::retry_at)
            .filter(|t| *t > now)
            .min()
    }

    /// Forgets the history of addresses that stayed calm (not away) for their whole wait.
    /// Returns whether anything was forgotten.
    pub fn decay(&mut self, now: Instant) -> bool {
        let before = self.by_address.len();
        self.by_address.retain(|_, c| {
            c.away
                || c.last_take
                    .is_some_and(|t| now < t + wait_after(c.takes.max(1)))
        });
        self.by_address.len() != before
    }

    /// The history as the checkpoint keeps it.
    pub fn save(&self, now: Instant, wall: SystemTime) -> BTreeMap<IpAddr, SavedConflict> {
        self.by_address
            .iter()
            .map(|(a, c)| {
                let last_take_unix = c.last_take.map(|t| {
                    let ago = now.saturating_duration_since(t);
                    wall.checked_sub(ago)
                        .unwrap_or(SystemTime::UNIX_EPOCH)
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default()
                });
                let saved = SavedConflict {
                    eni: c.eni.clone(),
                    takes: c.takes,
                    last_take_unix,
                    other: c.other.clone(),
                    away: c.away,
                };
                (*a, saved)
            })
            .collect()
    }

    /// The history read back from the checkpoint; a take "in the future" (the clock was set
    /// back) counts as now.
    pub fn restore(
        saved: &BTreeMap<IpAddr, SavedConflict>,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let by_address = saved
            .iter()
            .map(|(a, s)| {
                let last_take = s.last_take_unix.map(|secs| {
                    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                    let ago = wall.duration_since(at).unwrap_or_default();
                    now.checked_sub(ago).unwrap_or(now)
                });
                let c = Conflict {
                    eni: s.eni.clone(),
                    takes: s.takes,
                    last_take,
                    other: s.other.clone(),
                    away: s.away,
                    last_exclusive: None,
                };
                (*a, c)
            })
            .collect();
        Self { by_address }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 20));

    #[test]
    fn taken_once_then_each_take_waits_five_minutes_doubling() {
        let mut c = Conflicts::default();
        let t0 = Instant::now();
        assert!(c.may_take(A, t0), "the first take goes at once");
        c.took("eni-1", A, Some("eni-other".into()), t0);
        assert_eq!(c.count(t0), 0, "ours now: no conflict");
        assert!(c.away("eni-1", A), "taken away again: news");
        assert!(!c.away("eni-1", A), "seen away again: not news");
        assert!(!c.may_take(A, t0));
        assert_eq!(c.count(t0), 1);
        assert_eq!(c.next_retry(t0), Some(t0 + FIRST_WAIT));
        assert_eq!(
            c.waiting(A, t0).and_then(|x| x.other.clone()).as_deref(),
            Some("eni-other")
        );
        let t1 = t0 + FIRST_WAIT;
        assert!(c.may_take(A, t1));
        c.took("eni-1", A, None, t1);
        c.away("eni-1", A);
        assert_eq!(c.next_retry(t1), Some(t1 + FIRST_WAIT * 2), "doubling");
        c.back(A);
        assert_eq!(c.count(t1), 0);
    }

    #[test]
    fn while_a_take_waits_an_assign_that_takes_nothing_goes_once_a_minute() {
        let mut c = Conflicts::default();
        let t0 = Instant::now();
        c.took("eni-1", A, Some("eni-b".into()), t0);
        c.away("eni-1", A);
        assert!(c.may_try_exclusive(A, t0));
        c.tried_exclusive(A, t0);
        assert!(!c.may_try_exclusive(A, t0 + EXCLUSIVE_EVERY - Duration::from_secs(1)));
        assert_eq!(c.next_exclusive(t0), Some(t0 + EXCLUSIVE_EVERY));
        assert!(c.may_try_exclusive(A, t0 + EXCLUSIVE_EVERY));
    }

    #[test]
    fn the_history_survives_a_release_and_decays_only_once_calm_for_its_wait() {
        let mut c = Conflicts::default();
        let t0 = Instant::now();
        c.took("eni-1", A, Some("eni-b".into()), t0);
        assert!(
            !c.may_take(A, t0 + Duration::from_secs(10)),
            "a second take waits"
        );
        // The pod lets go and takes the address again: another ENI holds it by then.
        c.held_by("eni-1", A, "eni-b".into());
        assert!(!c.may_take(A, t0 + Duration::from_secs(10)));
        assert!(
            !c.decay(t0 + FIRST_WAIT * 3),
            "away: kept whatever the time"
        );
        c.back(A);
        assert!(!c.decay(t0 + FIRST_WAIT - Duration::from_secs(1)));
        assert!(c.decay(t0 + FIRST_WAIT), "calm for its wait: forgotten");
        assert!(c.may_take(A, t0 + FIRST_WAIT));
    }

    #[test]
    fn the_history_survives_a_restart_through_the_checkpoint() {
        let mut c = Conflicts::default();
        let t0 = Instant::now();
        let wall = SystemTime::now();
        c.took("eni-1", A, Some("eni-b".into()), t0);
        c.away("eni-1", A);
        let saved = c.save(t0 + Duration::from_secs(60), wall + Duration::from_secs(60));
        let json = serde_json::to_string(&saved).unwrap_or_default();
        let back: BTreeMap<IpAddr, SavedConflict> = serde_json::from_str(&json).unwrap_or_default();
        // A new process: another Instant base, two minutes of wall time later.
        let t9 = Instant::now() + Duration::from_secs(1000);
        let restored = Conflicts::restore(&back, t9, wall + Duration::from_secs(120));
        let w = restored.waiting(A, t9).cloned();
        assert_eq!(w.as_ref().map(|w| w.takes), Some(1));
        let retry = w.and_then(|w| w.retry_at()).unwrap_or(t9);
        let left = retry.saturating_duration_since(t9);
        assert!(
            left > FIRST_WAIT - Duration::from_secs(122)
                && left <= FIRST_WAIT - Duration::from_secs(119),
            "{left:?} left of the wait after two minutes"
        );
    }
}
