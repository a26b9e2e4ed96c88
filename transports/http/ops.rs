//! Operator endpoints beside `/stream`: `GET /info`, `GET /metrics`, `GET /export`,
//! `POST /import`.
//!
//! Metrics are plain atomics rendered by hand in the Prometheus text format: the set is
//! small and fixed, the values already live in the store and the node, and a registry
//! crate would only add a second copy of them.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::archive::{ArchiveDbState, ArchiveInfo, ArchiveState};
use crate::replicate::replica::Lag;
use crate::store::Store;

/// Who this node is and who its primary is, as `/info` reports it. Shared between the
/// node (which fills in the role and lag) and the HTTP server.
#[derive(Debug)]
pub struct NodeInfo {
    /// This node's id (as sent to the primary).
    pub node_id: u64,
    /// `lease.candidate`.
    pub candidate: bool,
    /// The mount directory: imports are written through it so the file system's own
    /// capture (and the kernel's cache) see them like any other write.
    pub mount_dir: PathBuf,
    /// `(hostname, advertise URL)` of the current primary; this node's own on a primary.
    pub primary: Mutex<Option<(String, String)>>,
    /// How far behind the primary a replica is.
    pub lag: Mutex<Option<Arc<Lag>>>,
    /// Replicas currently streaming from this node.
    pub streams: AtomicUsize,
    /// The archiver's state, when `backup` is set.
    pub archive: Mutex<Option<Arc<ArchiveState>>>,
    /// Node ids of the replicas streaming from this node (one entry per stream).
    replicas: Mutex<Vec<u64>>,
    /// Lease counters for `/metrics` (elected nodes).
    pub lease: LeaseCounters,
    /// Primary changes, for `GET /events`.
    events: tokio::sync::broadcast::Sender<super::events::Event>,
    /// Where `/promote` and `/handoff` send their requests: the election of an
    /// elected node (`None` on static nodes).
    control: Mutex<Option<tokio::sync::mpsc::Sender<Control>>>,
    /// `http.auth-token`: required on every request but `GET /metrics`
    /// ([`require_token`]) and sent to the primary.
    pub auth_token: Option<String>,
    /// The primary's HALT locks (write forwarding), set by the node.
    halt: std::sync::OnceLock<Arc<crate::halt::HaltRegistry>>,
}

/// A request from the HTTP API to the node's election.
#[derive(Debug)]
pub enum Control {
    /// `POST /promote` on a replica: take over from the current primary.
    Promote {
        /// `Ok` once this node is the primary, or why not.
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// `POST /handoff` on the primary: stop writing, let `replica` catch up, and hand
    /// it the lease.
    Handoff {
        /// The node id of the replica taking over.
        replica: u64,
        /// The lease and the final positions, or why not.
        reply: tokio::sync::oneshot::Sender<Result<HandoffAnswer, String>>,
    },
}

/// What the primary answers to `POST /handoff`: the lease to take over and the
/// positions the replica must have reached first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoffAnswer {
    /// [`crate::lease::Lease::id`] of the handed-over lease.
    pub lease_id: String,
    /// Every database's final position on the old primary.
    pub positions: Vec<DbInfo>,
}

/// What the election did with the lease since the node started.
#[derive(Debug, Default)]
pub struct LeaseCounters {
    /// Leases acquired (including by handoff).
    pub acquired: AtomicU64,
    /// Successful renewals.
    pub renewals: AtomicU64,
    /// Renewals that failed (the lease may still be valid).
    pub renewal_failures: AtomicU64,
    /// Leases lost (renewal impossible before expiry, or taken by someone else).
    pub lost: AtomicU64,
    /// Leases handed to another node or taken over from one (`/handoff`, `/promote`).
    pub handoffs: AtomicU64,
}

impl LeaseCounters {
    /// Adds one to a counter.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl NodeInfo {
    /// Info of a node with no primary known yet.
    pub fn new(node_id: u64, candidate: bool, mount_dir: PathBuf) -> NodeInfo {
        NodeInfo {
            node_id,
            candidate,
            mount_dir,
            primary: Mutex::new(None),
            lag: Mutex::new(None),
            streams: AtomicUsize::new(0),
            archive: Mutex::new(None),
            auth_token: None,
            replicas: Mutex::new(Vec::new()),
            lease: LeaseCounters::default(),
            events: tokio::sync::broadcast::channel(256).0,
            control: Mutex::new(None),
            halt: std::sync::OnceLock::new(),
        }
    }

