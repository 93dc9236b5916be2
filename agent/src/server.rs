//! The agent's wiring: the Unix socket, the metrics listener, the resync timer, the node
//! task and the signals that end them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use multus_eni_ec2::eni::Ec2;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::checkpoint::Checkpoint;
use crate::cli::RunArgs;
use crate::metrics::{self, Metrics};
use crate::node::{Event, Node, NodeConfig};
use crate::{Error, Result};

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    let node_name = std::env::var("NODE_NAME").unwrap_or_default();
    let metrics = Arc::new(Metrics::new());
    let checkpoint_path = Checkpoint::path(&args.state_dir);
    let checkpoint = Checkpoint::load(&checkpoint_path).unwrap_or_else(|e| {
        tracing::error!(action = "checkpoint", outcome = "unreadable", path = %checkpoint_path.display(), error = %e, "starting without the checkpoint: leaks from before are not reclaimed");
        Checkpoint::default()
    });
    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    let http = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| Error::io(format!("binding {}", args.metrics_addr), e))?;
    let listener = bind_socket(&args.socket)?;
    tracing::info!(
        action = "start",
        node = %node_name,
        socket = %args.socket.display(),
        metrics_addr = %args.metrics_addr,
        netns_dir = %args.netns_dir.display(),
        known_enis = checkpoint.enis.len(),
        "serving sidecars"
    );
    let router = metrics::router(metrics.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http, router).await {
            tracing::error!(action = "metrics", outcome = "failed", error = %e, "metrics server stopped");
        }
    });
    let ec2 = Arc::new(Ec2::from_env().await);
    let (events, inbox) = mpsc::unbounded_channel();
    let node = Node::new(
        ec2,
        metrics,
        NodeConfig {
            netns_dir: args.netns_dir.clone(),
            checkpoint: checkpoint_path,
            reclaim_after: args.reclaim_after,
            node_name,
            batch_interval: args.batch_interval,
        },
        checkpoint,
        events.clone(),
    );
    let node = tokio::spawn(node.run(inbox));
    let accept_events = events.clone();
    tokio::spawn(async move {
        let mut next: u64 = 0;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    next += 1;
                    tokio::spawn(crate::connection::serve(
                        stream,
                        next,
                        accept_events.clone(),
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
        // The first tick is immediate: the node's ENIs (from the checkpoint) are read at start.
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
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// Binds the socket (replacing a stale one) with mode 0666: who may ask for what is decided
/// from the caller's credentials and namespace, not by file modes.
fn bind_socket(path: &Path) -> Result<UnixListener> {
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
    Ok(listener)
}
