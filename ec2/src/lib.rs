//! The EC2 side of multus-eni, one library for the two binaries that call EC2 (the sidecar in
//! direct mode and the node agent): which ENI carries a MAC, what addresses it holds, the
//! assign/unassign calls, and how a failure is classified (throttled, transient, setup,
//! rejected) so that every caller backs off the same way.
//!
//! [`model`] is plain data; [`eni`] is the only module that talks to EC2.

pub mod eni;
pub mod mac;
pub mod model;
pub mod node;

pub use mac::MacAddress;

/// An EC2 call that failed; `kind` says whether and why it is retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("EC2 {action} failed ({kind}): {message}")]
pub struct Error {
    /// The EC2 action, as in IAM policies (`AssignPrivateIpAddresses`).
    pub action: &'static str,
    pub kind: eni::ErrorKind,
    pub message: String,
}

impl Error {
    /// An EC2 call the account's rate limit turned away: EC2 did not execute it, so what we
    /// know of the ENI still holds.
    pub fn is_throttled(&self) -> bool {
        self.kind == eni::ErrorKind::Throttled
    }
}

/// Result with the EC2 [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