    /// Connects `/halt` and `/tx` to the node's HALT lock registry.
    pub fn set_halt(&self, registry: Arc<crate::halt::HaltRegistry>) {
        let _ = self.halt.set(registry);
    }

    /// The node's HALT lock registry, once set.
    pub fn halt(&self) -> Option<Arc<crate::halt::HaltRegistry>> {
        self.halt.get().cloned()
    }

    /// Records the archiver's state.
    pub fn set_archive(&self, state: Arc<ArchiveState>) {
        *self.archive.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    fn archive(&self) -> Option<Arc<ArchiveState>> {
        self.archive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Connects `/promote` and `/handoff` to the election.
    pub fn set_control(&self, tx: tokio::sync::mpsc::Sender<Control>) {
        *self.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    pub(crate) fn control(&self) -> Option<tokio::sync::mpsc::Sender<Control>> {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records who the primary is now and tells `/events` subscribers:
    /// `primary` is `None` while no primary is known.
    pub fn primary_changed(&self, is_primary: bool, primary: Option<(String, String)>) {
        *self.primary.lock().unwrap_or_else(|p| p.into_inner()) = primary.clone();
        let _ = self.events.send(super::events::Event::primary_change(
            is_primary,
            primary.map(|p| p.0),
        ));
    }

    /// A receiver of primary changes.
    pub(crate) fn subscribe_events(
        &self,
    ) -> tokio::sync::broadcast::Receiver<super::events::Event> {
        self.events.subscribe()
    }

    /// The same info with the shared secret set.
    pub fn with_auth_token(mut self, token: Option<String>) -> NodeInfo {
        self.auth_token = token;
        self
    }

    /// Records the current primary.
    pub fn set_primary(&self, hostname: String, url: String) {
        *self.primary.lock().unwrap_or_else(|p| p.into_inner()) = Some((hostname, url));
    }

    /// Records the lag gauge of the replication loop.
    pub fn set_lag(&self, lag: Arc<Lag>) {
        *self.lag.lock().unwrap_or_else(|p| p.into_inner()) = Some(lag);
    }

    /// The current primary's `(hostname, advertise URL)`, if known.
    pub fn primary(&self) -> Option<(String, String)> {
        self.primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The replication loop's lag gauge (replicas only).
    pub fn lag(&self) -> Option<Arc<Lag>> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lag_ms(&self) -> Option<u64> {
        self.lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|l| l.millis())
    }
}

impl NodeInfo {
    /// Node ids of the replicas streaming from this node now.
    pub fn connected_replicas(&self) -> Vec<u64> {
        self.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Counts a connected replica for as long as its response body lives (so until the
/// last frame was handed to the connection).
pub(crate) struct StreamGuard(Arc<NodeInfo>, u64);

impl StreamGuard {
    pub(crate) fn new(info: Arc<NodeInfo>, node_id: u64) -> StreamGuard {
        info.streams.fetch_add(1, Ordering::Relaxed);
        info.replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(node_id);
        StreamGuard(info, node_id)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        let mut r = self.0.replicas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = r.iter().position(|&n| n == self.1) {
            r.swap_remove(i);
        }
    }
}

/// The `/info` document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Info {
    /// This node's id.
    pub node_id: u64,
    /// Whether this node is the primary.
    pub is_primary: bool,
    /// Whether this node may become primary.
    pub candidate: bool,
    /// The primary's hostname, if known.
    pub primary_hostname: Option<String>,
    /// The primary's advertise URL, if known.
    pub primary_url: Option<String>,
    /// Milliseconds behind the primary (replicas only).
    pub lag_ms: Option<u64>,
    /// Databases, sorted by name.
    pub databases: Vec<DbInfo>,
    /// The archive (`backup` set): whether this node ships, and per database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveInfo>,
}

/// One database in `/info`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DbInfo {
    /// Name in the mount.
    pub name: String,
    /// TXID, 16 hex digits.
    pub txid: String,
    /// Post-apply checksum, 16 hex digits.
    pub checksum: String,
}

/// State of the operator handlers.
#[derive(Clone)]
pub(crate) struct OpsState {
    pub store: Arc<Store>,
    pub info: Arc<NodeInfo>,
}

fn info_of(st: &OpsState) -> Info {
    let primary = st.info.primary();
    let mut databases: Vec<DbInfo> = st
        .store
        .databases()
        .iter()
        .map(|db| {
            let pos = db.pos();
            DbInfo {
                name: db.name().to_string(),
                txid: format!("{:016x}", pos.txid.0),
                checksum: format!("{:016x}", pos.post_apply_checksum.0),
            }
        })
        .collect();
    databases.sort_by(|a, b| a.name.cmp(&b.name));
    let is_primary = st.store.is_primary();
    Info {
        node_id: st.info.node_id,
        is_primary,
        candidate: st.info.candidate,
        primary_hostname: primary.as_ref().map(|p| p.0.clone()),
        primary_url: primary.map(|p| p.1),
        lag_ms: if is_primary { None } else { st.info.lag_ms() },
        databases,
        archive: st.info.archive().map(|a| a.info()),
    }
}

pub(crate) async fn info(State(st): State<OpsState>) -> Response {
    axum::Json(info_of(&st)).into_response()
}

pub(crate) async fn metrics(State(st): State<OpsState>) -> Response {
    let mut out = String::new();
    let dbs = st.store.databases();
    let mut family = |name: &str, kind: &str, help: &str, f: &dyn Fn(&crate::store::Db) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for db in &dbs {
            let _ = writeln!(out, "{name}{{db=\"{}\"}} {}", escape(db.name()), f(db));
        }
    };
    family(
        "litefs_db_txid",
        "gauge",
        "Current TXID of the database.",
        &|d| d.pos().txid.0,
    );
    family(
        "litefs_db_commits_total",
        "counter",
        "Transactions captured or applied since start.",
        &|d| d.stats().commits,
    );
    family(
        "litefs_db_ltx_files_total",
        "counter",
        "LTX files written since start.",
        &|d| d.stats().ltx_files,
    );
    family(
        "litefs_db_ltx_bytes_total",
        "counter",
        "Bytes of LTX files written since start.",
        &|d| d.stats().ltx_bytes,
    );
    let is_primary = st.store.is_primary();
    let mut gauge = |name: &str, kind: &str, help: &str, v: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    gauge(
        "litefs_is_primary",
        "gauge",
        "1 on the primary, 0 on a replica.",
        u8::from(is_primary).to_string(),
    );
    gauge(
        "litefs_stream_count",
        "gauge",
        "Replicas streaming from this node.",
        st.info.streams.load(Ordering::Relaxed).to_string(),
    );
    let lease = &st.info.lease;
    for (name, help, c) in [
        (
            "litefs_lease_acquired_total",
            "Leases acquired.",
            &lease.acquired,
        ),
        (
            "litefs_lease_renewals_total",
            "Lease renewals that succeeded.",
            &lease.renewals,
        ),
        (
            "litefs_lease_renewal_failures_total",
            "Lease renewals that failed.",
            &lease.renewal_failures,
        ),
        (
            "litefs_lease_lost_total",
            "Leases lost while leading.",
            &lease.lost,
        ),
        (
            "litefs_lease_handoffs_total",
            "Leases handed over to or taken over from another node.",
            &lease.handoffs,
        ),
    ] {
        gauge(name, "counter", help, c.load(Ordering::Relaxed).to_string());
    }
    if !is_primary && let Some(ms) = st.info.lag_ms() {
        gauge(
            "litefs_lag_seconds",
            "gauge",
            "Seconds behind the primary.",
            format!("{:.3}", ms as f64 / 1000.0),
        );
    }
    if let Some(a) = st.info.archive() {
        archive_metrics(&mut out, &a.info());
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

fn archive_metrics(out: &mut String, a: &ArchiveInfo) {
    let _ = writeln!(
        out,
        "# HELP litefs_archive_active 1 while this node ships to the archive (it is the primary).\n# TYPE litefs_archive_active gauge\nlitefs_archive_active {}",
        u8::from(a.active)
    );
    type Value = fn(&ArchiveDbState) -> String;
    let families: [(&str, &str, Value); 3] = [
        (
            "litefs_archive_txid",
            "Newest TXID of the database in the archive.",
            |d| u64::from_str_radix(&d.txid, 16).unwrap_or(0).to_string(),
        ),
        (
            "litefs_archive_backlog_files",
            "Local LTX files not in the archive yet.",
            |d| d.backlog_files.to_string(),
        ),
        (
            "litefs_archive_lag_seconds",
            "Age of the oldest local LTX file not in the archive yet (0: none).",
            |d| format!("{:.3}", d.lag_ms as f64 / 1000.0),
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (db, d) in &a.databases {
            let _ = writeln!(out, "{name}{{db=\"{}\"}} {}", escape(db), value(d));
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `?name=DB`.
#[derive(Debug, Deserialize)]
pub(crate) struct NameQuery {
    name: String,
}

fn bad(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, format!("{msg}\n")).into_response()
}

/// A database name is a plain file name in the mount.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && crate::store::parse_mount_name(name)
            .is_some_and(|(_, k)| k == crate::store::FileKind::Database)
}

/// A temp file removed when dropped.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn tmp_path(st: &OpsState, what: &str) -> io::Result<TempPath> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = st.store.options().data_dir.join("ops-tmp");
    fs::create_dir_all(&dir)?;
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    Ok(TempPath(
        dir.join(format!("{what}-{}-{n}.tmp", std::process::id())),
    ))
}

pub(crate) async fn export(State(st): State<OpsState>, Query(q): Query<NameQuery>) -> Response {
    let Some(db) = st.store.db(&q.name) else {
        return bad(StatusCode::NOT_FOUND, format!("no database {:?}", q.name));
    };
    let (ltx, out) = match (tmp_path(&st, "export-ltx"), tmp_path(&st, "export-db")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return bad(StatusCode::INTERNAL_SERVER_ERROR, format!("temp file: {e}"));
        }
    };
    let name = q.name.clone();
    // A snapshot LTX is the store's consistent copy (taken under the database's lock,
    // checksum-verified); applying it to an empty file gives the database bytes.
    let made = tokio::task::spawn_blocking(move || -> Result<Option<TempPath>, String> {
        let pos = db.write_snapshot(&ltx.0).map_err(|e| e.to_string())?;
        if pos.is_none() {
            return Ok(None);
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&out.0)
            .map_err(|e| format!("{}: {e}", out.0.display()))?;
        crate::ltx::apply_file(&f, None, &ltx.0).map_err(|e| e.to_string())?;
        Ok(Some(out))
    })
    .await;
    let out = match made {
        Ok(Ok(Some(out))) => out,
        Ok(Ok(None)) => {
            return bad(StatusCode::NOT_FOUND, format!("database {name:?} is empty"));
        }
        Ok(Err(e)) => return bad(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let file = match tokio::fs::File::open(&out.0).await {
        Ok(f) => f,
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    // Unlinking an open file keeps its content readable until the stream ends.
    drop(out);
    info!(db = name, "exporting");
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/vnd.sqlite3")
        .header("content-length", len)
        .body(Body::from_stream(tokio_util::io::ReaderStream::new(file)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Checks a SQLite database file's header: magic, page size, and file size against
/// the header's page count (when that count is valid). Returns the page size.
///
/// # Errors
/// A message saying what is wrong.
pub fn check_sqlite_file(f: &mut File) -> Result<u32, String> {
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut hdr = [0u8; 100];
    if len < 100 {
        return Err(format!(
            "file is {len} bytes: too short for a SQLite header"
        ));
    }
    f.read_exact(&mut hdr).map_err(|e| e.to_string())?;
    if &hdr[..16] != b"SQLite format 3\0" {
        return Err("not a SQLite database (bad magic)".into());
    }
    let raw = u32::from(u16::from_be_bytes([hdr[16], hdr[17]]));
    let ps = if raw == 1 { 65536 } else { raw };
    if !crate::ltx::is_valid_page_size(ps) {
        return Err(format!("invalid page size {raw}"));
    }
    if len % u64::from(ps) != 0 {
        return Err(format!(
            "file size {len} is not a multiple of the page size {ps}"
        ));
    }
    let pages = len / u64::from(ps);
    let count = u32::from_be_bytes([hdr[28], hdr[29], hdr[30], hdr[31]]);
    let change = &hdr[24..28];
    let version_valid_for = &hdr[92..96];
    if change == version_valid_for && u64::from(count) != pages {
        return Err(format!(
            "header says {count} pages but the file holds {pages} (truncated or corrupt)"
        ));
    }
    Ok(ps)
}

pub(crate) async fn import(
    State(st): State<OpsState>,
    Query(q): Query<NameQuery>,
    body: Body,
) -> Response {
    if !valid_name(&q.name) {
        return bad(
            StatusCode::BAD_REQUEST,
            format!("invalid database name {:?}", q.name),
        );
    }
    if !st.store.is_primary() {
        let primary = st.info.primary();
        let msg = match primary {
            Some((host, url)) => format!("not the primary: import through {host} at {url}"),
            None => "not the primary, and no primary is known".to_string(),
        };
        return bad(StatusCode::MISDIRECTED_REQUEST, msg);
    }
    let tmp = match tmp_path(&st, "import") {
        Ok(t) => t,
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, format!("temp file: {e}")),
    };
    let mut file = match tokio::fs::File::create(&tmp.0).await {
        Ok(f) => f,
        Err(e) => return bad(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return bad(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")),
        };
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await {
            return bad(StatusCode::INTERNAL_SERVER_ERROR, e);
        }
    }
    // tokio's File finishes its last write in the background: wait for it.
    if let Err(e) = tokio::io::AsyncWriteExt::flush(&mut file).await {
        return bad(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    drop(file);
    let name = q.name.clone();
    let dst = st.info.mount_dir.join(&name);
    let store = st.store.clone();
    let done = tokio::task::spawn_blocking(move || import_file(&store, &name, &tmp.0, &dst)).await;
    match done {
        Ok(Ok(txid)) => {
            info!(db = q.name, txid = format!("{txid:016x}"), "imported");
            (StatusCode::OK, format!("{txid:016x}\n")).into_response()
        }
        Ok(Err(ImportFailure::Invalid(m))) => {
            warn!(db = q.name, reason = m, "import refused");
            bad(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("invalid SQLite file: {m}"),
            )
        }
        Ok(Err(ImportFailure::Busy(m))) => bad(StatusCode::CONFLICT, m),
        Ok(Err(ImportFailure::Io(m))) => bad(StatusCode::INTERNAL_SERVER_ERROR, m),
        Err(e) => bad(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

enum ImportFailure {
    Invalid(String),
    Busy(String),
    Io(String),
}

/// Writes the checked file through the mount as one write-and-fsync with no journal:
/// the file system captures it as one transaction (one LTX file), exactly as it
/// captures a `cp` into the mount. Returns the new TXID.
fn import_file(store: &Store, name: &str, src: &Path, dst: &Path) -> Result<u64, ImportFailure> {
    let io = |what: &str, e: io::Error| ImportFailure::Io(format!("{what}: {e}"));
    let mut f = File::open(src).map_err(|e| io("open upload", e))?;
    check_sqlite_file(&mut f).map_err(ImportFailure::Invalid)?;
    let len = f.metadata().map_err(|e| io("stat upload", e))?.len();
    // With a live WAL, writes to the database file are checkpoint copies the file
    // system does not capture: the import would not replicate.
    let wal = dst.with_file_name(format!("{name}-wal"));
    if fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Err(ImportFailure::Busy(format!(
            "{name} has a live WAL: close its connections or run \
             `PRAGMA wal_checkpoint(TRUNCATE)` first"
        )));
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)
        .map_err(|e| io(&format!("open {}", dst.display()), e))?;
    lock_out_sqlite(&out).map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => ImportFailure::Busy(format!(
            "{name} is in use by a SQLite connection on the primary: try again"
        )),
        _ => io("lock", e),
    })?;
    out.set_len(len).map_err(|e| io("truncate", e))?;
    let mut r =
        io::BufReader::with_capacity(1 << 20, File::open(src).map_err(|e| io("open upload", e))?);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(|e| io("read upload", e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| io(&format!("write {}", dst.display()), e))?;
    }
    out.sync_all().map_err(|e| io("fsync", e))?;
    drop(out);
    Ok(store.db(name).map_or(0, |db| db.pos().txid.0))
}

/// SQLite's lock bytes (`PENDING_BYTE` and the RESERVED and SHARED bytes after it).
const SQLITE_LOCK_START: i64 = 0x4000_0000;
const SQLITE_LOCK_LEN: i64 = 512;

/// Takes SQLite's EXCLUSIVE lock on the database in the mount, the way SQLite does
/// (a non-blocking POSIX write lock over its lock bytes), so no SQLite connection
/// reads or writes while the import replaces the file. Released when `f` is closed.
fn lock_out_sqlite(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: zeroed `flock` is a valid value; every field we rely on is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = SQLITE_LOCK_START;
    fl.l_len = SQLITE_LOCK_LEN;
    // SAFETY: fcntl(F_SETLK) on an fd we own with a valid `flock`.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The one auth check over the whole router: with `http.auth-token` set, every request
/// except `GET /metrics` must carry `Authorization: Bearer <token>`; 401 otherwise.
pub(crate) async fn require_token(
    State(info): State<Arc<NodeInfo>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = info.auth_token.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/metrics" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
        return next.run(req).await;
    }
    warn!(
        path = req.uri().path(),
        "refused a request without the auth token"
    );
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong auth token (Authorization: Bearer <http.auth-token>)\n",
    )
        .into_response()
}

/// Compares in time independent of where the inputs differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The header value clients send for `token`.
pub fn bearer(token: &str) -> Option<axum::http::HeaderValue> {
    axum::http::HeaderValue::from_str(&format!("Bearer {token}"))
        .ok()
        .map(|mut v| {
            v.set_sensitive(true);
            v
        })
}
