//! Running the application under litefs: `exec` in the config, or `litefs mount -- CMD`.
//!
//! Commands are split into words like a POSIX shell would (quotes, backslashes) but are
//! not run by a shell, as LiteFS does: write `sh -c '...'` for pipes, `&&` or `;`. Every
//! command inherits litefs's environment, plus `HOSTNAME` when it is unset (LiteFS sets
//! it for its config expansion and the command sees it).
//!
//! Order of events, as in LiteFS:
//! 1. the file system is mounted (the caller only starts [`run`] after that);
//! 2. unless `skip-sync`, [`run`] waits for the caller's *in sync* future: the node has
//!    caught up with the primary, or is the primary;
//! 3. the entries run in order; one marked `if-candidate` is skipped on a node that can
//!    never become primary (`lease.candidate: false`). Every entry but the last must
//!    exit 0;
//! 4. the last entry is supervised: SIGINT and SIGTERM received by litefs are forwarded
//!    to it, and its exit ends litefs with its status (a death by signal N gives
//!    128 + N, as a shell reports it).
//!
//! A signal received while an earlier entry (a migration) runs is forwarded to it and no
//! later entry is started.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::{ExecConfig, LeaseConfig, LeaseType};

/// Exit status of litefs when an exec entry cannot be parsed, started, or fails.
pub const EXIT_EXEC_FAILED: u8 = 1;

/// How long a command litefs must stop without being asked by a signal (the node hit a
/// fatal error, or the mount was removed from outside) gets to exit after SIGTERM
/// before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why an exec entry did not run to the end litefs needs.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The command line is not valid shell-style words (an unclosed quote, say).
    #[error("{label}: cannot parse the command {cmd:?}: {reason}")]
    Parse {
        /// `exec[i]`, or `the -- command`.
        label: String,
        /// The command as written.
        cmd: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The command could not be started (not found, not executable, ...).
    #[error("{label}: cannot start `{cmd}`: {source}")]
    Spawn {
        /// `exec[i]`, or `the -- command`.
        label: String,
        /// The command's words, joined for display.
        cmd: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for the command failed.
    #[error("{label}: waiting for `{cmd}`: {source}")]
    Wait {
        /// `exec[i]`, or `the -- command`.
        label: String,
        /// The command's words, joined for display.
        cmd: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A command before the last exited unsuccessfully; the ones after it did not run.
    #[error("{label}: `{cmd}` failed ({status}); the commands after it were not started")]
    Failed {
        /// `exec[i]`.
        label: String,
        /// The command's words, joined for display.
        cmd: String,
        /// How it ended.
        status: ExitStatus,
    },
}

/// One command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where it comes from, for messages: `exec[i]`, or `the -- command`.
    pub label: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Run only on a node that can become primary.
    pub if_candidate: bool,
}

impl Entry {
    fn display(&self) -> String {
        shell_words::join(&self.argv)
    }
}

/// The commands litefs runs once the node is ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    entries: Vec<Entry>,
}

