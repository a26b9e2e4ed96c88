//! `exec` and `litefs mount -- CMD` with the real binary and a real mount: the app starts
//! once the mount is live, migrations run first, `if-candidate` entries are skipped on a
//! replica, signals reach the app, and litefs exits with the app's status after
//! unmounting. Also the `log` settings, seen on stderr.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::support::{is_mounted, kill_and_unmount, wait_until};

/// A node's directories and config; `start` runs `litefs mount` on them.
struct Node {
    tmp: tempfile::TempDir,
    mnt: PathBuf,
    data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A YAML scalar for any string: YAML reads JSON strings as double-quoted scalars.
fn yaml(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

impl Node {
    /// A static-lease node (primary when `candidate`) with `extra` appended to its config;
    /// `{mnt}` and `{tmp}` in `extra` are replaced by the mount point and a scratch dir.
    fn new(candidate: bool, extra: &str) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        let data = tmp.path().join("data");
        let config = tmp.path().join("litefs.yml");
        let extra = extra
            .replace("{mnt}", &mnt.display().to_string())
            .replace("{tmp}", &tmp.path().display().to_string());
        let text = format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: {candidate}\n  advertise-url: http://127.0.0.1:20202\nhttp:\n  addr: 127.0.0.1:0\n{extra}",
            mnt.display(),
            data.display()
        );
        std::fs::write(&config, text).unwrap();
        let log = tmp.path().join("stderr.log");
        Node {
            tmp,
            mnt,
            data,
            config,
            log,
            child: None,
        }
    }

    /// A file in the scratch dir (outside the mount).
    fn scratch(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Starts `litefs mount -config ... [args]`.
    fn start(&mut self, args: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_litefs"))
            .args(["mount", "-config"])
            .arg(&self.config)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("HOSTNAME")
            .env("LITEFS_EXEC_TEST", "inherited")
            .stdout(std::fs::File::create(self.scratch("stdout.log")).unwrap())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for litefs to exit on its own.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "litefs still running after {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether litefs is still running.
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends a signal to litefs only (not to the app).
    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, sig) };
    }

    fn wait_mounted(&mut self) {
        let mnt = self.mnt.clone();
        let ok = wait_until(Duration::from_secs(10), || {
            is_mounted(&mnt) && std::fs::read_dir(&mnt).is_ok()
        });
        assert!(ok, "not mounted; log:\n{}", self.log_text());
    }

    /// Rows of `select x from t` in the database as litefs stored it (read after exit).
    fn rows(&self, db: &str) -> Vec<i64> {
        let path = self.data.join("dbs").join(db).join("database");
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap_or_else(|e| panic!("{}: {e}; log:\n{}", path.display(), self.log_text()));
        let mut stmt = conn.prepare("select x from t order by rowid").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill_and_unmount(&mut self.child, &self.mnt);
    }
}

fn assert_unmounted(dir: &Path, log: &str) {
    assert!(!is_mounted(dir), "still mounted; log:\n{log}");
}

#[test]
fn app_writes_through_the_live_mount_and_its_status_is_litefs_s() {
    let cmd =
        r#"sh -c 'sqlite3 {mnt}/db "create table t(x); insert into t values (42)" && exit 7'"#;
    let mut node = Node::new(true, &format!("exec: {}\n", yaml(cmd)));
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert_eq!(status.code(), Some(7), "{log}");
    assert_unmounted(&node.mnt, &log);
    // The write went through litefs on the first try (no retry in the app): it is in
    // litefs's store, and nothing was written into the bare mount-point directory.
    assert_eq!(node.rows("db"), [42], "{log}");
    assert!(!node.mnt.join("db").exists(), "{log}");
    assert!(!crate::support::ltx_files(&node.data, "db").is_empty());
    let mounted_at = log.find("mounted").unwrap();
    let started_at = log.find("exec[0]: `sh -c").unwrap();
    assert!(mounted_at < started_at, "{log}");
}

#[test]
fn migrations_run_in_order_before_the_app() {
    let extra = format!(
        "exec:\n  - cmd: {}\n    if-candidate: true\n  - cmd: {}\n  - cmd: {}\n",
        yaml("sqlite3 {mnt}/db 'create table t(x)'"),
        yaml("sqlite3 {mnt}/db 'insert into t values (1)'"),
        // The app: fails unless both migrations ran before it.
        yaml("sh -c 'sqlite3 {mnt}/db \"insert into t select max(x) + 1 from t\"'"),
    );
    let mut node = Node::new(true, &extra);
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert!(status.success(), "{status:?}: {log}");
    assert_eq!(node.rows("db"), [1, 2], "{log}");
    assert_unmounted(&node.mnt, &log);
}

