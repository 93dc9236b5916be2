//! Prefix mode (`--prefix-ranges`): for a pod address inside a range whose addresses the IPAM
//! hands out in per-node aligned blocks (whereabouts node slices, NVIDIA k8s IPAM), the agent
//! wants the delegated prefix that contains it (/28 IPv4, /80 IPv6) on the interface's ENI
//! instead of the address: the first pod of a block costs one call, every later one none.
//!
//! The book-keeping is plain data and pure functions over it, like [`crate::plan`]: which
//! prefixes the pods want ([`take_ranged`]), which calls that makes ([`PrefixBook::plan`]), when
//! an idle prefix is given back (`--prefix-release-after` after the last pod in it left, so a
//! rollout reuses it), and where an address inside a range stands ([`PrefixBook::state`]).
//! A prefix is only ever assigned exclusively: EC2 refuses one another ENI holds, or that has an
//! individually assigned address inside, and the agent never forces it (no reassignment).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use multus_eni_ec2::eni::{ErrorKind, PrefixOutcome};
use multus_eni_ec2::model::{EniAddresses, EniId, PrefixChange};
use multus_eni_proto::AddressState;

use crate::plan::{EC2_SAID, InstanceEnis, Wanted};
use crate::retry::RetryBook;

/// The prefix length EC2 delegates for IPv4.
pub const IPV4_PREFIX_LEN: u8 = 28;
/// The prefix length EC2 delegates for IPv6.
pub const IPV6_PREFIX_LEN: u8 = 80;

/// The length of a delegated prefix of `address`'s family.
fn delegated_len(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => IPV4_PREFIX_LEN,
        IpAddr::V6(_) => IPV6_PREFIX_LEN,
    }
}

/// The aligned delegated prefix that contains `address`, when it is inside one of `ranges`.
pub fn prefix_of(ranges: &[IpNet], address: IpAddr) -> Option<IpNet> {
    if !ranges.iter().any(|r| r.contains(&address)) {
        return None;
    }
    IpNet::new(address, delegated_len(address))
        .ok()
        .map(|p| p.trunc())
}

/// Checks one `--prefix-ranges` entry: it must hold whole delegated prefixes (at least a /28 or
/// a /80), else the prefix of an address would reach outside the range the IPAM reserved.
pub fn parse_range(s: &str) -> Result<IpNet, String> {
    let range: IpNet = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let longest = delegated_len(range.addr());
    if range.prefix_len() > longest {
        return Err(format!(
            "{range}: a prefix range holds whole delegated prefixes: /{longest} or shorter"
        ));
    }
    Ok(range.trunc())
}

/// What the pods want in prefix mode: each prefix on one ENI only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WantedPrefixes {
    /// The ENI each wanted prefix is wanted on: the one holding it, else the first (by id) a
    /// pod's interface wants it on. The same block on two ENIs of this instance is a conflict
    /// for the other one's addresses, never a move.
    pub by_prefix: BTreeMap<IpNet, EniId>,
}

/// Takes the addresses inside `ranges` out of `wanted` (so no individual secondary is ever
/// assigned inside a prefix range) and returns the prefixes they need.
pub fn take_ranged(wanted: &mut Wanted, ranges: &[IpNet], enis: &InstanceEnis) -> WantedPrefixes {
    let mut candidates: BTreeMap<IpNet, BTreeSet<EniId>> = BTreeMap::new();
    for (eni, addresses) in wanted.by_eni.iter_mut() {
        addresses.retain(|a, _| match prefix_of(ranges, *a) {
            Some(p) => {
                candidates.entry(p).or_default().insert(eni.clone());
                false
            }
            None => true,
        });
    }
    wanted.by_eni.retain(|_, a| !a.is_empty());
    let holds = |eni: &EniId, p: IpNet| enis.values().any(|e| &e.id == eni && e.has_prefix(p));
    let by_prefix = candidates
        .into_iter()
        .filter_map(|(p, on)| {
            let pick = on
                .iter()
                .find(|e| holds(e, p))
                .or_else(|| on.iter().next())?;
            Some((p, pick.clone()))
        })
        .collect();
    WantedPrefixes { by_prefix }
}

