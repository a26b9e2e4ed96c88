//! An in-repo Consul server for tests: the parts of Consul's HTTP API that a leader
//! election uses, following Consul's documentation
//! (<https://developer.hashicorp.com/consul/api-docs/session>, `/kv`, and
//! "Blocking Queries"):
//!
//! - `PUT /v1/session/create` (`Name`, `Node`, `TTL`, `LockDelay` as a duration
//!   string or a number, `Behavior` `release`|`delete`, check lists accepted and
//!   ignored), `PUT /v1/session/renew/<id>` (404 when gone), `PUT
//!   /v1/session/destroy/<id>`, `GET /v1/session/info/<id>`.
//! - `GET|PUT|DELETE /v1/kv/<key>` with `?acquire=`, `?release=`, `?cas=`,
//!   `?flags=`, `?raw`, base64 `Value` in JSON, `X-Consul-Index`, and blocking reads
//!   with `?index=&wait=`.
//! - Session invalidation (TTL expiry or destroy) releases or, with behaviour
//!   `delete`, deletes the keys the session held, and starts the session's
//!   lock-delay on them: acquiring such a key answers `false` until it ends. An
//!   explicit `?release=` starts no lock-delay.
//! - TTL expiry: Consul promises only that a session lives at least its TTL and
//!   expires it within 2x TTL. [`ConsulServerOptions::expiry_factor`] places the
//!   invalidation anywhere in that window (1.0 = at TTL exactly, 2.0 = at 2x TTL, which
//!   is what Consul itself does today), so tests can check both edges.
//! - Optional ACL: with a token set, requests without `X-Consul-Token` (or `?token=`)
//!   equal to it get 403 "Permission denied".
//! - Faults for partition tests: [`Fault::Blackhole`] never answers (as if the packets
//!   were dropped), [`Fault::Unavailable`] answers 500 "No cluster leader".
//!
//! One deliberate difference: Consul refuses TTLs under 10s; here the minimum is
//! [`ConsulServerOptions::min_ttl`] (default 10s as in Consul) so tests can use short
//! TTLs.
//!
//! The server runs on its own thread and runtime, so synchronous tests that start
//! `litefs` processes can use it as well as async ones. Dropping it stops it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::watch;

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers normally.
    None,
    /// Accepts requests and never answers them, as in a network partition.
    Blackhole,
    /// Answers every request with 500 "No cluster leader".
    Unavailable,
}

/// Start-up options.
#[derive(Debug, Clone)]
pub struct ConsulServerOptions {
    /// Where in Consul's [TTL, 2x TTL] window a session that is not renewed is
    /// invalidated: 1.0 .. 2.0.
    pub expiry_factor: f64,
    /// Smallest TTL accepted (Consul: 10s).
    pub min_ttl: Duration,
    /// ACL token every request must carry, if set.
    pub acl_token: Option<String>,
}

