//! The command line. Flags are accepted Go-style (`-config x`) as well as
//! GNU-style (`--config x`), because LiteFS users type them the Go way.
//!
//! Exit status: 0 success; 1 a runtime failure; 2 a usage error or a config that does
//! not load (the message on stderr names the file, line and key).

mod ltx;
mod ops;
mod restore;
mod run;

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, ConfigSource, LoadOptions, LogConfig, LogFormat};

/// Exit status for a usage error or a config that does not load.
pub const EXIT_CONFIG: u8 = 2;

/// Top-level command line of `litefs`. Without a subcommand it behaves as
/// `litefs mount` (the oldest README runs `litefs -config PATH`).
#[derive(Debug, Parser)]
#[command(
    name = "litefs",
    version,
    about = "FUSE file system that replicates SQLite databases",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Arguments of the implied `mount`.
    #[command(flatten)]
    pub mount: MountArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the file system and run the node.
    Mount(MountArgs),
    /// Print the version.
    Version,
    /// Work with LTX files.
    Ltx(ltx::LtxArgs),
    /// Restore a database from the archive (`backup` section of the config).
    Restore(restore::RestoreArgs),
    /// Show a node's role, primary and databases.
    Status(ops::StatusArgs),
    /// Copy a database from a node to a file.
    Export(ops::ExportArgs),
    /// Load a SQLite file into the cluster through the primary (one transaction).
    Import(ops::ImportArgs),
    /// Run a command, after promoting the local node to primary with -promote.
    Run(run::RunArgs),
}

/// Arguments of `litefs mount` (and of bare `litefs`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MountArgs {
    /// Config file. Default: the first of ./litefs.yml, ~/litefs.yml, /etc/litefs.yml,
    /// else the embedded default (config/litefs.yml).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Do not expand ${VAR} references in the config file.
    #[arg(long)]
    pub no_expand_env: bool,
    /// Leave the file system mounted when litefs exits (for debugging).
    #[arg(long)]
    pub skip_unmount: bool,
    /// Command to run once the node is ready, instead of the config's `exec`.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// What `mount` needs besides the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `-skip-unmount`.
    pub skip_unmount: bool,
    /// `-- CMD...`: replaces `exec` when not empty.
    pub cmd: Vec<String>,
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
        Some(Command::Restore(args)) => restore::run(args),
        Some(Command::Status(args)) => ops::status(args),
        Some(Command::Export(args)) => ops::export(args),
        Some(Command::Import(args)) => ops::import(args),
        Some(Command::Run(args)) => run::run(args),
        Some(Command::Mount(args)) => run_mount(args),
        None => run_mount(cli.mount),
    }
}

