//! `litefs mount`, bare `litefs -config`, and `litefs version`, run as a user would.

use std::path::Path;
use std::process::{Command, Output};

const BAD: &str = "lease:\n  type: static\n  candidat: true\n";
const GOOD: &str = "\
fuse:
  dir: /tmp/litefs-cli-test/mnt
data:
  dir: /tmp/litefs-cli-test/data
lease:
  type: static
  candidate: ${ROLE == 'primary'}
  hostname: localhost
  advertise-url: http://127.0.0.1:20202
";

/// Runs the binary in `cwd` with HOME pointing at `home`, so the config search never
/// sees the real home directory.
fn litefs(args: &[&str], cwd: &Path, home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env("ROLE", "primary")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Dirs {
    cwd: tempfile::TempDir,
    home: tempfile::TempDir,
}

fn dirs() -> Dirs {
    Dirs {
        cwd: tempfile::tempdir().unwrap(),
        home: tempfile::tempdir().unwrap(),
    }
}

#[test]
fn bad_config_fails_with_file_line_and_key_in_every_spelling() {
    let d = dirs();
    std::fs::write(d.cwd.path().join("bad.yml"), BAD).unwrap();
    for args in [
        &["-config", "bad.yml"][..],
        &["--config", "bad.yml"],
        &["-config=bad.yml"],
        &["mount", "-config", "bad.yml"],
        &["mount", "--config", "bad.yml"],
        &["mount", "--config=bad.yml", "--", "app"],
    ] {
        let out = litefs(args, d.cwd.path(), d.home.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("bad.yml:3:3: unknown key 'lease.candidat' (expected one of: type, "),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn invalid_values_and_missing_files_exit_2() {
    let d = dirs();
    std::fs::write(
        d.cwd.path().join("replica.yml"),
        "lease:\n  type: static\n  candidate: false\n",
    )
    .unwrap();
    let out = litefs(
        &["mount", "-config", "replica.yml"],
        d.cwd.path(),
        d.home.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("replica.yml:1:1: lease.advertise-url: is required"),
        "{}",
        stderr(&out)
    );

    let out = litefs(
        &["mount", "-config", "nope.yml"],
        d.cwd.path(),
        d.home.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read config file nope.yml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn valid_config_is_accepted_and_mounted_until_sigterm() {
    let d = dirs();
    let base = d.cwd.path().join("node");
    let cfg = GOOD.replace("/tmp/litefs-cli-test", &base.display().to_string());
    std::fs::write(d.cwd.path().join("good.yml"), cfg).unwrap();
    let log = d.cwd.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["mount", "-config", "good.yml"])
        .current_dir(d.cwd.path())
        .env("HOME", d.home.path())
        .env("ROLE", "primary")
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mnt = base.join("mnt");
    let mounted = crate::support::wait_until(std::time::Duration::from_secs(10), || {
        crate::support::is_mounted(&mnt)
    });
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(mounted, "{err}");
    assert!(status.success(), "{status:?}: {err}");
    assert!(
        err.contains(&format!(
            "primary (static lease); fuse.dir {}",
            mnt.display()
        )),
        "{err}"
    );
    assert!(!crate::support::is_mounted(&mnt), "{err}");
}

#[test]
fn no_expand_env_leaves_variables_unexpanded() {
    let d = dirs();
    std::fs::write(d.cwd.path().join("good.yml"), GOOD).unwrap();
    let out = litefs(
        &["-config", "good.yml", "-no-expand-env"],
        d.cwd.path(),
        d.home.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("good.yml:7:14: lease.candidate: invalid type"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn config_search_order_then_embedded_default() {
    // ./litefs.yml wins over ~/litefs.yml.
    let d = dirs();
    std::fs::write(d.cwd.path().join("litefs.yml"), BAD).unwrap();
    std::fs::write(d.home.path().join("litefs.yml"), GOOD).unwrap();
    let out = litefs(&["mount"], d.cwd.path(), d.home.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("litefs.yml:3:3: unknown key 'lease.candidat'"),
        "{}",
        stderr(&out)
    );

    // Without ./litefs.yml, ~/litefs.yml is used. Its fuse.dir is a regular file, so
    // the mount fails right after the config is read.
    std::fs::remove_file(d.cwd.path().join("litefs.yml")).unwrap();
    let not_a_dir = d.home.path().join("not-a-dir");
    std::fs::write(&not_a_dir, b"").unwrap();
    let home_cfg = GOOD.replace("/tmp/litefs-cli-test/mnt", &not_a_dir.display().to_string());
    std::fs::write(d.home.path().join("litefs.yml"), home_cfg).unwrap();
    let out = litefs(&["mount"], d.cwd.path(), d.home.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}", d.home.path().join("litefs.yml").display())),
        "{err}"
    );
    assert!(err.contains("is not a directory"), "{err}");

    // With neither (and no /etc/litefs.yml), the embedded default is used and said so.
    // It really mounts /litefs: stop it with SIGTERM once it has said which config
    // it uses.
    if Path::new("/etc/litefs.yml").exists() {
        return;
    }
    std::fs::remove_file(d.home.path().join("litefs.yml")).unwrap();
    let created: Vec<&Path> = [Path::new("/litefs"), Path::new("/var/lib/litefs")]
        .into_iter()
        .filter(|p| !p.exists())
        .collect();
    let log = d.cwd.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .current_dir(d.cwd.path())
        .env("HOME", d.home.path())
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let said = crate::support::wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("fuse.dir /litefs"))
    });
    // Give it the moment to mount, so SIGTERM exercises the clean shutdown.
    crate::support::wait_until(std::time::Duration::from_secs(5), || {
        crate::support::is_mounted(Path::new("/litefs"))
    });
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(said, "{err}");
    assert!(
        err.contains("using the embedded default (config/litefs.yml)"),
        "{err}"
    );
    assert!(
        err.contains("fuse.dir /litefs; data.dir /var/lib/litefs"),
        "{err}"
    );
    assert!(!crate::support::is_mounted(Path::new("/litefs")), "{err}");
    // Leave the machine as it was.
    for p in created {
        let _ = std::fs::remove_dir_all(p);
    }
}

#[test]
fn version_prints_the_version() {
    let d = dirs();
    for args in [&["version"][..], &["--version"], &["-version"]] {
        let out = litefs(args, d.cwd.path(), d.home.path());
        assert!(out.status.success(), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.trim(),
            format!("litefs {}", env!("CARGO_PKG_VERSION")),
            "{args:?}"
        );
    }
}
