//! The elected role: follow whoever holds the lease, take it when nobody does (as a
//! candidate), and give up writes before a lease that cannot be renewed could expire.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::fuse::ReplicaApplier;
use crate::lease::{Lease, LeaseError, Leaser, PrimaryInfo};
use crate::replicate::Apply;
use crate::replicate::replica::{Lag, Replica};
use crate::store::Store;
use crate::transport::Transport;
use crate::transports::http::ops::LeaseCounters;

/// How long one `watch_primary` call may block before it is asked again.
const WATCH_WAIT: Duration = Duration::from_secs(5);
/// Pause before trying again after the lease was busy or held (lock-delay, a lost race).
const ACQUIRE_RETRY: Duration = Duration::from_millis(200);
/// Pause before trying a failed renewal again (while the lease is still valid).
const RENEW_RETRY: Duration = Duration::from_millis(200);
/// How long a release may take on shutdown or demotion before the lease is left to
/// expire.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long before the lease's expiry a primary that could not renew stops taking
/// writes: a quarter of the TTL covers clock drift between the node and the store and
/// a transaction in flight.
pub fn safety_margin(ttl: Duration) -> Duration {
    ttl / 4
}

/// Everything the election task needs.
pub(super) struct Election {
    pub leaser: Arc<dyn Leaser>,
    pub store: Arc<Store>,
    pub applier: Arc<ReplicaApplier>,
    pub lag: Arc<Lag>,
    pub transport: Arc<dyn Transport>,
    pub node_id: u64,
    pub synced: Arc<watch::Sender<bool>>,
    pub reconnect_delay: Duration,
    /// What `/info` and `/metrics` report about this node.
    pub info: Arc<crate::transports::http::ops::NodeInfo>,
}

/// How leading ended.
enum Led {
    /// The node is stopping; the lease was released.
    Stopped,
    /// The lease was lost or could not be renewed in time; the node is a replica now.
    Demoted,
}

/// Resolves once `stop` is true (never if its sender is gone without saying so).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sleeps for `d`; false if the node was told to stop meanwhile.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stopped(stop) => false,
    }
}

