//! What EC2 knows of an ENI and the calls that change it: plain data shared by the sidecar's
//! direct mode and the node agent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An ENI id such as `eni-0123456789abcdef0`.
pub type EniId = String;

/// The part of an ENI that multus-eni reads and changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EniAddresses {
    pub id: EniId,
    pub subnet_id: Option<String>,
    /// The primary private IPv4: never assigned nor unassigned by the sidecar.
    pub primary_ipv4: Option<Ipv4Addr>,
    /// All private IPv4 addresses, primary included.
    pub ipv4: BTreeSet<Ipv4Addr>,
    pub ipv6: BTreeSet<Ipv6Addr>,
    /// Tag `node.k8s.amazonaws.com/no_manage=true` present: the VPC CNI leaves the ENI alone.
    pub no_manage: bool,
    /// The instance it is attached to, as read (`None`: detached, or not said).
    pub instance_id: Option<String>,
}

/// What EC2 said about the MAC of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EniLookup {
    /// The ENI with that MAC and its current addresses.
    Found(EniAddresses),
    /// A successful, empty answer: no ENI has this MAC (macvlan, SR-IOV, ...). The
    /// interface is left alone and does not hold readiness back.
    NoEni,
}

/// One mutating EC2 call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `AssignPrivateIpAddresses` with `AllowReassignment`: moves the address if another
    /// ENI holds it.
    AssignIpv4 {
        eni: EniId,
        addresses: Vec<Ipv4Addr>,
    },
    /// `AssignIpv6Addresses` (IPv6 has no reassignment: holders are unassigned first).
    AssignIpv6 {
        eni: EniId,
        addresses: Vec<Ipv6Addr>,
    },
    /// `UnassignPrivateIpAddresses`.
    UnassignIpv4 {
        eni: EniId,
        addresses: Vec<Ipv4Addr>,
    },
    /// `UnassignIpv6Addresses`.
    UnassignIpv6 {
        eni: EniId,
        addresses: Vec<Ipv6Addr>,
    },
}

// === impl EniAddresses ===

impl EniAddresses {
    /// Whether `address` is on this ENI (primary included).
    pub fn holds(&self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(v4) => self.ipv4.contains(&v4),
            IpAddr::V6(v6) => self.ipv6.contains(&v6),
        }
    }

    /// Records a change that EC2 accepted, so the next plan does not repeat it.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::AssignIpv4 { eni, addresses } if *eni == self.id => {
                self.ipv4.extend(addresses.iter().copied())
            }
            Change::AssignIpv6 { eni, addresses } if *eni == self.id => {
                self.ipv6.extend(addresses.iter().copied())
            }
            Change::UnassignIpv4 { eni, addresses } if *eni == self.id => {
                for a in addresses {
                    self.ipv4.remove(a);
                }
            }
            Change::UnassignIpv6 { eni, addresses } if *eni == self.id => {
                for a in addresses {
                    self.ipv6.remove(a);
                }
            }
            _ => {}
        }
    }
}

// === impl Change ===

impl Change {
    /// The ENI the call changes.
    pub fn eni(&self) -> &str {
        match self {
            Change::AssignIpv4 { eni, .. }
            | Change::AssignIpv6 { eni, .. }
            | Change::UnassignIpv4 { eni, .. }
            | Change::UnassignIpv6 { eni, .. } => eni,
        }
    }

    /// The EC2 action name, as in IAM policies and logs.
    pub fn action(&self) -> &'static str {
        match self {
            Change::AssignIpv4 { .. } => "AssignPrivateIpAddresses",
            Change::AssignIpv6 { .. } => "AssignIpv6Addresses",
            Change::UnassignIpv4 { .. } => "UnassignPrivateIpAddresses",
            Change::UnassignIpv6 { .. } => "UnassignIpv6Addresses",
        }
    }

    /// The addresses the call names.
    pub fn addresses(&self) -> Vec<IpAddr> {
        match self {
            Change::AssignIpv4 { addresses, .. } | Change::UnassignIpv4 { addresses, .. } => {
                addresses.iter().map(|a| IpAddr::V4(*a)).collect()
            }
            Change::AssignIpv6 { addresses, .. } | Change::UnassignIpv6 { addresses, .. } => {
                addresses.iter().map(|a| IpAddr::V6(*a)).collect()
            }
        }
    }

    /// The same call split into two halves of its addresses (`None` for a single address):
    /// how a batch that EC2 rejects because of one address is narrowed down to that address.
    pub fn halves(&self) -> Option<(Change, Change)> {
        fn split<T: Clone>(a: &[T]) -> Option<(Vec<T>, Vec<T>)> {
            (a.len() > 1).then(|| {
                let (l, r) = a.split_at(a.len() / 2);
                (l.to_vec(), r.to_vec())
            })
        }
        let eni = self.eni().to_string();
        Some(match self {
            Change::AssignIpv4 { addresses, .. } => {
                let (l, r) = split(addresses)?;
                (
                    Change::AssignIpv4 {
                        eni: eni.clone(),
                        addresses: l,
                    },
                    Change::AssignIpv4 { eni, addresses: r },
                )
            }
            Change::AssignIpv6 { addresses, .. } => {
                let (l, r) = split(addresses)?;
                (
                    Change::AssignIpv6 {
                        eni: eni.clone(),
                        addresses: l,
                    },
                    Change::AssignIpv6 { eni, addresses: r },
                )
            }
            Change::UnassignIpv4 { addresses, .. } => {
                let (l, r) = split(addresses)?;
                (
                    Change::UnassignIpv4 {
                        eni: eni.clone(),
                        addresses: l,
                    },
                    Change::UnassignIpv4 { eni, addresses: r },
                )
            }
            Change::UnassignIpv6 { addresses, .. } => {
                let (l, r) = split(addresses)?;
                (
                    Change::UnassignIpv6 {
                        eni: eni.clone(),
                        addresses: l,
                    },
                    Change::UnassignIpv6 { eni, addresses: r },
                )
            }
        })
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.addresses().iter().map(ToString::to_string).collect();
        write!(f, "{} {} [{}]", self.action(), self.eni(), list.join(","))
    }
}

