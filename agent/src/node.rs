//! The node: one task that owns the claims, the node's ENIs as last read, the per-ENI
//! batches and the checkpoint. Connections, EC2 calls, netns scans and timers talk to it by
//! [`Event`]s; every decision is one of the pure functions of [`crate::claims`],
//! [`crate::batch`] and [`crate::reclaim`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use multus_eni_ec2::MacAddress;
use multus_eni_ec2::eni::{Ec2, ErrorKind, NO_MANAGE_TAG};
use multus_eni_ec2::model::{Change, EniAddresses, EniId};
use multus_eni_proto::{AddressState, AddressStatus, Answer, VERSION};
use tokio::sync::mpsc::UnboundedSender;

use crate::batch::Batches;
use crate::checkpoint::Checkpoint;
use crate::claims::{
    Claim, Claims, ConnId, EniView, NOT_HELD, NOT_NO_MANAGE, PRIMARY, claim_status, released,
};
use crate::metrics::{CallLabels, Metrics, RefusalLabels, ReleaseLabels};
use crate::netns::{self, Scan};
use crate::reclaim::{UnheldSince, unheld};

/// What the node task reacts to.
#[derive(Debug)]
pub enum Event {
    /// A verified claim from a connection.
    Claim {
        conn: ConnId,
        answers: UnboundedSender<Answer>,
        claim: Claim,
    },
    /// The sidecar said "release" (already answered).
    Release { conn: ConnId },
    /// The connection closed.
    Disconnected { conn: ConnId },
    /// Time for a resync: read the ENIs and `--netns-dir`.
    Resync,
    /// A Describe (and, for a resync, a netns scan) finished.
    Read {
        macs: Vec<MacAddress>,
        enis: multus_eni_ec2::Result<BTreeMap<MacAddress, EniAddresses>>,
        scan: Option<std::io::Result<Scan>>,
    },
    /// An ENI's batch returned.
    Called { eni: EniId, outcome: BatchOutcome },
    /// A timer fired: the node-wide backoff after a throttled or failed call, or an ENI's
    /// batch interval, ended.
    Wake,
}

/// Settings of the node task.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub netns_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub reclaim_after: Duration,
    pub node_name: String,
    /// Shortest time between the starts of two calls for one ENI (`--batch-interval`).
    pub batch_interval: Duration,
}

/// First wait after a throttled or failed call; doubles (with jitter) to [`RETRY_MAX`].
/// One backoff for the whole node: the account's bucket is shared, the pods are not
/// competing with each other any more.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two attempts (before jitter).
pub const RETRY_MAX: Duration = Duration::from_secs(8);

fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A connected sidecar: where its answers go and what it was last told.
struct Connection {
    answers: UnboundedSender<Answer>,
    last: Option<(u64, bool, Vec<AddressStatus>)>,
    /// When each address was first claimed, until it is routable.
    claimed_at: BTreeMap<IpAddr, Instant>,
    /// When its latest claim arrived: a netns scan that began later re-checks it.
    last_claim: Instant,
}

/// The node-wide wait after a throttled or failed call.
struct NodeBackoff {
    backoff: ExponentialBackoff,
    until: Option<Instant>,
}

/// Whether a Describe is running, and whether another one is wanted after it.
#[derive(Default)]
struct Reads {
    running: bool,
    /// The MACs the running Describe asks for.
    asked: BTreeSet<MacAddress>,
    again: bool,
    resync_waiting: bool,
}

pub struct Node {
    ec2: Arc<Ec2>,
    metrics: Arc<Metrics>,
    config: NodeConfig,
    events: UnboundedSender<Event>,
    claims: Claims,
    connections: BTreeMap<ConnId, Connection>,
    enis: BTreeMap<MacAddress, EniView>,
    batches: Batches,
    /// Addresses EC2 refused to assign, with its message; tried again at the next resync.
    rejected: BTreeMap<IpAddr, String>,
    unheld: UnheldSince,
    checkpoint: Checkpoint,
    backoff: NodeBackoff,
    reads: Reads,
    /// When the timer for the next batch held back by its interval fires.
    pace_wake: Option<Instant>,
}

