//! Write forwarding over HTTP (protocol in `docs/design.md`, "Write forwarding"):
//! `POST /halt`, `DELETE /halt` and `POST /tx` on the primary, served from the node's
//! [`HaltRegistry`], and [`HttpHaltClient`], the replica's side.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::ops::{NodeInfo, OpsState};
use crate::halt::{ACQUIRE_WAIT, HaltClient, HaltError, HaltGrant, HaltRegistry};
use crate::ltx::{Checksum, Pos, TxId};

/// `?name=DB[&id=ID]`.
#[derive(Debug, Deserialize)]
pub(crate) struct HaltQuery {
    name: String,
    id: Option<u64>,
}

/// The answer to `POST /halt`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HaltAnswer {
    /// The lock id, for `/tx` and `DELETE /halt`.
    pub id: u64,
    /// The primary's TXID of the database, 16 hex digits.
    pub txid: String,
    /// Its post-apply checksum, 16 hex digits.
    pub checksum: String,
    /// How long the primary keeps the lock, in milliseconds.
    pub ttl_ms: u64,
}

/// The answer to `POST /tx`: the primary's new position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TxAnswer {
    /// TXID, 16 hex digits.
    pub txid: String,
    /// Post-apply checksum, 16 hex digits.
    pub checksum: String,
}

/// The HTTP status of each refusal.
fn status(e: &HaltError) -> StatusCode {
    match e {
        HaltError::NotPrimary => StatusCode::SERVICE_UNAVAILABLE,
        HaltError::NotFound(_) => StatusCode::NOT_FOUND,
        HaltError::Busy(_) => StatusCode::LOCKED,
        HaltError::NotHeld { .. } => StatusCode::CONFLICT,
        HaltError::Unsupported { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        HaltError::Stale { .. } => StatusCode::PRECONDITION_FAILED,
        HaltError::Invalid(_) => StatusCode::BAD_REQUEST,
        HaltError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        HaltError::Transport(_) => StatusCode::BAD_GATEWAY,
    }
}

fn refuse(e: HaltError) -> Response {
    warn!(error = %e, "write forwarding request refused");
    (status(&e), format!("{e}\n")).into_response()
}

fn registry(st: &OpsState) -> Result<Arc<HaltRegistry>, HaltError> {
    st.info
        .halt()
        .ok_or_else(|| HaltError::Transport("write forwarding is not ready".into()))
}

/// The registry and the lock id of a request that names one.
fn with_id(st: &OpsState, q: &HaltQuery) -> Result<(Arc<HaltRegistry>, u64), HaltError> {
    let id =
        q.id.ok_or_else(|| HaltError::Invalid("missing id".into()))?;
    Ok((registry(st)?, id))
}

fn hex(v: u64) -> String {
    format!("{v:016x}")
}

/// `POST /halt?name=DB`: takes DB's HALT lock (waits up to [`ACQUIRE_WAIT`]);
/// `POST /halt?name=DB&id=ID` renews it.
pub(crate) async fn post_halt(State(st): State<OpsState>, Query(q): Query<HaltQuery>) -> Response {
    let reg = match registry(&st) {
        Ok(r) => r,
        Err(e) => return refuse(e),
    };
    let granted = tokio::task::spawn_blocking(move || match q.id {
        Some(id) => reg.renew(&q.name, id),
        None => reg.acquire(&q.name),
    });
    match granted.await {
        Ok(Ok(g)) => axum::Json(HaltAnswer {
            id: g.id,
            txid: hex(g.pos.txid.0),
            checksum: hex(g.pos.post_apply_checksum.0),
            ttl_ms: g.ttl.as_millis() as u64,
        })
        .into_response(),
        Ok(Err(e)) => refuse(e),
        Err(e) => refuse(HaltError::Transport(e.to_string())),
    }
}

/// `DELETE /halt?name=DB&id=ID`.
pub(crate) async fn delete_halt(
    State(st): State<OpsState>,
    Query(q): Query<HaltQuery>,
) -> Response {
    let (reg, id) = match with_id(&st, &q) {
        Ok(v) => v,
        Err(e) => return refuse(e),
    };
    match tokio::task::spawn_blocking(move || reg.release(&q.name, id)).await {
        Ok(Ok(())) => (StatusCode::OK, "released\n").into_response(),
        Ok(Err(e)) => refuse(e),
        Err(e) => refuse(HaltError::Transport(e.to_string())),
    }
}

/// `POST /tx?name=DB&id=ID` with one LTX file.
pub(crate) async fn post_tx(
    State(st): State<OpsState>,
    Query(q): Query<HaltQuery>,
    body: Bytes,
) -> Response {
    let (reg, id) = match with_id(&st, &q) {
        Ok(v) => v,
        Err(e) => return refuse(e),
    };
    match tokio::task::spawn_blocking(move || reg.apply(&q.name, id, body.to_vec())).await {
        Ok(Ok(pos)) => axum::Json(TxAnswer {
            txid: hex(pos.txid.0),
            checksum: hex(pos.post_apply_checksum.0),
        })
        .into_response(),
        Ok(Err(e)) => refuse(e),
        Err(e) => refuse(HaltError::Transport(e.to_string())),
    }
}

/// The replica's side: blocking requests to the current primary (its advertise URL
/// in [`NodeInfo`]), with the node's auth token.
pub struct HttpHaltClient {
    /// Built at the first request: a node that never forwards never pays for it (and
    /// start-up, which races with failovers, stays as fast as it was).
    client: std::sync::OnceLock<reqwest::Client>,
    info: Arc<NodeInfo>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for HttpHaltClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpHaltClient").finish_non_exhaustive()
    }
}

