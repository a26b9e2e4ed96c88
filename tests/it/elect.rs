//! Elections with real processes: two `litefs mount` nodes sharing an etcd or Consul
//! (in-repo test server) lease with a 2 s TTL; the `consul_agent_*` tests run the same
//! against a real `consul agent -dev` when `consul` is on PATH (and say they were
//! skipped otherwise). The primary is whichever node accepts a write through its mount.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::consul_server::{ConsulServer, ConsulServerOptions, Fault};
use crate::etcd_server::EtcdServer;
use crate::repl::{free_port, pos};
use crate::support::consul_agent::ConsulAgent;
use crate::support::{Process, wait_until};

pub(crate) const TTL: Duration = Duration::from_secs(2);

/// A candidate node named `name`, with `lease` as the YAML under `lease:` (type and its
/// store settings).
pub(crate) fn node(name: &str, lease: &str) -> Process {
    node_with(name, lease, true)
}

/// As [`node`], with `lease.candidate` set to `candidate`.
pub(crate) fn node_with(name: &str, lease: &str, candidate: bool) -> Process {
    let port = free_port();
    let (name, lease) = (name.to_string(), lease.to_string());
    Process::start_with(move |mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  candidate: {candidate}\n  hostname: {name}\n  advertise-url: http://127.0.0.1:{port}\n{lease}http:\n  addr: 127.0.0.1:{port}\n",
            mnt.display(),
            data.display()
        )
    })
}

pub(crate) fn etcd_lease(etcd: &EtcdServer) -> String {
    format!(
        "  type: etcd\n  etcd:\n    endpoints: [{}]\n    key: litefs-test\n    ttl: 2s\n",
        etcd.url()
    )
}

/// The in-repo Consul server, accepting the short test TTL (real Consul's minimum is
/// 10 s) and expiring sessions exactly at their TTL.
pub(crate) fn consul() -> ConsulServer {
    ConsulServer::start_with(ConsulServerOptions {
        min_ttl: Duration::from_secs(1),
        expiry_factor: 1.0,
        ..Default::default()
    })
}

pub(crate) fn consul_lease(consul: &ConsulServer) -> String {
    consul_lease_at(&consul.url())
}

/// The lease config (TTL 2 s, lock-delay 1 s) for the Consul at `url`.
pub(crate) fn consul_lease_at(url: &str) -> String {
    format!(
        "  type: consul\n  consul:\n    url: {url}\n    key: litefs-test\n    ttl: 2s\n    lock-delay: 1s\n"
    )
}

/// A real `consul agent -dev` when `consul` is on PATH (it accepts the test TTL, but
/// may expire a session up to 2x TTL late); `None`, after saying so, otherwise.
pub(crate) fn consul_agent(test: &str) -> Option<ConsulAgent> {
    ConsulAgent::start_or_skip(test)
}

/// Inserts one row through the node's mount; false when the node refuses the write.
pub(crate) fn try_write(p: &Process, v: &str) -> bool {
    let Ok(c) = Connection::open(p.path("db")) else {
        return false;
    };
    let _ = c.busy_timeout(Duration::from_millis(200));
    c.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        .and_then(|_| c.execute("INSERT INTO t (v) VALUES (?1)", [v]))
        .is_ok()
}

/// Waits until `p` accepts a write; returns how long that took.
pub(crate) fn wait_primary(p: &Process, within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    let ok = wait_until(within, || try_write(p, what));
    assert!(
        ok,
        "{what}: no write accepted in {within:?}; log:\n{}",
        p.log_text()
    );
    t0.elapsed()
}

/// Waits until `replica` shows `primary`'s position, then compares the database bytes.
pub(crate) fn converge(primary: &Process, replica: &Process) {
    let want = pos(primary, "db").expect("primary has db");
    let ok = wait_until(Duration::from_secs(15), || {
        pos(replica, "db").as_deref() == Some(&want)
    });
    assert!(
        ok,
        "replica stuck at {:?}, primary at {want}; replica log:\n{}",
        pos(replica, "db"),
        replica.log_text()
    );
    assert!(
        std::fs::read(primary.path("db")).unwrap() == std::fs::read(replica.path("db")).unwrap(),
        "replica's database differs from the primary's"
    );
}

