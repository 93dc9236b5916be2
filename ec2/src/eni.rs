//! EC2: find the ENI that carries an interface's MAC, read its addresses, and make the
//! assign/unassign calls. The SDK retries transient failures (5xx, timeouts) itself
//! (standard mode, bounded attempts) but not throttling: a throttled call goes straight back
//! to the event loop, whose longer jittered backoff spreads the pods of a rollout over the
//! account's refill instead of hitting the empty bucket again within the same second.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::interceptors::InterceptorContext;
use aws_sdk_ec2::config::retry::{ClassifyRetry, RetryAction, RetryConfig};
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::{
    assign_ipv6_addresses::AssignIpv6AddressesError,
    assign_private_ip_addresses::AssignPrivateIpAddressesError,
    describe_network_interfaces::DescribeNetworkInterfacesError,
    unassign_ipv6_addresses::UnassignIpv6AddressesError,
    unassign_private_ip_addresses::UnassignPrivateIpAddressesError,
};
use aws_sdk_ec2::types::{Filter, NetworkInterface};

use crate::mac::MacAddress;
use crate::model::{Change, EniAddresses, EniId};
use crate::{Error, Result};

/// Tag that tells the VPC CNI to leave an ENI alone (else it may hand our IPs to pods).
pub const NO_MANAGE_TAG: &str = "node.k8s.amazonaws.com/no_manage";

/// Attempts per EC2 call made by the SDK itself (first try included) for transient
/// failures; throttled calls get one attempt (see [`ThrottlingIsLeftToTheLoop`]).
pub const SDK_MAX_ATTEMPTS: u32 = 3;

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

/// Which stage an SDK error came from (the part of [`SdkError`] that matters here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureStage {
    /// Not sent: no credentials, no region, invalid input.
    Construction,
    Timeout,
    DispatchTimeout,
    DispatchIo,
    DispatchUser,
    DispatchOther,
    /// A response came back (service error or unparseable response).
    Response,
}

/// Pure classification of an EC2 failure.
pub fn classify(stage: FailureStage, code: Option<&str>, status: Option<u16>) -> ErrorKind {
    const THROTTLING: &[&str] = &[
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "EC2ThrottledException",
        "SlowDown",
    ];
    const AUTH: &[&str] = &[
        "AuthFailure",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "RequestExpired",
        "MissingAuthenticationToken",
        "AccessDenied",
        "AccessDeniedException",
        "OptInRequired",
        "Blocked",
    ];
    match stage {
        FailureStage::Construction | FailureStage::DispatchUser => ErrorKind::AuthOrConfig,
        FailureStage::Timeout | FailureStage::DispatchTimeout => ErrorKind::Timeout,
        FailureStage::DispatchIo | FailureStage::DispatchOther => ErrorKind::Connection,
        FailureStage::Response => match (code, status) {
            (Some(c), _) if THROTTLING.contains(&c) => ErrorKind::Throttled,
            (_, Some(429)) => ErrorKind::Throttled,
            (Some(c), _) if AUTH.contains(&c) => ErrorKind::AuthOrConfig,
            (_, Some(401 | 403)) => ErrorKind::AuthOrConfig,
            (
                Some("InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"),
                _,
            ) => ErrorKind::ServerError,
            (_, Some(s)) if s >= 500 => ErrorKind::ServerError,
            _ => ErrorKind::Rejected,
        },
    }
}

/// SDK retry classifier that forbids retrying throttled calls. Under account-wide throttling
/// the SDK's retries (200 ms, then 400 ms) land on the same empty token bucket: at a 200-pod
/// rollout they tripled the calls of the start phase (docs/scale.md). Every other failure is
/// left to the SDK's own classifiers.
#[derive(Debug)]
pub struct ThrottlingIsLeftToTheLoop;

