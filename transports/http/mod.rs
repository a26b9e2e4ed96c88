//! The HTTP transport: `POST /stream` on the primary's `http.addr`, answered with a
//! chunked stream of binary frames (format in [`wire`] and `docs/design.md`).
//!
//! The server ([`serve`]) runs one task per connected replica
//! ([`crate::replicate::primary::serve`]) feeding a small bounded channel; the HTTP body
//! drains it. A slow replica fills only its own channel.

pub mod events;
pub mod halt;
pub mod handoff;
pub mod ops;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::replicate::primary;
use crate::store::Store;
use crate::transport::{Frame, FrameStream, StreamRequest, Transport, TransportError};

/// Content type of requests and streams.
pub const CONTENT_TYPE: &str = "application/x-litefs-stream";
/// A stream with no bytes for this long is dead (the primary sends a heartbeat every
/// second when idle).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Queued frames are joined into one body chunk up to this many bytes.
const COALESCE_BYTES: usize = 256 * 1024;
/// Frames buffered per replica before its stream task waits.
const CHANNEL_FRAMES: usize = 8;

/// Client side: connects to a primary's `/stream`.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
}

impl HttpTransport {
    /// A transport with a connect timeout of 5 s.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new() -> Result<Self, reqwest::Error> {
        Self::with_auth_token(None)
    }

    /// A transport that sends `Authorization: Bearer <token>` on every request.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn with_auth_token(token: Option<&str>) -> Result<Self, reqwest::Error> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(v) = token.and_then(ops::bearer) {
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        Ok(HttpTransport {
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .default_headers(headers)
                .build()?,
        })
    }
}

