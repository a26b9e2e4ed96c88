//! The static lease: a fixed primary named in the config, no store, no failover.
//!
//! As in LiteFS, `lease.hostname` and `lease.advertise-url` name the primary on every
//! node, and `lease.candidate` says whether *this* node is it. A candidate can always
//! acquire the lease (once at a time; it never expires); a non-candidate always
//! reports the configured primary and never acquires.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::lease::{Lease, LeaseError, Leaser, PrimaryInfo};

const BACKEND: &str = "static";

/// [`Leaser`] for `lease.type: static`.
#[derive(Debug)]
pub struct StaticLeaser {
    primary: PrimaryInfo,
    candidate: bool,
    /// Whether this (candidate) node currently holds its lease; shared with the
    /// [`StaticLease`] so that releasing it is visible here.
    held: Arc<AtomicBool>,
}

impl StaticLeaser {
    /// A leaser whose primary is `primary`; `candidate` says this node is it.
    pub fn new(primary: PrimaryInfo, candidate: bool) -> Self {
        StaticLeaser {
            primary,
            candidate,
            held: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[async_trait]
impl Leaser for StaticLeaser {
    fn type_name(&self) -> &'static str {
        BACKEND
    }

    /// The configured primary (on a candidate, that is this node).
    fn node_info(&self) -> &PrimaryInfo {
        &self.primary
    }

    fn candidate(&self) -> bool {
        self.candidate
    }

    /// A replica always sees the configured primary. The primary sees itself while it
    /// holds its lease and nobody before it acquires or after it releases, so its
    /// node loop acquires exactly as it would with an elected lease.
    async fn primary_info(&self) -> Result<Option<PrimaryInfo>, LeaseError> {
        if !self.candidate || self.held.load(Ordering::SeqCst) {
            Ok(Some(self.primary.clone()))
        } else {
            Ok(None)
        }
    }

    async fn acquire(&self) -> Result<Box<dyn Lease>, LeaseError> {
        if !self.candidate {
            return Err(LeaseError::NotCandidate { backend: BACKEND });
        }
        if self.held.swap(true, Ordering::SeqCst) {
            return Err(LeaseError::PrimaryExists {
                backend: BACKEND,
                primary: self.primary.clone(),
            });
        }
        Ok(Box::new(StaticLease {
            held: Arc::clone(&self.held),
            released: AtomicBool::new(false),
        }))
    }
}

/// The lease a static primary holds. It never expires.
#[derive(Debug)]
pub struct StaticLease {
    held: Arc<AtomicBool>,
    released: AtomicBool,
}

#[async_trait]
impl Lease for StaticLease {
    fn id(&self) -> &str {
        BACKEND
    }

    fn ttl(&self) -> Option<Duration> {
        None
    }

    fn expires_at(&self) -> Option<Instant> {
        None
    }

    async fn renew(&self) -> Result<(), LeaseError> {
        if self.released.load(Ordering::SeqCst) {
            return Err(LeaseError::Lost {
                backend: BACKEND,
                lease_id: BACKEND.to_string(),
                reason: "the lease was released".to_string(),
            });
        }
        Ok(())
    }

    async fn release(&self) -> Result<(), LeaseError> {
        if !self.released.swap(true, Ordering::SeqCst) {
            self.held.store(false, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> PrimaryInfo {
        PrimaryInfo {
            hostname: "primary".into(),
            advertise_url: "http://primary:20202".into(),
        }
    }

    #[tokio::test]
    async fn candidate_becomes_primary_and_sees_itself_while_holding() {
        let leaser = StaticLeaser::new(info(), true);
        assert_eq!(leaser.primary_info().await.unwrap(), None);
        let lease = leaser.acquire().await.unwrap();
        assert_eq!(leaser.primary_info().await.unwrap(), Some(info()));
        assert_eq!(lease.ttl(), None);
        assert_eq!(lease.expires_at(), None);
        lease.renew().await.unwrap();
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_release_hands_it_back() {
        let leaser = StaticLeaser::new(info(), true);
        let first = leaser.acquire().await.unwrap();
        let second = leaser.acquire().await.unwrap_err();
        assert!(matches!(&second, LeaseError::PrimaryExists { primary, .. } if *primary == info()));
        assert!(second.is_retryable());

        first.release().await.unwrap();
        first.release().await.unwrap(); // twice is fine
        assert_eq!(leaser.primary_info().await.unwrap(), None);
        assert!(matches!(first.renew().await, Err(LeaseError::Lost { .. })));

        let again = leaser.acquire().await.unwrap();
        // Releasing the old handle again must not free the new holder's lease.
        first.release().await.unwrap();
        assert_eq!(leaser.primary_info().await.unwrap(), Some(info()));
        again.renew().await.unwrap();
    }

    #[tokio::test]
    async fn replica_reports_the_configured_primary_and_never_acquires() {
        let leaser = StaticLeaser::new(info(), false);
        assert!(!leaser.candidate());
        assert_eq!(leaser.primary_info().await.unwrap(), Some(info()));
        let err = leaser.acquire().await.unwrap_err();
        assert!(matches!(err, LeaseError::NotCandidate { .. }));
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn handoff_is_unsupported() {
        let leaser = StaticLeaser::new(info(), true);
        let err = leaser.acquire_existing("x").await.unwrap_err();
        assert!(matches!(
            err,
            LeaseError::Unsupported {
                operation: "handoff",
                ..
            }
        ));
    }
}
