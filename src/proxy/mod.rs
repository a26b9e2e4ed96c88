//! The optional HTTP proxy in front of the application (`proxy:` in the config), as in
//! LiteFS, plus write forwarding between proxies:
//!
//! - `GET /litefs/health`: 200 on the primary; on a replica 503 when it never heard
//!   from its primary, or its lag (or the time since it last heard from the primary)
//!   exceeds `max-lag`.
//! - Paths matching `passthrough` go straight to the target.
//! - A read (GET, HEAD) on a replica carrying the `__txid` cookie waits until
//!   `proxy.db` reaches that TXID; 504 after [`TXID_WAIT`].
//! - A write (any other method, or a path matching `always-forward`) on the primary
//!   goes to the target and its response gets `Set-Cookie: __txid=<TXID after it>`;
//!   on a replica it is forwarded to the primary's proxy: the host of the primary's
//!   advertise URL with this node's proxy port, marked with [`FORWARDED_HEADER`]. A
//!   forwarded request reaching a node that is not the primary is answered 503, so
//!   requests never loop. With no primary known, a write waits up to
//!   `primary-redirect-timeout` for one, then gets 503.
//!
//! [`serve`] is the accept loop enforcing the four server timeouts.

pub mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::ProxyConfig;
use crate::store::Store;
use crate::transports::http::ops::NodeInfo;
use serve::{BoxError, Deadlines, ProxyBody, Timeouts};

/// How long a read waits for the TXID of its `__txid` cookie (LiteFS: 5 s).
pub const TXID_WAIT: Duration = Duration::from_secs(5);
/// Name of the read-your-writes cookie.
pub const TXID_COOKIE: &str = "__txid";
/// Marks a request forwarded by a replica's proxy to the primary's.
pub const FORWARDED_HEADER: &str = "litefs-forwarded";
/// Lifetime of the `__txid` cookie (LiteFS: 5 minutes).
const COOKIE_MAX_AGE_SECS: u64 = 300;

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `proxy.addr` is not `host:port`.
    #[error("proxy.addr {addr:?}: {source}")]
    Addr {
        /// The configured address.
        addr: String,
        /// Parse error.
        source: std::net::AddrParseError,
    },
    /// `proxy.addr` cannot be bound.
    #[error("binding proxy.addr {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The HTTP client cannot be built.
    #[error("building the proxy's HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// A running proxy's shared state.
struct Proxy {
    target: String,
    db: String,
    port: u16,
    max_lag: Duration,
    primary_redirect_timeout: Duration,
    passthrough: Vec<String>,
    always_forward: Vec<String>,
    store: Arc<Store>,
    info: Arc<NodeInfo>,
    client: reqwest::Client,
}

/// Starts the proxy when `proxy.addr` is set; it serves until `stop` turns true.
///
/// # Errors
/// When the address cannot be parsed or bound, or the HTTP client cannot be built.
pub async fn start(
    cfg: &ProxyConfig,
    store: Arc<Store>,
    info: Arc<NodeInfo>,
    stop: watch::Receiver<bool>,
) -> Result<Option<JoinHandle<()>>, ProxyError> {
    let Some(addr) = cfg.addr.as_deref() else {
        return Ok(None);
    };
    let sock = crate::transports::http::parse_addr(addr).map_err(|source| ProxyError::Addr {
        addr: addr.to_string(),
        source,
    })?;
    let listener = TcpListener::bind(sock)
        .await
        .map_err(|source| ProxyError::Bind { addr: sock, source })?;
    let port = listener.local_addr().map_or(sock.port(), |a| a.port());
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .build()?;
    let proxy = Arc::new(Proxy {
        target: cfg.target.clone().unwrap_or_default(),
        db: cfg.db.clone().unwrap_or_default(),
        port,
        max_lag: cfg.max_lag,
        primary_redirect_timeout: cfg.primary_redirect_timeout,
        passthrough: cfg.passthrough.clone(),
        always_forward: cfg.always_forward.clone(),
        store,
        info,
        client,
    });
    let timeouts = Timeouts {
        read: cfg.read_timeout,
        read_header: cfg.read_header_timeout,
        write: cfg.write_timeout,
        idle: cfg.idle_timeout,
    };
    info!(addr = %sock, target = proxy.target, db = proxy.db, "proxy listening");
    let handler = move |req, deadlines| {
        let p = proxy.clone();
        async move { p.handle(req, deadlines).await }
    };
    Ok(Some(tokio::spawn(serve::serve(
        listener, timeouts, handler, stop,
    ))))
}

