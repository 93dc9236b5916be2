//! What the node's pods hold, as the agent has verified it: the datastore of claims (one
//! per connected sidecar, plus orphans whose sidecar went away without a release), and the
//! pure decisions over it (which claimed addresses the caller really holds, where each
//! address stands, what a change of claims releases).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use multus_eni_ec2::MacAddress;
use multus_eni_ec2::model::EniAddresses;
use multus_eni_proto::{AddressState, AddressStatus, InterfaceClaim};

use crate::netns::NetnsId;

/// A sidecar connection, numbered by the agent.
pub type ConnId = u64;

/// One address a pod holds on one interface, verified in its network namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub mac: MacAddress,
    pub address: IpAddr,
    pub interface: String,
}

/// A claimed address that is never assigned, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub interface: String,
    pub address: IpAddr,
    pub reason: String,
}

/// Reason of a refusal: the caller's network namespace lacks the address.
pub const NOT_HELD: &str =
    "not configured on an interface with this MAC in the caller's network namespace";
/// Reason of a refusal: the ENI is the VPC CNI's.
pub const NOT_NO_MANAGE: &str = "ENI lacks node.k8s.amazonaws.com/no_manage=true: the agent never moves an address to or from it";
/// Reason of a refusal: the ENI's primary address.
pub const PRIMARY: &str = "the ENI's primary address is never managed";

/// The verified claim of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub seq: u64,
    pub pod: String,
    pub netns: NetnsId,
    pub held: BTreeSet<Held>,
    pub refused: Vec<Refusal>,
}

/// Splits a claim into what the caller's namespace really holds and the rest. `seen` is
/// what the agent read in that namespace: global addresses per interface MAC.
pub fn verify_claim(
    interfaces: &[InterfaceClaim],
    seen: &BTreeMap<MacAddress, BTreeSet<IpAddr>>,
) -> (BTreeSet<Held>, Vec<Refusal>) {
    let mut held = BTreeSet::new();
    let mut refused = Vec::new();
    for iface in interfaces {
        let mac = multus_eni_ec2::node::parse_mac(&iface.mac);
        for &address in &iface.addresses {
            match mac {
                Some(mac) if seen.get(&mac).is_some_and(|s| s.contains(&address)) => {
                    held.insert(Held {
                        mac,
                        address,
                        interface: iface.name.clone(),
                    });
                }
                _ => refused.push(Refusal {
                    interface: iface.name.clone(),
                    address,
                    reason: NOT_HELD.into(),
                }),
            }
        }
    }
    (held, refused)
}

/// What EC2 said about one MAC of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EniView {
    Found(EniAddresses),
    /// No ENI carries this MAC.
    NoEni,
}

/// Where one held address stands, given the node's ENIs and what is queued.
pub fn address_state(
    held: &Held,
    enis: &BTreeMap<MacAddress, EniView>,
    rejected: &BTreeMap<IpAddr, String>,
) -> (AddressState, Option<String>, Option<String>) {
    match enis.get(&held.mac) {
        None => (AddressState::Pending, None, Some("reading the ENI".into())),
        Some(EniView::NoEni) => (AddressState::NoEni, None, None),
        Some(EniView::Found(eni)) => {
            let id = Some(eni.id.clone());
            if eni.primary_ipv4.map(IpAddr::V4) == Some(held.address) {
                (AddressState::Refused, id, Some(PRIMARY.into()))
            } else if !eni.no_manage {
                (AddressState::Refused, id, Some(NOT_NO_MANAGE.into()))
            } else if eni.holds(held.address) {
                (AddressState::Routable, id, None)
            } else {
                (
                    AddressState::Pending,
                    id,
                    rejected.get(&held.address).cloned(),
                )
            }
        }
    }
}

/// The status answer for one claim.
pub fn claim_status(
    claim: &Claim,
    enis: &BTreeMap<MacAddress, EniView>,
    rejected: &BTreeMap<IpAddr, String>,
) -> (bool, Vec<AddressStatus>) {
    let mut out: Vec<AddressStatus> = claim
        .held
        .iter()
        .map(|h| {
            let (state, eni, reason) = address_state(h, enis, rejected);
            AddressStatus {
                address: h.address,
                interface: h.interface.clone(),
                state,
                eni,
                reason,
            }
        })
        .collect();
    out.extend(claim.refused.iter().map(|r| AddressStatus {
        address: r.address,
        interface: r.interface.clone(),
        state: AddressState::Refused,
        eni: None,
        reason: Some(r.reason.clone()),
    }));
    let routable = out.iter().all(|a| a.state.lets_pod_start());
    (routable, out)
}

