//! `multus-eni-sidecar-agent-mode`: the sidecar's command line, agent mode only. A second
//! binary in the sidecar image because agent mode needs no AWS SDK: a fraction of the full
//! binary's size and memory, for the sidecar that every pod runs (docs/sidecar.md).
use clap::Parser;
use multus_eni_sidecar::cli::Cli;

fn main() -> anyhow::Result<()> {
    Cli::parse().run_agent_mode_only()?;
    Ok(())
}
