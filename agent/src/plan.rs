//! The node agent's decisions, as pure functions over what it sees: which address is wanted on
//! which of this instance's ENIs, what the node's pods hold (never reclaimed), and where one
//! address stands (routable, pending, refused, conflict, no ENI).
//!
//! Inputs are the pod network namespaces read by [`crate::watch`], the ENIs attached to this
//! instance and what EC2 said of the other MACs; a sidecar's claim is only a hint and is never
//! an input here. What the agent has not seen yet is a state of its own: a MAC not looked up is
//! `pending`, never `no_eni`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use multus_eni_ec2::MacAddress;
use multus_eni_ec2::eni::NO_MANAGE_TAG;
use multus_eni_ec2::model::{EniAddresses, EniId};
use multus_eni_proto::{AddressState, AddressStatus, Answer, InterfaceClaim};
use multus_eni_sidecar::reconcile::DesiredInterface;

use crate::conflict::Conflicts;
use crate::prefix::PrefixBook;
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

/// What EC2 said of a MAC that is none of this instance's ENIs. A MAC without an entry has not
/// been looked up (or the lookup failed): it is unknown, and an address on it is `pending`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MacLookup {
    /// The ENI of another instance (or of none): never called on, its addresses refused.
    OtherInstance(EniId),
    /// EC2 answered that no ENI has this MAC (macvlan, SR-IOV, a veth): nothing to assign and
    /// nothing for the pod to wait for.
    NoEni,
}

/// What EC2 said of the MACs that are none of this instance's ENIs.
pub type ForeignMacs = BTreeMap<MacAddress, MacLookup>;

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
/// Reason: the address is inside `--ignore-cidrs`.
pub const IGNORED: &str =
    "inside --ignore-cidrs: left to the workload (never assigned, released or reclaimed)";
/// Reason: the MAC is being looked up.
pub const LOOKING_UP_MAC: &str =
    "looking up the interface's MAC: not one of this instance's ENIs as last read";
/// Reason: an interface whose MAC no read placed, holding an address of the VPC CNI's.
pub const ON_VPC_CNI_ENI: &str = "on a VPC CNI ENI of this instance (the VPC routes it here; the agent never moves it): the interface's MAC is not looked up";
/// Prefix of a reason that carries EC2's own error text (served on `/status` only).
pub const EC2_SAID: &str = "EC2 refused it: ";

/// The refusal of an address that `holder` (an ENI without `no_manage`) holds.
/// The ENI of this instance without `no_manage` (the VPC CNI's) that holds `address`.
pub fn vpc_cni_holder(enis: &InstanceEnis, address: IpAddr) -> Option<&EniAddresses> {
    enis.values().find(|e| !e.no_manage && e.holds(address))
}

/// Whether the MAC of `iface` is worth a lookup when no read placed it: not when every address
/// on it is held by a VPC CNI ENI of this instance (a VPC CNI pod's `eth0`, a veth with a
/// random MAC) or inside `--ignore-cidrs`: whatever EC2 answered, the agent would change
/// nothing for it, and one lookup per pod would spend the account's Describe bucket for nothing.
pub fn worth_a_lookup(iface: &DesiredInterface, enis: &InstanceEnis, ignored: &[IpNet]) -> bool {
    iface
        .addresses
        .iter()
        .copied()
        .chain(iface.tentative.iter().map(|a| IpAddr::V6(*a)))
        .any(|a| vpc_cni_holder(enis, a).is_none() && !is_ignored(ignored, a))
}

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

/// Whether `address` is inside one of `ignored` (`--ignore-cidrs`).
pub fn is_ignored(ignored: &[IpNet], address: IpAddr) -> bool {
    ignored.iter().any(|n| n.contains(&address))
}

