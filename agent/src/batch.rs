//! Group commit per ENI: everything queued for one ENI while its previous call was in flight
//! goes out together (no added wait at low load, big batches under load).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use multus_eni_ec2::model::{Change, EniId};

/// What is queued for one ENI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    assign: BTreeSet<IpAddr>,
    unassign: BTreeSet<IpAddr>,
}

/// The queued changes of every ENI of the node, and which ENIs have a call in flight.
#[derive(Debug, Default)]
pub struct Batches {
    pending: BTreeMap<EniId, Pending>,
    /// ENIs with a call in flight, and the addresses it names.
    in_flight: BTreeMap<EniId, BTreeSet<IpAddr>>,
}

impl Batches {
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

    /// Takes the batch of every ENI that has something queued and no call in flight, and
    /// marks them in flight: at most one call per kind (IPv4/IPv6, assign/unassign) per ENI.
    pub fn take_ready(&mut self) -> Vec<(EniId, Vec<Change>)> {
        let ready: Vec<EniId> = self
            .pending
            .keys()
            .filter(|e| !self.in_flight.contains_key(*e))
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
                out.push((eni, changes));
            }
        }
        out
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
    [
        Change::AssignIpv4 {
            eni: eni.clone(),
            addresses: v4(&p.assign),
        },
        Change::AssignIpv6 {
            eni: eni.clone(),
            addresses: v6(&p.assign),
        },
        Change::UnassignIpv4 {
            eni: eni.clone(),
            addresses: v4(&p.unassign),
        },
        Change::UnassignIpv6 {
            eni,
            addresses: v6(&p.unassign),
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
    fn what_queues_while_a_call_is_in_flight_goes_out_in_one_call() {
        let mut b = Batches::default();
        b.assign("eni-1", ip("10.0.1.5"));
        let first = b.take_ready();
        assert_eq!(first.len(), 1);
        assert!(b.is_flying("eni-1", ip("10.0.1.5")));
        assert_eq!(first[0].1.len(), 1);
        for host in 6..16 {
            b.assign("eni-1", ip(&format!("10.0.1.{host}")));
        }
        b.assign("eni-1", ip("2001:db8::6"));
        b.assign("eni-2", ip("10.0.2.5"));
        // eni-1 is busy: only eni-2 goes.
        let next = b.take_ready();
        assert_eq!(
            next.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
            ["eni-2"]
        );
        b.done("eni-1");
        let batch = b.take_ready();
        assert_eq!(batch.len(), 1);
        let (eni, changes) = &batch[0];
        assert_eq!(eni, "eni-1");
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].addresses().len(), 10);
        assert_eq!(changes[1].action(), "AssignIpv6Addresses");
        assert_eq!(b.queued(), 0);
    }

    #[test]
    fn an_unassign_cancels_a_queued_assign_and_back() {
        let mut b = Batches::default();
        b.assign("eni-1", ip("10.0.1.5"));
        b.unassign("eni-1", ip("10.0.1.5"));
        b.unassign("eni-1", ip("10.0.1.6"));
        b.assign("eni-1", ip("10.0.1.6"));
        let batch = b.take_ready();
        let changes = &batch[0].1;
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].action(), "AssignPrivateIpAddresses");
        assert_eq!(changes[0].addresses(), vec![ip("10.0.1.6")]);
        assert_eq!(changes[1].action(), "UnassignPrivateIpAddresses");
        assert_eq!(changes[1].addresses(), vec![ip("10.0.1.5")]);
    }
}
