//! The event loop: netlink events, a slow resync timer, retry wake-ups and SIGTERM in one
//! `select!`. Nothing polls; an idle sidecar sleeps until one of those fires.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::Instrument;

use crate::addresses::{AddressWatcher, InterfaceTable, MacAddress};
use crate::cli::RunArgs;
use crate::eni::{Ec2, ErrorKind, NO_MANAGE_TAG};
use crate::probe::{self, Readiness};
use crate::reconcile::{self, DesiredInterface, EniId, EniLookup, Managed};
use crate::{Error, Result};

/// First wait after a failed pass; doubles (with up to 100 % jitter) to [`RETRY_MAX`], or to
/// [`THROTTLED_RETRY_MAX`] after a throttled one.
/// Throttled calls are retried only here (not by the SDK): 2 s rather than 1 s spreads the
/// pods a token bucket turned away at a rollout over its refill (docs/scale.md).
pub const RETRY_MIN: Duration = Duration::from_secs(2);
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
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let span = tracing::info_span!(
        "sidecar",
        pod = %env("POD_NAME"),
        namespace = %env("POD_NAMESPACE"),
        node = %env("NODE_NAME"),
    );
    async move {
        let readiness = Readiness::default();
        let listener = probe::bind(args.probe_addr).await?;
        probe::spawn(listener, readiness.clone());
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
        sidecar.table_dump().await?;
        sidecar.event_loop(&mut sigterm, &mut sigint).await?;
        sidecar.shutdown().await;
        Ok(())
    }
    .instrument(span)
    .await
}