impl Default for ConsulServerOptions {
    fn default() -> Self {
        ConsulServerOptions {
            expiry_factor: 2.0,
            min_ttl: Duration::from_secs(10),
            acl_token: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Session {
    id: String,
    name: String,
    node: String,
    ttl: Option<Duration>,
    ttl_text: String,
    lock_delay: Duration,
    behavior: String,
    create_index: u64,
    modify_index: u64,
    expires_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    flags: u64,
    session: Option<String>,
    lock_index: u64,
    create_index: u64,
    modify_index: u64,
}

#[derive(Debug, Default)]
struct Data {
    index: u64,
    /// Last index at which the KV table changed (writes and deletes).
    kv_index: u64,
    sessions: HashMap<String, Session>,
    kv: BTreeMap<String, Entry>,
    lock_delays: HashMap<String, Instant>,
    next_session: u64,
    /// Sessions invalidated by TTL so far (for tests).
    expired: Vec<(String, Instant)>,
}

struct Shared {
    data: Mutex<Data>,
    kv_changed: watch::Sender<u64>,
    fault: Mutex<Fault>,
    expiry_factor: Mutex<f64>,
    min_ttl: Duration,
    acl_token: Option<String>,
    requests: Mutex<u64>,
}

/// A running test server. Dropping it stops it.
pub struct ConsulServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConsulServer {
    /// Starts a server with Consul's defaults on a free 127.0.0.1 port.
    pub fn start() -> ConsulServer {
        Self::start_with(ConsulServerOptions::default())
    }

    /// Starts a server with `opts` on a free 127.0.0.1 port.
    pub fn start_with(opts: ConsulServerOptions) -> ConsulServer {
        assert!(
            (1.0..=2.0).contains(&opts.expiry_factor),
            "Consul expires sessions between TTL and 2x TTL"
        );
        let (kv_changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            data: Mutex::new(Data::default()),
            kv_changed,
            fault: Mutex::new(Fault::None),
            expiry_factor: Mutex::new(opts.expiry_factor),
            min_ttl: opts.min_ttl,
            acl_token: opts.acl_token,
            requests: Mutex::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("consul-test-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    let reaper = Arc::clone(&for_thread);
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            reaper.reap();
                        }
                    });
                    let app = Router::new().fallback(handle).with_state(for_thread);
                    // Not a graceful shutdown: blackholed requests never finish.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
                // Connections still open (blackholed requests) end with the runtime.
                rt.shutdown_background();
            })
            .unwrap();
        ConsulServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches a fault on or off (`Fault::None`).
    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Moves the expiry point within [TTL, 2x TTL] for sessions renewed or created
    /// from now on.
    pub fn set_expiry_factor(&self, factor: f64) {
        assert!((1.0..=2.0).contains(&factor));
        *self.shared.expiry_factor.lock().unwrap() = factor;
    }

    /// Requests received so far (also those blackholed).
    pub fn requests(&self) -> u64 {
        *self.shared.requests.lock().unwrap()
    }

    /// Sessions invalidated by TTL expiry so far, with the instant it happened.
    pub fn expired_sessions(&self) -> Vec<(String, Instant)> {
        self.shared.data.lock().unwrap().expired.clone()
    }

    /// Whether a session exists now.
    pub fn has_session(&self, id: &str) -> bool {
        self.shared.reap();
        self.shared.data.lock().unwrap().sessions.contains_key(id)
    }
}

impl Drop for ConsulServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// Invalidates every session whose TTL ran out.
    fn reap(&self) {
        let now = Instant::now();
        let mut d = self.data.lock().unwrap();
        let due: Vec<String> = d
            .sessions
            .values()
            .filter(|s| s.expires_at.is_some_and(|t| t <= now))
            .map(|s| s.id.clone())
            .collect();
        for id in due {
            d.expired.push((id.clone(), now));
            self.invalidate(&mut d, &id, now);
        }
    }

    /// Removes a session: its keys are released or deleted and get its lock-delay.
    fn invalidate(&self, d: &mut Data, id: &str, now: Instant) {
        let Some(session) = d.sessions.remove(id) else {
            return;
        };
        d.index += 1;
        let index = d.index;
        let held: Vec<String> =
            d.kv.iter()
                .filter(|(_, e)| e.session.as_deref() == Some(id))
                .map(|(k, _)| k.clone())
                .collect();
        if held.is_empty() {
            return;
        }
        for key in held {
            if !session.lock_delay.is_zero() {
                d.lock_delays.insert(key.clone(), now + session.lock_delay);
            }
            if session.behavior == "delete" {
                d.kv.remove(&key);
            } else if let Some(e) = d.kv.get_mut(&key) {
                e.session = None;
                e.modify_index = index;
            }
        }
        d.kv_index = index;
        self.kv_changed.send_replace(index);
    }