/// Which *other* ENI holds an IPv6 address, as last read from EC2, kept across the retries of
/// a change: a throttled Assign executed nothing, so the holders found before it still hold,
/// and reading them again would spend the Describe bucket the account lacks right now.
/// Forget it when the picture may be wrong (resync, a failure other than throttling).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ipv6Holders {
    /// `None`: read, and no other ENI holds it.
    known: BTreeMap<Ipv6Addr, Option<EniId>>,
}

// === impl Ipv6Holders ===

impl Ipv6Holders {
    /// The addresses of `wanted` whose holder has not been read yet.
    pub fn unknown(&self, wanted: &BTreeSet<Ipv6Addr>) -> BTreeSet<Ipv6Addr> {
        wanted
            .iter()
            .filter(|a| !self.known.contains_key(a))
            .copied()
            .collect()
    }

    /// Records a lookup of `asked`: `found` names the holders, every other address has none.
    pub fn learn(&mut self, asked: &BTreeSet<Ipv6Addr>, found: &BTreeMap<Ipv6Addr, EniId>) {
        for a in asked {
            self.known.insert(*a, found.get(a).cloned());
        }
    }

    /// The known holders of `wanted`.
    pub fn holders(&self, wanted: &BTreeSet<Ipv6Addr>) -> BTreeMap<Ipv6Addr, EniId> {
        wanted
            .iter()
            .filter_map(|a| Some((*a, self.known.get(a)?.clone()?)))
            .collect()
    }

    /// Records a change that EC2 accepted: an unassigned address has no holder any more, an
    /// assigned one is ours (the next time it is missing, its holder must be read again).
    pub fn applied(&mut self, change: &Change) {
        match change {
            Change::UnassignIpv6 { addresses, .. } => {
                for a in addresses {
                    self.known.insert(*a, None);
                }
            }
            Change::AssignIpv6 { addresses, .. } => {
                for a in addresses {
                    self.known.remove(a);
                }
            }
            _ => {}
        }
    }

    /// Forgets everything: the next lookup reads EC2 again.
    pub fn forget(&mut self) {
        self.known.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
    }

    #[test]
    fn a_batch_halves_down_to_single_addresses() {
        let change = Change::AssignIpv4 {
            eni: "eni-a".into(),
            addresses: vec![v4("10.0.0.1"), v4("10.0.0.2"), v4("10.0.0.3")],
        };
        let Some((l, r)) = change.halves() else {
            panic!("three addresses split");
        };
        assert_eq!(l.addresses(), vec![IpAddr::V4(v4("10.0.0.1"))]);
        assert_eq!(r.addresses().len(), 2);
        assert_eq!((l.eni(), l.action()), ("eni-a", "AssignPrivateIpAddresses"));
        assert_eq!(l.halves(), None);
        let single6 = Change::UnassignIpv6 {
            eni: "eni-a".into(),
            addresses: vec![v6("2001:db8::1")],
        };
        assert_eq!(single6.halves(), None);
    }

    #[test]
    fn holders_are_kept_until_forgotten_and_follow_accepted_changes() {
        let (a, b) = (v6("2001:db8::a"), v6("2001:db8::b"));
        let wanted: BTreeSet<Ipv6Addr> = [a, b].into();
        let mut cache = Ipv6Holders::default();
        assert_eq!(cache.unknown(&wanted), wanted);
        cache.learn(&wanted, &[(a, "eni-other".to_string())].into());
        assert!(cache.unknown(&wanted).is_empty(), "a retry reads nothing");
        assert_eq!(
            cache.holders(&wanted),
            [(a, "eni-other".to_string())].into()
        );
        cache.applied(&Change::UnassignIpv6 {
            eni: "eni-other".into(),
            addresses: vec![a],
        });
        assert!(
            cache.holders(&wanted).is_empty(),
            "unassigned there: no holder left"
        );
        assert!(cache.unknown(&wanted).is_empty());
        cache.applied(&Change::AssignIpv6 {
            eni: "eni-ours".into(),
            addresses: vec![a],
        });
        assert_eq!(cache.unknown(&wanted), [a].into());
        cache.forget();
        assert_eq!(cache.unknown(&wanted), wanted);
    }
}
