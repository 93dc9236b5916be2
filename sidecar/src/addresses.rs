//! The pod's interfaces as netlink sees them: global-scope IPv4/IPv6 addresses and the MAC
//! of exactly the named interfaces, kept current from link and address events.
//!
//! IPv6 addresses still in duplicate address detection (`tentative`) are reported apart:
//! the kernel does not use them yet and DAD may still fail, so the sidecar does not claim
//! them on the ENI (which could take the address away from another ENI) until DAD passes.
//! Addresses whose DAD failed are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use futures::StreamExt;
use futures::TryStreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::sys::SocketAddr;
use rtnetlink::{Handle, MulticastGroup};

use crate::reconcile::DesiredInterface;
use crate::{Error, Result};

pub use multus_eni_ec2::MacAddress;

/// One named interface as currently seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Interface {
    name: String,
    mac: Option<MacAddress>,
    usable: BTreeSet<IpAddr>,
    tentative: BTreeSet<Ipv6Addr>,
    /// Addresses whose duplicate address detection failed: never assigned, but logged.
    dad_failed: BTreeSet<Ipv6Addr>,
}

/// Which interfaces a table keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Scope {
    /// The interfaces named in `wanted` (the sidecar's).
    #[default]
    Named,
    /// Every link, whatever its name (the node agent's view of a pod namespace).
    Every,
    /// Addresses only, by link index, from address messages alone: the node agent's view of
    /// the host, where only which addresses are in use matters. A node's host namespace has a
    /// veth per pod: following their link events (and dumping each new link's addresses) made
    /// the agent's memory and CPU grow with every pod started on the node (docs/scale.md).
    AddressesOnly,
}

/// The named interfaces that exist, by kernel link index. Every other interface (eth0...)
/// is ignored.
#[derive(Debug, Clone, Default)]
pub struct InterfaceTable {
    wanted: Vec<String>,
    scope: Scope,
    by_index: BTreeMap<u32, Interface>,
}

/// What a netlink message did to the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// The desired state (addresses or MACs) changed.
    pub changed: bool,
    /// A named link appeared or changed MAC: its addresses must be dumped.
    pub dump_link: Option<u32>,
}

/// Address flags, from `IFA_FLAGS` when present (it carries the full 32 bits).
fn address_flags(msg: &AddressMessage) -> AddressFlags {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits())))
}

/// The interface address of a message: `IFA_LOCAL` for IPv4 (`IFA_ADDRESS` is the peer on
/// point-to-point links), `IFA_ADDRESS` for IPv6.
fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip @ IpAddr::V4(_)) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mac(msg: &LinkMessage) -> Option<MacAddress> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => MacAddress::from_bytes(bytes),
        _ => None,
    })
}

// === impl InterfaceTable ===

impl InterfaceTable {
    pub fn new(wanted: Vec<String>) -> Self {
        Self {
            wanted,
            scope: Scope::Named,
            by_index: BTreeMap::new(),
        }
    }

    /// A table of every interface of the namespace (the node agent's view of a pod).
    pub fn every_interface() -> Self {
        Self {
            scope: Scope::Every,
            ..Self::default()
        }
    }

    /// A table of the namespace's global addresses only, by link index, kept from address
    /// messages (link messages are ignored; [`AddressWatcher::subscribe_addresses`] does not
    /// ask for them). Its interfaces have no MAC and are named after their index.
    pub fn addresses_only() -> Self {
        Self {
            scope: Scope::AddressesOnly,
            ..Self::default()
        }
    }

    fn is_wanted(&self, name: &str) -> bool {
        self.scope == Scope::Every || self.wanted.iter().any(|w| w == name)
    }

    /// The interface names the sidecar manages, in command-line order.
    pub fn wanted(&self) -> &[String] {
        &self.wanted
    }

    /// Named interfaces that do not exist (yet).
    pub fn missing(&self) -> Vec<&str> {
        self.wanted
            .iter()
            .filter(|w| !self.by_index.values().any(|i| i.name == **w))
            .map(String::as_str)
            .collect()
    }

    /// IPv6 addresses whose duplicate address detection failed, with their interface: the
    /// kernel does not use them, so they are not assigned; an operator should hear of it.
    pub fn dad_failed(&self) -> BTreeSet<(String, Ipv6Addr)> {
        self.by_index
            .values()
            .flat_map(|i| i.dad_failed.iter().map(|a| (i.name.clone(), *a)))
            .collect()
    }

