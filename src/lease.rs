//! The lease seam: who is the primary, and how a node becomes it.
//!
//! A [`Leaser`] talks to a lease store (Consul, etcd, or none for the static lease).
//! The node asks it who holds the lease ([`Leaser::primary_info`]); when nobody does
//! and this node is a candidate it calls [`Leaser::acquire`] and, on success, holds a
//! [`Lease`] that it renews until it releases it or loses it. Implementations live in
//! `backends/`; `backends::build_leaser` is the only code that picks one.
//!
//! # Contract
//!
//! For every implementation:
//!
//! - **One holder.** At most one [`Lease`] obtained from a given store is valid at any
//!   moment. A lease is valid until [`Lease::expires_at`]; a holder that cannot renew
//!   must stop acting as primary before that instant (the node subtracts a safety
//!   margin for clock drift and in-flight writes).
//! - **Errors.** [`LeaseError::is_retryable`] tells whether the same call may succeed
//!   later without a change of configuration (store unreachable, someone else holds
//!   the lease). [`LeaseError::Lost`] from [`Lease::renew`] is final for that lease:
//!   the node must demote and may acquire a new one later.
//! - **Retries.** Implementations do not retry internally beyond a single request's
//!   own transport retries; the node owns the schedule (renew every TTL/2, reconnect
//!   after `lease.reconnect-delay`), so that timing stays visible in one place.
//! - **Cancellation.** Every `async fn` may be dropped at any await point. Dropping
//!   `acquire` may leave a lease held in the store that nobody renews; it expires after
//!   its TTL, which is the same outcome as a crash. Dropping `renew` leaves the lease
//!   as valid as it was before the call (`expires_at` is only moved forward after the
//!   store confirmed). Dropping `release` leaves the lease to expire.
//! - **Identity.** [`PrimaryInfo`] is what replicas need to reach the primary: the
//!   hostname (written to `.primary`) and the advertise URL of its HTTP API.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Who the primary is: what is stored as the lease's value (LiteFS writes the same
/// JSON object to Consul: `{"hostname": ..., "advertise-url": ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrimaryInfo {
    /// The primary's hostname, as shown in `.primary` on replicas.
    pub hostname: String,
    /// Base URL of the primary's HTTP API, e.g. `http://node1:20202`.
    #[serde(rename = "advertise-url")]
    pub advertise_url: String,
}

/// A lease store client. Held as `Arc<dyn Leaser>`.
///
/// See the module documentation for the contract every implementation follows.
#[async_trait]
pub trait Leaser: Debug + Send + Sync + 'static {
    /// Short name of the implementation for logs and metrics (`"consul"`, `"static"`).
    fn type_name(&self) -> &'static str;

    /// This node's identity, stored as the lease's value when it acquires the lease.
    fn node_info(&self) -> &PrimaryInfo;

    /// Whether this node may acquire the lease (`lease.candidate`).
    fn candidate(&self) -> bool;

    /// Reads who holds the lease now. `Ok(None)` means nobody does, so a candidate
    /// should try [`Leaser::acquire`]. The answer may be stale by the time it returns;
    /// acquiring is what decides.
    ///
    /// # Errors
    /// [`LeaseError::Unavailable`] when the store cannot be reached (retryable).
    async fn primary_info(&self) -> Result<Option<PrimaryInfo>, LeaseError>;

    /// Waits until the holder may have changed since `after`, or `wait` passes, then
    /// reads the holder. Returns it with the token to pass as `after` next time;
    /// `after == 0` answers at once. A spurious early answer is allowed (compare the
    /// holder), so callers loop on it; this is how replicas learn of a new primary
    /// without polling. Implementations with change notifications (Consul blocking
    /// queries, etcd watches) answer as soon as the key changes; the default waits
    /// out `wait` and reads.
    ///
    /// # Errors
    /// As [`Leaser::primary_info`].
    async fn watch_primary(
        &self,
        after: u64,
        wait: Duration,
    ) -> Result<(Option<PrimaryInfo>, u64), LeaseError> {
        if after != 0 {
            tokio::time::sleep(wait).await;
        }
        Ok((self.primary_info().await?, after.wrapping_add(1).max(1)))
    }

    /// Tries to become the holder.
    ///
    /// # Errors
    /// [`LeaseError::PrimaryExists`] if another node holds it (retryable: try again
    /// after it goes away); [`LeaseError::Busy`] if nobody holds it but the store
    /// refused for now (lock-delay, a lost race); [`LeaseError::NotCandidate`] on a non-candidate;
    /// [`LeaseError::Unavailable`] when the store cannot be reached.
    async fn acquire(&self) -> Result<Box<dyn Lease>, LeaseError>;

    /// The cluster id kept in the lease store (at `<key>/clusterid`, as LiteFS keeps
    /// it), if any. By default `Ok(None)`: a store that keeps none (static).
    ///
    /// # Errors
    /// [`LeaseError::Unavailable`] when the store cannot be reached.
    async fn cluster_id(&self) -> Result<Option<String>, LeaseError> {
        Ok(None)
    }

    /// Stores `id` as the cluster id unless one is stored already, and returns the
    /// stored one (which wins). By default returns `id`: nothing is kept.
    ///
    /// # Errors
    /// [`LeaseError::Unavailable`] when the store cannot be reached.
    async fn set_cluster_id_if_absent(&self, id: &str) -> Result<String, LeaseError> {
        Ok(id.to_string())
    }

    /// Takes over a lease that its current holder handed to this node (`litefs run
    /// -promote` / `POST /handoff`), identified by [`Lease::id`] on the old holder.
    ///
    /// # Errors
    /// By default [`LeaseError::Unsupported`]: handoff needs a store in which a lease
    /// can change hands without expiring, which the static lease does not have.
    async fn acquire_existing(&self, lease_id: &str) -> Result<Box<dyn Lease>, LeaseError> {
        let _ = lease_id;
        Err(LeaseError::Unsupported {
            backend: self.type_name(),
            operation: "handoff",
        })
    }
}

