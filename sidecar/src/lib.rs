//! multus-eni sidecar: makes a pod's Multus (ipvlan) addresses routable in the VPC by
//! assigning them as secondary addresses on the node ENI whose MAC the interface carries.
//!
//! Edges: [`addresses`] (netlink), [`eni`] (EC2), [`probe`] (HTTP), [`gate`] (the agent's
//! HTTP answer). The decisions are pure
//! functions in [`reconcile`]; [`run`] is the one event loop that ties them together.

pub mod addresses;
pub mod agent_mode;
/// EC2 calls and their classification, shared with the node agent.
#[cfg(feature = "direct")]
pub use multus_eni_ec2::eni;
pub mod cli;
pub mod gate;
pub mod probe;
pub mod reconcile;
#[cfg(feature = "direct")]
pub mod run;

use std::net::SocketAddr;

/// Everything that can go wrong in the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the netlink socket or reading links/addresses failed.
    #[error("netlink: {0}")]
    Netlink(String),

    /// The netlink event subscription ended; the sidecar reconnects.
    #[error("netlink event stream ended")]
    NetlinkStreamEnded,

    /// The kernel dropped link or address events (the socket's buffer was full); the
    /// sidecar subscribes again and re-reads its interfaces.
    #[error("netlink events were dropped (socket overrun)")]
    NetlinkOverrun,

    /// An EC2 call failed; its `kind` says whether and why it is retried.
    #[error(transparent)]
    Ec2(#[from] multus_eni_ec2::Error),

    /// The probe server could not bind its address.
    #[error("cannot listen on probe address {addr}: {source}")]
    ProbeBind {
        addr: SocketAddr,
        source: std::io::Error,
    },

    /// Direct mode was asked for (neither `--agent-url` nor `--agent-socket`) from a binary
    /// without it:
    /// `multus-eni-sidecar-agent-mode`, or `multus-eni-sidecar` built without the `direct`
    /// feature.
    #[error(
        "this binary runs agent mode only (no AWS SDK in it): pass --agent-url (the HTTP \
         startup gate) or --agent-socket, or run /usr/local/bin/multus-eni-sidecar (same \
         image), which has direct mode"
    )]
    DirectModeNotBuilt,

    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),

    /// Installing signal handlers failed.
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

impl Error {
    /// An EC2 call the account's rate limit turned away: EC2 did not execute it, so what we
    /// know of the ENI still holds.
    pub fn is_throttled(&self) -> bool {
        matches!(self, Error::Ec2(e) if e.is_throttled())
    }
}

/// The span every log line of either mode carries: the pod, its namespace and its node, from
/// the downward API (empty where unset, e.g. outside Kubernetes).
pub(crate) fn pod_span() -> tracing::Span {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    tracing::info_span!(
        "sidecar",
        pod = %env("POD_NAME"),
        namespace = %env("POD_NAMESPACE"),
        node = %env("NODE_NAME"),
    )
}

/// Waits until `at`, or for ever when there is nothing to wait for: the timer arm of every
/// mode's event loop (`select!` with `if at.is_some()`).
pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Result with the sidecar's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