    /// The desired state handed to [`crate::reconcile`].
    pub fn desired(&self) -> Vec<DesiredInterface> {
        self.by_index
            .values()
            .map(|i| DesiredInterface {
                name: i.name.clone(),
                mac: i.mac,
                addresses: i.usable.clone(),
                tentative: i.tentative.clone(),
            })
            .collect()
    }

    /// Applies one link or address message (from a dump or an event).
    pub fn apply(&mut self, msg: &RouteNetlinkMessage) -> Applied {
        match msg {
            RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_)
                if self.scope == Scope::AddressesOnly =>
            {
                Applied::default()
            }
            RouteNetlinkMessage::NewLink(link) => self.new_link(link),
            RouteNetlinkMessage::DelLink(link) => {
                let removed = self.by_index.remove(&link.header.index).is_some();
                Applied {
                    changed: removed,
                    dump_link: None,
                }
            }
            RouteNetlinkMessage::NewAddress(addr) => self.address(addr, true),
            RouteNetlinkMessage::DelAddress(addr) => self.address(addr, false),
            _ => Applied::default(),
        }
    }

    fn new_link(&mut self, link: &LinkMessage) -> Applied {
        let index = link.header.index;
        let name = link_name(link);
        let mac = link_mac(link);
        let wanted = name.is_some_and(|n| self.is_wanted(n));
        match (self.by_index.get_mut(&index), name) {
            // Renamed away from a wanted name: no longer ours.
            (Some(_), Some(_)) if !wanted => {
                self.by_index.remove(&index);
                Applied {
                    changed: true,
                    dump_link: None,
                }
            }
            // Renamed from one wanted name to another: the new name takes effect at once.
            (Some(iface), Some(n)) if iface.name != n => {
                iface.name = n.to_string();
                if mac.is_some() {
                    iface.mac = mac;
                }
                Applied {
                    changed: true,
                    dump_link: Some(index),
                }
            }
            (Some(iface), _) => {
                if mac.is_some() && mac != iface.mac {
                    iface.mac = mac;
                    return Applied {
                        changed: true,
                        dump_link: Some(index),
                    };
                }
                Applied::default()
            }
            (None, Some(n)) if wanted => {
                self.by_index.insert(
                    index,
                    Interface {
                        name: n.to_string(),
                        mac,
                        ..Default::default()
                    },
                );
                Applied {
                    changed: true,
                    dump_link: Some(index),
                }
            }
            (None, _) => Applied::default(),
        }
    }

    fn address(&mut self, msg: &AddressMessage, added: bool) -> Applied {
        if msg.header.scope != AddressScope::Universe {
            return Applied::default();
        }
        let Some(ip) = address_of(msg) else {
            return Applied::default();
        };
        let index = msg.header.index;
        if self.scope == Scope::AddressesOnly && added {
            self.by_index.entry(index).or_insert_with(|| Interface {
                name: format!("#{index}"),
                ..Default::default()
            });
        }
        let Some(iface) = self.by_index.get_mut(&index) else {
            return Applied::default();
        };
        let flags = address_flags(msg);
        let before = (iface.usable.clone(), iface.tentative.clone());
        iface.usable.remove(&ip);
        if let IpAddr::V6(v6) = ip {
            iface.tentative.remove(&v6);
            iface.dad_failed.remove(&v6);
            if added && flags.contains(AddressFlags::Dadfailed) {
                iface.dad_failed.insert(v6);
            }
        }
        if added && !flags.contains(AddressFlags::Dadfailed) {
            match ip {
                IpAddr::V6(v6) if flags.contains(AddressFlags::Tentative) => {
                    iface.tentative.insert(v6);
                }
                _ => {
                    iface.usable.insert(ip);
                }
            }
        }
        let changed = before != (iface.usable.clone(), iface.tentative.clone());
        let empty =
            iface.usable.is_empty() && iface.tentative.is_empty() && iface.dad_failed.is_empty();
        if self.scope == Scope::AddressesOnly && empty {
            // A link is known here only by its addresses (its deletion removes them one by one).
            self.by_index.remove(&index);
        }
        Applied {
            changed,
            dump_link: None,
        }
    }

    /// Forgets the addresses of one link before its addresses are dumped again.
    fn clear_addresses(&mut self, index: u32) {
        if let Some(iface) = self.by_index.get_mut(&index) {
            iface.usable.clear();
            iface.tentative.clear();
            iface.dad_failed.clear();
        }
    }
}

