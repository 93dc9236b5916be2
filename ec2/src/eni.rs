//! EC2: find the ENI that carries an interface's MAC, read its addresses, and make the
//! assign/unassign calls. The SDK retries transient failures (5xx, timeouts) itself
//! (standard mode, bounded attempts) but not throttling: a throttled call goes straight back
//! to the event loop, whose longer jittered backoff spreads the pods of a rollout over the
//! account's refill instead of hitting the empty bucket again within the same second.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::interceptors::InterceptorContext;
use aws_sdk_ec2::config::retry::{ClassifyRetry, RetryAction, RetryConfig};
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;
use aws_sdk_ec2::operation::{
    assign_ipv6_addresses::AssignIpv6AddressesError,
    assign_private_ip_addresses::AssignPrivateIpAddressesError,
    describe_network_interfaces::DescribeNetworkInterfacesError,
    unassign_ipv6_addresses::UnassignIpv6AddressesError,
    unassign_private_ip_addresses::UnassignPrivateIpAddressesError,
};
use aws_sdk_ec2::types::{Filter, NetworkInterface};

pub use crate::error::ErrorKind;
use crate::mac::MacAddress;
use crate::model::{Change, EniAddresses, EniId, Ipv6Holders, PrefixChange};
use crate::{Error, Result};

/// Tag that tells the VPC CNI to leave an ENI alone (else it may hand our IPs to pods).
pub const NO_MANAGE_TAG: &str = "node.k8s.amazonaws.com/no_manage";

/// Attempts per EC2 call made by the SDK itself (first try included) for transient
/// failures; throttled calls get one attempt (see [`ThrottlingIsLeftToTheLoop`]).
pub const SDK_MAX_ATTEMPTS: u32 = 3;

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
    E: ProvideErrorMetadata + RequestId + std::error::Error + Send + Sync + 'static,
{
    sdk_failure(action, err).error
}

/// An EC2 failure with the parts of the answer that some decisions need besides its kind.
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) code: Option<String>,
    pub(crate) status: Option<u16>,
}

pub(crate) fn sdk_failure<E>(action: &'static str, err: SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + RequestId + std::error::Error + Send + Sync + 'static,
{
    let chain = error_chain(&err);
    let stage = match &err {
        SdkError::ConstructionFailure(_) => FailureStage::Construction,
        SdkError::TimeoutError(_) => FailureStage::Timeout,
        SdkError::DispatchFailure(d) => {
            dispatch_stage(d.is_timeout(), d.is_io(), d.is_user(), &chain)
        }
        _ => FailureStage::Response,
    };
    let status = err.raw_response().map(|r| r.status().as_u16());
    let kind = classify(stage, err.code(), status);
    // The SDK keeps the id of the `x-amzn-requestid` header; EC2's error body carries it as
    // `<RequestID>`, which the SDK does not read.
    let body_id = err
        .raw_response()
        .and_then(|r| r.body().bytes())
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(request_id_in_body)
        .map(str::to_string);
    let request_id = err
        .as_service_error()
        .and_then(|e| e.request_id())
        .or_else(|| err.request_id())
        .map(str::to_string)
        .or(body_id);
    let request_id = request_id.as_deref();
    Failure {
        error: Error {
            action,
            kind,
            message: error_message(err.code(), err.message(), status, request_id, &chain),
            code: err.code().map(str::to_string),
        },
        code: err.code().map(str::to_string),
        status,
    }
}

/// The stage of a dispatch failure. A timeout is a timeout even when its text names the
/// region endpoint or the credentials provider that timed out: only then is the text read.
fn dispatch_stage(is_timeout: bool, is_io: bool, is_user: bool, chain: &str) -> FailureStage {
    if is_timeout {
        FailureStage::DispatchTimeout
    } else if mentions_setup(chain) || is_user {
        // The credentials chain and region resolution fail inside dispatch.
        FailureStage::DispatchUser
    } else if is_io {
        FailureStage::DispatchIo
    } else {
        FailureStage::DispatchOther
    }
}

/// The `<RequestID>` of an EC2 error body.
fn request_id_in_body(body: &str) -> Option<&str> {
    let start = body.find("<RequestID>")? + "<RequestID>".len();
    let len = body[start..].find("</RequestID>")?;
    Some(body[start..start + len].trim()).filter(|id| !id.is_empty())
}

/// One line for the log: EC2's code and message, and its request id, which AWS support asks
/// for.
fn error_message(
    code: Option<&str>,
    message: Option<&str>,
    status: Option<u16>,
    request_id: Option<&str>,
    chain: &str,
) -> String {
    let text = match (code, message, status) {
        (Some(code), Some(msg), _) => format!("{code}: {msg}"),
        (Some(code), None, _) => code.to_string(),
        (None, _, Some(status)) => format!("HTTP {status} without an EC2 error code"),
        _ => chain.to_string(),
    };
    match request_id {
        Some(id) => format!("{text} (request id {id})"),
        None => text,
    }
}

/// Whether EC2's answer to a `DescribeNetworkInterfaces` with filter
/// `ipv6-addresses.ipv6-address` says the endpoint does not know the filter: a rejection of
/// the request (4xx), or an HTTP 500 without an EC2 error code (what an emulator that lacks
/// the filter answers). A 5xx with EC2's code (`InternalError`, `Unavailable`), throttling
/// and timeouts are passing troubles: the filter is tried again next time.
pub fn filter_unsupported(kind: ErrorKind, code: Option<&str>, status: Option<u16>) -> bool {
    match kind {
        ErrorKind::Rejected => true,
        ErrorKind::ServerError => code.is_none() && status == Some(500),
        _ => false,
    }
}

/// Whether a failed change is worth halving: EC2 looked at the addresses and refused
/// (an address outside the subnet, the ENI's address limit), so a part may still pass.
/// Throttling, server and setup errors say nothing about the addresses: halving them would
/// only multiply the calls.
pub fn worth_splitting(error: &Error, change: &Change) -> bool {
    error.kind == ErrorKind::Rejected && change.addresses().len() > 1
}

/// Whether an IPv4 assign may take the address from another ENI (`AllowReassignment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reassignment {
    Allowed,
    Refused,
}