/// The calls queued for one ENI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Queued {
    assign: BTreeSet<IpNet>,
    unassign: BTreeSet<IpNet>,
}

/// Where one prefix on this instance's Multus ENIs stands, for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixState {
    /// A pod of the node holds an address in it.
    InUse,
    /// No pod holds an address in it; given back after `--prefix-release-after`.
    Idle,
    /// Wanted, not on the ENI yet.
    Assigning,
    /// Wanted; EC2 refused it (retried with backoff, never forced).
    Refused,
    /// On the ENI, never assigned by this agent nor seen in use: kept unless
    /// `--reclaim-unowned`.
    Unowned,
}

/// What the agent knows of its prefixes: what the pods want, which are its own
/// (checkpointed), since when an idle one has been idle, what EC2 refused, and the calls
/// queued and in flight.
#[derive(Debug, Default)]
pub struct PrefixBook {
    /// `--prefix-ranges`; empty: prefix mode is off and the book does nothing.
    ranges: Vec<IpNet>,
    /// `--prefix-release-after`.
    release_after: Duration,
    wanted: WantedPrefixes,
    /// The agent's own prefixes by ENI: it assigned them, or saw them while a pod of this node
    /// held an address in them; until it unassigned them.
    owned: BTreeMap<EniId, BTreeSet<IpNet>>,
    /// Since when a prefix on one of this instance's Multus ENIs has held no pod's address.
    idle_since: BTreeMap<(EniId, IpNet), Instant>,
    /// Prefixes on the Multus ENIs that are not the agent's own (at the last plan).
    unowned: BTreeSet<(EniId, IpNet)>,
    queued: BTreeMap<EniId, Queued>,
    flying: BTreeMap<EniId, BTreeSet<IpNet>>,
    /// Prefixes EC2 refused to assign, with its reason.
    refused: RetryBook<IpNet>,
    /// Changes EC2 accepted while a Describe of the instance was running: applied again to its
    /// answer, which may predate them.
    applied_during_read: Vec<PrefixChange>,
}

/// What [`PrefixBook::done`] asks of the node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Done {
    /// The owned prefixes changed: save the checkpoint.
    pub checkpoint: bool,
    /// An unassign was refused: the picture is probably stale, read the instance again.
    pub read: bool,
}

// === impl PrefixBook ===

impl PrefixBook {
    /// A book for `ranges`, with the agent's own prefixes as the checkpoint remembers them.
    pub fn new(
        ranges: Vec<IpNet>,
        release_after: Duration,
        owned: BTreeMap<EniId, BTreeSet<IpNet>>,
    ) -> Self {
        Self {
            ranges,
            release_after,
            owned,
            ..Self::default()
        }
    }

    /// `--prefix-ranges`.
    pub fn ranges(&self) -> &[IpNet] {
        &self.ranges
    }

    /// The agent's own prefixes by ENI (for the checkpoint).
    pub fn owned(&self) -> &BTreeMap<EniId, BTreeSet<IpNet>> {
        &self.owned
    }

    /// Forgets the owned prefixes of ENIs no longer attached to this instance.
    pub fn keep_enis(&mut self, attached: &BTreeSet<EniId>) {
        self.owned.retain(|eni, _| attached.contains(eni));
    }