struct Sidecar {
    args: RunArgs,
    ec2: Ec2,
    watcher: AddressWatcher,
    table: InterfaceTable,
    enis: BTreeMap<MacAddress, EniLookup>,
    /// MACs whose ENI must be read again before planning (resync, or a failed call).
    stale: BTreeSet<MacAddress>,
    managed: Managed,
    readiness: Readiness,
    warned_no_eni: BTreeSet<MacAddress>,
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
            watcher,
            table,
            enis: BTreeMap::new(),
            stale: BTreeSet::new(),
            managed: Managed::default(),
            readiness,
            warned_no_eni: BTreeSet::new(),
            warned_no_manage: BTreeSet::new(),
            announced_missing: BTreeSet::new(),
            last_not_ready: None,
            last_error: None,
            backoff: backoff(RETRY_MIN, RETRY_MAX),
            throttled_backoff: backoff(RETRY_MIN, THROTTLED_RETRY_MAX),
            retry_at: None,
            dirty: true,
        }
    }

    async fn event_loop(
        &mut self,
        sigterm: &mut tokio::signal::unix::Signal,
        sigint: &mut tokio::signal::unix::Signal,
    ) -> Result<()> {
        let period = self.args.resync_interval;
        let mut next_resync =
            Instant::now() + jittered(period, FIRST_RESYNC_SPREAD, fastrand::f64());
        loop {
            if self.dirty && self.retry_at.is_none() {
                self.dirty = false;
                let outcome = tokio::select! {
                    biased;
                    _ = sigterm.recv() => return Ok(()),
                    _ = sigint.recv() => return Ok(()),
                    outcome = self.reconcile() => outcome,
                };
                self.after_pass(outcome);
                continue;
            }
            let retry_at = self.retry_at;
            tokio::select! {
                biased;
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
                event = self.watcher.next_event() => match event {
                    Ok(msg) => self.on_event(msg).await?,
                    Err(e) => {
                        tracing::warn!(action = "netlink", outcome = "reconnect", error = %e, "netlink events stopped; resubscribing");
                        self.watcher = AddressWatcher::subscribe()?;
                        self.table_dump().await?;
                    }
                },
                _ = tokio::time::sleep_until(next_resync) => {
                    next_resync = Instant::now() + jittered(period, RESYNC_SPREAD, fastrand::f64());
                    tracing::debug!(action = "resync", "re-reading interfaces and ENIs");
                    // Throttled and waiting to retry: the picture still holds (EC2 executed
                    // nothing), and re-reading it would spend the Describe bucket that the
                    // account lacks right now. The next resync reads it.
                    if self.last_error != Some(ErrorKind::Throttled) {
                        self.stale.extend(self.enis.keys().copied());
                    }
                    self.table_dump().await?;
                    self.dirty = true;
                }
                _ = sleep_until(retry_at), if retry_at.is_some() => {
                    self.retry_at = None;
                    self.dirty = true;
                }
            }
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
            if let Some(index) = applied.dump_link {
                self.watcher.dump_link(&mut self.table, index).await?;
            }
            next = self.watcher.try_next_event();
        }
        if changed {
            self.dirty = true;
            self.announce_interfaces();
            self.update_readiness(&self.table.desired());
        }
        Ok(())
    }

    async fn table_dump(&mut self) -> Result<()> {
        if self.watcher.dump(&mut self.table).await? {
            self.dirty = true;
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
    }

    /// One reconcile pass: read unknown or stale ENIs, find IPv6 holders if needed, plan,
    /// and make the calls. Stops at the first failure (the rest stays pending).
    async fn reconcile(&mut self) -> Result<()> {
        let desired = self.table.desired();
        let result = self.reconcile_inner(&desired).await;
        self.managed.record(&desired, &self.enis);
        self.managed.forget_released(&desired, &self.enis);
        self.update_readiness(&desired);
        result
    }

    async fn reconcile_inner(&mut self, desired: &[DesiredInterface]) -> Result<()> {
        let macs: BTreeSet<MacAddress> = desired
            .iter()
            .filter_map(|d| d.mac)
            .chain(self.managed.0.keys().copied())
            .collect();
        for mac in macs {
            if !self.enis.contains_key(&mac) || self.stale.contains(&mac) {
                self.look_up(mac, desired).await?;
            }
        }
        // Addresses that left the interfaces and are no longer on the ENI need no call.
        self.managed.forget_released(desired, &self.enis);

        let mut holders = BTreeMap::new();
        for (eni_id, addresses) in reconcile::missing_ipv6(desired, &self.enis) {
            let Some(ours) = self.found(&eni_id).cloned() else {
                continue;
            };
            holders.extend(self.ec2.ipv6_holders(&ours, &addresses).await?);
        }

        for change in reconcile::plan_changes(desired, &self.enis, &self.managed, &holders) {
            let addresses: Vec<String> =
                change.addresses().iter().map(ToString::to_string).collect();
            match self.ec2.apply(&change).await {
                Ok(()) => {
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
                            eni.apply(&change);
                        }
                    }
                }
                Err(e) => {
                    // Our picture of that ENI may be wrong now: read it again next time. A
                    // throttled call was not executed: the picture is still right, and a
                    // describe per retry would only add to the throttling (docs/scale.md).
                    for (mac, lookup) in &self.enis {
                        if !e.is_throttled()
                            && matches!(lookup, EniLookup::Found(eni) if eni.id == change.eni())
                        {
                            self.stale.insert(*mac);
                        }
                    }
                    tracing::warn!(
                        action = change.action(),
                        eni = change.eni(),
                        address = %addresses.join(","),
                        outcome = "failed",
                        error = %e,
                        "{change} failed"
                    );
                    return Err(e.into());
                }
            }
        }
        Ok(())
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
                self.throttled_backoff = backoff(RETRY_MIN, THROTTLED_RETRY_MAX);
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
                tracing::info!(
                    action = "readiness",
                    outcome = "ready",
                    "every managed address is on its ENI"
                );
            }
            Err(reason) => {
                let reason = reason.to_string();
                if self.last_not_ready.as_ref() != Some(&reason) {
                    tracing::info!(action = "readiness", outcome = "not_ready", reason = %reason, "not ready");
                    self.last_not_ready = Some(reason);
                }
            }
            Ok(()) => {}
        }
    }

    /// On SIGTERM: release what we manage that is still on our ENI, within the timeout.
    async fn shutdown(&mut self) {
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
        match tokio::time::timeout(timeout, self.release_with_retries()).await {
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