/// What became of one part of a change made by [`Ec2::apply_splitting`].
#[derive(Debug, Clone)]
pub struct ChangeOutcome {
    /// The addresses this outcome is about (the whole change, or a part of it).
    pub change: Change,
    pub result: Result<()>,
}

/// What became of one part of a prefix change made by [`Ec2::apply_prefixes`].
#[derive(Debug, Clone)]
pub struct PrefixOutcome {
    pub change: PrefixChange,
    pub result: Result<()>,
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
    /// Replaced once a region is found, when there was none at start (see [`Ec2::client`]).
    client: RwLock<Client>,
    /// Whether the client has a region; while it has none, every call resolves it again.
    has_region: AtomicBool,
    /// Cleared when the endpoint rejects the `ipv6-addresses.ipv6-address` filter (some EC2
    /// emulators): IPv6 holders are then found by reading the ENIs of the subnet.
    ipv6_filter: AtomicBool,
    /// The same for `addresses.private-ip-address` (IPv4 holders).
    ipv4_filter: AtomicBool,
}

/// A client from the standard SDK chain only (region, credentials, `AWS_ENDPOINT_URL_EC2`),
/// with bounded SDK retries (none for throttling) and timeouts; `None` in the second place
/// when no region was found.
async fn client_from_env() -> (Client, bool) {
    let shared = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let has_region = shared.region().is_some();
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
    (Client::from_conf(config), has_region)
}

impl Ec2 {
    /// A client from the standard SDK chain only (region, credentials, `AWS_ENDPOINT_URL_EC2`),
    /// with bounded SDK retries (none for throttling) and timeouts.
    pub async fn from_env() -> Self {
        let (client, has_region) = client_from_env().await;
        if !has_region {
            tracing::error!(
                action = "configure",
                outcome = "no_region",
                "no AWS region: set AWS_REGION (the webhook injects it when configured) or let the pod \
                 reach IMDSv2 (instance metadata hop limit 2); EC2 calls fail until then, and each \
                 retry looks for the region again"
            );
        }
        Self {
            client: RwLock::new(client),
            has_region: AtomicBool::new(has_region),
            ipv6_filter: AtomicBool::new(true),
            ipv4_filter: AtomicBool::new(true),
        }
    }