/// A held lease. Dropping it without [`Lease::release`] leaves it to expire.
#[async_trait]
pub trait Lease: Debug + Send + Sync {
    /// Store-specific identifier (Consul session id, etcd lease id), used for handoff.
    fn id(&self) -> &str;

    /// How long a renewal keeps the lease; `None` for a lease that never expires
    /// (static).
    fn ttl(&self) -> Option<Duration>;

    /// The instant the lease stops being valid unless renewed again: the moment
    /// before the last successful renewal (or the acquisition) plus the TTL. `None`
    /// for a lease that never expires.
    fn expires_at(&self) -> Option<Instant>;

    /// Extends the lease by its TTL.
    ///
    /// # Errors
    /// [`LeaseError::Lost`] if the store no longer has this lease (final);
    /// [`LeaseError::Unavailable`] if the store could not be reached (the lease stays
    /// valid until [`Lease::expires_at`]; the caller may retry until then).
    async fn renew(&self) -> Result<(), LeaseError>;

    /// Gives the lease up so another candidate can take over at once. Calling it
    /// twice is not an error.
    ///
    /// # Errors
    /// [`LeaseError::Unavailable`] if the store could not be reached (the lease then
    /// expires after its TTL).
    async fn release(&self) -> Result<(), LeaseError>;
}

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another node holds the lease.
    #[error("{backend} lease is held by {} ({})", .primary.hostname, .primary.advertise_url)]
    PrimaryExists {
        /// Implementation name.
        backend: &'static str,
        /// The holder.
        primary: PrimaryInfo,
    },
    /// Nobody holds the lease, but the store would not hand it out right now: Consul's
    /// lock-delay after a holder's session was invalidated, or another candidate won a
    /// race between reading and acquiring. Retry after a moment.
    #[error("{backend} lease is not available yet: {reason}")]
    Busy {
        /// Implementation name.
        backend: &'static str,
        /// What the store said.
        reason: String,
    },
    /// This node is not a candidate (`lease.candidate: false`).
    #[error("{backend} lease: this node is not a candidate (lease.candidate is false)")]
    NotCandidate {
        /// Implementation name.
        backend: &'static str,
    },
    /// The lease was lost: expired, taken over, or deleted from the store.
    #[error("{backend} lease {lease_id} lost: {reason}")]
    Lost {
        /// Implementation name.
        backend: &'static str,
        /// [`Lease::id`] of the lost lease.
        lease_id: String,
        /// What the store said.
        reason: String,
    },
    /// The store could not be reached or answered with a server error.
    #[error("{backend} lease store unavailable")]
    Unavailable {
        /// Implementation name.
        backend: &'static str,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store answered something this client does not understand.
    #[error("{backend} lease store protocol error: {message}")]
    Protocol {
        /// Implementation name.
        backend: &'static str,
        /// What was unexpected.
        message: String,
    },
    /// The implementation cannot do this operation.
    #[error("{backend} lease does not support {operation}")]
    Unsupported {
        /// Implementation name.
        backend: &'static str,
        /// The operation asked for.
        operation: &'static str,
    },
}

impl LeaseError {
    /// Whether the same call may succeed later without a change of configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            LeaseError::PrimaryExists { .. }
            | LeaseError::Busy { .. }
            | LeaseError::Unavailable { .. } => true,
            LeaseError::NotCandidate { .. }
            | LeaseError::Lost { .. }
            | LeaseError::Protocol { .. }
            | LeaseError::Unsupported { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_info_is_stored_as_litefs_json() {
        let info = PrimaryInfo {
            hostname: "node1".into(),
            advertise_url: "http://node1:20202".into(),
        };
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(
            json,
            r#"{"hostname":"node1","advertise-url":"http://node1:20202"}"#
        );
        assert_eq!(serde_json::from_str::<PrimaryInfo>(&json).unwrap(), info);
    }

    #[test]
    fn retryable_errors() {
        let unavailable = LeaseError::Unavailable {
            backend: "consul",
            source: "connection refused".into(),
        };
        assert!(unavailable.is_retryable());
        let lost = LeaseError::Lost {
            backend: "consul",
            lease_id: "s1".into(),
            reason: "session invalidated".into(),
        };
        assert!(!lost.is_retryable());
        assert!(!LeaseError::NotCandidate { backend: "static" }.is_retryable());
    }
}