/// A netlink connection subscribed to link and address events, also used for dumps.
pub struct AddressWatcher {
    handle: Handle,
    events: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    connection: tokio::task::JoinHandle<()>,
    /// [`AddressWatcher::try_next_event`] met an overrun: the next `next_event` reports it.
    overrun_pending: bool,
}

impl AddressWatcher {
    /// Subscribes to `RTNLGRP_LINK`, `RTNLGRP_IPV4_IFADDR` and `RTNLGRP_IPV6_IFADDR`. Subscribe
    /// first, dump second: a change between the two is then seen as an event, not lost.
    pub fn subscribe() -> Result<Self> {
        Self::subscribe_to(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
    }

    /// Subscribes to `RTNLGRP_IPV4_IFADDR` and `RTNLGRP_IPV6_IFADDR` only, for a table of
    /// [`InterfaceTable::addresses_only`]: the kernel reports a deleted link's addresses as
    /// deleted, so no link event is needed to keep the addresses in use.
    pub fn subscribe_addresses() -> Result<Self> {
        Self::subscribe_to(&[MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv6Ifaddr])
    }

    fn subscribe_to(groups: &[MulticastGroup]) -> Result<Self> {
        let (connection, handle, events) = rtnetlink::new_multicast_connection(groups)
            .map_err(|e| Error::Netlink(format!("cannot open netlink socket: {e}")))?;
        let connection = tokio::spawn(connection);
        Ok(Self {
            handle,
            events,
            connection,
            overrun_pending: false,
        })
    }

    /// Re-reads every named link and its addresses into a fresh table; returns whether the
    /// desired state changed.
    pub async fn dump(&self, table: &mut InterfaceTable) -> Result<bool> {
        let mut fresh = InterfaceTable {
            wanted: table.wanted.clone(),
            scope: table.scope,
            by_index: BTreeMap::new(),
        };
        if fresh.scope != Scope::AddressesOnly {
            let mut links = self.handle.link().get().execute();
            while let Some(link) = links.try_next().await.map_err(netlink_error)? {
                fresh.apply(&RouteNetlinkMessage::NewLink(link));
            }
        }
        self.dump_addresses(&mut fresh, None).await?;
        let changed = fresh.desired() != table.desired();
        *table = fresh;
        Ok(changed)
    }

    /// Re-reads the addresses of one link (it appeared or changed MAC).
    pub async fn dump_link(&self, table: &mut InterfaceTable, index: u32) -> Result<()> {
        table.clear_addresses(index);
        self.dump_addresses(table, Some(index)).await
    }

    async fn dump_addresses(&self, table: &mut InterfaceTable, index: Option<u32>) -> Result<()> {
        let mut request = self.handle.address().get();
        if let Some(index) = index {
            request = request.set_link_index_filter(index);
        }
        let mut addresses = request.execute();
        while let Some(addr) = addresses.try_next().await.map_err(netlink_error)? {
            if index.is_none_or(|i| i == addr.header.index) {
                table.apply(&RouteNetlinkMessage::NewAddress(addr));
            }
        }
        Ok(())
    }

    /// The next link or address event; [`Error::NetlinkStreamEnded`] when the socket closed,
    /// [`Error::NetlinkOverrun`] when the kernel dropped events (the caller subscribes again
    /// and dumps the table: what was dropped is unknown).
    pub async fn next_event(&mut self) -> Result<RouteNetlinkMessage> {
        if std::mem::take(&mut self.overrun_pending) {
            return Err(Error::NetlinkOverrun);
        }
        loop {
            let Some((msg, _)) = self.events.next().await else {
                return Err(Error::NetlinkStreamEnded);
            };
            match msg.payload {
                NetlinkPayload::InnerMessage(inner) => return Ok(inner),
                NetlinkPayload::Overrun(_) => return Err(Error::NetlinkOverrun),
                _ => {}
            }
        }
    }

    /// An event if one is already queued, without waiting: lets a burst be applied at once.
    /// An overrun in the queue is kept for [`AddressWatcher::next_event`], which reports it.
    pub fn try_next_event(&mut self) -> Option<RouteNetlinkMessage> {
        if self.overrun_pending {
            return None;
        }
        loop {
            match self.events.try_recv() {
                Ok((msg, _)) => match msg.payload {
                    NetlinkPayload::InnerMessage(inner) => return Some(inner),
                    NetlinkPayload::Overrun(_) => {
                        self.overrun_pending = true;
                        return None;
                    }
                    _ => {}
                },
                _ => return None,
            }
        }
    }
}

/// Applies an event and every event already queued behind it (a burst is applied at once),
/// dumping the links that appeared; a lost or overrun socket is replaced and the table read
/// again. Returns whether the desired state changed. Agent mode and the gate share it.
pub async fn apply_events(
    watcher: &mut AddressWatcher,
    table: &mut InterfaceTable,
    first: Result<RouteNetlinkMessage>,
) -> Result<bool> {
    let mut changed = false;
    let mut dumps = Vec::new();
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        match msg {
            Ok(msg) => {
                let applied = table.apply(&msg);
                changed |= applied.changed;
                dumps.extend(applied.dump_link);
            }
            Err(e) => {
                tracing::warn!(action = "netlink", outcome = "reconnect", error = %e, "netlink events stopped; resubscribing");
                *watcher = AddressWatcher::subscribe()?;
                changed |= watcher.dump(table).await?;
            }
        }
        next = watcher.try_next_event().map(Ok);
    }
    for index in dumps {
        watcher.dump_link(table, index).await?;
        changed = true;
    }
    Ok(changed)
}