impl Plan {
    /// The config's `exec`, or the command after `--` when one is given (it replaces
    /// the config's list). Several words after `--` are taken as the program and its
    /// arguments as the shell already split them; a single word is split like a config
    /// entry, so `litefs mount -- "app -port 80"` works as it does with LiteFS.
    ///
    /// # Errors
    /// [`ExecError::Parse`] when a command is not valid shell-style words.
    pub fn new(config: &[ExecConfig], command_line: &[String]) -> Result<Plan, ExecError> {
        const CLI: &str = "the -- command";
        let entries = match command_line {
            [] => config
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    Ok(Entry {
                        label: format!("exec[{i}]"),
                        argv: split(&format!("exec[{i}]"), &e.cmd)?,
                        if_candidate: e.if_candidate,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            [one] => vec![Entry {
                label: CLI.to_string(),
                argv: split(CLI, one)?,
                if_candidate: false,
            }],
            argv => vec![Entry {
                label: CLI.to_string(),
                argv: argv.to_vec(),
                if_candidate: false,
            }],
        };
        Ok(Plan { entries })
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as given, in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entries a node runs, in order, each with whether it is the supervised one.
    /// The supervised entry is the last of the whole list: when it is `if-candidate`
    /// and the node is not a candidate, nothing is supervised (as in LiteFS).
    pub fn steps(&self, candidate: bool) -> Vec<(&Entry, bool)> {
        let last = self.entries.len().saturating_sub(1);
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| candidate || !e.if_candidate)
            .map(|(i, e)| (e, i == last))
            .collect()
    }
}

fn split(label: &str, cmd: &str) -> Result<Vec<String>, ExecError> {
    let parse = |reason: String| ExecError::Parse {
        label: label.to_string(),
        cmd: cmd.to_string(),
        reason,
    };
    let argv = shell_words::split(cmd).map_err(|e| parse(e.to_string()))?;
    if argv.is_empty() {
        return Err(parse("it has no words".to_string()));
    }
    Ok(argv)
}

/// The settings [`run`] follows, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// `lease.candidate`: whether `if-candidate` entries run.
    pub candidate: bool,
    /// `skip-sync`: start without waiting for the node to be in sync.
    pub skip_sync: bool,
    /// `exit-on-error`: when false, a failed entry is logged and litefs stays up (with
    /// the file system mounted) until SIGINT or SIGTERM, so an operator can inspect
    /// the node instead of watching it restart.
    pub exit_on_error: bool,
}

/// How the exec side of a node ended; litefs's exit status follows from it.
#[derive(Debug)]
pub enum Outcome {
    /// SIGINT or SIGTERM arrived while no command was running.
    Stopped {
        /// The signal number.
        signal: i32,
    },
    /// A command ended the node: the supervised one exited, or an earlier one was
    /// stopped by a forwarded signal.
    Exited {
        /// `exec[i]`, or `the -- command`.
        label: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// An entry could not be run or failed.
    Failed(ExecError),
}

impl Outcome {
    /// litefs's exit status: 0 after a signal with nothing running, the command's
    /// status when a command ended the node, [`EXIT_EXEC_FAILED`] after a failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Stopped { .. } => 0,
            Outcome::Exited { status, .. } => status_code(*status),
            Outcome::Failed(_) => EXIT_EXEC_FAILED,
        }
    }
}

/// A process exit status as a shell reports it: the code, or 128 + the signal number.
pub fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        // Stopped or continued: wait() does not report those.
        (None, None) => EXIT_EXEC_FAILED,
    }
}

/// SIGINT and SIGTERM received by litefs, in arrival order.
#[derive(Debug)]
pub struct Signals {
    rx: mpsc::UnboundedReceiver<i32>,
}

impl Signals {
    /// Takes over SIGINT and SIGTERM for the process (they no longer terminate it).
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When the handlers cannot be installed.
    pub fn install() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let (tx, signals) = Signals::channel();
        for (kind, signo) in [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
        ] {
            let mut stream = signal(kind)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(signo).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(signals)
    }

    /// Signals fed by hand (for embedding, and tests).
    pub fn channel() -> (mpsc::UnboundedSender<i32>, Signals) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Signals { rx })
    }

    /// The next signal; pending forever once every sender is gone.
    async fn recv(&mut self) -> i32 {
        match self.rx.recv().await {
            Some(sig) => sig,
            None => std::future::pending().await,
        }
    }
}

/// The future [`run`] waits for before starting the commands: this node is in sync.
pub type InSync = Pin<Box<dyn Future<Output = ()>>>;

/// The in-sync point for a node that has no replication to wait for: a static-lease
/// primary is in sync as soon as its store is open and mounted. Any other node would
/// have to catch up with a primary first; replication signals that, and until it does
/// this never resolves (the commands start only with `skip-sync`).
pub fn in_sync_without_replication(lease: &LeaseConfig) -> InSync {
    if lease.kind == Some(LeaseType::Static) && lease.candidate {
        Box::pin(std::future::ready(()))
    } else {
        Box::pin(async {
            warn!(
                "this node is not a static primary and nothing tells it when it has caught up; \
                 exec waits (set skip-sync: true to start it anyway)"
            );
            std::future::pending::<()>().await
        })
    }
}

/// Runs the plan on a mounted node: waits for `in_sync` (unless `skip-sync`), runs
/// the entries, supervises the last, and returns once the node should stop. With
/// nothing to supervise it returns at the first SIGINT or SIGTERM.
///
/// Dropping the future (the node is stopping for another reason) stops a running
/// command: SIGTERM, then SIGKILL after a few seconds.
pub async fn run(
    plan: &Plan,
    opts: Options,
    in_sync: impl Future<Output = ()>,
    signals: &mut Signals,
) -> Outcome {
    let outcome = run_steps(plan, opts, in_sync, signals).await;
    if let Outcome::Failed(e) = &outcome {
        error!("{e}");
        if !opts.exit_on_error {
            warn!(
                "exit-on-error is false: staying up with the file system mounted so the node \
                 can be inspected; stop litefs with SIGINT or SIGTERM"
            );
            signals.recv().await;
        }
    }
    outcome
}

