//! A real `consul agent -dev`, for the tests that also run against real Consul when
//! the `consul` binary is on PATH (the in-repo server in `consul_server.rs` stands in
//! for it everywhere else).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long an agent may take to elect itself leader.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `consul agent -dev` on free 127.0.0.1 ports, accepting session TTLs down to 1 s
/// (`session_ttl_min`; Consul's default minimum is 10 s) so that node-level tests can
/// use the same short TTL as against the in-repo server. Real Consul still expires a
/// session up to 2x its TTL late. Dropping it kills the agent.
pub struct ConsulAgent {
    child: Child,
    addr: SocketAddr,
    _tmp: tempfile::TempDir,
}

impl ConsulAgent {
    /// Starts an agent when `consul` is on PATH; `None` (after printing why the test
    /// is skipped, naming `test`) when it is not. Panics when the agent does not start.
    pub fn start_or_skip(test: &str) -> Option<ConsulAgent> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let Some(consul) = find_on_path("consul", &path) else {
            eprintln!(
                "{test}: skipped: no `consul` binary on PATH to run `consul agent -dev` \
                 (the same test runs against the in-repo Consul server)"
            );
            return None;
        };
        match ConsulAgent::start_from(&consul) {
            Ok(agent) => Some(agent),
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// Starts `binary` as `consul agent -dev` and waits until it has a leader.
    ///
    /// # Errors
    /// When it cannot be spawned, exits, or has no leader within 30 s; the message
    /// holds the agent's output.
    pub fn start_from(binary: &Path) -> Result<ConsulAgent, String> {
        // Consul 1.14+ also opens a gRPC TLS port in dev mode (8503 by default, which
        // two agents of parallel tests would both want); older versions do not know
        // the setting and refuse it.
        match ConsulAgent::spawn(binary, true) {
            Err(e) if e.contains("grpc_tls") => ConsulAgent::spawn(binary, false),
            r => r,
        }
    }

    fn spawn(binary: &Path, no_grpc_tls: bool) -> Result<ConsulAgent, String> {
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let log_path = tmp.path().join("consul.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let port = free_port();
        let mut hcl = String::from("session_ttl_min = \"1s\"");
        if no_grpc_tls {
            hcl.push_str("\nports { grpc_tls = -1 }");
        }
        let mut cmd = Command::new(binary);
        cmd.args(["agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1"])
            .arg(format!("-http-port={port}"))
            // Its other ports on free ones too, so a Consul running on this machine
            // (or another test's agent) does not get in the way.
            .arg(format!("-serf-lan-port={}", free_port()))
            .arg(format!("-serf-wan-port={}", free_port()))
            .arg(format!("-server-port={}", free_port()))
            .args(["-dns-port=-1", "-grpc-port=-1"])
            .arg(format!("-hcl={hcl}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let mut agent = ConsulAgent {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _tmp: tmp,
        };
        let output = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(format!(
                    "consul agent -dev exited ({status}) before it had a leader:\n{}",
                    output()
                ));
            }
            if has_leader(agent.addr) {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "consul agent -dev had no leader within {START_TIMEOUT:?}:\n{}",
                    output()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The HTTP API's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The HTTP API's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first executable file `name` in the directories of `path` (a PATH value).
pub fn find_on_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path).map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether `GET /v1/status/leader` answers 200 with a leader's address (`""` while
/// the agent has none). Never panics: the agent may not be listening yet.
fn has_leader(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v1/status/leader HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp);
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        return false;
    };
    head.starts_with("HTTP/1.") && head.contains(" 200 ") && body.trim().len() > 2
}
