//! The Consul leaser: a session with a TTL and a KV lock, as LiteFS does it.
//!
//! `lease.type: consul`. Acquiring creates a session (`TTL` default 10s, `LockDelay`
//! default 1s, `Behavior: delete`, no health checks) and acquires `lease.consul.key`
//! with that session, storing this node's [`PrimaryInfo`] as the key's JSON value.
//! Renewing renews the session; releasing releases the key (which empties its
//! value, so readers see no primary at once and no lock-delay applies) and destroys
//! the session. A crashed holder's session expires after its TTL; Consul then deletes
//! the key (behaviour `delete`) and refuses to hand it out for the lock-delay.
//!
//! The URL is read as LiteFS reads it: a password in it is the ACL token (otherwise
//! `CONSUL_HTTP_TOKEN`), and a path is a prefix put in front of the key
//! (`http://:tok@consul:8500/apps/a` with key `litefs/primary` locks
//! `apps/a/litefs/primary`). Unlike LiteFS, no catalog node is registered for a
//! prefix: the session belongs to the agent's own node, which is what a session
//! without health checks needs.
//!
//! # Who renews
//!
//! Nothing here runs in the background. The node calls [`Lease::renew`] every TTL/2
//! (the [`crate::lease`] contract keeps the schedule in the node); each call renews
//! the session and checks that the key is still held by it.
//!
//! # Why a small client
//!
//! `consulrs` is unmaintained (reqwest 0.11) and `rs-consul` cannot renew a session;
//! the five endpoints used here are a few lines each over `reqwest`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;

use crate::config::LeaseConfig;
use crate::lease::{Lease, LeaseError, Leaser, PrimaryInfo};

use super::BuildError;

const BACKEND: &str = "consul";

/// Session name, as LiteFS names its sessions.
pub const SESSION_NAME: &str = "litefs";

/// An HTTP answer from Consul that is neither success nor a documented "no".
#[derive(Debug, thiserror::Error)]
#[error("consul answered {status} to {method} {path}: {body}")]
pub struct ConsulHttpError {
    /// HTTP status.
    pub status: StatusCode,
    /// Request method.
    pub method: Method,
    /// Request path (no query: it may hold a session id only, but keep logs short).
    pub path: String,
    /// Response body, trimmed.
    pub body: String,
}

/// [`Leaser`] for `lease.type: consul`.
#[derive(Debug, Clone)]
pub struct ConsulLeaser {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// `scheme://host:port/`: user info and path are taken out.
    base: Url,
    token: Option<String>,
    /// Full KV key: URL path prefix joined with `lease.consul.key`.
    key: String,
    node: PrimaryInfo,
    candidate: bool,
    ttl: Duration,
    lock_delay: Duration,
    /// Timeout of one non-blocking request; short enough that a renewal that hangs
    /// is noticed well before the lease expires.
    request_timeout: Duration,
}

/// One entry of a KV read (`GET /v1/kv/<key>`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntry {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionCreated {
    #[serde(rename = "ID")]
    id: String,
}

