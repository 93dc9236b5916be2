//! Command line: `serve`, `inject`, `certs`. Every flag can also come from `MULTUS_ENI_<FLAG>`.

use crate::certs::{CertsRequest, write_certs};
use crate::inject::{Config, DirectSettings, Ec2Access, SidecarMode, SidecarResources};
use crate::manifest::inject_stream;
use crate::serve::{ConnectionLimits, ServeConfig};
use crate::telemetry::{self, LogFormat};
use crate::tls::crypto_provider;
use crate::{Error, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Injects the multus-eni sidecar into pods with Multus secondary networks.
#[derive(Debug, Parser)]
#[command(name = "multus-eni-webhook", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the mutating admission webhook (HTTPS `/mutate`, plain-HTTP metrics).
    Serve(ServeArgs),
    /// Apply the webhook's mutation offline to a YAML stream (like `istioctl kube-inject`).
    Inject(InjectArgs),
    /// Write a CA, the serving certificate Secret and the caBundle patch (no cert-manager).
    Certs(CertsArgs),
}

/// What to inject; shared by `serve` and `inject` so both mutate identically.
#[derive(Debug, Clone, Args)]
pub struct SidecarArgs {
    /// Image of the injected sidecar container.
    #[arg(long, env = "MULTUS_ENI_SIDECAR_IMAGE")]
    pub sidecar_image: String,
    /// `native`: first init container with restartPolicy Always (Kubernetes ≥ 1.29);
    /// `legacy`: appended to containers.
    #[arg(
        long,
        env = "MULTUS_ENI_SIDECAR_MODE",
        value_enum,
        default_value = "native"
    )]
    pub sidecar_mode: SidecarMode,
    /// Count of Multus default networks (clusterNetwork + defaultNetworks beyond eth0) that
    /// shift the `net<k>` numbering of unnamed attachments.
    #[arg(long, env = "MULTUS_ENI_DEFAULT_NETWORKS", default_value_t = 0)]
    pub default_networks: u32,
    /// Port of the sidecar's /readyz and /healthz.
    #[arg(long, env = "MULTUS_ENI_SIDECAR_PROBE_PORT", default_value_t = 9811)]
    pub sidecar_probe_port: u16,
    /// AWS region passed to the sidecar as AWS_REGION (unset: the SDK asks IMDS).
    #[arg(long, env = "MULTUS_ENI_AWS_REGION")]
    pub aws_region: Option<String>,
    /// IAM role for the sidecar only (IRSA): adds AWS_ROLE_ARN and a projected
    /// service-account token (audience sts.amazonaws.com) to the sidecar container alone.
    #[arg(long, env = "MULTUS_ENI_SIDECAR_ROLE_ARN")]
    pub sidecar_role_arn: Option<String>,
    /// Sidecar CPU request.
    #[arg(long, env = "MULTUS_ENI_SIDECAR_CPU_REQUEST", default_value = "10m")]
    pub sidecar_cpu_request: String,
    /// Sidecar memory request.
    #[arg(
        long,
        env = "MULTUS_ENI_SIDECAR_MEMORY_REQUEST",
        default_value = "16Mi"
    )]
    pub sidecar_memory_request: String,
    /// Sidecar CPU limit.
    #[arg(long, env = "MULTUS_ENI_SIDECAR_CPU_LIMIT", default_value = "100m")]
    pub sidecar_cpu_limit: String,
    /// Sidecar memory limit.
    #[arg(long, env = "MULTUS_ENI_SIDECAR_MEMORY_LIMIT", default_value = "64Mi")]
    pub sidecar_memory_limit: String,
    /// `agent`: the sidecar claims its addresses from the node agent (multus-eni-agent
    /// DaemonSet) over its Unix socket (a hostPath volume) and gets no AWS settings; `gate`:
    /// the sidecar only asks the agent over HTTP on the node's address (no volume); `direct`:
    /// the sidecar calls EC2 itself. `/mutate/gate` injects `gate` unless this is `direct`.
    #[arg(
        long,
        env = "MULTUS_ENI_EC2_ACCESS",
        value_enum,
        default_value = "agent"
    )]
    pub ec2_access: Ec2Access,
    /// Host directory of the node agent's socket, mounted read-only into the sidecar.
    #[arg(
        long,
        env = "MULTUS_ENI_AGENT_SOCKET_DIR",
        default_value = "/run/multus-eni"
    )]
    pub agent_socket_dir: String,
    /// The node agent's HTTP port on the node (its metrics address): the gate asks
    /// `http://$(HOST_IP):<port>/v1/addresses`.
    #[arg(long, env = "MULTUS_ENI_AGENT_PORT", default_value_t = 9812, value_parser = clap::value_parser!(u16).range(1..))]
    pub agent_port: u16,
    /// How long the native sidecar's startup probe waits for the pod's addresses to become
    /// routable before the kubelet restarts the sidecar (its failureThreshold, at 1 s a probe).
    #[arg(long, env = "MULTUS_ENI_SIDECAR_STARTUP_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    pub sidecar_startup_timeout: std::time::Duration,
    /// Direct mode: the sidecar's --resync-interval (unset: the sidecar's default, 60s).
    #[arg(long, env = "MULTUS_ENI_SIDECAR_RESYNC_INTERVAL", value_parser = duration_text)]
    pub sidecar_resync_interval: Option<String>,
    /// Direct mode: the sidecar's --shutdown-timeout (unset: the sidecar's default, 10s).
    #[arg(long, env = "MULTUS_ENI_SIDECAR_SHUTDOWN_TIMEOUT", value_parser = duration_text)]
    pub sidecar_shutdown_timeout: Option<String>,
    /// Direct mode: the sidecar's --release-on-exit (unset: the sidecar's default, true).
    #[arg(long, env = "MULTUS_ENI_SIDECAR_RELEASE_ON_EXIT")]
    pub sidecar_release_on_exit: Option<bool>,
    /// Direct mode: HTTPS_PROXY for the sidecar's calls to EC2 and STS.
    #[arg(long, env = "MULTUS_ENI_SIDECAR_HTTPS_PROXY")]
    pub sidecar_https_proxy: Option<String>,
    /// Direct mode: NO_PROXY for the sidecar (e.g. 169.254.169.254 so IMDS is never proxied).
    #[arg(long, env = "MULTUS_ENI_SIDECAR_NO_PROXY")]
    pub sidecar_no_proxy: Option<String>,
    /// Direct mode: AWS_ENDPOINT_URL_EC2 for the sidecar (an EC2 interface VPC endpoint).
    #[arg(long, env = "MULTUS_ENI_SIDECAR_EC2_ENDPOINT")]
    pub sidecar_ec2_endpoint: Option<String>,
    /// A Secret (type kubernetes.io/dockerconfigjson) added to the imagePullSecrets of every
    /// injected pod, so the sidecar image can come from a private registry. Repeatable; the
    /// env variable takes a comma list. The Secret must exist in each opted-in namespace.
    #[arg(
        long = "image-pull-secret",
        value_name = "NAME",
        env = "MULTUS_ENI_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    pub image_pull_secrets: Vec<String>,
}

