//! One sidecar connection. The caller is pinned at accept: its network namespace is read from
//! `/proc/<pid>/ns/net` of the socket's peer then (`SO_PEERCRED`), never resolved again, and
//! the node task checks that it is one of the pod namespaces under `--netns-dir`. Every line is
//! bounded (`--max-line-bytes`), every answer queue too (`--max-queued-answers`), and a claim is
//! read only after the node task took the previous one: a caller that floods the socket slows
//! only itself.

use std::fs::File;

use futures::StreamExt;
use multus_eni_proto::{Answer, InterfaceClaim, Request, answer_version, decode, encode};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

/// The read buffer a connection starts with.
const READ_BUFFER: usize = 1024;

use crate::metrics::{LimitLabels, Metrics, RefusalLabels};
use crate::node::Event;
use crate::plan::NetnsId;
use crate::watch::netns_id;

/// A sidecar connection, numbered by the agent.
pub type ConnId = u64;

/// The bounds of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_line_bytes: usize,
    pub max_queued_answers: usize,
}

/// What the node task holds of a connection: where its answers go, and how to end it.
#[derive(Debug)]
pub struct Peer {
    pub netns: NetnsId,
    pub pid: i32,
    pub answers: mpsc::Sender<Answer>,
    /// Dropping it closes the connection.
    pub close: oneshot::Sender<()>,
}

/// A claim as the sidecar sent it: a hint that makes the agent look at its namespace.
#[derive(Debug, Clone)]
pub struct ClaimHint {
    pub v: u32,
    pub seq: u64,
    pub pod: Option<String>,
    pub interfaces: Vec<InterfaceClaim>,
}

/// Serves one connection until it closes; always ends with [`Event::Disconnected`] once the
/// node task knows of it.
pub async fn serve(
    stream: UnixStream,
    conn: ConnId,
    limits: Limits,
    metrics: std::sync::Arc<Metrics>,
    events: mpsc::UnboundedSender<Event>,
    _permit: OwnedSemaphorePermit,
) {
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .filter(|p| *p > 0);
    let netns = pid.map(|pid| File::open(format!("/proc/{pid}/ns/net")).and_then(|f| netns_id(&f)));
    let (read, write) = stream.into_split();
    // Small buffers: thousands of idle connections must cost little (a sidecar's claim is a
    // few hundred bytes; the buffer grows for a longer line, up to --max-line-bytes).
    let mut lines = FramedRead::with_capacity(
        read,
        LinesCodec::new_with_max_length(limits.max_line_bytes),
        READ_BUFFER,
    );
    let mut write = write;
    let (pid, netns) = match (pid, netns) {
        (Some(pid), Some(Ok(netns))) => (pid, netns),
        (pid, netns) => {
            let why = match (pid, netns) {
                (None, _) => "the agent cannot see the caller's pid (another pid namespace): only pods of this node may connect".to_string(),
                (_, Some(Err(e))) => format!("cannot read the caller's network namespace: {e}"),
                _ => "no network namespace".to_string(),
            };
            metrics
                .refusals
                .get_or_create(&RefusalLabels {
                    reason: "not_a_pod",
                })
                .inc();
            if first_in_a_while() {
                tracing::warn!(action = "connect", outcome = "refused", reason = %why, "refused a caller (logged once a minute)");
            }
            let _ = write
                .write_all(encode(&error_answer(multus_eni_proto::VERSION, why)).as_bytes())
                .await;
            return;
        }
    };
    let (answers, mut outbox) = mpsc::channel::<Answer>(limits.max_queued_answers.max(1));
    let (close, mut closed) = oneshot::channel();
    let own_answers = answers.clone();
    if events
        .send(Event::Connected {
            conn,
            peer: Peer {
                netns,
                pid,
                answers,
                close,
            },
        })
        .is_err()
    {
        return;
    }
    let mut writer = tokio::spawn(async move {
        while let Some(answer) = outbox.recv().await {
            if write.write_all(encode(&answer).as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let reader = async {
        loop {
            let text = match lines.next().await {
                Some(Ok(text)) => text,
                Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                    metrics
                        .limit_hits
                        .get_or_create(&LimitLabels {
                            limit: "line_length",
                        })
                        .inc();
                    tracing::warn!(
                        action = "connect",
                        outcome = "closed",
                        conn,
                        pid,
                        limit = limits.max_line_bytes,
                        "a line longer than --max-line-bytes: closing the connection"
                    );
                    let _ = own_answers.try_send(error_answer(
                        multus_eni_proto::VERSION,
                        format!("line longer than {} bytes", limits.max_line_bytes),
                    ));
                    return;
                }
                Some(Err(_)) | None => return,
            };
            match decode::<Request>(&text) {
                Ok(Request::Claim {
                    v,
                    seq,
                    pod,
                    namespace,
                    interfaces,
                }) => {
                    let Some(v) = answer_version(v) else {
                        let _ = own_answers.try_send(unsupported(v));
                        continue;
                    };
                    let pod = match (namespace, pod) {
                        (Some(ns), Some(p)) => Some(format!("{ns}/{p}")),
                        (_, p) => p,
                    };
                    let (done, taken) = oneshot::channel();
                    let hint = ClaimHint {
                        v,
                        seq,
                        pod,
                        interfaces,
                    };
                    if events.send(Event::Claim { conn, hint, done }).is_err() {
                        return;
                    }
                    // Backpressure: the next line is read once the node task took this one.
                    let _ = taken.await;
                }
                Ok(Request::Release { v }) => match answer_version(v) {
                    Some(v) => {
                        let (done, taken) = oneshot::channel();
                        if events.send(Event::Release { conn, done }).is_err() {
                            return;
                        }
                        let _ = own_answers.try_send(Answer::Released { v });
                        // The same backpressure as a claim: a flood of releases slows only
                        // this connection.
                        let _ = taken.await;
                    }
                    None => {
                        let _ = own_answers.try_send(unsupported(v));
                    }
                },
                Err(e) => {
                    let _ = own_answers.try_send(error_answer(
                        multus_eni_proto::VERSION,
                        format!("unreadable request: {e}"),
                    ));
                }
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = &mut closed => {}
    }
    drop(own_answers);
    let _ = events.send(Event::Disconnected { conn });
    // What is queued (an error, the `released`) still goes out, for a bounded time.
    if tokio::time::timeout(std::time::Duration::from_secs(1), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Whether a refusal of a caller the agent cannot identify is worth a log line now: such a
/// caller is counted every time but logged once a minute.
fn first_in_a_while() -> bool {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(60)) {
        return false;
    }
    *last = Some(now);
    true
}

fn error_answer(v: u32, message: String) -> Answer {
    Answer::Error { v, message }
}

fn unsupported(v: u32) -> Answer {
    error_answer(
        multus_eni_proto::VERSION,
        format!(
            "unsupported protocol version {v}: this agent speaks {} to {}",
            multus_eni_proto::OLDEST_VERSION,
            multus_eni_proto::VERSION
        ),
    )
}
