//! The event loop: netlink events, a slow resync timer, retry wake-ups and SIGTERM in one
//! `select!`. Nothing polls; an idle sidecar sleeps until one of those fires.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::Instrument;

use crate::addresses::{AddressWatcher, InterfaceTable, MacAddress};
use crate::cli::RunArgs;
use crate::eni::{Ec2, ErrorKind, NO_MANAGE_TAG};
use crate::probe::{self, Readiness};
use crate::reconcile::{self, Change, DesiredInterface, EniId, EniLookup, Managed};
use crate::sleep_until;
use crate::{Error, Result};
use multus_eni_ec2::model::Ipv6Holders;

/// First wait before an address EC2 rejected is tried again; doubles (with up to 100 %
/// jitter) to [`REJECTED_RETRY_MAX`]. Each rejected address has its own: the others, and
/// addresses added meanwhile, are assigned at once.
pub const REJECTED_RETRY_MIN: Duration = Duration::from_secs(2);
/// Longest wait between two attempts of a rejected address (before jitter).
pub const REJECTED_RETRY_MAX: Duration = Duration::from_secs(30);

/// First wait after a failed pass; doubles (with up to 100 % jitter) to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(2);
/// First wait after a throttled pass; doubles (with up to 100 % jitter) to
/// [`THROTTLED_RETRY_MAX`]. Throttled calls are retried only here (not by the SDK). 1 s: a
/// lone pod whose first three calls are throttled waits 7–14 s (1–2, 2–4, 4–8 s), where 2 s
/// made it 14–28 s although the account's bucket refills every second; at a 200-pod rollout
/// the model puts the cost at 1.61 calls per needed call instead of 1.47, the time to all
/// routable unchanged (docs/scale.md).
pub const THROTTLED_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of a failing change (before jitter): permission,
/// credential and server errors, which a quick retry does not mend.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest wait after a throttled pass (before jitter). The account's bucket refills every
/// second; at a 400-pod rollout the last pods waited out 30–60 s while it had tokens again
/// (docs/scale.md).
pub const THROTTLED_RETRY_MAX: Duration = Duration::from_secs(8);

/// First wait between two release attempts on SIGTERM; doubles (with up to 100 % jitter) to
/// [`RELEASE_RETRY_MAX`]. The shutdown timeout bounds the whole release. At a mass deletion
/// the Unassign bucket refills 5 calls/s for hundreds of pods: a pod retrying every 250 ms
/// only adds throttled calls, not releases (docs/scale.md, `bench/retry_model.py`).
pub const RELEASE_RETRY_MIN: Duration = Duration::from_secs(2);
/// Longest wait between two release attempts (before jitter).
pub const RELEASE_RETRY_MAX: Duration = Duration::from_secs(8);

/// First wait before subscribing to netlink again after a failed attempt; doubles (with up
/// to 100 % jitter) to [`NETLINK_RETRY_MAX`]. The first attempt after a lost or overrun
/// socket is immediate.
pub const NETLINK_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between two netlink subscription attempts (before jitter).
pub const NETLINK_RETRY_MAX: Duration = Duration::from_secs(30);

/// Spread of the first resync around `--resync-interval` (±50 %): pods of one rollout start
/// within seconds of each other and would otherwise resync in the same second, every period.
pub const FIRST_RESYNC_SPREAD: f64 = 0.5;
/// Spread of every later resync (±20 %), so the waves do not re-form.
pub const RESYNC_SPREAD: f64 = 0.2;

/// `period` scaled into `[period·(1−spread), period·(1+spread))` by `unit` in `[0, 1)`.
fn jittered(period: Duration, spread: f64, unit: f64) -> Duration {
    period.mul_f64(1.0 - spread + 2.0 * spread * unit.clamp(0.0, 1.0))
}

/// Unlimited attempts, `min` doubling to `max`, each wait plus up to 100 % jitter.
fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs the sidecar until SIGTERM (or SIGINT), then releases and returns.
pub async fn run(args: RunArgs) -> Result<()> {
    let span = crate::pod_span();
    async move {
        let readiness = probe::serve(args.probe_addr).await?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
        tracing::info!(
            action = "start",
            interfaces = %args.interfaces.join(","),
            probe_addr = %args.probe_addr,
            "managing the addresses of the named interfaces"
        );
        let ec2 = Ec2::from_env().await;
        let watcher = AddressWatcher::subscribe()?;
        let mut sidecar = Sidecar::new(args, ec2, watcher, readiness);
        if let Err(e) = sidecar.table_dump().await {
            sidecar.netlink_failed(e);
        }
        let deadline = sidecar.event_loop(&mut sigterm, &mut sigint).await;
        sidecar.shutdown(deadline).await;
        Ok(())
    }
    .instrument(span)
    .await
}

