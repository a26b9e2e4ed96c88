//! Operator surface with real nodes: `/info`, `/metrics`, `/export`, `/import` and the
//! `litefs status`, `export`, `import` commands.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use rusqlite::Connection;

use crate::repl::{free_port, primary, wait_converged};
use crate::support::{
    Process, http_get_text as get_text, http_request as http, ltx_files, wait_until,
};

/// A replica of the primary on `port` serving HTTP on `http_port`.
fn replica_on(port: u16, http_port: u16) -> Process {
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: false\n  hostname: primary-host\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{http_port}\n",
            mnt.display(),
            data.display(),
        )
    })
}

fn litefs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(args)
        .output()
        .unwrap()
}

/// A database of about `rows` KiB made by the sqlite3 CLI.
fn make_db(path: &Path, rows: u32) {
    let sql = format!(
        "PRAGMA page_size=4096; CREATE TABLE big (id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<{rows})
         INSERT INTO big SELECT x, randomblob(1000) FROM c;"
    );
    let st = Command::new("sqlite3").arg(path).arg(sql).status().unwrap();
    assert!(st.success());
}

fn rows(path: &Path) -> i64 {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row("SELECT count(*) FROM big", [], |r| r.get(0))
        .unwrap()
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .unwrap_or_else(|| panic!("no {line_prefix} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn import_is_one_ltx_replicates_and_exports_byte_identically() {
    let port = free_port();
    let rport = free_port();
    let p = primary(port, "");
    let r = replica_on(port, rport);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.db");
    make_db(&src, 6000);
    let src_bytes = std::fs::read(&src).unwrap();
    assert!(src_bytes.len() > 5 << 20, "{} bytes", src_bytes.len());

    // The database already exists with one small transaction: the import replaces it.
    {
        let c = Connection::open(p.path("imp.db")).unwrap();
        c.execute_batch("CREATE TABLE old (x); INSERT INTO old VALUES (1);")
            .unwrap();
    }
    let before = ltx_files(&p.data, "imp.db").len();
    assert!(before >= 1);

    let url = format!("http://127.0.0.1:{port}");
    let out = litefs(&[
        "import",
        "-name",
        "imp.db",
        "-url",
        &url,
        src.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "import failed: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log_text()
    );
    assert_eq!(
        ltx_files(&p.data, "imp.db").len(),
        before + 1,
        "the import must be exactly one LTX file"
    );
    assert_eq!(std::fs::read(p.path("imp.db")).unwrap(), src_bytes);
    assert_eq!(rows(&p.path("imp.db")), 6000);

    wait_converged(&p, &[&r], "imp.db");
    assert_eq!(rows(&r.path("imp.db")), 6000);

    // Export from the replica: byte-identical to the primary's file.
    let dst = tmp.path().join("out.db");
    let rurl = format!("http://127.0.0.1:{rport}");
    let out = litefs(&[
        "export",
        "-name",
        "imp.db",
        "-url",
        &rurl,
        dst.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&dst).unwrap() == std::fs::read(p.path("imp.db")).unwrap());

    // An unknown database is a clear error and writes nothing.
    let missing = tmp.path().join("missing.db");
    let out = litefs(&[
        "export",
        "-name",
        "nope.db",
        "-url",
        &rurl,
        missing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.db"));
    assert!(!missing.exists());
}

#[test]
fn bad_files_and_replicas_are_refused_by_import() {
    let port = free_port();
    let rport = free_port();
    let p = primary(port, "");
    let r = replica_on(port, rport);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.db");
    make_db(&src, 300);
    let good = std::fs::read(&src).unwrap();

    // Truncated: the header's page count no longer matches the size.
    let truncated = &good[..good.len() - 4096];
    let (status, body) = http(port, "POST", "/import?name=bad.db", truncated);
    let msg = String::from_utf8_lossy(&body);
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("pages"), "{msg}");
    // Bad magic.
    let mut garbage = good.clone();
    garbage[..16].copy_from_slice(b"NotSQLite format");
    let (status, body) = http(port, "POST", "/import?name=bad.db", &garbage);
    assert_eq!(status, 422);
    assert!(String::from_utf8_lossy(&body).contains("magic"));
    assert!(
        !p.path("bad.db").exists(),
        "a refused import created the database"
    );

    // The command refuses before uploading, with the reason.
    let bad = tmp.path().join("bad.db");
    std::fs::write(&bad, truncated).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let out = litefs(&[
        "import",
        "-name",
        "bad.db",
        "-url",
        &url,
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid SQLite database"));

    // A database with a live WAL (a connection holds it open) is refused: writes to
    // its file would not be captured.
    let c = Connection::open(p.path("wal.db")).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    c.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
        .unwrap();
    let (status, body) = http(port, "POST", "/import?name=wal.db", &good);
    let msg = String::from_utf8_lossy(&body);
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("WAL"), "{msg}");
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    drop(c);

    // A reader in a transaction holds SQLite's SHARED lock: the import waits for no
    // one and changes nothing.
    let c = Connection::open(p.path("busy.db")).unwrap();
    c.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1); BEGIN; SELECT * FROM t;")
        .unwrap();
    let (status, body) = http(port, "POST", "/import?name=busy.db", &good);
    let msg = String::from_utf8_lossy(&body);
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("in use"), "{msg}");
    c.execute_batch("COMMIT").unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    drop(c);

    // A replica names the primary.
    let (status, body) = http(rport, "POST", "/import?name=x.db", &good);
    let msg = String::from_utf8_lossy(&body);
    assert_ne!(status, 200);
    assert!(
        msg.contains("primary-host") && msg.contains(&format!("127.0.0.1:{port}")),
        "{msg}"
    );
    assert!(!r.path("x.db").exists());
}

#[test]
fn info_metrics_and_status_reflect_a_workload() {
    let port = free_port();
    let rport = free_port();
    let p = primary(port, "");
    let r = replica_on(port, rport);

    let c = Connection::open(p.path("w.db")).unwrap();
    c.execute_batch("CREATE TABLE t (v)").unwrap();
    wait_converged(&p, &[&r], "w.db");
    let m1 = get_text(port, "/metrics");
    let txid1 = metric(&m1, "litefs_db_txid{db=\"w.db\"} ");
    let commits1 = metric(&m1, "litefs_db_commits_total{db=\"w.db\"} ");
    assert_eq!(metric(&m1, "litefs_is_primary "), 1.0);
    assert!(wait_until(Duration::from_secs(10), || {
        metric(&get_text(port, "/metrics"), "litefs_stream_count ") == 1.0
    }));
    for i in 0..5 {
        c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
    }
    let m2 = get_text(port, "/metrics");
    assert_eq!(metric(&m2, "litefs_db_txid{db=\"w.db\"} "), txid1 + 5.0);
    assert_eq!(
        metric(&m2, "litefs_db_commits_total{db=\"w.db\"} "),
        commits1 + 5.0
    );
    assert_eq!(
        metric(&m2, "litefs_db_ltx_files_total{db=\"w.db\"} "),
        commits1 + 5.0
    );
    assert!(metric(&m2, "litefs_db_ltx_bytes_total{db=\"w.db\"} ") > 0.0);

    wait_converged(&p, &[&r], "w.db");
    let rm = get_text(rport, "/metrics");
    assert_eq!(metric(&rm, "litefs_is_primary "), 0.0);
    assert_eq!(metric(&rm, "litefs_db_txid{db=\"w.db\"} "), txid1 + 5.0);
    assert!(metric(&rm, "litefs_lag_seconds ") >= 0.0);

    // /info on both nodes agrees with the mount's -pos file.
    let pos = std::fs::read_to_string(p.path("w.db-pos")).unwrap();
    let (txid, checksum) = pos.trim().split_once('/').unwrap();
    for (node_port, primary) in [(port, true), (rport, false)] {
        let info: serde_json::Value = serde_json::from_str(&get_text(node_port, "/info")).unwrap();
        assert_eq!(info["is_primary"], primary);
        assert_eq!(info["candidate"], primary);
        assert_eq!(info["primary_hostname"], "primary-host");
        assert_eq!(info["primary_url"], format!("http://127.0.0.1:{port}"));
        let db = &info["databases"][0];
        assert_eq!(db["name"], "w.db");
        assert_eq!(db["txid"], txid);
        assert_eq!(db["checksum"], checksum);
    }

    let rurl = format!("http://127.0.0.1:{rport}");
    let out = litefs(&["status", "-url", &rurl]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("role:      replica"), "{text}");
    assert!(text.contains("primary-host"), "{text}");
    assert!(text.contains("lag:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("w.db") && l.contains(txid) && l.contains(checksum)),
        "{text}"
    );
    let out = litefs(&["status", "-url", &rurl, "-json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["is_primary"], false);
    assert_eq!(v["databases"][0]["txid"], txid);

    let out = litefs(&[
        "status",
        "-url",
        &format!("http://127.0.0.1:{}", free_port()),
    ]);
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty());
}

#[test]
fn import_of_50_mb_is_read_on_every_replica() {
    let port = free_port();
    let p = primary(port, "");
    let r1_port = free_port();
    let r1 = replica_on(port, r1_port);
    let r2 = replica_on(port, free_port());
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big.db");
    make_db(&src, 50_000);
    let len = std::fs::metadata(&src).unwrap().len();
    assert!(len > 50_000_000, "{len} bytes");

    let url = format!("http://127.0.0.1:{port}");
    let t = std::time::Instant::now();
    let out = litefs(&[
        "import",
        "-name",
        "big.db",
        "-url",
        &url,
        src.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let imported = t.elapsed();
    assert_eq!(ltx_files(&p.data, "big.db").len(), 1);
    wait_converged(&p, &[&r1, &r2], "big.db");
    eprintln!(
        "imported {len} bytes in {imported:?}, on both replicas after {:?}",
        t.elapsed()
    );
    for node in [&p, &r1, &r2] {
        assert_eq!(rows(&node.path("big.db")), 50_000);
    }

    // Off a terminal, progress is one line per tenth.
    let err = String::from_utf8_lossy(&out.stderr);
    let tenths: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("import big.db: "))
        .collect();
    assert_eq!(tenths.len(), 10, "{err}");
    assert!(tenths[0].starts_with("import big.db: 10% ") && tenths[9].contains(" 100% "));
    // A replica receiving a large snapshot (the import created the database, so its
    // one LTX file starts at TXID 1) logs its progress per tenth.
    for r in [&r1, &r2] {
        let log = r.log_text();
        // Tenths of the database size; LZ4 makes the file a little smaller, so the
        // last step or two may jump to 100%.
        let lines = log.lines().filter(|l| l.contains("snapshot progress"));
        assert!((8..=10).contains(&lines.count()), "{log}");
        assert!(log.contains("percent=10 "), "{log}");
        assert!(log.contains("percent=100"), "{log}");
        assert!(log.contains("snapshot received"), "{log}");
    }
    let dst = tmp.path().join("out.db");
    let out = litefs(&[
        "export",
        "-name",
        "big.db",
        "-url",
        &format!("http://127.0.0.1:{}", r1_port),
        dst.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("export big.db: "))
            .count(),
        10,
        "{err}"
    );
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), len);
}

/// A static node with `http.auth-token` set (`token`), primary when `primary_port` is
/// its own port.
fn node_with_token(port: u16, http_port: u16, token: Option<&str>) -> Process {
    let candidate = port == http_port;
    let auth = token.map_or(String::new(), |t| format!("  auth-token: {t}\n"));
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: {candidate}\n  hostname: primary-host\n  advertise-url: http://127.0.0.1:{port}\nhttp:\n  addr: 127.0.0.1:{http_port}\n{auth}",
            mnt.display(),
            data.display(),
        )
    })
}

/// Status of `GET path` with an optional `Authorization` header value.
fn get_status(port: u16, path: &str, auth: Option<&str>) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    String::from_utf8_lossy(&resp)
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn requests_without_the_auth_token_are_refused() {
    let token = "s3cret-token";
    let port = free_port();
    let p = node_with_token(port, port, Some(token));
    let rport = free_port();
    let r = node_with_token(port, rport, Some(token));
    let outsider = node_with_token(port, free_port(), None);

    // Replication works with the token.
    let c = Connection::open(p.path("auth.db")).unwrap();
    c.execute_batch("CREATE TABLE t (v); INSERT INTO t VALUES (1);")
        .unwrap();
    wait_converged(&p, &[&r], "auth.db");

    let bearer = format!("Bearer {token}");
    for node in [port, rport] {
        assert_eq!(get_status(node, "/info", None), 401);
        assert_eq!(get_status(node, "/info", Some("Bearer wrong")), 401);
        assert_eq!(get_status(node, "/export?name=auth.db", None), 401);
        assert_eq!(get_status(node, "/info", Some(&bearer)), 200);
        // Metrics stay open to scrapers.
        assert_eq!(get_status(node, "/metrics", None), 200);
    }
    let (status, _) = http(port, "POST", "/import?name=x.db", b"");
    assert_eq!(status, 401);
    let (status, _) = http(port, "POST", "/stream", b"");
    assert_eq!(status, 401);

    // A replica without the token is refused the stream and gets nothing.
    assert!(
        wait_until(Duration::from_secs(10), || outsider
            .log_text()
            .contains("401")),
        "outsider log:\n{}",
        outsider.log_text()
    );
    assert!(!outsider.path("auth.db").exists());

    // The commands send LITEFS_AUTH_TOKEN.
    let url = format!("http://127.0.0.1:{rport}");
    let out = litefs(&["status", "-url", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["status", "-url", &url])
        .env("LITEFS_AUTH_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("auth.db"));
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out.db");
    let out = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["export", "-name", "auth.db", "-url", &url])
        .arg(&dst)
        .env("LITEFS_AUTH_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rows_of(&dst, "t"), 1);
}

fn rows_of(path: &Path, table: &str) -> i64 {
    let c = Connection::open(path).unwrap();
    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}
