//! What an EC2 failure is and how it is treated: plain data, available without the SDK (the
//! sidecar's agent-mode build reports the agent's answers with it).

use std::fmt;

/// An EC2 call that failed; `kind` says whether and why it is retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("EC2 {action} failed ({kind}): {message}")]
pub struct Error {
    /// The EC2 action, as in IAM policies (`AssignPrivateIpAddresses`).
    pub action: &'static str,
    pub kind: ErrorKind,
    pub message: String,
    /// EC2's error code (`PrivateIpAddressLimitExceeded`), when it answered one.
    pub code: Option<String>,
}

impl Error {
    /// An EC2 call the account's rate limit turned away: EC2 did not execute it, so what we
    /// know of the ENI still holds.
    pub fn is_throttled(&self) -> bool {
        self.kind == ErrorKind::Throttled
    }

    /// EC2 refused an unassign because an address it names is not on the ENI (any more). EC2
    /// refuses the whole call and does not say which address.
    pub fn is_not_assigned(&self) -> bool {
        self.code.as_deref() == Some("InvalidParameterValue")
            && self.message.contains("not assigned")
    }

    /// EC2 refused an assign because the ENI has no free address slot.
    pub fn is_address_limit(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("PrivateIpAddressLimitExceeded" | "AddressLimitExceeded")
        )
    }
}

/// How an EC2 failure is treated. Every kind is retried by the event loop with backoff;
/// the kind decides the log message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `RequestLimitExceeded` and friends, HTTP 429.
    Throttled,
    /// HTTP 5xx, `InternalError`, `Unavailable`.
    ServerError,
    Timeout,
    /// The endpoint could not be reached.
    Connection,
    /// No credentials, no region, or access denied: an operator has to fix the setup.
    AuthOrConfig,
    /// EC2 refused the request (e.g. address limit reached, address not in the subnet).
    Rejected,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Throttled => "throttled",
            ErrorKind::ServerError => "server error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection error",
            ErrorKind::AuthOrConfig => "credentials, region or permissions",
            ErrorKind::Rejected => "rejected",
        })
    }
}

impl ErrorKind {
    /// The hint logged with the error: what an operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            ErrorKind::AuthOrConfig => {
                "the sidecar needs AWS_REGION and credentials with ec2:DescribeNetworkInterfaces, \
                 ec2:AssignPrivateIpAddresses, ec2:UnassignPrivateIpAddresses, ec2:AssignIpv6Addresses, \
                 ec2:UnassignIpv6Addresses: node role via IMDSv2 (set the instance metadata hop limit to 2 \
                 so pods can reach it), IRSA (service account annotated with eks.amazonaws.com/role-arn) \
                 or EKS Pod Identity; retrying"
            }
            ErrorKind::Throttled => "EC2 API rate limit; backing off",
            ErrorKind::ServerError | ErrorKind::Timeout | ErrorKind::Connection => {
                "transient; retrying with backoff"
            }
            ErrorKind::Rejected => "EC2 refused the request; retrying with backoff",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: &str, message: &str) -> Error {
        Error {
            action: "UnassignPrivateIpAddresses",
            kind: ErrorKind::Rejected,
            message: message.into(),
            code: Some(code.into()),
        }
    }

    #[test]
    fn refusals_are_told_apart_by_code_and_text() {
        let gone = error(
            "InvalidParameterValue",
            "InvalidParameterValue: Some of the specified addresses are not assigned to interface eni-1",
        );
        assert!(gone.is_not_assigned() && !gone.is_address_limit());
        let subnet = error(
            "InvalidParameterValue",
            "Address 10.9.0.1 is not in the subnet",
        );
        assert!(!subnet.is_not_assigned());
        let full = error(
            "PrivateIpAddressLimitExceeded",
            "Number of private addresses exceeds limit",
        );
        assert!(full.is_address_limit() && !full.is_not_assigned());
    }
}