    /// Compares what the pods want with this instance's ENIs and queues the calls: an assign
    /// for a wanted prefix missing from its ENI (unless in flight or waiting after EC2 refused
    /// it); an unassign for a prefix of the agent's own (or any, with `reclaim_unowned`) that no
    /// address `held` on the node has been inside for `release_after`. Nothing is released
    /// unless the node's view is `complete`: an unknown node is never an empty one. Returns
    /// whether the owned prefixes changed.
    pub fn plan(
        &mut self,
        wanted: WantedPrefixes,
        enis: &InstanceEnis,
        held: &BTreeSet<IpAddr>,
        complete: bool,
        reclaim_unowned: bool,
        now: Instant,
    ) -> bool {
        if self.ranges.is_empty() {
            return false;
        }
        let mut owned_changed = false;
        for (p, eni_id) in &wanted.by_prefix {
            let Some(eni) = enis.values().find(|e| &e.id == eni_id) else {
                continue;
            };
            self.idle_since.remove(&(eni_id.clone(), *p));
            if let Some(q) = self.queued.get_mut(eni_id) {
                q.unassign.remove(p);
                if eni.has_prefix(*p) {
                    // Queued before a read showed it there (an assign that timed out but was
                    // carried out): nothing left to send.
                    q.assign.remove(p);
                }
            }
            if eni.has_prefix(*p) {
                // A pod of this node holds an address in it on this ENI: the agent's own.
                owned_changed |= self.owned.entry(eni_id.clone()).or_default().insert(*p);
                self.refused.forget(*p);
                continue;
            }
            if self.is_flying(eni_id, *p) || !self.refused.may_try(*p, now) {
                continue;
            }
            self.queued
                .entry(eni_id.clone())
                .or_default()
                .assign
                .insert(*p);
        }
        for (eni, q) in self.queued.iter_mut() {
            q.assign.retain(|p| wanted.by_prefix.get(p) == Some(eni));
        }
        self.refused.retain(|p| wanted.by_prefix.contains_key(&p));
        let mut on_enis = BTreeSet::new();
        let mut unowned = BTreeSet::new();
        for eni in enis.values().filter(|e| e.no_manage) {
            for p in eni.prefixes() {
                let key = (eni.id.clone(), p);
                on_enis.insert(key.clone());
                if wanted.by_prefix.get(&p) == Some(&eni.id) {
                    continue;
                }
                if held.iter().any(|a| p.contains(a)) {
                    // A pod the agent does not manage (or an address in DAD) is inside.
                    self.idle_since.remove(&key);
                    continue;
                }
                let own = self.owns(&eni.id, p);
                if !own {
                    unowned.insert(key.clone());
                }
                if !complete || (!own && !reclaim_unowned) || self.is_flying(&eni.id, p) {
                    continue;
                }
                let since = *self.idle_since.entry(key).or_insert(now);
                if now.saturating_duration_since(since) >= self.release_after {
                    self.queued
                        .entry(eni.id.clone())
                        .or_default()
                        .unassign
                        .insert(p);
                }
            }
        }
        self.idle_since.retain(|k, _| on_enis.contains(k));
        for (eni, q) in self.queued.iter_mut() {
            q.unassign.retain(|p| on_enis.contains(&(eni.clone(), *p)));
        }
        self.queued
            .retain(|_, q| !q.assign.is_empty() || !q.unassign.is_empty());
        self.unowned = unowned;
        self.wanted = wanted;
        owned_changed
    }

    fn owns(&self, eni: &str, p: IpNet) -> bool {
        self.owned.get(eni).is_some_and(|s| s.contains(&p))
    }

    fn is_flying(&self, eni: &str, p: IpNet) -> bool {
        self.flying.get(eni).is_some_and(|s| s.contains(&p))
    }

    /// Takes the queued calls of every ENI without a prefix call in flight, and not `held` (the
    /// outcome of its last call is unknown until a read), and marks them in flight: unassigns first (a released prefix frees a slot for the next), at most one call
    /// per family and direction. Prefix calls are rare (one per node block), so they are not
    /// paced like address batches.
    pub fn take_ready(&mut self, held: impl Fn(&str) -> bool) -> Vec<(EniId, Vec<PrefixChange>)> {
        let ready: Vec<EniId> = self
            .queued
            .keys()
            .filter(|e| !self.flying.contains_key(*e) && !held(e))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for eni in ready {
            let Some(q) = self.queued.remove(&eni) else {
                continue;
            };
            let mut changes = PrefixChange::of(&eni, false, &q.unassign);
            changes.extend(PrefixChange::of(&eni, true, &q.assign));
            let names: BTreeSet<IpNet> = q.assign.union(&q.unassign).copied().collect();
            self.flying.insert(eni.clone(), names);
            out.push((eni, changes));
        }
        out
    }

