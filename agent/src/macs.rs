//! The MACs of the node's pod interfaces that are none of this instance's ENIs as last read:
//! what EC2 said of each, which are being asked, and how many lookups are left in this resync
//! interval. A MAC not answered yet is unknown (an address on it is `pending`, never `no_eni`).
//!
//! Only MACs seen on an interface of a pod namespace of this node are ever looked up, never
//! one a caller merely names; at most one lookup is in flight (what appears meanwhile goes in
//! the next); each costs one `DescribeNetworkInterfaces` of the account's bucket (shared with
//! the VPC CNI), so at most `--max-mac-lookups` go out per resync interval. A MAC no pod shows
//! any more is forgotten. "No ENI" is kept while a pod shows the MAC (a veth's or macvlan's MAC
//! does not become an ENI's): a resync of a steady node costs its one Describe of the
//! instance, nothing more. "Another instance's ENI" is asked again at each resync (the ENI may
//! have been detached; the old answer stands meanwhile). The all-zero MAC (loopback, tunnels)
//! is no ENI without asking.

use std::collections::{BTreeMap, BTreeSet};

use multus_eni_ec2::MacAddress;
use multus_eni_ec2::model::{EniAddresses, EniId};

use crate::plan::{ForeignMacs, InstanceEnis, MacLookup};

/// The MAC of links without an Ethernet address of their own (loopback, tunnels).
const ZERO: MacAddress = MacAddress([0; 6]);

/// What a lookup found, for the node task.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// MACs newly found on another instance's ENI (worth a log line and a refusal count).
    pub other_instance: Vec<(MacAddress, EniId)>,
    /// An ENI of this instance that its last read did not list (attached since): read again.
    pub ours_unread: bool,
}

/// The lookups of foreign MACs.
#[derive(Debug)]
pub struct MacBook {
    known: ForeignMacs,
    asking: BTreeSet<MacAddress>,
    stale: BTreeSet<MacAddress>,
    calls_left: usize,
    budget: usize,
}

// === impl MacBook ===

impl MacBook {
    /// A book allowing `budget` lookups per resync interval.
    pub fn new(budget: usize) -> Self {
        Self {
            known: ForeignMacs::new(),
            asking: BTreeSet::new(),
            stale: BTreeSet::new(),
            calls_left: budget,
            budget,
        }
    }

    /// What EC2 said of the MACs answered so far.
    pub fn known(&self) -> &ForeignMacs {
        &self.known
    }

    /// The MACs to look up now, among those `seen` on the node's pod interfaces: neither this
    /// instance's ENIs nor answered (or answered before the last resync), and nothing is being
    /// asked; `None` when there is nothing to ask or no lookup left in this interval. Taking
    /// them spends one lookup.
    pub fn to_ask(
        &mut self,
        seen: impl IntoIterator<Item = MacAddress>,
        enis: &InstanceEnis,
    ) -> Option<Vec<MacAddress>> {
        if !self.asking.is_empty() || self.calls_left == 0 {
            return None;
        }
        let seen: BTreeSet<MacAddress> = seen.into_iter().collect();
        if seen.contains(&ZERO) {
            self.known.insert(ZERO, MacLookup::NoEni);
        }
        let ask: Vec<MacAddress> = seen
            .into_iter()
            .filter(|m| !enis.contains_key(m))
            .filter(|m| !self.known.contains_key(m) || self.stale.contains(m))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if ask.is_empty() {
            return None;
        }
        self.calls_left -= 1;
        self.asking.extend(ask.iter().copied());
        Some(ask)
    }

    /// EC2 answered the lookup of `asked` with the ENIs carrying some of them.
    pub fn answered(
        &mut self,
        asked: &[MacAddress],
        mut found: BTreeMap<MacAddress, EniAddresses>,
        instance_id: &str,
    ) -> Found {
        let mut out = Found::default();
        for mac in asked {
            self.asking.remove(mac);
            self.stale.remove(mac);
            let answer = match found.remove(mac) {
                Some(eni) if eni.instance_id.as_deref() == Some(instance_id) => {
                    // Attached to us since the last read: unknown until that read lists it.
                    out.ours_unread = true;
                    self.known.remove(mac);
                    continue;
                }
                Some(eni) => MacLookup::OtherInstance(eni.id),
                None => MacLookup::NoEni,
            };
            if let MacLookup::OtherInstance(id) = &answer
                && self.known.get(mac) != Some(&answer)
            {
                out.other_instance.push((*mac, id.clone()));
            }
            self.known.insert(*mac, answer);
        }
        out
    }