/// What `pods` want: every usable address on an interface whose MAC is one of this
/// instance's Multus (`no_manage`) ENIs, except that ENI's primary address, addresses inside
/// `ignored`, and addresses that an ENI of this instance without `no_manage` holds. A MAC that
/// is not this instance's is ignored: another node's ENI is never called on. One address
/// wanted on two ENIs of this instance is wanted on one only (the one that holds it, else the
/// first seen): it is never moved between them, and [`address_state`] calls the other a
/// conflict.
pub fn wanted<'a>(
    pods: impl IntoIterator<Item = &'a PodNetns>,
    enis: &InstanceEnis,
    ignored: &[IpNet],
) -> Wanted {
    let mut out = Wanted::default();
    let mut candidates: BTreeMap<IpAddr, Vec<(&EniAddresses, Holder)>> = BTreeMap::new();
    for pod in pods {
        for iface in &pod.interfaces {
            let Some(eni) = iface.mac.and_then(|m| enis.get(&m)) else {
                continue;
            };
            if !eni.no_manage {
                continue;
            }
            for &address in &iface.addresses {
                if eni.primary_ipv4.map(IpAddr::V4) == Some(address) || is_ignored(ignored, address)
                {
                    continue;
                }
                if let Some(other) = vpc_cni_holder(enis, address) {
                    out.refused
                        .insert(address, held_by_not_no_manage(&other.id));
                    continue;
                }
                candidates.entry(address).or_default().push((
                    eni,
                    Holder {
                        netns: pod.name.clone(),
                        interface: iface.name.clone(),
                    },
                ));
            }
        }
    }
    for (address, mut on) in candidates {
        let pick = on.iter().position(|(e, _)| e.holds(address)).unwrap_or(0);
        let (eni, holder) = on.swap_remove(pick);
        out.by_eni
            .entry(eni.id.clone())
            .or_default()
            .insert(address, holder);
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
    /// What EC2 said of MACs that are not this instance's; a MAC missing here is unknown.
    pub foreign: &'a ForeignMacs,
    /// `--ignore-cidrs`.
    pub ignored: &'a [IpNet],
    pub wanted: &'a Wanted,
    pub rejected: &'a RetryBook,
    pub conflicts: &'a Conflicts,
    /// Prefix mode (`--prefix-ranges`): where an address inside a range stands.
    pub prefixes: &'a PrefixBook,
    pub now: Instant,
}

/// Where `address` on an interface with `mac` stands: state, ENI, reason.
pub fn address_state(
    mac: MacAddress,
    address: IpAddr,
    k: &Knowledge<'_>,
) -> (AddressState, Option<EniId>, Option<String>) {
    if is_ignored(k.ignored, address) {
        return (AddressState::NoEni, None, Some(IGNORED.into()));
    }
    let Some(eni) = k.enis.get(&mac) else {
        return match k.foreign.get(&mac) {
            Some(MacLookup::OtherInstance(other)) => (
                AddressState::Refused,
                Some(other.clone()),
                Some(format!(
                    "{other} is not attached to this instance ({}): the agent only changes its own instance's ENIs",
                    k.instance_id
                )),
            ),
            Some(MacLookup::NoEni) => (AddressState::NoEni, None, None),
            None => match vpc_cni_holder(k.enis, address) {
                Some(holder) => (
                    AddressState::NoEni,
                    Some(holder.id.clone()),
                    Some(ON_VPC_CNI_ENI.into()),
                ),
                None => (AddressState::Pending, None, Some(LOOKING_UP_MAC.into())),
            },
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
    if let Some(chosen) = k.wanted.eni_of(address).filter(|e| **e != eni.id) {
        let reason = format!(
            "also held on an interface of {chosen}, another ENI of this instance: an address is on one ENI only, and is never moved between this instance's ENIs"
        );
        return (AddressState::Conflict, Some(chosen.clone()), Some(reason));
    }
    if eni.holds(address) {
        return (AddressState::Routable, id, None);
    }
    if let Some(state) = k.prefixes.state(address, eni) {
        return state;
    }
    if let Some(c) = k.conflicts.waiting(address, k.now) {
        let other = c.other.clone();
        let reason = format!(
            "also wanted on {} (another node?): taken once, next try in {}s",
            other.as_deref().unwrap_or("another ENI"),
            c.retry_at()
                .map(|t| t.saturating_duration_since(k.now).as_secs())
                .unwrap_or_default()
        );
        return (AddressState::Conflict, other, Some(reason));
    }
    let rejected = k.rejected.reason(address).map(|r| format!("{EC2_SAID}{r}"));
    (AddressState::Pending, id, rejected)
}

/// The answer to a sidecar's claim (`v`, `seq`, `interfaces`, received at `at`), from the
/// node's own view of the caller's namespace (`pod`), not from what the claim says: an address
/// the namespace holds on that MAC stands as [`address_state`] says; one it lacks is `pending`
/// until the namespace has been read after the claim, then `refused` ([`NOT_HELD`]).
pub fn claim_status(
    v: u32,
    seq: u64,
    interfaces: &[InterfaceClaim],
    at: Instant,
    pod: Option<&PodNetns>,
    k: &Knowledge<'_>,
) -> Answer {
    let mut addresses = Vec::new();
    for iface in interfaces {
        let mac = multus_eni_ec2::node::parse_mac(&iface.mac);
        // Name and MAC: two ipvlan children of one master carry the same MAC.
        let seen = pod.and_then(|p| {
            p.interfaces
                .iter()
                .find(|i| i.name == iface.name && i.mac.is_some() && i.mac == mac)
        });
        for &address in &iface.addresses {
            let (state, eni, reason) = match (mac, seen) {
                (Some(mac), Some(i)) if i.addresses.contains(&address) => {
                    address_state(mac, address, k)
                }
                (_, Some(i)) if matches!(address, IpAddr::V6(v6) if i.tentative.contains(&v6)) => {
                    (AddressState::Pending, None, Some(DAD_IN_PROGRESS.into()))
                }
                _ if pod.is_some_and(|p| p.read_at > at) => {
                    (AddressState::Refused, None, Some(NOT_HELD.into()))
                }
                _ => (
                    AddressState::Pending,
                    None,
                    Some("reading the pod's network namespace".into()),
                ),
            };
            addresses.push(AddressStatus {
                address,
                interface: iface.name.clone(),
                state: state.in_version(v),
                eni,
                reason,
            });
        }
    }
    Answer::Status {
        v,
        seq,
        routable: addresses.iter().all(|a| a.state.lets_pod_start()),
        addresses,
    }
}

/// Reason: an IPv6 address still in duplicate address detection (not usable, not assigned).
pub const DAD_IN_PROGRESS: &str = "duplicate address detection in progress";

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

    /// What a test's [`Knowledge`] borrows.
    #[derive(Default)]
    struct Facts {
        enis: InstanceEnis,
        foreign: ForeignMacs,
        ignored: Vec<IpNet>,
        wanted: Wanted,
        rejected: RetryBook,
        conflicts: Conflicts,
        prefixes: crate::prefix::PrefixBook,
    }

    impl Facts {
        fn at(&self, now: Instant) -> Knowledge<'_> {
            Knowledge {
                instance_id: "i-1",
                enis: &self.enis,
                foreign: &self.foreign,
                ignored: &self.ignored,
                wanted: &self.wanted,
                rejected: &self.rejected,
                conflicts: &self.conflicts,
                prefixes: &self.prefixes,
                now,
            }
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
        let w = wanted(&pods, &enis(), &[]);
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
        let w = wanted(&[pod("a", MULTUS, &["10.0.1.30"])], &enis(), &[]);
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
    fn a_claim_is_answered_from_the_namespace_not_from_what_it_says() {
        let enis = enis();
        let t0 = Instant::now();
        let mut p = pod("a", MULTUS, &["10.0.1.20"]);
        p.interfaces[0].tentative.insert(
            "2001:db8::7"
                .parse()
                .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
        );
        p.read_at = t0;
        let w = wanted([&p], &enis, &[]);
        let facts = Facts {
            enis: enis.clone(),
            wanted: w,
            ..Facts::default()
        };
        let k = facts.at(t0);
        let claim = [InterfaceClaim {
            name: "net1".into(),
            mac: MULTUS.to_string(),
            addresses: vec![ip("10.0.1.20"), ip("10.0.1.66"), ip("2001:db8::7")],
        }];
        let states =
            |at: Instant, pod: Option<&PodNetns>| match claim_status(2, 9, &claim, at, pod, &k) {
                Answer::Status {
                    seq,
                    routable,
                    addresses,
                    ..
                } => {
                    assert_eq!(seq, 9);
                    (
                        routable,
                        addresses.iter().map(|a| a.state).collect::<Vec<_>>(),
                    )
                }
                other => panic!("{other:?}"),
            };
        use AddressState::*;
        // The namespace was read before the claim came: .66 may not have been seen yet.
        let after = t0 + std::time::Duration::from_millis(1);
        assert_eq!(
            states(after, Some(&p)),
            (false, vec![Routable, Pending, Pending])
        );
        // Read after the claim and still not there: the caller does not hold it.
        let mut read_later = p.clone();
        read_later.read_at = after + std::time::Duration::from_millis(1);
        assert_eq!(
            states(after, Some(&read_later)),
            (false, vec![Routable, Refused, Pending])
        );
        assert_eq!(
            states(after, None),
            (false, vec![Pending, Pending, Pending])
        );
    }

    #[test]
    fn states_follow_the_eni_the_conflicts_and_the_rejections() {
        let enis = enis();
        let now = Instant::now();
        let pods = [pod("a", MULTUS, &["10.0.1.20", "10.0.1.21", "10.0.1.22"])];
        let w = wanted(&pods, &enis, &[]);
        let mut rejected = RetryBook::default();
        rejected.rejected(ip("10.0.1.22"), "InvalidParameterValue".into(), now);
        let mut conflicts = Conflicts::default();
        conflicts.took("eni-multus", ip("10.0.1.21"), Some("eni-other".into()), now);
        conflicts.away("eni-multus", ip("10.0.1.21"));
        let foreign = [(ELSEWHERE, MacLookup::OtherInstance("eni-far".to_string()))].into();
        let facts = Facts {
            enis,
            foreign,
            wanted: w,
            rejected,
            conflicts,
            ..Facts::default()
        };
        let k = facts.at(now);
        let state = |mac, a: &str| address_state(mac, ip(a), &k);
        assert_eq!(state(MULTUS, "10.0.1.20").0, AddressState::Routable);
        let (s, eni, reason) = state(MULTUS, "10.0.1.21");
        assert_eq!(s, AddressState::Conflict);
        assert_eq!(eni.as_deref(), Some("eni-other"));
        assert!(reason.is_some_and(|r| r.contains("next try in 300s")));
        let (s, _, reason) = state(MULTUS, "10.0.1.22");
        assert_eq!(s, AddressState::Pending);
        assert_eq!(
            reason.as_deref(),
            Some("EC2 refused it: InvalidParameterValue")
        );
        assert_eq!(state(MULTUS, "10.0.1.4").2.as_deref(), Some(PRIMARY));
        assert_eq!(state(CNI, "10.0.1.31").0, AddressState::Refused);
        let (s, eni, reason) = state(ELSEWHERE, "10.0.1.40");
        assert_eq!(
            (s, eni.as_deref()),
            (AddressState::Refused, Some("eni-far"))
        );
        assert!(reason.is_some_and(|r| r.contains("not attached to this instance (i-1)")));
        let unknown_mac = MacAddress([2, 0, 0, 0, 0, 7]);
        assert_eq!(
            state(unknown_mac, "10.0.1.50"),
            (AddressState::Pending, None, Some(LOOKING_UP_MAC.into())),
            "a MAC not looked up yet is pending, never no_eni"
        );
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

    #[test]
    fn a_vpc_cni_pods_veth_is_not_looked_up_and_reads_no_eni_through_the_vpc_cni_eni() {
        const VETH: MacAddress = MacAddress([0x0e, 0x5a, 0, 0, 0, 9]);
        let enis = enis();
        let eth0 = |addresses: &[&str]| pod("vpc-cni-pod", VETH, addresses).interfaces[0].clone();
        assert!(
            !worth_a_lookup(&eth0(&["10.0.1.30"]), &enis, &[]),
            "every address on the VPC CNI's ENI: nothing to learn"
        );
        assert!(worth_a_lookup(
            &eth0(&["10.0.1.30", "10.0.1.77"]),
            &enis,
            &[]
        ));
        let ignored: Vec<IpNet> = vec!["10.0.1.64/26".parse().unwrap_or_else(|e| panic!("{e}"))];
        assert!(
            !worth_a_lookup(&eth0(&["10.0.1.30", "10.0.1.77"]), &enis, &ignored),
            "the rest inside --ignore-cidrs: nothing to learn either"
        );
        assert!(
            worth_a_lookup(&eth0(&["10.0.1.20"]), &enis, &[]),
            "held by a Multus ENI (another interface's MAC): looked up"
        );
        let facts = Facts {
            enis,
            ..Facts::default()
        };
        let k = facts.at(Instant::now());
        assert_eq!(
            address_state(VETH, ip("10.0.1.30"), &k),
            (
                AddressState::NoEni,
                Some("eni-cni".to_string()),
                Some(ON_VPC_CNI_ENI.into())
            )
        );
        assert_eq!(
            address_state(VETH, ip("10.0.1.77"), &k).0,
            AddressState::Pending,
            "an address no ENI of this instance holds waits for the lookup"
        );
    }

    #[test]
    fn one_address_on_two_enis_of_this_instance_is_wanted_on_one_and_a_conflict_on_the_other() {
        const SECOND: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 3]);
        let mut enis = enis();
        enis.insert(SECOND, eni("eni-second", true, "10.0.1.5", &[]));
        let pods = [
            pod("a", MULTUS, &["10.0.1.60"]),
            pod("b", SECOND, &["10.0.1.60"]),
        ];
        let w = wanted(&pods, &enis, &[]);
        assert_eq!(
            w.pairs(),
            [("eni-multus".to_string(), ip("10.0.1.60"))].into()
        );
        // The ENI that already holds it keeps it, whichever pod comes first.
        let mut holding = enis.clone();
        if let Some(e) = holding.get_mut(&SECOND) {
            e.ipv4.insert(
                "10.0.1.60"
                    .parse()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            );
        }
        let held = wanted(&pods, &holding, &[]);
        assert_eq!(
            held.pairs(),
            [("eni-second".to_string(), ip("10.0.1.60"))].into()
        );
        let facts = Facts {
            enis: enis.clone(),
            wanted: w,
            ..Facts::default()
        };
        let k = facts.at(Instant::now());
        let (s, eni, _) = address_state(SECOND, ip("10.0.1.60"), &k);
        assert_eq!(
            (s, eni.as_deref()),
            (AddressState::Conflict, Some("eni-multus"))
        );
        assert_eq!(
            address_state(MULTUS, ip("10.0.1.60"), &k).0,
            AddressState::Pending
        );
    }

    #[test]
    fn addresses_inside_ignore_cidrs_are_never_wanted_and_do_not_hold_the_pod_back() {
        let ignored: Vec<IpNet> =
            ["10.0.1.128/25".parse().unwrap_or_else(|e| panic!("{e}"))].into();
        let pods = [pod("a", MULTUS, &["10.0.1.20", "10.0.1.200"])];
        let w = wanted(&pods, &enis(), &ignored);
        assert_eq!(
            w.pairs(),
            [("eni-multus".to_string(), ip("10.0.1.20"))].into()
        );
        let facts = Facts {
            enis: enis(),
            ignored,
            wanted: w,
            ..Facts::default()
        };
        let k = facts.at(Instant::now());
        let (s, _, reason) = address_state(MULTUS, ip("10.0.1.200"), &k);
        assert_eq!((s, reason.as_deref()), (AddressState::NoEni, Some(IGNORED)));
    }

    #[test]
    fn two_interfaces_on_one_mac_are_answered_each_by_its_own_name() {
        let enis = enis();
        let t0 = Instant::now();
        let mut p = pod("a", MULTUS, &["10.0.1.20"]);
        p.interfaces.push(DesiredInterface {
            name: "net2".into(),
            mac: Some(MULTUS),
            addresses: [ip("10.0.1.21")].into(),
            tentative: BTreeSet::new(),
        });
        let mut enis_holding = enis.clone();
        if let Some(e) = enis_holding.get_mut(&MULTUS) {
            e.ipv4.insert(
                "10.0.1.21"
                    .parse()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            );
        }
        let w = wanted([&p], &enis_holding, &[]);
        let facts = Facts {
            enis: enis_holding.clone(),
            wanted: w,
            ..Facts::default()
        };
        let k = facts.at(t0);
        let claim = [
            InterfaceClaim {
                name: "net1".into(),
                mac: MULTUS.to_string(),
                addresses: vec![ip("10.0.1.20")],
            },
            InterfaceClaim {
                name: "net2".into(),
                mac: MULTUS.to_string(),
                addresses: vec![ip("10.0.1.21")],
            },
        ];
        match claim_status(2, 1, &claim, t0, Some(&p), &k) {
            Answer::Status {
                routable,
                addresses,
                ..
            } => {
                assert!(routable, "{addresses:?}");
                assert!(
                    addresses
                        .iter()
                        .all(|a| a.reason.as_deref() != Some(NOT_HELD))
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
