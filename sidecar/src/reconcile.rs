//! Desired state (addresses on the pod's interfaces) vs observed state (addresses on the
//! node ENIs) → the EC2 changes to make. Pure functions over plain data, no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::addresses::MacAddress;
pub use multus_eni_ec2::model::{Change, EniAddresses, EniId, EniLookup};

/// What the sidecar wants: the usable addresses of one named pod interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredInterface {
    pub name: String,
    /// `None` for links without an Ethernet address (no ENI can match them).
    pub mac: Option<MacAddress>,
    /// Global-scope addresses that passed DAD: these must be on the ENI.
    pub addresses: BTreeSet<IpAddr>,
    /// IPv6 addresses still in duplicate address detection: not usable yet, not assigned
    /// yet, and they hold readiness back until they become usable.
    pub tentative: BTreeSet<Ipv6Addr>,
}

/// Addresses this sidecar has seen on its interfaces and found or put on an ENI, per
/// interface MAC: the only addresses it will ever unassign.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Managed(pub BTreeMap<MacAddress, BTreeSet<IpAddr>>);

/// Why `/readyz` answers 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    InterfaceMissing(String),
    Tentative {
        interface: String,
        address: Ipv6Addr,
    },
    EniUnknown {
        interface: String,
    },
    NotAssigned {
        interface: String,
        address: IpAddr,
    },
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::InterfaceMissing(name) => write!(f, "interface {name} does not exist yet"),
            NotReady::Tentative { interface, address } => {
                write!(f, "{address} on {interface} is still tentative (IPv6 DAD)")
            }
            NotReady::EniUnknown { interface } => {
                write!(f, "the ENI of {interface} is not known yet")
            }
            NotReady::NotAssigned { interface, address } => {
                write!(f, "{address} of {interface} is not assigned to its ENI yet")
            }
        }
    }
}

// === impl Managed ===

impl Managed {
    /// Takes ownership of every desired address that is now on its ENI.
    pub fn record(&mut self, desired: &[DesiredInterface], enis: &BTreeMap<MacAddress, EniLookup>) {
        for (mac, wanted) in desired_by_mac(desired) {
            if let Some(EniLookup::Found(eni)) = enis.get(&mac) {
                let held: BTreeSet<IpAddr> = wanted.into_iter().filter(|a| eni.holds(*a)).collect();
                if !held.is_empty() {
                    self.0.entry(mac).or_default().extend(held);
                }
            }
        }
    }

