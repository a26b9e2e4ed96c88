//! The HTTP proxy with real nodes (static lease) and a tiny HTTP application in the test
//! as the target of each node's proxy. The primary listens on 127.0.0.2 and the replica
//! on 127.0.0.1 with the same proxy port, as nodes on different machines would: a
//! replica forwards writes to the host of the primary's advertise URL and its own
//! proxy port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::repl::{free_port, wait_converged};
use crate::support::{Process, wait_until};

const PRIMARY_IP: &str = "127.0.0.2";
const REPLICA_IP: &str = "127.0.0.1";
const DB: &str = "app.db";

/// The application: `POST /write` inserts its body as a row of `app.db` in its node's
/// mount, `GET /read` answers the number of rows, anything else answers `pong`.
/// Keep-alive; counts only requests it received completely.
struct App {
    port: u16,
    completed: Arc<AtomicUsize>,
    db: Arc<OnceLock<PathBuf>>,
}

impl App {
    fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let completed = Arc::new(AtomicUsize::new(0));
        let db: Arc<OnceLock<PathBuf>> = Arc::new(OnceLock::new());
        let (count, path) = (completed.clone(), db.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (path, count) = (path.clone(), count.clone());
                std::thread::spawn(move || app_connection(conn, &path, &count));
            }
        });
        App {
            port,
            completed,
            db,
        }
    }
}

