//! The node: one task that owns what the agent knows of its node (pod namespaces from
//! [`crate::watch`], this instance's ENIs from EC2), the per-ENI batches, the backoffs and the
//! checkpoint, and makes the EC2 calls. Connections, the watcher, EC2 calls and timers talk to
//! it by [`Event`]s; the decisions are the pure functions of [`crate::plan`], [`crate::batch`],
//! [`crate::reclaim`], [`crate::conflict`] and [`crate::retry`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use multus_eni_ec2::MacAddress;
use multus_eni_ec2::eni::{Ec2, ErrorKind};
use multus_eni_ec2::model::{Change, EniAddresses, EniId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::batch::Batches;
use crate::callers::Callers;
use crate::calls::{BatchOutcome, call_batch};
use crate::checkpoint::Checkpoint;
use crate::conflict::Conflicts;
use crate::connection::{ClaimHint, ConnId, Peer};
use crate::health::Ec2Health;
use crate::metrics::{Metrics, RefusalLabels, ReleaseLabels};
use crate::plan::{self, InstanceEnis, Knowledge, NetnsId, PodNetns, Pods, Refusal, Wanted};
use crate::reclaim::{UnheldSince, unheld};
use crate::retry::RetryBook;
use crate::status::NodeStatus;
use crate::view::View;
use crate::watch::{Ask, Seen, WatchHandle};

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
    Release { conn: ConnId },
    /// The connection closed.
    Disconnected { conn: ConnId },
    /// The watcher saw something.
    Seen(Seen),
    /// Time for a resync: read the instance's ENIs, rescan `--netns-dir`.
    Resync,
    /// The instance's ENIs were read.
    Read(multus_eni_ec2::Result<InstanceEnis>),
    /// MACs that are not this instance's were looked up.
    Foreign {
        macs: Vec<MacAddress>,
        found: multus_eni_ec2::Result<BTreeMap<MacAddress, EniAddresses>>,
    },
    /// An ENI's batch returned.
    Called { eni: EniId, outcome: BatchOutcome },
    /// A timer fired.
    Wake,
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
    /// First wait after EC2 refused the agent's credentials (`--auth-backoff`).
    pub auth_backoff: Duration,
}