    /// Forgets addresses that left the interfaces and are no longer on that MAC's ENI
    /// (unassigned by us, or moved to another ENI: not ours to release any more).
    pub fn forget_released(
        &mut self,
        desired: &[DesiredInterface],
        enis: &BTreeMap<MacAddress, EniLookup>,
    ) {
        let wanted = desired_by_mac(desired);
        for (mac, owned) in self.0.iter_mut() {
            let empty = BTreeSet::new();
            let still_wanted = wanted.get(mac).unwrap_or(&empty);
            match enis.get(mac) {
                Some(EniLookup::Found(eni)) => {
                    owned.retain(|a| still_wanted.contains(a) || eni.holds(*a))
                }
                Some(EniLookup::NoEni) => owned.clear(),
                None => {}
            }
        }
        self.0.retain(|_, owned| !owned.is_empty());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Usable desired addresses grouped by interface MAC (interfaces sharing an ipvlan master
/// share its MAC and therefore its ENI).
fn desired_by_mac(desired: &[DesiredInterface]) -> BTreeMap<MacAddress, BTreeSet<IpAddr>> {
    let mut by_mac: BTreeMap<MacAddress, BTreeSet<IpAddr>> = BTreeMap::new();
    for iface in desired {
        if let Some(mac) = iface.mac {
            by_mac
                .entry(mac)
                .or_default()
                .extend(iface.addresses.iter().copied());
        }
    }
    by_mac
}

/// IPv6 addresses that must be added to each ENI: the ones whose current holder (another
/// ENI) has to be found before `AssignIpv6Addresses`.
pub fn missing_ipv6(
    desired: &[DesiredInterface],
    enis: &BTreeMap<MacAddress, EniLookup>,
) -> BTreeMap<EniId, BTreeSet<Ipv6Addr>> {
    let mut missing: BTreeMap<EniId, BTreeSet<Ipv6Addr>> = BTreeMap::new();
    for (mac, wanted) in desired_by_mac(desired) {
        if let Some(EniLookup::Found(eni)) = enis.get(&mac) {
            let v6: BTreeSet<Ipv6Addr> = wanted
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V6(v6) if !eni.ipv6.contains(v6) => Some(*v6),
                    _ => None,
                })
                .collect();
            if !v6.is_empty() {
                missing.insert(eni.id.clone(), v6);
            }
        }
    }
    missing
}

#[derive(Default)]
struct EniChanges {
    assign4: BTreeSet<Ipv4Addr>,
    assign6: BTreeSet<Ipv6Addr>,
    unassign4: BTreeSet<Ipv4Addr>,
    unassign6: BTreeSet<Ipv6Addr>,
}

/// The EC2 calls that bring the ENIs to the desired state: at most one call per kind per
/// ENI; all unassignments (IPv6 holders on other ENIs, addresses that left our interfaces)
/// before all assignments; nothing for what is already there, for unknown ENIs, or for
/// MACs without an ENI. `ipv6_holders` maps an IPv6 address to the *other* ENI holding it.
pub fn plan_changes(
    desired: &[DesiredInterface],
    enis: &BTreeMap<MacAddress, EniLookup>,
    managed: &Managed,
    ipv6_holders: &BTreeMap<Ipv6Addr, EniId>,
) -> Vec<Change> {
    let wanted = desired_by_mac(desired);
    let mut per_eni: BTreeMap<EniId, EniChanges> = BTreeMap::new();
    let empty = BTreeSet::new();

    for (mac, lookup) in enis {
        let EniLookup::Found(eni) = lookup else {
            continue;
        };
        let want = wanted.get(mac).unwrap_or(&empty);
        let ours = managed.0.get(mac).unwrap_or(&empty);
        for address in want {
            match *address {
                // Also when our picture says the ENI has it, until it is recorded as ours: the
                // picture may be stale (another pod just unassigned it, a VIP handed over),
                // and with `AllowReassignment` the Assign is harmless when it is there.
                IpAddr::V4(v4)
                    if eni.primary_ipv4 != Some(v4)
                        && (!eni.ipv4.contains(&v4) || !ours.contains(address)) =>
                {
                    per_eni
                        .entry(eni.id.clone())
                        .or_default()
                        .assign4
                        .insert(v4);
                }
                IpAddr::V6(v6) if !eni.ipv6.contains(&v6) => {
                    if let Some(holder) = ipv6_holders.get(&v6).filter(|h| **h != eni.id) {
                        per_eni
                            .entry(holder.clone())
                            .or_default()
                            .unassign6
                            .insert(v6);
                    }
                    per_eni
                        .entry(eni.id.clone())
                        .or_default()
                        .assign6
                        .insert(v6);
                }
                _ => {}
            }
        }
        let Some(owned) = managed.0.get(mac) else {
            continue;
        };
        for address in owned.difference(want) {
            match *address {
                IpAddr::V4(v4) if eni.ipv4.contains(&v4) && eni.primary_ipv4 != Some(v4) => {
                    per_eni
                        .entry(eni.id.clone())
                        .or_default()
                        .unassign4
                        .insert(v4);
                }
                IpAddr::V6(v6) if eni.ipv6.contains(&v6) => {
                    per_eni
                        .entry(eni.id.clone())
                        .or_default()
                        .unassign6
                        .insert(v6);
                }
                _ => {}
            }
        }
    }

    let mut unassigns = Vec::new();
    let mut assigns = Vec::new();
    for (eni, c) in per_eni {
        if !c.unassign6.is_empty() {
            unassigns.push(Change::UnassignIpv6 {
                eni: eni.clone(),
                addresses: c.unassign6.into_iter().collect(),
            });
        }
        if !c.unassign4.is_empty() {
            unassigns.push(Change::UnassignIpv4 {
                eni: eni.clone(),
                addresses: c.unassign4.into_iter().collect(),
            });
        }
        if !c.assign6.is_empty() {
            assigns.push(Change::AssignIpv6 {
                eni: eni.clone(),
                addresses: c.assign6.into_iter().collect(),
            });
        }
        if !c.assign4.is_empty() {
            assigns.push(Change::AssignIpv4 {
                eni,
                addresses: c.assign4.into_iter().collect(),
            });
        }
    }
    unassigns.extend(assigns);
    unassigns
}

/// `change` without the IPv6 addresses in `held_back` (their holder could not be read or
/// could not be unassigned: EC2 would refuse the Assign); `None` when nothing is left.
pub fn without_held_back(change: Change, held_back: &BTreeSet<Ipv6Addr>) -> Option<Change> {
    match change {
        Change::AssignIpv6 { eni, addresses } => {
            let addresses: Vec<Ipv6Addr> = addresses
                .into_iter()
                .filter(|a| !held_back.contains(a))
                .collect();
            (!addresses.is_empty()).then_some(Change::AssignIpv6 { eni, addresses })
        }
        other => Some(other),
    }
}

/// `change` without the addresses that wait out a backoff of their own (EC2 rejected them
/// lately); `None` when nothing is left. Only assignments wait: an unassign is never held back.
pub fn without_waiting(change: Change, waiting: &BTreeSet<IpAddr>) -> Option<Change> {
    match change {
        Change::AssignIpv4 { eni, addresses } => {
            let addresses: Vec<Ipv4Addr> = addresses
                .into_iter()
                .filter(|a| !waiting.contains(&IpAddr::V4(*a)))
                .collect();
            (!addresses.is_empty()).then_some(Change::AssignIpv4 { eni, addresses })
        }
        Change::AssignIpv6 { eni, addresses } => {
            let addresses: Vec<Ipv6Addr> = addresses
                .into_iter()
                .filter(|a| !waiting.contains(&IpAddr::V6(*a)))
                .collect();
            (!addresses.is_empty()).then_some(Change::AssignIpv6 { eni, addresses })
        }
        other => Some(other),
    }
}

/// The calls made on exit: unassign managed addresses that are still on *our* ENI (freshly
/// read), never one that moved to another ENI, never the primary IPv4.
pub fn plan_release(managed: &Managed, enis: &BTreeMap<MacAddress, EniLookup>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (mac, owned) in &managed.0 {
        let Some(EniLookup::Found(eni)) = enis.get(mac) else {
            continue;
        };
        let v6: Vec<Ipv6Addr> = owned
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(v6) if eni.ipv6.contains(v6) => Some(*v6),
                _ => None,
            })
            .collect();
        let v4: Vec<Ipv4Addr> = owned
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) if eni.ipv4.contains(v4) && eni.primary_ipv4 != Some(*v4) => {
                    Some(*v4)
                }
                _ => None,
            })
            .collect();
        if !v6.is_empty() {
            changes.push(Change::UnassignIpv6 {
                eni: eni.id.clone(),
                addresses: v6,
            });
        }
        if !v4.is_empty() {
            changes.push(Change::UnassignIpv4 {
                eni: eni.id.clone(),
                addresses: v4,
            });
        }
    }
    changes
}