    fn expiry(&self, ttl: Option<Duration>, now: Instant) -> Option<Instant> {
        let factor = *self.expiry_factor.lock().unwrap();
        ttl.map(|t| now + t.mul_f64(factor))
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

fn with_index(index: u64, mut resp: Response) -> Response {
    resp.headers_mut()
        .insert("X-Consul-Index", HeaderValue::from(index));
    resp
}

fn json_resp(index: Option<u64>, v: Value) -> Response {
    let resp = (
        StatusCode::OK,
        [("Content-Type", "application/json")],
        v.to_string(),
    )
        .into_response();
    match index {
        Some(i) => with_index(i, resp),
        None => resp,
    }
}

/// Go's `time.ParseDuration` for the forms Consul clients send ("10s", "1.5s",
/// "500ms", "1m30s", "0").
fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

/// Consul's reading of `LockDelay`: a duration string, or a number that is seconds
/// when below 1000 and nanoseconds otherwise.
fn parse_lock_delay(v: &Value) -> Option<Duration> {
    match v {
        Value::String(s) => parse_go_duration(s),
        Value::Number(n) => {
            let n = n.as_u64()?;
            Some(if n < 1000 {
                Duration::from_secs(n)
            } else {
                Duration::from_nanos(n)
            })
        }
        Value::Null => Some(Duration::from_secs(15)),
        _ => None,
    }
}

fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": u64::try_from(s.lock_delay.as_nanos()).unwrap_or(u64::MAX),
        "Behavior": s.behavior,
        "TTL": s.ttl_text,
        "NodeChecks": [],
        "ServiceChecks": null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

fn entry_json(key: &str, e: &Entry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": key,
        "Flags": e.flags,
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let Some(s) = &e.session {
        v["Session"] = Value::String(s.clone());
    }
    v
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default()
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    *shared.requests.lock().unwrap() += 1;
    let fault = *shared.fault.lock().unwrap();
    match fault {
        Fault::None => {}
        Fault::Blackhole => std::future::pending::<()>().await,
        Fault::Unavailable => {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader");
        }
    }
    let query = query_map(&uri);
    if let Some(required) = &shared.acl_token {
        let given = headers
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| query.get("token").cloned());
        if given.as_deref() != Some(required.as_str()) {
            return text(StatusCode::FORBIDDEN, "Permission denied");
        }
    }
    shared.reap();
    let path = percent_encoding::percent_decode_str(uri.path())
        .decode_utf8_lossy()
        .into_owned();
    if let Some(key) = path.strip_prefix("/v1/kv/") {
        return kv(&shared, method, key, &query, body).await;
    }
    match (method, path.as_str()) {
        (Method::PUT, "/v1/session/create") => session_create(&shared, &body),
        (Method::PUT, p) if p.starts_with("/v1/session/renew/") => {
            session_renew(&shared, &p["/v1/session/renew/".len()..])
        }
        (Method::PUT, p) if p.starts_with("/v1/session/destroy/") => {
            let id = &p["/v1/session/destroy/".len()..];
            let mut d = shared.data.lock().unwrap();
            shared.invalidate(&mut d, id, Instant::now());
            json_resp(None, json!(true))
        }
        (Method::GET, p) if p.starts_with("/v1/session/info/") => {
            let id = &p["/v1/session/info/".len()..];
            let d = shared.data.lock().unwrap();
            let list: Vec<Value> = d.sessions.get(id).map(session_json).into_iter().collect();
            json_resp(Some(d.index), Value::Array(list))
        }
        (m, p) if p.starts_with("/v1/session/") || p.starts_with("/v1/kv") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {m} not allowed"),
        ),
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

fn session_create(shared: &Shared, body: &[u8]) -> Response {
    let req: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                );
            }
        }
    };
    let get_str = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let behavior = match get_str("Behavior").as_str() {
        "" | "release" => "release".to_string(),
        "delete" => "delete".to_string(),
        other => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Invalid Behavior setting '{other}'"),
            );
        }
    };
    let ttl_text = get_str("TTL");
    let ttl = if ttl_text.is_empty() {
        None
    } else {
        match parse_go_duration(&ttl_text) {
            Some(t) if t.is_zero() => None,
            Some(t) if t >= shared.min_ttl && t <= Duration::from_secs(86400) => Some(t),
            Some(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Invalid Session TTL '{ttl_text}', must be between [{:?}=24h0m0s]",
                        shared.min_ttl
                    ),
                );
            }
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: invalid duration {ttl_text:?}"),
                );
            }
        }
    };
    let Some(lock_delay) = parse_lock_delay(req.get("LockDelay").unwrap_or(&Value::Null)) else {
        return text(StatusCode::BAD_REQUEST, "Request decode failed: LockDelay");
    };
    let now = Instant::now();
    let mut d = shared.data.lock().unwrap();
    d.index += 1;
    d.next_session += 1;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let id = format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        nanos,
        d.next_session & 0xffff,
        d.index
    );
    let node = match get_str("Node") {
        n if n.is_empty() => "consul-test-server".to_string(),
        n => n,
    };
    let session = Session {
        id: id.clone(),
        name: get_str("Name"),
        node,
        ttl,
        ttl_text,
        lock_delay,
        behavior,
        create_index: d.index,
        modify_index: d.index,
        expires_at: shared.expiry(ttl, now),
    };
    d.sessions.insert(id.clone(), session);
    json_resp(None, json!({ "ID": id }))
}

fn session_renew(shared: &Shared, id: &str) -> Response {
    let now = Instant::now();
    let mut d = shared.data.lock().unwrap();
    let index = d.index;
    match d.sessions.get_mut(id) {
        Some(s) => {
            s.expires_at = shared.expiry(s.ttl, now);
            json_resp(Some(index), json!([session_json(s)]))
        }
        None => text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        ),
    }
}

