//! The replication seam: how a replica receives LTX files from the primary.
//!
//! A replica calls [`Transport::connect`] with the primary's advertise URL and its
//! position in every database, and reads [`Frame`]s until the stream ends. The
//! primary's side (deciding per database whether to send the next file or a snapshot)
//! is not part of the seam: it is a pure function in the core, served by whatever
//! server the transport implementation runs. Implementations live in `transports/`.
//!
//! # Contract
//!
//! - **Order.** Frames arrive in the order the primary sent them. The bytes of one LTX
//!   file arrive as one or more consecutive [`Frame::Ltx`] for the same database, the
//!   last with `last: true`; no other frame is interleaved inside a file. Chunks are
//!   bounded (implementations keep them at most [`MAX_CHUNK`] bytes), so a replica
//!   never holds a whole snapshot in memory.
//! - **Nothing is trusted.** A transport delivers bytes; it does not verify LTX files.
//!   The replica verifies each file completely before applying any page of it.
//! - **Errors.** [`TransportError::is_retryable`] tells whether reconnecting (after a
//!   backoff) may help. A stream that ends without [`Frame::End`] is
//!   [`TransportError::Closed`]: the file being received, if any, must be discarded.
//! - **Retries.** Implementations never reconnect on their own: the node owns backoff
//!   and the decision to look up the primary again (it may have changed).
//! - **Cancellation.** Dropping a [`FrameStream`] or a pending `connect`/`next_frame`
//!   closes the connection; the primary notices and forgets this replica. Nothing is
//!   half-applied, because applying is the replica's job after a file is complete.

use std::fmt::Debug;

use async_trait::async_trait;

/// Largest chunk of LTX bytes an implementation puts in one [`Frame::Ltx`].
pub const MAX_CHUNK: usize = 1 << 20;

/// A replica's position in one database: the TXID it has applied and the database
/// checksum after applying it (both 0 for a database it does not have yet).
///
/// Plain integers so the seam does not depend on the LTX module's types; they are the
/// same values as `ltx::Pos` (TXID and post-apply checksum).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DbPosition {
    /// Database name as it appears in the mount.
    pub db: String,
    /// Last applied TXID.
    pub txid: u64,
    /// Database checksum after that TXID.
    pub post_apply_checksum: u64,
}

/// What a replica sends when it connects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRequest {
    /// The replica's node id (for the primary's logs and metrics).
    pub node_id: u64,
    /// The cluster the replica belongs to; `None` for a node that has not joined one
    /// yet (it adopts the primary's).
    pub cluster_id: Option<String>,
    /// The archive this replica can catch up from
    /// ([`SnapshotSink::location`](crate::sink::SnapshotSink::location)); `None`: none,
    /// so the primary sends snapshots itself.
    pub archive: Option<String>,
    /// Position of every database the replica has.
    pub positions: Vec<DbPosition>,
}

/// One message of the stream from the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A chunk of an LTX file for `db`. `last` marks the file's final chunk.
    Ltx {
        /// Database name.
        db: String,
        /// Bytes of the file, in order.
        chunk: Vec<u8>,
        /// True on the file's last chunk.
        last: bool,
    },
    /// Every database is caught up with the primary as of now.
    Ready {
        /// The primary's live databases. A replica removes its databases that are not
        /// listed; an empty list removes nothing (a fresh primary must not wipe its
        /// replicas).
        databases: Vec<String>,
    },
    /// Nothing to send; sent about once a second so the replica can measure lag and
    /// detect a dead connection. `primary_time_ms` is the primary's clock (Unix ms).
    Heartbeat {
        /// The primary's wall clock, Unix milliseconds.
        primary_time_ms: u64,
    },
    /// The primary offers its lease to this replica (promotion); see
    /// `Leaser::acquire_existing`.
    Handoff {
        /// The lease id to take over.
        lease_id: String,
    },
    /// The primary ends the stream on purpose (stepping down, shutting down).
    End,
    /// Instead of a snapshot: the replica's archive (the same as the primary's) holds
    /// `db` up to at least `txid`, where the primary's database checksum is
    /// `post_apply_checksum`, and the primary keeps every file after it. The replica
    /// catches `db` up from the archive and reconnects from its new position. The
    /// primary sends nothing after it.
    Archive {
        /// Database name.
        db: String,
        /// A TXID the archive reaches.
        txid: u64,
        /// The primary's database checksum after `txid`.
        post_apply_checksum: u64,
    },
}

/// A stream of frames from one connection.
#[async_trait]
pub trait FrameStream: Send {
    /// The next frame; `Ok(None)` after [`Frame::End`] was returned.
    ///
    /// # Errors
    /// [`TransportError::Closed`] when the connection ends without `End`; any other
    /// variant for a malformed stream or a refusal.
    async fn next_frame(&mut self) -> Result<Option<Frame>, TransportError>;

    /// The primary's cluster id, when the transport learned it while connecting (a
    /// replica that has none adopts it).
    fn cluster_id(&self) -> Option<String> {
        None
    }
}

/// Client side of a replication transport. Held as `Arc<dyn Transport>`.
///
/// See the module documentation for the contract.
#[async_trait]
pub trait Transport: Debug + Send + Sync + 'static {
    /// Short name for logs (`"http"`).
    fn type_name(&self) -> &'static str;

    /// Connects to the primary at `primary_url` (its advertise URL) and starts a
    /// stream from the given positions.
    ///
    /// # Errors
    /// [`TransportError::Connect`] if it cannot be reached;
    /// [`TransportError::ClusterMismatch`] if it belongs to another cluster;
    /// [`TransportError::Refused`] if it will not serve (e.g. it is not the primary).
    async fn connect(
        &self,
        primary_url: &str,
        request: StreamRequest,
    ) -> Result<Box<dyn FrameStream>, TransportError>;
}

/// Why replication from the primary failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The primary could not be reached.
    #[error("cannot connect to primary at {url}")]
    Connect {
        /// The URL tried.
        url: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The connection ended without an `End` frame.
    #[error("stream from {url} closed unexpectedly")]
    Closed {
        /// The primary's URL.
        url: String,
        /// The underlying failure, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The primary sent bytes that are not a valid frame.
    #[error("malformed stream from {url}: {message}")]
    Malformed {
        /// The primary's URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The primary refused to serve this replica.
    #[error("primary at {url} refused the stream: {reason}")]
    Refused {
        /// The primary's URL.
        url: String,
        /// Its reason.
        reason: String,
    },
    /// The primary belongs to another cluster.
    #[error("primary at {url} belongs to cluster {theirs}, this node to {ours}")]
    ClusterMismatch {
        /// The primary's URL.
        url: String,
        /// This node's cluster id.
        ours: String,
        /// The primary's cluster id.
        theirs: String,
    },
}

impl TransportError {
    /// Whether reconnecting after a backoff may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::Closed { .. }
            | TransportError::Malformed { .. }
            | TransportError::Refused { .. } => true,
            TransportError::ClusterMismatch { .. } => false,
        }
    }
}