struct Sidecar {
    args: RunArgs,
    ec2: Ec2,
    /// `None` while netlink is lost and [`Sidecar::netlink_retry`] waits to subscribe again.
    watcher: Option<AddressWatcher>,
    netlink_retry: NetlinkRetry,
    table: InterfaceTable,
    enis: BTreeMap<MacAddress, EniLookup>,
    /// MACs whose ENI must be read again before planning (resync, or a failed call).
    stale: BTreeSet<MacAddress>,
    managed: Managed,
    /// Addresses of Assign calls under way: if SIGTERM's deadline ends a pass during one,
    /// EC2 may have carried it out, so the release treats them as ours.
    in_flight: BTreeMap<MacAddress, BTreeSet<IpAddr>>,
    /// Set on SIGTERM: a running pass finishes its call in flight and makes no new one.
    stopping: Arc<AtomicBool>,
    holders: Ipv6Holders,
    /// Why EC2 did not take an address in the last pass (for `/readyz` and the log).
    refused: BTreeMap<IpAddr, String>,
    /// Addresses EC2 rejected, each waiting out a backoff of its own.
    rejected: AddressRetries,
    readiness: Readiness,
    warned_no_eni: BTreeSet<MacAddress>,
    warned_dad_failed: BTreeSet<(String, Ipv6Addr)>,
    warned_no_manage: BTreeSet<EniId>,
    announced_missing: BTreeSet<String>,
    last_not_ready: Option<String>,
    last_error: Option<ErrorKind>,
    backoff: ExponentialBackoff,
    throttled_backoff: ExponentialBackoff,
    retry_at: Option<Instant>,
    dirty: bool,
}

// === impl Sidecar ===

impl Sidecar {
    fn new(args: RunArgs, ec2: Ec2, watcher: AddressWatcher, readiness: Readiness) -> Self {
        let table = InterfaceTable::new(args.interfaces.clone());
        Self {
            args,
            ec2,
            watcher: Some(watcher),
            netlink_retry: NetlinkRetry::default(),
            table,
            enis: BTreeMap::new(),
            stale: BTreeSet::new(),
            managed: Managed::default(),
            in_flight: BTreeMap::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            holders: Ipv6Holders::default(),
            refused: BTreeMap::new(),
            rejected: AddressRetries::default(),
            readiness,
            warned_no_eni: BTreeSet::new(),
            warned_dad_failed: BTreeSet::new(),
            warned_no_manage: BTreeSet::new(),
            announced_missing: BTreeSet::new(),
            last_not_ready: None,
            last_error: None,
            backoff: backoff(RETRY_MIN, RETRY_MAX),
            throttled_backoff: backoff(THROTTLED_RETRY_MIN, THROTTLED_RETRY_MAX),
            retry_at: None,
            dirty: true,
        }
    }

    /// Runs until SIGTERM or SIGINT; returns the deadline for the release.
    async fn event_loop(
        &mut self,
        sigterm: &mut tokio::signal::unix::Signal,
        sigint: &mut tokio::signal::unix::Signal,
    ) -> Instant {
        let period = self.args.resync_interval;
        let mut next_resync =
            Instant::now() + jittered(period, FIRST_RESYNC_SPREAD, fastrand::f64());
        loop {
            if self.dirty && self.retry_at.is_none() {
                self.dirty = false;
                let stopping = self.stopping.clone();
                let shutdown_timeout = self.args.shutdown_timeout;
                let mut pass = Box::pin(self.reconcile());
                let signalled = tokio::select! {
                    biased;
                    outcome = &mut pass => Ok(outcome),
                    _ = sigterm.recv() => Err(()),
                    _ = sigint.recv() => Err(()),
                };
                match signalled {
                    Ok(outcome) => {
                        drop(pass);
                        self.after_pass(outcome);
                        continue;
                    }
                    Err(()) => {
                        // An EC2 call may be under way: let it finish and be recorded (the
                        // release plans from the picture it updates); start no new one.
                        stopping.store(true, Ordering::Relaxed);
                        let deadline = Instant::now() + shutdown_timeout;
                        let finished = tokio::time::timeout_at(deadline, &mut pass).await;
                        drop(pass);
                        if finished.is_err() {
                            self.pass_abandoned();
                        }
                        return deadline;
                    }
                }
            }
            let retry_at = self.retry_at;
            let netlink_at = self.netlink_retry.at;
            let rejected_at = self.rejected.next_at(Instant::now());
            tokio::select! {
                biased;
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                event = next_event(self.watcher.as_mut()) => match event {
                    Ok(msg) => {
                        if let Err(e) = self.on_event(msg).await {
                            self.netlink_failed(e);
                        }
                    }
                    Err(e) => self.netlink_failed(e),
                },
                _ = sleep_until(netlink_at), if netlink_at.is_some() => {
                    self.netlink_retry.at = None;
                    self.resubscribe().await;
                }
                _ = tokio::time::sleep_until(next_resync) => {
                    next_resync = Instant::now() + jittered(period, RESYNC_SPREAD, fastrand::f64());
                    tracing::debug!(action = "resync", "re-reading interfaces and ENIs");
                    // Throttled and waiting to retry: the picture still holds (EC2 executed
                    // nothing), and re-reading it would spend the Describe bucket that the
                    // account lacks right now. The next resync reads it.
                    if self.last_error != Some(ErrorKind::Throttled) {
                        self.stale.extend(self.enis.keys().copied());
                        self.holders.forget();
                    }
                    if self.watcher.is_some()
                        && let Err(e) = self.table_dump().await
                    {
                        self.netlink_failed(e);
                    }
                    self.dirty = true;
                }
                _ = sleep_until(retry_at), if retry_at.is_some() => {
                    self.retry_at = None;
                    self.dirty = true;
                }
                _ = sleep_until(rejected_at), if rejected_at.is_some() => {
                    self.dirty = true;
                }
            }
        }
        Instant::now() + self.args.shutdown_timeout
    }

