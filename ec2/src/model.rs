//! What EC2 knows of an ENI and the calls that change it: plain data shared by the sidecar's
//! direct mode and the node agent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

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
    /// Delegated IPv4 prefixes (/28): every address inside is routable to the ENI.
    pub ipv4_prefixes: BTreeSet<Ipv4Net>,
    /// Delegated IPv6 prefixes (/80).
    pub ipv6_prefixes: BTreeSet<Ipv6Net>,
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

/// One mutating EC2 call that names prefixes only: EC2 refuses a request that mixes prefixes
/// and addresses (`InvalidParameterCombination`), so the type cannot express one. The IAM
/// actions are those of addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixChange {
    /// `AssignPrivateIpAddresses` with `Ipv4Prefix.N` (never `AllowReassignment`: a prefix is
    /// only assigned where nobody holds it).
    AssignIpv4 { eni: EniId, prefixes: Vec<Ipv4Net> },
    /// `AssignIpv6Addresses` with `Ipv6Prefix.N`.
    AssignIpv6 { eni: EniId, prefixes: Vec<Ipv6Net> },
    /// `UnassignPrivateIpAddresses` with `Ipv4Prefix.N`.
    UnassignIpv4 { eni: EniId, prefixes: Vec<Ipv4Net> },
    /// `UnassignIpv6Addresses` with `Ipv6Prefix.N`.
    UnassignIpv6 { eni: EniId, prefixes: Vec<Ipv6Net> },
}

// === impl PrefixChange ===

impl PrefixChange {
    /// The calls that assign (or unassign) `prefixes` on `eni`: at most one per family.
    pub fn of(eni: &str, assign: bool, prefixes: &BTreeSet<IpNet>) -> Vec<PrefixChange> {
        let v4: Vec<Ipv4Net> = prefixes
            .iter()
            .filter_map(|p| match p {
                IpNet::V4(p) => Some(*p),
                IpNet::V6(_) => None,
            })
            .collect();
        let v6: Vec<Ipv6Net> = prefixes
            .iter()
            .filter_map(|p| match p {
                IpNet::V6(p) => Some(*p),
                IpNet::V4(_) => None,
            })
            .collect();
        let eni = eni.to_string();
        let mut out = Vec::new();
        if !v4.is_empty() {
            out.push(if assign {
                PrefixChange::AssignIpv4 {
                    eni: eni.clone(),
                    prefixes: v4,
                }
            } else {
                PrefixChange::UnassignIpv4 {
                    eni: eni.clone(),
                    prefixes: v4,
                }
            });
        }
        if !v6.is_empty() {
            out.push(if assign {
                PrefixChange::AssignIpv6 { eni, prefixes: v6 }
            } else {
                PrefixChange::UnassignIpv6 { eni, prefixes: v6 }
            });
        }
        out
    }

    /// The ENI the call changes.
    pub fn eni(&self) -> &str {
        match self {
            PrefixChange::AssignIpv4 { eni, .. }
            | PrefixChange::AssignIpv6 { eni, .. }
            | PrefixChange::UnassignIpv4 { eni, .. }
            | PrefixChange::UnassignIpv6 { eni, .. } => eni,
        }
    }

    pub fn is_assign(&self) -> bool {
        matches!(
            self,
            PrefixChange::AssignIpv4 { .. } | PrefixChange::AssignIpv6 { .. }
        )
    }

    /// The EC2 action name, as in IAM policies and logs (the same as for addresses).
    pub fn action(&self) -> &'static str {
        match self {
            PrefixChange::AssignIpv4 { .. } => "AssignPrivateIpAddresses",
            PrefixChange::AssignIpv6 { .. } => "AssignIpv6Addresses",
            PrefixChange::UnassignIpv4 { .. } => "UnassignPrivateIpAddresses",
            PrefixChange::UnassignIpv6 { .. } => "UnassignIpv6Addresses",
        }
    }

    /// The prefixes the call names.
    pub fn prefixes(&self) -> Vec<IpNet> {
        match self {
            PrefixChange::AssignIpv4 { prefixes, .. }
            | PrefixChange::UnassignIpv4 { prefixes, .. } => {
                prefixes.iter().map(|p| IpNet::V4(*p)).collect()
            }
            PrefixChange::AssignIpv6 { prefixes, .. }
            | PrefixChange::UnassignIpv6 { prefixes, .. } => {
                prefixes.iter().map(|p| IpNet::V6(*p)).collect()
            }
        }
    }

    /// The same call split into two halves of its prefixes (`None` for a single prefix): a
    /// refused request is narrowed down to the prefix EC2 refuses, the others go on.
    pub fn halves(&self) -> Option<(PrefixChange, PrefixChange)> {
        let all: BTreeSet<IpNet> = self.prefixes().into_iter().collect();
        if all.len() < 2 {
            return None;
        }
        let left: BTreeSet<IpNet> = all.iter().take(all.len() / 2).copied().collect();
        let right: BTreeSet<IpNet> = all.difference(&left).copied().collect();
        let l = PrefixChange::of(self.eni(), self.is_assign(), &left).pop()?;
        let r = PrefixChange::of(self.eni(), self.is_assign(), &right).pop()?;
        Some((l, r))
    }
}

