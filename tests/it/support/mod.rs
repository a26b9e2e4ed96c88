//! Helpers that start real things for the integration tests: a mounted node
//! (in-process, or as a `litefs` process), and checks on its LTX history.

#![allow(dead_code)]

pub mod consul_agent;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use litefs::fuse::{Mount, MountOptions};
use litefs::ltx::{Pos, TxId};
use litefs::store::{Store, StoreOptions};

/// A store mounted in a temporary directory, in this process. Dropping it unmounts
/// (also when a test panics), then removes the directories.
pub struct Node {
    mount: Option<Mount>,
    store: Option<Arc<Store>>,
    /// The mount point.
    pub mnt: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    // Declared last: removed after the unmount.
    _tmp: tempfile::TempDir,
}

impl Node {
    /// Opens a store in a fresh data dir and mounts it.
    pub fn start() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        let data = tmp.path().join("data");
        let mut node = Node {
            mount: None,
            store: None,
            mnt,
            data,
            _tmp: tmp,
        };
        node.do_mount();
        node
    }

    fn do_mount(&mut self) {
        let store = Store::open(StoreOptions {
            data_dir: self.data.clone(),
            retention: Duration::from_secs(600),
            retention_monitor_interval: Duration::from_secs(60),
            node_id: 1,
        })
        .unwrap();
        let opts = MountOptions::new(&self.mnt, &self.data);
        self.mount = Some(Mount::start(&opts, store.clone()).unwrap());
        self.store = Some(store);
    }

    /// Unmounts, closes the store, opens and mounts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.do_mount();
    }

    /// Unmounts and closes the store.
    pub fn stop(&mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount(Duration::from_secs(5)).unwrap();
        }
        if let Some(s) = self.store.take() {
            s.close().unwrap();
        }
    }

    /// The mount.
    pub fn mount(&self) -> &Mount {
        self.mount.as_ref().unwrap()
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        self.store.as_ref().unwrap()
    }

    /// Path of a file in the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// The real database file of `db` in the data dir.
    pub fn data_db(&self, db: &str) -> PathBuf {
        self.data.join("dbs").join(db).join("database")
    }

    /// The database's LTX files, in TXID order.
    pub fn ltx_files(&self, db: &str) -> Vec<PathBuf> {
        ltx_files(&self.data, db)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount(Duration::from_secs(2));
        }
        if let Some(s) = self.store.take() {
            let _ = s.close();
        }
    }
}

