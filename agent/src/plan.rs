//! The node agent's decisions, as pure functions over what it sees: which address is wanted on
//! which of this instance's ENIs, what the node's pods hold (never reclaimed), and where one
//! address stands (routable, pending, refused, conflict, no ENI).
//!
//! Inputs are the pod network namespaces read by [`crate::watch`] and the ENIs attached to
//! this instance; a sidecar's claim is only a hint and is never an input here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use multus_eni_ec2::MacAddress;
use multus_eni_ec2::eni::NO_MANAGE_TAG;
use multus_eni_ec2::model::{EniAddresses, EniId};
use multus_eni_proto::AddressState;
use multus_eni_sidecar::reconcile::DesiredInterface;

use crate::conflict::Conflicts;
use crate::retry::RetryBook;

/// A network namespace's identity: device and inode of its nsfs file, the same through
/// `/proc/<pid>/ns/net` and a bind mount (or link) in `--netns-dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// One pod network namespace as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetns {
    /// Its entry in `--netns-dir` (`cni-1b2c...`).
    pub name: String,
    pub id: NetnsId,
    pub interfaces: Vec<DesiredInterface>,
    /// When this view was read: a claim that arrived earlier and names an address it lacks is
    /// refused, one that arrived later waits for the next read.
    pub read_at: Instant,
}

/// This instance's ENIs, by MAC, as the last `DescribeNetworkInterfaces` saw them.
pub type InstanceEnis = BTreeMap<MacAddress, EniAddresses>;

/// Which pod namespaces the agent manages (`--pods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pods {
    /// Every pod of the node, with or without a sidecar (pods created before the webhook, pods
    /// of namespaces that did not opt in).
    All,
    /// Only pods whose sidecar has connected.
    Sidecar,
}

/// Where a wanted address is held: for logs and the status table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub netns: String,
    pub interface: String,
}

/// An address the agent will not assign, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub eni: Option<EniId>,
    pub reason: String,
    /// The metric label.
    pub label: &'static str,
}

/// What the node's pods want on this instance's Multus ENIs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub by_eni: BTreeMap<EniId, BTreeMap<IpAddr, Holder>>,
    /// Addresses on a Multus ENI's interface that another ENI of this instance, without
    /// `no_manage`, holds (the VPC CNI's): never moved.
    pub refused: BTreeMap<IpAddr, Refusal>,
}

/// Reason: the ENI is the VPC CNI's.
pub const NOT_NO_MANAGE: &str = "the ENI lacks node.k8s.amazonaws.com/no_manage=true: the agent never moves an address to or from it";
/// Reason: the ENI's primary address.
pub const PRIMARY: &str = "the ENI's primary address is never managed";
/// Reason: the claimed address is not on an interface with that MAC in the caller's namespace.
pub const NOT_HELD: &str =
    "not configured on an interface with this MAC in the caller's network namespace";

/// The refusal of an address that `holder` (an ENI without `no_manage`) holds.
pub fn held_by_not_no_manage(holder: &str) -> Refusal {
    Refusal {
        eni: Some(holder.to_string()),
        reason: format!(
            "held by {holder}, which lacks {NO_MANAGE_TAG}=true (the VPC CNI's): the agent never takes an address from it"
        ),
        label: "held_by_not_no_manage",
    }
}

// === impl Wanted ===

impl Wanted {
    /// Every (ENI, address) pair wanted.
    pub fn pairs(&self) -> BTreeSet<(EniId, IpAddr)> {
        self.by_eni
            .iter()
            .flat_map(|(eni, a)| a.keys().map(move |a| (eni.clone(), *a)))
            .collect()
    }

    /// The ENI an address is wanted on.
    pub fn eni_of(&self, address: IpAddr) -> Option<&EniId> {
        self.by_eni
            .iter()
            .find_map(|(eni, a)| a.contains_key(&address).then_some(eni))
    }
}

/// What `pods` want: every usable address on an interface whose MAC is one of this
/// instance's Multus (`no_manage`) ENIs, except that ENI's primary address and addresses that
/// an ENI of this instance without `no_manage` holds. A MAC that is not this instance's is
/// ignored: another node's ENI is never called on.
pub fn wanted<'a>(pods: impl IntoIterator<Item = &'a PodNetns>, enis: &InstanceEnis) -> Wanted {
    let mut out = Wanted::default();
    for pod in pods {
        for iface in &pod.interfaces {
            let Some(eni) = iface.mac.and_then(|m| enis.get(&m)) else {
                continue;
            };
            if !eni.no_manage {
                continue;
            }
            for &address in &iface.addresses {
                if eni.primary_ipv4.map(IpAddr::V4) == Some(address) {
                    continue;
                }
                if let Some(other) = enis
                    .values()
                    .find(|e| e.id != eni.id && !e.no_manage && e.holds(address))
                {
                    out.refused
                        .insert(address, held_by_not_no_manage(&other.id));
                    continue;
                }
                out.by_eni.entry(eni.id.clone()).or_default().insert(
                    address,
                    Holder {
                        netns: pod.name.clone(),
                        interface: iface.name.clone(),
                    },
                );
            }
        }
    }
    out
}

