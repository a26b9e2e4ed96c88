//! `litefs restore`: rebuild a database from the archive.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use tracing_subscriber::util::SubscriberInitExt;

use crate::archive::{Progress, RestoreOptions, RestoreTarget, restore};
use crate::config::{Config, LoadOptions, LogConfig};
use crate::ltx::TxId;

/// Arguments of `litefs restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Config file whose `backup` section names the archive.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Database name in the archive.
    #[arg(long, value_name = "DB")]
    name: String,
    /// Database file to write.
    #[arg(short = 'o', value_name = "OUT")]
    output: PathBuf,
    /// Restore exactly this TXID (hexadecimal, as Litestream prints it).
    #[arg(long, value_name = "TXID", conflicts_with = "timestamp")]
    txid: Option<String>,
    /// Restore the last transaction at or before this time (RFC 3339, UTC).
    #[arg(long, value_name = "RFC3339")]
    timestamp: Option<String>,
    /// Replace OUT if it exists.
    #[arg(short = 'f')]
    force: bool,
}

/// Runs `litefs restore`.
pub fn run(args: RestoreArgs) -> ExitCode {
    let _ = super::log_subscriber(&LogConfig::default()).try_init();
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("litefs restore: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_target(args: &RestoreArgs) -> anyhow::Result<RestoreTarget> {
    if let Some(t) = &args.txid {
        let v = u64::from_str_radix(t, 16)
            .ok()
            .filter(|_| t.len() <= 16)
            .with_context(|| format!("-txid {t}: not a hexadecimal TXID"))?;
        return Ok(RestoreTarget::Txid(TxId(v)));
    }
    if let Some(ts) = &args.timestamp {
        let t = humantime::parse_rfc3339_weak(ts)
            .with_context(|| format!("-timestamp {ts}: not an RFC 3339 time"))?;
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        return Ok(RestoreTarget::Timestamp(ms));
    }
    Ok(RestoreTarget::Latest)
}

fn run_inner(args: RestoreArgs) -> anyhow::Result<()> {
    let target = parse_target(&args)?;
    let (cfg, _) = Config::find_and_load(args.config.as_deref(), LoadOptions::default())
        .context("loading the config")?;
    let Some(sink) = crate::backends::build_sink(&cfg.backup)? else {
        bail!("the config has no backup section: nothing to restore from");
    };
    let opts = RestoreOptions {
        db: args.name.clone(),
        output: args.output.clone(),
        target,
        force: args.force,
    };
    let tty = std::io::stderr().is_terminal();
    let mut last_decile = 0;
    let mut report = |p: &Progress| {
        let pct = (p.bytes_done * 100)
            .checked_div(p.bytes_total)
            .unwrap_or(100);
        if tty {
            eprint!(
                "\rrestoring {}: {pct:3}% ({}/{} files)",
                args.name, p.files_done, p.files_total
            );
            let _ = std::io::stderr().flush();
        } else if pct / 10 > last_decile || p.files_done == p.files_total {
            last_decile = pct / 10;
            tracing::info!(
                db = args.name,
                percent = pct,
                files = p.files_done,
                total = p.files_total,
                "restoring"
            );
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let restored = rt.block_on(restore(sink.as_ref(), &opts, &mut report));
    if tty {
        eprintln!();
    }
    let r = restored?;
    println!(
        "restored {} to {} at {} ({} files, {} bytes; {} recorded positions checked{})",
        args.name,
        args.output.display(),
        r.pos,
        r.files,
        r.bytes,
        r.positions_checked,
        if r.final_position_recorded {
            ""
        } else {
            "; no recorded position for the final TXID"
        }
    );
    Ok(())
}