// === impl Node ===

impl Node {
    pub fn new(
        ec2: Arc<Ec2>,
        metrics: Arc<Metrics>,
        config: NodeConfig,
        checkpoint: Checkpoint,
        events: UnboundedSender<Event>,
    ) -> Self {
        let batches = Batches::with_interval(config.batch_interval);
        Self {
            ec2,
            metrics,
            config,
            events,
            claims: Claims::default(),
            connections: BTreeMap::new(),
            enis: BTreeMap::new(),
            batches,
            rejected: BTreeMap::new(),
            unheld: UnheldSince::default(),
            checkpoint,
            backoff: NodeBackoff {
                backoff: backoff(),
                until: None,
            },
            reads: Reads::default(),
            pace_wake: None,
        }
    }

    /// Handles events until the channel closes.
    pub async fn run(mut self, mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) {
        while let Some(event) = events.recv().await {
            self.handle(event);
            // Everything already queued is applied before the next calls go out.
            while let Ok(event) = events.try_recv() {
                self.handle(event);
            }
            self.plan();
            self.dispatch();
            self.publish();
            self.metrics.pending.set(self.batches.queued() as i64);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Claim {
                conn,
                answers,
                claim,
            } => self.on_claim(conn, answers, claim),
            Event::Release { conn } => {
                let before = self.claims.wanted();
                if let Some(claim) = self.claims.release(conn) {
                    tracing::info!(action = "release", pod = %claim.pod, addresses = claim.held.len(), "pod released its addresses");
                }
                self.release(released(&before, &self.claims.wanted()), "release");
            }
            Event::Disconnected { conn } => {
                self.connections.remove(&conn);
                if let Some(claim) = self.claims.get(conn) {
                    tracing::info!(
                        action = "disconnect",
                        pod = %claim.pod,
                        "sidecar went away without a release: its addresses stay while its network namespace holds them"
                    );
                }
                self.claims.disconnect(conn);
            }
            Event::Resync => {
                self.reads.resync_waiting = true;
                self.read();
            }
            Event::Read { macs, enis, scan } => self.on_read(macs, enis, scan),
            Event::Called { eni, outcome } => self.on_called(&eni, outcome),
            Event::Wake => {
                if self.pace_wake.is_some_and(|w| w <= Instant::now()) {
                    self.pace_wake = None;
                }
                if self.backoff.until.is_some_and(|u| u <= Instant::now()) {
                    self.backoff.until = None;
                    // A failed read is retried once the wait is over.
                    if std::mem::take(&mut self.reads.again) {
                        self.read();
                    }
                }
            }
        }
    }

    fn on_claim(&mut self, conn: ConnId, answers: UnboundedSender<Answer>, claim: Claim) {
        for r in &claim.refused {
            tracing::warn!(
                action = "claim",
                outcome = "refused",
                pod = %claim.pod,
                interface = %r.interface,
                address = %r.address,
                reason = %r.reason,
                "refused a claimed address"
            );
        }
        let now = Instant::now();
        let entry = self.connections.entry(conn).or_insert_with(|| Connection {
            answers,
            last: None,
            claimed_at: BTreeMap::new(),
            last_claim: now,
        });
        entry.last_claim = now;
        let claimed: BTreeSet<IpAddr> = claim.held.iter().map(|h| h.address).collect();
        entry.claimed_at.retain(|a, _| claimed.contains(a));
        for a in claimed {
            entry.claimed_at.entry(a).or_insert(now);
        }
        let before = self.claims.wanted();
        self.claims.claim(conn, claim);
        self.release(released(&before, &self.claims.wanted()), "release");
        if self
            .claims
            .macs()
            .iter()
            // A MAC that the running Describe already asks for needs no second one.
            .any(|m| !self.enis.contains_key(m) && !self.reads.asked.contains(m))
        {
            self.read();
        }
    }

