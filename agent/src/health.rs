//! How EC2 has been answering the node: the one node-wide backoff after a throttled or failed
//! call (the account's buckets are shared, so the node's pods do not compete), a longer one
//! while EC2 refuses the agent's credentials (an operator has to act: the agent is not ready
//! then), the last error for `multus-eni-agent status`, and the call counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use multus_eni_ec2::eni::ErrorKind;

use crate::metrics::{CallLabels, Metrics};

/// First wait after a throttled or failed call; doubles (with jitter) to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two attempts (before jitter).
pub const RETRY_MAX: Duration = Duration::from_secs(8);
/// After a credential, region or permission error: minutes are fine. The first wait is
/// `--auth-backoff` (default [`AUTH_RETRY_MIN`]).
pub const AUTH_RETRY_MIN: Duration = Duration::from_secs(30);
pub const AUTH_RETRY_MAX: Duration = Duration::from_secs(300);

fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The `kind` label of a call that is not a prefix call.
fn kind_of(action: &str) -> &'static str {
    if action.starts_with("Describe") {
        "describe"
    } else {
        "address"
    }
}

/// EC2's recent answers and the node's backoff.
pub struct Ec2Health {
    metrics: Arc<Metrics>,
    backoff: ExponentialBackoff,
    auth: ExponentialBackoff,
    /// First and longest wait of `auth`.
    auth_range: (Duration, Duration),
    until: Option<Instant>,
    auth_failing: bool,
    last_error: Option<String>,
}

impl Ec2Health {
    /// `auth_first`: the first wait after a credential error (`--auth-backoff`); it doubles up
    /// to [`AUTH_RETRY_MAX`], or stays at `auth_first` if that is longer.
    pub fn new(metrics: Arc<Metrics>, auth_first: Duration) -> Self {
        let auth_range = (auth_first, AUTH_RETRY_MAX.max(auth_first));
        Self {
            metrics,
            backoff: backoff(RETRY_MIN, RETRY_MAX),
            auth: backoff(auth_range.0, auth_range.1),
            auth_range,
            until: None,
            auth_failing: false,
            last_error: None,
        }
    }

    /// A call succeeded: credentials work, the next failure starts the backoff over.
    pub fn success(&mut self, action: &'static str) {
        self.succeeded(action, kind_of(action));
    }

    /// A prefix call (prefix mode) succeeded.
    pub fn prefix_success(&mut self, action: &'static str) {
        self.succeeded(action, "prefix");
    }

    fn succeeded(&mut self, action: &'static str, kind: &'static str) {
        self.metrics
            .calls
            .get_or_create(&CallLabels {
                action,
                outcome: "success",
                kind,
            })
            .inc();
        if self.auth_failing {
            tracing::info!(
                action,
                outcome = "success",
                "EC2 accepts the agent's credentials again"
            );
        }
        self.auth_failing = false;
        self.metrics.ec2_auth_failing.set(0);
        self.backoff = backoff(RETRY_MIN, RETRY_MAX);
        self.auth = backoff(self.auth_range.0, self.auth_range.1);
    }

    /// A call failed.
    pub fn failure(&mut self, action: &'static str, e: &multus_eni_ec2::Error) {
        self.failed(action, kind_of(action), e);
    }

    /// A prefix call (prefix mode) failed.
    pub fn prefix_failure(&mut self, action: &'static str, e: &multus_eni_ec2::Error) {
        self.failed(action, "prefix", e);
    }

    fn failed(&mut self, action: &'static str, kind: &'static str, e: &multus_eni_ec2::Error) {
        let outcome = match e.kind {
            ErrorKind::Throttled => "throttled",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection_error",
            ErrorKind::AuthOrConfig => "auth_or_config",
            ErrorKind::Rejected => "rejected",
        };
        if e.kind == ErrorKind::Throttled {
            self.metrics.throttles.inc();
        }
        if e.kind == ErrorKind::AuthOrConfig {
            self.auth_failing = true;
            self.metrics.ec2_auth_failing.set(1);
        }
        self.last_error = Some(e.to_string());
        self.metrics
            .calls
            .get_or_create(&CallLabels {
                action,
                outcome,
                kind,
            })
            .inc();
    }

    /// Starts the node-wide wait after a failure of `kind`, unless one is running; returns its
    /// length (for the timer).
    pub fn back_off(&mut self, kind: ErrorKind, now: Instant) -> Option<Duration> {
        if self.until.is_some() {
            return None;
        }
        let wait = if kind == ErrorKind::AuthOrConfig {
            self.auth.next().unwrap_or(self.auth_range.1)
        } else {
            self.backoff.next().unwrap_or(RETRY_MAX)
        };
        tracing::info!(action = "backoff", reason = %kind, wait_ms = wait.as_millis() as u64, "node-wide backoff");
        self.until = Some(now + wait);
        Some(wait)
    }

    /// Whether calls wait now.
    pub fn waiting(&self) -> bool {
        self.until.is_some()
    }

    /// A timer fired: returns true when the wait just ended.
    pub fn wake(&mut self, now: Instant) -> bool {
        if self.until.is_some_and(|u| u <= now) {
            self.until = None;
            return true;
        }
        false
    }

    pub fn auth_failing(&self) -> bool {
        self.auth_failing
    }

    pub fn last_error(&self) -> Option<&String> {
        self.last_error.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(kind: ErrorKind) -> multus_eni_ec2::Error {
        multus_eni_ec2::Error {
            action: "DescribeNetworkInterfaces",
            kind,
            message: "x".into(),
            code: None,
        }
    }

    #[test]
    fn credential_errors_make_the_agent_wait_minutes_until_a_call_succeeds() {
        let mut h = Ec2Health::new(Arc::new(Metrics::new()), AUTH_RETRY_MIN);
        let t0 = Instant::now();
        h.failure("DescribeNetworkInterfaces", &error(ErrorKind::AuthOrConfig));
        assert!(h.auth_failing());
        let wait = h.back_off(ErrorKind::AuthOrConfig, t0).unwrap_or_default();
        assert!(wait >= AUTH_RETRY_MIN / 2, "{wait:?}");
        assert_eq!(
            h.back_off(ErrorKind::Throttled, t0),
            None,
            "one wait at a time"
        );
        assert!(h.waiting() && !h.wake(t0));
        assert!(h.wake(t0 + wait));
        h.success("DescribeNetworkInterfaces");
        assert!(!h.auth_failing());
        let short = h.back_off(ErrorKind::Throttled, t0).unwrap_or_default();
        assert!(short <= RETRY_MIN * 2, "{short:?}");
        assert!(h.last_error().is_some_and(|e| e.contains("credentials")));
    }
}