impl Election {
    /// Runs until `stop` turns true; a primary then stops taking writes and releases
    /// the lease before this returns.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        self.store.set_primary(false);
        loop {
            if *stop.borrow() {
                return;
            }
            let holder = tokio::select! {
                r = self.leaser.primary_info() => r,
                _ = stopped(&mut stop) => return,
            };
            match holder {
                Err(e) => {
                    warn!(error = %e, retry_in = ?self.reconnect_delay, "cannot read the lease holder");
                    if !pause(self.reconnect_delay, &mut stop).await {
                        return;
                    }
                }
                Ok(Some(p)) if p != *self.leaser.node_info() => {
                    self.follow(p, &mut stop).await;
                }
                // Nobody holds it, or a previous run of this node still does (its
                // session cannot be renewed from here: wait for it to expire).
                Ok(held_by_self) => {
                    if !self.leaser.candidate() {
                        if !pause(self.reconnect_delay, &mut stop).await {
                            return;
                        }
                        continue;
                    }
                    if held_by_self.is_some() {
                        debug!("the lease still names this node from an earlier run");
                    }
                    let acquired = tokio::select! {
                        r = self.leaser.acquire() => r,
                        _ = stopped(&mut stop) => return,
                    };
                    match acquired {
                        Ok(lease) => match self.lead(lease, &mut stop).await {
                            Led::Stopped => return,
                            Led::Demoted => {}
                        },
                        Err(e) => {
                            let wait = match e {
                                LeaseError::Unavailable { .. } => self.reconnect_delay,
                                _ => ACQUIRE_RETRY,
                            };
                            if e.is_retryable() {
                                debug!(error = %e, "lease not acquired");
                            } else {
                                warn!(error = %e, "cannot acquire the lease");
                            }
                            if !pause(wait, &mut stop).await {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Replicates from `primary` until the lease names someone else (or nobody), or the
    /// node stops. Returns only after the replica loop ended, so that everything it had
    /// received is applied before this node may become primary.
    async fn follow(&self, primary: PrimaryInfo, stop: &mut watch::Receiver<bool>) {
        info!(
            primary = primary.hostname,
            url = primary.advertise_url,
            "following the lease holder"
        );
        self.applier
            .set_primary_hostname(Some(primary.hostname.clone()));
        self.info.primary_changed(
            false,
            Some((primary.hostname.clone(), primary.advertise_url.clone())),
        );
        let (replica_stop, replica_stop_rx) = watch::channel(false);
        let replica = Replica {
            store: self.store.clone(),
            transport: self.transport.clone(),
            primary_url: primary.advertise_url.clone(),
            applier: self.applier.clone() as Arc<dyn Apply>,
            node_id: self.node_id,
            lag: self.lag.clone(),
            synced: self.synced.clone(),
        };
        let handle = tokio::spawn(replica.run(replica_stop_rx));
        let mut after = 0;
        loop {
            let r = tokio::select! {
                r = self.leaser.watch_primary(after, WATCH_WAIT) => r,
                _ = stopped(stop) => break,
            };
            match r {
                Ok((holder, token)) => {
                    after = token;
                    if holder.as_ref() != Some(&primary) {
                        info!(
                            old = primary.hostname,
                            new = holder.as_ref().map(|h| h.hostname.as_str()),
                            "the lease holder changed"
                        );
                        break;
                    }
                }
                Err(e) => {
                    // Keep replicating from the known primary while the store is away.
                    warn!(error = %e, "cannot watch the lease holder");
                    if !pause(self.reconnect_delay, stop).await {
                        break;
                    }
                }
            }
        }
        let _ = replica_stop.send(true);
        if let Err(e) = handle.await {
            error!(error = %e, "replica task failed");
        }
    }

    /// Acts as primary while `lease` is held: renews every TTL/2 and demotes itself
    /// when the lease is lost or when renewing failed until [`safety_margin`] before its
    /// expiry.
    async fn lead(&self, lease: Box<dyn Lease>, stop: &mut watch::Receiver<bool>) -> Led {
        info!(
            lease = lease.id(),
            "acquired the lease: this node is the primary"
        );
        LeaseCounters::bump(&self.info.lease.acquired);
        // A node that never joined a cluster founds one; a former replica keeps its id.
        let data_dir = &self.store.options().data_dir;
        if let Err(e) = crate::replicate::cluster_id::read_or_create(data_dir) {
            error!(error = %e, dir = %data_dir.display(), "cannot create the cluster id: giving the lease up");
            self.step_down(lease.as_ref()).await;
            let _ = pause(self.reconnect_delay, stop).await;
            return Led::Demoted;
        }
        self.applier.set_primary_hostname(None);
        self.store.set_primary(true);
        let me = self.leaser.node_info();
        self.info
            .primary_changed(true, Some((me.hostname.clone(), me.advertise_url.clone())));
        self.synced.send_replace(true);
        self.renew_loop(lease.as_ref(), stop).await
    }

    async fn renew_loop(&self, lease: &dyn Lease, stop: &mut watch::Receiver<bool>) -> Led {
        let mut failing = false;
        loop {
            let (Some(ttl), Some(expires)) = (lease.ttl(), lease.expires_at()) else {
                // A lease that never expires: nothing to renew.
                stopped(stop).await;
                self.step_down(lease).await;
                return Led::Stopped;
            };
            let deadline = Instant::from_std(expires) - safety_margin(ttl);
            let wait = if failing { RENEW_RETRY } else { ttl / 2 };
            let next = (Instant::now() + wait).min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stopped(stop) => {
                    self.step_down(lease).await;
                    return Led::Stopped;
                }
            }
            if Instant::now() >= deadline {
                self.demote(lease, "could not renew the lease before it could expire")
                    .await;
                return Led::Demoted;
            }
            let renewed = tokio::select! {
                r = tokio::time::timeout_at(deadline, lease.renew()) => r,
                _ = stopped(stop) => {
                    self.step_down(lease).await;
                    return Led::Stopped;
                }
            };
            match &renewed {
                Ok(Ok(())) => LeaseCounters::bump(&self.info.lease.renewals),
                _ => LeaseCounters::bump(&self.info.lease.renewal_failures),
            }
            match renewed {
                Ok(Ok(())) => failing = false,
                Ok(Err(e @ LeaseError::Lost { .. })) => {
                    self.demote(lease, &e.to_string()).await;
                    return Led::Demoted;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "renewing the lease failed; retrying while it is valid");
                    failing = true;
                }
                Err(_) => {
                    self.demote(lease, "renewing the lease timed out").await;
                    return Led::Demoted;
                }
            }
        }
    }

    /// Stops taking writes first, then gives the lease up (best effort).
    async fn demote(&self, lease: &dyn Lease, reason: &str) {
        self.store.set_primary(false);
        LeaseCounters::bump(&self.info.lease.lost);
        self.info.primary_changed(false, None);
        error!(
            lease = lease.id(),
            reason, "lost the lease: the mount is read-only now"
        );
        match tokio::time::timeout(RELEASE_TIMEOUT, lease.release()).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => debug!(error = %e, "releasing a lost lease failed"),
        }
    }

    /// Clean shutdown of the primary: no more writes, then release so that another
    /// candidate takes over at once.
    async fn step_down(&self, lease: &dyn Lease) {
        self.store.set_primary(false);
        self.info.primary_changed(false, None);
        match tokio::time::timeout(RELEASE_TIMEOUT, lease.release()).await {
            Ok(Ok(())) => info!(lease = lease.id(), "released the lease"),
            Ok(Err(e)) => warn!(error = %e, "releasing the lease failed; it will expire"),
            Err(_) => warn!("releasing the lease timed out; it will expire"),
        }
    }
}