    /// Unassigns (batched) addresses no pod wants any more, if they are on their ENI.
    fn release(&mut self, addresses: Vec<(MacAddress, IpAddr)>, cause: &'static str) {
        for (mac, address) in addresses {
            let Some(EniView::Found(eni)) = self.enis.get(&mac) else {
                continue;
            };
            if !eni.no_manage || eni.primary_ipv4.map(IpAddr::V4) == Some(address) {
                continue;
            }
            if eni.holds(address) || self.batches.is_flying(&eni.id, address) {
                self.batches.unassign(&eni.id, address);
                self.metrics
                    .releases
                    .get_or_create(&ReleaseLabels { cause })
                    .inc();
                tracing::info!(action = "release", cause, eni = %eni.id, address = %address, "queued unassign");
            } else {
                self.batches.cancel_assign(&eni.id, address);
            }
        }
    }

    /// Starts one Describe of every MAC of the node (claims and checkpoint), or remembers to
    /// start another when the running one returns.
    fn read(&mut self) {
        if self.reads.running {
            self.reads.again = true;
            return;
        }
        self.reads.running = true;
        let resync = std::mem::take(&mut self.reads.resync_waiting);
        let mut macs: BTreeSet<MacAddress> = self.claims.macs();
        macs.extend(
            self.checkpoint
                .enis
                .keys()
                .filter_map(|m| multus_eni_ec2::node::parse_mac(m)),
        );
        self.reads.asked = macs.clone();
        let macs: Vec<MacAddress> = macs.into_iter().collect();
        let ec2 = self.ec2.clone();
        let events = self.events.clone();
        let dir = self.config.netns_dir.clone();
        tokio::spawn(async move {
            let scan = if resync {
                Some(netns::scan_dir(dir).await)
            } else {
                None
            };
            let enis = if macs.is_empty() {
                Ok(BTreeMap::new())
            } else {
                ec2.find_by_macs(&macs).await
            };
            let _ = events.send(Event::Read { macs, enis, scan });
        });
    }

    fn on_read(
        &mut self,
        macs: Vec<MacAddress>,
        enis: multus_eni_ec2::Result<BTreeMap<MacAddress, EniAddresses>>,
        scan: Option<std::io::Result<Scan>>,
    ) {
        self.reads.running = false;
        self.reads.asked.clear();
        let resync = scan.is_some();
        match enis {
            Ok(mut found) => {
                if !macs.is_empty() {
                    let action = "DescribeNetworkInterfaces";
                    self.metrics
                        .calls
                        .get_or_create(&CallLabels {
                            action,
                            outcome: "success",
                        })
                        .inc();
                }
                let mut changed = false;
                for mac in macs {
                    let view = match found.remove(&mac) {
                        Some(eni) => {
                            let key = mac.to_string();
                            if self.checkpoint.enis.get(&key) != Some(&eni.id) {
                                self.checkpoint.enis.insert(key, eni.id.clone());
                                changed = true;
                            }
                            EniView::Found(eni)
                        }
                        None => EniView::NoEni,
                    };
                    self.enis.insert(mac, view);
                }
                if changed {
                    self.save_checkpoint();
                }
                if resync {
                    self.rejected.clear();
                    match scan {
                        Some(Ok(scan)) => self.after_scan(&scan),
                        Some(Err(e)) => {
                            tracing::warn!(action = "netns_scan", outcome = "failed", error = %e, "cannot read the netns directory; no reclaim this time")
                        }
                        None => {}
                    }
                    self.metrics.set_ready(true);
                }
            }
            Err(e) => {
                self.count_call("DescribeNetworkInterfaces", &e);
                tracing::warn!(action = "DescribeNetworkInterfaces", outcome = %e.kind, error = %e.message, hint = e.kind.hint(), "cannot read the node's ENIs");
                if resync {
                    self.reads.resync_waiting = true;
                }
                self.retry_later(e.kind);
                self.reads.again = true;
            }
        }
        if self.backoff.until.is_none() && std::mem::take(&mut self.reads.again) {
            self.read();
        }
    }