    /// The lookup of `asked` failed: they stay as they were (unknown, or the old answer) until
    /// a later lookup, within the budget.
    pub fn failed(&mut self, asked: &[MacAddress]) {
        for mac in asked {
            self.asking.remove(mac);
        }
    }

    /// A resync: the budget is refilled, another instance's ENI is to be asked again (it stands
    /// until then), and MACs that no pod shows (`seen`) or that are this instance's now are
    /// forgotten.
    pub fn resync(&mut self, seen: &BTreeSet<MacAddress>, enis: &InstanceEnis) {
        self.calls_left = self.budget;
        self.known
            .retain(|m, _| seen.contains(m) && !enis.contains_key(m));
        self.stale = self
            .known
            .iter()
            .filter(|(_, l)| matches!(l, MacLookup::OtherInstance(_)))
            .map(|(m, _)| *m)
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 0xa]);
    const B: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 0xb]);
    const OURS: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 1]);

    fn enis() -> InstanceEnis {
        [(OURS, EniAddresses::default())].into()
    }

    fn eni(id: &str, instance: &str) -> EniAddresses {
        EniAddresses {
            id: id.into(),
            instance_id: Some(instance.into()),
            ..Default::default()
        }
    }

    #[test]
    fn one_lookup_at_a_time_within_the_budget_and_never_for_this_instances_macs() {
        let mut book = MacBook::new(2);
        assert_eq!(book.to_ask([OURS, A], &enis()), Some(vec![A]));
        assert_eq!(book.to_ask([B], &enis()), None, "one lookup in flight");
        book.failed(&[A]);
        assert!(
            book.known().get(&A).is_none(),
            "a failed lookup leaves it unknown"
        );
        assert_eq!(book.to_ask([A, B], &enis()), Some(vec![A, B]));
        book.failed(&[A, B]);
        assert_eq!(
            book.to_ask([A, B], &enis()),
            None,
            "budget spent until the resync"
        );
        book.resync(&[A, B].into(), &enis());
        assert_eq!(book.to_ask([A, B], &enis()), Some(vec![A, B]));
    }

    #[test]
    fn answers_are_kept_until_the_resync_and_stand_while_asked_again() {
        let mut book = MacBook::new(5);
        let asked = book.to_ask([A, B], &enis()).unwrap_or_default();
        let found = book.answered(&asked, [(A, eni("eni-far", "i-other"))].into(), "i-me");
        assert_eq!(found.other_instance, vec![(A, "eni-far".to_string())]);
        assert_eq!(
            book.known().get(&A),
            Some(&MacLookup::OtherInstance("eni-far".into()))
        );
        assert_eq!(book.known().get(&B), Some(&MacLookup::NoEni));
        assert_eq!(
            book.to_ask([A, B], &enis()),
            None,
            "cached until the resync"
        );
        book.resync(&[A, B].into(), &enis());
        assert_eq!(
            book.to_ask([A, B], &enis()),
            Some(vec![A]),
            "another instance's ENI is asked again, no ENI is not"
        );
        book.answered(&[A], [(A, eni("eni-far", "i-other"))].into(), "i-me");
        book.resync(&[A].into(), &enis());
        assert!(book.known().get(&B).is_none(), "no pod shows B any more");
        assert_eq!(book.to_ask([A], &enis()), Some(vec![A]));
        assert!(
            book.known().contains_key(&A),
            "the old answer stands meanwhile"
        );
        let again = book.answered(&[A], [(A, eni("eni-far", "i-other"))].into(), "i-me");
        assert!(again.other_instance.is_empty(), "not news");
    }

    #[test]
    fn the_zero_mac_is_no_eni_without_asking() {
        let mut book = MacBook::new(5);
        assert_eq!(book.to_ask([ZERO], &enis()), None);
        assert_eq!(book.known().get(&ZERO), Some(&MacLookup::NoEni));
    }

    #[test]
    fn an_eni_attached_to_this_instance_since_the_last_read_stays_unknown_and_asks_a_read() {
        let mut book = MacBook::new(5);
        let asked = book.to_ask([A], &enis()).unwrap_or_default();
        let found = book.answered(&asked, [(A, eni("eni-new", "i-me"))].into(), "i-me");
        assert!(found.ours_unread);
        assert!(book.known().get(&A).is_none());
    }
}
