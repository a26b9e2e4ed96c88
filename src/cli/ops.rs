//! `litefs status`, `litefs export`, `litefs import`: clients of a node's HTTP
//! endpoints (`/info`, `/export`, `/import`). They send the token of the
//! `LITEFS_AUTH_TOKEN` environment variable when it is set.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::transports::http::ops::{Info, check_sqlite_file};

/// Default node URL (LiteFS's default `http.addr`).
const DEFAULT_URL: &str = "http://localhost:20202";

/// Arguments of `litefs status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// URL of the node to ask.
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Print the node's `/info` JSON instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `litefs export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Database name.
    #[arg(long)]
    pub name: String,
    /// URL of the node to copy from (any node).
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// Where to write the database (replaced atomically).
    pub path: PathBuf,
}

/// Arguments of `litefs import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Database name.
    #[arg(long)]
    pub name: String,
    /// URL of the primary.
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// SQLite database file to load.
    pub path: PathBuf,
}

fn run(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("litefs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("litefs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn url(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Progress on stderr: a bar on a terminal, a line per tenth otherwise.
fn progress(label: String, total: u64) -> crate::progress::Progress<std::io::Stderr> {
    use std::io::IsTerminal;
    let err = std::io::stderr();
    let terminal = err.is_terminal();
    crate::progress::Progress::new(label, total, err, terminal)
}

/// An HTTP client sending the [`crate::config::AUTH_TOKEN_ENV`] token, when set.
fn client() -> anyhow::Result<reqwest::Client> {
    Ok(client_builder().build()?)
}

/// A client builder whose clients send the [`crate::config::AUTH_TOKEN_ENV`] token,
/// when set.
pub(super) fn client_builder() -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(v) = std::env::var(crate::config::AUTH_TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
        .and_then(|t| crate::transports::http::ops::bearer(&t))
    {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder().default_headers(headers)
}

async fn fail_unless_ok(resp: reqwest::Response, what: &str) -> anyhow::Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let msg = resp.text().await.unwrap_or_default();
    bail!("{what}: {status}: {}", msg.trim())
}

/// `litefs status`.
pub fn status(args: StatusArgs) -> ExitCode {
    run(async move {
        let u = url(&args.url, "/info");
        let resp = client()?
            .get(&u)
            .send()
            .await
            .with_context(|| format!("GET {u}"))?;
        let text = fail_unless_ok(resp, &u).await?.text().await?;
        let info: Info =
            serde_json::from_str(&text).with_context(|| format!("{u} answered {text:?}"))?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
        } else {
            write!(out, "{}", render_status(&info))?;
        }
        Ok(())
    })
}

/// The human summary of `/info`.
pub fn render_status(info: &Info) -> String {
    let role = if info.is_primary {
        "primary"
    } else {
        "replica"
    };
    let mut s = format!(
        "role:      {role}{}\n",
        if info.candidate { " (candidate)" } else { "" }
    );
    s += &format!(
        "primary:   {} {}\n",
        info.primary_hostname.as_deref().unwrap_or("-"),
        info.primary_url.as_deref().unwrap_or("(unknown)")
    );
    if let Some(ms) = info.lag_ms {
        s += &format!("lag:       {:.3}s\n", ms as f64 / 1000.0);
    }
    s += &format!("node id:   {}\n", info.node_id);
    if let Some(a) = &info.archive {
        s += &format!(
            "archive:   {} ({})\n",
            a.sink,
            if a.active {
                "shipping"
            } else {
                "idle: not the primary"
            }
        );
        for (db, d) in &a.databases {
            s += &format!(
                "  {db}: archived to {}, backlog {} files, lag {:.3}s\n",
                d.txid,
                d.backlog_files,
                d.lag_ms as f64 / 1000.0
            );
        }
    }
    s += "\n";
    s += &format!("{:<24} {:<16}  {:<16}\n", "DATABASE", "TXID", "CHECKSUM");
    for db in &info.databases {
        s += &format!("{:<24} {:<16}  {:<16}\n", db.name, db.txid, db.checksum);
    }
    if info.databases.is_empty() {
        s += "(no databases)\n";
    }
    s
}

/// `litefs export`.
pub fn export(args: ExportArgs) -> ExitCode {
    run(async move {
        let u = url(&args.url, &format!("/export?name={}", enc(&args.name)));
        let resp = client()?
            .get(&u)
            .send()
            .await
            .with_context(|| format!("GET {u}"))?;
        let resp = fail_unless_ok(resp, &format!("export of {}", args.name)).await?;
        let tmp = tmp_beside(&args.path);
        let result = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("creating {}", tmp.display()))?;
            let total = resp.content_length().unwrap_or(0);
            let mut progress = progress(format!("export {}", args.name), total);
            let mut body = resp.bytes_stream();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.context("reading the export")?;
                n += chunk.len() as u64;
                progress.add(chunk.len() as u64);
                f.write_all(&chunk)
                    .await
                    .with_context(|| format!("writing {}", tmp.display()))?;
            }
            progress.finish();
            f.sync_all().await?;
            drop(f);
            // The copy must be whole before it replaces anything.
            let mut check = std::fs::File::open(&tmp)?;
            check_sqlite_file(&mut check)
                .map_err(|m| anyhow::anyhow!("the export is not a valid database: {m}"))?;
            tokio::fs::rename(&tmp, &args.path)
                .await
                .with_context(|| format!("renaming to {}", args.path.display()))?;
            eprintln!(
                "exported {} ({n} bytes) to {}",
                args.name,
                args.path.display()
            );
            anyhow::Ok(())
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    })
}

fn tmp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// `litefs import`.
pub fn import(args: ImportArgs) -> ExitCode {
    run(async move {
        let mut f = std::fs::File::open(&args.path)
            .with_context(|| format!("opening {}", args.path.display()))?;
        // Checked here too so a bad file is refused before it is uploaded.
        check_sqlite_file(&mut f).map_err(|m| {
            anyhow::anyhow!(
                "{} is not a valid SQLite database: {m}",
                args.path.display()
            )
        })?;
        let file = tokio::fs::File::open(&args.path).await?;
        let len = file.metadata().await?.len();
        let u = url(&args.url, &format!("/import?name={}", enc(&args.name)));
        let progress = std::sync::Mutex::new(progress(format!("import {}", args.name), len));
        let upload = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
            if let Ok(c) = chunk {
                let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
                p.add(c.len() as u64);
                if p.is_done() {
                    p.finish();
                }
            }
        });
        let resp = client()?
            .post(&u)
            .header("content-length", len)
            .body(reqwest::Body::wrap_stream(upload))
            .send()
            .await
            .with_context(|| format!("POST {u}"))?;
        let resp = fail_unless_ok(resp, &format!("import of {}", args.name)).await?;
        let txid = resp.text().await?;
        eprintln!(
            "imported {} ({len} bytes) as {} at TXID {}",
            args.path.display(),
            args.name,
            txid.trim()
        );
        Ok(())
    })
}
