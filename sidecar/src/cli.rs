//! Command line (docs/contract.md): every flag also from env `MULTUS_ENI_<FLAG>`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;

use crate::gate::AgentUrl;
use crate::{Error, Result};

/// Assigns a pod's Multus interface addresses as secondary IPs on the node ENI.
#[derive(Debug, Parser)]
#[command(name = "multus-eni-sidecar", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the addresses of the named interfaces until SIGTERM.
    Run(RunArgs),
}

/// Flags of `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Comma list of pod interfaces to manage (e.g. `net1,n3`); every other interface is
    /// never touched.
    #[arg(long, env = "MULTUS_ENI_INTERFACES", value_delimiter = ',', required = true, num_args = 1..)]
    pub interfaces: Vec<String>,

    /// Plain HTTP address for `GET /readyz` and `GET /healthz`. In a pod the webhook gives the
    /// pod IP (`$(POD_IP):9811`, an IPv6 one without brackets too), so the probe is not
    /// reachable on the Multus interfaces' addresses.
    #[arg(long, env = "MULTUS_ENI_PROBE_ADDR", default_value = "0.0.0.0:9811", value_parser = parse_probe_addr)]
    pub probe_addr: SocketAddr,

    /// On SIGTERM, unassign the managed addresses that are still on their ENI.
    #[arg(long, env = "MULTUS_ENI_RELEASE_ON_EXIT", default_value_t = true, action = ArgAction::Set)]
    pub release_on_exit: bool,

    /// Slow re-read of the ENIs (and interfaces) that heals drift.
    #[arg(long, env = "MULTUS_ENI_RESYNC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Upper bound for the release on SIGTERM.
    #[arg(long, env = "MULTUS_ENI_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log output format.
    #[arg(long, env = "MULTUS_ENI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Agent mode: the node agent on this Unix socket makes the EC2 calls; the sidecar
    /// needs no AWS credentials. Unset: direct mode, which only `multus-eni-sidecar` has
    /// (`multus-eni-sidecar-agent-mode` then refuses to start).
    #[arg(long, env = "MULTUS_ENI_AGENT_SOCKET")]
    pub agent_socket: Option<std::path::PathBuf>,

    /// The HTTP startup gate: ask the node agent at `http://HOST:PORT` (its metrics port,
    /// `http://$(HOST_IP):9812` in a pod) whether the pod's addresses are routable, read-only;
    /// no socket, no hostPath, no credentials. The agent finds the addresses itself.
    #[arg(long, env = "MULTUS_ENI_AGENT_URL", conflicts_with = "agent_socket", value_parser = parse_agent_url)]
    pub agent_url: Option<AgentUrl>,
}

/// What the sidecar does, from `--agent-url` / `--agent-socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Access {
    /// `--agent-url`: only wait for the agent's word (the HTTP startup gate).
    Gate(AgentUrl),
    /// `--agent-socket`: claim the addresses from the agent.
    Agent(std::path::PathBuf),
    /// Neither: call EC2 itself.
    Direct,
}

impl RunArgs {
    /// The mode these flags select.
    pub fn ec2_access(&self) -> Ec2Access {
        match (&self.agent_url, &self.agent_socket) {
            (Some(url), _) => Ec2Access::Gate(url.clone()),
            (None, Some(socket)) => Ec2Access::Agent(socket.clone()),
            (None, None) => Ec2Access::Direct,
        }
    }
}

fn parse_agent_url(s: &str) -> std::result::Result<AgentUrl, String> {
    s.parse()
}

