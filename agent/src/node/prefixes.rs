//! The node task's hooks for prefix mode (`--prefix-ranges`): planning, sending and recording
//! the prefix calls. The decisions are [`crate::prefix`]'s; this is only the wiring, kept out of
//! `node.rs` so the address path reads as before.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

use multus_eni_ec2::eni::{ErrorKind, PrefixOutcome};

use super::{Event, Node};
use crate::plan;
use crate::prefix::WantedPrefixes;
use crate::status::PrefixRow;

// === impl Node (prefix mode) ===

impl Node {
    /// Queues the prefix calls for what the pods want (after [`crate::prefix::take_ranged`]
    /// took their addresses out of the per-address plan).
    pub(super) fn plan_prefixes(&mut self, wanted: WantedPrefixes) {
        let Some(enis) = &self.enis else {
            return;
        };
        // Every address on the node, pods not managed, the host and addresses in DAD
        // included: a prefix with one of them inside is in use.
        let held: BTreeSet<IpAddr> = plan::held(
            self.view
                .host
                .iter()
                .chain(self.view.pods.values().flat_map(|p| p.interfaces.iter())),
        );
        let changed = self.prefixes.plan(
            wanted,
            enis,
            &held,
            self.view.complete(),
            self.config.reclaim_unowned,
            Instant::now(),
        );
        if changed {
            self.save_checkpoint();
        }
    }

    /// Sends the queued prefix calls, one task per ENI (the caller checked the node's backoff).
    pub(super) fn dispatch_prefixes(&mut self) {
        let unsure = &self.unsure;
        for (eni, changes) in self.prefixes.take_ready(|e| unsure.contains_key(e)) {
            for c in &changes {
                tracing::info!(action = c.action(), eni = %eni, prefixes = ?c.prefixes(), "sending prefix call");
            }
            let ec2 = self.ec2.clone();
            let events = self.events.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for change in changes {
                    let parts = ec2.apply_prefixes(&change).await;
                    let stop = parts
                        .iter()
                        .any(|o| matches!(&o.result, Err(e) if e.kind != ErrorKind::Rejected));
                    outcomes.extend(parts);
                    if stop {
                        // The node backs off first; the rest is planned again.
                        break;
                    }
                }
                let _ = events.send(Event::PrefixCalled { eni, outcomes });
            });
        }
    }

    /// An ENI's prefix calls returned.
    pub(super) fn on_prefix_called(&mut self, eni: &str, outcomes: Vec<PrefixOutcome>) {
        let mut unsure = false;
        for o in &outcomes {
            match &o.result {
                Ok(()) => {
                    self.health.prefix_success(o.change.action());
                    tracing::info!(action = o.change.action(), outcome = "success", eni = %eni, prefixes = ?o.change.prefixes(), "prefix call applied");
                }
                Err(e) => {
                    self.health.prefix_failure(e.action, e);
                    if e.kind == ErrorKind::Rejected {
                        tracing::warn!(action = o.change.action(), outcome = "refused", eni = %eni, prefixes = ?o.change.prefixes(), error = %e.message, "EC2 refused the prefix: never forced, retried with backoff");
                    } else {
                        tracing::warn!(action = o.change.action(), outcome = %e.kind, eni = %eni, error = %e.message, hint = e.kind.hint(), "prefix call failed; planned again");
                        self.retry_later(e.kind);
                        if e.kind == ErrorKind::Timeout {
                            // EC2 may have carried it out: nothing more for this ENI until a
                            // read that started after now says what it holds.
                            unsure = true;
                        }
                    }
                }
            }
        }
        let done = self.prefixes.done(
            eni,
            &outcomes,
            self.enis.as_mut(),
            self.reading,
            Instant::now(),
        );
        if done.checkpoint {
            self.save_checkpoint();
        }
        if unsure {
            self.unsure_of(eni);
        } else if done.read {
            self.read();
        }
    }

    /// The prefixes for `status`; sets the gauge.
    pub(super) fn prefix_rows(&self) -> Vec<PrefixRow> {
        let Some(enis) = &self.enis else {
            return Vec::new();
        };
        let rows: Vec<PrefixRow> = self
            .prefixes
            .rows(enis)
            .into_iter()
            .map(|(eni, prefix, state)| PrefixRow { eni, prefix, state })
            .collect();
        let on_enis = enis
            .values()
            .filter(|e| e.no_manage)
            .map(|e| e.prefixes().count())
            .sum::<usize>();
        self.metrics.prefixes.set(on_enis as i64);
        rows
    }
}