async fn kv(
    shared: &Shared,
    method: Method,
    key: &str,
    query: &HashMap<String, String>,
    body: Bytes,
) -> Response {
    if key.is_empty() && method != Method::GET {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    match method {
        Method::GET => kv_get(shared, key, query).await,
        Method::PUT => kv_put(shared, key, query, body),
        Method::DELETE => {
            let mut d = shared.data.lock().unwrap();
            if let Some(cas) = query.get("cas") {
                let Ok(cas) = cas.parse::<u64>() else {
                    return text(StatusCode::BAD_REQUEST, "Invalid cas index");
                };
                let current = d.kv.get(key).map(|e| e.modify_index);
                if (cas == 0 && current.is_some()) || (cas != 0 && current != Some(cas)) {
                    return json_resp(None, json!(false));
                }
            }
            if d.kv.remove(key).is_some() {
                d.index += 1;
                d.kv_index = d.index;
                shared.kv_changed.send_replace(d.index);
            }
            json_resp(None, json!(true))
        }
        m => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {m} not allowed"),
        ),
    }
}

async fn kv_get(shared: &Shared, key: &str, query: &HashMap<String, String>) -> Response {
    let min_index = match query.get("index").map(|v| v.parse::<u64>()) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid index"),
    };
    let wait = match query.get("wait") {
        None => Duration::from_secs(300),
        Some(w) => match parse_go_duration(w) {
            Some(w) => w.min(Duration::from_secs(600)),
            None => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
        },
    };
    if min_index > 0 {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = shared.kv_changed.subscribe();
        loop {
            let current = shared.data.lock().unwrap().kv_index;
            if current > min_index {
                break;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => break,
            }
        }
    }
    let d = shared.data.lock().unwrap();
    // Consul never reports index 0: clients would block on it forever.
    let index = d.kv_index.max(1);
    match d.kv.get(key) {
        None => with_index(index, StatusCode::NOT_FOUND.into_response()),
        Some(e) if query.contains_key("raw") => {
            with_index(index, (StatusCode::OK, e.value.clone()).into_response())
        }
        Some(e) => json_resp(Some(index), json!([entry_json(key, e)])),
    }
}

fn kv_put(shared: &Shared, key: &str, query: &HashMap<String, String>, body: Bytes) -> Response {
    let now = Instant::now();
    let mut d = shared.data.lock().unwrap();
    let flags = match query.get("flags").map(|f| f.parse::<u64>()) {
        None => d.kv.get(key).map(|e| e.flags).unwrap_or(0),
        Some(Ok(f)) => f,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid flags"),
    };
    if let Some(cas) = query.get("cas") {
        let Ok(cas) = cas.parse::<u64>() else {
            return text(StatusCode::BAD_REQUEST, "Invalid cas index");
        };
        let current = d.kv.get(key).map(|e| e.modify_index);
        if (cas == 0 && current.is_some()) || (cas != 0 && current != Some(cas)) {
            return json_resp(None, json!(false));
        }
    }
    let existing = d.kv.get(key).cloned();
    let mut new_session = existing.as_ref().and_then(|e| e.session.clone());
    let mut lock_index = existing.as_ref().map(|e| e.lock_index).unwrap_or(0);
    if let Some(session) = query.get("acquire") {
        if !d.sessions.contains_key(session) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("invalid session \"{session}\""),
            );
        }
        if d.lock_delays.get(key).is_some_and(|until| *until > now) {
            return json_resp(None, json!(false));
        }
        match &new_session {
            Some(holder) if holder != session => return json_resp(None, json!(false)),
            Some(_) => {}
            None => {
                lock_index += 1;
                new_session = Some(session.clone());
            }
        }
    } else if let Some(session) = query.get("release") {
        match &new_session {
            Some(holder) if holder == session => new_session = None,
            _ => return json_resp(None, json!(false)),
        }
    }
    d.index += 1;
    let index = d.index;
    let entry = Entry {
        value: body.to_vec(),
        flags,
        session: new_session,
        lock_index,
        create_index: existing.as_ref().map(|e| e.create_index).unwrap_or(index),
        modify_index: index,
    };
    d.kv.insert(key.to_string(), entry);
    d.kv_index = index;
    shared.kv_changed.send_replace(index);
    json_resp(None, json!(true))
}