/// `HOST:PORT` as a socket address; an IPv6 host may come without brackets (`fd00::5:9811`,
/// what `$(POD_IP):9811` expands to for an IPv6 pod): the last `:` then separates the port.
fn parse_probe_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let bad = || format!("{s:?} is not HOST:PORT with HOST an IP address (e.g. 10.0.0.5:9811)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let ip: std::net::IpAddr = host.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

impl Cli {
    /// Runs the chosen subcommand to completion on a single-threaded runtime (small RSS,
    /// near-zero idle CPU): the gate with `--agent-url`, agent mode with `--agent-socket`,
    /// direct mode without either (when built with the `direct` feature). The
    /// `multus-eni-sidecar` binary.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Run(args) => {
                init_logging(args.log_format);
                match args.ec2_access() {
                    Ec2Access::Gate(url) => run_gate(args, url),
                    Ec2Access::Agent(socket) => run_agent_mode(args, socket),
                    Ec2Access::Direct => run_direct(args),
                }
            }
        }
    }

    /// Runs the gate or agent mode only, and refuses to start without `--agent-url` or
    /// `--agent-socket` ([`Error::DirectModeNotBuilt`]) whatever the crate's features: the
    /// `multus-eni-sidecar-agent-mode` binary. In a workspace build this library is compiled
    /// with `direct` (another member asks for it); since this path never reaches
    /// [`Cli::run`]'s direct branch, the linker drops the AWS SDK from that binary anyway,
    /// and it behaves the same in every build.
    pub fn run_agent_mode_only(self) -> Result<()> {
        match self.command {
            Command::Run(args) => {
                // Checked before logging starts: a usage error, reported once by `main`.
                match args.ec2_access() {
                    Ec2Access::Direct => Err(Error::DirectModeNotBuilt),
                    Ec2Access::Gate(url) => {
                        init_logging(args.log_format);
                        run_gate(args, url)
                    }
                    Ec2Access::Agent(socket) => {
                        init_logging(args.log_format);
                        run_agent_mode(args, socket)
                    }
                }
            }
        }
    }
}

/// The single-threaded runtime of either mode (small RSS, near-zero idle CPU).
fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}

/// Agent mode: no EC2 client, no TLS provider (small RSS).
fn run_agent_mode(args: RunArgs, socket: std::path::PathBuf) -> Result<()> {
    current_thread_runtime()?.block_on(crate::agent_mode::run(args, socket))
}

/// The HTTP startup gate: no EC2 client, no TLS, no socket.
fn run_gate(args: RunArgs, url: AgentUrl) -> Result<()> {
    current_thread_runtime()?.block_on(crate::gate::run(args, url))
}

/// Direct mode: the sidecar's own EC2 client.
#[cfg(feature = "direct")]
fn run_direct(args: RunArgs) -> Result<()> {
    // Installed once: a second install is a harmless no-op error.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    current_thread_runtime()?.block_on(crate::run::run(args))
}

#[cfg(not(feature = "direct"))]
fn run_direct(_: RunArgs) -> Result<()> {
    Err(Error::DirectModeNotBuilt)
}

/// The log filter when `RUST_LOG` is unset or unreadable: the SDK's own info lines are noise.
const DEFAULT_LOG_FILTER: &str = "info,aws_config=warn,aws_smithy_runtime=warn";

/// `RUST_LOG` in `target=level,...` form. `Targets` rather than `EnvFilter`: the sidecar runs
/// once per pod and needs no span or field filters, so it does without a regex engine.
fn log_filter(rust_log: Option<&str>) -> (Targets, Option<String>) {
    let default = || {
        DEFAULT_LOG_FILTER
            .parse::<Targets>()
            .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
    };
    match rust_log.map(str::parse::<Targets>) {
        None => (default(), None),
        Some(Ok(targets)) => (targets, None),
        Some(Err(e)) => (
            default(),
            Some(format!(
                "RUST_LOG ignored ({e}); using {DEFAULT_LOG_FILTER}"
            )),
        ),
    }
}

