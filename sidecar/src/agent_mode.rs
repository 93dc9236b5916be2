//! Agent mode (`--agent-socket`): the sidecar stays the pod's eyes and startup gate, the
//! node agent makes the EC2 calls. The sidecar tells the agent which addresses the pod
//! holds (every change, as a full claim), and `/readyz` follows the agent's answer for the
//! latest claim. No EC2 client, no AWS credentials, no TLS on this path.
//!
//! While the agent is unreachable `/readyz` answers 503 and the sidecar reconnects with
//! backoff, then claims again: an agent restart costs a ready pod only the time the agent
//! takes to come back and re-read its ENIs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use multus_eni_proto::{AddressState, Answer, InterfaceClaim, Request, VERSION, decode, encode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::Instrument;

use crate::addresses::{AddressWatcher, InterfaceTable, apply_events};
use crate::cli::RunArgs;
use crate::probe;
use crate::sleep_until;
use crate::{Error, Result};

/// First wait before reconnecting to the agent; doubles (with jitter) to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two connection attempts: a restarted agent is found within ~1 s.
pub const RECONNECT_MAX: Duration = Duration::from_secs(1);

fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN)
        .with_max_delay(RECONNECT_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The claim for the current interface table.
pub fn claim_of(table: &InterfaceTable, seq: u64) -> Request {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Request::Claim {
        v: VERSION,
        seq,
        pod: env("POD_NAME"),
        namespace: env("POD_NAMESPACE"),
        interfaces: table
            .desired()
            .into_iter()
            .filter_map(|d| {
                Some(InterfaceClaim {
                    mac: d.mac?.to_string(),
                    name: d.name,
                    addresses: d.addresses.into_iter().collect(),
                })
            })
            .collect(),
    }
}

/// Whether the pod may start: every named interface exists, no address is still in DAD,
/// and the agent says the latest claim is routable.
pub fn pod_ready(table: &InterfaceTable, agent_routable: bool) -> bool {
    agent_routable
        && table.missing().is_empty()
        && table.desired().iter().all(|d| d.tentative.is_empty())
}

/// A live connection to the agent.
struct AgentConnection {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl AgentConnection {
    async fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path).await?;
        let (read, write) = stream.into_split();
        Ok(Self {
            lines: BufReader::new(read).lines(),
            write,
        })
    }

    async fn send(&mut self, request: &Request) -> std::io::Result<()> {
        self.write.write_all(encode(request).as_bytes()).await
    }
}

