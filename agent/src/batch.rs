//! Group commit per ENI: everything queued for one ENI while its previous call was in flight
//! goes out together, paced: a call starts no sooner than the interval after the ENI's previous
//! one ([`Pacing`]: the batch interval, longer while EC2 throttles, jittered; releases alone
//! wait half the batch interval). The first change after a quiet period goes at once (no added
//! wait at low load); under load everything that arrives within the interval shares one call.
//!
//! Why a pace and not only group commit: EC2 answers in milliseconds, so a node whose pods
//! start one every half second would make one call per pod, and the account's Assign bucket
//! (100 calls, refilled at 5/s, shared by every node and the VPC CNI) empties in a rollout of
//! a few hundred pods. Once it is empty, each node needs one more call after its last pod and
//! the account grants five per second, so the tail grows with the node count
//! (docs/scale.md, "Pacing").

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use multus_eni_ec2::model::{Change, EniId};

use crate::pacing::Pacing;

/// What is queued for one ENI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    assign: BTreeSet<IpAddr>,
    unassign: BTreeSet<IpAddr>,
}

/// When an ENI's last call started, and the gap before its next one with assigns (a batch of
/// releases only waits [`Pacing::release_interval`]).
#[derive(Debug, Clone, Copy)]
struct LastCall {
    started: Instant,
    /// The paced interval, jittered.
    paced: Duration,
}

/// The queued changes of every ENI of the node, and which ENIs have a call in flight.
#[derive(Debug)]
pub struct Batches {
    pending: BTreeMap<EniId, Pending>,
    /// ENIs with a call in flight, and the addresses it names.
    in_flight: BTreeMap<EniId, BTreeSet<IpAddr>>,
    /// ENIs whose calls wait for a fresh read of the instance (an outcome EC2 did not tell).
    held: BTreeSet<EniId>,
    last_call: BTreeMap<EniId, LastCall>,
    /// The pace of calls per ENI.
    pub pacing: Pacing,
    rng: fastrand::Rng,
}

impl Default for Batches {
    fn default() -> Self {
        Self::with_interval(Duration::ZERO)
    }
}

impl Batches {
    /// Batches whose calls for one ENI start at least `interval` apart (zero: group commit
    /// alone), more while EC2 throttles.
    pub fn with_interval(interval: Duration) -> Self {
        Self {
            pending: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            held: BTreeSet::new(),
            last_call: BTreeMap::new(),
            pacing: Pacing::new(interval),
            rng: fastrand::Rng::new(),
        }
    }

    /// Holds `eni`'s calls until [`Batches::unhold`]: the node does not know what its last call
    /// did (a timeout, or EC2 said an address is not there) and reads the ENI first.
    pub fn hold(&mut self, eni: &str) {
        self.held.insert(eni.to_string());
    }

    /// `eni`'s calls may go again; queued unassigns of addresses it does not `hold` any more
    /// are dropped (returned: already off the ENI).
    pub fn unhold(&mut self, eni: &str, holds: impl Fn(IpAddr) -> bool) -> Vec<IpAddr> {
        self.held.remove(eni);
        let Some(p) = self.pending.get_mut(eni) else {
            return Vec::new();
        };
        let gone: Vec<IpAddr> = p.unassign.iter().copied().filter(|a| !holds(*a)).collect();
        for a in &gone {
            p.unassign.remove(a);
        }
        gone
    }

    /// The ENIs whose calls are held.
    pub fn held(&self) -> &BTreeSet<EniId> {
        &self.held
    }

    /// Queues an assign; cancels a queued unassign of the same address.
    pub fn assign(&mut self, eni: &str, address: IpAddr) {
        let p = self.pending.entry(eni.to_string()).or_default();
        p.unassign.remove(&address);
        p.assign.insert(address);
    }

    /// Queues an unassign; cancels a queued assign of the same address.
    pub fn unassign(&mut self, eni: &str, address: IpAddr) {
        let p = self.pending.entry(eni.to_string()).or_default();
        p.assign.remove(&address);
        p.unassign.insert(address);
    }

    /// Drops a queued assign (its address was released before the call went out).
    pub fn cancel_assign(&mut self, eni: &str, address: IpAddr) {
        if let Some(p) = self.pending.get_mut(eni) {
            p.assign.remove(&address);
        }
    }

    /// Drops a queued unassign (a pod holds the address again before the call went out).
    pub fn cancel_unassign(&mut self, eni: &str, address: IpAddr) {
        if let Some(p) = self.pending.get_mut(eni) {
            p.unassign.remove(&address);
        }
    }