/// Every address some namespace of the node holds on any interface, tentative ones included:
/// never reclaimed.
pub fn held<'a>(interfaces: impl IntoIterator<Item = &'a DesiredInterface>) -> BTreeSet<IpAddr> {
    interfaces
        .into_iter()
        .flat_map(|i| {
            i.addresses
                .iter()
                .copied()
                .chain(i.tentative.iter().map(|a| IpAddr::V6(*a)))
        })
        .collect()
}

/// What the agent knows besides the pods, to say where one address stands.
pub struct Knowledge<'a> {
    pub instance_id: &'a str,
    pub enis: &'a InstanceEnis,
    /// MACs that are not this instance's, looked up: `Some(eni)` another instance's ENI,
    /// `None` no ENI at all (macvlan, SR-IOV).
    pub foreign: &'a BTreeMap<MacAddress, Option<EniId>>,
    pub wanted: &'a Wanted,
    pub rejected: &'a RetryBook,
    pub conflicts: &'a Conflicts,
    pub now: Instant,
}

/// Where `address` on an interface with `mac` stands: state, ENI, reason.
pub fn address_state(
    mac: MacAddress,
    address: IpAddr,
    k: &Knowledge<'_>,
) -> (AddressState, Option<EniId>, Option<String>) {
    let Some(eni) = k.enis.get(&mac) else {
        return match k.foreign.get(&mac) {
            Some(Some(other)) => (
                AddressState::Refused,
                Some(other.clone()),
                Some(format!(
                    "{other} is not attached to this instance ({}): the agent only changes its own instance's ENIs",
                    k.instance_id
                )),
            ),
            Some(None) => (AddressState::NoEni, None, None),
            None => (
                AddressState::Pending,
                None,
                Some("looking up the interface's MAC".into()),
            ),
        };
    };
    let id = Some(eni.id.clone());
    if eni.primary_ipv4.map(IpAddr::V4) == Some(address) {
        return (AddressState::Refused, id, Some(PRIMARY.into()));
    }
    if !eni.no_manage {
        return (AddressState::Refused, id, Some(NOT_NO_MANAGE.into()));
    }
    if let Some(r) = k.wanted.refused.get(&address) {
        return (AddressState::Refused, r.eni.clone(), Some(r.reason.clone()));
    }
    if eni.holds(address) {
        return (AddressState::Routable, id, None);
    }
    if let Some(c) = k.conflicts.waiting(address, k.now) {
        let other = c.other.clone();
        let reason = format!(
            "also wanted on {} (another node?): taken back once, next try in {}s",
            other.as_deref().unwrap_or("another ENI"),
            c.retry_at
                .map(|t| t.saturating_duration_since(k.now).as_secs())
                .unwrap_or_default()
        );
        return (AddressState::Conflict, other, Some(reason));
    }
    (AddressState::Pending, id, k.rejected.reason(address))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    const MULTUS: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 1]);
    const CNI: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 2]);
    const ELSEWHERE: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 9]);

    fn eni(id: &str, no_manage: bool, primary: &str, secondaries: &[&str]) -> EniAddresses {
        EniAddresses {
            id: id.into(),
            primary_ipv4: primary.parse().ok(),
            ipv4: secondaries
                .iter()
                .chain([&primary])
                .filter_map(|a| a.parse().ok())
                .collect(),
            no_manage,
            ..Default::default()
        }
    }

    fn enis() -> InstanceEnis {
        [
            (MULTUS, eni("eni-multus", true, "10.0.1.4", &["10.0.1.20"])),
            (CNI, eni("eni-cni", false, "10.0.1.3", &["10.0.1.30"])),
        ]
        .into()
    }

    fn pod(name: &str, mac: MacAddress, addresses: &[&str]) -> PodNetns {
        PodNetns {
            name: name.into(),
            id: NetnsId { dev: 4, ino: 1 },
            interfaces: vec![DesiredInterface {
                name: "net1".into(),
                mac: Some(mac),
                addresses: addresses.iter().map(|a| ip(a)).collect(),
                tentative: BTreeSet::new(),
            }],
            read_at: Instant::now(),
        }
    }

    #[test]
    fn only_addresses_on_this_instances_multus_enis_are_wanted() {
        let pods = [
            pod("a", MULTUS, &["10.0.1.20", "10.0.1.21", "10.0.1.4"]),
            // The VPC CNI's own ENI, and another instance's MAC: never ours to change.
            pod("b", CNI, &["10.0.1.31"]),
            pod("c", ELSEWHERE, &["10.0.1.40"]),
        ];
        let w = wanted(&pods, &enis());
        assert_eq!(
            w.pairs(),
            [
                ("eni-multus".to_string(), ip("10.0.1.20")),
                ("eni-multus".to_string(), ip("10.0.1.21")),
            ]
            .into(),
            "the primary .4 is never wanted"
        );
        assert_eq!(
            w.eni_of(ip("10.0.1.21")).map(String::as_str),
            Some("eni-multus")
        );
        assert!(w.refused.is_empty());
    }

    #[test]
    fn an_address_the_vpc_cnis_eni_holds_is_refused_not_wanted() {
        let w = wanted(&[pod("a", MULTUS, &["10.0.1.30"])], &enis());
        assert!(w.pairs().is_empty());
        let r = &w.refused[&ip("10.0.1.30")];
        assert_eq!(r.eni.as_deref(), Some("eni-cni"));
        assert_eq!(r.label, "held_by_not_no_manage");
    }

    #[test]
    fn held_counts_tentative_addresses_too() {
        let mut p = pod("a", MULTUS, &["10.0.1.20"]);
        p.interfaces[0].tentative.insert(
            "2001:db8::1"
                .parse()
                .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
        );
        assert_eq!(
            held(&p.interfaces),
            [ip("10.0.1.20"), ip("2001:db8::1")].into()
        );
    }

    #[test]
    fn states_follow_the_eni_the_conflicts_and_the_rejections() {
        let enis = enis();
        let now = Instant::now();
        let pods = [pod("a", MULTUS, &["10.0.1.20", "10.0.1.21", "10.0.1.22"])];
        let w = wanted(&pods, &enis);
        let mut rejected = RetryBook::default();
        rejected.rejected(ip("10.0.1.22"), "InvalidParameterValue".into(), now);
        let mut conflicts = Conflicts::default();
        conflicts.away("eni-multus", ip("10.0.1.21"), now);
        conflicts.took_back(ip("10.0.1.21"), Some("eni-other".into()));
        conflicts.away("eni-multus", ip("10.0.1.21"), now);
        let foreign = [(ELSEWHERE, Some("eni-far".to_string()))].into();
        let k = Knowledge {
            instance_id: "i-1",
            enis: &enis,
            foreign: &foreign,
            wanted: &w,
            rejected: &rejected,
            conflicts: &conflicts,
            now,
        };
        let state = |mac, a: &str| address_state(mac, ip(a), &k);
        assert_eq!(state(MULTUS, "10.0.1.20").0, AddressState::Routable);
        let (s, eni, reason) = state(MULTUS, "10.0.1.21");
        assert_eq!(s, AddressState::Conflict);
        assert_eq!(eni.as_deref(), Some("eni-other"));
        assert!(reason.is_some_and(|r| r.contains("next try in 300s")));
        let (s, _, reason) = state(MULTUS, "10.0.1.22");
        assert_eq!(s, AddressState::Pending);
        assert_eq!(reason.as_deref(), Some("InvalidParameterValue"));
        assert_eq!(state(MULTUS, "10.0.1.4").2.as_deref(), Some(PRIMARY));
        assert_eq!(state(CNI, "10.0.1.31").0, AddressState::Refused);
        let (s, eni, reason) = state(ELSEWHERE, "10.0.1.40");
        assert_eq!(
            (s, eni.as_deref()),
            (AddressState::Refused, Some("eni-far"))
        );
        assert!(reason.is_some_and(|r| r.contains("not attached to this instance (i-1)")));
        let unknown_mac = MacAddress([2, 0, 0, 0, 0, 7]);
        assert_eq!(state(unknown_mac, "10.0.1.50").0, AddressState::Pending);
        let later = Knowledge {
            now: now + Duration::from_secs(301),
            ..k
        };
        assert_eq!(
            address_state(MULTUS, ip("10.0.1.21"), &later).0,
            AddressState::Pending,
            "the conflict's wait is over: it is tried again"
        );
    }
}