/// Runs agent mode until SIGTERM (or SIGINT), then says "release" and returns.
pub async fn run(args: RunArgs, socket: PathBuf) -> Result<()> {
    let span = crate::pod_span();
    async move {
        let readiness = probe::serve(args.probe_addr).await?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
        tracing::info!(
            action = "start",
            mode = "agent",
            interfaces = %args.interfaces.join(","),
            agent_socket = %socket.display(),
            probe_addr = %args.probe_addr,
            "managing the addresses of the named interfaces through the node agent"
        );
        let mut watcher = AddressWatcher::subscribe()?;
        let mut table = InterfaceTable::new(args.interfaces.clone());
        watcher.dump(&mut table).await?;

        let mut seq: u64 = 1;
        let mut routable = false;
        let mut connection: Option<AgentConnection> = None;
        let mut backoff = reconnect_backoff();
        let mut reconnect_at: Option<Instant> = Some(Instant::now());
        let mut warned_unreachable = false;
        loop {
            if connection.is_none() && reconnect_at.is_some_and(|t| t <= Instant::now()) {
                reconnect_at = None;
                match AgentConnection::connect(&socket).await {
                    Ok(mut c) => match c.send(&claim_of(&table, seq)).await {
                        Ok(()) => {
                            tracing::info!(action = "connect", outcome = "success", "connected to the node agent; claimed");
                            connection = Some(c);
                            backoff = reconnect_backoff();
                            warned_unreachable = false;
                        }
                        Err(e) => {
                            tracing::warn!(action = "connect", outcome = "failed", error = %e, "agent closed the connection");
                            reconnect_at = Some(Instant::now() + backoff.next().unwrap_or(RECONNECT_MAX));
                        }
                    },
                    Err(e) => {
                        if !warned_unreachable {
                            tracing::warn!(action = "connect", outcome = "unreachable", error = %e, "node agent unreachable; retrying");
                            warned_unreachable = true;
                        }
                        reconnect_at = Some(Instant::now() + backoff.next().unwrap_or(RECONNECT_MAX));
                    }
                }
            }
            let ready = connection.is_some() && pod_ready(&table, routable);
            if ready != readiness.get() {
                tracing::info!(action = "readiness", ready, "readiness changed");
                readiness.set(ready);
            }
            let retry_at = reconnect_at;
            tokio::select! {
                biased;
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                event = watcher.next_event() => {
                    let changed = apply_events(&mut watcher, &mut table, event).await?;
                    if changed {
                        seq += 1;
                        routable = false;
                        if let Some(c) = connection.as_mut()
                            && let Err(e) = c.send(&claim_of(&table, seq)).await
                        {
                            tracing::warn!(action = "claim", outcome = "failed", error = %e, "lost the agent; reconnecting");
                            connection = None;
                            reconnect_at = Some(Instant::now());
                        }
                    }
                }
                line = next_line(&mut connection) => match line {
                    Some(line) => match decode::<Answer>(&line) {
                        Ok(Answer::Status { seq: s, routable: r, addresses, .. }) if s == seq => {
                            if r != routable {
                                for a in addresses.iter().filter(|a| !a.state.lets_pod_start()) {
                                    tracing::info!(action = "status", interface = %a.interface, address = %a.address, state = ?a.state, eni = ?a.eni, reason = ?a.reason, "address not routable yet");
                                }
                            }
                            for a in addresses.iter().filter(|a| a.state == AddressState::Refused) {
                                tracing::warn!(action = "status", outcome = "refused", interface = %a.interface, address = %a.address, eni = ?a.eni, reason = ?a.reason, "the agent refused an address");
                            }
                            routable = r;
                        }
                        Ok(Answer::Status { .. } | Answer::Released { .. }) => {}
                        Ok(Answer::Error { message, .. }) => {
                            tracing::warn!(action = "claim", outcome = "agent_error", error = %message, "the agent could not use the claim");
                        }
                        Err(e) => tracing::warn!(action = "claim", outcome = "unreadable", error = %e, "unreadable answer from the agent"),
                    },
                    None => {
                        tracing::warn!(action = "connect", outcome = "lost", "connection to the node agent lost; reconnecting");
                        connection = None;
                        routable = false;
                        reconnect_at = Some(Instant::now() + backoff.next().unwrap_or(RECONNECT_MAX));
                    }
                },
                _ = sleep_until(retry_at), if retry_at.is_some() => {}
            }
        }
        readiness.set(false);
        if args.release_on_exit {
            release(&socket, connection, args.shutdown_timeout).await;
        }
        Ok(())
    }
    .instrument(span)
    .await
}

async fn next_line(connection: &mut Option<AgentConnection>) -> Option<String> {
    match connection {
        Some(c) => c.lines.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// Says "release" and waits for the agent's acknowledgement (bounded by `timeout`).
async fn release(socket: &Path, connection: Option<AgentConnection>, timeout: Duration) {
    let attempt = async {
        let mut c = match connection {
            Some(c) => c,
            None => AgentConnection::connect(socket).await?,
        };
        c.send(&Request::Release { v: VERSION }).await?;
        while let Some(line) = c.lines.next_line().await? {
            if let Ok(Answer::Released { .. }) = decode::<Answer>(&line) {
                return Ok(());
            }
        }
        Err(std::io::Error::other("the agent closed the connection"))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => tracing::info!(
            action = "release",
            outcome = "success",
            "the agent took over the release"
        ),
        Ok(Err(e)) => {
            tracing::warn!(action = "release", outcome = "failed", error = %e, "release not acknowledged; the agent reclaims the addresses once the pod is gone")
        }
        Err(_) => tracing::warn!(
            action = "release",
            outcome = "timeout",
            "release not acknowledged in time; the agent reclaims the addresses once the pod is gone"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_claims_nothing_and_is_not_ready_while_interfaces_are_missing() {
        let table = InterfaceTable::new(vec!["net1".into()]);
        match claim_of(&table, 7) {
            Request::Claim {
                seq, interfaces, ..
            } => {
                assert_eq!(seq, 7);
                assert!(interfaces.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(!pod_ready(&table, true));
        assert!(pod_ready(&InterfaceTable::new(vec![]), true));
        assert!(!pod_ready(&InterfaceTable::new(vec![]), false));
    }
}