    /// The client for the next call. Without a region the SDK chain is read again first: an
    /// IMDS that did not answer at start (the pod's network not up yet, a hop limit fixed
    /// since) must not leave the process without a region for its whole life.
    pub(crate) async fn client(&self) -> Client {
        if !self.has_region.load(Ordering::Relaxed) {
            let (client, has_region) = client_from_env().await;
            if has_region {
                tracing::info!(
                    action = "configure",
                    outcome = "region_found",
                    "found the AWS region"
                );
                let mut slot = self.client.write().unwrap_or_else(|p| p.into_inner());
                *slot = client.clone();
                self.has_region.store(true, Ordering::Relaxed);
                return client;
            }
        }
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The ENI with this MAC (`DescribeNetworkInterfaces`, filter `mac-address`). `None` is a
    /// successful empty answer: no ENI has the MAC.
    pub async fn find_by_mac(&self, mac: MacAddress) -> Result<Option<EniAddresses>> {
        let out = self
            .client()
            .await
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

    /// Which *other* ENI holds each of `addresses` (IPv6 cannot be reassigned: they must be
    /// unassigned there first); see [`Ec2::ipv6_holder_enis`].
    pub async fn ipv6_holders(
        &self,
        ours: &EniAddresses,
        addresses: &BTreeSet<Ipv6Addr>,
    ) -> Result<BTreeMap<Ipv6Addr, EniId>> {
        let enis = self.ipv6_holder_enis(ours, addresses).await?;
        Ok(holders(&enis, &ours.id, addresses))
    }

    /// The *other* ENIs that hold some of the IPv6 `addresses`, as read; see
    /// [`Ec2::holder_enis`].
    pub async fn ipv6_holder_enis(
        &self,
        ours: &EniAddresses,
        addresses: &BTreeSet<Ipv6Addr>,
    ) -> Result<Vec<EniAddresses>> {
        let asked: BTreeSet<IpAddr> = addresses.iter().map(|a| IpAddr::V6(*a)).collect();
        self.holder_enis(ours, &asked).await
    }

    /// The *other* ENIs that hold some of `addresses`, as read (the node agent checks their
    /// `no_manage` tag before it lets an address move). One `DescribeNetworkInterfaces` per
    /// address family, with filter `addresses.private-ip-address` (IPv4, secondaries included)
    /// or `ipv6-addresses.ipv6-address`; if the endpoint does not know the filter
    /// ([`filter_unsupported`]), the ENIs of our subnet (the only ones that can hold an address
    /// of its prefixes) are read instead, from then on.
    pub async fn holder_enis(
        &self,
        ours: &EniAddresses,
        addresses: &BTreeSet<IpAddr>,
    ) -> Result<Vec<EniAddresses>> {
        let mut found: BTreeMap<EniId, EniAddresses> = BTreeMap::new();
        let families = [
            (
                "addresses.private-ip-address",
                &self.ipv4_filter,
                addresses.iter().filter(|a| a.is_ipv4()).collect::<Vec<_>>(),
            ),
            (
                "ipv6-addresses.ipv6-address",
                &self.ipv6_filter,
                addresses.iter().filter(|a| a.is_ipv6()).collect(),
            ),
        ];
        for (name, supported, values) in families {
            if values.is_empty() {
                continue;
            }
            for eni in self
                .described_holders(ours, name, supported, &values)
                .await?
            {
                found.insert(eni.id.clone(), eni);
            }
        }
        Ok(found
            .into_values()
            .filter(|e| e.id != ours.id && addresses.iter().any(|a| e.holds(*a)))
            .collect())
    }

    /// The ENIs that EC2 finds with filter `name` over `values`, or those of our subnet once the
    /// endpoint has rejected that filter.
    async fn described_holders(
        &self,
        ours: &EniAddresses,
        name: &str,
        supported: &AtomicBool,
        values: &[&IpAddr],
    ) -> Result<Vec<EniAddresses>> {
        if supported.load(Ordering::Relaxed) {
            let filter = Filter::builder()
                .name(name)
                .set_values(Some(values.iter().map(ToString::to_string).collect()))
                .build();
            match self.describe_all_raw(filter).await {
                Ok(enis) => return Ok(enis),
                Err(f) if filter_unsupported(f.error.kind, f.code.as_deref(), f.status) => {
                    tracing::warn!(
                        action = "DescribeNetworkInterfaces",
                        outcome = "filter_unsupported",
                        filter = name,
                        error = %f.error.message,
                        "the EC2 endpoint rejected the filter; finding address holders by reading \
                         the ENIs of the subnet from now on"
                    );
                    supported.store(false, Ordering::Relaxed);
                }
                Err(f) => return Err(f.error),
            }
        }
        let Some(subnet) = ours.subnet_id.clone() else {
            return Ok(Vec::new());
        };
        self.describe_all_raw(Filter::builder().name("subnet-id").values(subnet).build())
            .await
            .map_err(|f| f.error)
    }

    /// [`Ec2::ipv6_holders`] for the addresses whose holder `known` does not have yet; what
    /// it reads is added to `known`.
    pub async fn ipv6_holders_cached(
        &self,
        known: &mut Ipv6Holders,
        ours: &EniAddresses,
        addresses: &BTreeSet<Ipv6Addr>,
    ) -> Result<BTreeMap<Ipv6Addr, EniId>> {
        let unknown = known.unknown(addresses);
        if !unknown.is_empty() {
            let found = self.ipv6_holders(ours, &unknown).await?;
            known.learn(&unknown, &found);
        }
        Ok(known.holders(addresses))
    }

    async fn describe_all_raw(
        &self,
        filter: Filter,
    ) -> std::result::Result<Vec<EniAddresses>, Failure> {
        let found = self.describe_pages(filter).await?;
        Ok(found.iter().map(eni_addresses).collect())
    }

    /// Every ENI matching `filter`, all pages of `DescribeNetworkInterfaces`, as EC2 describes
    /// them (the node agent also needs each one's MAC).
    pub(crate) async fn describe_pages(
        &self,
        filter: Filter,
    ) -> std::result::Result<Vec<NetworkInterface>, Failure> {
        let client = self.client().await;
        let mut enis = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = client
                .describe_network_interfaces()
                .filters(filter.clone())
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| sdk_failure("DescribeNetworkInterfaces", e))?;
            token = out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            enis.extend(out.network_interfaces.unwrap_or_default());
            if token.is_none() {
                return Ok(enis);
            }
        }
    }