    /// An ENI's prefix calls returned: records what EC2 accepted (in `enis`, the owned
    /// prefixes, and for a Describe running now, `reading`) and what it refused. A call that
    /// failed otherwise (throttled, server error) is simply planned again.
    pub fn done(
        &mut self,
        eni: &str,
        outcomes: &[PrefixOutcome],
        enis: Option<&mut InstanceEnis>,
        reading: bool,
        now: Instant,
    ) -> Done {
        self.flying.remove(eni);
        let mut done = Done::default();
        let mut accepted = Vec::new();
        for o in outcomes {
            let assign = o.change.is_assign();
            match &o.result {
                Ok(()) => {
                    for p in o.change.prefixes() {
                        self.refused.forget(p);
                        self.idle_since.remove(&(eni.to_string(), p));
                        if assign {
                            self.owned.entry(eni.to_string()).or_default().insert(p);
                        } else if let Some(s) = self.owned.get_mut(eni) {
                            s.remove(&p);
                        }
                    }
                    self.owned.retain(|_, s| !s.is_empty());
                    done.checkpoint = true;
                    accepted.push(o.change.clone());
                }
                Err(e) if e.kind == ErrorKind::Rejected && assign => {
                    for p in o.change.prefixes() {
                        self.refused.rejected(p, e.message.clone(), now);
                    }
                }
                Err(e) if e.kind == ErrorKind::Rejected => done.read = true,
                Err(_) => {}
            }
        }
        if let Some(enis) = enis {
            for change in &accepted {
                for e in enis.values_mut() {
                    e.apply_prefixes(change);
                }
            }
        }
        if reading {
            self.applied_during_read.extend(accepted);
        }
        done
    }

    /// A Describe of the instance returned: the calls EC2 accepted while it ran are applied to
    /// its answer again.
    pub fn read_returned(&mut self, enis: &mut InstanceEnis) {
        for change in std::mem::take(&mut self.applied_during_read) {
            for e in enis.values_mut() {
                e.apply_prefixes(&change);
            }
        }
    }

