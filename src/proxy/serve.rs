//! The proxy's own accept loop: HTTP/1.1 connections served by hyper, with Go's four
//! server timeouts (`read-timeout`, `read-header-timeout`, `write-timeout`,
//! `idle-timeout`) that hyper does not offer as such.
//!
//! Each connection's socket is wrapped so that a watchdog knows when bytes of a new
//! request arrived and whether a request is in flight:
//! - read-header: bytes of a request arrived but hyper has not handed the request over
//!   within the limit: the connection is dropped;
//! - idle: no request in flight and no byte for the limit: dropped;
//! - read: the whole request (header and body) must arrive within the limit counted
//!   from its first byte; the handler's body stream fails after it ([`Deadlines::read`]);
//! - write: from the request's hand-over to the last byte of the response; the handler
//!   and the response body fail after it, which makes hyper drop the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every proxy response.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The server timeouts; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, header and body, from its first byte.
    pub read: Option<Duration>,
    /// The request header, from its first byte.
    pub read_header: Option<Duration>,
    /// From the request's hand-over to the end of the response.
    pub write: Option<Duration>,
    /// Between requests on a kept-alive connection.
    pub idle: Option<Duration>,
}

/// The response was not ready by the write deadline: the connection is dropped.
#[derive(Debug, thiserror::Error)]
#[error("write timeout")]
pub struct WriteTimeout;

/// Deadlines of one request, given to the handler.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// When the request body must have arrived.
    pub read: Option<Instant>,
    /// When the response must have been written.
    pub write: Option<Instant>,
}

/// Serves connections on `listener` with `handler` until `stop` turns true. Open
/// connections are dropped then.
pub async fn serve<H, F>(
    listener: TcpListener,
    timeouts: Timeouts,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, Deadlines) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    debug!(%peer, "proxy connection");
                    conns.spawn(connection(tcp, timeouts, handler.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// What the watchdog of one connection sees.
#[derive(Debug)]
struct ConnState {
    start: Instant,
    /// Requests handed to the handler whose response is not fully written.
    in_flight: AtomicUsize,
    /// Milliseconds (since `start`, plus one) of the first byte of a request not yet
    /// handed over; 0: none.
    pending_since: AtomicU64,
    /// Milliseconds since `start` of the last byte read or written, or of the end of
    /// the last response.
    last: AtomicU64,
}

impl ConnState {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Bytes were read from the client.
    fn read(&self) {
        let now = self.now();
        self.last.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.pending_since.compare_exchange(
                0,
                now + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// Why the connection must be closed now, if it must.
    fn expired(&self, t: &Timeouts) -> Option<&'static str> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = self.now();
        match self.pending_since.load(Ordering::Acquire) {
            0 => {
                let idle = t.idle?;
                (now.saturating_sub(self.last.load(Ordering::Relaxed)) >= idle.as_millis() as u64)
                    .then_some("idle timeout")
            }
            since => {
                let first = since - 1;
                let header = t
                    .read_header
                    .into_iter()
                    .chain(t.read)
                    .min()
                    .map(|d| d.as_millis() as u64)?;
                (now.saturating_sub(first) >= header).then_some("read header timeout")
            }
        }
    }
}

/// Counts a request as in flight until the response body is dropped (fully written
/// or abandoned).
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last.store(self.0.now(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection<H, F>(tcp: TcpStream, timeouts: Timeouts, handler: H)
where
    H: Fn(Request<Incoming>, Deadlines) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let state = Arc::new(ConnState {
        start: Instant::now(),
        in_flight: AtomicUsize::new(0),
        pending_since: AtomicU64::new(0),
        last: AtomicU64::new(0),
    });
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let st = svc_state.clone();
        let handler = handler.clone();
        async move {
            st.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(st.clone());
            let now = Instant::now();
            let first = match st.pending_since.swap(0, Ordering::AcqRel) {
                0 => now,
                since => st.at(since - 1),
            };
            let deadlines = Deadlines {
                read: timeouts.read.map(|d| first + d),
                write: timeouts.write.map(|d| now + d),
            };
            let fut = handler(req, deadlines);
            let resp = match deadlines.write {
                Some(at) => tokio::time::timeout_at(at, fut)
                    .await
                    .map_err(|_| WriteTimeout)?,
                None => fut.await,
            };
            let (parts, body) = resp.into_parts();
            let body = Guarded {
                inner: body,
                deadline: deadlines
                    .write
                    .map(|at| Box::pin(tokio::time::sleep_until(at))),
                _guard: guard,
            };
            Ok::<_, WriteTimeout>(Response::from_parts(parts, body.boxed_unsync()))
        }
    });
    let io = TokioIo::new(Tracked {
        inner: tcp,
        state: state.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let limits = [timeouts.read, timeouts.read_header, timeouts.idle];
    let tick = limits
        .iter()
        .flatten()
        .min()
        .map(|d| (*d / 10).clamp(Duration::from_millis(10), Duration::from_millis(250)));
    loop {
        let watchdog = async {
            match tick {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!(error = %e, "proxy connection ended");
                }
                return;
            }
            _ = watchdog => {
                if let Some(why) = state.expired(&timeouts) {
                    debug!(why, "closing a proxy connection");
                    return;
                }
            }
        }
    }
}

/// A socket that reports its traffic to the connection's watchdog.
struct Tracked {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.read();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.last.store(self.state.now(), Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that fails at the write deadline and keeps its request counted as
/// in flight while it lives.
struct Guarded {
    inner: ProxyBody,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _guard: InFlight,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err("write timeout".into())));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
