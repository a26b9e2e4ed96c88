//! `litefs ltx ...`: inspect, verify and apply LTX files.

use std::process::ExitCode;

/// Arguments of `litefs ltx`.
#[derive(Debug, clap::Args)]
pub struct LtxArgs {}

/// Runs `litefs ltx`.
pub fn run(_args: LtxArgs) -> ExitCode {
    ExitCode::FAILURE
}
