//! `multus-eni-sidecar`: parse the command line and hand over to the library.
use clap::Parser;
use multus_eni_sidecar::cli::Cli;

fn main() -> anyhow::Result<()> {
    Cli::parse().run()?;
    Ok(())
}
