//! Leak reclaim: a secondary address on one of the node's Multus ENIs that no pod holds
//! (no claim, no network namespace in `--netns-dir`) for `--reclaim-after` is unassigned.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use multus_eni_ec2::model::{EniAddresses, EniId};

/// Secondary addresses of the node's `no_manage` ENIs that nothing holds: the primary
/// address and the VPC CNI's ENIs are never candidates.
pub fn unheld<'a>(
    enis: impl IntoIterator<Item = &'a EniAddresses>,
    held: &BTreeSet<IpAddr>,
) -> BTreeSet<(EniId, IpAddr)> {
    let mut out = BTreeSet::new();
    for eni in enis.into_iter().filter(|e| e.no_manage) {
        let secondaries = eni
            .ipv4
            .iter()
            .filter(|a| Some(**a) != eni.primary_ipv4)
            .map(|a| IpAddr::V4(*a))
            .chain(eni.ipv6.iter().map(|a| IpAddr::V6(*a)));
        for a in secondaries.filter(|a| !held.contains(a)) {
            out.insert((eni.id.clone(), a));
        }
    }
    out
}

/// Since when each address has been seen unheld; an address seen held again starts over.
#[derive(Debug, Default)]
pub struct UnheldSince {
    since: BTreeMap<(EniId, IpAddr), Instant>,
}

impl UnheldSince {
    /// Records this resync's unheld addresses and returns those unheld for `after` or more.
    pub fn observe(
        &mut self,
        unheld: BTreeSet<(EniId, IpAddr)>,
        now: Instant,
        after: Duration,
    ) -> Vec<(EniId, IpAddr)> {
        self.since.retain(|k, _| unheld.contains(k));
        let mut due = Vec::new();
        for key in unheld {
            let since = *self.since.entry(key.clone()).or_insert(now);
            if now.duration_since(since) >= after {
                due.push(key);
            }
        }
        due
    }

    /// Forgets an address (reclaimed, or held again).
    pub fn forget(&mut self, eni: &str, address: IpAddr) {
        self.since.remove(&(eni.to_string(), address));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn eni(id: &str, no_manage: bool) -> EniAddresses {
        EniAddresses {
            id: id.into(),
            primary_ipv4: "10.0.1.4".parse().ok(),
            ipv4: ["10.0.1.4", "10.0.1.5", "10.0.1.6"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            ipv6: ["2001:db8::5"
                .parse()
                .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED)]
            .into(),
            no_manage,
            ..Default::default()
        }
    }

    #[test]
    fn only_unheld_secondaries_of_no_manage_enis_are_candidates() {
        let enis = [eni("eni-multus", true), eni("eni-cni", false)];
        let got = unheld(&enis, &[ip("10.0.1.5")].into());
        let want: BTreeSet<_> = [
            ("eni-multus".to_string(), ip("10.0.1.6")),
            ("eni-multus".to_string(), ip("2001:db8::5")),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn an_address_is_due_only_after_staying_unheld_for_the_whole_delay() {
        let mut t = UnheldSince::default();
        let t0 = Instant::now();
        let after = Duration::from_secs(300);
        let a = ("eni-1".to_string(), ip("10.0.1.6"));
        assert!(t.observe([a.clone()].into(), t0, after).is_empty());
        assert!(
            t.observe([a.clone()].into(), t0 + Duration::from_secs(299), after)
                .is_empty()
        );
        // Held again in between: the clock starts over.
        assert!(
            t.observe(BTreeSet::new(), t0 + Duration::from_secs(300), after)
                .is_empty()
        );
        assert!(
            t.observe([a.clone()].into(), t0 + Duration::from_secs(301), after)
                .is_empty()
        );
        assert_eq!(
            t.observe([a.clone()].into(), t0 + Duration::from_secs(601), after),
            vec![a]
        );
    }
}
