//! Clusters of real `litefs mount` processes (lease TTL 2 s) through failovers: three
//! nodes across a SIGTERM handoff, a crash and a rejoin; twenty forced failovers under a
//! write load on every node; a primary cut off from the lease store by a TCP proxy
//! while the others still reach it. Every wait is bounded. The Consul cases run against
//! the in-repo server, and (`consul_agent_*`) against a real `consul agent -dev` when
//! `consul` is on PATH.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::consul_server::ConsulServer;
use crate::elect::{
    TTL, consul, consul_agent, consul_lease, consul_lease_at, converge, etcd_lease, metric, node,
    respawn_after_crash, try_write, wait_primary,
};
use crate::etcd_server::EtcdServer;
use crate::repl::pos;
use crate::support::{Process, wait_until};

fn etcd_lease_at(url: &str) -> String {
    format!("  type: etcd\n  etcd:\n    endpoints: [{url}]\n    key: litefs-test\n    ttl: 2s\n")
}

/// Which of `nodes` accepts a write now (at most one may), within `within`.
fn primary_of(nodes: &[&Process], within: Duration) -> usize {
    let mut found = None;
    let ok = wait_until(within, || {
        found = nodes.iter().position(|p| try_write(p, "probe"));
        found.is_some()
    });
    assert!(ok, "no primary within {within:?}");
    let i = found.unwrap_or(0);
    for (j, p) in nodes.iter().enumerate() {
        if j != i {
            assert!(
                !try_write(p, "second writer?"),
                "nodes {i} and {j} both take writes"
            );
        }
    }
    i
}

