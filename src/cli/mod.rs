//! The command line. Flags are accepted Go-style (`-config x`) as well as
//! GNU-style (`--config x`), because LiteFS users type them the Go way.

mod ltx;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Top-level command line of `litefs`.
#[derive(Debug, Parser)]
#[command(
    name = "litefs",
    version,
    about = "FUSE file system that replicates SQLite databases"
)]
pub struct Cli {
    /// Path to the config file (bare `litefs -config PATH` means `litefs mount`).
    #[arg(long, global = false)]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version.
    Version,
    /// Work with LTX files.
    Ltx(ltx::LtxArgs),
}

/// Rewrites Go-style long flags (`-config`, `-config=x`) into GNU style
/// (`--config`, `--config=x`). Single-letter flags (`-o`) and everything after
/// `--` are left alone.
pub fn normalize_args<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        match arg.to_str() {
            Some(s) if is_go_long_flag(s) => out.push(OsString::from(format!("-{s}"))),
            _ => out.push(arg),
        }
    }
    out
}

fn is_go_long_flag(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('-') else {
        return false;
    };
    let name = rest.split('=').next().unwrap_or("");
    !rest.starts_with('-')
        && name.len() >= 2
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
}

/// Entry point used by the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args(std::env::args_os()));
    match cli.command {
        Some(Command::Version) => {
            println!("litefs {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(Command::Ltx(args)) => ltx::run(args),
        None => {
            eprintln!("usage: litefs <command>; see litefs --help");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn go_style_long_flags_become_gnu_style() {
        assert_eq!(
            norm(&["litefs", "-config", "x.yml", "-o", "out", "--", "-config"]),
            ["litefs", "--config", "x.yml", "-o", "out", "--", "-config"]
        );
        assert_eq!(norm(&["litefs", "-txid=5"]), ["litefs", "--txid=5"]);
        assert_eq!(
            norm(&["litefs", "--config", "a"]),
            ["litefs", "--config", "a"]
        );
    }
}
