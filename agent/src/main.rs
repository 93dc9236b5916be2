//! `multus-eni-agent`: parse the command line and hand over to the library.
use clap::Parser;
use multus_eni_agent::cli::Cli;

fn main() -> anyhow::Result<()> {
    Cli::parse().run()?;
    Ok(())
}
