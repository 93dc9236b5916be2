//! What EC2 knows of an ENI and the calls that change it: plain data shared by the sidecar's
//! direct mode and the node agent.

use std::collections::BTreeSet;
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
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.addresses().iter().map(ToString::to_string).collect();
        write!(f, "{} {} [{}]", self.action(), self.eni(), list.join(","))
    }
}
