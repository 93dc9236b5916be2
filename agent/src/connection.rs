//! One sidecar connection: read request lines, verify each claim against the caller's own
//! network namespace (peer pid from `SO_PEERCRED`, then `/proc/<pid>/ns/net`), hand the
//! verified claim to the node task, write its answers back.

use multus_eni_proto::{Answer, Request, VERSION, decode, encode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc::{self, UnboundedSender};

use crate::claims::{Claim, ConnId, verify_claim};
use crate::netns;
use crate::node::Event;

/// Serves one connection until it closes; always ends with [`Event::Disconnected`].
pub async fn serve(stream: UnixStream, conn: ConnId, events: UnboundedSender<Event>) {
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let (read, mut write) = stream.into_split();
    let (answers, mut outbox) = mpsc::unbounded_channel::<Answer>();
    let writer = tokio::spawn(async move {
        while let Some(answer) = outbox.recv().await {
            if write.write_all(encode(&answer).as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let error = |message: String| Answer::Error {
        v: VERSION,
        message,
    };
    let Some(pid) = pid.filter(|p| *p > 0) else {
        tracing::warn!(
            action = "connect",
            outcome = "refused",
            "peer credentials carry no pid (another pid namespace?): cannot verify the caller"
        );
        let _ = answers.send(error(
            "the agent cannot see the caller's pid (it needs hostPID)".into(),
        ));
        drop(answers);
        let _ = writer.await;
        return;
    };
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match decode::<Request>(&line) {
            Ok(Request::Claim {
                v: VERSION,
                seq,
                pod,
                namespace,
                interfaces,
            }) => {
                let (netns, seen) = match netns::read_pid(pid).await {
                    Ok(read) => read,
                    Err(e) => {
                        tracing::warn!(action = "claim", outcome = "failed", pid, error = %e, "cannot read the caller's network namespace");
                        let _ = answers.send(error(format!(
                            "cannot read the caller's network namespace: {e}"
                        )));
                        continue;
                    }
                };
                let (held, refused) = verify_claim(&interfaces, &seen);
                let pod = match (namespace, pod) {
                    (Some(ns), Some(p)) => format!("{ns}/{p}"),
                    (None, Some(p)) => p,
                    _ => format!("pid {pid}"),
                };
                let claim = Claim {
                    seq,
                    pod,
                    netns,
                    held,
                    refused,
                };
                let _ = events.send(Event::Claim {
                    conn,
                    answers: answers.clone(),
                    claim,
                });
            }
            Ok(Request::Release { v: VERSION }) => {
                let _ = events.send(Event::Release { conn });
                let _ = answers.send(Answer::Released { v: VERSION });
            }
            Ok(_) => {
                let _ = answers.send(error(format!(
                    "unsupported protocol version (this agent speaks {VERSION})"
                )));
            }
            Err(e) => {
                let _ = answers.send(error(format!("unreadable request: {e}")));
            }
        }
    }
    let _ = events.send(Event::Disconnected { conn });
    drop(answers);
    writer.abort();
}