/// The LTX files of `db` under `data`, in TXID order.
pub fn ltx_files(data: &Path, db: &str) -> Vec<PathBuf> {
    let dir = data.join("dbs").join(db).join("ltx");
    let mut files: Vec<(TxId, PathBuf)> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                litefs::ltx::parse_filename(&name).map(|(min, _)| (min, e.path()))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// Applies an LTX chain from TXID 1 onto an empty file with `litefs ltx apply`, which
/// refuses gaps and checksum mismatches, and returns the resulting database bytes and
/// the chain's final position.
pub fn apply_chain(files: &[PathBuf]) -> (Vec<u8>, Pos) {
    assert!(!files.is_empty(), "no LTX files");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("applied.db");
    let o = Command::new(env!("CARGO_BIN_EXE_litefs"))
        .args(["ltx", "apply", "-o"])
        .arg(&out)
        .args(files)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ltx apply failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (header, trailer) = litefs::ltx::verify_path(files.last().unwrap()).unwrap();
    let pos = Pos {
        txid: header.max_txid,
        post_apply_checksum: trailer.post_apply_checksum,
    };
    (std::fs::read(&out).unwrap(), pos)
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Whether `dir` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// A `litefs mount` process with its own config, data dir and mount point. Dropping it
/// kills the process and removes any mount it left.
pub struct Process {
    child: Option<Child>,
    /// The config file.
    pub config: PathBuf,
    /// The mount point.
    pub mnt: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    /// stderr of the process.
    pub log: PathBuf,
    _tmp: Arc<tempfile::TempDir>,
}

impl Process {
    /// Writes a config (static lease, this node primary) and starts `litefs mount`.
    pub fn start() -> Process {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let mnt = tmp.path().join("mnt");
        let data = tmp.path().join("data");
        let config = tmp.path().join("litefs.yml");
        let mut f = File::create(&config).unwrap();
        write!(
            f,
            "fuse:\n  dir: {}\ndata:\n  dir: {}\nlease:\n  type: static\n  candidate: true\n  advertise-url: http://127.0.0.1:20202\nhttp:\n  addr: 127.0.0.1:0\n",
            mnt.display(),
            data.display()
        )
        .unwrap();
        let mut p = Process {
            child: None,
            config,
            mnt,
            data,
            log: tmp.path().join("litefs.log"),
            _tmp: tmp,
        };
        p.spawn();
        p
    }

    /// Like [`Process::start`] with the config written by `config(mnt, data)`.
    pub fn start_with(config: impl Fn(&Path, &Path) -> String) -> Process {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let mnt = tmp.path().join("mnt");
        let data = tmp.path().join("data");
        let path = tmp.path().join("litefs.yml");
        std::fs::write(&path, config(&mnt, &data)).unwrap();
        let mut p = Process {
            child: None,
            config: path,
            mnt,
            data,
            log: tmp.path().join("litefs.log"),
            _tmp: tmp,
        };
        p.spawn();
        p
    }

    /// Starts (again) the process on the same directories and waits for the mount.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_litefs"))
            .args(["mount", "-config"])
            .arg(&self.config)
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let mnt = self.mnt.clone();
        // A stale mount from a crash is listed too, and stat() of it may be answered
        // from the kernel's cache: wait until opendir (always sent to the server)
        // works, with the process still running.
        let child = self.child.as_mut().unwrap();
        let ok = wait_until(Duration::from_secs(10), || {
            is_mounted(&mnt)
                && std::fs::read_dir(&mnt).is_ok()
                && matches!(child.try_wait(), Ok(None))
        });
        assert!(ok, "litefs did not mount; log:\n{}", self.log_text());
    }

    /// The process's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of a file in the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Sends a signal and waits (at most 30 s, then SIGKILL) for the exit status.
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        panic!(
            "litefs did not exit within 30 s of signal {sig} ({status}); log:\n{}",
            self.log_text()
        );
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

/// Kills a `litefs` child (if any) and lazily unmounts whatever it left at `mnt`: the
/// clean-up every test node does on drop, even after a panic.
pub fn kill_and_unmount(child: &mut Option<Child>, mnt: &Path) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    if is_mounted(mnt) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(mnt)
            .status();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        kill_and_unmount(&mut self.child, &self.mnt);
    }
}

/// A plain HTTP/1.0 request to 127.0.0.1:`port` with `body`, read to the end within
/// 60 s; returns the status code (0 when the answer is not HTTP) and the body.
pub fn http_request(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&resp[..end.unwrap_or(resp.len())]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        end.map_or_else(Vec::new, |e| resp[e + 4..].to_vec()),
    )
}

/// `GET path` on 127.0.0.1:`port`, which must answer 200; the body as text.
pub fn http_get_text(port: u16, path: &str) -> String {
    let (status, body) = http_request(port, "GET", path, b"");
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 200, "GET {path}: {text}");
    text
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// `moto_server` (an S3 server) on a free port of 127.0.0.1 with bucket `archive`;
/// killed on drop. `.1` is its port.
pub struct Moto(pub Child, pub u16);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `moto_server` and creates bucket `archive`.
pub fn start_moto() -> Moto {
    use std::io::Read;
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server on PATH: pip install 'moto[server]'");
    let moto = Moto(child, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let req = format!(
                "PUT /archive HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).expect("create bucket");
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
            return moto;
        }
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}