impl ClassifyRetry for ThrottlingIsLeftToTheLoop {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(Err(error)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        let code = error.as_operation_error().and_then(|e| {
            [
                e.downcast_ref::<DescribeNetworkInterfacesError>()
                    .map(|e| e.meta()),
                e.downcast_ref::<AssignPrivateIpAddressesError>()
                    .map(|e| e.meta()),
                e.downcast_ref::<UnassignPrivateIpAddressesError>()
                    .map(|e| e.meta()),
                e.downcast_ref::<AssignIpv6AddressesError>()
                    .map(|e| e.meta()),
                e.downcast_ref::<UnassignIpv6AddressesError>()
                    .map(|e| e.meta()),
            ]
            .into_iter()
            .flatten()
            .next()?
            .code()
        });
        let status = ctx.response().map(|r| r.status().as_u16());
        if status.is_some()
            && classify(FailureStage::Response, code, status) == ErrorKind::Throttled
        {
            RetryAction::RetryForbidden
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "ThrottlingIsLeftToTheLoop"
    }
}

pub(crate) fn sdk_error<E>(action: &'static str, err: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let chain = error_chain(&err);
    let stage = match &err {
        SdkError::ConstructionFailure(_) => FailureStage::Construction,
        // The credentials chain and region resolution fail inside dispatch.
        SdkError::DispatchFailure(_) if mentions_setup(&chain) => FailureStage::DispatchUser,
        SdkError::TimeoutError(_) => FailureStage::Timeout,
        SdkError::DispatchFailure(d) if d.is_timeout() => FailureStage::DispatchTimeout,
        SdkError::DispatchFailure(d) if d.is_io() => FailureStage::DispatchIo,
        SdkError::DispatchFailure(d) if d.is_user() => FailureStage::DispatchUser,
        SdkError::DispatchFailure(_) => FailureStage::DispatchOther,
        _ => FailureStage::Response,
    };
    let status = err.raw_response().map(|r| r.status().as_u16());
    let kind = classify(stage, err.code(), status);
    let message = match (err.code(), err.message(), status) {
        (Some(code), Some(msg), _) => format!("{code}: {msg}"),
        (Some(code), None, _) => code.to_string(),
        (None, _, Some(status)) => format!("HTTP {status} without an EC2 error code"),
        _ => chain,
    };
    Error {
        action,
        kind,
        message,
    }
}

/// The messages of an error and its sources, without repeats: short enough for one log line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Whether a dispatch failure is a local setup problem (credentials or region), not the network.
fn mentions_setup(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    lower.contains("credential") || lower.contains("region")
}

/// The EC2 client and what it learned about the endpoint.
pub struct Ec2 {
    pub(crate) client: Client,
    /// Cleared when the endpoint rejects the `ipv6-addresses.ipv6-address` filter (some EC2
    /// emulators): IPv6 holders are then found by reading the ENIs of the subnet.
    ipv6_filter: AtomicBool,
}

impl Ec2 {
    /// A client from the standard SDK chain only (region, credentials, `AWS_ENDPOINT_URL_EC2`),
    /// with bounded SDK retries (none for throttling) and timeouts.
    pub async fn from_env() -> Self {
        let shared = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        if shared.region().is_none() {
            tracing::error!(
                action = "configure",
                outcome = "no_region",
                "no AWS region: set AWS_REGION (the webhook injects it when configured) or let the pod \
                 reach IMDSv2 (instance metadata hop limit 2); EC2 calls fail until then"
            );
        }
        let config = aws_sdk_ec2::config::Builder::from(&shared)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(SDK_MAX_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .retry_classifier(ThrottlingIsLeftToTheLoop)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .operation_timeout(Duration::from_secs(30))
                    .build(),
            )
            .build();
        Self {
            client: Client::from_conf(config),
            ipv6_filter: AtomicBool::new(true),
        }
    }

    /// The ENI with this MAC (`DescribeNetworkInterfaces`, filter `mac-address`). `None` is a
    /// successful empty answer: no ENI has the MAC.
    pub async fn find_by_mac(&self, mac: MacAddress) -> Result<Option<EniAddresses>> {
        let out = self
            .client
            .describe_network_interfaces()
            .filters(
                Filter::builder()
                    .name("mac-address")
                    .values(mac.to_string())
                    .build(),
            )
            .send()
            .await
            .map_err(|e| sdk_error("DescribeNetworkInterfaces", e))?;
        let wanted = mac.to_string();
        Ok(out
            .network_interfaces()
            .iter()
            .find(|n| {
                n.mac_address()
                    .is_none_or(|m| m.eq_ignore_ascii_case(&wanted))
            })
            .map(eni_addresses))
    }

