//! The sidecars connected to the agent: each pinned to its pod's network namespace at accept,
//! refused unless that namespace is one of the node's pods, bounded per pod, and told where
//! its pod's addresses stand whenever that changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use multus_eni_ec2::MacAddress;
use multus_eni_proto::{AddressState, Answer};
use tokio::sync::mpsc;

use crate::connection::{ClaimHint, ConnId, Peer};
use crate::metrics::{LimitLabels, Metrics, RefusalLabels};
use crate::plan::{self, Knowledge, NOT_HELD, NetnsId};
use crate::view::View;

/// A connected caller.
struct Caller {
    peer: Peer,
    /// Its namespace is one of the pods' (checked once the directory was read).
    verified: bool,
    claim: Option<(ClaimHint, Instant)>,
    /// What it was last told.
    last: Option<Answer>,
    /// When each address was first claimed, until it is routable.
    claimed_at: BTreeMap<IpAddr, Instant>,
}

/// Every connected caller.
pub struct Callers {
    metrics: Arc<Metrics>,
    max_per_pod: usize,
    by_id: BTreeMap<ConnId, Caller>,
    /// Pod namespaces whose sidecar connected (`--pods sidecar`).
    with_sidecar: BTreeSet<NetnsId>,
}

impl Callers {
    pub fn new(metrics: Arc<Metrics>, max_per_pod: usize) -> Self {
        Self {
            metrics,
            max_per_pod,
            by_id: BTreeMap::new(),
            with_sidecar: BTreeSet::new(),
        }
    }

    /// A new connection; refused at once past `--max-connections-per-pod`.
    pub fn connect(&mut self, conn: ConnId, peer: Peer, view: &View) {
        let same_pod = self
            .by_id
            .values()
            .filter(|c| c.peer.netns == peer.netns)
            .count();
        if same_pod >= self.max_per_pod {
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
                limit = self.max_per_pod,
                "too many connections from one pod namespace"
            );
            refuse(
                peer,
                format!(
                    "too many connections from this pod (--max-connections-per-pod={})",
                    self.max_per_pod
                ),
            );
            return;
        }
        let caller = Caller {
            peer,
            verified: false,
            claim: None,
            last: None,
            claimed_at: BTreeMap::new(),
        };
        self.by_id.insert(conn, caller);
        self.verify(view);
    }

    /// Refuses callers that are not in a pod namespace of `--netns-dir`, once the directory
    /// has been read (a caller that came first is checked then).
    pub fn verify(&mut self, view: &View) {
        if !view.dir_read {
            return;
        }
        let refused: Vec<ConnId> = self
            .by_id
            .iter()
            .filter(|(_, c)| !c.verified && view.pod_by_id(c.peer.netns).is_none())
            .map(|(id, _)| *id)
            .collect();
        for conn in refused {
            if let Some(c) = self.by_id.remove(&conn) {
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
        for c in self.by_id.values_mut().filter(|c| !c.verified) {
            c.verified = true;
            self.with_sidecar.insert(c.peer.netns);
        }
    }

    /// Records a claim; returns the caller's namespace, to look at again.
    pub fn claim(&mut self, conn: ConnId, hint: ClaimHint) -> Option<NetnsId> {
        let c = self.by_id.get_mut(&conn)?;
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
        Some(c.peer.netns)
    }

    /// The caller's namespace.
    pub fn netns_of(&self, conn: ConnId) -> Option<NetnsId> {
        self.by_id.get(&conn).map(|c| c.peer.netns)
    }

    pub fn remove(&mut self, conn: ConnId) {
        self.by_id.remove(&conn);
    }

    /// A pod namespace went away.
    pub fn pod_gone(&mut self, id: NetnsId) {
        self.with_sidecar.remove(&id);
    }

    /// Whether a sidecar of this pod namespace connected.
    pub fn has_sidecar(&self, id: NetnsId) -> bool {
        self.with_sidecar.contains(&id)
    }

    /// The MACs claimed by sidecars.
    pub fn claimed_macs(&self) -> BTreeSet<MacAddress> {
        self.by_id
            .values()
            .filter_map(|c| c.claim.as_ref())
            .flat_map(|(h, _)| h.interfaces.iter())
            .filter_map(|i| multus_eni_ec2::node::parse_mac(&i.mac))
            .collect()
    }

    /// Sends each verified caller its status when it changed; one that does not read its
    /// answers (`--max-queued-answers`) is closed.
    pub fn answer(&mut self, view: &View, k: &Knowledge<'_>) {
        let mut closed = Vec::new();
        for (id, c) in self.by_id.iter_mut().filter(|(_, c)| c.verified) {
            let Some((hint, at)) = &c.claim else {
                continue;
            };
            let pod = view.pod_by_id(c.peer.netns);
            let answer = plan::claim_status(hint.v, hint.seq, &hint.interfaces, *at, pod, k);
            if c.last.as_ref() == Some(&answer) {
                continue;
            }
            observe(&self.metrics, c, &answer, k.now);
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
                    closed.push(*id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => closed.push(*id),
            }
        }
        for id in closed {
            self.by_id.remove(&id);
        }
    }
}

/// Counts what a new answer tells: a newly refused address, the time to routable.
fn observe(metrics: &Metrics, c: &mut Caller, answer: &Answer, now: Instant) {
    let Answer::Status { addresses, .. } = answer else {
        return;
    };
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
            metrics
                .refusals
                .get_or_create(&RefusalLabels { reason: "not_held" })
                .inc();
        }
        if a.state == AddressState::Routable
            && let Some(since) = c.claimed_at.remove(&a.address)
        {
            metrics
                .claim_to_routable
                .observe(now.duration_since(since).as_secs_f64());
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