/// A small text response.
fn text(status: StatusCode, msg: impl Into<String>) -> Response<ProxyBody> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = Response::new(
        Full::new(Bytes::from(msg))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether `path` matches one of `patterns` (`*` matches any run of characters).
fn matches_any(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|p| glob(p.as_bytes(), path.as_bytes()))
}

fn glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

/// The `__txid` cookie's TXID, if the request has a valid one.
fn txid_cookie(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == TXID_COOKIE)
        .and_then(|(_, v)| u64::from_str_radix(v.trim(), 16).ok())
}

/// Headers that belong to one connection, not to the request or response.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Where a request goes.
enum Route {
    Target,
    Primary(String),
}

/// Why a request could not be proxied.
enum Failure {
    /// The request body did not arrive within `read-timeout`.
    ReadTimeout,
    /// The target or the primary's proxy could not be reached.
    Upstream(String),
}

impl Proxy {
    async fn handle(&self, req: Request<Incoming>, deadlines: Deadlines) -> Response<ProxyBody> {
        let path = req.uri().path().to_string();
        if path == "/litefs/health" {
            return self.health();
        }
        if matches_any(&self.passthrough, &path) {
            return self.send(req, Route::Target, deadlines, false).await;
        }
        let is_read = matches!(*req.method(), Method::GET | Method::HEAD)
            && !matches_any(&self.always_forward, &path);
        let forwarded = req.headers().contains_key(FORWARDED_HEADER);
        let primary = self.store.is_primary();
        if forwarded && !primary {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "forwarded write reached a node that is not the primary",
            );
        }
        if is_read {
            if !primary
                && let Some(txid) = txid_cookie(req.headers())
                && !self.wait_for_txid(txid).await
            {
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("database {} did not reach TXID {txid:016x}", self.db),
                );
            }
            return self.send(req, Route::Target, deadlines, false).await;
        }
        if primary {
            return self.send(req, Route::Target, deadlines, true).await;
        }
        match self.wait_for_primary().await {
            Some(url) => self.send(req, Route::Primary(url), deadlines, false).await,
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no primary known to forward the write to",
            ),
        }
    }

    fn health(&self) -> Response<ProxyBody> {
        if self.store.is_primary() {
            return text(StatusCode::OK, "OK");
        }
        let Some(lag) = self.info.lag() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "never heard from the primary",
            );
        };
        let Some(heard) = lag.since_heard() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "never heard from the primary",
            );
        };
        let behind = Duration::from_millis(lag.millis()).max(heard);
        if behind > self.max_lag {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("lag {behind:?} exceeds max-lag {:?}", self.max_lag),
            );
        }
        text(StatusCode::OK, "OK")
    }

    /// `http://<host of the primary's advertise URL>:<this proxy's port>`.
    fn primary_proxy_url(&self) -> Option<String> {
        let (_, url) = self.info.primary()?;
        let url = reqwest::Url::parse(&url).ok()?;
        let host = url.host_str()?;
        Some(if host.contains(':') {
            format!("http://[{host}]:{}", self.port)
        } else {
            format!("http://{host}:{}", self.port)
        })
    }

    /// The primary's proxy URL, waiting up to `primary-redirect-timeout` for a primary
    /// to be known (an elected cluster between two leaders).
    async fn wait_for_primary(&self) -> Option<String> {
        let deadline = tokio::time::Instant::now() + self.primary_redirect_timeout;
        loop {
            if let Some(url) = self.primary_proxy_url() {
                return Some(url);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `proxy.db` reaches `txid`; false after [`TXID_WAIT`].
    async fn wait_for_txid(&self, txid: u64) -> bool {
        let mut changes = self.store.subscribe_changes();
        let reached = || {
            self.store
                .db(&self.db)
                .is_some_and(|d| d.pos().txid.0 >= txid)
        };
        let wait = async {
            while !reached() {
                // A closed channel (store gone) cannot change anything: give up.
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(TXID_WAIT, wait).await.is_ok()
    }

    fn txid(&self) -> u64 {
        self.store.db(&self.db).map_or(0, |d| d.pos().txid.0)
    }

    /// Sends the request to the target or the primary's proxy and streams the answer
    /// back; with `cookie`, the response carries the TXID after the request.
    async fn send(
        &self,
        req: Request<Incoming>,
        route: Route,
        deadlines: Deadlines,
        cookie: bool,
    ) -> Response<ProxyBody> {
        match self.try_send(req, route, deadlines, cookie).await {
            Ok(r) => r,
            Err(Failure::ReadTimeout) => {
                let mut r = text(StatusCode::REQUEST_TIMEOUT, "request body timed out");
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                r
            }
            Err(Failure::Upstream(m)) => text(StatusCode::BAD_GATEWAY, m),
        }
    }

    async fn try_send(
        &self,
        req: Request<Incoming>,
        route: Route,
        deadlines: Deadlines,
        cookie: bool,
    ) -> Result<Response<ProxyBody>, Failure> {
        let (parts, body) = req.into_parts();
        let path_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let (url, forwarding) = match &route {
            Route::Target => (format!("http://{}{path_query}", self.target), false),
            Route::Primary(base) => (format!("{base}{path_query}"), true),
        };
        debug!(method = %parts.method, url, "proxying");
        let mut headers = HeaderMap::new();
        for (k, v) in &parts.headers {
            if !is_hop_by_hop(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        if forwarding {
            headers.insert(
                HeaderName::from_static(FORWARDED_HEADER),
                HeaderValue::from(self.info.node_id),
            );
        }
        let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let has_body = !hyper::body::Body::is_end_stream(&body);
        let mut rb = self
            .client
            .request(parts.method.clone(), &url)
            .headers(headers);
        if has_body {
            rb = rb.body(reqwest::Body::wrap_stream(request_body(
                body,
                deadlines.read,
                timed_out.clone(),
            )));
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(_) if timed_out.load(std::sync::atomic::Ordering::Acquire) => {
                return Err(Failure::ReadTimeout);
            }
            Err(e) => {
                warn!(url, error = %e, "proxy: upstream request failed");
                return Err(Failure::Upstream(format!("cannot reach {url}: {e}")));
            }
        };
        let status = resp.status();
        let mut out_headers = HeaderMap::new();
        for (k, v) in resp.headers() {
            if !is_hop_by_hop(k) {
                out_headers.append(k.clone(), v.clone());
            }
        }
        if cookie && status.as_u16() < 500 {
            let v = format!(
                "{TXID_COOKIE}={:016x}; Path=/; Max-Age={COOKIE_MAX_AGE_SECS}; HttpOnly",
                self.txid()
            );
            if let Ok(v) = HeaderValue::from_str(&v) {
                out_headers.append(header::SET_COOKIE, v);
            }
        }
        let stream = resp
            .bytes_stream()
            .map(|r| r.map(Frame::data).map_err(|e| -> BoxError { Box::new(e) }));
        let mut out = Response::new(StreamBody::new(stream).boxed_unsync());
        *out.status_mut() = status;
        *out.headers_mut() = out_headers;
        Ok(out)
    }
}

/// The client's request body as a stream of bytes that fails at the read deadline
/// (setting `timed_out`).
fn request_body(
    body: Incoming,
    deadline: Option<tokio::time::Instant>,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    let frames = BodyStream::new(body);
    futures_util::stream::unfold(
        (frames, deadline, timed_out),
        |(mut frames, deadline, timed_out)| async move {
            loop {
                let next = match deadline {
                    Some(at) => match tokio::time::timeout_at(at, frames.next()).await {
                        Ok(n) => n,
                        Err(_) => {
                            timed_out.store(true, std::sync::atomic::Ordering::Release);
                            let e: BoxError = "read timeout".into();
                            return Some((Err(e), (frames, deadline, timed_out)));
                        }
                    },
                    None => frames.next().await,
                };
                match next {
                    None => return None,
                    Some(Err(e)) => {
                        return Some((Err(Box::new(e) as BoxError), (frames, deadline, timed_out)));
                    }
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            return Some((Ok(data), (frames, deadline, timed_out)));
                        }
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_cookies() {
        assert!(glob(b"/static/*", b"/static/a/b.css"));
        assert!(glob(b"*.png", b"/x/y.png"));
        assert!(!glob(b"/static/*", b"/api/x"));
        assert!(glob(b"/exact", b"/exact"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __txid=00000000000000ff; b=2"),
        );
        assert_eq!(txid_cookie(&h), Some(255));
        h.insert(header::COOKIE, HeaderValue::from_static("__txid=zz"));
        assert_eq!(txid_cookie(&h), None);
    }
}