    /// The *other* ENIs that hold some of `addresses` (IPv6 cannot be reassigned: they must
    /// be unassigned there first). One `DescribeNetworkInterfaces` with filter
    /// `ipv6-addresses.ipv6-address`; if the endpoint rejects that filter, the ENIs of our
    /// subnet (the only ones that can hold an address of its /64) are read instead.
    pub async fn ipv6_holders(
        &self,
        ours: &EniAddresses,
        addresses: &BTreeSet<Ipv6Addr>,
    ) -> Result<BTreeMap<Ipv6Addr, EniId>> {
        if self.ipv6_filter.load(Ordering::Relaxed) {
            let values: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            let result = self
                .describe_all(
                    Filter::builder()
                        .name("ipv6-addresses.ipv6-address")
                        .set_values(Some(values))
                        .build(),
                )
                .await;
            match result {
                Ok(enis) => return Ok(holders(&enis, &ours.id, addresses)),
                Err(Error {
                    kind: ErrorKind::ServerError | ErrorKind::Rejected,
                    message,
                    ..
                }) => {
                    tracing::warn!(
                        action = "DescribeNetworkInterfaces",
                        outcome = "filter_unsupported",
                        error = %message,
                        "the EC2 endpoint rejected filter ipv6-addresses.ipv6-address; finding IPv6 holders \
                         by reading the ENIs of the subnet from now on"
                    );
                    self.ipv6_filter.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let Some(subnet) = ours.subnet_id.clone() else {
            return Ok(BTreeMap::new());
        };
        let enis = self
            .describe_all(Filter::builder().name("subnet-id").values(subnet).build())
            .await?;
        Ok(holders(&enis, &ours.id, addresses))
    }

    async fn describe_all(&self, filter: Filter) -> Result<Vec<EniAddresses>> {
        let mut enis = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_network_interfaces()
                .filters(filter.clone())
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| sdk_error("DescribeNetworkInterfaces", e))?;
            enis.extend(out.network_interfaces().iter().map(eni_addresses));
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(enis),
            }
        }
    }

