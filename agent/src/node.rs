//! The node: one task that owns what the agent knows of its node (pod namespaces from
//! [`crate::watch`], this instance's ENIs from EC2), the per-ENI batches, the backoffs and the
//! checkpoint, and makes the EC2 calls. Connections, the watcher, EC2 calls and timers talk to
//! it by [`Event`]s; the decisions are the pure functions of [`crate::plan`], [`crate::batch`],
//! [`crate::reclaim`], [`crate::conflict`] and [`crate::retry`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use multus_eni_ec2::MacAddress;
use multus_eni_ec2::eni::{Ec2, ErrorKind};
use multus_eni_ec2::model::{Change, EniAddresses, EniId};
use multus_eni_proto::{AddressState, AddressStatus, Answer};
use multus_eni_sidecar::reconcile::DesiredInterface;
use tokio::sync::{mpsc, oneshot, watch};

use crate::batch::Batches;
use crate::checkpoint::Checkpoint;
use crate::conflict::Conflicts;
use crate::connection::{ClaimHint, ConnId, Peer};
use crate::metrics::{CallLabels, LimitLabels, Metrics, RefusalLabels, ReleaseLabels};
use crate::plan::{
    self, InstanceEnis, Knowledge, NOT_HELD, NetnsId, PodNetns, Pods, Refusal, Wanted,
};
use crate::reclaim::{UnheldSince, unheld};
use crate::retry::RetryBook;
use crate::status::{NodeStatus, Row};
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
}

/// First wait after a throttled or failed call; doubles (with jitter) to [`RETRY_MAX`]. One
/// backoff for the whole node: the account's bucket is shared.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two attempts (before jitter).
pub const RETRY_MAX: Duration = Duration::from_secs(8);
/// After a credential or permission error: an operator has to act, minutes are fine.
const AUTH_RETRY_MIN: Duration = Duration::from_secs(30);
const AUTH_RETRY_MAX: Duration = Duration::from_secs(300);

fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A connected caller.
struct Connection {
    peer: Peer,
    /// Its namespace is one of the pods' (checked once the directory was read).
    verified: bool,
    claim: Option<(ClaimHint, Instant)>,
    /// What it was last told.
    last: Option<Answer>,
    /// When each address was first claimed, until it is routable.
    claimed_at: BTreeMap<IpAddr, Instant>,
}

/// The pods' namespaces as the watcher reported them.
#[derive(Default)]
struct View {
    pods: BTreeMap<String, PodNetns>,
    host: Vec<DesiredInterface>,
    /// The directory was read in full at least once.
    dir_read: bool,
    /// The last directory read (or watch) failed.
    dir_failed: Option<String>,
    /// Entries that are not readable namespaces.
    unreadable: BTreeMap<String, String>,
}

impl View {
    fn pod_by_id(&self, id: NetnsId) -> Option<&PodNetns> {
        self.pods.values().find(|p| p.id == id)
    }

    /// Whether what the node holds is known well enough to unassign what nobody holds.
    fn complete(&self) -> bool {
        self.dir_read && self.dir_failed.is_none()
    }
}