impl ConsulLeaser {
    /// Builds a leaser from a validated `lease` section. `env_token` is the value of
    /// `CONSUL_HTTP_TOKEN` (used when the URL carries no password).
    ///
    /// # Errors
    /// [`BuildError::Invalid`] for a URL that does not parse or is not http(s), or an
    /// empty key; [`BuildError::Backend`] if the HTTP client cannot be built.
    pub fn new(cfg: &LeaseConfig, env_token: Option<String>) -> Result<Self, BuildError> {
        let c = &cfg.consul;
        let url = Url::parse(&c.url).map_err(|e| BuildError::Invalid {
            key: "lease.consul.url",
            message: format!("'{}' is not a URL: {e}", c.url),
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(BuildError::Invalid {
                key: "lease.consul.url",
                message: format!("'{}' must be an http:// or https:// URL with a host", c.url),
            });
        }
        if c.key.trim_matches('/').is_empty() {
            return Err(BuildError::Invalid {
                key: "lease.consul.key",
                message: "is required for a consul lease, e.g. litefs/my-app".to_string(),
            });
        }
        let token = url
            .password()
            .map(|p| {
                percent_encoding::percent_decode_str(p)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .filter(|t| !t.is_empty())
            .or(env_token.filter(|t| !t.is_empty()));
        let prefix = url.path().trim_matches('/');
        let key = if prefix.is_empty() {
            c.key.trim_matches('/').to_string()
        } else {
            format!("{prefix}/{}", c.key.trim_matches('/'))
        };
        let mut base = url.clone();
        base.set_path("/");
        base.set_query(None);
        base.set_fragment(None);
        // Cannot fail for an http(s) URL with a host.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| BuildError::Backend {
                key: "lease.consul.url",
                message: format!("cannot build an HTTP client: {e}"),
            })?;
        // A renewal is two requests; together they end within TTL/2, so a renewal
        // started at TTL/2 reports a hung store before the lease runs out.
        let request_timeout =
            (c.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        Ok(ConsulLeaser {
            inner: Arc::new(Inner {
                http,
                base,
                token,
                key,
                node: PrimaryInfo {
                    hostname: cfg.hostname.clone(),
                    advertise_url: cfg.advertise_url.clone(),
                },
                candidate: cfg.candidate,
                ttl: c.ttl,
                lock_delay: c.lock_delay,
                request_timeout,
            }),
        })
    }

    /// The full KV key of the lock (prefix from the URL path, then `lease.consul.key`).
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The ACL token sent with every request, if any.
    pub fn token(&self) -> Option<&str> {
        self.inner.token.as_deref()
    }

    /// The session TTL asked for.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }
}

impl Inner {
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            for s in segments {
                path.extend(s.split('/'));
            }
        }
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        url
    }

    /// Sends one request. Transport failures and 5xx answers are
    /// [`LeaseError::Unavailable`]; other answers are returned with their body.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Option<u64>, bytes::Bytes), LeaseError> {
        let path = url.path().to_string();
        let mut req = self.http.request(method.clone(), url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let unavailable = |e: reqwest::Error| LeaseError::Unavailable {
            backend: BACKEND,
            source: Box::new(e),
        };
        let resp = req.send().await.map_err(unavailable)?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp.bytes().await.map_err(unavailable)?;
        if status.is_server_error() {
            return Err(LeaseError::Unavailable {
                backend: BACKEND,
                source: Box::new(ConsulHttpError {
                    status,
                    method,
                    path,
                    body: String::from_utf8_lossy(&bytes).trim().to_string(),
                }),
            });
        }
        Ok((status, index, bytes))
    }