/// `litefs mount`: load and validate the config, set up logging from it, then run.
fn run_mount(args: MountArgs) -> ExitCode {
    let opts = LoadOptions {
        expand_env: !args.no_expand_env,
        env: None,
    };
    // The config decides the log format, so loading logs (unset variables) through a
    // temporary text subscriber; the real one is installed from the loaded config.
    let loaded = tracing::subscriber::with_default(log_subscriber(&LogConfig::default()), || {
        Config::find_and_load(args.config.as_deref(), opts)
    });
    let (cfg, source) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("litefs: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Fails only if a subscriber is already installed (embedding); keep that one.
    let _ = log_subscriber(&cfg.log).try_init();
    match &source {
        ConfigSource::File(path) => tracing::info!(path = %path.display(), "config file read"),
        ConfigSource::Embedded => tracing::info!(
            "no config file at ./litefs.yml, ~/litefs.yml or /etc/litefs.yml; using the embedded default (config/litefs.yml)"
        ),
    }
    tracing::info!("{}", cfg.summary());
    let opts = MountOptions {
        skip_unmount: args.skip_unmount,
        cmd: args.cmd,
    };
    let exit_on_error = cfg.exit_on_error;
    match mount(cfg, opts) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            if !exit_on_error && let Err(e) = crate::exec::hold_until_signal() {
                tracing::error!("cannot wait for a signal: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the node with a validated config until it stops; the exit code is the
/// supervised command's when there is one.
///
/// # Errors
/// Whatever stops the node.
pub fn mount(cfg: Config, opts: MountOptions) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let plan = crate::exec::Plan::new(&cfg.exec, &opts.cmd)?;
    let mut fuse_opts = crate::fuse::MountOptions::new(&cfg.fuse.dir, &cfg.data.dir);
    fuse_opts.allow_other = cfg.fuse.allow_other;
    fuse_opts.debug = cfg.fuse.debug;
    fuse_opts.io_uring = cfg.fuse.io_uring;
    fuse_opts.io_uring_threads = cfg.fuse.io_uring_threads;
    fuse_opts.skip_unmount = opts.skip_unmount;
    // Before the store: a refused mount point must not get its data dir recovered.
    crate::fuse::prepare(&fuse_opts)?;
    let store = crate::store::Store::open(crate::store::StoreOptions {
        data_dir: cfg.data.dir.clone(),
        retention: cfg.data.retention,
        retention_monitor_interval: cfg.data.retention_monitor_interval,
        node_id: 0,
    })
    .with_context(|| format!("opening the data directory {}", cfg.data.dir.display()))?;
    store.set_strict_verify(cfg.strict_verify);
    let sink = crate::backends::build_sink(&cfg.backup)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(async {
        let mut signals = crate::exec::Signals::install().context("installing signal handlers")?;
        let exec_opts = crate::exec::Options {
            candidate: cfg.lease.candidate,
            skip_sync: cfg.skip_sync,
            exit_on_error: cfg.exit_on_error,
        };
        if let Some(sink) = &sink
            && cfg.backup.bootstrap
        {
            bootstrap(&store, sink.as_ref(), cfg.lease.candidate).await?;
        }
        let node = crate::node::Node::prepare(&cfg, store.clone()).await?;
        // After the role is known: only the primary ships (the archiver follows the
        // store's primary flag from then on).
        if let Some(sink) = &sink {
            store.set_archive_sink(sink.clone());
        }
        let archiver = match sink {
            Some(sink) => Some(
                crate::archive::Archiver::start(
                    store.clone(),
                    sink,
                    crate::archive::ArchiverOptions::from_config(&cfg.backup),
                )
                .context("starting the archiver")?,
            ),
            None => None,
        };
        if let Some(a) = &archiver {
            node.set_archive(a.state());
        }
        // A static primary is in sync at once; a replica once the primary said Ready.
        let in_sync = node.in_sync(&cfg.lease);
        let stopper = node.stopper();
        let proxy =
            crate::proxy::start(&cfg.proxy, store.clone(), node.info(), stopper.subscribe())
                .await?;
        let mut outcome = None;
        // fuse::run polls this only once the file system is mounted, and stops at its
        // end; replication stops first, before the unmount and the store's clean close.
        let work = async {
            outcome = Some(crate::exec::run(&plan, exec_opts, in_sync, &mut signals).await);
            let _ = stopper.send(true);
            // A primary releases its lease before the unmount.
            node.step_down().await;
        };
        let result = crate::fuse::run_with(fuse_opts, store, work, |m| node.on_mount(m)).await;
        node.stop().await;
        if let Some(p) = proxy {
            let _ = p.await;
        }
        let code = match result {
            Ok(()) => Ok(ExitCode::from(outcome.map_or(0, |o| o.exit_code()))),
            Err(e @ crate::fuse::MountError::Fatal(_)) => {
                tracing::error!("{e}");
                Ok(ExitCode::from(99))
            }
            Err(e) => Err(e.into()),
        };
        anyhow::Ok((code, archiver))
    });
    let (result, archiver) = match result {
        Ok((code, archiver)) => (code, archiver),
        Err(e) => (Err(e), None),
    };
    // After the mount is gone: ships what the last transactions left, then stops.
    if let Some(a) = archiver {
        a.stop();
    }
    result
}

/// Start-up from the archive ([`crate::archive::bootstrap`]), before the mount. A
/// candidate that cannot use its archive refuses to start: it could otherwise become
/// the primary of a cluster whose data it lacks. A non-candidate warns and leaves the
/// rest to replication.
async fn bootstrap(
    store: &crate::store::Store,
    sink: &dyn crate::sink::SnapshotSink,
    candidate: bool,
) -> anyhow::Result<()> {
    match crate::archive::bootstrap(store, sink).await {
        Ok(_) => Ok(()),
        Err(e) if candidate => Err(anyhow::Error::new(e).context(format!(
            "cannot bootstrap from the archive ({}); a candidate does not start without it \
             (fix the archive, or set backup.bootstrap: false)",
            sink.type_name()
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot bootstrap from the archive; replicating from the primary instead");
            Ok(())
        }
    }
}

/// A subscriber writing to stderr with `log`'s settings; `RUST_LOG` overrides the
/// level when set.
fn log_subscriber(log: &LogConfig) -> Box<dyn tracing::Subscriber + Send + Sync> {
    let default = if log.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    match (log.format, log.timestamp) {
        (LogFormat::Json, true) => Box::new(builder.json().finish()),
        (LogFormat::Json, false) => Box::new(builder.json().without_time().finish()),
        (LogFormat::Text, true) => Box::new(builder.finish()),
        (LogFormat::Text, false) => Box::new(builder.without_time().finish()),
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

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
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

    #[test]
    fn mount_flags_parse_in_every_spelling() {
        for args in [
            &[
                "litefs",
                "mount",
                "-config",
                "a.yml",
                "-no-expand-env",
                "-skip-unmount",
            ][..],
            &[
                "litefs",
                "mount",
                "--config=a.yml",
                "--no-expand-env",
                "--skip-unmount",
            ],
        ] {
            let Some(Command::Mount(m)) = parse(args).command else {
                panic!("not mount: {args:?}");
            };
            assert_eq!(m.config, Some(PathBuf::from("a.yml")));
            assert!(m.no_expand_env && m.skip_unmount);
            assert!(m.cmd.is_empty());
        }
    }

    #[test]
    fn bare_litefs_is_mount_and_takes_a_command() {
        let cli = parse(&["litefs", "-config", "a.yml", "--", "app", "-port", "80"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.mount.config, Some(PathBuf::from("a.yml")));
        assert_eq!(cli.mount.cmd, ["app", "-port", "80"]);

        let Some(Command::Mount(m)) = parse(&["litefs", "mount", "--", "app"]).command else {
            panic!("not mount");
        };
        assert_eq!(m.cmd, ["app"]);
    }
}
