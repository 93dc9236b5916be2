//! multus-eni node agent: the one owner of the EC2 calls of a node. Its truth is what it can
//! see on its own node and instance: every pod network namespace under `--netns-dir` (watched
//! by inotify and one netlink socket per namespace) and the ENIs attached to its instance
//! (read from EC2). An address a pod holds on an interface carrying the MAC of one of those
//! ENIs that is a Multus one (`no_manage`) is assigned there, batched per ENI; it is
//! unassigned when the pod lets go of it. Sidecars connect over a Unix socket to be told when
//! their pod is routable: their claims are hints that make the agent look, never facts.
//!
//! Pure decisions: [`plan`], [`batch`], [`reclaim`], [`conflict`], [`retry`], [`checkpoint`],
//! [`macs`]. Edges: [`watch`] (inotify, setns + netlink), [`connection`] (socket), [`calls`]
//! (one ENI's EC2 calls), [`node`] (the task that owns the state and calls EC2), [`status`]
//! (the node's table over HTTP), [`http`] (the bounded, dual-stack HTTP port), [`server`]
//! (wiring), [`metrics`].

pub mod batch;
pub mod callers;
pub mod calls;
pub mod checkpoint;
pub mod cli;
pub mod conflict;
pub mod connection;
pub mod health;
pub mod http;
pub mod macs;
pub mod metrics;
pub mod node;
pub mod pacing;
pub mod plan;
pub mod prefix;
pub mod reclaim;
pub mod retry;
pub mod server;
pub mod status;
pub mod view;
pub mod watch;

/// Everything that stops the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },

    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),

    /// Installing signal handlers failed.
    #[error("signal handler: {0}")]
    Signal(std::io::Error),

    /// No `--instance-id` and IMDS did not say.
    #[error(
        "cannot learn this instance's id from IMDSv2 ({0}): the agent needs hostNetwork (hop limit 1 is enough) or --instance-id"
    )]
    InstanceId(String),

    /// `multus-eni-agent status` could not read a running agent.
    #[error("{0}")]
    Status(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