    /// Whether the call in flight for `eni` names `address`.
    pub fn is_flying(&self, eni: &str, address: IpAddr) -> bool {
        self.in_flight
            .get(eni)
            .is_some_and(|s| s.contains(&address))
    }

    /// Addresses queued, both directions, all ENIs.
    pub fn queued(&self) -> usize {
        self.pending
            .values()
            .map(|p| p.assign.len() + p.unassign.len())
            .sum()
    }

    /// Takes the batch of every ENI that has something queued, no call in flight and its
    /// interval over, and marks them in flight: at most one call per kind (IPv4/IPv6,
    /// assign/unassign) per ENI.
    pub fn take_ready(&mut self, now: Instant) -> Vec<(EniId, Vec<Change>)> {
        let ready: Vec<EniId> = self
            .pending
            .keys()
            .filter(|e| !self.in_flight.contains_key(*e) && !self.held.contains(*e))
            .filter(|e| self.due_at(e).is_none_or(|due| due <= now))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for eni in ready {
            let Some(p) = self.pending.remove(&eni) else {
                continue;
            };
            let changes = changes_of(&eni, &p);
            if !changes.is_empty() {
                let names = changes.iter().flat_map(Change::addresses).collect();
                self.in_flight.insert(eni.clone(), names);
                // Jittered only while slowed: at the base pace nodes are not in lockstep on
                // an empty bucket, and the batch interval stays exact.
                let interval = self.pacing.interval();
                let paced = if interval > self.pacing.base() {
                    Pacing::jittered(interval, self.rng.f64())
                } else {
                    interval
                };
                let last = LastCall {
                    started: now,
                    paced,
                };
                self.last_call.insert(eni.clone(), last);
                out.push((eni, changes));
            }
        }
        let release = self.pacing.release_interval();
        self.last_call
            .retain(|_, l| now.saturating_duration_since(l.started) < l.paced.max(release));
        out
    }

    /// When the first batch held back only by its interval may go (`None`: none is).
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.pending
            .keys()
            .filter(|e| !self.in_flight.contains_key(*e) && !self.held.contains(*e))
            .filter_map(|e| self.due_at(e))
            .filter(|due| *due > now)
            .min()
    }

    /// The earliest start of the ENI's next call; `None` when it may start now (never
    /// called, or quiet for longer than the interval). A batch of releases only waits half the
    /// batch interval, not the paced one.
    fn due_at(&self, eni: &str) -> Option<Instant> {
        let last = self.last_call.get(eni)?;
        let releases_only = self.pending.get(eni).is_some_and(|p| p.assign.is_empty());
        Some(
            last.started
                + if releases_only {
                    self.pacing.release_interval()
                } else {
                    last.paced
                },
        )
    }

    /// The ENI's call returned: its next batch may go.
    pub fn done(&mut self, eni: &str) {
        self.in_flight.remove(eni);
    }
}