fn init_logging(format: LogFormat) {
    let (filter, problem) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish()
                .with(filter),
        ),
        LogFormat::Text => Box::new(builder.finish().with(filter)),
    };
    // Only fails when a subscriber is already set (a second run in one process).
    let _ = tracing::subscriber::set_global_default(subscriber);
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            Command::Run(a) => Ok(a),
        }
    }

    #[test]
    fn interfaces_alone_start_a_sidecar_with_contract_defaults() {
        let a = parse(&["multus-eni-sidecar", "run", "--interfaces", "net1,n3"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.interfaces, vec!["net1", "n3"]);
        assert_eq!(a.probe_addr.to_string(), "0.0.0.0:9811");
        assert!(a.release_on_exit);
        assert_eq!(a.resync_interval, Duration::from_secs(60));
        assert_eq!(a.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.agent_socket, None);
    }

    #[test]
    fn agent_socket_selects_agent_mode() {
        let a = parse(&[
            "multus-eni-sidecar",
            "run",
            "--interfaces=net1",
            "--agent-socket=/run/multus-eni/agent.sock",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            a.agent_socket,
            Some(std::path::PathBuf::from("/run/multus-eni/agent.sock"))
        );
    }

    #[test]
    fn agent_url_selects_the_gate_and_excludes_the_socket() {
        let a = parse(&[
            "multus-eni-sidecar",
            "run",
            "--interfaces=net1",
            "--agent-url=http://10.0.0.7:9812",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(a.ec2_access(), Ec2Access::Gate(ref u) if u.authority() == "10.0.0.7:9812"),
            "{:?}",
            a.ec2_access()
        );
        assert!(
            parse(&[
                "multus-eni-sidecar",
                "run",
                "--interfaces=net1",
                "--agent-url=http://10.0.0.7:9812",
                "--agent-socket=/run/multus-eni/agent.sock",
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "multus-eni-sidecar",
                "run",
                "--interfaces=net1",
                "--agent-url=https://10.0.0.7:9812",
            ])
            .is_err()
        );
        let direct = parse(&["multus-eni-sidecar", "run", "--interfaces=net1"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(direct.ec2_access(), Ec2Access::Direct);
    }

    #[test]
    fn the_probe_address_takes_an_expanded_pod_ip_of_either_family() {
        let addr = |s: &str| parse_probe_addr(s).map(|a| a.to_string());
        assert_eq!(addr("10.1.2.3:9811").as_deref(), Ok("10.1.2.3:9811"));
        assert_eq!(addr("[fd00::5]:9811").as_deref(), Ok("[fd00::5]:9811"));
        // `$(POD_IP):9811` for an IPv6 pod.
        assert_eq!(addr("fd00::5:9811").as_deref(), Ok("[fd00::5]:9811"));
        for bad in [
            "$(POD_IP):9811",
            ":9811",
            "10.1.2.3",
            "pod:9811",
            "10.1.2.3:99999",
        ] {
            assert!(parse_probe_addr(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_injected_form_parses() {
        let a = parse(&[
            "multus-eni-sidecar",
            "run",
            "--interfaces=net1,n3",
            "--probe-addr=0.0.0.0:9811",
            "--release-on-exit",
            "false",
            "--resync-interval",
            "500ms",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!a.release_on_exit);
        assert_eq!(a.resync_interval, Duration::from_millis(500));
    }

    #[test]
    fn rust_log_sets_levels_per_target_and_a_bad_one_falls_back_with_a_reason() {
        use tracing::Level;
        let (default, problem) = log_filter(None);
        assert!(problem.is_none());
        assert!(default.would_enable("multus_eni_sidecar::run", &Level::INFO));
        assert!(!default.would_enable("aws_config::imds", &Level::INFO));

        let (debug, _) = log_filter(Some("warn,multus_eni_sidecar=debug"));
        assert!(debug.would_enable("multus_eni_sidecar::run", &Level::DEBUG));
        assert!(!debug.would_enable("hyper", &Level::INFO));

        let (fallback, problem) = log_filter(Some("multus_eni_sidecar=loud"));
        assert!(fallback.would_enable("multus_eni_sidecar", &Level::INFO));
        assert!(problem.is_some_and(|p| p.contains("RUST_LOG ignored")));
    }

    #[test]
    fn the_agent_mode_only_entry_refuses_to_run_without_a_socket() {
        // Whatever the features: this test build has `direct`, the refusal must not depend on it.
        let cli =
            Cli::try_parse_from(["multus-eni-sidecar-agent-mode", "run", "--interfaces=net1"])
                .unwrap_or_else(|e| panic!("{e}"));
        let err = cli.run_agent_mode_only().err();
        assert!(
            matches!(err, Some(Error::DirectModeNotBuilt)),
            "expected DirectModeNotBuilt, got {err:?}"
        );
        let message = Error::DirectModeNotBuilt.to_string();
        assert!(message.contains("--agent-socket"), "{message}");
        assert!(message.contains("--agent-url"), "{message}");
        assert!(
            message.contains("/usr/local/bin/multus-eni-sidecar"),
            "{message}"
        );
    }

    #[test]
    fn interfaces_are_required_and_zero_durations_rejected() {
        assert!(parse(&["multus-eni-sidecar", "run"]).is_err());
        assert!(
            parse(&[
                "multus-eni-sidecar",
                "run",
                "--interfaces=net1",
                "--resync-interval=0s"
            ])
            .is_err()
        );
    }
}