async fn run_steps(
    plan: &Plan,
    opts: Options,
    in_sync: impl Future<Output = ()>,
    signals: &mut Signals,
) -> Outcome {
    let steps = plan.steps(opts.candidate);
    if steps.is_empty() {
        if !plan.is_empty() {
            info!("no exec entry runs on a node that is not a candidate");
        }
        let signal = signals.recv().await;
        return Outcome::Stopped { signal };
    }
    if opts.skip_sync {
        info!("skip-sync: starting exec without waiting for this node to be in sync");
    } else {
        info!("waiting for this node to be in sync before starting exec");
        tokio::select! {
            () = in_sync => info!("node is in sync; starting exec"),
            signal = signals.recv() => return Outcome::Stopped { signal },
        }
    }
    for e in plan.entries() {
        if e.if_candidate && !opts.candidate {
            info!(
                "{}: skipping `{}`: if-candidate, and this node is not a candidate",
                e.label,
                e.display()
            );
        }
    }
    for (entry, supervised) in steps {
        let mut running = match Running::spawn(entry, supervised) {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e),
        };
        let mut signalled = false;
        let status = loop {
            tokio::select! {
                st = running.child.wait() => break st,
                sig = signals.recv() => {
                    signalled = true;
                    running.signal(sig);
                }
            }
        };
        let status = match status {
            Ok(s) => s,
            Err(source) => {
                return Outcome::Failed(ExecError::Wait {
                    label: entry.label.clone(),
                    cmd: entry.display(),
                    source,
                });
            }
        };
        if supervised || signalled {
            info!(
                "{}: `{}` exited ({status}); litefs shutting down",
                entry.label,
                entry.display()
            );
            return Outcome::Exited {
                label: entry.label.clone(),
                status,
            };
        }
        if !status.success() {
            return Outcome::Failed(ExecError::Failed {
                label: entry.label.clone(),
                cmd: entry.display(),
                status,
            });
        }
        info!("{}: `{}` succeeded", entry.label, entry.display());
    }
    // The last entry was if-candidate on a non-candidate: nothing to supervise.
    let signal = signals.recv().await;
    Outcome::Stopped { signal }
}

/// A started command. Dropping it while the command runs stops the command.
struct Running {
    child: Child,
    label: String,
}

impl Running {
    fn spawn(entry: &Entry, supervised: bool) -> Result<Running, ExecError> {
        let (program, args) = entry
            .argv
            .split_first()
            .expect("Plan::new never yields an empty argv");
        let mut cmd = Command::new(program);
        cmd.args(args);
        if std::env::var_os("HOSTNAME").is_none()
            && let Some(h) = hostname()
        {
            cmd.env("HOSTNAME", h);
        }
        debug!(label = %entry.label, argv = ?entry.argv, supervised, "spawning");
        let child = cmd.spawn().map_err(|source| ExecError::Spawn {
            label: entry.label.clone(),
            cmd: entry.display(),
            source,
        })?;
        let what = if supervised {
            "started (supervised)"
        } else {
            "started; waiting for it to finish"
        };
        info!(
            pid = child.id(),
            "{}: `{}` {what}",
            entry.label,
            entry.display()
        );
        Ok(Running {
            child,
            label: entry.label.clone(),
        })
    }

    fn signal(&self, sig: i32) {
        let Some(pid) = self.child.id() else {
            return;
        };
        info!(pid, "forwarding {} to {}", SignalName(sig), self.label);
        // SAFETY: kill(2) on our own child, which has not been reaped (id() is Some).
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            warn!(pid, error = %io::Error::last_os_error(), "cannot signal {}", self.label);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        warn!(
            "{} is still running while litefs stops; sending SIGTERM",
            self.label
        );
        self.signal(libc::SIGTERM);
        // Blocking here is deliberate: the node is stopping, and the file system must
        // not be unmounted under a command that still has files open in it.
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!(
            "{} did not exit within {STOP_GRACE:?} of SIGTERM; killing it",
            self.label
        );
        let _ = self.child.start_kill();
    }
}

