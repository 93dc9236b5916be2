//! Command line of `webhook-load`: `bench` (fixed rate + saturation) and `sustained`.

use crate::bodies::{Fixtures, Mix, load_fixtures};
use crate::client::Connector;
use crate::load::{Pace, Plan, Report, run};
use crate::server::Webhook;
use crate::{Error, Result, certs, report};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Load generator for multus-eni-webhook (starts the binary itself, with throwaway certs).
#[derive(Debug, Parser)]
#[command(name = "webhook-load", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The webhook binary to start.
    #[arg(long, env = "WEBHOOK_LOAD_BIN", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/multus-eni-webhook"), global = true)]
    pub webhook_bin: PathBuf,
    /// Directory of fixture pods (JSON/YAML Pods, AdmissionReviews, workloads).
    #[arg(long, env = "WEBHOOK_LOAD_FIXTURES", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../webhook/tests/data"), global = true)]
    pub fixtures: PathBuf,
    /// Client runtime threads (the rest of the machine is left to the server).
    #[arg(
        long,
        env = "WEBHOOK_LOAD_CLIENT_THREADS",
        default_value_t = 1,
        global = true
    )]
    pub client_threads: usize,
    /// Seed for the choice of bodies.
    #[arg(long, default_value_t = 5, global = true)]
    pub seed: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Latency at a fixed admission rate, then throughput at saturation.
    Bench(BenchArgs),
    /// Minutes of load mixing real pods with bad bodies: 5xx, liveness, memory growth.
    Sustained(SustainedArgs),
    /// Write seed corpora for the fuzz targets (scripts/fuzz.sh calls this).
    Corpus(CorpusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CorpusArgs {
    /// Directory that receives one sub-directory per fuzz target.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Fixed admission rate per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Keep-alive connections at the fixed rate.
    #[arg(long, default_value_t = 16)]
    pub rate_connections: usize,
    /// Length of the fixed-rate run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub rate_duration: Duration,
    /// Concurrent connections at saturation (comma list: one run each; 0: none).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub saturation_connections: Vec<usize>,
    /// Length of each saturation run.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub saturation_duration: Duration,
    /// Unmeasured warm-up at the fixed rate before everything.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct SustainedArgs {
    /// Length of the run.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Requests per second (all classes together).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
}

impl Cli {
    /// Runs the chosen command and prints its tables.
    pub fn run(self) -> Result<()> {
        if let Command::Corpus(args) = &self.command {
            let fixtures = load_fixtures(&self.common.fixtures)?;
            let n = crate::corpus::write_seeds(&fixtures, &args.out)?;
            eprintln!("wrote {n} seeds under {}", args.out.display());
            return Ok(());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.common.client_threads.max(1))
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the client runtime", e))?;
        runtime.block_on(async {
            match &self.command {
                Command::Bench(args) => {
                    let reports = bench(&self.common, args).await?;
                    println!("{}", report::latency_table(&reports));
                    println!("load average after the runs: {}", load_average());
                    Ok(())
                }
                Command::Corpus(_) => Ok(()),
                Command::Sustained(args) => {
                    let r = sustained(&self.common, args).await?;
                    println!("{}", report::sustained_table(&r));
                    println!("load average after the run: {}", load_average());
                    if r.tally.server_errors > 0 || !r.alive || r.tally.unexpected > 0 {
                        return Err(Error::Server(
                            "sustained load found 5xx, wrong answers or a dead process".into(),
                        ));
                    }
                    Ok(())
                }
            }
        })
    }
}

fn describe(common: &Common, fixtures: &Fixtures) {
    eprintln!(
        "webhook-load: {} | fixtures: {} Multus pods, {} plain pods from {} | client threads: {} | cores: {} | load average: {}",
        common.webhook_bin.display(),
        fixtures.multus.len(),
        fixtures.plain.len(),
        common.fixtures.display(),
        common.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
    );
}

/// `/proc/loadavg` (1, 5, 15 min): other work on the machine skews latency; say so.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Fixed rate then saturation, on one server process (its peak RSS covers all runs).
pub async fn bench(common: &Common, args: &BenchArgs) -> Result<Vec<Report>> {
    let fixtures = load_fixtures(&common.fixtures)?;
    describe(common, &fixtures);
    let mix = Arc::new(Mix::admissions(&fixtures, common.seed));
    let certs = certs::generate()?;
    let mut webhook = Webhook::start(&common.webhook_bin, &certs).await?;
    let connector = Connector::new(webhook.https, &certs);
    let every = Duration::from_millis(200);
    if !args.warmup.is_zero() {
        let warmup = Plan {
            label: "warm-up".into(),
            pace: Pace::Rate(args.rate),
            connections: args.rate_connections,
            duration: args.warmup,
            seed: common.seed,
        };
        run(&mut webhook, &connector, mix.clone(), &warmup, every).await?;
    }
    let mut plans = vec![Plan {
        label: format!("fixed {:.0}/s", args.rate),
        pace: Pace::Rate(args.rate),
        connections: args.rate_connections,
        duration: args.rate_duration,
        seed: common.seed,
    }];
    for &connections in args.saturation_connections.iter().filter(|c| **c > 0) {
        plans.push(Plan {
            label: format!("saturation ×{connections}"),
            pace: Pace::Saturate,
            connections,
            duration: args.saturation_duration,
            seed: common.seed,
        });
    }
    let mut reports = Vec::new();
    for plan in &plans {
        eprintln!("running {} for {:?}", plan.label, plan.duration);
        let r = run(&mut webhook, &connector, mix.clone(), plan, every).await?;
        reports.push(r);
    }
    if !webhook.stop().await? {
        eprintln!("warning: the webhook did not exit cleanly on SIGTERM");
    }
    Ok(reports)
}

/// The sustained run with bad input.
pub async fn sustained(common: &Common, args: &SustainedArgs) -> Result<Report> {
    let fixtures = load_fixtures(&common.fixtures)?;
    describe(common, &fixtures);
    let mix = Arc::new(Mix::with_bad_input(&fixtures, common.seed));
    let certs = certs::generate()?;
    let mut webhook = Webhook::start(&common.webhook_bin, &certs).await?;
    let connector = Connector::new(webhook.https, &certs);
    let plan = Plan {
        label: format!("sustained {:.0}/s", args.rate),
        pace: Pace::Rate(args.rate),
        connections: args.connections,
        duration: args.duration,
        seed: common.seed,
    };
    eprintln!("running {} for {:?}", plan.label, plan.duration);
    let every = Duration::from_millis(500);
    let r = run(&mut webhook, &connector, mix, &plan, every).await?;
    if r.alive && !webhook.stop().await? {
        eprintln!("warning: the webhook did not exit cleanly on SIGTERM");
    }
    Ok(r)
}