/// Three nodes: SIGTERM of the primary hands over to one of the others within 1 s
/// and the third follows it; kill -9 of that one lets the last take over after the
/// TTL (and Consul's lock-delay); both old primaries rejoin as replicas with
/// byte-identical databases.
fn three_nodes(lease: &str, crash_bound: Duration) {
    let a = node("node-a", lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let mut n = [a, node("node-b", lease), node("node-c", lease)];
    for i in 0..10 {
        assert!(try_write(&n[0], &format!("a {i}")));
    }
    converge(&n[0], &n[1]);
    converge(&n[0], &n[2]);

    let t0 = Instant::now();
    let status = n[0].signal(libc::SIGTERM);
    assert!(status.success(), "{}", n[0].log_text());
    let p = 1 + primary_of(&[&n[1], &n[2]], Duration::from_secs(5));
    let took = t0.elapsed();
    eprintln!("SIGTERM handoff to node {p} in {took:?}");
    assert!(took < Duration::from_secs(1), "handoff took {took:?}");
    let other = 3 - p;
    for i in 0..10 {
        assert!(try_write(&n[p], &format!("second {i}")));
    }
    converge(&n[p], &n[other]);

    n[0].spawn();
    converge(&n[p], &n[0]);
    let t1 = Instant::now();
    n[p].signal(libc::SIGKILL);
    let q = primary_of(&[&n[0], &n[other]], crash_bound);
    let took = t1.elapsed();
    let q = if q == 0 { 0 } else { other };
    eprintln!("crash takeover by node {q} in {took:?}");
    assert!(
        took >= TTL / 2,
        "took over before the lease could expire: {took:?}"
    );
    for i in 0..10 {
        assert!(try_write(&n[q], &format!("third {i}")));
    }
    respawn_after_crash(&mut n[p]);
    for (i, node) in n.iter().enumerate() {
        if i != q {
            converge(&n[q], node);
            assert!(!try_write(node, "rejoined"), "node {i} writes as a replica");
        }
    }
}

#[test]
fn etcd_three_nodes_sigint_handoff_crash_and_rejoin() {
    let etcd = EtcdServer::start();
    three_nodes(&etcd_lease(&etcd), TTL + Duration::from_secs(3));
}

#[test]
fn consul_three_nodes_sigint_handoff_crash_and_rejoin() {
    let consul = consul();
    three_nodes(&consul_lease(&consul), TTL + Duration::from_secs(5));
}

/// Real Consul expires a crashed holder's session up to 2x TTL late, then lock-delay.
const AGENT_CRASH_BOUND: Duration = Duration::from_secs(2 * 2 + 4);

#[test]
fn consul_agent_three_nodes_sigint_handoff_crash_and_rejoin() {
    if let Some(agent) = consul_agent("consul_agent_three_nodes_sigint_handoff_crash_and_rejoin") {
        three_nodes(&consul_lease_at(&agent.url()), AGENT_CRASH_BOUND);
    }
}

/// One acknowledged commit: which node, which value, when the client got the answer.
#[derive(Debug, Clone, Copy)]
struct Commit {
    node: usize,
    v: u64,
    at: Duration,
}

/// A writer per node, each inserting unique values through its node's mount as fast
/// as it is allowed to; acknowledged commits are recorded.
struct Load {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
    acked: Arc<Mutex<Vec<Commit>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(mounts: Vec<PathBuf>, t0: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(1));
        let threads = mounts
            .into_iter()
            .enumerate()
            .map(|(node, mnt)| {
                let (stop, paused, busy, acked, next) = (
                    stop.clone(),
                    paused.clone(),
                    busy.clone(),
                    acked.clone(),
                    next.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        busy.fetch_add(1, Ordering::SeqCst);
                        if paused.load(Ordering::SeqCst) {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        let v = next.fetch_add(1, Ordering::SeqCst);
                        let ok = Connection::open(mnt.join("db")).is_ok_and(|c| {
                            let _ = c.busy_timeout(Duration::from_millis(100));
                            c.execute("INSERT INTO w (v) VALUES (?1)", [v as i64])
                                .is_ok()
                        });
                        if ok {
                            let at = t0.elapsed();
                            acked.lock().unwrap().push(Commit { node, v, at });
                        }
                        busy.fetch_sub(1, Ordering::SeqCst);
                        if !ok {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            paused,
            busy,
            acked,
            threads,
        }
    }

    /// Stops new writes and waits for the ones in flight.
    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        assert!(
            wait_until(Duration::from_secs(10), || self.busy.load(Ordering::SeqCst)
                == 0),
            "a write did not finish"
        );
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    fn finish(mut self) -> Vec<Commit> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let mut acked = self.acked.lock().unwrap().clone();
        acked.sort_by_key(|c| c.at);
        acked
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Runs of consecutive acknowledged commits by one node, in acknowledgement order.
fn writer_runs(acked: &[Commit]) -> Vec<(usize, Duration, Duration, usize)> {
    let mut runs: Vec<(usize, Duration, Duration, usize)> = Vec::new();
    for c in acked {
        match runs.last_mut() {
            Some(r) if r.0 == c.node => {
                r.2 = c.at;
                r.3 += 1;
            }
            _ => runs.push((c.node, c.at, c.at, 1)),
        }
    }
    runs
}

/// Every acknowledged value is in `p`'s database.
fn assert_has_all(p: &Process, acked: &[Commit], what: &str) {
    let c = Connection::open(p.path("db")).unwrap();
    c.busy_timeout(Duration::from_secs(2)).unwrap();
    let mut st = c.prepare("SELECT v FROM w").unwrap();
    let have: std::collections::HashSet<i64> = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let missing: Vec<&Commit> = acked
        .iter()
        .filter(|c| !have.contains(&(c.v as i64)))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} acknowledged rows missing, e.g. {:?}\nnode {} log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        p.mnt.display(),
        p.log_text()
    );
}

fn wait_same_pos(a: &Process, b: &Process) {
    let ok = wait_until(Duration::from_secs(15), || {
        let pa = pos(a, "db");
        pa.is_some() && pa == pos(b, "db")
    });
    assert!(
        ok,
        "positions differ: {:?} vs {:?}",
        pos(a, "db"),
        pos(b, "db")
    );
}

/// Two nodes, a writer on each, 20 forced failovers alternating SIGTERM (writes go
/// on throughout) and kill -9 (writes paused and replicated first, as a crash loses
/// what no replica received). At the end both nodes hold every acknowledged row, and
/// acknowledged commits come from one node at a time: the writer changes at most once
/// per failover.
fn twenty_failovers(lease: &str, crash_bound: Duration) {
    const FAILOVERS: usize = 20;
    let a = node("node-a", lease);
    wait_primary(&a, Duration::from_secs(10), "a first");
    let mut n = [a, node("node-b", lease)];
    Connection::open(n[0].path("db"))
        .unwrap()
        .execute_batch("CREATE TABLE w (v INTEGER PRIMARY KEY)")
        .unwrap();
    converge(&n[0], &n[1]);
    let t0 = Instant::now();
    let load = Load::start(vec![n[0].mnt.clone(), n[1].mnt.clone()], t0);
    let mut primary = 0;
    let mut takeovers = Vec::new();
    let mut rounds = Vec::new();
    for round in 0..FAILOVERS {
        std::thread::sleep(Duration::from_millis(300));
        let other = 1 - primary;
        let t = Instant::now();
        rounds.push((round, primary, t0.elapsed()));
        if round % 2 == 0 {
            let status = n[primary].signal(libc::SIGTERM);
            assert!(status.success(), "round {round}: {}", n[primary].log_text());
            wait_primary(&n[other], Duration::from_secs(5), "after SIGTERM");
            takeovers.push(("sigterm", t.elapsed()));
            n[primary].spawn();
        } else {
            load.pause();
            wait_same_pos(&n[primary], &n[other]);
            n[primary].signal(libc::SIGKILL);
            load.resume();
            wait_primary(&n[other], crash_bound, "after kill -9");
            takeovers.push(("kill", t.elapsed()));
            respawn_after_crash(&mut n[primary]);
        }
        // A failover keeps what a replica received: the restarted node must stream
        // from the new primary before the next round (a SIGTERM with no replica
        // connected hands over only what the next holder already had).
        let ok = wait_until(Duration::from_secs(10), || {
            metric(&n[other], "litefs_stream_count") >= 1
        });
        assert!(
            ok,
            "round {round}: the restarted node never connected its stream"
        );
        primary = other;
    }
    std::thread::sleep(Duration::from_millis(300));
    let acked = load.finish();
    eprintln!("takeovers: {takeovers:?}");
    eprintln!("rounds began at: {rounds:?}");
    wait_same_pos(&n[primary], &n[1 - primary]);
    assert!(
        acked.len() > 100,
        "only {} commits acknowledged",
        acked.len()
    );
    assert_has_all(&n[primary], &acked, "last primary");
    assert_has_all(&n[1 - primary], &acked, "replica");
    let runs = writer_runs(&acked);
    assert!(
        runs.len() <= FAILOVERS + 2,
        "{} changes of writer for {FAILOVERS} failovers (two writers at once?): {runs:?}",
        runs.len() - 1
    );
    eprintln!("{} commits in {} runs", acked.len(), runs.len());
}

#[test]
fn etcd_twenty_forced_failovers_under_writes() {
    let etcd = EtcdServer::start();
    twenty_failovers(&etcd_lease(&etcd), TTL + Duration::from_secs(3));
}

#[test]
fn consul_twenty_forced_failovers_under_writes() {
    let consul = consul();
    twenty_failovers(&consul_lease(&consul), TTL + Duration::from_secs(5));
}

#[test]
fn consul_agent_twenty_forced_failovers_under_writes() {
    if let Some(agent) = consul_agent("consul_agent_twenty_forced_failovers_under_writes") {
        twenty_failovers(&consul_lease_at(&agent.url()), AGENT_CRASH_BOUND);
    }
}

/// A TCP proxy to the lease store for one node, which can cut that node off (close
/// its connections, refuse new ones) while the others still reach the store.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let (c, s, cs) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the node is cut off
                }
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(1)) else {
                    continue;
                };
                let mut list = cs.lock().unwrap();
                for sock in [&down, &up] {
                    if let Ok(clone) = sock.try_clone() {
                        list.push(clone);
                    }
                }
                drop(list);
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            port,
            cut,
            stop,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

/// Only the primary loses the lease store (its proxy cuts it off): it demotes itself
/// before its lease can expire, the other node takes over after the TTL, and the
/// acknowledged commits of the two never interleave; after the cut heals, the old
/// primary follows and converges.
fn partitioned_primary(upstream: std::net::SocketAddr, lease_at: fn(&str) -> String) {
    let proxies = [Proxy::start(upstream), Proxy::start(upstream)];
    let a = node("node-a", &lease_at(&proxies[0].url()));
    wait_primary(&a, Duration::from_secs(10), "a first");
    let n = [a, node("node-b", &lease_at(&proxies[1].url()))];
    Connection::open(n[0].path("db"))
        .unwrap()
        .execute_batch("CREATE TABLE w (v INTEGER PRIMARY KEY)")
        .unwrap();
    converge(&n[0], &n[1]);
    let t0 = Instant::now();
    let load = Load::start(vec![n[0].mnt.clone(), n[1].mnt.clone()], t0);
    std::thread::sleep(Duration::from_millis(500));
    let cut_at = t0.elapsed();
    proxies[0].cut();
    let ok = wait_until(TTL * 4, || {
        load.acked.lock().unwrap().iter().any(|c| c.node == 1)
    });
    assert!(ok, "node b never took writes; b:\n{}", n[1].log_text());
    std::thread::sleep(Duration::from_millis(500));
    proxies[0].heal();
    std::thread::sleep(Duration::from_millis(500));
    let acked = load.finish();
    let last_a = acked.iter().filter(|c| c.node == 0).map(|c| c.at).max();
    let first_b = acked.iter().filter(|c| c.node == 1).map(|c| c.at).min();
    eprintln!("cut at {cut_at:?}; last write on a {last_a:?}; first on b {first_b:?}");
    let (Some(last_a), Some(first_b)) = (last_a, first_b) else {
        panic!("both nodes must have written");
    };
    assert!(
        last_a < first_b,
        "a wrote at {last_a:?} after b's first write at {first_b:?}"
    );
    assert!(
        last_a < cut_at + TTL,
        "a kept writing {:?} after the cut (TTL {TTL:?})",
        last_a - cut_at
    );
    assert_eq!(writer_runs(&acked).len(), 2, "writers interleaved");
    assert!(
        n[0].log_text().contains("lost the lease"),
        "{}",
        n[0].log_text()
    );
    wait_same_pos(&n[1], &n[0]);
    assert_has_all(&n[0], &acked, "old primary");
    assert!(
        !try_write(&n[0], "old primary"),
        "two primaries after the heal"
    );
}

#[test]
fn etcd_partitioned_primary_never_overlaps_the_new_one() {
    let etcd = EtcdServer::start();
    let addr = etcd.url().trim_start_matches("http://").parse().unwrap();
    partitioned_primary(addr, etcd_lease_at);
}

#[test]
fn consul_partitioned_primary_never_overlaps_the_new_one() {
    let consul: ConsulServer = consul();
    partitioned_primary(consul.addr(), consul_lease_at);
}

#[test]
fn consul_agent_partitioned_primary_never_overlaps_the_new_one() {
    if let Some(agent) = consul_agent("consul_agent_partitioned_primary_never_overlaps_the_new_one")
    {
        partitioned_primary(agent.addr(), consul_lease_at);
    }
}