#[async_trait]
impl Transport for HttpTransport {
    fn type_name(&self) -> &'static str {
        "http"
    }

    async fn connect(
        &self,
        primary_url: &str,
        request: StreamRequest,
    ) -> Result<Box<dyn FrameStream>, TransportError> {
        let url = primary_url.trim_end_matches('/').to_string();
        let ours = request.cluster_id.clone();
        let resp = self
            .client
            .post(format!("{url}/stream"))
            .header("content-type", CONTENT_TYPE)
            .body(wire::encode_request(&request))
            .send()
            .await
            .map_err(|e| TransportError::Connect {
                url: url.clone(),
                source: Box::new(e),
            })?;
        let status = resp.status();
        if status == StatusCode::CONFLICT {
            let theirs = resp.text().await.unwrap_or_default().trim().to_string();
            return Err(TransportError::ClusterMismatch {
                url,
                ours: ours.unwrap_or_default(),
                theirs,
            });
        }
        if !status.is_success() {
            let reason = resp.text().await.unwrap_or_default().trim().to_string();
            return Err(TransportError::Refused {
                url,
                reason: format!("{status}: {reason}"),
            });
        }
        let mut s = HttpFrameStream {
            url,
            body: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            cluster_id: None,
            ended: false,
        };
        let theirs = s.preamble().await?;
        if let Some(ours) = ours
            && ours != theirs
        {
            return Err(TransportError::ClusterMismatch {
                url: s.url,
                ours,
                theirs,
            });
        }
        s.cluster_id = Some(theirs);
        Ok(Box::new(s))
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct HttpFrameStream {
    url: String,
    body: ByteStream,
    buf: Vec<u8>,
    cluster_id: Option<String>,
    ended: bool,
}

impl HttpFrameStream {
    /// Reads more bytes into the buffer; `Closed` at the end of the body or after
    /// [`IDLE_TIMEOUT`] without bytes.
    async fn fill(&mut self) -> Result<(), TransportError> {
        match tokio::time::timeout(IDLE_TIMEOUT, self.body.next()).await {
            Err(_) => Err(TransportError::Closed {
                url: self.url.clone(),
                source: Some(format!("no data for {IDLE_TIMEOUT:?}").into()),
            }),
            Ok(None) => Err(TransportError::Closed {
                url: self.url.clone(),
                source: None,
            }),
            Ok(Some(Err(e))) => Err(TransportError::Closed {
                url: self.url.clone(),
                source: Some(Box::new(e)),
            }),
            Ok(Some(Ok(b))) => {
                self.buf.extend_from_slice(&b);
                Ok(())
            }
        }
    }

    fn malformed(&self, e: wire::WireError) -> TransportError {
        TransportError::Malformed {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    async fn preamble(&mut self) -> Result<String, TransportError> {
        loop {
            match wire::decode_preamble(&self.buf).map_err(|e| self.malformed(e))? {
                Some((id, used)) => {
                    self.buf.drain(..used);
                    return Ok(id);
                }
                None => self.fill().await?,
            }
        }
    }
}

#[async_trait]
impl FrameStream for HttpFrameStream {
    async fn next_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            match wire::decode_frame(&self.buf).map_err(|e| self.malformed(e))? {
                Some((frame, used)) => {
                    self.buf.drain(..used);
                    if matches!(frame, Frame::End | Frame::Archive { .. }) {
                        self.ended = true;
                    }
                    return Ok(Some(frame));
                }
                None => self.fill().await?,
            }
        }
    }

    fn cluster_id(&self) -> Option<String> {
        self.cluster_id.clone()
    }
}

/// What the server needs.
#[derive(Clone)]
struct ServerState {
    store: Arc<Store>,
    tmp_dir: PathBuf,
    info: Arc<ops::NodeInfo>,
}

/// Parses `http.addr` (Go style: `:20202` means every interface).
///
/// # Errors
/// When it is not `host:port` with an IP host.
pub fn parse_addr(addr: &str) -> Result<SocketAddr, std::net::AddrParseError> {
    if let Some(port) = addr.strip_prefix(':') {
        format!("0.0.0.0:{port}").parse()
    } else {
        addr.parse()
    }
}

/// Serves `POST /stream`, `GET /events`, the operator endpoints of [`ops`]
/// (`/info`, `/metrics`, `/export`, `/import`) and write forwarding ([`halt`]:
/// `/halt`, `/tx`) on `listener` until `shutdown`
/// resolves; with an auth token in `info`, every request but `GET /metrics` must carry
/// it. Streams are served only while `store.is_primary()` (a replica answers 503),
/// under the cluster id in the data directory at the time of the request.
///
/// # Errors
/// When the server fails.
pub async fn serve(
    listener: TcpListener,
    store: Arc<Store>,
    info: Arc<ops::NodeInfo>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tmp_dir = store.options().data_dir.join("snapshot-tmp");
    let ops_state = ops::OpsState {
        store: store.clone(),
        info: info.clone(),
    };
    let state = ServerState {
        store,
        tmp_dir,
        info,
    };
    let ops_routes = axum::Router::new()
        .route("/info", axum::routing::get(ops::info))
        .route("/metrics", axum::routing::get(ops::metrics))
        .route("/events", axum::routing::get(events::events))
        .route("/promote", axum::routing::post(handoff::promote))
        .route("/handoff", axum::routing::post(handoff::handoff))
        .route(
            "/halt",
            axum::routing::post(halt::post_halt).delete(halt::delete_halt),
        )
        .route(
            "/tx",
            axum::routing::post(halt::post_tx).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/export", axum::routing::get(ops::export))
        .route(
            "/import",
            axum::routing::post(ops::import).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .with_state(ops_state);
    let auth = axum::middleware::from_fn_with_state(state.info.clone(), ops::require_token);
    let app = axum::Router::new()
        .route("/stream", axum::routing::post(stream))
        .with_state(state)
        .merge(ops_routes)
        .layer(auth);
    info!(addr = ?listener.local_addr().ok(), "HTTP server listening");
    // Frames are small and latency matters: no Nagle delay on the stream.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn stream(State(st): State<ServerState>, body: Bytes) -> Response {
    let request = match wire::decode_request(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    // Checked first: a replica's server has no cluster id of its own to compare.
    if !st.store.is_primary() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not the primary\n").into_response();
    }
    let data_dir = &st.store.options().data_dir;
    let cluster_id = match crate::replicate::cluster_id::read(data_dir) {
        Ok(Some(id)) => id,
        Ok(None) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "no cluster id yet\n").into_response();
        }
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cluster id: {e}\n"),
            )
                .into_response();
        }
    };
    if let Some(theirs) = &request.cluster_id
        && *theirs != cluster_id
    {
        warn!(
            replica = request.node_id,
            replica_cluster = theirs,
            cluster = cluster_id,
            "refusing a replica of another cluster"
        );
        return (StatusCode::CONFLICT, format!("{cluster_id}\n")).into_response();
    }
    info!(
        replica = request.node_id,
        databases = request.positions.len(),
        "replica connected"
    );
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    let node = request.node_id;
    // Lives in the body: a step-down waits until the last frame left.
    let guard = ops::StreamGuard::new(st.info.clone(), node);
    tokio::spawn(async move {
        match primary::serve(st.store, request, st.tmp_dir, tx).await {
            Ok(()) => info!(replica = node, "stream ended"),
            Err(primary::StreamError::Disconnected) => {
                info!(replica = node, "replica disconnected")
            }
            Err(e) => warn!(replica = node, error = %e, "stream ended with an error"),
        }
    });
    let preamble = wire::encode_preamble(&cluster_id);
    // Frames already queued go out in one body chunk: one write for a run of small
    // LTX files instead of one each.
    let frames = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let first = wire::encode_frame(&rx.recv().await?);
        let mut out: Option<BytesMut> = None;
        while out.as_ref().map_or(first.len(), |o| o.len()) < COALESCE_BYTES {
            let Ok(f) = rx.try_recv() else { break };
            out.get_or_insert_with(|| BytesMut::from(&first[..]))
                .extend_from_slice(&wire::encode_frame(&f));
        }
        Some((out.map_or(first, BytesMut::freeze), (rx, guard)))
    });
    let body = futures_util::stream::once(async move { preamble })
        .chain(frames)
        .map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", CONTENT_TYPE)
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