    /// When the next idle prefix is due for release or a refused one may be tried again.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.idle_since
            .values()
            .map(|since| *since + self.release_after)
            .filter(|t| *t > now)
            .chain(self.refused.next_due(now))
            .min()
    }

    /// Where `address`, on an interface of `eni`, stands in prefix mode: `None` when it is not
    /// inside a prefix range (per-address mode), or when the ENI already routes it.
    pub fn state(
        &self,
        address: IpAddr,
        eni: &EniAddresses,
    ) -> Option<(AddressState, Option<EniId>, Option<String>)> {
        let p = prefix_of(&self.ranges, address)?;
        if eni.holds(address) {
            return None;
        }
        let id = Some(eni.id.clone());
        Some(match self.wanted.by_prefix.get(&p) {
            Some(chosen) if *chosen != eni.id => (
                AddressState::Conflict,
                Some(chosen.clone()),
                Some(format!(
                    "its prefix {p} is wanted on {chosen}, another ENI of this instance: a prefix is on one ENI only"
                )),
            ),
            _ => match self.refused.reason(p) {
                Some(reason) => (
                    AddressState::Refused,
                    id,
                    Some(format!(
                        "{EC2_SAID}{reason} (prefix {p}; never forced, retried with backoff)"
                    )),
                ),
                None => (
                    AddressState::Pending,
                    id,
                    Some(format!("assigning its prefix {p}")),
                ),
            },
        })
    }

    /// Every prefix the book knows of on this instance's Multus ENIs or wanted there, with
    /// where it stands (for `status` and the gauge).
    pub fn rows(&self, enis: &InstanceEnis) -> Vec<(EniId, IpNet, PrefixState)> {
        let mut rows = Vec::new();
        for eni in enis.values().filter(|e| e.no_manage) {
            for p in eni.prefixes() {
                let key = (eni.id.clone(), p);
                let state = if self.wanted.by_prefix.get(&p) == Some(&eni.id) {
                    PrefixState::InUse
                } else if self.unowned.contains(&key) {
                    PrefixState::Unowned
                } else {
                    PrefixState::Idle
                };
                rows.push((eni.id.clone(), p, state));
            }
        }
        for (p, eni_id) in &self.wanted.by_prefix {
            let on = enis.values().any(|e| &e.id == eni_id && e.has_prefix(*p));
            if !on {
                let state = if self.refused.reason(*p).is_some() {
                    PrefixState::Refused
                } else {
                    PrefixState::Assigning
                };
                rows.push((eni_id.clone(), *p, state));
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multus_eni_ec2::MacAddress;
    use multus_eni_ec2::model::EniAddresses;

    use crate::plan::Holder;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    const MAC_A: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 1]);
    const MAC_B: MacAddress = MacAddress([0x0e, 0, 0, 0, 0, 2]);
    const HOUR: Duration = Duration::from_secs(3600);

    fn enis(prefixes_a: &[&str]) -> InstanceEnis {
        let mut a = EniAddresses {
            id: "eni-a".into(),
            no_manage: true,
            ..Default::default()
        };
        for p in prefixes_a {
            match net(p) {
                IpNet::V4(p) => a.ipv4_prefixes.insert(p),
                IpNet::V6(p) => a.ipv6_prefixes.insert(p),
            };
        }
        let b = EniAddresses {
            id: "eni-b".into(),
            no_manage: true,
            ..Default::default()
        };
        [(MAC_A, a), (MAC_B, b)].into()
    }

    fn wanted_on(pairs: &[(&str, &str)]) -> Wanted {
        let mut w = Wanted::default();
        for (eni, a) in pairs {
            w.by_eni.entry(eni.to_string()).or_default().insert(
                ip(a),
                Holder {
                    netns: "cni-1".into(),
                    interface: "net1".into(),
                },
            );
        }
        w
    }

    fn ranges() -> Vec<IpNet> {
        vec![net("10.0.0.64/26"), net("2001:db8:0:0:7::/80")]
    }

    #[test]
    fn the_prefix_of_an_address_is_the_aligned_block_inside_a_range() {
        let r = ranges();
        assert_eq!(prefix_of(&r, ip("10.0.0.77")), Some(net("10.0.0.64/28")));
        assert_eq!(prefix_of(&r, ip("10.0.0.127")), Some(net("10.0.0.112/28")));
        assert_eq!(prefix_of(&r, ip("10.0.0.128")), None, "outside the range");
        assert_eq!(
            prefix_of(&r, ip("2001:db8::7:0:0:5")),
            Some(net("2001:db8::7:0:0:0/80"))
        );
        assert_eq!(prefix_of(&r, ip("2001:db8::8:0:0:5")), None);
    }

    #[test]
    fn a_range_must_hold_whole_prefixes() {
        assert_eq!(parse_range("10.0.0.70/26"), Ok(net("10.0.0.64/26")));
        assert!(parse_range("10.0.0.64/29").is_err());
        assert!(parse_range("2001:db8::/96").is_err());
        assert!(parse_range("2001:db8::/80").is_ok());
        assert!(parse_range("10.0.0.64").is_err());
    }

    #[test]
    fn addresses_in_a_range_want_their_prefix_and_never_an_individual_secondary() {
        let mut w = wanted_on(&[
            ("eni-a", "10.0.0.65"),
            ("eni-a", "10.0.0.70"),
            ("eni-a", "10.0.0.200"),
            ("eni-b", "10.0.0.66"),
            ("eni-b", "10.0.0.90"),
        ]);
        let p = take_ranged(&mut w, &ranges(), &enis(&[]));
        assert_eq!(
            w.pairs(),
            [("eni-a".to_string(), ip("10.0.0.200"))].into(),
            "only the address outside the ranges stays per address"
        );
        assert_eq!(
            p.by_prefix,
            [
                (net("10.0.0.64/28"), "eni-a".to_string()),
                (net("10.0.0.80/28"), "eni-b".to_string()),
            ]
            .into(),
            "one ENI per prefix: the first by id"
        );
        // The ENI already holding the prefix keeps it.
        let mut w = wanted_on(&[("eni-a", "10.0.0.65"), ("eni-b", "10.0.0.66")]);
        let mut e = enis(&[]);
        if let Some(b) = e.get_mut(&MAC_B) {
            b.ipv4_prefixes
                .insert("10.0.0.64/28".parse().unwrap_or_else(|e| panic!("{e}")));
        }
        let p = take_ranged(&mut w, &ranges(), &e);
        assert_eq!(
            p.by_prefix.get(&net("10.0.0.64/28")).map(String::as_str),
            Some("eni-b")
        );
    }

    fn plan(book: &mut PrefixBook, w: &[(&str, &str)], e: &InstanceEnis, now: Instant) -> bool {
        let mut wanted = wanted_on(w);
        let held: BTreeSet<IpAddr> = wanted.pairs().into_iter().map(|(_, a)| a).collect();
        let p = take_ranged(&mut wanted, book.ranges(), e);
        book.plan(p, e, &held, true, false, now)
    }

    fn ok(change: PrefixChange) -> PrefixOutcome {
        PrefixOutcome {
            change,
            result: Ok(()),
        }
    }

    #[test]
    fn an_assign_that_timed_out_waits_for_a_read_and_is_not_sent_again_when_it_shows() {
        let mut book = PrefixBook::new(ranges(), HOUR, BTreeMap::new());
        let t0 = Instant::now();
        let mut e = enis(&[]);
        plan(&mut book, &[("eni-a", "10.0.0.65")], &e, t0);
        let calls = book.take_ready(|_| false);
        let timed_out = PrefixOutcome {
            change: calls[0].1[0].clone(),
            result: Err(multus_eni_ec2::Error {
                action: "AssignPrivateIpAddresses",
                kind: ErrorKind::Timeout,
                message: "operation timeout".into(),
                code: None,
            }),
        };
        book.done("eni-a", &[timed_out], Some(&mut e), false, t0);
        // Planned again from what the agent knew before the call, but held (the node marks
        // the ENI unsure until a read that started after the timeout).
        plan(&mut book, &[("eni-a", "10.0.0.65")], &e, t0);
        assert!(book.take_ready(|eni| eni == "eni-a").is_empty());
        // The read shows EC2 carried it out: nothing is left to send.
        if let Some(a) = e.get_mut(&MAC_A) {
            a.ipv4_prefixes
                .insert("10.0.0.64/28".parse().unwrap_or_else(|e| panic!("{e}")));
        }
        plan(&mut book, &[("eni-a", "10.0.0.65")], &e, t0);
        assert!(book.take_ready(|_| false).is_empty());
        assert_eq!(book.owned().get("eni-a").map(|s| s.len()), Some(1));
    }

    #[test]
    fn the_first_pod_of_a_block_costs_one_call_and_later_ones_none() {
        let mut book = PrefixBook::new(ranges(), HOUR, BTreeMap::new());
        let t0 = Instant::now();
        let mut e = enis(&[]);
        plan(
            &mut book,
            &[("eni-a", "10.0.0.65"), ("eni-a", "10.0.0.66")],
            &e,
            t0,
        );
        let calls = book.take_ready(|_| false);
        assert_eq!(
            calls,
            vec![(
                "eni-a".to_string(),
                vec![PrefixChange::AssignIpv4 {
                    eni: "eni-a".into(),
                    prefixes: vec!["10.0.0.64/28".parse().unwrap_or_else(|e| panic!("{e}"))],
                }]
            )]
        );
        // While it flies, nothing more goes out.
        plan(&mut book, &[("eni-a", "10.0.0.67")], &e, t0);
        assert!(book.take_ready(|_| false).is_empty());
        let outcomes: Vec<PrefixOutcome> = calls[0].1.iter().cloned().map(ok).collect();
        let done = book.done("eni-a", &outcomes, Some(&mut e), false, t0);
        assert!(done.checkpoint && !done.read);
        assert!(e.get(&MAC_A).is_some_and(|a| a.holds(ip("10.0.0.79"))));
        assert_eq!(book.owned().get("eni-a").map(|s| s.len()), Some(1));
        plan(
            &mut book,
            &[("eni-a", "10.0.0.65"), ("eni-a", "10.0.0.78")],
            &e,
            t0,
        );
        assert!(
            book.take_ready(|_| false).is_empty(),
            "a later pod costs no call"
        );
        let a = e.get(&MAC_A).cloned().unwrap_or_default();
        assert_eq!(
            book.state(ip("10.0.0.78"), &a),
            None,
            "routable: the ENI holds it"
        );
    }

    #[test]
    fn an_idle_prefix_is_kept_for_the_release_delay_then_given_back_once() {
        let after = Duration::from_secs(600);
        let owned = [("eni-a".to_string(), [net("10.0.0.64/28")].into())].into();
        let mut book = PrefixBook::new(ranges(), after, owned);
        let e = enis(&["10.0.0.64/28"]);
        let t0 = Instant::now();
        plan(&mut book, &[("eni-a", "10.0.0.65")], &e, t0);
        assert!(book.take_ready(|_| false).is_empty());
        // The last pod left: idle from now.
        let t1 = t0 + Duration::from_secs(5);
        plan(&mut book, &[], &e, t1);
        assert!(book.take_ready(|_| false).is_empty());
        assert_eq!(book.next_due(t1), Some(t1 + after));
        // A new pod within the delay reuses it without a call, and the clock starts over.
        let t2 = t1 + after - Duration::from_secs(1);
        plan(&mut book, &[("eni-a", "10.0.0.70")], &e, t2);
        assert!(book.take_ready(|_| false).is_empty());
        let t3 = t2 + Duration::from_secs(1);
        plan(&mut book, &[], &e, t3);
        plan(&mut book, &[], &e, t3 + after - Duration::from_millis(1));
        assert!(
            book.take_ready(|_| false).is_empty(),
            "not before the delay"
        );
        plan(&mut book, &[], &e, t3 + after);
        let calls = book.take_ready(|_| false);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].1[0].action(), "UnassignPrivateIpAddresses");
        plan(&mut book, &[], &e, t3 + after * 2);
        assert!(
            book.take_ready(|_| false).is_empty(),
            "one unassign in flight at a time"
        );
    }

    #[test]
    fn an_unknown_node_releases_nothing_and_an_unowned_prefix_stays() {
        let mut book = PrefixBook::new(ranges(), Duration::from_secs(1), BTreeMap::new());
        let e = enis(&["10.0.0.64/28", "2001:db8::7:0:0:0/80"]);
        let t0 = Instant::now();
        let later = t0 + HOUR;
        book.plan(
            WantedPrefixes::default(),
            &e,
            &BTreeSet::new(),
            true,
            false,
            t0,
        );
        book.plan(
            WantedPrefixes::default(),
            &e,
            &BTreeSet::new(),
            true,
            false,
            later,
        );
        assert!(book.take_ready(|_| false).is_empty(), "unowned: kept");
        let rows = book.rows(&e);
        assert!(rows.iter().all(|r| r.2 == PrefixState::Unowned), "{rows:?}");
        book.plan(
            WantedPrefixes::default(),
            &e,
            &BTreeSet::new(),
            false,
            true,
            later,
        );
        assert!(
            book.take_ready(|_| false).is_empty(),
            "view incomplete: nothing released"
        );
        book.plan(
            WantedPrefixes::default(),
            &e,
            &BTreeSet::new(),
            true,
            true,
            later,
        );
        book.plan(
            WantedPrefixes::default(),
            &e,
            &BTreeSet::new(),
            true,
            true,
            later + HOUR,
        );
        let calls = book.take_ready(|_| false);
        assert_eq!(calls[0].1.len(), 2, "--reclaim-unowned: both families");
        // An address held by a pod the agent does not manage keeps a prefix.
        let mut book = PrefixBook::new(ranges(), Duration::from_secs(1), BTreeMap::new());
        let held = [ip("10.0.0.65"), ip("2001:db8::7:0:0:1")].into();
        book.plan(WantedPrefixes::default(), &e, &held, true, true, t0);
        book.plan(WantedPrefixes::default(), &e, &held, true, true, later);
        assert!(book.take_ready(|_| false).is_empty());
    }

    #[test]
    fn a_refused_prefix_is_refused_with_ec2s_reason_and_tried_again_later() {
        let mut book = PrefixBook::new(ranges(), HOUR, BTreeMap::new());
        let mut e = enis(&[]);
        let t0 = Instant::now();
        plan(&mut book, &[("eni-a", "2001:db8::7:0:0:9")], &e, t0);
        let calls = book.take_ready(|_| false);
        let refusal = multus_eni_ec2::Error {
            action: "AssignIpv6Addresses",
            kind: ErrorKind::Rejected,
            message: "InvalidParameterValue: Prefix 2001:db8:0:0:7::/80 is already assigned."
                .into(),
            code: Some("InvalidParameterValue".into()),
        };
        let outcomes = vec![PrefixOutcome {
            change: calls[0].1[0].clone(),
            result: Err(refusal),
        }];
        assert_eq!(
            book.done("eni-a", &outcomes, Some(&mut e), false, t0),
            Done::default()
        );
        let a = e.get(&MAC_A).cloned().unwrap_or_default();
        let Some((state, eni, Some(reason))) = book.state(ip("2001:db8::7:0:0:9"), &a) else {
            panic!("inside a range and not routable");
        };
        assert_eq!(
            (state, eni.as_deref()),
            (AddressState::Refused, Some("eni-a"))
        );
        assert!(
            reason.starts_with(EC2_SAID) && reason.contains("already assigned"),
            "{reason}"
        );
        plan(
            &mut book,
            &[("eni-a", "2001:db8::7:0:0:9")],
            &e,
            t0 + Duration::from_secs(1),
        );
        assert!(book.take_ready(|_| false).is_empty(), "waits its backoff");
        plan(&mut book, &[("eni-a", "2001:db8::7:0:0:9")], &e, t0 + HOUR);
        assert_eq!(
            book.take_ready(|_| false).len(),
            1,
            "tried again, exclusively"
        );
    }

    #[test]
    fn an_address_whose_prefix_is_wanted_on_another_eni_is_a_conflict() {
        let mut book = PrefixBook::new(ranges(), HOUR, BTreeMap::new());
        let e = enis(&[]);
        plan(
            &mut book,
            &[("eni-a", "10.0.0.65"), ("eni-b", "10.0.0.66")],
            &e,
            Instant::now(),
        );
        let b = e.get(&MAC_B).cloned().unwrap_or_default();
        let state = book.state(ip("10.0.0.66"), &b).map(|s| s.0);
        assert_eq!(state, Some(AddressState::Conflict));
        assert_eq!(book.state(ip("10.0.0.200"), &b), None, "outside the ranges");
    }

    #[test]
    fn an_accepted_call_is_applied_again_to_a_describe_that_ran_meanwhile() {
        let mut book = PrefixBook::new(ranges(), HOUR, BTreeMap::new());
        let mut e = enis(&[]);
        let t0 = Instant::now();
        plan(&mut book, &[("eni-a", "10.0.0.65")], &e, t0);
        let calls = book.take_ready(|_| false);
        let outcomes: Vec<PrefixOutcome> = calls[0].1.iter().cloned().map(ok).collect();
        book.done("eni-a", &outcomes, Some(&mut e), true, t0);
        let mut stale = enis(&[]);
        book.read_returned(&mut stale);
        assert_eq!(stale, e);
    }
}
