//! The node: one task that owns what the agent knows of its node (pod namespaces from
//! [`crate::watch`], this instance's ENIs from EC2), the per-ENI batches, the backoffs and the
//! checkpoint, and makes the EC2 calls. Connections, the watcher, EC2 calls and timers talk to
//! it by [`Event`]s; the decisions are the pure functions of [`crate::plan`], [`crate::batch`],
//! [`crate::reclaim`], [`crate::conflict`] and [`crate::retry`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use multus_eni_ec2::MacAddress;
use multus_eni_ec2::eni::{Ec2, ErrorKind};
use multus_eni_ec2::model::{Change, EniAddresses, EniId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::batch::Batches;
use crate::callers::Callers;
use crate::calls::{BatchOutcome, Permissions, call_batch};
use crate::checkpoint::Checkpoint;
use crate::conflict::Conflicts;
use crate::connection::{ClaimHint, ConnId, Peer};
use crate::health::Ec2Health;
use crate::macs::MacBook;
use crate::metrics::{Metrics, RefusalLabels, ReleaseLabels};
use crate::plan::{self, InstanceEnis, Knowledge, NetnsId, PodNetns, Pods, Refusal, Wanted};
use crate::reclaim::{UnheldSince, unheld};
use crate::retry::RetryBook;
use crate::status::NodeStatus;
use crate::status::Unowned;
use crate::view::View;
use crate::watch::{Ask, Seen, WatchHandle};

// --- prefix mode (issue 23): hooks in node/prefixes.rs ---
mod prefixes;
use crate::prefix::{self, PrefixBook};
use multus_eni_ec2::eni::PrefixOutcome;
// --- end prefix mode ---

/// What the node task reacts to.
#[derive(Debug)]
pub enum Event {
    /// A caller connected (its namespace pinned at accept).
    Connected { conn: ConnId, peer: Peer },
    /// A claim: a hint to look at the caller's namespace, and what to answer about.
    Claim {
        conn: ConnId,
        hint: ClaimHint,
        /// Dropped once taken: the connection reads its next line.
        done: oneshot::Sender<()>,
    },
    /// The sidecar said "release": look at its namespace again.
    Release {
        conn: ConnId,
        /// Dropped once taken: the connection reads its next line.
        done: oneshot::Sender<()>,
    },
    /// The connection closed.
    Disconnected { conn: ConnId },
    /// The watcher saw something.
    Seen(Seen),
    /// Time for a resync: read the instance's ENIs, rescan `--netns-dir`.
    Resync,
    /// The instance's ENIs were read (the `seq`-th read started).
    Read {
        seq: u64,
        result: multus_eni_ec2::Result<InstanceEnis>,
    },
    /// MACs that are not this instance's were looked up.
    Foreign {
        macs: Vec<MacAddress>,
        found: multus_eni_ec2::Result<BTreeMap<MacAddress, EniAddresses>>,
    },
    /// An ENI's batch returned.
    Called { eni: EniId, outcome: BatchOutcome },
    /// A timer fired.
    Wake,
    /// An ENI's prefix calls returned (prefix mode).
    PrefixCalled {
        eni: EniId,
        outcomes: Vec<PrefixOutcome>,
    },
}

/// Settings of the node task.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub instance_id: String,
    pub pods: Pods,
    pub checkpoint: PathBuf,
    pub reclaim_after: Duration,
    pub batch_interval: Duration,
    pub max_connections_per_pod: usize,
    /// `--reclaim-unowned`: reclaim addresses no pod of this node was ever seen holding too.
    pub reclaim_unowned: bool,
    /// `--ignore-cidrs`.
    pub ignored: Vec<IpNet>,
    /// `--max-mac-lookups` per resync interval.
    pub max_mac_lookups: usize,
    /// First wait after EC2 refused the agent's credentials (`--auth-backoff`).
    pub auth_backoff: Duration,
    /// `--prefix-ranges` (empty: prefix mode off).
    pub prefix_ranges: Vec<IpNet>,
    /// `--prefix-release-after`.
    pub prefix_release_after: Duration,
}