#[test]
fn if_candidate_entries_are_skipped_on_a_replica() {
    // No replication in this build: a static replica is never "in sync", so exec
    // starts there only with skip-sync.
    let extra = format!(
        "skip-sync: true\nexec:\n  - cmd: {}\n    if-candidate: true\n  - cmd: {}\n",
        yaml("touch {tmp}/migrated"),
        yaml("sh -c 'touch {tmp}/app-ran; exit 3'"),
    );
    let mut node = Node::new(false, &extra);
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(node.scratch("app-ran").exists(), "{log}");
    assert!(!node.scratch("migrated").exists(), "{log}");
    assert!(
        log.contains("exec[0]: skipping `touch ") && log.contains("this node is not a candidate"),
        "{log}"
    );
}

#[test]
fn exec_waits_for_sync_unless_skip_sync() {
    // A replica with no replication to catch up through: without skip-sync the app
    // never starts, and litefs still stops cleanly on SIGTERM.
    let extra = format!("exec: {}\n", yaml("touch {tmp}/app-ran"));
    let mut node = Node::new(false, &extra);
    node.start(&[]);
    node.wait_mounted();
    assert!(
        !wait_until(Duration::from_secs(1), || node.scratch("app-ran").exists()),
        "{}",
        node.log_text()
    );
    assert!(node.running());
    node.signal(libc::SIGTERM);
    let status = node.wait(Duration::from_secs(10));
    let log = node.log_text();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("waiting for this node to be in sync"), "{log}");
    assert_unmounted(&node.mnt, &log);
}

#[test]
fn sigterm_is_forwarded_and_litefs_exits_with_the_app_s_status_after_it() {
    // The app keeps the database open in the mount until it exits, so litefs can only
    // unmount cleanly after the app is gone.
    let app = "sh -c 'sqlite3 {mnt}/db \"create table t(x)\"; exec 3<{mnt}/db; \
               trap \"echo app-got-term >&2; exit 5\" TERM; touch {tmp}/started; \
               while true; do sleep 0.1; done'";
    let mut node = Node::new(true, &format!("exec: {}\n", yaml(app)));
    node.start(&[]);
    let started = node.scratch("started");
    assert!(
        wait_until(Duration::from_secs(20), || started.exists()),
        "{}",
        node.log_text()
    );
    node.signal(libc::SIGTERM);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert_eq!(status.code(), Some(5), "{log}");
    assert!(log.contains("forwarding SIGTERM to exec[0]"), "{log}");
    assert!(log.contains("app-got-term"), "{log}");
    assert!(log.contains("unmounted"), "{log}");
    assert!(!log.contains("busy"), "{log}");
    assert_unmounted(&node.mnt, &log);
}

#[test]
fn an_app_killed_by_the_forwarded_signal_gives_128_plus_signo() {
    // `--` with several words: the argv as the shell split it; it replaces the
    // config's exec.
    let mut node = Node::new(true, &format!("exec: {}\n", yaml("sh -c 'exit 9'")));
    let started = node.scratch("started");
    let script = format!("touch {}; exec sleep 30", started.display());
    node.start(&["--", "sh", "-c", &script]);
    assert!(
        wait_until(Duration::from_secs(20), || started.exists()),
        "{}",
        node.log_text()
    );
    node.signal(libc::SIGINT);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{log}");
    assert!(log.contains("forwarding SIGINT to the -- command"), "{log}");
    assert_unmounted(&node.mnt, &log);
}

#[test]
fn the_app_inherits_the_environment_plus_hostname() {
    // Passed after `--`, so litefs's config expansion does not touch the `$`s.
    let mut node = Node::new(true, "");
    let out = node.scratch("env");
    let script = format!("echo \"$LITEFS_EXEC_TEST $HOSTNAME\" > {}", out.display());
    node.start(&["--", "sh", "-c", &script]);
    let status = node.wait(Duration::from_secs(20));
    assert!(status.success(), "{}", node.log_text());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("inherited {}\n", host.trim())
    );
}

#[test]
fn the_app_is_stopped_when_the_mount_goes_away_underneath() {
    let app = "sh -c 'trap \"touch {tmp}/got-term; exit 0\" TERM; touch {tmp}/started; \
               while true; do sleep 0.1; done'";
    let mut node = Node::new(true, &format!("exec: {}\n", yaml(app)));
    node.start(&[]);
    let started = node.scratch("started");
    assert!(
        wait_until(Duration::from_secs(20), || started.exists()),
        "{}",
        node.log_text()
    );
    let st = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&node.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert!(log.contains("the mount was removed from outside"), "{log}");
    assert!(
        log.contains("exec[0] is still running while litefs stops; sending SIGTERM"),
        "{log}"
    );
    assert!(node.scratch("got-term").exists(), "{log}");
}

#[test]
fn a_single_word_after_dashes_is_split_like_a_config_entry() {
    let mut node = Node::new(true, "");
    node.start(&["--", "sh -c 'exit 6'"]);
    let status = node.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(6), "{}", node.log_text());
}