    /// Makes the change; when EC2 rejects a batch of several addresses, halves it and tries
    /// each half, down to single addresses, so that one address EC2 refuses (outside the
    /// subnet's prefix, over the ENI's limit) holds back only itself. One outcome per part
    /// that was settled, in address order. A bad address among `n` costs about
    /// `2·log2(n)` extra calls; a batch without one costs nothing extra.
    pub async fn apply_splitting(&self, change: &Change) -> Vec<ChangeOutcome> {
        self.split_and_apply(change, Reassignment::Allowed, worth_splitting)
            .await
    }

    /// [`Ec2::apply_splitting`] for the node agent's unassigns: one EC2 refuses because an
    /// address is no longer on the ENI ([`Error::is_not_assigned`]) is not split. EC2 refuses
    /// the whole call without naming the address; halving it would spend `2·log2(n)` calls of
    /// the account's bucket on what one read of the ENI tells, and the agent reads it.
    pub async fn apply_unassign(&self, change: &Change) -> Vec<ChangeOutcome> {
        self.split_and_apply(change, Reassignment::Allowed, |e, c| {
            worth_splitting(e, c) && !e.is_not_assigned()
        })
        .await
    }

    /// [`Ec2::apply_splitting`] with an IPv4 assign that never moves an address: without
    /// `AllowReassignment`, EC2 itself refuses an address another ENI holds (IPv6 is never
    /// moved by an assign). The node agent's first try: nothing is taken, and no lookup is
    /// spent on the addresses nobody holds.
    pub async fn apply_splitting_exclusive(&self, change: &Change) -> Vec<ChangeOutcome> {
        self.split_and_apply(change, Reassignment::Refused, worth_splitting)
            .await
    }