/// Accepts a humantime duration (`60s`, `5m`) and keeps the operator's spelling, so the sidecar
/// is given exactly what was configured and a typo fails at start-up, not in every pod.
fn duration_text(text: &str) -> std::result::Result<String, humantime::DurationError> {
    humantime::parse_duration(text).map(|_| text.to_owned())
}

/// The `--image-pull-secret` names, blanks dropped and each kept once in the given order. A
/// name the API server would refuse (not a DNS subdomain) fails at start-up, not in every pod.
fn pull_secret_names(names: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if !is_dns_subdomain(name) {
            return Err(Error::Config(format!(
                "--image-pull-secret {name:?} (env MULTUS_ENI_IMAGE_PULL_SECRETS) is not a \
                 Secret name: lower-case letters, digits, '-' and '.', at most 253 characters"
            )));
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// RFC 1123 subdomain, what Kubernetes requires of a Secret's name.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

impl SidecarArgs {
    /// The injection configuration these flags describe; an error names the flag to add when
    /// a combination cannot work.
    pub fn config(&self) -> Result<Config> {
        let non_empty = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
        let config = Config {
            sidecar_image: self.sidecar_image.clone(),
            mode: self.sidecar_mode,
            default_networks: self.default_networks,
            probe_port: self.sidecar_probe_port,
            aws_region: self.aws_region.clone().filter(|r| !r.is_empty()),
            sidecar_role_arn: self.sidecar_role_arn.clone().filter(|r| !r.is_empty()),
            resources: SidecarResources {
                cpu_request: self.sidecar_cpu_request.clone(),
                memory_request: self.sidecar_memory_request.clone(),
                cpu_limit: self.sidecar_cpu_limit.clone(),
                memory_limit: self.sidecar_memory_limit.clone(),
            },
            ec2_access: self.ec2_access,
            agent_socket_dir: self.agent_socket_dir.clone(),
            agent_port: self.agent_port,
            startup_timeout: self.sidecar_startup_timeout,
            direct: DirectSettings {
                resync_interval: non_empty(&self.sidecar_resync_interval),
                shutdown_timeout: non_empty(&self.sidecar_shutdown_timeout),
                release_on_exit: self.sidecar_release_on_exit,
                https_proxy: non_empty(&self.sidecar_https_proxy),
                no_proxy: non_empty(&self.sidecar_no_proxy),
                ec2_endpoint: non_empty(&self.sidecar_ec2_endpoint),
            },
            image_pull_secrets: pull_secret_names(&self.image_pull_secrets)?,
        };
        if config.sidecar_role_arn.is_some() && config.aws_region.is_none() {
            // With IRSA the sidecar has no other source for the region: IMDS is out of reach
            // from the pod's network namespace at hop limit 1.
            return Err(Error::Config(
                "--sidecar-role-arn needs --aws-region (env MULTUS_ENI_AWS_REGION): with IRSA \
                 the sidecar cannot ask IMDS for the region at hop limit 1; add \
                 --aws-region=<the cluster's region>"
                    .into(),
            ));
        }
        if !config.agent_socket_dir.starts_with('/') {
            // A relative hostPath makes every injected pod fail validation at the API server.
            return Err(Error::Config(format!(
                "--agent-socket-dir must be an absolute path on the node, like the agent's \
                 --socket directory (/run/multus-eni), not {:?}",
                config.agent_socket_dir
            )));
        }
        Ok(config)
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// HTTPS listen address for POST /mutate. `[::]` listens on IPv4 and IPv6 (IPv4 only on a
    /// host without IPv6), so one manifest serves IPv4, dual-stack and IPv6-only clusters.
    #[arg(long, env = "MULTUS_ENI_ADDR", default_value = "[::]:8443")]
    pub addr: SocketAddr,
    /// PEM certificate chain; reloaded when the file (or the Secret volume) changes.
    #[arg(long, env = "MULTUS_ENI_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key matching --tls-cert.
    #[arg(long, env = "MULTUS_ENI_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Plain-HTTP listen address for /healthz, /readyz and /metrics (dual-stack like --addr).
    #[arg(long, env = "MULTUS_ENI_METRICS_ADDR", default_value = "[::]:8080")]
    pub metrics_addr: SocketAddr,
    /// Log output.
    #[arg(
        long,
        env = "MULTUS_ENI_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
    /// After SIGTERM, how long /readyz says 503 while /mutate keeps answering, so endpoints
    /// stop routing here first (terminationGracePeriodSeconds must cover it plus 15 s).
    #[arg(
        long,
        env = "MULTUS_ENI_SHUTDOWN_DELAY",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    pub shutdown_delay: Duration,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

impl ServeArgs {
    /// The server configuration these flags describe; flags that cannot work together are an
    /// error naming the fix.
    pub fn config(&self) -> Result<ServeConfig> {
        Ok(ServeConfig {
            addr: self.addr,
            metrics_addr: self.metrics_addr,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            shutdown_delay: self.shutdown_delay,
            limits: ConnectionLimits::default(),
            injection: self.sidecar.config()?,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// YAML stream to mutate; `-` reads stdin.
    #[arg(short = 'f', long = "file", env = "MULTUS_ENI_FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, Clone, Args)]
pub struct CertsArgs {
    /// Directory for ca.crt, ca.key, tls.crt, tls.key, secret.yaml, cabundle-patch.json.
    #[arg(long, env = "MULTUS_ENI_OUT_DIR", default_value = "certs")]
    pub out_dir: PathBuf,
    /// Namespace of the webhook Service and Secret.
    #[arg(long, env = "MULTUS_ENI_NAMESPACE", default_value = "multus-eni")]
    pub namespace: String,
    /// Name of the webhook Service (the certificate's DNS names derive from it).
    #[arg(long, env = "MULTUS_ENI_SERVICE", default_value = "multus-eni-webhook")]
    pub service: String,
    /// Name of the kubernetes.io/tls Secret to write.
    #[arg(
        long,
        env = "MULTUS_ENI_SECRET_NAME",
        default_value = "multus-eni-webhook-tls"
    )]
    pub secret_name: String,
    /// Validity of the serving certificate, in days (the CA gets ten times as long).
    #[arg(long, env = "MULTUS_ENI_VALIDITY_DAYS", default_value_t = 365)]
    pub validity_days: u32,
}

impl Cli {
    /// Runs the chosen subcommand.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Serve(args) => {
                telemetry::init(args.log_format)?;
                // One rustls provider for the whole process, installed before any TLS use.
                crypto_provider();
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("starting the async runtime", e))?;
                let config = args.config()?;
                runtime.block_on(crate::serve::run(config))
            }
            Command::Inject(args) => inject(&args),
            Command::Certs(args) => {
                let report = write_certs(&CertsRequest {
                    out_dir: args.out_dir,
                    namespace: args.namespace,
                    service: args.service,
                    secret_name: args.secret_name,
                    validity_days: args.validity_days,
                })?;
                eprintln!("{report}");
                Ok(())
            }
        }
    }
}

fn inject(args: &InjectArgs) -> Result<()> {
    let input = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Error::io("reading stdin", e))?;
        s
    } else {
        std::fs::read_to_string(&args.file).map_err(|e| Error::file(&args.file, e))?
    };
    let report = inject_stream(&args.sidecar.config()?, &input)?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    std::io::stdout()
        .write_all(report.output.as_bytes())
        .map_err(|e| Error::io("writing stdout", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_flags_start_a_server_with_documented_defaults() {
        let args = serve_args(&[
            "--addr",
            "0.0.0.0:8443",
            "--tls-cert",
            "/tls/tls.crt",
            "--tls-key",
            "/tls/tls.key",
            "--sidecar-image",
            "img:1",
        ]);
        assert_eq!(args.metrics_addr.to_string(), "[::]:8080");
        assert_eq!(args.log_format, LogFormat::Json);
        assert_eq!(args.shutdown_delay, Duration::from_secs(10));
        let config = args.sidecar.config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config, Config::new("img:1"));
    }

    /// `multus-eni-webhook serve` with `flags`, parsed.
    fn serve_args(flags: &[&str]) -> ServeArgs {
        let argv = ["multus-eni-webhook", "serve"].iter().chain(flags);
        let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"));
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        args
    }

    fn inject_args(extra: &[&str]) -> std::result::Result<SidecarArgs, clap::Error> {
        let mut argv = vec![
            "multus-eni-webhook",
            "inject",
            "-f",
            "-",
            "--sidecar-image",
            "img:1",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv)?;
        match cli.command {
            Command::Inject(args) => Ok(args.sidecar),
            other => panic!("expected inject, got {other:?}"),
        }
    }

    /// The injection config of `inject` with `extra` flags, both expected to succeed.
    fn inject_config(extra: &[&str]) -> Config {
        let args = inject_args(extra).unwrap_or_else(|e| panic!("{e}"));
        args.config().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The start-up error of `inject` with `extra` flags (empty if there is none).
    fn inject_config_error(extra: &[&str]) -> String {
        let args = inject_args(extra).unwrap_or_else(|e| panic!("{e}"));
        args.config()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn role_arn_without_region_is_a_start_up_error_naming_the_fix() {
        let err = inject_config_error(&["--sidecar-role-arn", "arn:aws:iam::1:role/r"]);
        assert!(err.contains("--aws-region"), "{err}");
        assert!(err.contains("MULTUS_ENI_AWS_REGION"), "{err}");
        let args = inject_args(&[
            "--sidecar-role-arn",
            "arn:aws:iam::1:role/r",
            "--aws-region",
            "eu-west-1",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(args.config().is_ok());
    }

    #[test]
    fn injection_flags_reach_the_config() {
        let config = inject_config(&[
            "--ec2-access=direct",
            "--agent-socket-dir=/var/run/me",
            "--agent-port=19812",
            "--sidecar-startup-timeout=15m",
            "--sidecar-resync-interval=10m",
            "--sidecar-shutdown-timeout=20s",
            "--sidecar-release-on-exit=false",
            "--sidecar-https-proxy=http://proxy:3128",
            "--sidecar-no-proxy=169.254.169.254",
            "--sidecar-ec2-endpoint=https://ec2.example",
        ]);
        assert_eq!(config.ec2_access, Ec2Access::Direct);
        assert_eq!(config.agent_socket_dir, "/var/run/me");
        assert_eq!(config.agent_port, 19812);
        assert_eq!(config.startup_timeout, std::time::Duration::from_secs(900));
        assert_eq!(
            config.direct,
            DirectSettings {
                resync_interval: Some("10m".into()),
                shutdown_timeout: Some("20s".into()),
                release_on_exit: Some(false),
                https_proxy: Some("http://proxy:3128".into()),
                no_proxy: Some("169.254.169.254".into()),
                ec2_endpoint: Some("https://ec2.example".into()),
            }
        );
    }

    #[test]
    fn listeners_default_to_both_address_families() {
        let args = serve_args(&[
            "--tls-cert=/tls/tls.crt",
            "--tls-key=/tls/tls.key",
            "--sidecar-image=img:1",
        ]);
        assert_eq!(args.addr.to_string(), "[::]:8443");
        assert_eq!(args.metrics_addr.to_string(), "[::]:8080");
    }

    #[test]
    fn image_pull_secrets_repeat_and_keep_their_order_once_each() {
        let config = inject_config(&[
            "--image-pull-secret=registry-a",
            "--image-pull-secret",
            "registry.b",
            "--image-pull-secret=registry-a",
        ]);
        assert_eq!(config.image_pull_secrets, ["registry-a", "registry.b"]);
        // None by default: pods keep exactly their own pull secrets.
        let config = inject_config(&[]);
        assert!(config.image_pull_secrets.is_empty());
    }

    #[test]
    fn a_comma_list_is_several_pull_secrets_as_the_env_variable_gives_them() {
        // clap applies the same delimiter to MULTUS_ENI_IMAGE_PULL_SECRETS; the environment is
        // process-wide, so the parse is shown on the flag, which shares the value parser.
        let config = inject_config(&["--image-pull-secret=ecr-a, ecr-b,,"]);
        assert_eq!(config.image_pull_secrets, ["ecr-a", "ecr-b"]);
        use clap::CommandFactory;
        let command = Cli::command();
        let serve = command
            .find_subcommand("serve")
            .unwrap_or_else(|| panic!("no serve"));
        let arg = serve
            .get_arguments()
            .find(|a| a.get_id() == "image_pull_secrets")
            .unwrap_or_else(|| panic!("no --image-pull-secret"));
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("MULTUS_ENI_IMAGE_PULL_SECRETS")
        );
        assert_eq!(arg.get_value_delimiter(), Some(','));
    }

    #[test]
    fn a_pull_secret_the_api_server_would_refuse_fails_at_start_up() {
        for bad in ["Registry", "-reg", "reg_1", "a..b"] {
            let err = inject_config_error(&[&format!("--image-pull-secret={bad}")]);
            assert!(err.contains("--image-pull-secret"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_relative_agent_socket_dir_fails_at_start_up() {
        let err = inject_config_error(&["--agent-socket-dir=run/multus-eni"]);
        assert!(err.contains("--agent-socket-dir"), "{err}");
    }

    #[test]
    fn a_duration_typo_fails_at_start_up() {
        assert!(inject_args(&["--sidecar-resync-interval=10 minutes please"]).is_err());
        assert!(inject_args(&["--sidecar-startup-timeout=soon"]).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