impl HttpHaltClient {
    /// A client running its requests on `rt` (call its methods from threads outside
    /// the runtime, such as the mount's request threads).
    pub fn new(info: Arc<NodeInfo>, rt: tokio::runtime::Handle) -> Self {
        HttpHaltClient {
            client: std::sync::OnceLock::new(),
            info,
            rt,
        }
    }

    fn client(&self) -> Result<&reqwest::Client, HaltError> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(v) = self.info.auth_token.as_deref().and_then(super::ops::bearer) {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let c = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .default_headers(headers)
            .build()
            .map_err(|e| HaltError::Transport(format!("building the HTTP client: {e}")))?;
        Ok(self.client.get_or_init(|| c))
    }

    fn url(&self, path: &str, db: &str, id: Option<u64>) -> Result<reqwest::Url, HaltError> {
        let (_, base) = self
            .info
            .primary()
            .ok_or_else(|| HaltError::Transport("no primary known".into()))?;
        let mut url = reqwest::Url::parse(&format!("{}{path}", base.trim_end_matches('/')))
            .map_err(|e| HaltError::Transport(format!("primary URL {base:?}: {e}")))?;
        url.query_pairs_mut().append_pair("name", db);
        if let Some(id) = id {
            url.query_pairs_mut().append_pair("id", &id.to_string());
        }
        Ok(url)
    }

    /// Sends and returns the body of a 2xx answer; maps a refusal to [`HaltError`].
    fn send(&self, db: &str, req: reqwest::RequestBuilder) -> Result<Bytes, HaltError> {
        self.rt.block_on(async {
            let resp = req
                .send()
                .await
                .map_err(|e| HaltError::Transport(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .bytes()
                .await
                .map_err(|e| HaltError::Transport(e.to_string()))?;
            if status.is_success() {
                return Ok(body);
            }
            let msg = String::from_utf8_lossy(&body).trim().to_string();
            Err(match status {
                StatusCode::LOCKED => HaltError::Busy(db.to_string()),
                _ => HaltError::Transport(format!("{status}: {msg}")),
            })
        })
    }
}

fn parse_hex(s: &str) -> Result<u64, HaltError> {
    u64::from_str_radix(s, 16).map_err(|e| HaltError::Transport(format!("bad hex {s:?}: {e}")))
}

fn parse_pos(txid: &str, checksum: &str) -> Result<Pos, HaltError> {
    Ok(Pos {
        txid: TxId(parse_hex(txid)?),
        post_apply_checksum: Checksum(parse_hex(checksum)?),
    })
}

impl HaltClient for HttpHaltClient {
    fn acquire(&self, db: &str) -> Result<HaltGrant, HaltError> {
        let url = self.url("/halt", db, None)?;
        let req = self
            .client()?
            .post(url)
            .timeout(ACQUIRE_WAIT + Duration::from_secs(5));
        let body = self.send(db, req)?;
        let a: HaltAnswer = serde_json::from_slice(&body)
            .map_err(|e| HaltError::Transport(format!("answer to POST /halt: {e}")))?;
        Ok(HaltGrant {
            id: a.id,
            pos: parse_pos(&a.txid, &a.checksum)?,
            ttl: Duration::from_millis(a.ttl_ms),
        })
    }

    fn renew(&self, db: &str, id: u64) -> Result<(), HaltError> {
        let url = self.url("/halt", db, Some(id))?;
        let req = self.client()?.post(url).timeout(Duration::from_secs(10));
        self.send(db, req).map(|_| ())
    }

    fn commit(&self, db: &str, id: u64, ltx: &[u8]) -> Result<Pos, HaltError> {
        let url = self.url("/tx", db, Some(id))?;
        let req = self
            .client()?
            .post(url)
            .timeout(Duration::from_secs(60))
            .header("content-type", "application/octet-stream")
            .body(ltx.to_vec());
        let body = self.send(db, req)?;
        let a: TxAnswer = serde_json::from_slice(&body)
            .map_err(|e| HaltError::Transport(format!("answer to POST /tx: {e}")))?;
        parse_pos(&a.txid, &a.checksum)
    }

    fn release(&self, db: &str, id: u64) -> Result<(), HaltError> {
        let url = self.url("/halt", db, Some(id))?;
        let req = self.client()?.delete(url).timeout(Duration::from_secs(10));
        self.send(db, req).map(|_| ())
    }
}
