//! The etcd leaser: a lease with a TTL and an election by transaction.
//!
//! `lease.type: etcd`. Acquiring grants an etcd lease of `lease.etcd.ttl` seconds,
//! then runs one transaction: if the key's create revision is 0 (the key does not
//! exist), put this node's [`PrimaryInfo`] JSON there attached to the lease; otherwise
//! read the holder. The key's create revision then identifies this term: a holder
//! whose key was deleted and re-created by someone else has lost, even if its own
//! etcd lease is still alive. Renewing sends one keep-alive and checks the key;
//! releasing revokes the lease, which deletes the key at once. A crashed holder's
//! lease expires after its TTL and etcd deletes the key with it.
//!
//! # Who renews
//!
//! The node calls [`Lease::renew`] every TTL/2, as for every leaser. Each renewal
//! opens a keep-alive stream, sends one keep-alive and reads its answer, so a renewal
//! dropped half-way leaves nothing behind that a later one could misread.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::sync::OnceCell;

use crate::config::LeaseConfig;
use crate::lease::{Lease, LeaseError, Leaser, PrimaryInfo};

use super::BuildError;

const BACKEND: &str = "etcd";

/// [`Leaser`] for `lease.type: etcd`.
pub struct EtcdLeaser {
    endpoints: Vec<String>,
    key: String,
    ttl_secs: i64,
    node: PrimaryInfo,
    candidate: bool,
    request_timeout: Duration,
    /// Connected on first use, so that building from config needs no runtime and a
    /// store that is down at start-up is an ordinary retryable error.
    client: OnceCell<Client>,
}

// `etcd_client::Client` is not `Debug`.
impl std::fmt::Debug for EtcdLeaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLeaser")
            .field("endpoints", &self.endpoints)
            .field("key", &self.key)
            .field("ttl_secs", &self.ttl_secs)
            .field("node", &self.node)
            .field("candidate", &self.candidate)
            .field("connected", &self.client.initialized())
            .finish()
    }
}

impl std::fmt::Debug for EtcdLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLease")
            .field("key", &self.key)
            .field("id", &self.id_text)
            .field("create_revision", &self.create_revision)
            .field("ttl", &self.ttl)
            .field("released", &self.released)
            .finish()
    }
}

fn unavailable(e: etcd_client::Error) -> LeaseError {
    LeaseError::Unavailable {
        backend: BACKEND,
        source: Box::new(e),
    }
}

impl EtcdLeaser {
    /// Builds a leaser from a validated `lease` section.
    ///
    /// # Errors
    /// [`BuildError::Invalid`] without endpoints, without a key, or with a TTL that
    /// is not a whole number of seconds of at least 1.
    pub fn new(cfg: &LeaseConfig) -> Result<Self, BuildError> {
        let e = &cfg.etcd;
        if e.endpoints.is_empty() {
            return Err(BuildError::Invalid {
                key: "lease.etcd.endpoints",
                message: "is required for an etcd lease, e.g. [http://127.0.0.1:2379]".into(),
            });
        }
        if e.key.is_empty() {
            return Err(BuildError::Invalid {
                key: "lease.etcd.key",
                message: "is required for an etcd lease, e.g. litefs/my-app".into(),
            });
        }
        if e.ttl.subsec_nanos() != 0 || e.ttl.as_secs() == 0 {
            return Err(BuildError::Invalid {
                key: "lease.etcd.ttl",
                message: "must be a whole number of seconds, at least \"1s\"".into(),
            });
        }
        let ttl_secs = i64::try_from(e.ttl.as_secs()).map_err(|_| BuildError::Invalid {
            key: "lease.etcd.ttl",
            message: "is too large".into(),
        })?;
        Ok(EtcdLeaser {
            endpoints: e.endpoints.clone(),
            key: e.key.clone(),
            ttl_secs,
            node: PrimaryInfo {
                hostname: cfg.hostname.clone(),
                advertise_url: cfg.advertise_url.clone(),
            },
            candidate: cfg.candidate,
            request_timeout: (e.ttl / 3).clamp(Duration::from_millis(300), Duration::from_secs(10)),
            client: OnceCell::new(),
        })
    }

    /// The election key.
    pub fn key(&self) -> &str {
        &self.key
    }