pub struct Node {
    ec2: Arc<Ec2>,
    metrics: Arc<Metrics>,
    config: NodeConfig,
    events: mpsc::UnboundedSender<Event>,
    watch: WatchHandle,
    view: View,
    enis: Option<InstanceEnis>,
    macs: MacBook,
    callers: Callers,
    batches: Batches,
    rejected: RetryBook,
    conflicts: Conflicts,
    unheld: UnheldSince,
    checkpoint: Checkpoint,
    health: Ec2Health,
    /// A Describe of the instance is running / another one is wanted after it.
    reading: bool,
    read_again: bool,
    /// The read was asked by the resync timer: reclaim after it.
    resync_waiting: bool,
    wanted: Wanted,
    /// Since when each wanted address has been missing from its ENI.
    pending_since: BTreeMap<IpAddr, Instant>,
    /// Addresses on this instance's Multus ENIs that are not this agent's own (last resync).
    unowned: BTreeSet<(EniId, IpAddr)>,
    /// ENIs that refused an assign for their address limit since their last unassign: no
    /// address is moved onto them.
    full: BTreeSet<EniId>,
    /// Changes EC2 accepted while a Describe of the instance was running: applied again to its
    /// answer, which may predate them.
    applied_during_read: Vec<(Change, BTreeMap<IpAddr, EniId>)>,
    /// Reads of the instance started so far.
    reads_started: u64,
    /// ENIs whose calls are held until the read of this number (or a later one) returned: the
    /// outcome of their last call is unknown (a timeout) or EC2 said an address is not there.
    unsure: BTreeMap<EniId, u64>,
    wake_at: Option<Instant>,
    status: watch::Sender<Arc<NodeStatus>>,
    /// Prefix mode: the delegated prefixes ([`crate::prefix`]).
    prefixes: PrefixBook,
}

// === impl Node ===