fn changes_of(eni: &str, p: &Pending) -> Vec<Change> {
    let v4 = |s: &BTreeSet<IpAddr>| -> Vec<_> {
        s.iter()
            .filter_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            })
            .collect()
    };
    let v6 = |s: &BTreeSet<IpAddr>| -> Vec<_> {
        s.iter()
            .filter_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                IpAddr::V4(_) => None,
            })
            .collect()
    };
    let eni = eni.to_string();
    // Unassigns first: at the ENI's address limit, a released address makes room for a new one
    // in the same batch instead of the next.
    [
        Change::UnassignIpv4 {
            eni: eni.clone(),
            addresses: v4(&p.unassign),
        },
        Change::UnassignIpv6 {
            eni: eni.clone(),
            addresses: v6(&p.unassign),
        },
        Change::AssignIpv4 {
            eni: eni.clone(),
            addresses: v4(&p.assign),
        },
        Change::AssignIpv6 {
            eni,
            addresses: v6(&p.assign),
        },
    ]
    .into_iter()
    .filter(|c| !c.addresses().is_empty())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_quiet_eni_calls_at_once_and_a_busy_one_waits_out_its_interval() {
        let interval = Duration::from_secs(3);
        let mut b = Batches::with_interval(interval);
        let t0 = Instant::now();
        b.assign("eni-1", ip("10.0.1.5"));
        assert_eq!(b.take_ready(t0).len(), 1, "the first change goes at once");
        b.done("eni-1");
        b.assign("eni-1", ip("10.0.1.6"));
        b.assign("eni-2", ip("10.0.2.5"));
        let t1 = t0 + Duration::from_millis(500);
        let now = b.take_ready(t1);
        assert_eq!(
            now.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
            ["eni-2"],
            "eni-1 called 0.5 s ago; eni-2 is quiet"
        );
        assert_eq!(b.next_due(t1), Some(t0 + interval));
        b.assign("eni-1", ip("10.0.1.7"));
        assert!(
            b.take_ready(t0 + interval - Duration::from_millis(1))
                .is_empty()
        );
        let later = b.take_ready(t0 + interval);
        assert_eq!(later.len(), 1);
        assert_eq!(
            later[0].1[0].addresses().len(),
            2,
            "both waited and share one call"
        );
        assert_eq!(b.next_due(t0 + interval), None, "nothing else is queued");
    }

    #[test]
    fn what_queues_while_a_call_is_in_flight_goes_out_in_one_call() {
        let mut b = Batches::default();
        b.assign("eni-1", ip("10.0.1.5"));
        let first = b.take_ready(Instant::now());
        assert_eq!(first.len(), 1);
        assert!(b.is_flying("eni-1", ip("10.0.1.5")));
        assert_eq!(first[0].1.len(), 1);
        for host in 6..16 {
            b.assign("eni-1", ip(&format!("10.0.1.{host}")));
        }
        b.assign("eni-1", ip("2001:db8::6"));
        b.assign("eni-2", ip("10.0.2.5"));
        // eni-1 is busy: only eni-2 goes.
        let next = b.take_ready(Instant::now());
        assert_eq!(
            next.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
            ["eni-2"]
        );
        b.done("eni-1");
        let batch = b.take_ready(Instant::now());
        assert_eq!(batch.len(), 1);
        let (eni, changes) = &batch[0];
        assert_eq!(eni, "eni-1");
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].addresses().len(), 10);
        assert_eq!(changes[1].action(), "AssignIpv6Addresses");
        assert_eq!(b.queued(), 0);
    }

    #[test]
    fn a_queued_unassign_can_be_cancelled() {
        let mut b = Batches::default();
        b.unassign("eni-1", ip("10.0.1.5"));
        b.cancel_unassign("eni-1", ip("10.0.1.5"));
        assert_eq!(b.queued(), 0);
        assert!(b.take_ready(Instant::now()).is_empty());
    }

    #[test]
    fn an_unassign_cancels_a_queued_assign_and_back() {
        let mut b = Batches::default();
        b.assign("eni-1", ip("10.0.1.5"));
        b.unassign("eni-1", ip("10.0.1.5"));
        b.unassign("eni-1", ip("10.0.1.6"));
        b.assign("eni-1", ip("10.0.1.6"));
        let batch = b.take_ready(Instant::now());
        let changes = &batch[0].1;
        assert_eq!(changes.len(), 2);
        assert_eq!(
            changes[0].action(),
            "UnassignPrivateIpAddresses",
            "unassigns go first: they make room at the ENI's limit"
        );
        assert_eq!(changes[0].addresses(), vec![ip("10.0.1.5")]);
        assert_eq!(changes[1].action(), "AssignPrivateIpAddresses");
        assert_eq!(changes[1].addresses(), vec![ip("10.0.1.6")]);
    }

    #[test]
    fn under_throttling_assigns_wait_longer_and_releases_do_not() {
        let interval = Duration::from_secs(3);
        let mut b = Batches::with_interval(interval);
        b.pacing.throttled();
        let t0 = Instant::now();
        b.assign("eni-1", ip("10.0.1.5"));
        assert_eq!(b.take_ready(t0).len(), 1);
        b.done("eni-1");
        b.unassign("eni-1", ip("10.0.1.6"));
        assert_eq!(
            b.next_due(t0),
            Some(t0 + interval / 2),
            "a release waits half the batch interval only"
        );
        b.assign("eni-1", ip("10.0.1.7"));
        let due = b.next_due(t0).unwrap_or(t0);
        let paced = due - t0;
        assert!(
            paced >= Duration::from_secs_f64(6.0 * 0.8)
                && paced <= Duration::from_secs_f64(6.0 * 1.2),
            "{paced:?}: the paced interval (6 s after a throttle, ±20 %)"
        );
    }

    #[test]
    fn a_held_eni_calls_nothing_until_unheld_and_drops_releases_of_what_is_gone() {
        let mut b = Batches::default();
        b.unassign("eni-1", ip("10.0.1.5"));
        b.unassign("eni-1", ip("10.0.1.6"));
        b.hold("eni-1");
        assert!(b.take_ready(Instant::now()).is_empty());
        let gone = b.unhold("eni-1", |a| a == ip("10.0.1.6"));
        assert_eq!(gone, vec![ip("10.0.1.5")]);
        let batch = b.take_ready(Instant::now());
        assert_eq!(batch[0].1[0].addresses(), vec![ip("10.0.1.6")]);
    }
}
