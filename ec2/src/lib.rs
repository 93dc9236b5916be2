//! The EC2 side of multus-eni, one library for the two binaries that call EC2 (the sidecar in
//! direct mode and the node agent): which ENI carries a MAC, what addresses it holds, the
//! assign/unassign calls, and how a failure is classified (throttled, transient, setup,
//! rejected) so that every caller backs off the same way.
//!
//! [`model`] is plain data; [`eni`] is the only module that talks to EC2. Without the
//! default `client` feature only the plain data is built (no AWS SDK): the sidecar's
//! agent-mode build needs nothing more.

#[cfg(feature = "client")]
pub mod eni;
mod error;
pub mod mac;
pub mod model;
#[cfg(feature = "client")]
pub mod node;

pub use error::{Error, ErrorKind};
pub use mac::MacAddress;

/// Result with the EC2 [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