    /// Like [`Inner::send`], but anything other than 200 is an error.
    async fn send_ok(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, LeaseError> {
        let path = url.path().to_string();
        let (status, _, bytes) = self
            .send(method.clone(), url, body, self.request_timeout)
            .await?;
        if status != StatusCode::OK {
            return Err(http_error(status, method, path, &bytes));
        }
        Ok(bytes)
    }

    /// `GET /v1/kv/<key>`: the entry (`None`: no such key) and the store's index.
    async fn read_entry(
        &self,
        key: &str,
        query: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(Option<KvEntry>, u64), LeaseError> {
        let url = self.url(&["v1/kv", key], query);
        let path = url.path().to_string();
        let (status, index, bytes) = self.send(Method::GET, url, None, timeout).await?;
        let index = index.unwrap_or(0);
        match status {
            StatusCode::NOT_FOUND => Ok((None, index)),
            StatusCode::OK => {
                let mut entries: Vec<KvEntry> =
                    serde_json::from_slice(&bytes).map_err(|e| LeaseError::Protocol {
                        backend: BACKEND,
                        message: format!("GET {path}: not a KV entry list: {e}"),
                    })?;
                Ok((entries.pop(), index))
            }
            _ => Err(http_error(status, Method::GET, path, &bytes)),
        }
    }

    async fn read_key(
        &self,
        query: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(Option<PrimaryInfo>, u64), LeaseError> {
        let (entry, index) = self.read_entry(&self.key, query, timeout).await?;
        let Some(entry) = entry else {
            return Ok((None, index));
        };
        // A key without a session is not locked: its last holder released it.
        if entry.session.is_none() {
            return Ok((None, index));
        }
        let value = match entry.value {
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|e| LeaseError::Protocol {
                    backend: BACKEND,
                    message: format!("key {}: value is not base64: {e}", self.key),
                })?,
            None => Vec::new(),
        };
        if value.is_empty() {
            return Ok((None, index));
        }
        let info = serde_json::from_slice(&value).map_err(|e| LeaseError::Protocol {
            backend: BACKEND,
            message: format!(
                "key {}: value is not {{\"hostname\",\"advertise-url\"}} JSON: {e}",
                self.key
            ),
        })?;
        Ok((Some(info), index))
    }

    async fn create_session(&self) -> Result<String, LeaseError> {
        let body = serde_json::json!({
            "Name": SESSION_NAME,
            "Behavior": "delete",
            "TTL": format!("{}ms", self.ttl.as_millis()),
            "LockDelay": format!("{}ms", self.lock_delay.as_millis()),
            "Checks": [],
            "NodeChecks": [],
        });
        let bytes = self
            .send_ok(
                Method::PUT,
                self.url(&["v1/session/create"], &[]),
                Some(body.to_string().into_bytes()),
            )
            .await?;
        let created: SessionCreated =
            serde_json::from_slice(&bytes).map_err(|e| LeaseError::Protocol {
                backend: BACKEND,
                message: format!("session create: unexpected answer: {e}"),
            })?;
        Ok(created.id)
    }

    async fn destroy_session(&self, id: &str) -> Result<(), LeaseError> {
        self.send_ok(
            Method::PUT,
            self.url(&["v1/session/destroy", id], &[]),
            None,
        )
        .await?;
        Ok(())
    }

    /// `PUT /v1/kv/<key>?acquire=|release=`: Consul answers `true` or `false`.
    async fn lock_op(&self, op: &str, session: &str, value: Vec<u8>) -> Result<bool, LeaseError> {
        let bytes = self
            .send_ok(
                Method::PUT,
                self.url(&["v1/kv", &self.key], &[(op, session.to_string())]),
                Some(value),
            )
            .await?;
        match bytes.trim_ascii() {
            b"true" => Ok(true),
            b"false" => Ok(false),
            other => Err(LeaseError::Protocol {
                backend: BACKEND,
                message: format!(
                    "kv {op}: expected true or false, got {:?}",
                    String::from_utf8_lossy(other)
                ),
            }),
        }
    }
}

fn http_error(status: StatusCode, method: Method, path: String, body: &[u8]) -> LeaseError {
    LeaseError::Protocol {
        backend: BACKEND,
        message: ConsulHttpError {
            status,
            method,
            path,
            body: String::from_utf8_lossy(body).trim().to_string(),
        }
        .to_string(),
    }
}

#[async_trait]
impl Leaser for ConsulLeaser {
    fn type_name(&self) -> &'static str {
        BACKEND
    }

    fn node_info(&self) -> &PrimaryInfo {
        &self.inner.node
    }

    fn candidate(&self) -> bool {
        self.inner.candidate
    }

    /// Reads the key: a holder exists when the key is locked by a session and has a
    /// value.
    async fn primary_info(&self) -> Result<Option<PrimaryInfo>, LeaseError> {
        let (info, _) = self.inner.read_key(&[], self.inner.request_timeout).await?;
        Ok(info)
    }

    /// A Consul blocking query on the key (`?index=&wait=`): the token is Consul's
    /// `X-Consul-Index`. Consul may answer early without a change, and answers no
    /// later than `wait` plus a sixteenth of it.
    async fn watch_primary(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<PrimaryInfo>, u64), LeaseError> {
        let wait_ms = wait.as_millis().max(1);
        let query = [
            ("index", index.to_string()),
            ("wait", format!("{wait_ms}ms")),
        ];
        let timeout = wait + wait / 16 + self.inner.request_timeout;
        self.inner.read_key(&query, timeout).await
    }

    async fn acquire(&self) -> Result<Box<dyn Lease>, LeaseError> {
        let inner = &self.inner;
        if !inner.candidate {
            return Err(LeaseError::NotCandidate { backend: BACKEND });
        }
        let started = Instant::now();
        let session = inner.create_session().await?;
        let value = encode_node(&inner.node)?;
        let acquired = match inner.lock_op("acquire", &session, value).await {
            Ok(acquired) => acquired,
            Err(e) => {
                // Best effort: the session would expire after its TTL anyway.
                let _ = inner.destroy_session(&session).await;
                return Err(e);
            }
        };
        if !acquired {
            if let Err(e) = inner.destroy_session(&session).await {
                tracing::debug!(session = %session, error = %e, "consul: could not destroy an unused session");
            }
            return match inner.read_key(&[], inner.request_timeout).await? {
                (Some(primary), _) => Err(LeaseError::PrimaryExists {
                    backend: BACKEND,
                    primary,
                }),
                (None, _) => Err(LeaseError::Busy {
                    backend: BACKEND,
                    reason: format!(
                        "key {} refused to session {session} (lock-delay after the last holder's session ended, or another candidate got there first)",
                        inner.key
                    ),
                }),
            };
        }
        tracing::info!(key = %inner.key, session = %session, "consul: lease acquired");
        Ok(Box::new(ConsulLease {
            inner: Arc::clone(inner),
            id: session,
            expires_at: Mutex::new(started + inner.ttl),
            released: AtomicBool::new(false),
        }))
    }

    async fn cluster_id(&self) -> Result<Option<String>, LeaseError> {
        let key = format!("{}/clusterid", self.inner.key);
        let (entry, _) = self
            .inner
            .read_entry(&key, &[], self.inner.request_timeout)
            .await?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(entry.value.unwrap_or_default().as_bytes())
            .map_err(|e| LeaseError::Protocol {
                backend: BACKEND,
                message: format!("key {key}: value is not base64: {e}"),
            })?;
        Ok(Some(String::from_utf8_lossy(&raw).trim().to_string()))
    }

    /// `PUT ?cas=0` (only if absent), then reads back whichever id is stored.
    async fn set_cluster_id_if_absent(&self, id: &str) -> Result<String, LeaseError> {
        let key = format!("{}/clusterid", self.inner.key);
        let url = self
            .inner
            .url(&["v1/kv", &key], &[("cas", "0".to_string())]);
        self.inner
            .send_ok(Method::PUT, url, Some(id.as_bytes().to_vec()))
            .await?;
        self.cluster_id()
            .await?
            .ok_or_else(|| LeaseError::Protocol {
                backend: BACKEND,
                message: format!("key {key} not readable after it was written"),
            })
    }

    /// Takes over the session a former holder handed over: it must still exist and
    /// still hold the key; the key's value then names this node.
    async fn acquire_existing(&self, lease_id: &str) -> Result<Box<dyn Lease>, LeaseError> {
        if !self.inner.candidate {
            return Err(LeaseError::NotCandidate { backend: BACKEND });
        }
        let lease = ConsulLease {
            inner: Arc::clone(&self.inner),
            id: lease_id.to_string(),
            expires_at: Mutex::new(Instant::now()),
            released: AtomicBool::new(false),
        };
        lease.renew().await?;
        // The session already holds the key: acquiring again with it only rewrites
        // the value, so that every node now reads this node as the primary.
        let value = encode_node(&self.inner.node)?;
        if !self.inner.lock_op("acquire", lease_id, value).await? {
            return Err(lease.lost(format!(
                "key {} was taken from session {lease_id} during the handoff",
                self.inner.key
            )));
        }
        tracing::info!(key = %self.inner.key, session = %lease_id, "consul: lease taken over by handoff");
        Ok(Box::new(lease))
    }
}

fn encode_node(node: &PrimaryInfo) -> Result<Vec<u8>, LeaseError> {
    serde_json::to_vec(node).map_err(|e| LeaseError::Protocol {
        backend: BACKEND,
        message: format!("cannot encode this node's identity: {e}"),
    })
}

/// A held Consul lock: the session id and the instant it is known valid until.
#[derive(Debug)]
pub struct ConsulLease {
    inner: Arc<Inner>,
    id: String,
    expires_at: Mutex<Instant>,
    released: AtomicBool,
}

impl ConsulLease {
    fn lost(&self, reason: String) -> LeaseError {
        LeaseError::Lost {
            backend: BACKEND,
            lease_id: self.id.clone(),
            reason,
        }
    }
}

#[async_trait]
impl Lease for ConsulLease {
    /// The Consul session id.
    fn id(&self) -> &str {
        &self.id
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.inner.ttl)
    }

