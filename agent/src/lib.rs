//! multus-eni node agent: the one owner of the EC2 calls of a node. Sidecars in agent mode
//! tell it, over a Unix socket, which addresses their pod holds; it verifies that in the
//! pod's own network namespace, assigns them on the node's ENIs in batches per ENI
//! (group commit), unassigns them when the pod lets go or disappears, and reclaims leaks.
//!
//! Pure decisions: [`claims`], [`batch`], [`reclaim`], [`checkpoint`]. Edges: [`netns`]
//! (setns + netlink), [`connection`] (socket), [`node`] (the task that calls EC2),
//! [`server`] (wiring), [`metrics`].

pub mod batch;
pub mod checkpoint;
pub mod claims;
pub mod cli;
pub mod connection;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod reclaim;
pub mod server;

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