    /// SIGTERM's deadline ended a pass: an Assign under way may have been carried out, and
    /// what EC2 did since the last picture is unknown. The release reads the ENIs again and
    /// counts the addresses of that Assign as ours.
    fn pass_abandoned(&mut self) {
        for (mac, addresses) in std::mem::take(&mut self.in_flight) {
            self.managed.0.entry(mac).or_default().extend(addresses);
        }
        self.stale.extend(self.enis.keys().copied());
    }

    /// Netlink failed or dropped events: drop the socket and subscribe again, at once the
    /// first time, then with backoff. The loop (and the release on exit) goes on meanwhile.
    fn netlink_failed(&mut self, error: Error) {
        self.watcher = None;
        let delay = self.netlink_retry.failed();
        let outcome = if matches!(error, Error::NetlinkOverrun) {
            "overrun"
        } else {
            "reconnect"
        };
        tracing::warn!(
            action = "netlink",
            outcome,
            error = %error,
            retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
            "netlink events lost; subscribing again and re-reading the interfaces"
        );
    }

    async fn resubscribe(&mut self) {
        let watcher = match AddressWatcher::subscribe() {
            Ok(w) => w,
            Err(e) => return self.netlink_failed(e),
        };
        self.watcher = Some(watcher);
        match self.table_dump().await {
            Ok(()) => {
                self.netlink_retry.succeeded();
                self.dirty = true;
            }
            Err(e) => self.netlink_failed(e),
        }
    }

    /// Applies an event and every event already queued behind it, then marks the state
    /// dirty if the desired addresses changed (the pass runs right after: no waiting).
    async fn on_event(
        &mut self,
        first: rtnetlink::packet_route::RouteNetlinkMessage,
    ) -> Result<()> {
        let mut next = Some(first);
        let mut changed = false;
        while let Some(msg) = next {
            let applied = self.table.apply(&msg);
            changed |= applied.changed;
            let Some(watcher) = self.watcher.as_mut() else {
                break;
            };
            if let Some(index) = applied.dump_link {
                watcher.dump_link(&mut self.table, index).await?;
            }
            next = watcher.try_next_event();
        }
        if changed {
            self.dirty = true;
            self.announce_interfaces();
            self.update_readiness(&self.table.desired());
        }
        Ok(())
    }

    async fn table_dump(&mut self) -> Result<()> {
        let Some(watcher) = self.watcher.as_ref() else {
            return Err(Error::NetlinkStreamEnded);
        };
        if watcher.dump(&mut self.table).await? {
            self.dirty = true;
            self.update_readiness(&self.table.desired());
        }
        self.announce_interfaces();
        Ok(())
    }

    fn announce_interfaces(&mut self) {
        let missing: BTreeSet<String> = self
            .table
            .missing()
            .into_iter()
            .map(str::to_string)
            .collect();
        for name in missing.difference(&self.announced_missing) {
            tracing::info!(interface = %name, action = "wait", "interface does not exist yet; waiting for it to appear");
        }
        for name in self.announced_missing.difference(&missing) {
            tracing::info!(interface = %name, action = "appeared", "interface appeared");
        }
        self.announced_missing = missing;
        let dad_failed = self.table.dad_failed();
        for (interface, address) in dad_failed.difference(&self.warned_dad_failed) {
            tracing::warn!(
                interface = %interface,
                address = %address,
                action = "dad",
                outcome = "dad_failed",
                "duplicate address detection failed for {address} on {interface}: another host uses it; \
                 the kernel does not use it, and it is not assigned to the ENI"
            );
        }
        self.warned_dad_failed = dad_failed;
    }