    /// Orphans, and live claims older than the scan, shrink to what their namespaces hold;
    /// unheld addresses age towards reclaim.
    fn after_scan(&mut self, scan: &Scan) {
        let before = self.claims.wanted();
        self.claims.prune_orphans(&scan.by_netns);
        let checked = self
            .connections
            .iter()
            .filter(|(_, c)| c.last_claim < scan.started)
            .map(|(id, _)| *id)
            .collect();
        for conn in self.claims.prune_live(&checked, &scan.by_netns) {
            if let Some(claim) = self.claims.get(conn) {
                tracing::warn!(action = "resync", pod = %claim.pod, "a connected pod's claim names addresses its network namespace no longer holds: releasing them");
            }
        }
        self.release(released(&before, &self.claims.wanted()), "gone");
        let mut held = scan.held();
        held.extend(self.claims.wanted().into_iter().map(|(_, a)| a));
        let node_enis = self.enis.values().filter_map(|v| match v {
            EniView::Found(e) => Some(e),
            EniView::NoEni => None,
        });
        let mut candidates = unheld(node_enis, &held);
        candidates.retain(|(eni, a)| !self.batches.is_flying(eni, *a));
        let due = self
            .unheld
            .observe(candidates, Instant::now(), self.config.reclaim_after);
        for (eni, address) in due {
            tracing::info!(action = "reclaim", eni = %eni, address = %address, "no pod has held this address for --reclaim-after: unassigning");
            self.metrics.reclaims.inc();
            self.unheld.forget(&eni, address);
            self.batches.unassign(&eni, address);
        }
    }

    /// Queues an assign for every wanted address missing from its (`no_manage`) ENI.
    fn plan(&mut self) {
        for (mac, address) in self.claims.wanted() {
            let Some(EniView::Found(eni)) = self.enis.get(&mac) else {
                continue;
            };
            let primary = eni.primary_ipv4.map(IpAddr::V4) == Some(address);
            if !eni.no_manage || primary || eni.holds(address) {
                continue;
            }
            if self.rejected.contains_key(&address) || self.batches.is_flying(&eni.id, address) {
                continue;
            }
            self.batches.assign(&eni.id, address);
        }
    }

