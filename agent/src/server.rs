//! The agent's wiring: the instance id, the Unix socket, the HTTP listener, the watcher, the
//! resync timer, the node task and the signals that end them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use multus_eni_ec2::eni::Ec2;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::checkpoint::Checkpoint;
use crate::cli::RunArgs;
use crate::connection::Limits;
use crate::http::HttpLimits;
use crate::metrics::{self, LimitLabels, Metrics};
use crate::node::{Event, Node, NodeConfig};
use crate::status::{self, NodeStatus};
use crate::{Error, Result};

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    let node_name = std::env::var("NODE_NAME").unwrap_or_default();
    let instance_id = match &args.instance_id {
        Some(id) => id.clone(),
        None => multus_eni_ec2::node::instance_id_from_imds()
            .await
            .map_err(Error::InstanceId)?,
    };
    let metrics = Arc::new(Metrics::new());
    let checkpoint_path = Checkpoint::path(&args.state_dir);
    let checkpoint = Checkpoint::load(&checkpoint_path).unwrap_or_else(|e| {
        tracing::error!(action = "checkpoint", outcome = "unreadable", path = %checkpoint_path.display(), error = %e, "starting without the checkpoint: a conflict from before the restart is seen as a first move");
        Checkpoint::default()
    });
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let http = crate::http::bind(args.metrics_addr)
        .map_err(|e| Error::io(format!("binding {}", args.metrics_addr), e))?;
    let (listener, socket_id) = bind_socket(&args.socket)?;
    tracing::info!(
        action = "start",
        node = %node_name,
        instance = %instance_id,
        pods = ?args.pods,
        socket = %args.socket.display(),
        metrics_addr = %args.metrics_addr,
        netns_dir = %args.netns_dir.display(),
        "watching the node"
    );
    let (status_tx, status_rx) = watch::channel(Arc::new(NodeStatus {
        instance_id: instance_id.clone(),
        ..NodeStatus::default()
    }));
    let router = metrics::router(metrics.clone()).merge(status::router(
        status_rx,
        args.max_long_polls,
        metrics.clone(),
    ));
    let http_limits = HttpLimits {
        max_connections: args.max_http_connections,
        header_timeout: args.http_header_timeout,
    };
    tokio::spawn(crate::http::serve(
        http,
        router,
        http_limits,
        metrics.clone(),
    ));
    let ec2 = Arc::new(Ec2::from_env().await);
    let (events, inbox) = mpsc::unbounded_channel();
    let seen = events.clone();
    let watch = crate::watch::spawn(
        args.netns_dir.clone(),
        args.max_netns_reads,
        metrics.clone(),
        move |s| {
            let _ = seen.send(Event::Seen(s));
        },
    );
    let node = Node::new(
        ec2,
        metrics.clone(),
        NodeConfig {
            instance_id,
            pods: args.pods,
            checkpoint: checkpoint_path,
            reclaim_after: args.reclaim_after,
            batch_interval: args.batch_interval,
            max_connections_per_pod: args.max_connections_per_pod,
            reclaim_unowned: args.reclaim_unowned,
            ignored: args.ignore_cidrs.clone(),
            max_mac_lookups: args.max_mac_lookups,
            auth_backoff: args.auth_backoff,
            prefix_ranges: args.prefix_ranges.clone(),
            prefix_release_after: args.prefix_release_after,
        },
        checkpoint,
        events.clone(),
        watch,
        status_tx,
    );
    let node = tokio::spawn(node.run(inbox));
    let accept_events = events.clone();
    let limits = Limits {
        max_line_bytes: args.max_line_bytes,
        max_queued_answers: args.max_queued_answers,
    };
    let connections = Arc::new(Semaphore::new(args.max_connections.max(1)));
    tokio::spawn(async move {
        let mut next: u64 = 0;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        metrics
                            .limit_hits
                            .get_or_create(&LimitLabels {
                                limit: "connections",
                            })
                            .inc();
                        tracing::warn!(
                            action = "accept",
                            outcome = "refused",
                            "--max-connections reached: closing a new connection"
                        );
                        drop(stream);
                        continue;
                    };
                    next += 1;
                    tokio::spawn(crate::connection::serve(
                        stream,
                        next,
                        limits,
                        metrics.clone(),
                        accept_events.clone(),
                        permit,
                    ));
                }
                Err(e) => {
                    tracing::warn!(action = "accept", outcome = "failed", error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    let period = args.resync_interval;
    tokio::spawn(async move {
        // The first tick is immediate: the instance's ENIs are read at start.
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if events.send(Event::Resync).is_err() {
                return;
            }
        }
    });
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
        _ = node => {}
    }
    tracing::info!(
        action = "stop",
        "stopping; the checkpoint keeps what was assigned"
    );
    remove_socket_if_ours(&args.socket, socket_id);
    Ok(())
}

/// The device and inode of the socket file this agent bound.
type SocketId = (u64, u64);

/// Binds the socket (replacing a stale one) with mode 0666: who may ask for what is decided
/// from the caller's namespace, not by file modes.
fn bind_socket(path: &Path) -> Result<(UnixListener, SocketId)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing stale {}", path.display()), e)),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Removes the socket file only if it is still the one this agent bound: in a rolling update
/// the new agent may already have bound its own at the same path.
fn remove_socket_if_ours(path: &Path, ours: SocketId) {
    match std::fs::metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == ours => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            tracing::info!(action = "stop", socket = %path.display(), "the socket now belongs to another agent: left in place")
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_removed_only_while_it_is_ours() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("agent.sock");
        let (old, old_id) = bind_socket(&path).unwrap_or_else(|e| panic!("{e}"));
        // A newer agent binds the same path (rolling update).
        let (_new, new_id) = bind_socket(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(old_id, new_id);
        drop(old);
        remove_socket_if_ours(&path, old_id);
        assert!(
            path.exists(),
            "the old agent removed the new agent's socket"
        );
        remove_socket_if_ours(&path, new_id);
        assert!(!path.exists());
    }
}
