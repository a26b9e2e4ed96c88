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
fn valid_config_is_accepted_and_mount_says_it_is_not_in_this_build() {
    let d = dirs();
    std::fs::write(d.cwd.path().join("good.yml"), GOOD).unwrap();
    let out = litefs(
        &["mount", "-config", "good.yml", "--", "sleep", "1"],
        d.cwd.path(),
        d.home.path(),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("primary (static lease); fuse.dir /tmp/litefs-cli-test/mnt"),
        "{err}"
    );
    assert!(
        err.contains("mounting is not implemented in this build"),
        "{err}"
    );
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

    // Without ./litefs.yml, ~/litefs.yml is used.
    std::fs::remove_file(d.cwd.path().join("litefs.yml")).unwrap();
    let out = litefs(&["mount"], d.cwd.path(), d.home.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}", d.home.path().join("litefs.yml").display())),
        "{err}"
    );

    // With neither (and no /etc/litefs.yml), the embedded default is used and said so.
    if Path::new("/etc/litefs.yml").exists() {
        return;
    }
    std::fs::remove_file(d.home.path().join("litefs.yml")).unwrap();
    let out = litefs(&[], d.cwd.path(), d.home.path());
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("using the embedded default (config/litefs.yml)"),
        "{err}"
    );
    assert!(
        err.contains("fuse.dir /litefs; data.dir /var/lib/litefs"),
        "{err}"
    );
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