    /// Sends every ready batch, one task per ENI, unless the node is backing off.
    fn dispatch(&mut self) {
        if self.backoff.until.is_some() {
            return;
        }
        let now = Instant::now();
        for (eni, changes) in self.batches.take_ready(now) {
            for c in &changes {
                tracing::info!(action = c.action(), eni = %eni, addresses = c.addresses().len(), "sending batch");
            }
            let ours = self.enis.values().find_map(|v| match v {
                EniView::Found(e) if e.id == eni => Some(e.clone()),
                _ => None,
            });
            let ec2 = self.ec2.clone();
            let events = self.events.clone();
            tokio::spawn(async move {
                let outcome = call_batch(&ec2, ours.as_ref(), changes).await;
                let _ = events.send(Event::Called { eni, outcome });
            });
        }
        // One timer for the batch that is due first; a later one is re-armed when it fires.
        if let Some(due) = self.batches.next_due(now)
            && self.pace_wake.is_none_or(|w| w > due)
        {
            self.pace_wake = Some(due);
            let events = self.events.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(due.into()).await;
                let _ = events.send(Event::Wake);
            });
        }
    }

    fn on_called(&mut self, eni_id: &str, outcome: BatchOutcome) {
        self.batches.done(eni_id);
        for (address, holder) in outcome.held_elsewhere {
            self.metrics
                .refusals
                .get_or_create(&RefusalLabels {
                    reason: "held_by_not_no_manage",
                })
                .inc();
            let reason = format!(
                "held by {holder}, which lacks {NO_MANAGE_TAG}=true: the agent never takes an address from it"
            );
            tracing::warn!(action = "AssignIpv6Addresses", outcome = "refused", eni = %eni_id, address = %address, holder = %holder, "refused to take an IPv6 address from an ENI that is not a Multus one; retried at the next resync");
            self.rejected.insert(IpAddr::V6(address), reason);
        }
        let results = outcome.results;
        let wanted: BTreeSet<IpAddr> = self.claims.wanted().into_iter().map(|(_, a)| a).collect();
        let mut checkpoint_changed = false;
        for (change, result) in results {
            let assign = matches!(
                change,
                Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }
            );
            // An IPv6 address taken from another ENI before it is assigned to this one.
            let from_holder = change.eni() != eni_id;
            match result {
                Some(Ok(())) => {
                    let n = change.addresses().len();
                    self.metrics
                        .calls
                        .get_or_create(&CallLabels {
                            action: change.action(),
                            outcome: "success",
                        })
                        .inc();
                    self.metrics.batch_addresses.observe(n as f64);
                    self.backoff.backoff = backoff();
                    tracing::info!(action = change.action(), outcome = "success", eni = %eni_id, addresses = n, "batch applied");
                    for view in self.enis.values_mut() {
                        if let EniView::Found(e) = view {
                            e.apply(&change);
                        }
                    }
                    for a in change.addresses() {
                        self.rejected.remove(&a);
                        if assign && !wanted.contains(&a) {
                            // Released while the assign was in flight.
                            self.batches.unassign(eni_id, a);
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
                    self.count_call(e.action, &e);
                    tracing::warn!(action = change.action(), outcome = "rejected", eni = %change.eni(), addresses = ?change.addresses(), error = %e.message, "EC2 refused the call; retried at the next resync");
                    for a in change.addresses() {
                        self.rejected.insert(a, e.message.clone());
                    }
                    if !assign {
                        // The picture was probably stale (address already gone): re-read.
                        self.reads.again = true;
                    }
                }
                Some(Err(e)) => {
                    self.count_call(e.action, &e);
                    tracing::warn!(action = change.action(), outcome = %e.kind, eni = %change.eni(), addresses = change.addresses().len(), error = %e.message, hint = e.kind.hint(), "batch failed; requeued");
                    if !from_holder {
                        self.requeue(eni_id, &change, assign);
                    }
                    self.retry_later(e.kind);
                }
                // The holder is looked up again with the next Assign.
                None if from_holder => {}
                None => self.requeue(eni_id, &change, assign),
            }
        }
        if checkpoint_changed {
            self.save_checkpoint();
        }
        if self.backoff.until.is_none() && std::mem::take(&mut self.reads.again) {
            self.read();
        }
    }

    fn requeue(&mut self, eni: &str, change: &Change, assign: bool) {
        for a in change.addresses() {
            if assign {
                // `plan` queues it again if it is still wanted.
            } else {
                self.batches.unassign(eni, a);
            }
        }
    }

    fn count_call(&self, action: &'static str, e: &multus_eni_ec2::Error) {
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
        self.metrics
            .calls
            .get_or_create(&CallLabels { action, outcome })
            .inc();
    }

    /// Every call of the node waits out one backoff.
    fn retry_later(&mut self, kind: ErrorKind) {
        if self.backoff.until.is_some() {
            return;
        }
        let wait = self.backoff.backoff.next().unwrap_or(RETRY_MAX);
        tracing::info!(action = "backoff", reason = %kind, wait_ms = wait.as_millis() as u64, "node-wide backoff");
        self.backoff.until = Some(Instant::now() + wait);
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = events.send(Event::Wake);
        });
    }

    /// Sends each connected sidecar its status when it changed.
    fn publish(&mut self) {
        let now = Instant::now();
        for (conn, claim) in self.claims.live() {
            let Some(c) = self.connections.get_mut(conn) else {
                continue;
            };
            let (routable, addresses) = claim_status(claim, &self.enis, &self.rejected);
            let current = (claim.seq, routable, addresses);
            if c.last.as_ref() == Some(&current) {
                continue;
            }
            for a in &current.2 {
                let was = c
                    .last
                    .as_ref()
                    .and_then(|(_, _, l)| l.iter().find(|x| x.address == a.address));
                if a.state == AddressState::Refused
                    && was.map(|w| w.state) != Some(AddressState::Refused)
                {
                    let reason = match a.reason.as_deref() {
                        Some(NOT_HELD) => "not_held",
                        Some(NOT_NO_MANAGE) => "not_no_manage",
                        Some(PRIMARY) => "primary",
                        _ => "other",
                    };
                    self.metrics
                        .refusals
                        .get_or_create(&RefusalLabels { reason })
                        .inc();
                    if reason != "not_held" {
                        tracing::warn!(action = "claim", outcome = "refused", pod = %claim.pod, interface = %a.interface, address = %a.address, eni = ?a.eni, reason = ?a.reason, "refused a claimed address");
                    }
                }
                if a.state == AddressState::Routable
                    && let Some(since) = c.claimed_at.remove(&a.address)
                {
                    self.metrics
                        .claim_to_routable
                        .observe(now.duration_since(since).as_secs_f64());
                }
            }
            let answer = Answer::Status {
                v: VERSION,
                seq: current.0,
                routable: current.1,
                addresses: current.2.clone(),
            };
            let _ = c.answers.send(answer);
            c.last = Some(current);
        }
    }

    fn save_checkpoint(&self) {
        if let Err(e) = self.checkpoint.save(&self.config.checkpoint) {
            tracing::error!(action = "checkpoint", outcome = "failed", path = %self.config.checkpoint.display(), error = %e, "cannot write the checkpoint: a restart may miss leaks");
        }
    }
}