/// The node-wide wait after a throttled or failed call.
struct NodeBackoff {
    backoff: ExponentialBackoff,
    auth: ExponentialBackoff,
    until: Option<Instant>,
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
    connections: BTreeMap<ConnId, Connection>,
    /// Pod namespaces whose sidecar connected (`--pods sidecar`).
    with_sidecar: BTreeSet<NetnsId>,
    batches: Batches,
    rejected: RetryBook,
    conflicts: Conflicts,
    unheld: UnheldSince,
    checkpoint: Checkpoint,
    backoff: NodeBackoff,
    /// A Describe of the instance is running / another one is wanted after it.
    reading: bool,
    read_again: bool,
    /// The read was asked by the resync timer: reclaim after it.
    resync_waiting: bool,
    wanted: Wanted,
    auth_failing: bool,
    last_ec2_error: Option<String>,
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
            connections: BTreeMap::new(),
            with_sidecar: BTreeSet::new(),
            batches,
            rejected: RetryBook::default(),
            conflicts: Conflicts::default(),
            unheld: UnheldSince::default(),
            checkpoint,
            backoff: NodeBackoff {
                backoff: backoff(RETRY_MIN, RETRY_MAX),
                auth: backoff(AUTH_RETRY_MIN, AUTH_RETRY_MAX),
                until: None,
            },
            reading: false,
            read_again: false,
            resync_waiting: false,
            wanted: Wanted::default(),
            auth_failing: false,
            last_ec2_error: None,
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
            Event::Connected { conn, peer } => self.on_connected(conn, peer),
            Event::Claim { conn, hint, done } => {
                drop(done);
                self.on_claim(conn, hint);
            }
            Event::Release { conn } | Event::Disconnected { conn } => {
                // Only a look: the pod's namespace says what it still holds.
                let gone = matches!(event, Event::Disconnected { .. });
                if let Some(c) = self.connections.get(&conn) {
                    if let Some(pod) = self.view.pod_by_id(c.peer.netns) {
                        self.watch.ask(Ask::Look {
                            name: pod.name.clone(),
                        });
                    }
                    if gone {
                        self.connections.remove(&conn);
                    }
                }
            }
            Event::Seen(seen) => self.on_seen(seen),
            Event::Resync => {
                self.resync_waiting = true;
                self.watch.ask(Ask::Rescan);
                self.foreign.clear();
                self.read();
            }
            Event::Read(result) => self.on_read(result),
            Event::Foreign { macs, found } => self.on_foreign(macs, found),
            Event::Called { eni, outcome } => self.on_called(&eni, outcome),
            Event::Wake => {
                let now = Instant::now();
                if self.wake_at.is_some_and(|w| w <= now) {
                    self.wake_at = None;
                }
                if self.backoff.until.is_some_and(|u| u <= now) {
                    self.backoff.until = None;
                    if std::mem::take(&mut self.read_again) {
                        self.read();
                    }
                }
            }
        }
    }

    fn on_connected(&mut self, conn: ConnId, peer: Peer) {
        let same_pod = self
            .connections
            .values()
            .filter(|c| c.peer.netns == peer.netns)
            .count();
        if same_pod >= self.config.max_connections_per_pod {
            self.metrics
                .limit_hits
                .get_or_create(&LimitLabels {
                    limit: "connections_per_pod",
                })
                .inc();
            tracing::warn!(
                action = "connect",
                outcome = "refused",
                conn,
                pid = peer.pid,
                limit = self.config.max_connections_per_pod,
                "too many connections from one pod namespace"
            );
            refuse(
                peer,
                format!(
                    "too many connections from this pod (--max-connections-per-pod={})",
                    self.config.max_connections_per_pod
                ),
            );
            return;
        }
        self.connections.insert(
            conn,
            Connection {
                peer,
                verified: false,
                claim: None,
                last: None,
                claimed_at: BTreeMap::new(),
            },
        );
        self.verify_connections();
    }

    /// Refuses callers that are not in a pod namespace of `--netns-dir`, once the directory
    /// has been read (a caller that came first is checked then).
    fn verify_connections(&mut self) {
        if !self.view.dir_read {
            return;
        }
        let refused: Vec<ConnId> = self
            .connections
            .iter()
            .filter(|(_, c)| !c.verified && self.view.pod_by_id(c.peer.netns).is_none())
            .map(|(id, _)| *id)
            .collect();
        for conn in refused {
            if let Some(c) = self.connections.remove(&conn) {
                self.metrics
                    .refusals
                    .get_or_create(&RefusalLabels {
                        reason: "not_a_pod",
                    })
                    .inc();
                tracing::warn!(
                    action = "connect",
                    outcome = "refused",
                    conn,
                    pid = c.peer.pid,
                    "the caller's network namespace is not a pod namespace under --netns-dir (the host's, or one the agent does not list)"
                );
                refuse(
                    c.peer,
                    "the caller's network namespace is not a pod network namespace of this node (--netns-dir)".into(),
                );
            }
        }
        for c in self.connections.values_mut() {
            if !c.verified && self.view.pod_by_id(c.peer.netns).is_some() {
                c.verified = true;
                self.with_sidecar.insert(c.peer.netns);
            }
        }
    }

    fn on_claim(&mut self, conn: ConnId, hint: ClaimHint) {
        let Some(c) = self.connections.get_mut(&conn) else {
            return;
        };
        let now = Instant::now();
        let claimed: BTreeSet<IpAddr> = hint
            .interfaces
            .iter()
            .flat_map(|i| i.addresses.iter().copied())
            .collect();
        c.claimed_at.retain(|a, _| claimed.contains(a));
        for a in claimed {
            c.claimed_at.entry(a).or_insert(now);
        }
        c.claim = Some((hint, now));
        if let Some(pod) = self.view.pod_by_id(c.peer.netns) {
            self.watch.ask(Ask::Look {
                name: pod.name.clone(),
            });
        }
        self.look_up_foreign_macs();
    }

    fn on_seen(&mut self, seen: Seen) {
        match seen {
            Seen::Pod(pod) => {
                self.view.unreadable.remove(&pod.name);
                self.view.pods.insert(pod.name.clone(), pod);
                self.verify_connections();
            }
            Seen::PodGone { name } => {
                if let Some(pod) = self.view.pods.remove(&name) {
                    self.with_sidecar.remove(&pod.id);
                    tracing::info!(action = "netns", outcome = "gone", netns = %name, "a pod network namespace was deleted");
                }
                self.view.unreadable.remove(&name);
            }
            Seen::PodUnreadable { name, error } => {
                if self
                    .view
                    .unreadable
                    .insert(name.clone(), error.clone())
                    .is_none()
                {
                    tracing::warn!(action = "netns", outcome = "unreadable", netns = %name, error = %error, "an entry of --netns-dir is not a readable network namespace; no reclaim while it stays so");
                }
                self.view.pods.remove(&name);
            }
            Seen::Host(interfaces) => self.view.host = interfaces,
            Seen::DirRead { entries } => {
                if self.view.dir_failed.take().is_some() || !self.view.dir_read {
                    tracing::info!(
                        action = "netns_dir",
                        outcome = "read",
                        entries,
                        "read --netns-dir"
                    );
                }
                self.view.dir_read = true;
                self.verify_connections();
            }
            Seen::DirFailed { error } => {
                if self.view.dir_failed.is_none() {
                    tracing::error!(action = "netns_dir", outcome = "failed", error = %error, "cannot read --netns-dir: not ready, nothing released or reclaimed until it can be read");
                }
                self.view.dir_failed = Some(error);
            }
        }
        self.metrics
            .watched_namespaces
            .set(self.view.pods.len() as i64);
    }

    /// Starts one Describe of the instance's ENIs, or remembers to start another.
    fn read(&mut self) {
        if self.reading || self.backoff.until.is_some() {
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
                self.count_success("DescribeNetworkInterfaces");
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
                self.count_error("DescribeNetworkInterfaces", &e);
                tracing::warn!(action = "DescribeNetworkInterfaces", outcome = %e.kind, error = %e.message, hint = e.kind.hint(), "cannot read the instance's ENIs");
                self.retry_later(e.kind);
                self.read_again = true;
            }
        }
        if self.backoff.until.is_none() && std::mem::take(&mut self.read_again) {
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
        if !self.view.complete() || !self.view.unreadable.is_empty() {
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

    /// Looks up (once per resync) the MACs claimed by sidecars that are not this instance's:
    /// another instance's ENI is refused, no ENI at all (macvlan, SR-IOV) is left alone.
    fn look_up_foreign_macs(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        let macs: Vec<MacAddress> = self
            .connections
            .values()
            .filter_map(|c| c.claim.as_ref())
            .flat_map(|(h, _)| h.interfaces.iter())
            .filter_map(|i| multus_eni_ec2::node::parse_mac(&i.mac))
            .filter(|m| {
                !enis.contains_key(m)
                    && !self.foreign.contains_key(m)
                    && !self.foreign_asked.contains(m)
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
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
                self.count_success("DescribeNetworkInterfaces");
                for mac in macs {
                    let eni = found.remove(&mac).map(|e| e.id);
                    if let Some(id) = &eni {
                        tracing::warn!(action = "claim", outcome = "refused", mac = %mac, eni = %id, "a claimed interface carries the MAC of an ENI that is not attached to this instance");
                    }
                    self.foreign.insert(mac, eni);
                }
                // An ENI attached since the last read would be in the instance's read now.
                self.read();
            }
            Err(e) => {
                self.count_error("DescribeNetworkInterfaces", &e);
                self.retry_later(e.kind);
            }
        }
    }

    /// The pods this agent manages (`--pods`).
    fn managed_pods(&self) -> impl Iterator<Item = &PodNetns> {
        self.view.pods.values().filter(|p| match self.config.pods {
            Pods::All => true,
            Pods::Sidecar => self.with_sidecar.contains(&p.id),
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
        if self.backoff.until.is_none() {
            for (eni, changes) in self.batches.take_ready(now) {
                for c in &changes {
                    tracing::info!(action = c.action(), eni = %eni, addresses = c.addresses().len(), "sending batch");
                }
                let ours = self
                    .enis
                    .as_ref()
                    .and_then(|e| e.values().find(|e| e.id == eni).cloned());
                let ec2 = self.ec2.clone();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let outcome = call_batch(&ec2, ours.as_ref(), changes).await;
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
                    self.count_success(change.action());
                    self.metrics.batch_addresses.observe(n as f64);
                    self.backoff.backoff = backoff(RETRY_MIN, RETRY_MAX);
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
                    self.count_error(e.action, &e);
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
                    self.count_error(e.action, &e);
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

    fn count_success(&mut self, action: &'static str) {
        self.metrics
            .calls
            .get_or_create(&CallLabels {
                action,
                outcome: "success",
            })
            .inc();
        if self.auth_failing {
            tracing::info!(
                action,
                outcome = "success",
                "EC2 accepts the agent's credentials again"
            );
        }
        self.auth_failing = false;
        self.backoff.auth = backoff(AUTH_RETRY_MIN, AUTH_RETRY_MAX);
        self.metrics.ec2_auth_failing.set(0);
    }

    fn count_error(&mut self, action: &'static str, e: &multus_eni_ec2::Error) {
        let outcome = match e.kind {
            ErrorKind::Throttled => "throttled",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection_error",
            ErrorKind::AuthOrConfig => "auth_or_config",
            ErrorKind::Rejected => "rejected",
        };
        if e.kind == ErrorKind::Throttled {
            self.metrics.throttles.inc();
        }
        if e.kind == ErrorKind::AuthOrConfig {
            self.auth_failing = true;
            self.metrics.ec2_auth_failing.set(1);
        }
        self.last_ec2_error = Some(e.to_string());
        self.metrics
            .calls
            .get_or_create(&CallLabels { action, outcome })
            .inc();
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
        if self.backoff.until.is_some() {
            return;
        }
        let wait = if kind == ErrorKind::AuthOrConfig {
            self.backoff.auth.next().unwrap_or(AUTH_RETRY_MAX)
        } else {
            self.backoff.backoff.next().unwrap_or(RETRY_MAX)
        };
        tracing::info!(action = "backoff", reason = %kind, wait_ms = wait.as_millis() as u64, "node-wide backoff");
        self.backoff.until = Some(Instant::now() + wait);
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

    /// Where each claimed address stands, from the node's own view: what the pod's namespace
    /// holds, not what the sidecar says.
    fn claim_answer(&self, c: &Connection, enis: &InstanceEnis, now: Instant) -> Option<Answer> {
        let (hint, at) = c.claim.as_ref()?;
        let pod = self.view.pod_by_id(c.peer.netns);
        let k = self.knowledge(enis, now);
        let mut addresses = Vec::new();
        for iface in &hint.interfaces {
            let mac = multus_eni_ec2::node::parse_mac(&iface.mac);
            let seen = pod.and_then(|p| {
                p.interfaces
                    .iter()
                    .find(|i| i.mac.is_some() && i.mac == mac)
            });
            for &address in &iface.addresses {
                let (state, eni, reason) = match (mac, seen) {
                    (Some(mac), Some(i)) if i.addresses.contains(&address) => {
                        plan::address_state(mac, address, &k)
                    }
                    (_, Some(i)) if matches!(address, IpAddr::V6(v6) if i.tentative.contains(&v6)) => {
                        (
                            AddressState::Pending,
                            None,
                            Some("duplicate address detection in progress".into()),
                        )
                    }
                    _ if pod.is_some_and(|p| p.read_at > *at) => {
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
                    state: state.in_version(hint.v),
                    eni,
                    reason,
                });
            }
        }
        let routable = addresses.iter().all(|a| a.state.lets_pod_start());
        Some(Answer::Status {
            v: hint.v,
            seq: hint.seq,
            routable,
            addresses,
        })
    }

    /// Sends each connected sidecar its status when it changed.
    fn answer(&mut self) {
        let Some(enis) = &self.enis else {
            return;
        };
        let now = Instant::now();
        let mut answers = Vec::new();
        for (id, c) in &self.connections {
            if !c.verified {
                continue;
            }
            if let Some(answer) = self.claim_answer(c, enis, now)
                && c.last.as_ref() != Some(&answer)
            {
                answers.push((*id, answer));
            }
        }
        for (id, answer) in answers {
            let Some(c) = self.connections.get_mut(&id) else {
                continue;
            };
            if let Answer::Status { addresses, .. } = &answer {
                for a in addresses {
                    let was = match &c.last {
                        Some(Answer::Status { addresses, .. }) => addresses
                            .iter()
                            .find(|x| x.address == a.address)
                            .map(|x| x.state),
                        _ => None,
                    };
                    if a.state == AddressState::Refused
                        && was != Some(AddressState::Refused)
                        && a.reason.as_deref() == Some(NOT_HELD)
                    {
                        self.metrics
                            .refusals
                            .get_or_create(&RefusalLabels { reason: "not_held" })
                            .inc();
                    }
                    if a.state == AddressState::Routable
                        && let Some(since) = c.claimed_at.remove(&a.address)
                    {
                        self.metrics
                            .claim_to_routable
                            .observe(now.duration_since(since).as_secs_f64());
                    }
                }
            }
            match c.peer.answers.try_send(answer.clone()) {
                Ok(()) => c.last = Some(answer),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics
                        .limit_hits
                        .get_or_create(&LimitLabels {
                            limit: "queued_answers",
                        })
                        .inc();
                    tracing::warn!(
                        action = "answer",
                        outcome = "closed",
                        conn = id,
                        "a caller does not read its answers (--max-queued-answers): closing its connection"
                    );
                    self.connections.remove(&id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.connections.remove(&id);
                }
            }
        }
    }

    /// Publishes the node's table (for `/status`, the HTTP gate, readiness and gauges).
    fn publish(&mut self) {
        let now = Instant::now();
        let ready = self.enis.is_some() && self.view.complete() && !self.auth_failing;
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
        let mut rows = Vec::new();
        if let Some(enis) = &self.enis {
            let k = self.knowledge(enis, now);
            for pod in self.managed_pods() {
                for iface in &pod.interfaces {
                    let Some(mac) = iface.mac.filter(|m| enis.contains_key(m)) else {
                        continue;
                    };
                    for &address in &iface.addresses {
                        let (state, eni, reason) = plan::address_state(mac, address, &k);
                        rows.push(Row {
                            netns: pod.name.clone(),
                            interface: iface.name.clone(),
                            address,
                            eni,
                            state,
                            reason,
                        });
                    }
                    for &v6 in &iface.tentative {
                        rows.push(Row {
                            netns: pod.name.clone(),
                            interface: iface.name.clone(),
                            address: IpAddr::V6(v6),
                            eni: None,
                            state: AddressState::Pending,
                            reason: Some("duplicate address detection in progress".into()),
                        });
                    }
                }
            }
        }
        let previous = self.status.borrow().clone();
        let changed = previous.ready != ready
            || previous.addresses != rows
            || previous.last_ec2_error != self.last_ec2_error;
        if changed {
            self.status.send_replace(Arc::new(NodeStatus {
                instance_id: self.config.instance_id.clone(),
                ready,
                last_ec2_error: self.last_ec2_error.clone(),
                generation: previous.generation + 1,
                addresses: rows,
            }));
        }
    }

    fn save_checkpoint(&self) {
        if let Err(e) = self.checkpoint.save(&self.config.checkpoint) {
            tracing::error!(action = "checkpoint", outcome = "failed", path = %self.config.checkpoint.display(), error = %e, "cannot write the checkpoint: a restart may miss a conflict");
        }
    }
}

/// Tells a refused caller why and closes its connection.
fn refuse(peer: Peer, message: String) {
    let _ = peer.answers.try_send(Answer::Error {
        v: multus_eni_proto::VERSION,
        message,
    });
    drop(peer.close);
}

/// What one ENI's batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Every change with its result; `None` for a change not attempted.
    results: Vec<(Change, Option<multus_eni_ec2::Result<()>>)>,
    /// Addresses not assigned because an ENI without `no_manage` holds them, with that ENI.
    held_elsewhere: Vec<(IpAddr, EniId)>,
    /// Addresses another Multus ENI held before this batch, with that ENI.
    moved: BTreeMap<IpAddr, EniId>,
}

/// The calls of one ENI's batch, in order. Before an assign, the other ENIs that hold its
/// addresses are read: an address an ENI without `no_manage` holds (the VPC CNI's, on any
/// instance) is left out; one that another Multus ENI holds may move (IPv4 by
/// `AllowReassignment`, IPv6 by an unassign there first). After a throttled or failed call
/// the rest is not attempted: the node backs off first. A rejected call naming several
/// addresses is split by the shared [`Ec2::apply_splitting`].
async fn call_batch(ec2: &Ec2, ours: Option<&EniAddresses>, changes: Vec<Change>) -> BatchOutcome {
    let mut out = BatchOutcome::default();
    let mut stopped = false;
    for change in changes {
        if stopped {
            out.results.push((change, None));
            continue;
        }
        let change = match (&change, ours) {
            (Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }, Some(ours)) => {
                match free_addresses(ec2, ours, &change, &mut out).await {
                    Ok(Some(left)) => left,
                    Ok(None) => continue,
                    Err(e) => {
                        stopped = true;
                        out.results.push((change, e.map(Err)));
                        continue;
                    }
                }
            }
            _ => change,
        };
        for outcome in ec2.apply_splitting(&change).await {
            if let Err(e) = &outcome.result
                && e.kind != ErrorKind::Rejected
            {
                stopped = true;
            }
            out.results.push((outcome.change, Some(outcome.result)));
        }
    }
    out
}

/// The part of an assign that may go out: addresses held by an ENI without `no_manage` are
/// left out (`out.held_elsewhere`); IPv6 addresses another Multus ENI holds are unassigned
/// there first. `Ok(None)` when nothing is left. `Err` after a failure other than a rejection
/// (the node backs off): `Some` with the holder lookup's error, `None` when an unassign
/// failed (recorded in `out`).
async fn free_addresses(
    ec2: &Ec2,
    ours: &EniAddresses,
    change: &Change,
    out: &mut BatchOutcome,
) -> std::result::Result<Option<Change>, Option<multus_eni_ec2::Error>> {
    let wanted: BTreeSet<IpAddr> = change.addresses().into_iter().collect();
    let holders = ec2.holder_enis(ours, &wanted).await.map_err(Some)?;
    let mut left = wanted.clone();
    for holder in holders {
        let held: Vec<IpAddr> = wanted
            .iter()
            .copied()
            .filter(|a| holder.holds(*a))
            .collect();
        if !holder.no_manage {
            for a in held {
                left.remove(&a);
                out.held_elsewhere.push((a, holder.id.clone()));
            }
            continue;
        }
        for &a in &held {
            out.moved.insert(a, holder.id.clone());
        }
        let v6: Vec<Ipv6Addr> = held
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            })
            .collect();
        if v6.is_empty() {
            continue;
        }
        let unassign = Change::UnassignIpv6 {
            eni: holder.id.clone(),
            addresses: v6,
        };
        for outcome in ec2.apply_splitting(&unassign).await {
            let failed = matches!(&outcome.result, Err(e) if e.kind != ErrorKind::Rejected);
            out.results.push((outcome.change, Some(outcome.result)));
            if failed {
                return Err(None);
            }
        }
    }
    if left.is_empty() {
        return Ok(None);
    }
    let eni = change.eni().to_string();
    Ok(Some(match change {
        Change::AssignIpv4 { .. } => Change::AssignIpv4 {
            eni,
            addresses: left
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect(),
        },
        _ => Change::AssignIpv6 {
            eni,
            addresses: left
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                })
                .collect(),
        },
    }))
}