fn app_connection(conn: TcpStream, db: &OnceLock<PathBuf>, completed: &AtomicUsize) {
    let _ = conn.set_nodelay(true);
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        completed.fetch_add(1, Ordering::SeqCst);
        let answer = match (method.as_str(), path.as_str(), db.get()) {
            ("POST", "/write", Some(db)) => {
                let c = Connection::open(db).unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                c.execute_batch("CREATE TABLE IF NOT EXISTS t (v TEXT)")
                    .unwrap();
                c.execute(
                    "INSERT INTO t VALUES (?1)",
                    [String::from_utf8_lossy(&body)],
                )
                .unwrap();
                "ok".to_string()
            }
            ("GET", "/read", Some(db)) => rows(db).to_string(),
            ("GET", "/slow", _) => {
                std::thread::sleep(Duration::from_secs(3));
                "slow".to_string()
            }
            _ => "pong".to_string(),
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{answer}",
            answer.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn rows(db: &Path) -> i64 {
    let Ok(c) = Connection::open(db) else {
        return -1;
    };
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap_or(-1)
}

/// A node and the application behind its proxy.
struct AppNode {
    p: Process,
    app: App,
}

/// A node on `ip` (primary when `candidate`; the primary's HTTP port is
/// `primary_http`) with its proxy on `ip:proxy_port` in front of a new [`App`].
fn app_node(ip: &str, candidate: bool, primary_http: u16, proxy_port: u16, extra: &str) -> AppNode {
    let http_port = if candidate { primary_http } else { free_port() };
    let app = App::start();
    let app_port = app.port;
    let p = Process::start_with(|mnt, data| {
        format!(
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: {candidate}\n  hostname: primary-host\n  advertise-url: http://{PRIMARY_IP}:{primary_http}\nhttp:\n  addr: {ip}:{http_port}\nproxy:\n  addr: {ip}:{proxy_port}\n  target: 127.0.0.1:{app_port}\n  db: {DB}\n{extra}",
            mnt.display(),
            data.display(),
        )
    });
    let _ = app.db.set(p.path(DB));
    AppNode { p, app }
}

/// An HTTP answer.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The TXID the `__txid` cookie was set to.
    fn txid_cookie(&self) -> Option<u64> {
        let v = self.header("set-cookie")?;
        let v = v.strip_prefix("__txid=")?;
        u64::from_str_radix(v.split(';').next()?, 16).ok()
    }
}

/// Reads one response (Content-Length framed) from `r`.
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0usize);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a new connection.
fn request(ip: &str, port: u16, method: &str, path: &str, headers: &str, body: &str) -> Resp {
    let s = TcpStream::connect((ip, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    write!(
        w,
        "{method} {path} HTTP/1.1\r\nHost: app\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    read_response(&mut BufReader::new(s)).unwrap()
}

fn cookie(txid: u64) -> String {
    format!("Cookie: a=b; __txid={txid:016x}\r\n")
}

fn txid_of(p: &Process) -> u64 {
    let pos = std::fs::read_to_string(p.path(&format!("{DB}-pos"))).unwrap();
    u64::from_str_radix(&pos[..16], 16).unwrap()
}

/// A primary and a replica, each with its app and proxy (same proxy port).
fn cluster(extra: &str) -> (AppNode, AppNode, u16) {
    let http = free_port();
    let proxy = free_port();
    let p = app_node(PRIMARY_IP, true, http, proxy, extra);
    let r = app_node(REPLICA_IP, false, http, proxy, extra);
    (p, r, proxy)
}

#[test]
fn writes_on_a_replica_are_forwarded_and_read_back_there() {
    let (p, r, proxy) = cluster("");
    let w = request(REPLICA_IP, proxy, "POST", "/write", "", "hello");
    assert_eq!(w.status, 200, "{w:?}\nreplica log:\n{}", r.p.log_text());
    assert_eq!(w.body, "ok");
    assert_eq!(
        p.app.completed.load(Ordering::SeqCst),
        1,
        "the primary's app ran it"
    );
    assert_eq!(
        r.app.completed.load(Ordering::SeqCst),
        0,
        "not the replica's app"
    );
    let txid = w
        .txid_cookie()
        .expect("Set-Cookie __txid on the forwarded write");
    assert_eq!(txid, txid_of(&p.p));

    // Read-your-writes on the replica with the cookie the write returned.
    let read = request(REPLICA_IP, proxy, "GET", "/read", &cookie(txid), "");
    assert_eq!((read.status, read.body.as_str()), (200, "1"), "{read:?}");
    assert!(txid_of(&r.p) >= txid);

    // A write on the primary's proxy gets the new TXID; reads there pass straight.
    let w2 = request(PRIMARY_IP, proxy, "POST", "/write", "", "again");
    assert_eq!(w2.status, 200);
    assert_eq!(w2.txid_cookie(), Some(txid_of(&p.p)));
    assert!(w2.txid_cookie() > Some(txid));
    let read = request(PRIMARY_IP, proxy, "GET", "/read", "", "");
    assert_eq!(read.body, "2");

    // A forwarded request that reaches a replica is refused, never forwarded again.
    let looped = request(
        REPLICA_IP,
        proxy,
        "POST",
        "/write",
        "litefs-forwarded: 1\r\n",
        "loop",
    );
    assert_eq!(looped.status, 503, "{looped:?}");
    assert_eq!(
        p.app.completed.load(Ordering::SeqCst),
        3,
        "two writes and a read"
    );
    assert_eq!(r.app.completed.load(Ordering::SeqCst), 1, "the read");
}

#[test]
fn a_read_waits_for_its_txid_and_gives_up_with_504() {
    let (p, r, proxy) = cluster("");
    let w = request(PRIMARY_IP, proxy, "POST", "/write", "", "one");
    assert_eq!(w.status, 200);
    wait_converged(&p.p, &[&r.p], DB);
    let txid = txid_of(&r.p);

    // The next TXID arrives one second later: the read waits for it.
    let db = p.p.path(DB);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        let c = Connection::open(db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c.execute("INSERT INTO t VALUES ('two')", []).unwrap();
    });
    let t = Instant::now();
    let read = request(REPLICA_IP, proxy, "GET", "/read", &cookie(txid + 1), "");
    let waited = t.elapsed();
    writer.join().unwrap();
    assert_eq!((read.status, read.body.as_str()), (200, "2"), "{read:?}");
    assert!(
        waited >= Duration::from_millis(900),
        "answered after {waited:?}"
    );

    // Without the cookie a read does not wait.
    let t = Instant::now();
    let read = request(REPLICA_IP, proxy, "GET", "/read", "", "");
    assert_eq!(read.status, 200);
    assert!(t.elapsed() < Duration::from_secs(1));

    // A TXID that never comes: 504 after 5 s.
    let t = Instant::now();
    let read = request(REPLICA_IP, proxy, "GET", "/read", &cookie(txid + 100), "");
    let waited = t.elapsed();
    assert_eq!(read.status, 504, "{read:?}");
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(10),
        "gave up after {waited:?}"
    );
    assert_eq!(
        r.app.completed.load(Ordering::SeqCst),
        2,
        "the 504 never reached the app"
    );
}

#[test]
fn health_is_503_once_the_replica_lags_beyond_max_lag() {
    let extra = "  max-lag: 2s\n";
    let (p, r, proxy) = cluster(extra);
    let health = |ip| request(ip, proxy, "GET", "/litefs/health", "", "").status;
    assert_eq!(health(PRIMARY_IP), 200);
    assert!(
        wait_until(Duration::from_secs(10), || health(REPLICA_IP) == 200),
        "replica never healthy; log:\n{}",
        r.p.log_text()
    );
    // The primary goes away: heartbeats stop, and after max-lag the replica is unhealthy.
    drop(p);
    let t = Instant::now();
    assert!(wait_until(Duration::from_secs(15), || health(REPLICA_IP) == 503));
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "503 after {:?}",
        t.elapsed()
    );

    // A replica whose primary does not answer is unhealthy from the start.
    let port = free_port();
    let lonely = app_node(REPLICA_IP, false, free_port(), port, extra);
    let st = request(REPLICA_IP, port, "GET", "/litefs/health", "", "");
    assert_eq!(st.status, 503, "{st:?}");
    assert!(st.body.contains("never heard"), "{st:?}");
    drop(lonely);
}