    async fn client(&self) -> Result<Client, LeaseError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let opts = ConnectOptions::new()
                    .with_connect_timeout(self.request_timeout)
                    .with_timeout(self.request_timeout);
                Client::connect(&self.endpoints, Some(opts)).await
            })
            .await
            .map_err(unavailable)?;
        Ok(client.clone())
    }

    fn decode(&self, value: &[u8]) -> Result<PrimaryInfo, LeaseError> {
        serde_json::from_slice(value).map_err(|e| LeaseError::Protocol {
            backend: BACKEND,
            message: format!(
                "key {}: value is not {{\"hostname\",\"advertise-url\"}} JSON: {e}",
                self.key
            ),
        })
    }

    async fn read_holder(&self) -> Result<(Option<PrimaryInfo>, i64), LeaseError> {
        let mut client = self.client().await?;
        let resp = client
            .get(self.key.as_bytes(), None)
            .await
            .map_err(unavailable)?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        match resp.kvs().first() {
            Some(kv) => Ok((Some(self.decode(kv.value())?), revision)),
            None => Ok((None, revision)),
        }
    }
}

#[async_trait]
impl Leaser for EtcdLeaser {
    fn type_name(&self) -> &'static str {
        BACKEND
    }

    fn node_info(&self) -> &PrimaryInfo {
        &self.node
    }

    fn candidate(&self) -> bool {
        self.candidate
    }

    async fn primary_info(&self) -> Result<Option<PrimaryInfo>, LeaseError> {
        Ok(self.read_holder().await?.0)
    }

    /// An etcd watch on the key from the revision after `after`: the token is the
    /// store revision of the last read.
    async fn watch_primary(
        &self,
        after: u64,
        wait: Duration,
    ) -> Result<(Option<PrimaryInfo>, u64), LeaseError> {
        let revision = i64::try_from(after).unwrap_or(i64::MAX);
        if revision > 0 {
            let mut client = self.client().await?;
            let opts = WatchOptions::new().with_start_revision(revision + 1);
            let mut stream = client
                .watch(self.key.as_bytes(), Some(opts))
                .await
                .map_err(unavailable)?;
            let changed = async {
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            if resp.events().iter().any(|e| {
                                matches!(e.event_type(), EventType::Put | EventType::Delete)
                            }) {
                                return Ok(());
                            }
                        }
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(unavailable(e)),
                    }
                }
            };
            // Timing out is an answer ("no change"), not an error.
            if let Ok(result) = tokio::time::timeout(wait, changed).await {
                result?;
            }
        }
        let (holder, revision) = self.read_holder().await?;
        Ok((holder, u64::try_from(revision).unwrap_or(0)))
    }

    async fn acquire(&self) -> Result<Box<dyn Lease>, LeaseError> {
        if !self.candidate {
            return Err(LeaseError::NotCandidate { backend: BACKEND });
        }
        let mut client = self.client().await?;
        let started = Instant::now();
        let grant = client
            .lease_grant(self.ttl_secs, None)
            .await
            .map_err(unavailable)?;
        let lease_id = grant.id();
        let value = serde_json::to_vec(&self.node).map_err(|e| LeaseError::Protocol {
            backend: BACKEND,
            message: format!("cannot encode this node's identity: {e}"),
        })?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.as_bytes(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.as_bytes(),
                value,
                Some(PutOptions::new().with_lease(lease_id)),
            )])
            .or_else([TxnOp::get(self.key.as_bytes(), None)]);
        let resp = match client.txn(txn).await {
            Ok(resp) => resp,
            Err(e) => {
                let _ = client.lease_revoke(lease_id).await;
                return Err(unavailable(e));
            }
        };
        if !resp.succeeded() {
            if let Err(e) = client.lease_revoke(lease_id).await {
                tracing::debug!(lease_id, error = %e, "etcd: could not revoke an unused lease");
            }
            let holder = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            return match holder {
                Some(value) => Err(LeaseError::PrimaryExists {
                    backend: BACKEND,
                    primary: self.decode(&value)?,
                }),
                // Deleted between the compare and the get: cannot happen within one
                // transaction, but a later try will settle it.
                None => Err(LeaseError::Busy {
                    backend: BACKEND,
                    reason: format!("key {} changed during the election", self.key),
                }),
            };
        }
        let create_revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        tracing::info!(key = %self.key, lease_id, create_revision, "etcd: lease acquired");
        Ok(Box::new(EtcdLease {
            client,
            key: self.key.clone(),
            id: lease_id,
            id_text: format!("{lease_id:x}"),
            create_revision,
            ttl: Duration::from_secs(self.ttl_secs.unsigned_abs()),
            expires_at: Mutex::new(started + Duration::from_secs(self.ttl_secs.unsigned_abs())),
            released: AtomicBool::new(false),
        }))
    }

    async fn cluster_id(&self) -> Result<Option<String>, LeaseError> {
        let key = format!("{}/clusterid", self.key);
        let mut client = self.client().await?;
        let resp = client
            .get(key.as_bytes(), None)
            .await
            .map_err(unavailable)?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).trim().to_string()))
    }

    /// One transaction: put `id` if the key does not exist, else read it.
    async fn set_cluster_id_if_absent(&self, id: &str) -> Result<String, LeaseError> {
        let key = format!("{}/clusterid", self.key);
        let mut client = self.client().await?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_bytes(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(key.as_bytes(), id.as_bytes(), None)])
            .or_else([TxnOp::get(key.as_bytes(), None)]);
        let resp = client.txn(txn).await.map_err(unavailable)?;
        if resp.succeeded() {
            return Ok(id.to_string());
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
            {
                return Ok(String::from_utf8_lossy(kv.value()).trim().to_string());
            }
        }
        Err(LeaseError::Protocol {
            backend: BACKEND,
            message: format!("key {key} exists but could not be read"),
        })
    }

    /// Takes over the etcd lease a former holder handed over (its id in hex): the
    /// lease must be alive and still own the key; the key's value then names this
    /// node.
    async fn acquire_existing(&self, lease_id: &str) -> Result<Box<dyn Lease>, LeaseError> {
        if !self.candidate {
            return Err(LeaseError::NotCandidate { backend: BACKEND });
        }
        let id = i64::from_str_radix(lease_id, 16).map_err(|e| LeaseError::Protocol {
            backend: BACKEND,
            message: format!("lease id {lease_id:?} is not hex: {e}"),
        })?;
        let mut client = self.client().await?;
        let resp = client
            .get(self.key.as_bytes(), None)
            .await
            .map_err(unavailable)?;
        let Some(kv) = resp.kvs().first().filter(|kv| kv.lease() == id) else {
            return Err(LeaseError::Lost {
                backend: BACKEND,
                lease_id: lease_id.to_string(),
                reason: format!("key {} is not held by this lease", self.key),
            });
        };
        let ttl = Duration::from_secs(self.ttl_secs.unsigned_abs());
        let lease = EtcdLease {
            client,
            key: self.key.clone(),
            id,
            id_text: lease_id.to_string(),
            create_revision: kv.create_revision(),
            ttl,
            expires_at: Mutex::new(Instant::now()),
            released: AtomicBool::new(false),
        };
        lease.renew().await?;
        // Rewrite the value under the same lease, only if the key is still the one
        // this lease created, so that every node now reads this node as the primary.
        let value = serde_json::to_vec(&self.node).map_err(|e| LeaseError::Protocol {
            backend: BACKEND,
            message: format!("cannot encode this node's identity: {e}"),
        })?;
        let mut client = lease.client.clone();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.as_bytes(),
                CompareOp::Equal,
                lease.create_revision,
            )])
            .and_then([TxnOp::put(
                self.key.as_bytes(),
                value,
                Some(PutOptions::new().with_lease(id)),
            )]);
        let resp = client.txn(txn).await.map_err(unavailable)?;
        if !resp.succeeded() {
            return Err(lease.lost(format!(
                "key {} was re-created during the handoff",
                self.key
            )));
        }
        tracing::info!(key = %self.key, lease_id, "etcd: lease taken over by handoff");
        Ok(Box::new(lease))
    }
}

