//! Helpers shared by the LTX integration tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// `../shared/testdata` relative to the repository root. A git worktree nested
/// deeper (e.g. `/work/wt/ltx`) finds it in the nearest ancestor that has it.
pub fn testdata() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    root.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/testdata"))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| root.join("../shared/testdata"))
}

/// Runs the `litefs` binary with `args`.
pub fn litefs(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(args)
        .output()
        .expect("run litefs")
}

/// Builds an argument list from anything path- or string-like.
#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(::std::ffi::OsStr::new(&$a)),*] };
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Stdout and stderr as text, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `sqlite3 DB SQL` and panics on failure.
pub fn sqlite(db: &Path, sql: &str) {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 CLI on PATH");
    assert!(out.status.success(), "sqlite3 {sql}: {}", text(&out));
}
