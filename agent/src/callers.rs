//! The sidecars connected to the agent: each pinned to its pod's network namespace at accept,
//! refused unless that namespace is one of the node's pods, bounded per pod, and told where
//! its pod's addresses stand whenever that changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use multus_eni_proto::{AddressState, Answer};
use tokio::sync::mpsc;

use crate::connection::{ClaimHint, ConnId, Peer};
use crate::metrics::{LimitLabels, Metrics, ProtocolLabels, RefusalLabels};
use crate::plan::{self, Knowledge, NOT_HELD, NOT_NO_MANAGE, NetnsId, PRIMARY};
use crate::view::View;

/// A connected caller.
struct Caller {
    peer: Peer,
    /// Its namespace is one of the pods' (checked once the directory was read).
    verified: bool,
    /// When it connected: a caller whose namespace the watcher has not read yet is held until
    /// [`UNKNOWN_CALLER_WAIT`] after this, not refused at once.
    connected_at: Instant,
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
    /// When a refusal of each namespace was last logged: a caller that reconnects in a loop
    /// is counted every time but logged once a minute.
    logged: BTreeMap<NetnsId, Instant>,
}

/// How long a refused namespace stays quiet in the log.
const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a caller whose namespace is no pod namespace the agent has read is held before it
/// is refused: a sidecar may connect before the watcher read its pod's new entry (the runtime
/// creates the file, then mounts the namespace on it; opening it is retried for ~3 s).
pub const UNKNOWN_CALLER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Callers {
    pub fn new(metrics: Arc<Metrics>, max_per_pod: usize) -> Self {
        Self {
            metrics,
            max_per_pod,
            by_id: BTreeMap::new(),
            with_sidecar: BTreeSet::new(),
            logged: BTreeMap::new(),
        }
    }

    /// A new connection; refused at once past `--max-connections-per-pod`.
    pub fn connect(&mut self, conn: ConnId, peer: Peer, view: &View, now: Instant) {
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
            if self.first_in_a_while(peer.netns, now) {
                tracing::warn!(
                    action = "connect",
                    outcome = "refused",
                    conn,
                    pid = peer.pid,
                    limit = self.max_per_pod,
                    "too many connections from one pod namespace (logged once a minute)"
                );
            }
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
            connected_at: now,
            claim: None,
            last: None,
            claimed_at: BTreeMap::new(),
        };
        self.by_id.insert(conn, caller);
        self.verify(view, now);
    }

    /// Accepts callers in a pod namespace of `--netns-dir`; refuses the others once the
    /// directory has been read and they waited [`UNKNOWN_CALLER_WAIT`] for their namespace to
    /// be read (a caller that came first is checked then).
    pub fn verify(&mut self, view: &View, now: Instant) {
        for c in self
            .by_id
            .values_mut()
            .filter(|c| !c.verified && view.pod_by_id(c.peer.netns).is_some())
        {
            c.verified = true;
            self.with_sidecar.insert(c.peer.netns);
        }
        if !view.dir_read {
            return;
        }
        let refused: Vec<ConnId> = self
            .by_id
            .iter()
            .filter(|(_, c)| !c.verified && now >= c.connected_at + UNKNOWN_CALLER_WAIT)
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
                if self.first_in_a_while(c.peer.netns, now) {
                    tracing::warn!(
                        action = "connect",
                        outcome = "refused",
                        conn,
                        pid = c.peer.pid,
                        "the caller's network namespace is not a pod namespace under --netns-dir (the host's, or one the agent does not list); logged once a minute"
                    );
                }
                refuse(
                    c.peer,
                    "the caller's network namespace is not a pod network namespace of this node (--netns-dir)".into(),
                );
            }
        }
    }

    /// When the first held caller's wait ends (`None`: none is held).
    pub fn verify_due(&self) -> Option<Instant> {
        self.by_id
            .values()
            .filter(|c| !c.verified)
            .map(|c| c.connected_at + UNKNOWN_CALLER_WAIT)
            .min()
    }

    /// Whether a refusal of `netns` is worth a log line at `now`.
    fn first_in_a_while(&mut self, netns: NetnsId, now: Instant) -> bool {
        self.logged
            .retain(|_, t| now.duration_since(*t) < LOG_EVERY);
        match self.logged.entry(netns) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(now);
                true
            }
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

    /// Publishes how many verified sidecars speak each protocol version.
    pub fn count_versions(&self) {
        for v in multus_eni_proto::OLDEST_VERSION..=multus_eni_proto::VERSION {
            let n = self
                .by_id
                .values()
                .filter(|c| c.verified && c.claim.as_ref().is_some_and(|(h, _)| h.v == v))
                .count();
            self.metrics
                .sidecars
                .get_or_create(&ProtocolLabels { protocol: v })
                .set(n as i64);
        }
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
        // Refusals decided from the claim alone are counted here; those of the node's own
        // plan (`held_by_not_no_manage`, `not_this_instance`) where it decides them.
        let label = match a.reason.as_deref() {
            Some(NOT_HELD) => Some("not_held"),
            Some(NOT_NO_MANAGE) => Some("not_no_manage"),
            Some(PRIMARY) => Some("primary"),
            _ => None,
        };
        if let Some(reason) = label
            && a.state == AddressState::Refused
            && was != Some(AddressState::Refused)
        {
            metrics
                .refusals
                .get_or_create(&RefusalLabels { reason })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PodNetns;
    use crate::watch::Seen;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn peer(ino: u64) -> (Peer, mpsc::Receiver<Answer>, oneshot::Receiver<()>) {
        let (answers, rx) = mpsc::channel(4);
        let (close, closed) = oneshot::channel();
        let peer = Peer {
            netns: NetnsId { dev: 4, ino },
            pid: 100,
            answers,
            close,
        };
        (peer, rx, closed)
    }

    fn refusals(metrics: &Metrics, reason: &'static str) -> u64 {
        metrics
            .refusals
            .get_or_create(&RefusalLabels { reason })
            .get()
    }

    #[test]
    fn only_callers_in_a_pod_namespace_are_kept_and_refusals_are_logged_once_a_minute() {
        let metrics = Arc::new(Metrics::new());
        let mut callers = Callers::new(metrics.clone(), 1);
        let mut view = View::default();
        view.apply(Seen::Pod(PodNetns {
            name: "cni-1".into(),
            id: NetnsId { dev: 4, ino: 1 },
            interfaces: Vec::new(),
            read_at: Instant::now(),
        }));
        let t0 = Instant::now();
        // Before the directory was read, nobody is judged.
        let (stranger, mut answers, mut closed) = peer(9);
        callers.connect(1, stranger, &view, t0);
        assert!(
            closed
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        view.apply(Seen::DirRead {
            names: ["cni-1".to_string()].into(),
        });
        // Its namespace may be a pod's whose entry was not read yet: held, not refused.
        callers.verify(&view, t0 + UNKNOWN_CALLER_WAIT / 2);
        assert!(answers.try_recv().is_err(), "refused before its wait ended");
        assert_eq!(callers.verify_due(), Some(t0 + UNKNOWN_CALLER_WAIT));
        callers.verify(&view, t0 + UNKNOWN_CALLER_WAIT);
        assert!(matches!(answers.try_recv(), Ok(Answer::Error { .. })));
        assert!(
            closed
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(refusals(&metrics, "not_a_pod"), 1);
        let (again, _answers, _closed) = peer(9);
        let t1 = t0 + UNKNOWN_CALLER_WAIT;
        callers.connect(2, again, &view, t1);
        callers.verify(&view, t1 + UNKNOWN_CALLER_WAIT);
        assert_eq!(refusals(&metrics, "not_a_pod"), 2, "counted every time");
        let stranger = NetnsId { dev: 4, ino: 9 };
        assert!(
            !callers.first_in_a_while(stranger, t1 + LOG_EVERY - Duration::from_secs(1)),
            "logged once within a minute"
        );
        assert!(
            callers.first_in_a_while(stranger, t1 + LOG_EVERY),
            "logged again after a minute"
        );
        assert!(!callers.first_in_a_while(stranger, t1 + LOG_EVERY));

        let (pod, _answers, mut pod_closed) = peer(1);
        callers.connect(3, pod, &view, t1);
        assert_eq!(callers.netns_of(3), Some(NetnsId { dev: 4, ino: 1 }));
        assert!(callers.has_sidecar(NetnsId { dev: 4, ino: 1 }));
        assert!(
            pod_closed
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        // --max-connections-per-pod=1: a second connection from the same pod is refused.
        let (second, mut second_answers, _c) = peer(1);
        callers.connect(4, second, &view, t1);
        assert!(matches!(
            second_answers.try_recv(),
            Ok(Answer::Error { .. })
        ));
        assert_eq!(callers.netns_of(4), None);
        assert_eq!(
            metrics
                .limit_hits
                .get_or_create(&LimitLabels {
                    limit: "connections_per_pod"
                })
                .get(),
            1
        );
    }
}

#[cfg(test)]
mod answer_tests {
    use super::*;
    use crate::plan::{InstanceEnis, PodNetns, Wanted};
    use crate::watch::Seen;
    use multus_eni_proto::InterfaceClaim;
    use tokio::sync::oneshot;

    #[test]
    fn a_caller_that_does_not_read_its_answers_is_disconnected() {
        let metrics = Arc::new(Metrics::new());
        let mut callers = Callers::new(metrics.clone(), 8);
        let id = NetnsId { dev: 4, ino: 1 };
        let mut view = View::default();
        view.apply(Seen::Pod(PodNetns {
            name: "cni-1".into(),
            id,
            interfaces: Vec::new(),
            read_at: Instant::now(),
        }));
        view.apply(Seen::DirRead {
            names: ["cni-1".to_string()].into(),
        });
        // Room for one answer, never read.
        let (answers, _unread) = mpsc::channel(1);
        let (close, mut closed) = oneshot::channel();
        callers.connect(
            1,
            Peer {
                netns: id,
                pid: 7,
                answers,
                close,
            },
            &view,
            Instant::now(),
        );
        let (enis, foreign) = (InstanceEnis::new(), BTreeMap::new());
        let (wanted, rejected, conflicts) = (
            Wanted::default(),
            crate::retry::RetryBook::default(),
            crate::conflict::Conflicts::default(),
        );
        let k = Knowledge {
            instance_id: "i-1",
            enis: &enis,
            foreign: &foreign,
            ignored: &[],
            wanted: &wanted,
            rejected: &rejected,
            conflicts: &conflicts,
            prefixes: &crate::prefix::PrefixBook::default(),
            now: Instant::now(),
        };
        for seq in 1..=2 {
            let hint = ClaimHint {
                v: 2,
                seq,
                pod: None,
                interfaces: vec![InterfaceClaim {
                    name: "net1".into(),
                    mac: "0e:00:00:00:00:01".into(),
                    addresses: vec![IpAddr::from([10, 0, 1, seq as u8])],
                }],
            };
            callers.claim(1, hint);
            callers.count_versions();
            let connected = metrics
                .sidecars
                .get_or_create(&ProtocolLabels { protocol: 2 })
                .get();
            assert_eq!(connected, 1, "counted while connected");
            callers.answer(&view, &k);
        }
        assert_eq!(callers.netns_of(1), None, "still connected");
        callers.count_versions();
        let connected = metrics
            .sidecars
            .get_or_create(&ProtocolLabels { protocol: 2 })
            .get();
        assert_eq!(connected, 0);
        assert!(
            closed
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        let hits = metrics
            .limit_hits
            .get_or_create(&LimitLabels {
                limit: "queued_answers",
            })
            .get();
        assert_eq!(hits, 1);
    }
}