/// SIGINT and SIGTERM by name in messages, anything else by number.
struct SignalName(i32);

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            libc::SIGINT => f.write_str("SIGINT"),
            libc::SIGTERM => f.write_str("SIGTERM"),
            n => write!(f, "signal {n}"),
        }
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
    // when the name fits, and the last byte is kept 0 for the case it does not.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// Waits for SIGINT or SIGTERM. For `exit-on-error: false` when litefs fails before
/// anything is mounted: it stays up so the node can be inspected.
///
/// # Errors
/// When no runtime or signal handler can be set up.
pub fn hold_until_signal() -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut signals = Signals::install()?;
        warn!(
            "exit-on-error is false: staying up so the node can be inspected; stop litefs \
             with SIGINT or SIGTERM"
        );
        signals.recv().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(entries: &[(&str, bool)]) -> Vec<ExecConfig> {
        entries
            .iter()
            .map(|(cmd, if_candidate)| ExecConfig {
                cmd: cmd.to_string(),
                if_candidate: *if_candidate,
            })
            .collect()
    }

    fn argvs(plan: &Plan, candidate: bool) -> Vec<(Vec<String>, bool)> {
        plan.steps(candidate)
            .into_iter()
            .map(|(e, sup)| (e.argv.clone(), sup))
            .collect()
    }

    fn v(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    const OPTS: Options = Options {
        candidate: true,
        skip_sync: false,
        exit_on_error: true,
    };

    #[test]
    fn commands_are_split_like_a_shell_without_running_one() {
        let plan = Plan::new(
            &cfg(&[(
                r#"sh -c 'sqlite3 /litefs/db "create table t(x)"; exit 7'"#,
                false,
            )]),
            &[],
        )
        .unwrap();
        assert_eq!(
            plan.entries()[0].argv,
            v(&[
                "sh",
                "-c",
                r#"sqlite3 /litefs/db "create table t(x)"; exit 7"#
            ])
        );
        // `;` and `$X` are plain characters: no shell sees them.
        let plan = Plan::new(&cfg(&[("echo a;b $HOME", false)]), &[]).unwrap();
        assert_eq!(plan.entries()[0].argv, v(&["echo", "a;b", "$HOME"]));
    }

    #[test]
    fn a_bad_command_names_the_entry() {
        let err = Plan::new(&cfg(&[("true", false), ("app 'unclosed", false)]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("exec[1]: cannot parse the command \"app 'unclosed\""),
            "{err}"
        );
        let err = Plan::new(&[], &v(&["''x '"])).unwrap_err().to_string();
        assert!(err.starts_with("the -- command: cannot parse"), "{err}");
    }

    #[test]
    fn the_command_line_replaces_the_config() {
        let config = cfg(&[("migrate", true), ("app", false)]);
        // Several words: taken as split by the caller's shell.
        let plan = Plan::new(&config, &v(&["sh", "-c", "exit 6"])).unwrap();
        assert_eq!(argvs(&plan, true), [(v(&["sh", "-c", "exit 6"]), true)]);
        // One word: split like a config entry (LiteFS joins and re-splits).
        let plan = Plan::new(&config, &v(&["app -port 80"])).unwrap();
        assert_eq!(argvs(&plan, false), [(v(&["app", "-port", "80"]), true)]);
    }

    #[test]
    fn if_candidate_entries_are_skipped_on_a_non_candidate() {
        let plan = Plan::new(
            &cfg(&[("migrate", true), ("seed", false), ("app", false)]),
            &[],
        )
        .unwrap();
        assert_eq!(
            argvs(&plan, true),
            [
                (v(&["migrate"]), false),
                (v(&["seed"]), false),
                (v(&["app"]), true)
            ]
        );
        assert_eq!(
            argvs(&plan, false),
            [(v(&["seed"]), false), (v(&["app"]), true)]
        );
        // An if-candidate last entry is the supervised one only where it runs.
        let plan = Plan::new(&cfg(&[("seed", false), ("app", true)]), &[]).unwrap();
        assert_eq!(argvs(&plan, false), [(v(&["seed"]), false)]);
    }

    #[test]
    fn exit_codes_are_what_a_shell_reports() {
        assert_eq!(status_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(status_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(status_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn nothing_starts_before_the_node_is_in_sync() {
        let tmp = tempfile::tempdir().unwrap();
        let mark = tmp.path().join("ran");
        let plan = Plan::new(&cfg(&[(&format!("touch {}", mark.display()), false)]), &[]).unwrap();
        rt().block_on(async {
            let (tx, mut signals) = Signals::channel();
            let (sync_tx, sync_rx) = tokio::sync::oneshot::channel::<()>();
            let in_sync = async {
                let _ = sync_rx.await;
            };
            let run = run(&plan, OPTS, in_sync, &mut signals);
            tokio::pin!(run);
            // Not in sync yet: the command does not start.
            let waited = tokio::time::timeout(Duration::from_millis(300), &mut run).await;
            assert!(waited.is_err());
            assert!(!mark.exists());
            sync_tx.send(()).unwrap();
            let outcome = run.await;
            assert!(
                matches!(&outcome, Outcome::Exited { status, .. } if status.success()),
                "{outcome:?}"
            );
            assert!(mark.exists());
            drop(tx);
        });
    }

    #[test]
    fn skip_sync_starts_without_waiting_and_a_signal_before_sync_stops_cleanly() {
        let plan = Plan::new(&cfg(&[("sh -c 'exit 3'", false)]), &[]).unwrap();
        rt().block_on(async {
            let (_tx, mut signals) = Signals::channel();
            let opts = Options {
                skip_sync: true,
                ..OPTS
            };
            let outcome = run(&plan, opts, std::future::pending(), &mut signals).await;
            assert_eq!(outcome.exit_code(), 3, "{outcome:?}");

            let (tx, mut signals) = Signals::channel();
            tx.send(libc::SIGTERM).unwrap();
            let outcome = run(&plan, OPTS, std::future::pending(), &mut signals).await;
            assert!(
                matches!(
                    outcome,
                    Outcome::Stopped {
                        signal: libc::SIGTERM
                    }
                ),
                "{outcome:?}"
            );
            assert_eq!(outcome.exit_code(), 0);
        });
    }

    #[test]
    fn a_signal_during_a_migration_stops_the_list() {
        let tmp = tempfile::tempdir().unwrap();
        let mark = tmp.path().join("app-ran");
        let plan = Plan::new(
            &cfg(&[
                ("sleep 30", false),
                (&format!("touch {}", mark.display()), false),
            ]),
            &[],
        )
        .unwrap();
        rt().block_on(async {
            let (tx, mut signals) = Signals::channel();
            let run = run(&plan, OPTS, std::future::ready(()), &mut signals);
            tokio::pin!(run);
            assert!(
                tokio::time::timeout(Duration::from_millis(200), &mut run)
                    .await
                    .is_err()
            );
            tx.send(libc::SIGTERM).unwrap();
            let outcome = tokio::time::timeout(Duration::from_secs(5), run)
                .await
                .expect("sleep was not signalled");
            assert_eq!(outcome.exit_code(), 143, "{outcome:?}");
        });
        assert!(!mark.exists());
    }

    #[test]
    fn dropping_the_run_terminates_the_command() {
        let tmp = tempfile::tempdir().unwrap();
        let pidfile = tmp.path().join("pid");
        let plan = Plan::new(
            &cfg(&[(
                &format!("sh -c 'echo $$ > {}; exec sleep 30'", pidfile.display()),
                false,
            )]),
            &[],
        )
        .unwrap();
        let pid: i32 = rt().block_on(async {
            let (_tx, mut signals) = Signals::channel();
            let run = run(&plan, OPTS, std::future::ready(()), &mut signals);
            tokio::pin!(run);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                assert!(
                    tokio::time::timeout(Duration::from_millis(20), &mut run)
                        .await
                        .is_err()
                );
                if let Ok(p) = std::fs::read_to_string(&pidfile)
                    && let Ok(pid) = p.trim().parse()
                {
                    break pid;
                }
                assert!(Instant::now() < deadline, "the command did not start");
            }
            // `run` is dropped here, with the command running.
        });
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "the command outlived the run");
    }

    #[test]
    fn a_missing_program_is_a_clear_failure() {
        let plan = Plan::new(&cfg(&[("/nonexistent/app -x", false)]), &[]).unwrap();
        rt().block_on(async {
            let (_tx, mut signals) = Signals::channel();
            let outcome = run(&plan, OPTS, std::future::ready(()), &mut signals).await;
            let Outcome::Failed(e) = &outcome else {
                panic!("{outcome:?}");
            };
            assert!(
                e.to_string()
                    .starts_with("exec[0]: cannot start `/nonexistent/app -x`: "),
                "{e}"
            );
            assert_eq!(outcome.exit_code(), EXIT_EXEC_FAILED);
        });
    }
}
