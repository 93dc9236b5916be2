use clap::Parser;
use multus_eni_sidecar::cli::Cli;

fn main() -> anyhow::Result<()> {
    Cli::parse().run()?;
    Ok(())
}
