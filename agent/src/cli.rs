//! Command line (docs/contract.md): every flag also from env `MULTUS_ENI_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use tracing_subscriber::EnvFilter;

use crate::plan::Pods;
use crate::{Error, Result};

/// Node agent: assigns the node's pods' Multus addresses on its ENIs, batched per ENI.
#[derive(Debug, Parser)]
#[command(name = "multus-eni-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch this node's pods and serve their sidecars until SIGTERM.
    // Boxed: `run`'s flags outgrow `status`'s many times over (clippy::large_enum_variant).
    Run(Box<RunArgs>),
    /// Print a running agent's table of the node (run it in the agent's pod).
    Status(StatusArgs),
}

/// Flags of `status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The agent's HTTP address (`--metrics-addr` of `run`).
    #[arg(long, env = "MULTUS_ENI_STATUS_ADDR", default_value = "127.0.0.1:9812")]
    pub addr: SocketAddr,

    /// `table` for humans, `json` as `/status` serves it.
    #[arg(long, value_enum, default_value_t = StatusOutput::Table)]
    pub output: StatusOutput,
}

/// Output of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusOutput {
    Table,
    Json,
}

/// Flags of `run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Unix socket the sidecars connect to (created mode 0666).
    #[arg(
        long,
        env = "MULTUS_ENI_SOCKET",
        default_value = "/run/multus-eni/agent.sock"
    )]
    pub socket: PathBuf,

    /// Plain HTTP address for `/metrics`, `/healthz`, `/readyz`, `/v1/addresses` (the HTTP
    /// gate) and `/status` (loopback callers only). `[::]` is dual-stack (IPv4 callers too); on
    /// a host without IPv6 it falls back to `0.0.0.0`.
    #[arg(long, env = "MULTUS_ENI_METRICS_ADDR", default_value = "[::]:9812")]
    pub metrics_addr: SocketAddr,

    /// Most HTTP connections at once; more are closed at accept.
    #[arg(long, env = "MULTUS_ENI_MAX_HTTP_CONNECTIONS", default_value_t = 1024)]
    pub max_http_connections: usize,

    /// Most `/v1/addresses` requests waiting for a change at once; more are answered at once.
    #[arg(long, env = "MULTUS_ENI_MAX_LONG_POLLS", default_value_t = 768)]
    pub max_long_polls: usize,

    /// An HTTP connection whose request headers have not arrived within this is closed, idle
    /// keep-alive connections included.
    #[arg(long, env = "MULTUS_ENI_HTTP_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Directory of the node's pod network namespaces, watched: what they hold on this
    /// instance's Multus ENIs is assigned, what they let go of is released, and only callers in
    /// one of them are served. Missing or unreadable: not ready, nothing released.
    #[arg(long, env = "MULTUS_ENI_NETNS_DIR", default_value = "/var/run/netns")]
    pub netns_dir: PathBuf,

    /// This instance's id (`i-...`); by default read from IMDSv2. Only ENIs attached to it are
    /// ever called on.
    #[arg(long, env = "MULTUS_ENI_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Which pods to manage: `all` (every pod namespace of the node, with or without a
    /// sidecar) or `sidecar` (only pods whose sidecar connected).
    #[arg(long, env = "MULTUS_ENI_PODS", value_enum, default_value_t = Pods::All)]
    pub pods: Pods,

    /// Longest request line on the socket; a longer one closes the connection.
    #[arg(long, env = "MULTUS_ENI_MAX_LINE_BYTES", default_value_t = 65536)]
    pub max_line_bytes: usize,

    /// Most socket connections at once; more are closed at accept.
    #[arg(long, env = "MULTUS_ENI_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Most socket connections from one pod network namespace.
    #[arg(long, env = "MULTUS_ENI_MAX_CONNECTIONS_PER_POD", default_value_t = 8)]
    pub max_connections_per_pod: usize,

    /// Most answers queued for a connection that does not read them; then it is closed.
    #[arg(long, env = "MULTUS_ENI_MAX_QUEUED_ANSWERS", default_value_t = 64)]
    pub max_queued_answers: usize,

    /// Most network namespaces opened or read at once.
    #[arg(long, env = "MULTUS_ENI_MAX_NETNS_READS", default_value_t = 8)]
    pub max_netns_reads: usize,

    /// Where the agent checkpoints the node's ENIs and what it assigned.
    #[arg(
        long,
        env = "MULTUS_ENI_STATE_DIR",
        default_value = "/var/lib/multus-eni"
    )]
    pub state_dir: PathBuf,

    /// How long an address on the instance's Multus ENIs that no namespace of the node holds
    /// (a leak from while the agent was down) waits before it is unassigned. Only the agent's
    /// own addresses (it assigned them, or saw a pod of this node hold them) are reclaimed.
    #[arg(long, env = "MULTUS_ENI_RECLAIM_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub reclaim_after: Duration,

    /// Reclaim `unowned` addresses too: on the instance's Multus ENIs, but no pod of this node
    /// was ever seen holding them (left by a tool migrated from, a DPDK pod without a netdev, a
    /// runtime that keeps namespaces elsewhere). Off by default: counted and shown, never
    /// unassigned. For a one-off clean-up (docs/install.md, migrations).
    #[arg(long, env = "MULTUS_ENI_RECLAIM_UNOWNED")]
    pub reclaim_unowned: bool,

    /// Addresses inside these ranges are never assigned, released or reclaimed: floating IPs a
    /// CNF moves itself. Comma-separated CIDRs.
    #[arg(long, env = "MULTUS_ENI_IGNORE_CIDRS", value_delimiter = ',')]
    pub ignore_cidrs: Vec<IpNet>,

    /// Prefix mode: ranges whose addresses the IPAM hands out in per-node aligned blocks
    /// (whereabouts node slices, NVIDIA k8s IPAM). For a pod address inside one, the delegated
    /// prefix containing it (/28 IPv4, /80 IPv6) is assigned to the ENI instead of the address:
    /// one call per block, none per pod. Comma-separated CIDRs, each /28 (/80) or shorter.
    #[arg(long, env = "MULTUS_ENI_PREFIX_RANGES", value_delimiter = ',', value_parser = crate::prefix::parse_range)]
    pub prefix_ranges: Vec<IpNet>,

    /// How long a prefix stays on its ENI after the last pod with an address in it left, so a
    /// rollout reuses it without a call.
    #[arg(long, env = "MULTUS_ENI_PREFIX_RELEASE_AFTER", default_value = "10m", value_parser = parse_duration)]
    pub prefix_release_after: Duration,

    /// Most `DescribeNetworkInterfaces` calls per resync interval that look up MACs of the
    /// node's pod interfaces that are none of this instance's ENIs (the Describe bucket is the
    /// account's, shared with the VPC CNI). What is left waits for the next interval.
    #[arg(long, env = "MULTUS_ENI_MAX_MAC_LOOKUPS", default_value_t = 10)]
    pub max_mac_lookups: usize,

    /// Period of the re-read of the instance's ENIs (one Describe) and of every namespace (a
    /// safety net: changes are seen as events).
    #[arg(long, env = "MULTUS_ENI_RESYNC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Shortest time between the starts of two EC2 calls for one ENI: what arrives sooner waits
    /// and shares the next call. The first change after a quiet period goes at once. The
    /// account's Assign bucket refills 5 calls/s for all nodes: 5 s keeps 50 nodes rolling out
    /// at once near it; raise it for more (docs/scale.md, "Pacing"); `0s` leaves group commit
    /// alone.
    #[arg(long, env = "MULTUS_ENI_BATCH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,

    /// First wait after EC2 refuses the agent's credentials, region or permissions (the agent
    /// is not ready then: an operator has to act); doubles, with jitter, up to 5 min.
    #[arg(long, env = "MULTUS_ENI_AUTH_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub auth_backoff: Duration,

    /// Log output format.
    #[arg(long, env = "MULTUS_ENI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
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
    /// Runs the chosen subcommand on a single-threaded runtime (netns reads get threads of
    /// their own).
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Status(args) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::Runtime)?;
                let status = runtime
                    .block_on(crate::status::fetch(args.addr))
                    .map_err(Error::Status)?;
                match args.output {
                    StatusOutput::Table => print!("{}", status.table()),
                    StatusOutput::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&status)
                            .map_err(|e| Error::Status(e.to_string()))?
                    ),
                }
                Ok(())
            }
            Command::Run(args) => {
                init_logging(args.log_format);
                // Installed once: a second install is a harmless no-op error.
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::Runtime)?;
                runtime.block_on(crate::server::run(*args))
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<RunArgs, clap::Error> {
        match Cli::try_parse_from(args)?.command {
            Command::Run(a) => Ok(*a),
            Command::Status(_) => panic!("not run"),
        }
    }

    #[test]
    fn run_alone_uses_the_contract_defaults() {
        let a = parse(&["multus-eni-agent", "run"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.socket, PathBuf::from("/run/multus-eni/agent.sock"));
        assert_eq!(a.metrics_addr.to_string(), "[::]:9812");
        assert!(!a.reclaim_unowned);
        assert!(a.ignore_cidrs.is_empty());
        assert!(a.prefix_ranges.is_empty());
        assert_eq!(a.prefix_release_after, Duration::from_secs(600));
        assert_eq!(
            (a.max_http_connections, a.max_long_polls, a.max_mac_lookups),
            (1024, 768, 10)
        );
        assert_eq!(a.http_header_timeout, Duration::from_secs(30));
        assert_eq!(a.netns_dir, PathBuf::from("/var/run/netns"));
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/multus-eni"));
        assert_eq!(a.reclaim_after, Duration::from_secs(300));
        assert_eq!(a.resync_interval, Duration::from_secs(60));
        assert_eq!(a.auth_backoff, crate::health::AUTH_RETRY_MIN);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.pods, Pods::All);
        assert_eq!(a.instance_id, None);
        assert_eq!(
            (
                a.max_line_bytes,
                a.max_connections,
                a.max_connections_per_pod,
                a.max_queued_answers,
                a.max_netns_reads
            ),
            (65536, 4096, 8, 64, 8)
        );
    }

    #[test]
    fn ignore_cidrs_take_a_comma_separated_list() {
        let a = parse(&[
            "multus-eni-agent",
            "run",
            "--ignore-cidrs=10.0.9.0/24,2001:db8:9::/64",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.ignore_cidrs.len(), 2);
        assert!(parse(&["multus-eni-agent", "run", "--ignore-cidrs=10.0.9.0"]).is_err());
    }

    #[test]
    fn prefix_ranges_take_a_comma_separated_list_of_whole_prefixes() {
        let a = parse(&[
            "multus-eni-agent",
            "run",
            "--prefix-ranges=10.0.8.0/24,2001:db8:8::/64",
            "--prefix-release-after=3s",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.prefix_ranges.len(), 2);
        assert_eq!(a.prefix_release_after, Duration::from_secs(3));
        assert!(parse(&["multus-eni-agent", "run", "--prefix-ranges=10.0.8.0/29"]).is_err());
        assert!(parse(&["multus-eni-agent", "run", "--prefix-ranges=2001:db8::/96"]).is_err());
    }

    #[test]
    fn zero_durations_are_rejected() {
        assert!(parse(&["multus-eni-agent", "run", "--reclaim-after=0s"]).is_err());
        assert!(parse(&["multus-eni-agent", "run", "--resync-interval", "500ms"]).is_ok());
    }
}