    async fn split_and_apply(
        &self,
        change: &Change,
        reassign: Reassignment,
        split: fn(&Error, &Change) -> bool,
    ) -> Vec<ChangeOutcome> {
        let mut outcomes = Vec::new();
        let mut pending = vec![change.clone()];
        while let Some(part) = pending.pop() {
            let result = self.call(&part, reassign).await;
            match (&result, part.halves()) {
                (Err(e), Some((left, right))) if split(e, &part) => {
                    tracing::info!(
                        action = part.action(),
                        eni = part.eni(),
                        outcome = "split",
                        error = %e,
                        "EC2 refused {part}; trying its halves"
                    );
                    pending.push(right);
                    pending.push(left);
                }
                _ => outcomes.push(ChangeOutcome {
                    change: part,
                    result,
                }),
            }
        }
        outcomes
    }

    /// Makes a prefix change; when EC2 rejects a call of several prefixes, halves it down to
    /// single prefixes, so that one prefix EC2 refuses (another ENI's, an address inside in use,
    /// no free slot) holds back only itself. An assign never moves anything: EC2 has no
    /// reassignment of prefixes, and the agent wants none.
    pub async fn apply_prefixes(&self, change: &PrefixChange) -> Vec<PrefixOutcome> {
        let mut outcomes = Vec::new();
        let mut pending = vec![change.clone()];
        while let Some(part) = pending.pop() {
            let result = self.call_prefixes(&part).await;
            match (&result, part.halves()) {
                (Err(e), Some((left, right))) if e.kind == ErrorKind::Rejected => {
                    tracing::info!(action = part.action(), eni = part.eni(), outcome = "split", error = %e, "EC2 refused {part}; trying its halves");
                    pending.push(right);
                    pending.push(left);
                }
                _ => outcomes.push(PrefixOutcome {
                    change: part,
                    result,
                }),
            }
        }
        outcomes
    }

    async fn call_prefixes(&self, change: &PrefixChange) -> Result<()> {
        let action = change.action();
        let prefixes: Vec<String> = change.prefixes().iter().map(ToString::to_string).collect();
        let client = self.client().await;
        match change {
            PrefixChange::AssignIpv4 { eni, .. } => client
                .assign_private_ip_addresses()
                .network_interface_id(eni)
                .set_ipv4_prefixes(Some(prefixes))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            PrefixChange::AssignIpv6 { eni, .. } => client
                .assign_ipv6_addresses()
                .network_interface_id(eni)
                .set_ipv6_prefixes(Some(prefixes))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            PrefixChange::UnassignIpv4 { eni, .. } => client
                .unassign_private_ip_addresses()
                .network_interface_id(eni)
                .set_ipv4_prefixes(Some(prefixes))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            PrefixChange::UnassignIpv6 { eni, .. } => client
                .unassign_ipv6_addresses()
                .network_interface_id(eni)
                .set_ipv6_prefixes(Some(prefixes))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
        }
    }

    /// Makes one mutating call (an IPv4 assign moves the address if another ENI holds it).
    pub async fn apply(&self, change: &Change) -> Result<()> {
        self.call(change, Reassignment::Allowed).await
    }