    /// One reconcile pass: read unknown or stale ENIs, find IPv6 holders if needed, plan,
    /// and make the calls. Every call is made even when another failed (one refused address
    /// or ENI must not hold the others back); the pass fails with the worst error.
    async fn reconcile(&mut self) -> Result<()> {
        let desired = self.table.desired();
        let failures = self.reconcile_inner(&desired).await;
        // Take ownership only of what EC2 confirmed: an address whose Assign failed stays
        // unrecorded, so the next pass sends it again even if our picture shows it.
        let unconfirmed: BTreeSet<IpAddr> = self.refused.keys().copied().collect();
        let confirmed: Vec<DesiredInterface> = desired
            .iter()
            .map(|d| DesiredInterface {
                addresses: d.addresses.difference(&unconfirmed).copied().collect(),
                ..d.clone()
            })
            .collect();
        self.managed.record(&confirmed, &self.enis);
        self.managed.forget_released(&desired, &self.enis);
        self.update_readiness(&desired);
        match worst(failures) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn reconcile_inner(&mut self, desired: &[DesiredInterface]) -> Vec<Error> {
        let mut failures = Vec::new();
        let wanted: BTreeSet<IpAddr> = desired
            .iter()
            .flat_map(|d| d.addresses.iter().copied())
            .collect();
        self.refused.retain(|a, _| wanted.contains(a));
        self.rejected.retain(&wanted);
        let waiting = self.rejected.waiting(Instant::now());
        let macs: BTreeSet<MacAddress> = desired
            .iter()
            .filter_map(|d| d.mac)
            .chain(self.managed.0.keys().copied())
            .collect();
        for mac in macs {
            if (!self.enis.contains_key(&mac) || self.stale.contains(&mac))
                && let Err(e) = self.look_up(mac, desired).await
            {
                failures.push(e);
            }
        }
        // Addresses that left the interfaces and are no longer on the ENI need no call.
        self.managed.forget_released(desired, &self.enis);

        let mut holders = BTreeMap::new();
        let mut held_back: BTreeSet<Ipv6Addr> = BTreeSet::new();
        for (eni_id, mut addresses) in reconcile::missing_ipv6(desired, &self.enis) {
            addresses.retain(|a| !waiting.contains(&IpAddr::V6(*a)));
            let Some(ours) = self.found(&eni_id).cloned() else {
                continue;
            };
            if addresses.is_empty() {
                continue;
            }
            match self
                .ec2
                .ipv6_holders_cached(&mut self.holders, &ours, &addresses)
                .await
            {
                Ok(found) => holders.extend(found),
                Err(e) => {
                    for a in &addresses {
                        self.refused.insert(
                            IpAddr::V6(*a),
                            format!("finding which ENI holds it failed: {e}"),
                        );
                    }
                    held_back.extend(addresses);
                    failures.push(e.into());
                }
            }
        }

        for change in reconcile::plan_changes(desired, &self.enis, &self.managed, &holders) {
            if self.stopping.load(Ordering::Relaxed) {
                break;
            }
            let Some(change) = reconcile::without_held_back(change, &held_back)
                .and_then(|c| reconcile::without_waiting(c, &waiting))
            else {
                continue;
            };
            let mac = self.mac_of(change.eni());
            if let (Some(mac), Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }) =
                (mac, &change)
            {
                self.in_flight
                    .insert(mac, change.addresses().into_iter().collect());
            }
            let outcomes = self.ec2.apply_splitting(&change).await;
            self.in_flight.clear();
            for outcome in outcomes {
                let part = outcome.change;
                match outcome.result {
                    Ok(()) => self.accepted(&part, desired),
                    Err(e) => {
                        if let Change::UnassignIpv6 { addresses, .. } = &part {
                            // Still on the other ENI: EC2 would refuse our Assign.
                            held_back.extend(addresses.iter().copied());
                        }
                        self.failed(&part, &e);
                        // A rejected address waits out its own backoff (set by `failed`):
                        // the pass, and what it would hold back, goes on.
                        if !address_rejected(&part, &e) {
                            failures.push(e.into());
                        }
                    }
                }
            }
        }
        failures
    }

    fn accepted(&mut self, change: &Change, desired: &[DesiredInterface]) {
        let addresses: Vec<String> = change.addresses().iter().map(ToString::to_string).collect();
        tracing::info!(
            action = change.action(),
            eni = change.eni(),
            address = %addresses.join(","),
            interface = %self.interfaces_of(change.eni(), desired),
            outcome = "ok",
            "{change}"
        );
        for lookup in self.enis.values_mut() {
            if let EniLookup::Found(eni) = lookup {
                eni.apply(change);
            }
        }
        self.holders.applied(change);
        for a in change.addresses() {
            self.refused.remove(&a);
            self.rejected.accepted(&a);
        }
    }