/// What one ENI's batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Every change with its result; `None` for a change not attempted. A failed IPv6
    /// holder lookup is reported on the assign it was for (the error names its action).
    results: Vec<(Change, Option<multus_eni_ec2::Result<()>>)>,
    /// IPv6 addresses not assigned because a non-Multus ENI holds them, with that ENI.
    held_elsewhere: Vec<(Ipv6Addr, EniId)>,
}

/// The calls of one ENI's batch, in order. After a throttled or failed call the rest is
/// not attempted: the node backs off first. A rejected call naming several addresses is
/// split by the shared [`Ec2::apply_splitting`], so that one bad address does not block the
/// others. An IPv6 address is first unassigned from any other ENI that holds it (IPv6 has
/// no reassignment), if that ENI is a Multus one (`no_manage`).
async fn call_batch(ec2: &Ec2, ours: Option<&EniAddresses>, changes: Vec<Change>) -> BatchOutcome {
    let mut out = BatchOutcome::default();
    let mut stopped = false;
    for change in changes {
        if stopped {
            out.results.push((change, None));
            continue;
        }
        let change = match (&change, ours) {
            (Change::AssignIpv6 { eni, addresses }, Some(ours)) => {
                match free_ipv6(ec2, ours, addresses, &mut out).await {
                    Ok(left) if left.is_empty() => continue,
                    Ok(left) => Change::AssignIpv6 {
                        eni: eni.clone(),
                        addresses: left,
                    },
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

/// Unassigns `addresses` from the other Multus ENIs that hold them, recording each call in
/// `out`, and returns the addresses that may be assigned now. An address held by an ENI
/// without `no_manage` is left out (`out.held_elsewhere`): never taken from the VPC CNI.
/// `Err` after a failure other than a rejection (the node backs off): `Some` with the
/// holder lookup's error, `None` when an unassign failed (recorded in `out`).
async fn free_ipv6(
    ec2: &Ec2,
    ours: &EniAddresses,
    addresses: &[Ipv6Addr],
    out: &mut BatchOutcome,
) -> std::result::Result<Vec<Ipv6Addr>, Option<multus_eni_ec2::Error>> {
    let wanted: BTreeSet<Ipv6Addr> = addresses.iter().copied().collect();
    let holders = ec2.ipv6_holder_enis(ours, &wanted).await.map_err(Some)?;
    let mut left = wanted.clone();
    for holder in holders {
        let held: Vec<Ipv6Addr> = holder.ipv6.intersection(&wanted).copied().collect();
        if !holder.no_manage {
            for a in held {
                left.remove(&a);
                out.held_elsewhere.push((a, holder.id.clone()));
            }
            continue;
        }
        let unassign = Change::UnassignIpv6 {
            eni: holder.id.clone(),
            addresses: held,
        };
        for outcome in ec2.apply_splitting(&unassign).await {
            let failed = matches!(&outcome.result, Err(e) if e.kind != ErrorKind::Rejected);
            out.results.push((outcome.change, Some(outcome.result)));
            if failed {
                return Err(None);
            }
        }
    }
    Ok(left.into_iter().collect())
}