    async fn call(&self, change: &Change, reassign: Reassignment) -> Result<()> {
        let action = change.action();
        let strings = |a: &[IpAddr]| a.iter().map(ToString::to_string).collect::<Vec<_>>();
        let addresses = strings(&change.addresses());
        let client = self.client().await;
        match change {
            Change::AssignIpv4 { eni, .. } => client
                .assign_private_ip_addresses()
                .network_interface_id(eni)
                .set_private_ip_addresses(Some(addresses))
                .allow_reassignment(reassign == Reassignment::Allowed)
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            Change::AssignIpv6 { eni, .. } => client
                .assign_ipv6_addresses()
                .network_interface_id(eni)
                .set_ipv6_addresses(Some(addresses))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            Change::UnassignIpv4 { eni, .. } => client
                .unassign_private_ip_addresses()
                .network_interface_id(eni)
                .set_private_ip_addresses(Some(addresses))
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error(action, e)),
            Change::UnassignIpv6 { eni, .. } => client
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
        ipv4_prefixes: n
            .ipv4_prefixes()
            .iter()
            .filter_map(|p| p.ipv4_prefix()?.parse().ok())
            .collect(),
        ipv6_prefixes: n
            .ipv6_prefixes()
            .iter()
            .filter_map(|p| p.ipv6_prefix()?.parse().ok())
            .collect(),
        no_manage: n.tag_set().iter().any(|t| {
            t.key() == Some(NO_MANAGE_TAG)
                && t.value().is_some_and(|v| v.eq_ignore_ascii_case("true"))
        }),
        instance_id: n
            .attachment()
            .and_then(|a| a.instance_id())
            .map(str::to_string),
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
    fn a_timeout_is_a_timeout_even_when_its_text_names_the_region_or_credentials() {
        let text =
            "dispatch failure: timeout: connecting to the regional endpoint: credentials provider";
        assert_eq!(
            dispatch_stage(true, false, false, text),
            FailureStage::DispatchTimeout
        );
        assert_eq!(
            dispatch_stage(false, true, false, text),
            FailureStage::DispatchUser
        );
        assert_eq!(
            dispatch_stage(false, true, false, "io: connection refused"),
            FailureStage::DispatchIo
        );
        assert_eq!(
            dispatch_stage(false, false, false, "other"),
            FailureStage::DispatchOther
        );
    }

    #[test]
    fn error_messages_keep_ec2s_request_id() {
        let m = error_message(
            Some("InvalidParameterValue"),
            Some("Address is not in the subnet"),
            Some(400),
            Some("5f6b1c2e-0000"),
            "",
        );
        assert_eq!(
            m,
            "InvalidParameterValue: Address is not in the subnet (request id 5f6b1c2e-0000)"
        );
        assert_eq!(
            error_message(None, None, Some(502), None, "x"),
            "HTTP 502 without an EC2 error code"
        );
        assert_eq!(
            error_message(None, None, None, None, "io: refused"),
            "io: refused"
        );
        let body = "<Response><Errors><Error><Code>X</Code></Error></Errors>\
                    <RequestID>ea966190-f9aa-478e-9ede-example</RequestID></Response>";
        assert_eq!(
            request_id_in_body(body),
            Some("ea966190-f9aa-478e-9ede-example")
        );
        assert_eq!(request_id_in_body("<Response></Response>"), None);
        assert_eq!(request_id_in_body("<RequestID></RequestID>"), None);
    }

    #[test]
    fn only_a_rejected_filter_switches_to_the_subnet_scan() {
        use ErrorKind::*;
        assert!(filter_unsupported(
            Rejected,
            Some("InvalidParameterValue"),
            Some(400)
        ));
        // An emulator without the filter: HTTP 500 and no EC2 error code.
        assert!(filter_unsupported(ServerError, None, Some(500)));
        // EC2's own passing troubles.
        assert!(!filter_unsupported(
            ServerError,
            Some("InternalError"),
            Some(500)
        ));
        assert!(!filter_unsupported(
            ServerError,
            Some("Unavailable"),
            Some(503)
        ));
        assert!(!filter_unsupported(ServerError, None, Some(503)));
        assert!(!filter_unsupported(
            Throttled,
            Some("RequestLimitExceeded"),
            Some(503)
        ));
        assert!(!filter_unsupported(Timeout, None, None));
    }

    #[test]
    fn only_a_rejected_batch_of_several_addresses_is_split() {
        let change = |n: u8| Change::AssignIpv4 {
            eni: "eni-a".into(),
            addresses: (1..=n).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect(),
        };
        let error = |kind| Error {
            action: "AssignPrivateIpAddresses",
            kind,
            message: String::new(),
            code: None,
        };
        assert!(worth_splitting(&error(ErrorKind::Rejected), &change(2)));
        assert!(!worth_splitting(&error(ErrorKind::Rejected), &change(1)));
        for kind in [
            ErrorKind::Throttled,
            ErrorKind::ServerError,
            ErrorKind::Timeout,
            ErrorKind::Connection,
            ErrorKind::AuthOrConfig,
        ] {
            assert!(!worth_splitting(&error(kind), &change(4)), "{kind}");
        }
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