impl Node {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ec2: Arc<Ec2>,
        metrics: Arc<Metrics>,
        config: NodeConfig,
        checkpoint: Checkpoint,
        events: mpsc::UnboundedSender<Event>,
        watch: WatchHandle,
        status: watch::Sender<Arc<NodeStatus>>,
    ) -> Self {
        let batches = Batches::with_interval(config.batch_interval);
        let callers = Callers::new(metrics.clone(), config.max_connections_per_pod);
        let health = Ec2Health::new(metrics.clone(), config.auth_backoff);
        let conflicts =
            Conflicts::restore(&checkpoint.conflicts, Instant::now(), SystemTime::now());
        let macs = MacBook::new(config.max_mac_lookups);
        let prefixes = PrefixBook::new(
            config.prefix_ranges.clone(),
            config.prefix_release_after,
            checkpoint.prefixes.clone(),
        );
        Self {
            ec2,
            metrics,
            config,
            events,
            watch,
            view: View::default(),
            enis: None,
            macs,
            callers,
            batches,
            rejected: RetryBook::default(),
            conflicts,
            unheld: UnheldSince::default(),
            checkpoint,
            health,
            reading: false,
            read_again: false,
            resync_waiting: false,
            wanted: Wanted::default(),
            pending_since: BTreeMap::new(),
            unowned: BTreeSet::new(),
            full: BTreeSet::new(),
            applied_during_read: Vec::new(),
            reads_started: 0,
            unsure: BTreeMap::new(),
            wake_at: None,
            status,
            prefixes,
        }
    }

    /// Handles events until the channel closes.
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        while let Some(event) = events.recv().await {
            self.handle(event);
            // Everything already queued is applied before the next calls go out.
            while let Ok(event) = events.try_recv() {
                self.handle(event);
            }
            self.plan();
            self.look_up_macs();
            self.dispatch();
            self.answer();
            self.publish();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connected { conn, peer } => {
                self.callers.connect(conn, peer, &self.view, Instant::now())
            }
            Event::Claim { conn, hint, done } => {
                drop(done);
                if let Some(netns) = self.callers.claim(conn, hint) {
                    self.look_at(netns);
                }
            }
            Event::Release { conn, done } => {
                drop(done);
                // Only a look: the pod's namespace says what it still holds.
                if let Some(netns) = self.callers.netns_of(conn) {
                    self.look_at(netns);
                }
            }
            Event::Disconnected { conn } => {
                if let Some(netns) = self.callers.netns_of(conn) {
                    self.look_at(netns);
                }
                self.callers.remove(conn);
            }
            Event::Seen(seen) => {
                if let Some(gone) = self.view.apply(seen) {
                    self.callers.pod_gone(gone);
                }
                self.callers.verify(&self.view, Instant::now());
                self.metrics
                    .watched_namespaces
                    .set(self.view.pods.len() as i64);
            }
            Event::Resync => {
                self.resync_waiting = true;
                self.watch.ask(Ask::Rescan);
                self.read();
                self.full.clear();
                if let Some(enis) = &self.enis {
                    self.macs.resync(&self.pod_macs(), enis);
                }
                if self.conflicts.decay(Instant::now()) {
                    self.save_checkpoint();
                }
            }
            Event::Read { seq, result } => self.on_read(seq, result),
            Event::Foreign { macs, found } => self.on_foreign(macs, found),
            Event::Called { eni, outcome } => self.on_called(&eni, outcome),
            Event::PrefixCalled { eni, outcomes } => self.on_prefix_called(&eni, outcomes),
            Event::Wake => {
                let now = Instant::now();
                if self.wake_at.is_some_and(|w| w <= now) {
                    self.wake_at = None;
                }
                self.callers.verify(&self.view, now);
                if self.health.wake(now) && std::mem::take(&mut self.read_again) {
                    self.read();
                }
            }
        }
    }

    /// Asks the watcher to read the pod namespace `netns` again.
    fn look_at(&self, netns: NetnsId) {
        if let Some(pod) = self.view.pod_by_id(netns) {
            self.watch.ask(Ask::Look {
                name: pod.name.clone(),
            });
        }
    }

    /// Starts one Describe of the instance's ENIs, or remembers to start another.
    fn read(&mut self) {
        if self.reading || self.health.waiting() {
            self.read_again = true;
            return;
        }
        self.reading = true;
        self.reads_started += 1;
        let seq = self.reads_started;
        let ec2 = self.ec2.clone();
        let events = self.events.clone();
        let instance = self.config.instance_id.clone();
        tokio::spawn(async move {
            let result = ec2.instance_enis(&instance).await;
            let _ = events.send(Event::Read { seq, result });
        });
    }

    /// The outcome of `eni`'s last call is unknown: its calls wait for a read of the instance
    /// that starts after now, and nothing else is decided for its addresses before.
    fn unsure_of(&mut self, eni: &str) {
        self.batches.hold(eni);
        let next = self.reads_started + 1;
        self.unsure.insert(eni.to_string(), next);
        self.read();
    }

    fn on_read(&mut self, seq: u64, result: multus_eni_ec2::Result<InstanceEnis>) {
        self.reading = false;
        let applied = std::mem::take(&mut self.applied_during_read);
        match result {
            Ok(mut enis) => {
                // The answer may predate calls that returned while it ran: never let it
                // overwrite their results.
                for (change, moved) in &applied {
                    apply_to(&mut enis, change, moved);
                }
                self.prefixes.read_returned(&mut enis);
                self.health.success("DescribeNetworkInterfaces");
                let before: BTreeSet<EniId> = self
                    .enis
                    .iter()
                    .flat_map(|e| e.values().map(|e| e.id.clone()))
                    .collect();
                let now_ids: BTreeSet<EniId> = enis.values().map(|e| e.id.clone()).collect();
                for detached in before.difference(&now_ids) {
                    tracing::warn!(action = "resync", eni = %detached, "an ENI is no longer attached to this instance: never called on again");
                }
                // The checkpoint keeps only this instance's ENIs.
                self.checkpoint.enis = enis
                    .iter()
                    .filter(|(_, e)| e.no_manage)
                    .map(|(m, e)| (m.to_string(), e.id.clone()))
                    .collect();
                self.checkpoint.owned.retain(|eni, _| now_ids.contains(eni));
                self.prefixes.keep_enis(&now_ids);
                self.enis = Some(enis);
                self.settle_unsure(seq);
                self.save_checkpoint();
                self.notice_taken_away();
                if std::mem::take(&mut self.resync_waiting) {
                    self.reclaim();
                }
            }
            Err(e) => {
                self.health.failure("DescribeNetworkInterfaces", &e);
                tracing::warn!(action = "DescribeNetworkInterfaces", outcome = %e.kind, error = %e.message, hint = e.kind.hint(), "cannot read the instance's ENIs");
                self.retry_later(e.kind);
                self.read_again = true;
            }
        }
        if !self.health.waiting() && std::mem::take(&mut self.read_again) {
            self.read();
        }
    }

    /// ENIs whose calls waited for this read may call again; queued unassigns of what the read
    /// shows gone are done (the address is off the ENI already).
    fn settle_unsure(&mut self, seq: u64) {
        let settled: Vec<EniId> = self
            .unsure
            .iter()
            .filter(|(_, needed)| **needed <= seq)
            .map(|(eni, _)| eni.clone())
            .collect();
        for eni_id in settled {
            self.unsure.remove(&eni_id);
            let eni = self
                .enis
                .as_ref()
                .and_then(|e| e.values().find(|e| e.id == eni_id).cloned());
            let gone = self
                .batches
                .unhold(&eni_id, |a| eni.as_ref().is_some_and(|e| e.holds(a)));
            if !gone.is_empty() {
                tracing::info!(action = "release", outcome = "already_gone", eni = %eni_id, addresses = ?gone, "read again: these addresses are off the ENI already");
                self.checkpoint.record_unassigned(&eni_id, gone);
            }
        }
    }

    /// Addresses that are this agent's own, still wanted, and no longer on their ENI: someone
    /// moved them (another node's pod holds the same address, or an operator).
    fn notice_taken_away(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        let now = Instant::now();
        for (eni_id, addresses) in &self.checkpoint.owned {
            let Some(eni) = enis.values().find(|e| &e.id == eni_id) else {
                continue;
            };
            for &a in addresses {
                if self.wanted.eni_of(a) != Some(eni_id) || self.batches.is_flying(eni_id, a) {
                    continue;
                }
                if eni.holds(a) {
                    self.conflicts.back(a);
                } else if self.conflicts.away(eni_id, a) {
                    let waiting = self.conflicts.waiting(a, now).is_some();
                    tracing::warn!(
                        action = "resync",
                        outcome = if waiting { "conflict" } else { "taken_away" },
                        eni = %eni_id,
                        address = %a,
                        "an address this agent assigned was moved to another ENI while a pod of this node still holds it: {}",
                        if waiting { "conflict, waiting before taking it back again" } else { "taking it back once" }
                    );
                }
            }
        }
    }

    /// Unassigns addresses on this instance's Multus ENIs that nothing on the node has held
    /// for `--reclaim-after` (leaks from while the agent was down), if they are this agent's
    /// own (or `--reclaim-unowned`). Only when every namespace of the node could be read. An
    /// address no pod of this node was ever seen holding is `unowned`: counted, shown, kept.
    fn reclaim(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        if !self.view.every_namespace_read() {
            return;
        }
        let mut held = plan::held(
            self.view
                .pods
                .values()
                .flat_map(|p| p.interfaces.iter())
                .chain(self.view.host.iter()),
        );
        held.extend(self.wanted.pairs().into_iter().map(|(_, a)| a));
        let mut candidates = unheld(enis.values(), &held);
        candidates.retain(|(eni, a)| {
            !self.batches.is_flying(eni, *a) && !plan::is_ignored(&self.config.ignored, *a)
        });
        let unowned: BTreeSet<(EniId, IpAddr)> = candidates
            .iter()
            .filter(|(eni, a)| !self.checkpoint.owns(eni, *a))
            .cloned()
            .collect();
        for (eni, address) in unowned.difference(&self.unowned) {
            tracing::warn!(action = "reclaim", outcome = "unowned", eni = %eni, address = %address, reclaim = self.config.reclaim_unowned, "an address on a Multus ENI of this instance that no pod of this node was ever seen holding (not this agent's): kept unless --reclaim-unowned");
        }
        if !self.config.reclaim_unowned {
            candidates.retain(|c| !unowned.contains(c));
        }
        self.metrics.unowned_addresses.set(unowned.len() as i64);
        self.unowned = unowned;
        let due = self
            .unheld
            .observe(candidates, Instant::now(), self.config.reclaim_after);
        for (eni, address) in due {
            tracing::info!(action = "reclaim", eni = %eni, address = %address, "no pod of this node has held this address for --reclaim-after: unassigning");
            self.metrics.reclaims.inc();
            self.unheld.forget(&eni, address);
            self.batches.unassign(&eni, address);
        }
    }

    /// The MACs of the node's pod interfaces that could be an ENI's the agent acts for
    /// ([`plan::worth_a_lookup`]).
    fn pod_macs(&self) -> BTreeSet<MacAddress> {
        let Some(enis) = &self.enis else {
            return BTreeSet::new();
        };
        self.view
            .pods
            .values()
            .flat_map(|p| p.interfaces.iter())
            .filter(|i| plan::worth_a_lookup(i, enis, &self.config.ignored))
            .filter_map(|i| i.mac)
            .collect()
    }

    /// Looks up the MACs of the node's pod interfaces that are none of this instance's ENIs
    /// ([`MacBook`]): another instance's ENI is refused, no ENI at all (macvlan, SR-IOV) is left
    /// alone, and until EC2 said which, an address on it is pending. Never while the node backs
    /// off.
    fn look_up_macs(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        if self.health.waiting() {
            return;
        }
        let seen = self.pod_macs();
        let Some(macs) = self.macs.to_ask(seen, enis) else {
            return;
        };
        let ec2 = self.ec2.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let found = ec2.find_by_macs(&macs).await;
            let _ = events.send(Event::Foreign { macs, found });
        });
    }

    fn on_foreign(
        &mut self,
        macs: Vec<MacAddress>,
        found: multus_eni_ec2::Result<BTreeMap<MacAddress, EniAddresses>>,
    ) {
        match found {
            Ok(found) => {
                self.health.success("DescribeNetworkInterfaces");
                let found = self.macs.answered(&macs, found, &self.config.instance_id);
                for (mac, id) in found.other_instance {
                    self.metrics
                        .refusals
                        .get_or_create(&RefusalLabels {
                            reason: "not_this_instance",
                        })
                        .inc();
                    tracing::warn!(action = "lookup", outcome = "refused", mac = %mac, eni = %id, "a pod interface carries the MAC of an ENI that is not attached to this instance");
                }
                if found.ours_unread {
                    // Attached since the last read: read now, not at the next resync.
                    self.read();
                }
            }
            Err(e) => {
                self.macs.failed(&macs);
                self.health.failure("DescribeNetworkInterfaces", &e);
                tracing::warn!(action = "lookup", outcome = %e.kind, error = %e.message, "cannot look up the MACs of pod interfaces; they stay pending");
                self.retry_later(e.kind);
            }
        }
    }

    /// The pods this agent manages (`--pods`).
    fn managed_pods(&self) -> impl Iterator<Item = &PodNetns> {
        self.view.pods.values().filter(|p| match self.config.pods {
            Pods::All => true,
            Pods::Sidecar => self.callers.has_sidecar(p.id),
        })
    }

    /// Compares what the pods hold with this instance's ENIs: queues an assign for what is
    /// missing, an unassign for what a pod let go of.
    fn plan(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        let mut wanted = plan::wanted(self.managed_pods(), enis, &self.config.ignored);
        // Prefix mode: addresses inside --prefix-ranges want their prefix, never themselves.
        let wanted_prefixes = prefix::take_ranged(&mut wanted, self.prefixes.ranges(), enis);
        let now = Instant::now();
        for (address, refusal) in &wanted.refused {
            if !self.wanted.refused.contains_key(address) {
                self.count_refusal(refusal, *address);
            }
        }
        let released: Vec<(EniId, IpAddr)> = if self.view.complete() {
            // Still held somewhere on the node (the host, or a pod's address back in DAD):
            // not let go of.
            let held_still = plan::held(
                self.view
                    .host
                    .iter()
                    .chain(self.view.pods.values().flat_map(|p| p.interfaces.iter())),
            );
            self.wanted
                .pairs()
                .difference(&wanted.pairs())
                .filter(|(_, a)| !held_still.contains(a))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let mut newly_owned = false;
        for (eni_id, addresses) in &wanted.by_eni {
            let Some(eni) = enis.values().find(|e| &e.id == eni_id) else {
                continue;
            };
            for &a in addresses.keys() {
                if eni.holds(a) {
                    self.batches.cancel_unassign(eni_id, a);
                    // An assign whose outcome was unknown may have landed after all.
                    self.batches.cancel_assign(eni_id, a);
                    self.pending_since.remove(&a);
                    // A pod of this node holds it on this ENI: the agent's own from now on.
                    newly_owned |= self.checkpoint.record_owned(eni_id, [a]);
                    continue;
                }
                self.pending_since.entry(a).or_insert(now);
                if self.batches.is_flying(eni_id, a) || !self.rejected.may_try(a, now) {
                    continue;
                }
                if !self.conflicts.may_take(a, now) {
                    // The take waits; whether the other holder let go is asked now and then
                    // (the batch looks it up and assigns it only if nobody holds it).
                    if !self.conflicts.may_try_exclusive(a, now) {
                        continue;
                    }
                    self.conflicts.tried_exclusive(a, now);
                }
                self.batches.assign(eni_id, a);
            }
        }
        let wanted_addresses: BTreeSet<IpAddr> =
            wanted.pairs().into_iter().map(|(_, a)| a).collect();
        self.pending_since
            .retain(|a, _| wanted_addresses.contains(a));
        self.wanted = wanted;
        for (eni, address) in released {
            self.release(&eni, address);
        }
        if newly_owned {
            self.save_checkpoint();
        }
        self.plan_prefixes(wanted_prefixes);
    }

    /// A pod let go of `address`: unassign it from `eni` if it is there (or on its way). The
    /// conflict history stays: a pod that lets go of an address and takes it again does not
    /// start a new fight.
    fn release(&mut self, eni_id: &str, address: IpAddr) {
        self.rejected.forget(address);
        let on_eni = self
            .enis
            .as_ref()
            .and_then(|e| e.values().find(|e| e.id == eni_id))
            .is_some_and(|e| e.holds(address));
        if on_eni || self.batches.is_flying(eni_id, address) {
            self.batches.unassign(eni_id, address);
            self.metrics
                .releases
                .get_or_create(&ReleaseLabels { cause: "gone" })
                .inc();
            tracing::info!(action = "release", cause = "gone", eni = %eni_id, address = %address, "no pod of this node holds the address any more: queued unassign");
        } else {
            self.batches.cancel_assign(eni_id, address);
            self.checkpoint.record_unassigned(eni_id, [address]);
        }
    }

    /// Sends every ready batch, one task per ENI, unless the node is backing off; arms the
    /// one timer for what waits (a batch's interval, a rejected address, a conflict).
    fn dispatch(&mut self) {
        let now = Instant::now();
        if !self.health.waiting() {
            for (eni, changes) in self.batches.take_ready(now) {
                for c in &changes {
                    tracing::info!(action = c.action(), eni = %eni, addresses = c.addresses().len(), "sending batch");
                }
                let ours = self
                    .enis
                    .as_ref()
                    .and_then(|e| e.values().find(|e| e.id == eni).cloned());
                let named: Vec<IpAddr> = changes.iter().flat_map(Change::addresses).collect();
                let allowed = Permissions {
                    // Taken from this ENI: their holder is looked up before the assign.
                    elsewhere: named
                        .iter()
                        .copied()
                        .filter(|a| self.conflicts.is_away(*a))
                        .collect(),
                    may_take: named
                        .iter()
                        .copied()
                        .filter(|a| self.conflicts.may_take(*a, now))
                        .collect(),
                    room: !self.full.contains(&eni),
                };
                let ec2 = self.ec2.clone();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let outcome = call_batch(&ec2, ours.as_ref(), changes, &allowed).await;
                    let _ = events.send(Event::Called { eni, outcome });
                });
            }
            self.dispatch_prefixes();
        }
        let due = [
            self.batches.next_due(now),
            self.rejected.next_due(now),
            self.conflicts.next_retry(now),
            self.conflicts.next_exclusive(now),
            self.callers.verify_due(),
            self.prefixes.next_due(now),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(due) = due
            && self.wake_at.is_none_or(|w| w > due)
        {
            self.wake_at = Some(due);
            let events = self.events.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(due.into()).await;
                let _ = events.send(Event::Wake);
            });
        }
    }

    fn on_called(&mut self, eni_id: &str, outcome: BatchOutcome) {
        self.batches.done(eni_id);
        let now = Instant::now();
        for (address, holder) in outcome.held_elsewhere {
            let refusal = plan::held_by_not_no_manage(&holder);
            self.count_refusal(&refusal, address);
            self.rejected.rejected(address, refusal.reason, now);
        }
        for (address, other) in &outcome.left_with {
            self.conflicts.held_by(eni_id, *address, other.clone());
            if self.conflicts.waiting(*address, now).is_none() {
                // Not moved although no conflict waits: the move could not land here (another
                // subnet, no room). Its own backoff, not a call per plan.
                tracing::warn!(action = "assign", outcome = "not_moved", eni = %eni_id, address = %address, holder = %other, "held by another Multus ENI and a move could not land on this ENI (another subnet, or no free slot): left there");
                self.rejected.rejected(
                    *address,
                    format!("held by {other}, another Multus ENI; a move cannot land on {eni_id} (another subnet, or no free address slot): left there"),
                    now,
                );
            }
        }
        let wanted: BTreeSet<IpAddr> = self.wanted.pairs().into_iter().map(|(_, a)| a).collect();
        let mut checkpoint_changed = false;
        for (change, result) in outcome.results {
            let assign = matches!(
                change,
                Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }
            );
            // An address unassigned from another Multus ENI before it is assigned here.
            let from_holder = change.eni() != eni_id;
            match result {
                Some(Ok(())) => {
                    let n = change.addresses().len();
                    self.health.success(change.action());
                    self.batches.pacing.succeeded();
                    self.metrics.batch_addresses.observe(n as f64);
                    tracing::info!(action = change.action(), outcome = "success", eni = %change.eni(), addresses = n, "batch applied");
                    if let Some(enis) = self.enis.as_mut() {
                        apply_to(enis, &change, &outcome.moved);
                    }
                    if self.reading {
                        self.applied_during_read
                            .push((change.clone(), outcome.moved.clone()));
                    }
                    for a in change.addresses() {
                        self.rejected.forget(a);
                        if assign {
                            match outcome.moved.get(&a) {
                                Some(other) => {
                                    self.conflicts.took(eni_id, a, Some(other.clone()), now)
                                }
                                None => self.conflicts.back(a),
                            }
                            if !wanted.contains(&a) {
                                // Released while the assign was in flight.
                                self.batches.unassign(eni_id, a);
                            }
                        }
                    }
                    if assign {
                        self.checkpoint.record_owned(eni_id, change.addresses());
                    } else {
                        self.full.remove(change.eni());
                        self.checkpoint
                            .record_unassigned(change.eni(), change.addresses());
                    }
                    checkpoint_changed = true;
                }
                Some(Err(e)) if !assign && !from_holder && e.is_not_assigned() => {
                    // EC2 refuses the whole call for the address that is gone (released
                    // already) without naming it: read the ENI, then unassign what is there,
                    // with no backoff of its own.
                    tracing::info!(action = change.action(), outcome = "not_assigned", eni = %change.eni(), addresses = change.addresses().len(), "an address of the unassign is off the ENI already: reading the ENI, then unassigning the rest");
                    for a in change.addresses() {
                        self.batches.unassign(eni_id, a);
                    }
                    self.unsure_of(eni_id);
                }
                Some(Err(e)) if e.kind == ErrorKind::Rejected => {
                    self.health.failure(e.action, &e);
                    if assign && e.is_address_limit() {
                        self.full.insert(change.eni().to_string());
                    }
                    tracing::warn!(action = change.action(), outcome = "rejected", eni = %change.eni(), addresses = ?change.addresses(), error = %e.message, "EC2 refused the call; the address waits its own backoff");
                    for a in change.addresses() {
                        self.rejected.rejected(a, e.message.clone(), now);
                    }
                    if !assign {
                        // The picture was probably stale (address already gone): read again.
                        self.read();
                    }
                }
                Some(Err(e)) => {
                    self.health.failure(e.action, &e);
                    tracing::warn!(action = change.action(), outcome = %e.kind, eni = %change.eni(), addresses = change.addresses().len(), error = %e.message, hint = e.kind.hint(), "batch failed; requeued");
                    if e.is_throttled() {
                        self.batches.pacing.throttled();
                    }
                    if !from_holder && !assign {
                        for a in change.addresses() {
                            self.batches.unassign(eni_id, a);
                        }
                    }
                    if e.kind == ErrorKind::Timeout && !from_holder {
                        // EC2 may have carried it out: read before deciding anything more.
                        self.unsure_of(eni_id);
                    }
                    self.retry_later(e.kind);
                }
                None if from_holder || assign => {}
                // `plan` queues a missing assign again; an unassign is requeued here.
                None => {
                    for a in change.addresses() {
                        self.batches.unassign(eni_id, a);
                    }
                }
            }
        }
        if checkpoint_changed {
            self.save_checkpoint();
        }
    }

    fn count_refusal(&self, refusal: &Refusal, address: IpAddr) {
        self.metrics
            .refusals
            .get_or_create(&RefusalLabels {
                reason: refusal.label,
            })
            .inc();
        tracing::warn!(action = "plan", outcome = "refused", address = %address, eni = ?refusal.eni, reason = %refusal.reason, "refused an address");
    }

    /// Every call of the node waits out one backoff; credential errors wait minutes.
    fn retry_later(&mut self, kind: ErrorKind) {
        let Some(wait) = self.health.back_off(kind, Instant::now()) else {
            return;
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = events.send(Event::Wake);
        });
    }

    fn knowledge<'a>(&'a self, enis: &'a InstanceEnis, now: Instant) -> Knowledge<'a> {
        Knowledge {
            instance_id: &self.config.instance_id,
            enis,
            foreign: self.macs.known(),
            ignored: &self.config.ignored,
            wanted: &self.wanted,
            rejected: &self.rejected,
            conflicts: &self.conflicts,
            prefixes: &self.prefixes,
            now,
        }
    }

    /// Sends each connected sidecar its status when it changed.
    fn answer(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        let k = Knowledge {
            instance_id: &self.config.instance_id,
            enis,
            foreign: self.macs.known(),
            ignored: &self.config.ignored,
            wanted: &self.wanted,
            rejected: &self.rejected,
            conflicts: &self.conflicts,
            prefixes: &self.prefixes,
            now: Instant::now(),
        };
        self.callers.answer(&self.view, &k);
    }

    /// Publishes the node's table (for `/status`, the HTTP gate, readiness and gauges).
    fn publish(&mut self) {
        let now = Instant::now();
        let ready =
            self.enis.is_some() && self.view.every_entry_seen() && !self.health.auth_failing();
        self.callers.count_versions();
        self.metrics.set_ready(ready);
        self.metrics.pending.set(self.batches.queued() as i64);
        self.metrics
            .address_conflicts
            .set(self.conflicts.count(now) as i64);
        self.metrics.oldest_pending_seconds.set(
            self.pending_since
                .values()
                .map(|t| now.duration_since(*t).as_secs_f64())
                .fold(0.0, f64::max),
        );
        let (rows, no_eni) = match &self.enis {
            Some(enis) => (
                crate::status::rows(self.managed_pods(), &self.knowledge(enis, now)),
                crate::status::not_on_an_eni(self.managed_pods(), enis, self.macs.known()),
            ),
            None => Default::default(),
        };
        let unowned: Vec<Unowned> = self
            .unowned
            .iter()
            .map(|(eni, address)| Unowned {
                eni: eni.clone(),
                address: *address,
            })
            .collect();
        let prefixes = self.prefix_rows();
        let previous = self.status.borrow().clone();
        let changed = previous.ready != ready
            || previous.prefixes != prefixes
            || previous.addresses != rows
            || previous.no_eni != no_eni
            || previous.unowned != unowned
            || previous.last_ec2_error.as_ref() != self.health.last_error();
        if changed {
            self.status.send_replace(Arc::new(NodeStatus {
                instance_id: self.config.instance_id.clone(),
                ready,
                last_ec2_error: self.health.last_error().cloned(),
                generation: previous.generation + 1,
                addresses: rows,
                unowned,
                prefixes,
                no_eni,
            }));
        }
    }

    fn save_checkpoint(&mut self) {
        self.checkpoint.conflicts = self.conflicts.save(Instant::now(), SystemTime::now());
        self.checkpoint.prefixes = self.prefixes.owned().clone();
        if let Err(e) = self.checkpoint.save(&self.config.checkpoint) {
            tracing::error!(action = "checkpoint", outcome = "failed", path = %self.config.checkpoint.display(), error = %e, "cannot write the checkpoint: a restart may miss a conflict");
        }
    }
}

/// Records a change EC2 accepted in `enis`: on its ENI, and, for the addresses it `moved`
/// (IPv4 by reassignment), off the ENIs that held them.
fn apply_to(enis: &mut InstanceEnis, change: &Change, moved: &BTreeMap<IpAddr, EniId>) {
    let assign = matches!(
        change,
        Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }
    );
    for e in enis.values_mut() {
        e.apply(change);
        if assign && e.id != change.eni() {
            for a in change.addresses() {
                if let (IpAddr::V4(v4), true) = (a, moved.contains_key(&a)) {
                    e.ipv4.remove(&v4);
                }
            }
        }
    }
}