    /// Makes one mutating call.
    pub async fn apply(&self, change: &Change) -> Result<()> {
        let action = change.action();
        let strings = |a: &[IpAddr]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
        let addresses = strings(&change.addresses());
        match change {
            Change::AssignIpv4 { eni, .. } => self
                .client
                .assign_private_ip_addresses()
                .network_interface_id(eni)
                .set_private_ip_addresses(Some(addresses))
                .allow_reassignment(true)
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            Change::AssignIpv6 { eni, .. } => self
                .client
                .assign_ipv6_addresses()
                .network_interface_id(eni)
                .set_ipv6_addresses(Some(addresses))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            Change::UnassignIpv4 { eni, .. } => self
                .client
                .unassign_private_ip_addresses()
                .network_interface_id(eni)
                .set_private_ip_addresses(Some(addresses))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            Change::UnassignIpv6 { eni, .. } => self
                .client
                .unassign_ipv6_addresses()
                .network_interface_id(eni)
                .set_ipv6_addresses(Some(addresses))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
        }
    }
}

fn holders(
    enis: &[EniAddresses],
    ours: &str,
    addresses: &BTreeSet<Ipv6Addr>,
) -> BTreeMap<Ipv6Addr, EniId> {
    let mut found = BTreeMap::new();
    for eni in enis.iter().filter(|e| e.id != ours) {
        for a in eni.ipv6.intersection(addresses) {
            found.insert(*a, eni.id.clone());
        }
    }
    found
}

pub(crate) fn eni_addresses(n: &NetworkInterface) -> EniAddresses {
    let primary_ipv4 = n
        .private_ip_addresses()
        .iter()
        .find(|p| p.primary() == Some(true))
        .and_then(|p| p.private_ip_address())
        .or(n.private_ip_address())
        .and_then(|a| a.parse::<Ipv4Addr>().ok());
    EniAddresses {
        id: n.network_interface_id().unwrap_or_default().to_string(),
        subnet_id: n.subnet_id().map(str::to_string),
        primary_ipv4,
        ipv4: n
            .private_ip_addresses()
            .iter()
            .filter_map(|p| p.private_ip_address()?.parse().ok())
            .chain(primary_ipv4)
            .collect(),
        ipv6: n
            .ipv6_addresses()
            .iter()
            .filter_map(|a| a.ipv6_address()?.parse().ok())
            .collect(),
        no_manage: n.tag_set().iter().any(|t| {
            t.key() == Some(NO_MANAGE_TAG)
                && t.value().is_some_and(|v| v.eq_ignore_ascii_case("true"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_is_recognised_by_code_or_status() {
        let r = FailureStage::Response;
        assert_eq!(
            classify(r, Some("RequestLimitExceeded"), Some(503)),
            ErrorKind::Throttled
        );
        assert_eq!(
            classify(r, Some("Throttling"), Some(400)),
            ErrorKind::Throttled
        );
        assert_eq!(classify(r, None, Some(429)), ErrorKind::Throttled);
    }

    #[test]
    fn server_errors_timeouts_and_connection_errors_are_transient() {
        let r = FailureStage::Response;
        assert_eq!(
            classify(r, Some("InternalError"), Some(500)),
            ErrorKind::ServerError
        );
        assert_eq!(classify(r, None, Some(502)), ErrorKind::ServerError);
        assert_eq!(
            classify(r, Some("Unavailable"), Some(503)),
            ErrorKind::ServerError
        );
        assert_eq!(
            classify(FailureStage::Timeout, None, None),
            ErrorKind::Timeout
        );
        assert_eq!(
            classify(FailureStage::DispatchTimeout, None, None),
            ErrorKind::Timeout
        );
        assert_eq!(
            classify(FailureStage::DispatchIo, None, None),
            ErrorKind::Connection
        );
    }

    #[test]
    fn auth_and_config_errors_name_the_fixes() {
        let r = FailureStage::Response;
        assert_eq!(
            classify(r, Some("UnauthorizedOperation"), Some(403)),
            ErrorKind::AuthOrConfig
        );
        assert_eq!(
            classify(r, Some("AuthFailure"), Some(401)),
            ErrorKind::AuthOrConfig
        );
        assert_eq!(
            classify(FailureStage::Construction, None, None),
            ErrorKind::AuthOrConfig
        );
        assert_eq!(
            classify(FailureStage::DispatchUser, None, None),
            ErrorKind::AuthOrConfig
        );
        let hint = ErrorKind::AuthOrConfig.hint();
        for fix in ["hop limit to 2", "IRSA", "Pod Identity", "AWS_REGION"] {
            assert!(hint.contains(fix), "hint lacks {fix}");
        }
    }

    #[test]
    fn credential_and_region_failures_are_setup_problems() {
        assert!(mentions_setup(
            "dispatch failure: other: no credentials found in chain"
        ));
        assert!(mentions_setup(
            "failed to construct request: a region must be set"
        ));
        assert!(!mentions_setup("dispatch failure: io: connection refused"));
    }

    #[test]
    fn other_client_errors_are_rejections() {
        let r = FailureStage::Response;
        assert_eq!(
            classify(r, Some("PrivateIpAddressLimitExceeded"), Some(400)),
            ErrorKind::Rejected
        );
        assert_eq!(
            classify(r, Some("InvalidParameterValue"), Some(400)),
            ErrorKind::Rejected
        );
    }

    #[test]
    fn holders_exclude_our_own_eni() {
        let a: Ipv6Addr = "2001:db8::10".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let mk = |id: &str| EniAddresses {
            id: id.into(),
            ipv6: [a].into(),
            ..Default::default()
        };
        let found = holders(&[mk("eni-ours"), mk("eni-other")], "eni-ours", &[a].into());
        assert_eq!(found, [(a, "eni-other".to_string())].into());
    }

    /// What [`ThrottlingIsLeftToTheLoop`] says about an EC2 error answer.
    fn sdk_retry_verdict(status: u16, code: &str) -> RetryAction {
        use aws_sdk_ec2::error::ErrorMetadata;
        use aws_smithy_runtime_api::client::interceptors::context::{Error as Erased, Input};
        use aws_smithy_runtime_api::client::orchestrator::OrchestratorError;
        use aws_smithy_runtime_api::http::{Response, StatusCode};
        use aws_smithy_types::body::SdkBody;

        let mut ctx = InterceptorContext::new(Input::erase(()));
        let Ok(status) = StatusCode::try_from(status) else {
            panic!("not an HTTP status: {status}");
        };
        ctx.set_response(Response::new(status, SdkBody::empty()));
        let error =
            AssignPrivateIpAddressesError::generic(ErrorMetadata::builder().code(code).build());
        ctx.set_output_or_error(Err(OrchestratorError::operation(Erased::erase(error))));
        ThrottlingIsLeftToTheLoop.classify_retry(&ctx)
    }

    #[test]
    fn the_sdk_does_not_retry_throttling_but_keeps_its_other_retries() {
        assert_eq!(
            sdk_retry_verdict(503, "RequestLimitExceeded"),
            RetryAction::RetryForbidden
        );
        assert_eq!(
            sdk_retry_verdict(429, "SlowDown"),
            RetryAction::RetryForbidden
        );
        assert_eq!(
            sdk_retry_verdict(500, "InternalError"),
            RetryAction::NoActionIndicated
        );
        assert_eq!(
            sdk_retry_verdict(503, "Unavailable"),
            RetryAction::NoActionIndicated
        );
        // No answer at all (connect error, timeout): the SDK's classifiers decide.
        let ctx = InterceptorContext::new(
            aws_smithy_runtime_api::client::interceptors::context::Input::erase(()),
        );
        assert_eq!(
            ThrottlingIsLeftToTheLoop.classify_retry(&ctx),
            RetryAction::NoActionIndicated
        );
    }
}