    fn expires_at(&self) -> Option<Instant> {
        Some(*self.expires_at.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Renews the session (`PUT /v1/session/renew/<id>`), then checks the key is
    /// still locked by it (an operator may have deleted it).
    async fn renew(&self) -> Result<(), LeaseError> {
        if self.released.load(Ordering::SeqCst) {
            return Err(self.lost("the lease was released".to_string()));
        }
        let inner = &self.inner;
        let started = Instant::now();
        let url = inner.url(&["v1/session/renew", &self.id], &[]);
        let path = url.path().to_string();
        let (status, _, bytes) = inner
            .send(Method::PUT, url, None, inner.request_timeout)
            .await?;
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(self.lost(format!(
                    "session is gone (expired or destroyed): {}",
                    String::from_utf8_lossy(&bytes).trim()
                )));
            }
            _ => return Err(http_error(status, Method::PUT, path, &bytes)),
        }
        let (entry, _) = inner
            .read_entry(&inner.key, &[], inner.request_timeout)
            .await?;
        match entry.and_then(|e| e.session) {
            Some(s) if s == self.id => {}
            Some(other) => {
                return Err(self.lost(format!("key {} is held by session {other}", inner.key)));
            }
            None => {
                return Err(self.lost(format!("key {} is no longer locked", inner.key)));
            }
        }
        let mut expires = self.expires_at.lock().unwrap_or_else(|p| p.into_inner());
        *expires = (*expires).max(started + inner.ttl);
        Ok(())
    }