pub struct Node {
    ec2: Arc<Ec2>,
    metrics: Arc<Metrics>,
    config: NodeConfig,
    events: mpsc::UnboundedSender<Event>,
    watch: WatchHandle,
    view: View,
    enis: Option<InstanceEnis>,
    foreign: BTreeMap<MacAddress, Option<EniId>>,
    foreign_asked: BTreeSet<MacAddress>,
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
    wake_at: Option<Instant>,
    status: watch::Sender<Arc<NodeStatus>>,
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
        Self {
            ec2,
            metrics,
            config,
            events,
            watch,
            view: View::default(),
            enis: None,
            foreign: BTreeMap::new(),
            foreign_asked: BTreeSet::new(),
            callers,
            batches,
            rejected: RetryBook::default(),
            conflicts: Conflicts::default(),
            unheld: UnheldSince::default(),
            checkpoint,
            health,
            reading: false,
            read_again: false,
            resync_waiting: false,
            wanted: Wanted::default(),
            pending_since: BTreeMap::new(),
            wake_at: None,
            status,
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
            self.dispatch();
            self.answer();
            self.publish();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connected { conn, peer } => self.callers.connect(conn, peer, &self.view),
            Event::Claim { conn, hint, done } => {
                drop(done);
                if let Some(netns) = self.callers.claim(conn, hint) {
                    self.look_at(netns);
                }
                self.look_up_foreign_macs(false);
            }
            Event::Release { conn } | Event::Disconnected { conn } => {
                // Only a look: the pod's namespace says what it still holds.
                if let Some(netns) = self.callers.netns_of(conn) {
                    self.look_at(netns);
                }
                if matches!(event, Event::Disconnected { .. }) {
                    self.callers.remove(conn);
                }
            }
            Event::Seen(seen) => {
                if let Some(gone) = self.view.apply(seen) {
                    self.callers.pod_gone(gone);
                }
                self.callers.verify(&self.view);
                self.metrics
                    .watched_namespaces
                    .set(self.view.pods.len() as i64);
            }
            Event::Resync => {
                self.resync_waiting = true;
                self.watch.ask(Ask::Rescan);
                self.read();
                self.look_up_foreign_macs(true);
            }
            Event::Read(result) => self.on_read(result),
            Event::Foreign { macs, found } => self.on_foreign(macs, found),
            Event::Called { eni, outcome } => self.on_called(&eni, outcome),
            Event::Wake => {
                let now = Instant::now();
                if self.wake_at.is_some_and(|w| w <= now) {
                    self.wake_at = None;
                }
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
        let ec2 = self.ec2.clone();
        let events = self.events.clone();
        let instance = self.config.instance_id.clone();
        tokio::spawn(async move {
            let result = ec2.instance_enis(&instance).await;
            let _ = events.send(Event::Read(result));
        });
    }

    fn on_read(&mut self, result: multus_eni_ec2::Result<InstanceEnis>) {
        self.reading = false;
        match result {
            Ok(enis) => {
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
                self.checkpoint
                    .assigned
                    .retain(|eni, _| now_ids.contains(eni));
                self.save_checkpoint();
                self.enis = Some(enis);
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

    /// Addresses this agent assigned, still wanted, and no longer on their ENI: someone
    /// moved them (another node's pod holds the same address, or an operator).
    fn notice_taken_away(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        let now = Instant::now();
        for (eni_id, addresses) in &self.checkpoint.assigned {
            let Some(eni) = enis.values().find(|e| &e.id == eni_id) else {
                continue;
            };
            for &a in addresses {
                if self.wanted.eni_of(a) != Some(eni_id) || self.batches.is_flying(eni_id, a) {
                    continue;
                }
                if eni.holds(a) {
                    self.conflicts.back(a);
                } else if self.conflicts.away(eni_id, a, now) {
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
    /// for `--reclaim-after` (leaks from while the agent was down). Only when every namespace
    /// of the node could be read.
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
        candidates.retain(|(eni, a)| !self.batches.is_flying(eni, *a));
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

    /// Looks up the MACs claimed by sidecars that are not this instance's (new ones, or all of
    /// them again at a resync): another instance's ENI is refused, no ENI at all (macvlan,
    /// SR-IOV) is left alone. MACs no sidecar claims any more are forgotten.
    fn look_up_foreign_macs(&mut self, again: bool) {
        let Some(enis) = &self.enis else {
            return;
        };
        let claimed: BTreeSet<MacAddress> = self
            .callers
            .claimed_macs()
            .into_iter()
            .filter(|m| !enis.contains_key(m))
            .collect();
        self.foreign.retain(|m, _| claimed.contains(m));
        let macs: Vec<MacAddress> = claimed
            .into_iter()
            .filter(|m| (again || !self.foreign.contains_key(m)) && !self.foreign_asked.contains(m))
            .collect();
        if macs.is_empty() {
            return;
        }
        self.foreign_asked.extend(macs.iter().copied());
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
        for m in &macs {
            self.foreign_asked.remove(m);
        }
        match found {
            Ok(mut found) => {
                self.health.success("DescribeNetworkInterfaces");
                for mac in macs {
                    let eni = found.remove(&mac).map(|e| e.id);
                    if let Some(id) = &eni {
                        self.metrics
                            .refusals
                            .get_or_create(&RefusalLabels {
                                reason: "not_this_instance",
                            })
                            .inc();
                        tracing::warn!(action = "claim", outcome = "refused", mac = %mac, eni = %id, "a claimed interface carries the MAC of an ENI that is not attached to this instance");
                    }
                    self.foreign.insert(mac, eni);
                }
                // An ENI attached since the last read would be in the instance's read now.
                self.read();
            }
            Err(e) => {
                self.health.failure("DescribeNetworkInterfaces", &e);
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
        let wanted = plan::wanted(self.managed_pods(), enis);
        let now = Instant::now();
        for (address, refusal) in &wanted.refused {
            if !self.wanted.refused.contains_key(address) {
                self.count_refusal(refusal, *address);
            }
        }
        let released: Vec<(EniId, IpAddr)> = if self.view.complete() {
            let held_elsewhere = plan::held(self.view.host.iter());
            self.wanted
                .pairs()
                .difference(&wanted.pairs())
                .filter(|(_, a)| !held_elsewhere.contains(a))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for (eni_id, addresses) in &wanted.by_eni {
            let Some(eni) = enis.values().find(|e| &e.id == eni_id) else {
                continue;
            };
            for &a in addresses.keys() {
                if eni.holds(a) {
                    self.batches.cancel_unassign(eni_id, a);
                    self.pending_since.remove(&a);
                    continue;
                }
                self.pending_since.entry(a).or_insert(now);
                if self.batches.is_flying(eni_id, a)
                    || !self.rejected.may_try(a, now)
                    || !self.conflicts.may_assign(a, now)
                {
                    continue;
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
    }

    /// A pod let go of `address`: unassign it from `eni` if it is there (or on its way).
    fn release(&mut self, eni_id: &str, address: IpAddr) {
        self.conflicts.forget(address);
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
                // Addresses taken from this ENI: their holder is looked up before the assign.
                let elsewhere: BTreeSet<IpAddr> = changes
                    .iter()
                    .flat_map(Change::addresses)
                    .filter(|a| self.conflicts.is_away(*a))
                    .collect();
                let ec2 = self.ec2.clone();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let outcome = call_batch(&ec2, ours.as_ref(), changes, &elsewhere).await;
                    let _ = events.send(Event::Called { eni, outcome });
                });
            }
        }
        let due = [
            self.batches.next_due(now),
            self.rejected.next_due(now),
            self.conflicts.next_retry(now),
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
                    self.metrics.batch_addresses.observe(n as f64);
                    tracing::info!(action = change.action(), outcome = "success", eni = %change.eni(), addresses = n, "batch applied");
                    if let Some(enis) = self.enis.as_mut() {
                        for e in enis.values_mut() {
                            e.apply(&change);
                            if assign && e.id != change.eni() {
                                // EC2 moved the IPv4 addresses from where they were.
                                for a in change.addresses() {
                                    if let (IpAddr::V4(v4), true) =
                                        (a, outcome.moved.contains_key(&a))
                                    {
                                        e.ipv4.remove(&v4);
                                    }
                                }
                            }
                        }
                    }
                    for a in change.addresses() {
                        self.rejected.forget(a);
                        if assign {
                            self.conflicts.took_back(a, outcome.moved.get(&a).cloned());
                            if !wanted.contains(&a) {
                                // Released while the assign was in flight.
                                self.batches.unassign(eni_id, a);
                            }
                        }
                    }
                    if assign {
                        self.checkpoint.record_assigned(eni_id, change.addresses());
                    } else {
                        self.checkpoint
                            .record_unassigned(change.eni(), change.addresses());
                    }
                    checkpoint_changed = true;
                }
                Some(Err(e)) if e.kind == ErrorKind::Rejected => {
                    self.health.failure(e.action, &e);
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
                    if !from_holder && !assign {
                        for a in change.addresses() {
                            self.batches.unassign(eni_id, a);
                        }
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
            foreign: &self.foreign,
            wanted: &self.wanted,
            rejected: &self.rejected,
            conflicts: &self.conflicts,
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
            foreign: &self.foreign,
            wanted: &self.wanted,
            rejected: &self.rejected,
            conflicts: &self.conflicts,
            now: Instant::now(),
        };
        self.callers.answer(&self.view, &k);
    }

    /// Publishes the node's table (for `/status`, the HTTP gate, readiness and gauges).
    fn publish(&mut self) {
        let now = Instant::now();
        let ready = self.enis.is_some() && self.view.complete() && !self.health.auth_failing();
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
                crate::status::not_on_an_eni(self.managed_pods(), enis),
            ),
            None => Default::default(),
        };
        let previous = self.status.borrow().clone();
        let changed = previous.ready != ready
            || previous.addresses != rows
            || previous.no_eni != no_eni
            || previous.last_ec2_error.as_ref() != self.health.last_error();
        if changed {
            self.status.send_replace(Arc::new(NodeStatus {
                instance_id: self.config.instance_id.clone(),
                ready,
                last_ec2_error: self.health.last_error().cloned(),
                generation: previous.generation + 1,
                addresses: rows,
                no_eni,
            }));
        }
    }

    fn save_checkpoint(&self) {
        if let Err(e) = self.checkpoint.save(&self.config.checkpoint) {
            tracing::error!(action = "checkpoint", outcome = "failed", path = %self.config.checkpoint.display(), error = %e, "cannot write the checkpoint: a restart may miss a conflict");
        }
    }
}
