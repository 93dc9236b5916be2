//! `webhook-load`: parse the command line and hand over to the library.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    Ok(multus_eni_webhook_load::cli::Cli::parse().run()?)
}