/// Restarts a node after kill -9 (its mount point is left stale).
pub(crate) fn respawn_after_crash(p: &mut Process) {
    let _ = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&p.mnt)
        .status();
    p.spawn();
}

/// Two nodes: the first takes the lease and writes, the second replicates; SIGTERM of
/// the primary hands over within ~1 s; the old primary rejoins as a replica and
/// converges byte for byte.
fn clean_handoff(lease: &str) {
    let mut a = node("node-a", lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", lease);
    for i in 0..20 {
        assert!(try_write(&a, &format!("a {i}")));
    }
    converge(&a, &b);
    assert!(
        !try_write(&b, "b while a leads"),
        "replica accepted a write"
    );
    assert_eq!(
        std::fs::read_to_string(b.path(".primary")).unwrap().trim(),
        "node-a"
    );

    let t0 = Instant::now();
    let status = a.signal(libc::SIGTERM);
    let stopped = t0.elapsed();
    assert!(
        status.success(),
        "primary exit {status}; log:\n{}",
        a.log_text()
    );
    let took = wait_primary(&b, Duration::from_secs(5), "b after handoff");
    eprintln!("clean handoff: primary exited in {stopped:?}, takeover {took:?} later");
    assert!(
        took < Duration::from_millis(1500),
        "takeover took {took:?}; log:\n{}",
        b.log_text()
    );
    assert!(
        a.log_text().contains("released the lease"),
        "{}",
        a.log_text()
    );

    a.spawn();
    for i in 0..20 {
        assert!(try_write(&b, &format!("b {i}")));
    }
    converge(&b, &a);
    assert!(
        !try_write(&a, "a rejoined"),
        "rejoined node accepted a write"
    );
}

#[test]
fn etcd_two_nodes_handoff_crash_and_rejoin() {
    let etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    clean_handoff(&lease);
}

#[test]
fn etcd_crash_takeover_after_ttl() {
    let etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    let mut a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", &lease);
    for i in 0..10 {
        assert!(try_write(&a, &format!("a {i}")));
    }
    converge(&a, &b);

    a.signal(libc::SIGKILL);
    let took = wait_primary(&b, TTL + Duration::from_secs(5), "b after crash");
    eprintln!("crash takeover (etcd, ttl {TTL:?}): {took:?}");
    assert!(took <= TTL + Duration::from_secs(2), "took {took:?}");

    respawn_after_crash(&mut a);
    for i in 0..10 {
        assert!(try_write(&b, &format!("b {i}")));
    }
    converge(&b, &a);
    assert!(!try_write(&a, "a rejoined"));
}

#[test]
fn consul_two_nodes_handoff_and_rejoin() {
    let consul = consul();
    let lease = consul_lease(&consul);
    clean_handoff(&lease);
}

#[test]
fn consul_agent_two_nodes_handoff_and_rejoin() {
    if let Some(agent) = consul_agent("consul_agent_two_nodes_handoff_and_rejoin") {
        clean_handoff(&consul_lease_at(&agent.url()));
    }
}

/// kill -9 of the primary: the other node takes over once the session expired
/// (Consul: TTL..2x TTL) and the lock-delay (1 s) passed, never before the TTL.
fn consul_crash_takeover(lease: &str) {
    let mut a = node("node-a", lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", lease);
    assert!(try_write(&a, "a"));
    converge(&a, &b);
    a.signal(libc::SIGKILL);
    let took = wait_primary(&b, 2 * TTL + Duration::from_secs(4), "b after crash");
    eprintln!("crash takeover (consul, ttl {TTL:?}): {took:?}");
    assert!(took >= TTL, "took over before the TTL ran out: {took:?}");
}

#[test]
fn consul_crash_takeover_after_ttl_and_lock_delay() {
    let consul = consul();
    consul_crash_takeover(&consul_lease(&consul));
}

#[test]
fn consul_agent_crash_takeover_after_ttl_and_lock_delay() {
    if let Some(agent) = consul_agent("consul_agent_crash_takeover_after_ttl_and_lock_delay") {
        consul_crash_takeover(&consul_lease_at(&agent.url()));
    }
}

/// The primary loses its lease store: it stops taking writes before its TTL could run
/// out, so no other node can be writable at the same time.
#[test]
fn etcd_partitioned_primary_turns_read_only_before_ttl() {
    let mut etcd = EtcdServer::start();
    let a = node("node-a", &etcd_lease(&etcd));
    wait_primary(&a, Duration::from_secs(10), "a first");
    let t0 = Instant::now();
    etcd.stop();
    let ok = wait_until(TTL * 2, || !try_write(&a, "during partition"));
    let took = t0.elapsed();
    assert!(ok, "still writable; log:\n{}", a.log_text());
    eprintln!("etcd partition: read-only after {took:?} (ttl {TTL:?})");
    assert!(took < TTL, "read-only only after {took:?}");
    assert!(a.log_text().contains("lost the lease"), "{}", a.log_text());
}

#[test]
fn consul_blackholed_primary_turns_read_only_before_ttl() {
    let consul = consul();
    let a = node("node-a", &consul_lease(&consul));
    wait_primary(&a, Duration::from_secs(10), "a first");
    let t0 = Instant::now();
    consul.set_fault(Fault::Blackhole);
    let ok = wait_until(TTL * 2, || !try_write(&a, "during partition"));
    let took = t0.elapsed();
    assert!(ok, "still writable; log:\n{}", a.log_text());
    eprintln!("consul blackhole: read-only after {took:?} (ttl {TTL:?})");
    assert!(took < TTL, "read-only only after {took:?}");
    assert!(a.log_text().contains("lost the lease"), "{}", a.log_text());
}

/// After a partition from etcd heals, exactly one of the two nodes takes the lease
/// again and the other follows it to a byte-identical database.
#[test]
fn etcd_partition_heals_with_one_primary_and_a_converged_replica() {
    let mut etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    let a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", &lease);
    for i in 0..10 {
        assert!(try_write(&a, &format!("a {i}")));
    }
    converge(&a, &b);
    etcd.stop();
    assert!(wait_until(TTL * 2, || !try_write(&a, "partition")));
    etcd.restart();
    let ok = wait_until(TTL * 5, || {
        try_write(&a, "after heal a") || try_write(&b, "after heal b")
    });
    assert!(
        ok,
        "nobody took over; a:\n{}\nb:\n{}",
        a.log_text(),
        b.log_text()
    );
    let (primary, replica) = if try_write(&a, "which") {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(try_write(primary, "primary again"));
    assert!(!try_write(replica, "second writer"), "two writable nodes");
    converge(primary, replica);
}

/// A non-candidate replicates from the holder but never takes the lease, even when the
/// primary steps down.
#[test]
fn etcd_non_candidate_follows_but_never_leads() {
    let etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    let mut a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let c = node_with("node-c", &lease, false);
    assert!(try_write(&a, "a"));
    converge(&a, &c);
    a.signal(libc::SIGTERM);
    std::thread::sleep(TTL);
    assert!(
        !try_write(&c, "non-candidate"),
        "a non-candidate took writes"
    );
    a.spawn();
    wait_primary(&a, Duration::from_secs(5), "a back");
    converge(&a, &c);
}

/// The HTTP port of a node started by [`node_with`] (read back from its config).
pub(crate) fn port(p: &Process) -> u16 {
    let cfg = std::fs::read_to_string(&p.config).unwrap();
    cfg.lines()
        .find_map(|l| l.trim().strip_prefix("addr: 127.0.0.1:"))
        .and_then(|s| s.parse().ok())
        .expect("http.addr in the config")
}

/// A plain HTTP/1.0 request without a body; returns the status and body as text.
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let (status, body) = crate::support::http_request(port, method, path, b"");
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub(crate) fn info(p: &Process) -> serde_json::Value {
    let (status, body) = http(port(p), "GET", "/info");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of an unlabelled metric in `/metrics`.
pub(crate) fn metric(p: &Process, name: &str) -> u64 {
    let (_, text) = http(port(p), "GET", "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// A `GET /events` subscription.
struct Events {
    r: BufReader<TcpStream>,
}

impl Events {
    fn open(p: &Process) -> Events {
        let mut s = TcpStream::connect(("127.0.0.1", port(p))).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        write!(s, "GET /events HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut line = String::new();
        // Skip the response head.
        while Instant::now() < deadline {
            line.clear();
            match r.read_line(&mut line) {
                Ok(_) if line == "\r\n" => return Events { r },
                Ok(0) => panic!("/events closed"),
                _ => {}
            }
        }
        panic!("no /events response");
    }

    /// Events until one satisfies `want` (or `within` passes): all of them, the last
    /// being the match.
    fn until(
        &mut self,
        within: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        let mut line = String::new();
        while Instant::now() < deadline {
            match self.r.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) if line.ends_with('\n') => {
                    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
                    line.clear();
                    let done = want(&v);
                    seen.push(v);
                    if done {
                        return seen;
                    }
                }
                _ => {}
            }
        }
        panic!("no matching event in {within:?}; saw {seen:?}");
    }
}

/// Every elected node serves `/info`, `/metrics` and `/events` from the start; a
/// replica's stream endpoint refuses; events report the role, commits and changes of
/// primary; the lease counters count.
#[test]
fn etcd_every_node_serves_info_events_and_metrics() {
    let etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    let mut a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", &lease);
    let ok = wait_until(Duration::from_secs(10), || {
        info(&b)["primary_hostname"] == "node-a"
    });
    assert!(ok, "b's /info: {}", info(&b));
    assert_eq!(info(&b)["is_primary"], false);
    assert_eq!(info(&a)["is_primary"], true);
    assert_eq!(http(port(&b), "POST", "/stream").0, 400);

    let mut ea = Events::open(&a);
    let init = ea.until(Duration::from_secs(5), |e| e["type"] == "init");
    assert_eq!(init[0]["data"]["isPrimary"], true, "{init:?}");
    let mut eb = Events::open(&b);
    let init = eb.until(Duration::from_secs(5), |e| e["type"] == "init");
    assert_eq!(init[0]["data"]["isPrimary"], false);
    assert_eq!(init[0]["data"]["hostname"], "node-a");

    assert!(try_write(&a, "x"));
    let txid = pos(&a, "db").unwrap();
    let txid = txid.split('/').next().unwrap().to_string();
    ea.until(Duration::from_secs(5), |e| {
        e["type"] == "tx" && e["data"]["txID"] == txid
    });
    eb.until(Duration::from_secs(5), |e| {
        e["type"] == "tx" && e["data"]["txID"] == txid
    });

    // Renewals every TTL/2.
    assert!(wait_until(TTL * 2, || metric(
        &a,
        "litefs_lease_renewals_total"
    ) >= 1));
    assert_eq!(metric(&a, "litefs_lease_acquired_total"), 1);
    assert_eq!(metric(&b, "litefs_lease_acquired_total"), 0);

    a.signal(libc::SIGTERM);
    let seen = eb.until(Duration::from_secs(5), |e| {
        e["type"] == "primaryChange" && e["data"]["isPrimary"] == true
    });
    eprintln!("b's events across the handoff: {seen:?}");
    assert_eq!(metric(&b, "litefs_lease_acquired_total"), 1);
}

pub(crate) fn count(p: &Process, v: &str) -> i64 {
    let c = Connection::open(p.path("db")).unwrap();
    c.busy_timeout(Duration::from_secs(2)).unwrap();
    c.query_row("SELECT count(*) FROM t WHERE v = ?1", [v], |r| r.get(0))
        .unwrap()
}

/// A WAL transaction open on the primary when it gets SIGTERM commits (the step-down
/// waits for it), reaches the replica before the lease is released, and is there
/// once the replica leads.
#[test]
fn etcd_wal_transaction_in_flight_at_sigterm_commits_and_survives() {
    let etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    let mut a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", &lease);
    let c = Connection::open(a.path("db")).unwrap();
    c.busy_timeout(Duration::from_secs(2)).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    c.execute("INSERT INTO t (v) VALUES ('before')", [])
        .unwrap();
    same_pos(&a, &b);

    c.execute_batch("BEGIN IMMEDIATE; INSERT INTO t (v) VALUES ('in flight');")
        .unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(a.pid() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    c.execute_batch("COMMIT")
        .expect("the transaction begun as primary commits after SIGTERM");
    drop(c);
    let status = a.signal(0);
    assert!(
        status.success(),
        "a exited {status}; log:\n{}",
        a.log_text()
    );
    assert!(
        a.log_text().contains("waiting for transactions in flight"),
        "{}",
        a.log_text()
    );
    wait_primary(&b, Duration::from_secs(5), "b after handoff");
    assert_eq!(count(&b, "in flight"), 1, "b log:\n{}", b.log_text());
    a.spawn();
    assert!(try_write(&b, "b"));
    same_pos(&b, &a);
    assert_eq!(count(&a, "in flight"), 1);
}

/// Waits until `replica` shows `primary`'s position of `db` (in WAL mode the database
/// files differ until a checkpoint, so only positions are compared).
pub(crate) fn same_pos(primary: &Process, replica: &Process) {
    let want = pos(primary, "db").expect("primary has db");
    let ok = wait_until(Duration::from_secs(15), || {
        pos(replica, "db").as_deref() == Some(&want)
    });
    assert!(
        ok,
        "replica stuck at {:?}, primary at {want}",
        pos(replica, "db")
    );
}

/// A primary cut off from etcd demotes itself; a connection it had open before can
/// neither start a new transaction nor leave a trace of one, and SQLite reports the
/// clearest error it has for it: "database is locked" (WAL, at the WAL-index write
/// lock), "attempt to write a readonly database" (DELETE, at the journal's
/// creation), "access permission denied" (TRUNCATE, PERSIST: at the RESERVED lock),
/// never "disk I/O error". What it committed as primary stays readable and intact.
#[test]
fn etcd_demoted_primary_refuses_writes_on_open_connections() {
    use rusqlite::ErrorCode;
    let modes = [
        ("WAL", ErrorCode::DatabaseBusy),
        ("DELETE", ErrorCode::ReadOnly),
        ("TRUNCATE", ErrorCode::PermissionDenied),
        ("PERSIST", ErrorCode::PermissionDenied),
    ];
    let mut etcd = EtcdServer::start();
    let a = node("node-a", &etcd_lease(&etcd));
    wait_primary(&a, Duration::from_secs(10), "a first");
    // Kept open across the demotion below.
    let conns: Vec<Connection> = modes
        .iter()
        .map(|(mode, _)| {
            let c = Connection::open(a.path(&format!("db-{mode}"))).unwrap();
            c.busy_timeout(Duration::from_millis(200)).unwrap();
            let _: String = c
                .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
                .unwrap();
            c.execute_batch("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('primary');")
                .unwrap();
            c
        })
        .collect();
    let before: Vec<String> = modes
        .iter()
        .map(|(m, _)| pos(&a, &format!("db-{m}")).unwrap())
        .collect();
    etcd.stop();
    let ok = wait_until(TTL * 2, || a.log_text().contains("lost the lease"));
    assert!(ok, "{}", a.log_text());
    for (c, (m, want)) in conns.iter().zip(modes) {
        for sql in [
            "INSERT INTO t VALUES ('demoted')",
            "BEGIN IMMEDIATE; UPDATE t SET v = 'demoted'; COMMIT;",
        ] {
            let err = c
                .execute_batch(sql)
                .expect_err("a demoted primary took a write on an open connection");
            assert_eq!(err.sqlite_error_code(), Some(want), "{m}, {sql}: {err}");
            if !c.is_autocommit() {
                c.execute_batch("ROLLBACK").unwrap();
            }
        }
        let (rows, check): (i64, String) = c
            .query_row(
                "SELECT (SELECT count(*) FROM t WHERE v = 'primary'), \
                 (SELECT integrity_check FROM pragma_integrity_check)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((rows, check.as_str()), (1, "ok"), "{m}");
    }
    drop(conns);
    for ((m, _), want) in modes.iter().zip(before) {
        assert_eq!(pos(&a, &format!("db-{m}")).unwrap(), want, "{m} moved");
    }
}

/// `litefs run` with `args`; waits (bounded) for its exit status.
pub(crate) fn litefs_run(args: &[&str], within: Duration) -> (std::process::ExitStatus, String) {
    litefs_run_with_env(args, &[], within)
}

/// As [`litefs_run`], with extra environment variables.
fn litefs_run_with_env(
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_litefs"))
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("litefs run {args:?} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `litefs run -promote` on a replica: the primary stops writes, the replica gets
/// every committed transaction and the lease, turns writable before the command runs;
/// the old primary follows it. Both nodes report it in `/events` and `/metrics`.
fn promote_hands_over(lease: &str) {
    let a = node("node-a", lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", lease);
    for i in 0..20 {
        assert!(try_write(&a, &format!("a {i}")));
    }
    converge(&a, &b);
    let mut ea = Events::open(&a);
    ea.until(Duration::from_secs(5), |e| e["type"] == "init");
    let mut eb = Events::open(&b);
    eb.until(Duration::from_secs(5), |e| e["type"] == "init");

    let url = format!("http://127.0.0.1:{}", port(&b));
    let db = b.path("db");
    let sql = "INSERT INTO t (v) VALUES ('by the promoted node')";
    let t0 = Instant::now();
    let (status, err) = litefs_run(
        &[
            "-promote",
            "-url",
            &url,
            "--",
            "sqlite3",
            db.to_str().unwrap(),
            sql,
        ],
        Duration::from_secs(30),
    );
    let took = t0.elapsed();
    assert!(
        status.success(),
        "litefs run -promote: {status}\n{err}\nb:\n{}\na:\n{}",
        b.log_text(),
        a.log_text()
    );
    eprintln!("litefs run -promote took {took:?}");
    assert_eq!(count(&b, "by the promoted node"), 1);
    assert!(
        !try_write(&a, "old primary"),
        "the old primary still writes"
    );
    converge(&b, &a);
    assert_eq!(count(&a, "by the promoted node"), 1);
    let c = Connection::open(b.path("db")).unwrap();
    let rows: i64 = c
        .query_row("SELECT count(*) FROM t WHERE v GLOB 'a [0-9]*'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(rows, 20, "rows written before the handoff");

    eb.until(Duration::from_secs(5), |e| {
        e["type"] == "primaryChange" && e["data"]["isPrimary"] == true
    });
    ea.until(Duration::from_secs(5), |e| {
        e["type"] == "primaryChange" && e["data"]["hostname"] == "node-b"
    });
    assert_eq!(metric(&a, "litefs_lease_handoffs_total"), 1);
    assert_eq!(metric(&b, "litefs_lease_handoffs_total"), 1);
    assert_eq!(info(&a)["primary_hostname"], "node-b");
    assert_eq!(info(&b)["is_primary"], true);
}

/// With `http.auth-token` set on every node, `litefs run -promote` needs the token,
/// and the replica's handoff request to the primary carries it.
#[test]
fn etcd_promotion_with_an_auth_token() {
    let etcd = EtcdServer::start();
    let with_token = |name: &str| {
        let port = free_port();
        let (name, lease) = (name.to_string(), etcd_lease(&etcd));
        Process::start_with(move |mnt, data| {
            format!(
                "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  hostname: {name}\n  advertise-url: http://127.0.0.1:{port}\n{lease}http:\n  addr: 127.0.0.1:{port}\n  auth-token: s3cret\n",
                mnt.display(),
                data.display()
            )
        })
    };
    let a = with_token("node-a");
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = with_token("node-b");
    assert!(try_write(&a, "before"));
    converge(&a, &b);
    let url = format!("http://127.0.0.1:{}", port(&b));
    let (status, err) = litefs_run(
        &["-promote", "-url", &url, "--", "true"],
        Duration::from_secs(30),
    );
    assert!(!status.success(), "promotion without the token: {err}");
    assert!(err.contains("401"), "{err}");
    let (status, err) = litefs_run_with_env(
        &["-promote", "-url", &url, "--", "true"],
        &[("LITEFS_AUTH_TOKEN", "s3cret")],
        Duration::from_secs(30),
    );
    assert!(
        status.success(),
        "promotion with the token: {err}\nb:\n{}\na:\n{}",
        b.log_text(),
        a.log_text()
    );
    assert!(try_write(&b, "after"), "the promoted node takes writes");
    assert!(!try_write(&a, "old"), "the old primary still writes");
}

#[test]
fn etcd_promote_hands_over_with_events_and_metrics() {
    let etcd = EtcdServer::start();
    promote_hands_over(&etcd_lease(&etcd));
}

#[test]
fn consul_promote_hands_over_with_events_and_metrics() {
    let consul = consul();
    promote_hands_over(&consul_lease(&consul));
}

#[test]
fn consul_agent_promote_hands_over_with_events_and_metrics() {
    if let Some(agent) = consul_agent("consul_agent_promote_hands_over_with_events_and_metrics") {
        promote_hands_over(&consul_lease_at(&agent.url()));
    }
}

/// `POST /promote` while nobody holds the lease answers at once instead of queueing
/// until a timeout: during the crashed primary's lock-delay (the key is free, but no
/// one may take it yet) a non-candidate says it cannot lead and a candidate says why
/// it cannot take the lease; the candidate leads once the lock-delay is over.
fn promote_without_a_primary(lease: &str, expiry: Duration) {
    let lease = lease.replace("lock-delay: 1s", "lock-delay: 4s");
    let mut a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let b = node("node-b", &lease);
    let c = node_with("node-c", &lease, false);
    assert!(try_write(&a, "a"));
    converge(&a, &b);
    converge(&a, &c);
    a.signal(libc::SIGKILL);
    let freed = |p: &Process| p.log_text().contains("the lease holder changed");
    let ok = wait_until(expiry + Duration::from_secs(3), || freed(&b) && freed(&c));
    assert!(ok, "b:\n{}\nc:\n{}", b.log_text(), c.log_text());
    for (p, want) in [
        (&c, "not a candidate"),
        (&b, "no primary is currently available"),
    ] {
        let t0 = Instant::now();
        let (status, body) = http(port(p), "POST", "/promote");
        let took = t0.elapsed();
        assert_eq!(status, 409, "{body}");
        assert!(body.contains(want), "{body}");
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
    }
    wait_primary(&b, Duration::from_secs(6), "b after the lock-delay");
    let (status, body) = http(port(&b), "POST", "/promote");
    assert_eq!((status, body.trim()), (200, "already the primary"));
}

#[test]
fn consul_promote_without_a_primary_answers_at_once() {
    let consul = consul();
    promote_without_a_primary(&consul_lease(&consul), TTL);
}

#[test]
fn consul_agent_promote_without_a_primary_answers_at_once() {
    if let Some(agent) = consul_agent("consul_agent_promote_without_a_primary_answers_at_once") {
        promote_without_a_primary(&consul_lease_at(&agent.url()), 2 * TTL);
    }
}

/// `litefs run -- CMD` exits with the command's status, and SIGTERM sent to litefs
/// reaches the command (which here exits 7 on it).
#[test]
fn litefs_run_forwards_sigterm_and_exits_with_the_commands_status() {
    let (status, _) = litefs_run(&["--", "sh", "-c", "exit 3"], Duration::from_secs(10));
    assert_eq!(status.code(), Some(3));

    let tmp = tempfile::tempdir().unwrap();
    let ready = tmp.path().join("ready");
    let script = format!(
        "trap 'exit 7' TERM; touch {}; while :; do sleep 0.05; done",
        ready.display()
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["run", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let ok = wait_until(Duration::from_secs(10), || ready.exists());
    if !ok {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the command never started");
    }
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("litefs run did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(7), "the command's status on SIGTERM");

    let (status, err) = litefs_run(
        &["-promote", "-url", "http://127.0.0.1:1", "--", "true"],
        Duration::from_secs(10),
    );
    assert!(!status.success(), "promotion against nothing must fail");
    assert!(err.contains("promote"), "{err}");
}

/// The first primary stores the cluster id in the lease store; a node whose data
/// directory belongs to another cluster neither follows nor leads, and says why.
#[test]
fn etcd_node_of_another_cluster_refuses_to_lead_or_follow() {
    let etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    let mut a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let mut c = node("node-c", &lease);
    converge(&a, &c);
    let id = |p: &Process| std::fs::read_to_string(p.data.join("clusterid")).unwrap();
    assert_eq!(id(&a), id(&c), "the replica joined the primary's cluster");
    assert!(c.signal(libc::SIGTERM).success());
    std::fs::write(c.data.join("clusterid"), "LFSC0000000000000001\n").unwrap();
    c.spawn();
    let ok = wait_until(Duration::from_secs(5), || {
        c.log_text()
            .contains("belongs to cluster LFSC0000000000000001")
    });
    assert!(ok, "no refusal logged:\n{}", c.log_text());
    let before = pos(&c, "db");
    assert!(try_write(&a, "after the refusal"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pos(&c, "db"), before, "a refused node replicated");
    assert!(a.signal(libc::SIGTERM).success());
    std::thread::sleep(TTL);
    assert!(
        !try_write(&c, "refused node"),
        "a node of another cluster took the lease"
    );
    assert!(
        c.log_text().contains("refusing to lead or follow"),
        "{}",
        c.log_text()
    );
}

/// Polls (every 2 ms) until `p` accepts a write; how long that took.
fn time_to_write(p: &Process, within: Duration) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if try_write(p, "bench") {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!(
        "no write accepted within {within:?}; log:\n{}",
        p.log_text()
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Failover measurement (etcd, two nodes, TTL 2 s, 10 rounds): time from SIGTERM of
/// the primary until the other node accepts a write; `litefs run -promote -- true` on
/// a replica; time from kill -9 of the primary until the other accepts a write.
/// Run with `cargo test --release --test it elect::etcd_failover_bench -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn etcd_failover_bench() {
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("loadavg before: {}", load().trim());
    let etcd = EtcdServer::start();
    let lease = etcd_lease(&etcd);
    let a = node("node-a", &lease);
    wait_primary(&a, Duration::from_secs(20), "a first");
    let mut n = [a, node("node-b", &lease)];
    same_pos_when_ready(&n);
    let (mut clean, mut promote, mut crash) = (Vec::new(), Vec::new(), Vec::new());
    let mut p = 0;
    for _ in 0..10 {
        let o = 1 - p;
        // Clean handoff.
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(n[p].pid() as i32, libc::SIGTERM) };
        clean.push(time_to_write(&n[o], Duration::from_secs(5)));
        assert!(n[p].signal(0).success());
        n[p].spawn();
        converge(&n[o], &n[p]);
        // Promotion of the old primary back.
        let url = format!("http://127.0.0.1:{}", port(&n[p]));
        let t0 = Instant::now();
        let (status, err) = litefs_run(
            &["-promote", "-url", &url, "--", "true"],
            Duration::from_secs(30),
        );
        promote.push(t0.elapsed());
        assert!(status.success(), "{err}");
        converge(&n[p], &n[o]);
        // Crash of the primary (now n[p] again).
        n[p].signal(libc::SIGKILL);
        crash.push(time_to_write(&n[o], Duration::from_secs(10)));
        respawn_after_crash(&mut n[p]);
        converge(&n[o], &n[p]);
        p = o;
    }
    eprintln!(
        "clean SIGTERM takeover: median {:?} (all {clean:?})",
        median(clean.clone())
    );
    eprintln!(
        "litefs run -promote: median {:?} (all {promote:?})",
        median(promote.clone())
    );
    eprintln!(
        "crash takeover: median {:?} (all {crash:?})",
        median(crash.clone())
    );
    eprintln!("loadavg after: {}", load().trim());
}

fn same_pos_when_ready(n: &[Process; 2]) {
    assert!(try_write(&n[0], "seed"));
    converge(&n[0], &n[1]);
}
