//! `litefs run [-promote [-if-candidate]] [-url URL] -- CMD ARGS`: optionally promote
//! the local node to primary (a handoff from the current primary, `POST /promote`),
//! then run a command, forwarding SIGINT and SIGTERM to it, and exit with its status.

use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::exec::{Options, Plan, Signals};
use crate::transports::http::ops::Info;

/// Arguments of `litefs run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Make the local node the primary first (the current primary hands over).
    #[arg(long)]
    pub promote: bool,
    /// With -promote: skip the promotion when the node is not a candidate.
    #[arg(long)]
    pub if_candidate: bool,
    /// URL of the local node's HTTP API.
    #[arg(long, default_value = "http://localhost:20202")]
    pub url: String,
    /// The command to run.
    #[arg(last = true, value_name = "CMD", required = true)]
    pub cmd: Vec<String>,
}

/// Runs `litefs run`.
pub fn run(args: RunArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("litefs run: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_async(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("litefs run: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_async(args: RunArgs) -> anyhow::Result<u8> {
    // Before anything else: a signal from now on goes to the command (or ends the wait
    // for it), never kills this process with the command left behind.
    let mut signals = Signals::install().context("installing signal handlers")?;
    if args.promote {
        promote(&args).await?;
    }
    let plan = Plan::new(&[], &args.cmd)?;
    let opts = Options {
        candidate: true,
        skip_sync: true,
        exit_on_error: true,
    };
    let outcome = crate::exec::run(&plan, opts, std::future::ready(()), &mut signals).await;
    Ok(outcome.exit_code())
}

async fn promote(args: &RunArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/');
    let client = super::ops::client_builder()
        .timeout(
            crate::transports::http::handoff::HANDOFF_TIMEOUT + std::time::Duration::from_secs(5),
        )
        .build()?;
    if args.if_candidate {
        let body = client
            .get(format!("{base}/info"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("GET {base}/info"))?
            .bytes()
            .await?;
        let info: Info = serde_json::from_slice(&body).context("the node's /info")?;
        if !info.candidate {
            eprintln!("litefs run: not a candidate: not promoting");
            return Ok(());
        }
    }
    let resp = client
        .post(format!("{base}/promote"))
        .send()
        .await
        .with_context(|| format!("POST {base}/promote"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("promotion refused ({status}): {}", text.trim());
    }
    eprintln!("litefs run: {}", text.trim());
    Ok(())
}