    fn failed(&mut self, change: &Change, e: &multus_eni_ec2::Error) {
        // Our picture of that ENI may be wrong now: read it again next time. A throttled call
        // was not executed: the picture is still right, and a describe per retry would only
        // add to the throttling (docs/scale.md).
        if !e.is_throttled() {
            for (mac, lookup) in &self.enis {
                if matches!(lookup, EniLookup::Found(eni) if eni.id == change.eni()) {
                    self.stale.insert(*mac);
                }
            }
            self.holders.forget();
        }
        let addresses: Vec<String> = change.addresses().iter().map(ToString::to_string).collect();
        tracing::warn!(
            action = change.action(),
            eni = change.eni(),
            address = %addresses.join(","),
            outcome = "failed",
            error = %e,
            "{change} failed"
        );
        if matches!(
            change,
            Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }
        ) {
            let now = Instant::now();
            for a in change.addresses() {
                self.refused.insert(a, e.to_string());
                if address_rejected(change, e) {
                    self.rejected.rejected(a, now);
                }
            }
        }
    }

    /// The MAC whose ENI has this id.
    fn mac_of(&self, eni_id: &str) -> Option<MacAddress> {
        self.enis.iter().find_map(|(mac, l)| match l {
            EniLookup::Found(e) if e.id == eni_id => Some(*mac),
            _ => None,
        })
    }

    async fn look_up(&mut self, mac: MacAddress, desired: &[DesiredInterface]) -> Result<()> {
        let names: Vec<&str> = desired
            .iter()
            .filter(|d| d.mac == Some(mac))
            .map(|d| d.name.as_str())
            .collect();
        let interface = names.join(",");
        match self.ec2.find_by_mac(mac).await? {
            Some(eni) => {
                if !matches!(self.enis.get(&mac), Some(EniLookup::Found(old)) if old.id == eni.id) {
                    tracing::info!(interface = %interface, mac = %mac, eni = %eni.id, action = "find_eni", outcome = "found", "interface is on ENI {}", eni.id);
                }
                if !eni.no_manage && self.warned_no_manage.insert(eni.id.clone()) {
                    tracing::warn!(
                        eni = %eni.id,
                        interface = %interface,
                        action = "check_tag",
                        outcome = "missing_no_manage_tag",
                        "ENI {} lacks tag {NO_MANAGE_TAG}=true: the VPC CNI may hand its secondary IPs to other pods",
                        eni.id
                    );
                }
                self.enis.insert(mac, EniLookup::Found(eni));
            }
            None => {
                if self.warned_no_eni.insert(mac) {
                    tracing::warn!(
                        interface = %interface,
                        mac = %mac,
                        action = "find_eni",
                        outcome = "no_eni",
                        "no ENI has MAC {mac} (macvlan, SR-IOV or a non-VPC network?): interface {interface} is left alone and does not hold readiness back"
                    );
                }
                self.enis.insert(mac, EniLookup::NoEni);
            }
        }
        self.stale.remove(&mac);
        Ok(())
    }

    fn found(&self, id: &str) -> Option<&reconcile::EniAddresses> {
        self.enis.values().find_map(|l| match l {
            EniLookup::Found(e) if e.id == id => Some(e),
            _ => None,
        })
    }

    fn interfaces_of(&self, eni_id: &str, desired: &[DesiredInterface]) -> String {
        let macs: Vec<MacAddress> = self
            .enis
            .iter()
            .filter(|(_, l)| matches!(l, EniLookup::Found(e) if e.id == eni_id))
            .map(|(m, _)| *m)
            .collect();
        let names: Vec<&str> = desired
            .iter()
            .filter(|d| d.mac.is_some_and(|m| macs.contains(&m)))
            .map(|d| d.name.as_str())
            .collect();
        names.join(",")
    }

    fn after_pass(&mut self, outcome: Result<()>) {
        match outcome {
            Ok(()) => {
                if self.last_error.take().is_some() {
                    tracing::info!(
                        action = "reconcile",
                        outcome = "recovered",
                        "EC2 calls succeed again"
                    );
                }
                self.backoff = backoff(RETRY_MIN, RETRY_MAX);
                self.throttled_backoff = backoff(THROTTLED_RETRY_MIN, THROTTLED_RETRY_MAX);
                self.retry_at = None;
            }
            Err(e) => {
                let delay = if e.is_throttled() {
                    self.throttled_backoff.next()
                } else {
                    self.backoff.next()
                }
                .unwrap_or(RETRY_MAX);
                self.retry_at = Some(Instant::now() + delay);
                let kind = match &e {
                    Error::Ec2(e) => Some(e.kind),
                    _ => None,
                };
                let retry_in =
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
                if kind.is_some() && self.last_error != kind {
                    let hint = kind.map(|k| k.hint()).unwrap_or_default();
                    tracing::error!(action = "reconcile", outcome = "retry", error = %e, retry_in = %retry_in, "{hint}");
                } else {
                    tracing::warn!(action = "reconcile", outcome = "retry", error = %e, retry_in = %retry_in, "still failing");
                }
                self.last_error = kind;
                self.dirty = true;
            }
        }
    }

    fn update_readiness(&mut self, desired: &[DesiredInterface]) {
        let verdict = reconcile::readiness(self.table.wanted(), desired, &self.enis);
        let was = self.readiness.get();
        self.readiness.set(verdict.is_ok());
        match verdict {
            Ok(()) if !was => {
                self.last_not_ready = None;
                self.readiness.set_reason("");
                tracing::info!(
                    action = "readiness",
                    outcome = "ready",
                    "every managed address is on its ENI"
                );
            }
            Err(reason) => {
                let mut reason = reason.to_string();
                // Name every address EC2 refused, and why: one bad address must not hide
                // behind "not assigned yet".
                let refused: Vec<String> = self
                    .refused
                    .iter()
                    .map(|(a, why)| format!("{a}: {why}"))
                    .collect();
                if !refused.is_empty() {
                    reason = format!("{reason}; not assigned: {}", refused.join("; "));
                }
                self.readiness.set_reason(&reason);
                if self.last_not_ready.as_ref() != Some(&reason) {
                    tracing::info!(action = "readiness", outcome = "not_ready", reason = %reason, "not ready");
                    self.last_not_ready = Some(reason);
                }
            }
            Ok(()) => {}
        }
    }

    /// On SIGTERM: release what we manage that is still on our ENI, by the deadline (the
    /// shutdown timeout from the signal, a pass that was under way included).
    async fn shutdown(&mut self, deadline: Instant) {
        if !self.args.release_on_exit {
            tracing::info!(
                action = "release",
                outcome = "skipped",
                "release on exit disabled; exiting"
            );
            return;
        }
        if self.managed.is_empty() {
            tracing::info!(
                action = "release",
                outcome = "nothing",
                "nothing to release; exiting"
            );
            return;
        }
        let timeout = self.args.shutdown_timeout;
        match tokio::time::timeout_at(deadline, self.release_with_retries()).await {
            Ok(()) => tracing::info!(action = "release", outcome = "ok", "released; exiting"),
            Err(_) => tracing::error!(
                action = "release",
                outcome = "timeout",
                timeout = %humantime::format_duration(timeout),
                "release did not finish in time; exiting"
            ),
        }
    }

    /// Retries the release (throttling at a mass deletion, 5xx) until it succeeds; the
    /// caller's shutdown timeout bounds it. Giving up at the first failure left addresses
    /// on the ENIs (docs/scale.md).
    async fn release_with_retries(&mut self) {
        let mut waits = backoff(RELEASE_RETRY_MIN, RELEASE_RETRY_MAX);
        let mut picture = self.current_picture();
        loop {
            match self.release(&mut picture).await {
                Ok(()) => return,
                Err(e) => {
                    let delay = waits.next().unwrap_or(RELEASE_RETRY_MAX);
                    let retry_in =
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
                    tracing::warn!(action = "release", outcome = "retry", error = %e, retry_in = %retry_in, "release failed; retrying until the shutdown timeout");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The event loop's picture of the ENIs holding managed addresses, when it is current
    /// (every one read and none marked stale); `None` sends the release to read them again.
    fn current_picture(&self) -> Option<BTreeMap<MacAddress, EniLookup>> {
        self.managed
            .0
            .keys()
            .map(|mac| match self.enis.get(mac) {
                Some(lookup) if !self.stale.contains(mac) => Some((*mac, lookup.clone())),
                _ => None,
            })
            .collect()
    }

    /// One release attempt. `picture` is our ENIs as last known: the event loop's, which every
    /// accepted change keeps up to date, so a release needs no DescribeNetworkInterfaces. It is
    /// read again after a failure other than throttling: EC2 rejects an Unassign that names
    /// an address no longer on the ENI (someone moved it), and the re-read plan leaves that
    /// address out. A throttled call was not executed: the picture holds.
    async fn release(
        &mut self,
        picture: &mut Option<BTreeMap<MacAddress, EniLookup>>,
    ) -> Result<()> {
        let enis = match picture.take() {
            Some(enis) => enis,
            // Unknown or stale: read our ENIs, and release only what is still on them.
            None => self.read_managed_enis().await?,
        };
        let enis = picture.insert(enis);
        for change in reconcile::plan_release(&self.managed, enis) {
            if let Err(e) = self.ec2.apply(&change).await {
                if !e.is_throttled() {
                    *picture = None;
                }
                return Err(e.into());
            }
            for lookup in enis.values_mut() {
                if let EniLookup::Found(eni) = lookup {
                    eni.apply(&change);
                }
            }
            let addresses: Vec<String> =
                change.addresses().iter().map(ToString::to_string).collect();
            tracing::info!(
                action = change.action(),
                eni = change.eni(),
                address = %addresses.join(","),
                outcome = "released",
                "{change}"
            );
        }
        Ok(())
    }

    async fn read_managed_enis(&self) -> Result<BTreeMap<MacAddress, EniLookup>> {
        let mut fresh = BTreeMap::new();
        for mac in self.managed.0.keys().copied() {
            match self.ec2.find_by_mac(mac).await? {
                Some(eni) => fresh.insert(mac, EniLookup::Found(eni)),
                None => fresh.insert(mac, EniLookup::NoEni),
            };
        }
        Ok(fresh)
    }
}

/// Whether EC2 refused these very addresses (not the account, the endpoint or the
/// credentials): they back off on their own, and nothing else waits for them.
fn address_rejected(change: &Change, e: &multus_eni_ec2::Error) -> bool {
    e.kind == ErrorKind::Rejected
        && matches!(
            change,
            Change::AssignIpv4 { .. } | Change::AssignIpv6 { .. }
        )
}

/// Addresses EC2 rejected, each with a backoff of its own: one bad address must not hold
/// back an address added meanwhile (it waited out the whole pass's backoff before).
#[derive(Default)]
struct AddressRetries(BTreeMap<IpAddr, AddressRetry>);

struct AddressRetry {
    /// Not tried again before this.
    at: Instant,
    waits: ExponentialBackoff,
}

impl AddressRetries {
    /// EC2 rejected `address` at `now`: its next attempt waits one step longer.
    fn rejected(&mut self, address: IpAddr, now: Instant) {
        let retry = self.0.entry(address).or_insert_with(|| AddressRetry {
            at: now,
            waits: backoff(REJECTED_RETRY_MIN, REJECTED_RETRY_MAX),
        });
        retry.at = now + retry.waits.next().unwrap_or(REJECTED_RETRY_MAX);
    }

    /// EC2 took `address`: it waits no more.
    fn accepted(&mut self, address: &IpAddr) {
        self.0.remove(address);
    }

    /// Forgets the addresses that left the interfaces.
    fn retain(&mut self, wanted: &BTreeSet<IpAddr>) {
        self.0.retain(|a, _| wanted.contains(a));
    }

    /// The addresses whose next attempt is still to come at `now`.
    fn waiting(&self, now: Instant) -> BTreeSet<IpAddr> {
        self.0
            .iter()
            .filter(|(_, r)| r.at > now)
            .map(|(a, _)| *a)
            .collect()
    }

    /// When the next waiting address is due (after `now`), to wake the loop for it.
    fn next_at(&self, now: Instant) -> Option<Instant> {
        self.0.values().map(|r| r.at).filter(|at| *at > now).min()
    }
}

/// The error the pass reports, which decides the backoff: any error other than throttling
/// (it needs the longer wait), else the throttling.
fn worst(failures: Vec<Error>) -> Option<Error> {
    let mut throttled = None;
    for e in failures {
        if e.is_throttled() {
            throttled.get_or_insert(e);
        } else {
            return Some(e);
        }
    }
    throttled
}

/// The next netlink event, or never while netlink is lost.
async fn next_event(
    watcher: Option<&mut AddressWatcher>,
) -> Result<rtnetlink::packet_route::RouteNetlinkMessage> {
    match watcher {
        Some(w) => w.next_event().await,
        None => std::future::pending().await,
    }
}

/// When to subscribe to netlink again: at once after the first failure, then with backoff.
struct NetlinkRetry {
    at: Option<Instant>,
    failures: u32,
    waits: ExponentialBackoff,
}

impl Default for NetlinkRetry {
    fn default() -> Self {
        Self {
            at: None,
            failures: 0,
            waits: backoff(NETLINK_RETRY_MIN, NETLINK_RETRY_MAX),
        }
    }
}

impl NetlinkRetry {
    /// Schedules the next attempt; returns the wait.
    fn failed(&mut self) -> Duration {
        self.failures += 1;
        let delay = if self.failures == 1 {
            Duration::ZERO
        } else {
            self.waits.next().unwrap_or(NETLINK_RETRY_MAX)
        };
        self.at = Some(Instant::now() + delay);
        delay
    }

    fn succeeded(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_throttled_passes_wait_at_most_14_seconds() {
        // backon adds up to 100 % jitter: the longest waits are twice the base ones.
        let mut waits = backoff(THROTTLED_RETRY_MIN, THROTTLED_RETRY_MAX);
        let total: Duration = (0..3).filter_map(|_| waits.next()).sum();
        assert!(total <= Duration::from_secs(14), "{total:?}");
        assert!(total >= Duration::from_secs(7), "{total:?}");
    }

    #[test]
    fn a_rejected_address_waits_alone_and_an_accepted_one_waits_no_more() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap_or_else(|e| panic!("{e}")) };
        let (bad, other) = (ip("2001:db8::bad"), ip("10.0.1.10"));
        let now = Instant::now();
        let mut retries = AddressRetries::default();
        assert!(retries.waiting(now).is_empty());
        assert_eq!(retries.next_at(now), None);

        retries.rejected(bad, now);
        assert_eq!(retries.waiting(now), [bad].into());
        let first = retries.next_at(now).unwrap_or(now);
        // The first wait is REJECTED_RETRY_MIN plus up to 100 % jitter.
        assert!(first >= now + REJECTED_RETRY_MIN && first <= now + 2 * REJECTED_RETRY_MIN);
        // Due at `first`: no longer waiting, and nothing left to wake for.
        assert!(retries.waiting(first).is_empty());
        assert_eq!(retries.next_at(first), None);
        // Rejected again: the wait grows.
        retries.rejected(bad, first);
        let second = retries.next_at(first).unwrap_or(first);
        assert!(
            second - first >= 2 * REJECTED_RETRY_MIN,
            "{:?}",
            second - first
        );

        retries.rejected(other, now);
        retries.accepted(&other);
        assert_eq!(retries.waiting(now), [bad].into());
        retries.retain(&BTreeSet::new());
        assert!(retries.waiting(now).is_empty());

        let rejected = |kind| multus_eni_ec2::Error {
            action: "AssignIpv6Addresses",
            kind,
            message: String::new(),
            code: None,
        };
        let assign = Change::AssignIpv6 {
            eni: "eni-a".into(),
            addresses: vec!["2001:db8::bad".parse().unwrap_or(Ipv6Addr::UNSPECIFIED)],
        };
        let unassign = Change::UnassignIpv6 {
            eni: "eni-a".into(),
            addresses: vec!["2001:db8::bad".parse().unwrap_or(Ipv6Addr::UNSPECIFIED)],
        };
        assert!(address_rejected(&assign, &rejected(ErrorKind::Rejected)));
        // Throttling, credentials and the endpoint are the account's problem, not the address's.
        assert!(!address_rejected(&assign, &rejected(ErrorKind::Throttled)));
        assert!(!address_rejected(
            &assign,
            &rejected(ErrorKind::AuthOrConfig)
        ));
        assert!(!address_rejected(&unassign, &rejected(ErrorKind::Rejected)));
    }

    #[test]
    fn the_pass_backs_off_on_its_worst_error() {
        let ec2 = |kind| {
            Error::Ec2(multus_eni_ec2::Error {
                action: "AssignPrivateIpAddresses",
                kind,
                message: String::new(),
                code: None,
            })
        };
        assert!(worst(Vec::new()).is_none());
        let only_throttled = worst(vec![ec2(ErrorKind::Throttled), ec2(ErrorKind::Throttled)]);
        assert!(only_throttled.is_some_and(|e| e.is_throttled()));
        let mixed = worst(vec![ec2(ErrorKind::Throttled), ec2(ErrorKind::Rejected)]);
        assert!(matches!(mixed, Some(Error::Ec2(e)) if e.kind == ErrorKind::Rejected));
    }

    #[test]
    fn resyncs_are_spread_around_the_period() {
        let period = Duration::from_secs(60);
        assert_eq!(
            jittered(period, FIRST_RESYNC_SPREAD, 0.0),
            Duration::from_secs(30)
        );
        assert_eq!(jittered(period, FIRST_RESYNC_SPREAD, 0.5), period);
        assert!(jittered(period, FIRST_RESYNC_SPREAD, 0.999) < Duration::from_secs(90));
        assert_eq!(
            jittered(period, RESYNC_SPREAD, 0.0),
            Duration::from_secs(48)
        );
        assert!(jittered(period, RESYNC_SPREAD, 0.999) < Duration::from_secs(72));
        // Out-of-range input cannot produce a zero or runaway wait.
        assert_eq!(
            jittered(period, RESYNC_SPREAD, -1.0),
            Duration::from_secs(48)
        );
        assert_eq!(
            jittered(period, RESYNC_SPREAD, 7.0),
            Duration::from_secs(72)
        );
    }
}
