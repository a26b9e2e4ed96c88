//! `litefs run [-promote [-if-candidate]] [-with-halt-lock-on DBPATH] [-url URL] -- CMD
//! ARGS`: optionally promote the local node to primary (a handoff from the current
//! primary, `POST /promote`) or hold a database's HALT lock (write forwarding), then
//! run a command, forwarding SIGINT and SIGTERM to it, and exit with its status.

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
    /// Hold the HALT lock of this database (its path in the mount) while CMD runs:
    /// on a replica, SQLite in CMD may then write the database through the primary.
    #[arg(long, value_name = "DBPATH")]
    pub with_halt_lock_on: Option<std::path::PathBuf>,
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
    // Held until the command exited; dropping it unlocks.
    let _halt = match args.with_halt_lock_on.clone() {
        Some(db) => Some(
            tokio::task::spawn_blocking(move || HaltLock::take(&db))
                .await
                .context("taking the HALT lock")??,
        ),
        None => None,
    };
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

/// How long `-with-halt-lock-on` keeps trying while another process holds the lock.
const HALT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The HALT lock: an OFD write lock on byte 72 of `<db>-lock` in the mount, released
/// when dropped.
struct HaltLock {
    file: std::fs::File,
}

impl HaltLock {
    fn take(db: &std::path::Path) -> anyhow::Result<HaltLock> {
        // Said here in plain words (the mount could only answer ENOLCK).
        let mut hdr = [0u8; 20];
        if std::fs::File::open(db)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut hdr, 0))
            .is_ok()
            && hdr[18..20] == [2, 2]
        {
            bail!(
                "{} is in WAL mode: write forwarding supports rollback-journal databases \
                 only (PRAGMA journal_mode=DELETE on the primary)",
                db.display()
            );
        }
        let mut name = db.as_os_str().to_owned();
        name.push("-lock");
        let path = std::path::PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| {
                format!(
                    "opening {} (is {} a database in a litefs mount?)",
                    path.display(),
                    db.display()
                )
            })?;
        let deadline = std::time::Instant::now() + HALT_LOCK_WAIT;
        loop {
            match ofd_lock(&file, libc::F_WRLCK) {
                Ok(()) => return Ok(HaltLock { file }),
                Err(e)
                    if e.raw_os_error() == Some(libc::EAGAIN)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("HALT lock on {} (the node's log says why)", db.display())
                    });
                }
            }
        }
    }
}

impl Drop for HaltLock {
    fn drop(&mut self) {
        if let Err(e) = ofd_lock(&self.file, libc::F_UNLCK) {
            eprintln!("litefs run: releasing the HALT lock: {e}");
        }
    }
}

/// `fcntl(F_OFD_SETLK)` of `typ` on byte 72 ([`crate::halt::HALT_BYTE`]).
fn ofd_lock(f: &std::fs::File, typ: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed `flock` is valid; the fields that matter are set below
    // (OFD locks require l_pid 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = crate::halt::HALT_BYTE as _;
    fl.l_len = 1;
    // SAFETY: fcntl on a descriptor we own with a valid `flock`.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