#[test]
fn a_failing_migration_stops_litefs_with_a_clear_message() {
    let extra = format!(
        "exec:\n  - cmd: {}\n  - cmd: {}\n",
        yaml("sh -c 'exit 4'"),
        yaml("touch {tmp}/app-ran"),
    );
    let mut node = Node::new(true, &extra);
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "exec[0]: `sh -c 'exit 4'` failed (exit status: 4); the commands after it were not started"
        ),
        "{log}"
    );
    assert!(!node.scratch("app-ran").exists(), "{log}");
    assert_unmounted(&node.mnt, &log);

    // A program that does not exist.
    let mut node = Node::new(
        true,
        &format!("exec: {}\n", yaml("/nonexistent/app -port 80")),
    );
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "exec[0]: cannot start `/nonexistent/app -port 80`: No such file or directory"
        ),
        "{log}"
    );
    assert_unmounted(&node.mnt, &log);

    // A command that does not parse fails before anything is mounted.
    let mut node = Node::new(true, &format!("exec: {}\n", yaml("app 'unclosed")));
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("exec[0]: cannot parse the command \"app 'unclosed\""),
        "{log}"
    );
    assert!(!log.contains("mounted"), "{log}");
}

#[test]
fn exit_on_error_false_keeps_the_node_up_for_inspection() {
    let extra = format!(
        "exit-on-error: false\nexec:\n  - cmd: {}\n  - cmd: {}\n",
        yaml("sh -c 'exit 4'"),
        yaml("touch {tmp}/app-ran"),
    );
    let mut node = Node::new(true, &extra);
    node.start(&[]);
    let log_has_failure =
        || std::fs::read_to_string(&node.log).is_ok_and(|l| l.contains("exit-on-error is false"));
    assert!(
        wait_until(Duration::from_secs(20), log_has_failure),
        "{}",
        node.log_text()
    );
    // Still up, and the mount still serves.
    std::thread::sleep(Duration::from_millis(500));
    assert!(node.running(), "{}", node.log_text());
    assert!(is_mounted(&node.mnt));
    std::fs::read_dir(&node.mnt).unwrap();
    node.signal(libc::SIGTERM);
    let status = node.wait(Duration::from_secs(10));
    let log = node.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("exec[0]: `sh -c 'exit 4'` failed"), "{log}");
    assert!(!node.scratch("app-ran").exists(), "{log}");
    assert_unmounted(&node.mnt, &log);

    // A failure before anything is mounted (the mount point is a file) also leaves
    // litefs up until a signal.
    let mut node = Node::new(true, "exit-on-error: false\n");
    std::fs::write(&node.mnt, b"").unwrap();
    node.start(&[]);
    let log_has_failure =
        || std::fs::read_to_string(&node.log).is_ok_and(|l| l.contains("exit-on-error is false"));
    assert!(
        wait_until(Duration::from_secs(20), log_has_failure),
        "{}",
        node.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.running(), "{}", node.log_text());
    node.signal(libc::SIGINT);
    let status = node.wait(Duration::from_secs(10));
    let log = node.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("is not a directory"), "{log}");
}

#[test]
fn log_format_json_writes_json_lines() {
    for timestamp in [false, true] {
        let mut node = Node::new(
            true,
            &format!("log:\n  format: json\n  timestamp: {timestamp}\nexec: \"true\"\n"),
        );
        node.start(&[]);
        let status = node.wait(Duration::from_secs(20));
        let log = node.log_text();
        assert!(status.success(), "{log}");
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{log}");
        for line in &lines {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(v["level"].is_string(), "{line}");
            assert!(v["fields"]["message"].is_string(), "{line}");
            assert_eq!(v["timestamp"].is_string(), timestamp, "{line}");
        }
        assert!(
            lines.iter().any(|l| l.contains("exec[0]: `true` exited")),
            "{log}"
        );
    }
}

#[test]
fn log_debug_and_timestamp_are_honoured_in_text() {
    // The defaults (as LiteFS): text, info level, no timestamps.
    let mut node = Node::new(true, "exec: \"true\"\n");
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert!(status.success(), "{log}");
    assert!(!log.contains("DEBUG"), "{log}");
    assert!(log.contains(" INFO "), "{log}");
    assert!(
        log.lines()
            .all(|l| !l.starts_with(|c: char| c.is_ascii_digit())),
        "a line starts with a timestamp: {log}"
    );

    let mut node = Node::new(
        true,
        "log:\n  format: text\n  debug: true\n  timestamp: true\nexec: \"true\"\n",
    );
    node.start(&[]);
    let status = node.wait(Duration::from_secs(20));
    let log = node.log_text();
    assert!(status.success(), "{log}");
    assert!(log.contains(" DEBUG "), "{log}");
    assert!(
        log.lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.starts_with(|c: char| c.is_ascii_digit())),
        "a line has no timestamp: {log}"
    );
}