/// Every claim of the node: sidecars connected now, and orphans (a sidecar that went away
/// without a release, by network namespace) that keep their addresses while that namespace
/// still holds them.
#[derive(Debug, Default)]
pub struct Claims {
    live: BTreeMap<ConnId, Claim>,
    orphans: BTreeMap<NetnsId, Claim>,
}

impl Claims {
    /// Records a connection's claim; a sidecar restarting in the namespace of an orphan
    /// adopts it.
    pub fn claim(&mut self, conn: ConnId, claim: Claim) {
        self.orphans.remove(&claim.netns);
        self.live.insert(conn, claim);
    }

    /// The pod said "release": its addresses are no longer wanted.
    pub fn release(&mut self, conn: ConnId) -> Option<Claim> {
        self.live.remove(&conn)
    }

    /// The connection closed without a release: the claim becomes an orphan.
    pub fn disconnect(&mut self, conn: ConnId) {
        if let Some(claim) = self.live.remove(&conn) {
            self.orphans.insert(claim.netns, claim);
        }
    }

    pub fn live(&self) -> impl Iterator<Item = (&ConnId, &Claim)> {
        self.live.iter()
    }

    pub fn get(&self, conn: ConnId) -> Option<&Claim> {
        self.live.get(&conn)
    }

    pub fn orphan_count(&self) -> usize {
        self.orphans.len()
    }

    /// Shrinks every orphan to what its namespace still holds (`by_netns`: the namespaces
    /// found in `--netns-dir` and their addresses); an orphan whose namespace is gone is
    /// dropped.
    pub fn prune_orphans(&mut self, by_netns: &BTreeMap<NetnsId, BTreeSet<IpAddr>>) {
        self.orphans.retain(|id, claim| match by_netns.get(id) {
            Some(still) => {
                claim.held.retain(|h| still.contains(&h.address));
                !claim.held.is_empty()
            }
            None => false,
        });
    }

    /// Shrinks the claims of the connections in `checked` to what their namespaces still
    /// hold, where the scan (`by_netns`) saw those namespaces: a connected sidecar that stops
    /// reporting (stuck, or a process that claimed and then dropped the address) does not keep
    /// an address on the ENI. Returns the connections whose claim shrank.
    pub fn prune_live(
        &mut self,
        checked: &BTreeSet<ConnId>,
        by_netns: &BTreeMap<NetnsId, BTreeSet<IpAddr>>,
    ) -> Vec<ConnId> {
        let mut shrunk = Vec::new();
        for (conn, claim) in self.live.iter_mut().filter(|(c, _)| checked.contains(c)) {
            let Some(still) = by_netns.get(&claim.netns) else {
                continue;
            };
            let before = claim.held.len();
            claim.held.retain(|h| still.contains(&h.address));
            if claim.held.len() != before {
                shrunk.push(*conn);
            }
        }
        shrunk
    }

    /// Every address some pod holds, by MAC: what must be (and stay) on the ENIs.
    pub fn wanted(&self) -> BTreeSet<(MacAddress, IpAddr)> {
        self.live
            .values()
            .chain(self.orphans.values())
            .flat_map(|c| c.held.iter().map(|h| (h.mac, h.address)))
            .collect()
    }

    /// Every MAC some pod holds an address on.
    pub fn macs(&self) -> BTreeSet<MacAddress> {
        self.wanted().into_iter().map(|(m, _)| m).collect()
    }
}