/// A connection to the proxy on `PRIMARY_IP`:`proxy`: its writing half, and a reader
/// whose reads time out after 10 s.
fn connect(proxy: u16) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect((PRIMARY_IP, proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (s.try_clone().unwrap(), BufReader::new(s))
}

/// Seconds until the server closes `s` (reads return 0 or fail), at most 10.
fn time_to_close(s: &mut BufReader<TcpStream>) -> Duration {
    s.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf);
    t.elapsed()
}

#[test]
fn read_header_and_idle_timeouts_close_stalled_connections() {
    let http = free_port();
    let proxy = free_port();
    let p = app_node(
        PRIMARY_IP,
        true,
        http,
        proxy,
        "  read-header-timeout: 500ms\n  idle-timeout: 2s\n",
    );
    // Half a header, then nothing.
    let mut s = TcpStream::connect((PRIMARY_IP, proxy)).unwrap();
    s.write_all(b"GET /read HTTP/1.1\r\nHost: a").unwrap();
    let closed = time_to_close(&mut BufReader::new(s));
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_millis(1800),
        "half a header closed after {closed:?}"
    );

    // A finished request, then silence: the idle limit (not the header one) applies.
    let (mut w, mut r) = connect(proxy);
    for _ in 0..2 {
        w.write_all(b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut r).unwrap();
        assert_eq!((resp.status, resp.body.as_str()), (200, "pong"));
    }
    let closed = time_to_close(&mut r);
    assert!(
        closed >= Duration::from_millis(1500) && closed < Duration::from_secs(4),
        "idle connection closed after {closed:?}"
    );
    assert_eq!(p.app.completed.load(Ordering::SeqCst), 2);
}

#[test]
fn read_timeout_abandons_a_request_whose_body_stalls() {
    let http = free_port();
    let proxy = free_port();
    let p = app_node(PRIMARY_IP, true, http, proxy, "  read-timeout: 1s\n");
    let (mut w, mut r) = connect(proxy);
    let t = Instant::now();
    w.write_all(b"POST /write HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b")
        .unwrap();
    // Either a 408 or a closed connection, within about the limit.
    if let Ok(resp) = read_response(&mut r) {
        assert_eq!(resp.status, 408, "{resp:?}");
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    assert!(
        time_to_close(&mut r) < Duration::from_secs(5),
        "the connection stays open"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        p.app.completed.load(Ordering::SeqCst),
        0,
        "the app got a request"
    );
    assert!(
        !p.p.path(DB).exists(),
        "the stalled write reached the database"
    );
}

#[test]
fn write_timeout_drops_a_response_that_is_too_slow() {
    let http = free_port();
    let proxy = free_port();
    let _p = app_node(PRIMARY_IP, true, http, proxy, "  write-timeout: 1s\n");
    let (mut w, mut r) = connect(proxy);
    // A quick answer is unaffected.
    w.write_all(b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r).unwrap().body, "pong");
    // The app takes 3 s: the connection is dropped after about 1 s, with no answer.
    let t = Instant::now();
    w.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r);
    let took = t.elapsed();
    assert!(got.is_err(), "{got:?}");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "dropped after {took:?}"
    );
}

/// `n` sequential requests on one kept-alive connection; latencies sorted.
fn timed(ip: &str, port: u16, method: &str, n: usize) -> Vec<Duration> {
    let s = TcpStream::connect((ip, port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let req = format!("{method} /ping HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(req.as_bytes()).unwrap();
        let resp = read_response(&mut r).unwrap();
        assert_eq!(resp.status, 200);
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn report(what: &str, d: &[Duration]) {
    let mean = d.iter().sum::<Duration>() / d.len() as u32;
    eprintln!(
        "{what:<44} mean {:>6} us  p50 {:>6} us  p99 {:>6} us",
        mean.as_micros(),
        d[d.len() / 2].as_micros(),
        d[d.len() * 99 / 100].as_micros()
    );
}

/// Added latency per proxy hop (ignored; run with
/// `cargo test --release --test it proxy::proxy_bench -- --ignored --nocapture`).
#[test]
#[ignore]
fn proxy_bench() {
    let (p, _r, proxy) = cluster("");
    let n = 2000;
    // Warm up every path (connection pools).
    for (ip, port) in [
        ("127.0.0.1", p.app.port),
        (PRIMARY_IP, proxy),
        (REPLICA_IP, proxy),
    ] {
        timed(ip, port, "POST", 50);
    }
    report(
        "GET  app directly",
        &timed("127.0.0.1", p.app.port, "GET", n),
    );
    report(
        "GET  through the primary's proxy",
        &timed(PRIMARY_IP, proxy, "GET", n),
    );
    report(
        "POST app directly",
        &timed("127.0.0.1", p.app.port, "POST", n),
    );
    report(
        "POST through the primary's proxy (cookie)",
        &timed(PRIMARY_IP, proxy, "POST", n),
    );
    report(
        "POST replica's proxy -> primary's proxy",
        &timed(REPLICA_IP, proxy, "POST", n),
    );
}