/// A held etcd lease and the create revision of the key it won.
pub struct EtcdLease {
    client: Client,
    key: String,
    id: i64,
    id_text: String,
    create_revision: i64,
    ttl: Duration,
    expires_at: Mutex<Instant>,
    released: AtomicBool,
}

impl EtcdLease {
    /// etcd says "lease not found" for a lease that expired or was revoked: that is
    /// final, not an outage.
    fn classify(&self, e: etcd_client::Error) -> LeaseError {
        let gone = match &e {
            etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
            etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
            _ => false,
        };
        if gone {
            self.lost(format!("etcd: {e}"))
        } else {
            unavailable(e)
        }
    }

    fn lost(&self, reason: String) -> LeaseError {
        LeaseError::Lost {
            backend: BACKEND,
            lease_id: self.id_text.clone(),
            reason,
        }
    }
}

#[async_trait]
impl Lease for EtcdLease {
    /// The etcd lease id in hex (as `etcdctl` prints it).
    fn id(&self) -> &str {
        &self.id_text
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.ttl)
    }

    fn expires_at(&self) -> Option<Instant> {
        Some(*self.expires_at.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// One keep-alive, then a check that the key is still the one this lease created.
    async fn renew(&self) -> Result<(), LeaseError> {
        if self.released.load(Ordering::SeqCst) {
            return Err(self.lost("the lease was released".to_string()));
        }
        let mut client = self.client.clone();
        let started = Instant::now();
        let (mut keeper, mut stream) = client
            .lease_keep_alive(self.id)
            .await
            .map_err(|e| self.classify(e))?;
        keeper.keep_alive().await.map_err(|e| self.classify(e))?;
        let answer = stream.message().await.map_err(|e| self.classify(e))?;
        match answer {
            Some(resp) if resp.ttl() > 0 => {}
            Some(_) => return Err(self.lost("etcd reports the lease expired (TTL 0)".into())),
            None => {
                return Err(LeaseError::Unavailable {
                    backend: BACKEND,
                    source: "keep-alive stream closed without an answer".into(),
                });
            }
        }
        let resp = client
            .get(self.key.as_bytes(), None)
            .await
            .map_err(unavailable)?;
        match resp.kvs().first() {
            Some(kv) if kv.create_revision() == self.create_revision && kv.lease() == self.id => {}
            Some(kv) => {
                return Err(self.lost(format!(
                    "key {} was re-created (create revision {} instead of {})",
                    self.key,
                    kv.create_revision(),
                    self.create_revision
                )));
            }
            None => return Err(self.lost(format!("key {} is gone", self.key))),
        }
        let mut expires = self.expires_at.lock().unwrap_or_else(|p| p.into_inner());
        *expires = (*expires).max(started + self.ttl);
        Ok(())
    }

    /// Revokes the lease, which deletes the key with it.
    async fn release(&self) -> Result<(), LeaseError> {
        if self.released.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut client = self.client.clone();
        if let Err(e) = client.lease_revoke(self.id).await {
            match self.classify(e) {
                // Already expired or revoked: the key went with it.
                LeaseError::Lost { .. } => {}
                other => return Err(other),
            }
        }
        self.released.store(true, Ordering::SeqCst);
        tracing::info!(key = %self.key, lease_id = %self.id_text, "etcd: lease released");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LeaseType;

    #[test]
    fn config_is_checked() {
        let mut cfg = LeaseConfig {
            kind: Some(LeaseType::Etcd),
            ..LeaseConfig::default()
        };
        let err = EtcdLeaser::new(&cfg).unwrap_err();
        assert!(matches!(
            err,
            BuildError::Invalid {
                key: "lease.etcd.endpoints",
                ..
            }
        ));
        cfg.etcd.endpoints = vec!["http://127.0.0.1:2379".into()];
        let err = EtcdLeaser::new(&cfg).unwrap_err();
        assert!(matches!(
            err,
            BuildError::Invalid {
                key: "lease.etcd.key",
                ..
            }
        ));
        cfg.etcd.key = "litefs/primary".into();
        cfg.etcd.ttl = Duration::from_millis(1500);
        let err = EtcdLeaser::new(&cfg).unwrap_err();
        assert!(matches!(
            err,
            BuildError::Invalid {
                key: "lease.etcd.ttl",
                ..
            }
        ));
        cfg.etcd.ttl = Duration::from_secs(2);
        assert_eq!(EtcdLeaser::new(&cfg).unwrap().key(), "litefs/primary");
    }
}