/// Addresses wanted before a change and no longer after: to unassign, if on their ENI.
pub fn released(
    before: &BTreeSet<(MacAddress, IpAddr)>,
    after: &BTreeSet<(MacAddress, IpAddr)>,
) -> Vec<(MacAddress, IpAddr)> {
    before.difference(after).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    const MAC: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 1]);

    fn claim(netns: u64, addresses: &[&str]) -> Claim {
        Claim {
            seq: 1,
            pod: "p".into(),
            netns: NetnsId { dev: 4, ino: netns },
            held: addresses
                .iter()
                .map(|a| Held {
                    mac: MAC,
                    address: ip(a),
                    interface: "net1".into(),
                })
                .collect(),
            refused: vec![],
        }
    }

    fn eni(no_manage: bool, addresses: &[&str]) -> EniAddresses {
        EniAddresses {
            id: "eni-1".into(),
            primary_ipv4: Some(
                "10.0.1.4"
                    .parse()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            ),
            ipv4: addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .chain(["10.0.1.4".parse().ok()].into_iter().flatten())
                .collect(),
            no_manage,
            ..Default::default()
        }
    }

    #[test]
    fn only_addresses_seen_on_the_claimed_mac_are_accepted() {
        let seen = [(MAC, [ip("10.0.1.5")].into())].into();
        let interfaces = vec![
            InterfaceClaim {
                name: "net1".into(),
                mac: "0E:00:00:00:00:01".into(),
                addresses: vec![ip("10.0.1.5"), ip("10.0.1.6")],
            },
            InterfaceClaim {
                name: "net2".into(),
                mac: "0e:00:00:00:00:02".into(),
                addresses: vec![ip("10.0.1.5")],
            },
        ];
        let (held, refused) = verify_claim(&interfaces, &seen);
        assert_eq!(
            held.iter().map(|h| h.address).collect::<Vec<_>>(),
            vec![ip("10.0.1.5")]
        );
        let refused: Vec<_> = refused
            .iter()
            .map(|r| (r.interface.as_str(), r.address))
            .collect();
        assert_eq!(
            refused,
            vec![("net1", ip("10.0.1.6")), ("net2", ip("10.0.1.5"))]
        );
    }

    #[test]
    fn routable_needs_a_no_manage_eni_that_holds_every_address() {
        let c = claim(1, &["10.0.1.5"]);
        let none = BTreeMap::new();
        let status = |e: EniView| claim_status(&c, &[(MAC, e)].into(), &none);
        assert!(!claim_status(&c, &BTreeMap::new(), &none).0);
        assert!(!status(EniView::Found(eni(true, &[]))).0);
        assert!(status(EniView::Found(eni(true, &["10.0.1.5"]))).0);
        let (ready, list) = status(EniView::Found(eni(false, &["10.0.1.5"])));
        assert!(!ready);
        assert_eq!(list[0].state, AddressState::Refused);
        assert!(status(EniView::NoEni).0);
        let p = claim(1, &["10.0.1.4"]);
        let (ready, list) =
            claim_status(&p, &[(MAC, EniView::Found(eni(true, &[])))].into(), &none);
        assert!(!ready);
        assert_eq!(list[0].reason.as_deref(), Some(PRIMARY));
    }

    #[test]
    fn an_orphan_keeps_what_its_namespace_holds_and_goes_with_it() {
        let mut claims = Claims::default();
        claims.claim(1, claim(10, &["10.0.1.5", "10.0.1.6"]));
        claims.claim(2, claim(20, &["10.0.1.7"]));
        claims.disconnect(1);
        assert_eq!(claims.orphan_count(), 1);
        let before = claims.wanted();
        let ns10 = NetnsId { dev: 4, ino: 10 };
        claims.prune_orphans(&[(ns10, [ip("10.0.1.5")].into())].into());
        assert_eq!(
            released(&before, &claims.wanted()),
            vec![(MAC, ip("10.0.1.6"))]
        );
        // A sidecar restarting in the same namespace adopts the orphan.
        claims.claim(3, claim(10, &["10.0.1.5"]));
        assert_eq!(claims.orphan_count(), 0);
        claims.disconnect(3);
        let before = claims.wanted();
        claims.prune_orphans(&BTreeMap::new());
        assert_eq!(
            released(&before, &claims.wanted()),
            vec![(MAC, ip("10.0.1.5"))]
        );
    }

    #[test]
    fn a_live_claim_shrinks_to_what_its_namespace_holds_if_it_predates_the_scan() {
        let mut claims = Claims::default();
        claims.claim(1, claim(10, &["10.0.1.5", "10.0.1.6"]));
        claims.claim(2, claim(20, &["10.0.1.7"]));
        claims.claim(3, claim(30, &["10.0.1.8"]));
        let ns = |ino| NetnsId { dev: 4, ino };
        // Namespace 10 lost .6; 20 lost .7 but its claim came after the scan began; 30 was
        // not in the scanned directory.
        let scan = [(ns(10), [ip("10.0.1.5")].into()), (ns(20), BTreeSet::new())].into();
        let before = claims.wanted();
        let shrunk = claims.prune_live(&[1, 3].into(), &scan);
        assert_eq!(shrunk, vec![1]);
        assert_eq!(
            released(&before, &claims.wanted()),
            vec![(MAC, ip("10.0.1.6"))]
        );
    }

    #[test]
    fn an_address_another_pod_still_holds_is_not_released() {
        let mut claims = Claims::default();
        claims.claim(1, claim(10, &["10.0.1.5"]));
        claims.claim(2, claim(20, &["10.0.1.5"]));
        let before = claims.wanted();
        claims.release(1);
        assert!(released(&before, &claims.wanted()).is_empty());
    }
}