impl Drop for AddressWatcher {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

fn netlink_error(e: rtnetlink::Error) -> Error {
    Error::Netlink(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::AddressFamily;

    fn link(index: u32, name: &str, mac: [u8; 6]) -> RouteNetlinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        RouteNetlinkMessage::NewLink(msg)
    }

    fn addr(index: u32, ip: &str, scope: AddressScope, flags: AddressFlags) -> AddressMessage {
        let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.scope = scope;
        msg.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        msg.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv4() {
            msg.attributes.push(AddressAttribute::Local(ip));
        }
        msg.attributes.push(AddressAttribute::Flags(flags));
        msg
    }

    #[test]
    fn only_named_interfaces_and_global_usable_addresses_count() {
        let mut t = InterfaceTable::new(vec!["net1".into()]);
        assert_eq!(t.missing(), vec!["net1"]);
        assert_eq!(
            t.apply(&link(2, "eth0", [2, 0, 0, 0, 0, 1])),
            Applied::default()
        );
        assert_eq!(
            t.apply(&link(3, "net1", [2, 0, 0, 0, 0, 2])),
            Applied {
                changed: true,
                dump_link: Some(3)
            }
        );
        let e = AddressFlags::empty();
        t.apply(&RouteNetlinkMessage::NewAddress(addr(
            2,
            "10.0.0.9",
            AddressScope::Universe,
            e,
        )));
        t.apply(&RouteNetlinkMessage::NewAddress(addr(
            3,
            "10.0.1.10",
            AddressScope::Universe,
            e,
        )));
        t.apply(&RouteNetlinkMessage::NewAddress(addr(
            3,
            "fe80::1",
            AddressScope::Link,
            e,
        )));
        t.apply(&RouteNetlinkMessage::NewAddress(addr(
            3,
            "2001:db8::1",
            AddressScope::Universe,
            AddressFlags::Tentative,
        )));
        t.apply(&RouteNetlinkMessage::NewAddress(addr(
            3,
            "2001:db8::2",
            AddressScope::Universe,
            AddressFlags::Tentative | AddressFlags::Dadfailed,
        )));
        let d = t.desired();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "net1");
        assert_eq!(
            d[0].mac.map(|m| m.to_string()),
            Some("02:00:00:00:00:02".into())
        );
        assert_eq!(
            d[0].addresses,
            ["10.0.1.10".parse().unwrap_or(IpAddr::V4([0; 4].into()))].into()
        );
        assert_eq!(d[0].tentative.len(), 1);
        assert!(t.missing().is_empty());
    }

    #[test]
    fn dad_completion_moves_address_to_usable_and_delete_removes_it() {
        let mut t = InterfaceTable::new(vec!["net1".into()]);
        t.apply(&link(3, "net1", [2, 0, 0, 0, 0, 2]));
        let a = addr(
            3,
            "2001:db8::1",
            AddressScope::Universe,
            AddressFlags::Tentative,
        );
        t.apply(&RouteNetlinkMessage::NewAddress(a));
        let a = addr(
            3,
            "2001:db8::1",
            AddressScope::Universe,
            AddressFlags::Permanent,
        );
        assert!(t.apply(&RouteNetlinkMessage::NewAddress(a.clone())).changed);
        assert!(!t.apply(&RouteNetlinkMessage::NewAddress(a.clone())).changed);
        assert_eq!(t.desired()[0].addresses.len(), 1);
        assert!(t.desired()[0].tentative.is_empty());
        assert!(t.apply(&RouteNetlinkMessage::DelAddress(a)).changed);
        assert!(t.desired()[0].addresses.is_empty());
    }