/// `Ok` when every usable address of every named interface is on its ENI. Interfaces whose
/// MAC matches no ENI (or that have no MAC) do not hold readiness back.
pub fn readiness(
    wanted: &[String],
    desired: &[DesiredInterface],
    enis: &BTreeMap<MacAddress, EniLookup>,
) -> Result<(), NotReady> {
    for name in wanted {
        let Some(iface) = desired.iter().find(|d| d.name == *name) else {
            return Err(NotReady::InterfaceMissing(name.clone()));
        };
        if let Some(address) = iface.tentative.first() {
            return Err(NotReady::Tentative {
                interface: name.clone(),
                address: *address,
            });
        }
        let Some(mac) = iface.mac else { continue };
        match enis.get(&mac) {
            None => {
                return Err(NotReady::EniUnknown {
                    interface: name.clone(),
                });
            }
            Some(EniLookup::NoEni) => {}
            Some(EniLookup::Found(eni)) => {
                if let Some(address) = iface.addresses.iter().find(|a| !eni.holds(**a)) {
                    return Err(NotReady::NotAssigned {
                        interface: name.clone(),
                        address: *address,
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC1: MacAddress = MacAddress([2, 0, 0, 0, 0, 1]);
    const MAC2: MacAddress = MacAddress([2, 0, 0, 0, 0, 2]);
    const MAC_NONE: MacAddress = MacAddress([2, 0, 0, 0, 0, 9]);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn iface(name: &str, mac: MacAddress, addrs: &[&str]) -> DesiredInterface {
        DesiredInterface {
            name: name.into(),
            mac: Some(mac),
            addresses: addrs.iter().map(|a| ip(a)).collect(),
            tentative: BTreeSet::new(),
        }
    }

    fn eni(id: &str, primary: &str, addrs: &[&str]) -> EniAddresses {
        let mut e = EniAddresses {
            id: id.into(),
            subnet_id: Some("subnet-1".into()),
            primary_ipv4: Some(v4(primary)),
            ipv4: [v4(primary)].into(),
            ..Default::default()
        };
        for a in addrs {
            match ip(a) {
                IpAddr::V4(x) => {
                    e.ipv4.insert(x);
                }
                IpAddr::V6(x) => {
                    e.ipv6.insert(x);
                }
            }
        }
        e
    }

    fn lookups(items: &[(MacAddress, EniLookup)]) -> BTreeMap<MacAddress, EniLookup> {
        items.iter().cloned().collect()
    }

    #[test]
    fn missing_addresses_are_batched_in_one_call_per_kind() {
        let desired = [
            iface("net1", MAC1, &["10.0.1.10", "10.0.1.11", "2001:db8::10"]),
            iface("n3", MAC1, &["10.0.1.12", "2001:db8::11"]),
        ];
        let enis = lookups(&[(MAC1, EniLookup::Found(eni("eni-a", "10.0.1.5", &[])))]);
        let plan = plan_changes(&desired, &enis, &Managed::default(), &BTreeMap::new());
        assert_eq!(
            plan,
            vec![
                Change::AssignIpv6 {
                    eni: "eni-a".into(),
                    addresses: vec![v6("2001:db8::10"), v6("2001:db8::11")]
                },
                Change::AssignIpv4 {
                    eni: "eni-a".into(),
                    addresses: vec![v4("10.0.1.10"), v4("10.0.1.11"), v4("10.0.1.12")]
                },
            ]
        );
    }

    #[test]
    fn nothing_to_do_when_everything_is_there() {
        let desired = [iface("net1", MAC1, &["10.0.1.10", "2001:db8::10"])];
        let enis = lookups(&[(
            MAC1,
            EniLookup::Found(eni("eni-a", "10.0.1.5", &["10.0.1.10", "2001:db8::10"])),
        )]);
        let mut managed = Managed::default();
        managed.record(&desired, &enis);
        assert!(plan_changes(&desired, &enis, &managed, &BTreeMap::new()).is_empty());
        assert_eq!(readiness(&["net1".into()], &desired, &enis), Ok(()));
    }

    #[test]
    fn an_ipv4_the_picture_shows_on_the_eni_is_assigned_until_it_is_ours() {
        // A VIP another pod on the node just gave up: our picture still shows it on the ENI.
        let desired = [iface("net1", MAC1, &["10.0.1.10"])];
        let enis = lookups(&[(
            MAC1,
            EniLookup::Found(eni("eni-a", "10.0.1.5", &["10.0.1.10"])),
        )]);
        assert_eq!(
            plan_changes(&desired, &enis, &Managed::default(), &BTreeMap::new()),
            vec![Change::AssignIpv4 {
                eni: "eni-a".into(),
                addresses: vec![v4("10.0.1.10")]
            }]
        );
        let mut managed = Managed::default();
        managed.record(&desired, &enis);
        assert!(plan_changes(&desired, &enis, &managed, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn held_back_ipv6_addresses_leave_the_assign() {
        let change = Change::AssignIpv6 {
            eni: "eni-a".into(),
            addresses: vec![v6("2001:db8::1"), v6("2001:db8::2")],
        };
        let held: BTreeSet<Ipv6Addr> = [v6("2001:db8::1")].into();
        assert_eq!(
            without_held_back(change.clone(), &held),
            Some(Change::AssignIpv6 {
                eni: "eni-a".into(),
                addresses: vec![v6("2001:db8::2")]
            })
        );
        let all: BTreeSet<Ipv6Addr> = [v6("2001:db8::1"), v6("2001:db8::2")].into();
        assert_eq!(without_held_back(change, &all), None);
        let v4 = Change::AssignIpv4 {
            eni: "eni-a".into(),
            addresses: vec![v4("10.0.1.10")],
        };
        assert_eq!(without_held_back(v4.clone(), &all), Some(v4));
    }

    #[test]
    fn an_address_waiting_out_its_backoff_leaves_the_assign_and_the_new_one_goes_at_once() {
        // EC2 rejected 2001:db8::bad; 2001:db8::add was added meanwhile. The plan names both;
        // the call names the new one alone, without waiting for the rejected one.
        let desired = [iface(
            "net1",
            MAC1,
            &["2001:db8::bad", "2001:db8::add", "10.0.1.10"],
        )];
        let enis = lookups(&[(MAC1, EniLookup::Found(eni("eni-a", "10.0.1.5", &[])))]);
        let waiting: BTreeSet<IpAddr> =
            ["2001:db8::bad".parse().unwrap_or(IpAddr::V4([0; 4].into()))].into();
        let calls: Vec<Change> =
            plan_changes(&desired, &enis, &Managed::default(), &BTreeMap::new())
                .into_iter()
                .filter_map(|c| without_waiting(c, &waiting))
                .collect();
        assert_eq!(
            calls,
            vec![
                Change::AssignIpv6 {
                    eni: "eni-a".into(),
                    addresses: vec![v6("2001:db8::add")]
                },
                Change::AssignIpv4 {
                    eni: "eni-a".into(),
                    addresses: vec![v4("10.0.1.10")]
                },
            ]
        );
        // Only the waiting address leaves; an assign of nothing but it is dropped; unassigns
        // never wait.
        let only_bad = Change::AssignIpv6 {
            eni: "eni-a".into(),
            addresses: vec![v6("2001:db8::bad")],
        };
        assert_eq!(without_waiting(only_bad, &waiting), None);
        let unassign = Change::UnassignIpv6 {
            eni: "eni-a".into(),
            addresses: vec![v6("2001:db8::bad")],
        };
        assert_eq!(without_waiting(unassign.clone(), &waiting), Some(unassign));
    }

    #[test]
    fn applying_the_plan_makes_it_idempotent() {
        let desired = [iface("net1", MAC1, &["10.0.1.10", "2001:db8::10"])];
        let mut enis = lookups(&[(MAC1, EniLookup::Found(eni("eni-a", "10.0.1.5", &[])))]);
        let plan = plan_changes(&desired, &enis, &Managed::default(), &BTreeMap::new());
        assert_eq!(plan.len(), 2);
        if let Some(EniLookup::Found(e)) = enis.get_mut(&MAC1) {
            for change in &plan {
                e.apply(change);
            }
        }
        let mut managed = Managed::default();
        managed.record(&desired, &enis);
        assert!(plan_changes(&desired, &enis, &managed, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn primary_address_on_the_interface_is_never_assigned_or_released() {
        let desired = [iface("net1", MAC1, &["10.0.1.5"])];
        let enis = lookups(&[(MAC1, EniLookup::Found(eni("eni-a", "10.0.1.5", &[])))]);
        let mut managed = Managed::default();
        managed.record(&desired, &enis);
        assert!(plan_changes(&desired, &enis, &managed, &BTreeMap::new()).is_empty());
        assert!(plan_release(&managed, &enis).is_empty());
        assert!(
            plan_changes(
                &[iface("net1", MAC1, &[])],
                &enis,
                &managed,
                &BTreeMap::new()
            )
            .is_empty()
        );
    }

    #[test]
    fn removed_address_is_unassigned_only_if_managed_and_still_there() {
        let enis = lookups(&[(
            MAC1,
            EniLookup::Found(eni(
                "eni-a",
                "10.0.1.5",
                &["10.0.1.10", "10.0.1.99", "2001:db8::10"],
            )),
        )]);
        let before = [iface("net1", MAC1, &["10.0.1.10", "2001:db8::10"])];
        let mut managed = Managed::default();
        managed.record(&before, &enis);
        let after = [iface("net1", MAC1, &[])];
        let plan = plan_changes(&after, &enis, &managed, &BTreeMap::new());
        // 10.0.1.99 belongs to someone else on the same ENI (another pod): untouched.
        assert_eq!(
            plan,
            vec![
                Change::UnassignIpv6 {
                    eni: "eni-a".into(),
                    addresses: vec![v6("2001:db8::10")]
                },
                Change::UnassignIpv4 {
                    eni: "eni-a".into(),
                    addresses: vec![v4("10.0.1.10")]
                },
            ]
        );
    }

    #[test]
    fn ipv6_held_by_another_eni_is_unassigned_there_first() {
        let desired = [iface("net1", MAC1, &["2001:db8::10", "2001:db8::11"])];
        let enis = lookups(&[(MAC1, EniLookup::Found(eni("eni-a", "10.0.1.5", &[])))]);
        let holders: BTreeMap<Ipv6Addr, EniId> = [(v6("2001:db8::10"), "eni-b".to_string())].into();
        let plan = plan_changes(&desired, &enis, &Managed::default(), &holders);
        assert_eq!(
            plan,
            vec![
                Change::UnassignIpv6 {
                    eni: "eni-b".into(),
                    addresses: vec![v6("2001:db8::10")]
                },
                Change::AssignIpv6 {
                    eni: "eni-a".into(),
                    addresses: vec![v6("2001:db8::10"), v6("2001:db8::11")]
                },
            ]
        );
        assert_eq!(
            missing_ipv6(&desired, &enis),
            [(
                "eni-a".to_string(),
                [v6("2001:db8::10"), v6("2001:db8::11")].into()
            )]
            .into()
        );
    }

    #[test]
    fn ipv4_held_by_another_eni_is_assigned_with_reassignment_not_unassigned() {
        let desired = [iface("net1", MAC1, &["10.0.1.10"])];
        let enis = lookups(&[
            (MAC1, EniLookup::Found(eni("eni-a", "10.0.1.5", &[]))),
            (
                MAC2,
                EniLookup::Found(eni("eni-b", "10.0.1.6", &["10.0.1.10"])),
            ),
        ]);
        let plan = plan_changes(&desired, &enis, &Managed::default(), &BTreeMap::new());
        assert_eq!(
            plan,
            vec![Change::AssignIpv4 {
                eni: "eni-a".into(),
                addresses: vec![v4("10.0.1.10")]
            }]
        );
    }

    #[test]
    fn release_only_what_is_still_on_our_eni() {
        let desired = [iface(
            "net1",
            MAC1,
            &["10.0.1.10", "10.0.1.11", "2001:db8::10"],
        )];
        let at_start = lookups(&[(
            MAC1,
            EniLookup::Found(eni(
                "eni-a",
                "10.0.1.5",
                &["10.0.1.10", "10.0.1.11", "2001:db8::10"],
            )),
        )]);
        let mut managed = Managed::default();
        managed.record(&desired, &at_start);
        // Meanwhile 10.0.1.11 and the IPv6 moved to another ENI.
        let at_exit = lookups(&[(
            MAC1,
            EniLookup::Found(eni("eni-a", "10.0.1.5", &["10.0.1.10"])),
        )]);
        assert_eq!(
            plan_release(&managed, &at_exit),
            vec![Change::UnassignIpv4 {
                eni: "eni-a".into(),
                addresses: vec![v4("10.0.1.10")]
            }]
        );
    }

    #[test]
    fn unknown_mac_is_left_alone_and_does_not_hold_readiness() {
        let desired = [
            iface("net1", MAC1, &["10.0.1.10"]),
            iface("net2", MAC_NONE, &["192.168.5.5"]),
        ];
        let enis = lookups(&[
            (
                MAC1,
                EniLookup::Found(eni("eni-a", "10.0.1.5", &["10.0.1.10"])),
            ),
            (MAC_NONE, EniLookup::NoEni),
        ]);
        let wanted = vec!["net1".to_string(), "net2".to_string()];
        let mut managed = Managed::default();
        managed.record(&desired, &enis);
        assert!(plan_changes(&desired, &enis, &managed, &BTreeMap::new()).is_empty());
        assert_eq!(readiness(&wanted, &desired, &enis), Ok(()));
        assert!(!managed.0.contains_key(&MAC_NONE));
        assert_eq!(
            plan_release(&managed, &enis),
            vec![Change::UnassignIpv4 {
                eni: "eni-a".into(),
                addresses: vec![v4("10.0.1.10")]
            }]
        );
    }

    #[test]
    fn readiness_waits_for_interface_eni_lookup_tentative_and_assignment() {
        let wanted = vec!["net1".to_string()];
        let mut desired = vec![iface("net1", MAC1, &["10.0.1.10"])];
        let empty = BTreeMap::new();
        assert_eq!(
            readiness(&wanted, &[], &empty),
            Err(NotReady::InterfaceMissing("net1".into()))
        );
        assert_eq!(
            readiness(&wanted, &desired, &empty),
            Err(NotReady::EniUnknown {
                interface: "net1".into()
            })
        );
        let enis = lookups(&[(MAC1, EniLookup::Found(eni("eni-a", "10.0.1.5", &[])))]);
        assert_eq!(
            readiness(&wanted, &desired, &enis),
            Err(NotReady::NotAssigned {
                interface: "net1".into(),
                address: ip("10.0.1.10")
            })
        );
        desired[0].addresses.clear();
        desired[0].tentative.insert(v6("2001:db8::10"));
        assert!(matches!(
            readiness(&wanted, &desired, &enis),
            Err(NotReady::Tentative { .. })
        ));
    }

    #[test]
    fn unknown_eni_state_plans_nothing() {
        let desired = [iface("net1", MAC1, &["10.0.1.10"])];
        assert!(
            plan_changes(
                &desired,
                &BTreeMap::new(),
                &Managed::default(),
                &BTreeMap::new()
            )
            .is_empty()
        );
    }

    #[test]
    fn managed_forgets_addresses_that_moved_away_or_were_released() {
        let desired = [iface("net1", MAC1, &["10.0.1.10", "10.0.1.11"])];
        let enis = lookups(&[(
            MAC1,
            EniLookup::Found(eni("eni-a", "10.0.1.5", &["10.0.1.10", "10.0.1.11"])),
        )]);
        let mut managed = Managed::default();
        managed.record(&desired, &enis);
        let later = [iface("net1", MAC1, &["10.0.1.10"])];
        let enis_later = lookups(&[(
            MAC1,
            EniLookup::Found(eni("eni-a", "10.0.1.5", &["10.0.1.10"])),
        )]);
        managed.forget_released(&later, &enis_later);
        assert_eq!(managed.0.get(&MAC1), Some(&[ip("10.0.1.10")].into()));
    }

    #[test]
    fn address_moving_between_interfaces_of_different_enis() {
        let enis = lookups(&[
            (
                MAC1,
                EniLookup::Found(eni("eni-a", "10.0.1.5", &["10.0.1.10"])),
            ),
            (MAC2, EniLookup::Found(eni("eni-b", "10.0.1.6", &[]))),
        ]);
        let mut managed = Managed::default();
        managed.record(&[iface("net1", MAC1, &["10.0.1.10"])], &enis);
        let desired = [iface("net1", MAC1, &[]), iface("n3", MAC2, &["10.0.1.10"])];
        assert_eq!(
            plan_changes(&desired, &enis, &managed, &BTreeMap::new()),
            vec![
                Change::UnassignIpv4 {
                    eni: "eni-a".into(),
                    addresses: vec![v4("10.0.1.10")]
                },
                Change::AssignIpv4 {
                    eni: "eni-b".into(),
                    addresses: vec![v4("10.0.1.10")]
                },
            ]
        );
    }
}