impl fmt::Display for PrefixChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.prefixes().iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} {} prefixes [{}]",
            self.action(),
            self.eni(),
            list.join(",")
        )
    }
}

// === impl EniAddresses ===

impl EniAddresses {
    /// Whether `address` is routable to this ENI: assigned to it (primary included) or inside
    /// one of its delegated prefixes.
    pub fn holds(&self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(v4) => {
                self.ipv4.contains(&v4) || self.ipv4_prefixes.iter().any(|p| p.contains(&v4))
            }
            IpAddr::V6(v6) => {
                self.ipv6.contains(&v6) || self.ipv6_prefixes.iter().any(|p| p.contains(&v6))
            }
        }
    }

    /// The delegated prefix `address` is routable through, if any.
    pub fn prefix_over(&self, address: IpAddr) -> Option<IpNet> {
        match address {
            IpAddr::V4(v4) => self
                .ipv4_prefixes
                .iter()
                .find(|p| p.contains(&v4))
                .map(|p| IpNet::V4(*p)),
            IpAddr::V6(v6) => self
                .ipv6_prefixes
                .iter()
                .find(|p| p.contains(&v6))
                .map(|p| IpNet::V6(*p)),
        }
    }

    /// Whether `prefix` is delegated to this ENI.
    pub fn has_prefix(&self, prefix: IpNet) -> bool {
        match prefix {
            IpNet::V4(p) => self.ipv4_prefixes.contains(&p),
            IpNet::V6(p) => self.ipv6_prefixes.contains(&p),
        }
    }

    /// Every prefix delegated to this ENI, both families.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.ipv4_prefixes
            .iter()
            .map(|p| IpNet::V4(*p))
            .chain(self.ipv6_prefixes.iter().map(|p| IpNet::V6(*p)))
    }

    /// Records a prefix change that EC2 accepted.
    pub fn apply_prefixes(&mut self, change: &PrefixChange) {
        if change.eni() != self.id {
            return;
        }
        for p in change.prefixes() {
            match (change.is_assign(), p) {
                (true, IpNet::V4(p)) => self.ipv4_prefixes.insert(p),
                (true, IpNet::V6(p)) => self.ipv6_prefixes.insert(p),
                (false, IpNet::V4(p)) => self.ipv4_prefixes.remove(&p),
                (false, IpNet::V6(p)) => self.ipv6_prefixes.remove(&p),
            };
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
    fn an_address_inside_a_delegated_prefix_is_held() {
        let mut eni = EniAddresses {
            id: "eni-a".into(),
            ..Default::default()
        };
        let p4: IpNet = "10.0.0.64/28".parse().unwrap_or_else(|e| panic!("{e}"));
        let p6: IpNet = "2001:db8:0:0:1::/80"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let inside = IpAddr::V4(v4("10.0.0.77"));
        let inside6 = IpAddr::V6(v6("2001:db8::1:0:0:9"));
        assert!(!eni.holds(inside));
        for change in PrefixChange::of("eni-a", true, &[p4, p6].into()) {
            eni.apply_prefixes(&change);
        }
        assert!(eni.holds(inside) && eni.holds(inside6));
        assert!(!eni.holds(IpAddr::V4(v4("10.0.0.80"))), "past the /28");
        assert_eq!(eni.prefix_over(inside), Some(p4));
        assert_eq!(eni.prefixes().count(), 2);
        eni.apply_prefixes(&PrefixChange::UnassignIpv4 {
            eni: "eni-other".into(),
            prefixes: vec!["10.0.0.64/28".parse().unwrap_or_else(|e| panic!("{e}"))],
        });
        assert!(eni.has_prefix(p4), "another ENI's change");
        for change in PrefixChange::of("eni-a", false, &[p4].into()) {
            assert_eq!(change.action(), "UnassignPrivateIpAddresses");
            eni.apply_prefixes(&change);
        }
        assert!(!eni.holds(inside) && eni.holds(inside6));
    }

    #[test]
    fn prefix_calls_are_one_per_family_and_halve_down_to_one_prefix() {
        let ps: BTreeSet<IpNet> = [
            "10.0.0.0/28",
            "10.0.0.16/28",
            "10.0.0.32/28",
            "2001:db8::/80",
        ]
        .iter()
        .map(|p| p.parse().unwrap_or_else(|e| panic!("{e}")))
        .collect();
        let calls = PrefixChange::of("eni-a", true, &ps);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].prefixes().len(), 3);
        assert_eq!(calls[1].action(), "AssignIpv6Addresses");
        let Some((l, r)) = calls[0].halves() else {
            panic!("three prefixes split");
        };
        assert_eq!((l.prefixes().len(), r.prefixes().len()), (1, 2));
        assert!(l.is_assign() && l.eni() == "eni-a");
        assert_eq!(l.halves(), None);
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