    /// Releases the key (emptying its value) and destroys the session.
    async fn release(&self) -> Result<(), LeaseError> {
        if self.released.load(Ordering::SeqCst) {
            return Ok(());
        }
        let inner = &self.inner;
        if !inner.lock_op("release", &self.id, Vec::new()).await? {
            tracing::warn!(key = %inner.key, session = %self.id, "consul: key was not held by this session at release");
        }
        inner.destroy_session(&self.id).await?;
        self.released.store(true, Ordering::SeqCst);
        tracing::info!(key = %inner.key, session = %self.id, "consul: lease released");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LeaseType;

    fn cfg(url: &str, key: &str) -> LeaseConfig {
        let mut cfg = LeaseConfig {
            kind: Some(LeaseType::Consul),
            hostname: "n1".into(),
            advertise_url: "http://n1:20202".into(),
            ..LeaseConfig::default()
        };
        cfg.consul.url = url.into();
        cfg.consul.key = key.into();
        cfg
    }

    #[test]
    fn url_password_is_the_token_and_path_is_a_key_prefix() {
        let l = ConsulLeaser::new(
            &cfg("http://:s%40cret@consul:8500/apps/one/", "litefs/primary"),
            Some("from-env".into()),
        )
        .unwrap();
        assert_eq!(l.key(), "apps/one/litefs/primary");
        assert_eq!(l.token(), Some("s@cret"));
        assert_eq!(l.inner.base.as_str(), "http://consul:8500/");
        assert_eq!(
            l.inner
                .url(&["v1/kv", l.key()], &[("acquire", "a b".into())])
                .as_str(),
            "http://consul:8500/v1/kv/apps/one/litefs/primary?acquire=a+b"
        );
    }

    #[test]
    fn env_token_when_the_url_has_none_and_no_prefix() {
        let l =
            ConsulLeaser::new(&cfg("http://consul:8500", "litefs"), Some("env".into())).unwrap();
        assert_eq!(l.key(), "litefs");
        assert_eq!(l.token(), Some("env"));
        let l = ConsulLeaser::new(&cfg("http://consul:8500", "litefs"), None).unwrap();
        assert_eq!(l.token(), None);
    }

    #[test]
    fn bad_urls_are_refused_with_the_key_named() {
        for url in ["consul:8500", "ftp://consul/", "not a url"] {
            let err = ConsulLeaser::new(&cfg(url, "k"), None).unwrap_err();
            assert!(
                matches!(
                    err,
                    BuildError::Invalid {
                        key: "lease.consul.url",
                        ..
                    }
                ),
                "{url}: {err}"
            );
        }
        let err = ConsulLeaser::new(&cfg("http://c:8500", "/"), None).unwrap_err();
        assert!(matches!(
            err,
            BuildError::Invalid {
                key: "lease.consul.key",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn unreachable_consul_is_retryable_unavailable() {
        // A port nothing listens on: bind, take the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let l = ConsulLeaser::new(&cfg(&format!("http://127.0.0.1:{port}"), "k"), None).unwrap();
        let err = l.primary_info().await.unwrap_err();
        assert!(matches!(err, LeaseError::Unavailable { .. }), "{err}");
        assert!(err.is_retryable());
        let err = l.acquire().await.unwrap_err();
        assert!(matches!(err, LeaseError::Unavailable { .. }), "{err}");
    }
}