    #[test]
    fn a_rename_between_two_wanted_names_takes_effect_at_once() {
        let mut t = InterfaceTable::new(vec!["net1".into(), "net2".into()]);
        t.apply(&link(3, "net1", [2, 0, 0, 0, 0, 2]));
        assert_eq!(t.missing(), vec!["net2"]);
        let applied = t.apply(&link(3, "net2", [2, 0, 0, 0, 0, 2]));
        assert!(applied.changed);
        assert_eq!(t.missing(), vec!["net1"]);
        assert_eq!(t.desired()[0].name, "net2");
    }

    #[test]
    fn dad_failed_addresses_are_reported_not_assigned() {
        let mut t = InterfaceTable::new(vec!["net1".into()]);
        t.apply(&link(3, "net1", [2, 0, 0, 0, 0, 2]));
        let failed = addr(
            3,
            "2001:db8::2",
            AddressScope::Universe,
            AddressFlags::Tentative | AddressFlags::Dadfailed,
        );
        t.apply(&RouteNetlinkMessage::NewAddress(failed.clone()));
        let a: Ipv6Addr = "2001:db8::2".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        assert_eq!(t.dad_failed(), [("net1".to_string(), a)].into());
        assert!(t.desired()[0].addresses.is_empty());
        t.apply(&RouteNetlinkMessage::DelAddress(failed));
        assert!(t.dad_failed().is_empty());
    }

    #[test]
    fn a_table_of_every_interface_keeps_them_all() {
        let mut t = InterfaceTable::every_interface();
        t.apply(&link(2, "eth0", [2, 0, 0, 0, 0, 1]));
        t.apply(&link(3, "anything", [2, 0, 0, 0, 0, 2]));
        assert_eq!(t.desired().len(), 2);
        assert!(t.missing().is_empty());
        let mut named = InterfaceTable::new(vec!["net1".into()]);
        named.apply(&link(2, "eth0", [2, 0, 0, 0, 0, 1]));
        assert!(named.desired().is_empty());
    }

    #[test]
    fn a_table_of_addresses_only_keeps_addresses_by_index_and_ignores_links() {
        let mut t = InterfaceTable::addresses_only();
        assert_eq!(
            t.apply(&link(7, "veth1", [2, 0, 0, 0, 0, 7])),
            Applied::default(),
            "a link alone is nothing here"
        );
        assert!(t.desired().is_empty());
        let e = AddressFlags::empty();
        let a = addr(7, "10.0.1.7", AddressScope::Universe, e);
        let link_local = addr(8, "fe80::7", AddressScope::Link, e);
        assert!(t.apply(&RouteNetlinkMessage::NewAddress(a.clone())).changed);
        assert!(
            !t.apply(&RouteNetlinkMessage::NewAddress(link_local))
                .changed
        );
        let d = t.desired();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].mac, None);
        assert_eq!(d[0].addresses.len(), 1);
        let mut del = LinkMessage::default();
        del.header.index = 7;
        assert!(!t.apply(&RouteNetlinkMessage::DelLink(del)).changed);
        assert!(t.apply(&RouteNetlinkMessage::DelAddress(a)).changed);
        assert!(
            t.desired().is_empty(),
            "no address left: the link is forgotten"
        );
    }

    #[test]
    fn rename_and_delete_drop_the_interface() {
        let mut t = InterfaceTable::new(vec!["net1".into()]);
        t.apply(&link(3, "net1", [2, 0, 0, 0, 0, 2]));
        assert!(t.apply(&link(3, "other", [2, 0, 0, 0, 0, 2])).changed);
        assert_eq!(t.missing(), vec!["net1"]);
        t.apply(&link(4, "net1", [2, 0, 0, 0, 0, 2]));
        let mut del = LinkMessage::default();
        del.header.index = 4;
        assert!(t.apply(&RouteNetlinkMessage::DelLink(del)).changed);
        assert_eq!(t.missing(), vec!["net1"]);
    }
}
