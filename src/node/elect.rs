//! The elected role: follow whoever holds the lease, take it when nobody does (as a
//! candidate), and give up writes before a lease that cannot be renewed could expire.
//! A primary that steps down (SIGINT/SIGTERM) or hands over (`/handoff`) stops writes,
//! lets transactions in flight finish and its replicas receive every committed file
//! before the lease changes hands; a replica asked to `/promote` takes the lease over
//! from its primary. See "Roles and elections" in `docs/design.md`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::fuse::ReplicaApplier;
use crate::lease::{Lease, LeaseError, Leaser, PrimaryInfo};
use crate::replicate::Apply;
use crate::replicate::cluster_id;
use crate::replicate::replica::{Lag, Replica};
use crate::store::Store;
use crate::transport::Transport;
use crate::transports::http::handoff::HANDOFF_TIMEOUT;
use crate::transports::http::ops::{Control, HandoffAnswer, LeaseCounters};

/// How long one `watch_primary` call may block before it is asked again.
const WATCH_WAIT: Duration = Duration::from_secs(5);
/// Pause before trying again after the lease was busy or held (lock-delay, a lost race).
const ACQUIRE_RETRY: Duration = Duration::from_millis(200);
/// Pause before trying a failed renewal again (while the lease is still valid).
const RENEW_RETRY: Duration = Duration::from_millis(200);
/// How long a release may take on shutdown or demotion before the lease is left to
/// expire.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a follower whose primary changed lets its stream from the old primary run
/// on (until the old primary ends it after its last file) before cutting it: the
/// stream's own idle timeout.
const DRAIN_TIMEOUT: Duration = crate::transports::http::IDLE_TIMEOUT;

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
    /// `/promote` and `/handoff` requests.
    pub control: tokio::sync::Mutex<mpsc::Receiver<Control>>,
}

/// A lease taken over by `/promote`, and the request to answer once writable.
type Promoted = (Box<dyn Lease>, oneshot::Sender<Result<String, String>>);

/// Why a non-candidate refuses `/promote`.
const NOT_CANDIDATE: &str = "this node is not a candidate (lease.candidate is false)";

/// How [`Election::idle`] ended.
enum Idle {
    /// The time passed.
    Elapsed,
    /// The node is stopping.
    Stopped,
    /// A `/promote` request to answer.
    Promote(oneshot::Sender<Result<String, String>>),
}

/// The replica loop of a follower.
struct Following {
    handle: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    drain: watch::Sender<bool>,
}

impl Following {
    /// Lets the current stream run until the old primary ends it (at most
    /// [`DRAIN_TIMEOUT`]), then stops the loop.
    async fn drain(&mut self, primary: &str) {
        let Some(mut handle) = self.handle.take() else {
            return;
        };
        let _ = self.drain.send(true);
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut handle).await {
            Ok(Err(e)) => error!(error = %e, "replica task failed"),
            Ok(Ok(())) => debug!("stream from the old primary drained"),
            Err(_) => {
                warn!(
                    primary,
                    waited = ?DRAIN_TIMEOUT,
                    "the old primary did not end its stream: cutting it"
                );
                let _ = self.stop.send(true);
                if let Err(e) = handle.await {
                    error!(error = %e, "replica task failed");
                }
            }
        }
    }

    /// Stops the loop at once (the node is stopping).
    async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(handle) = self.handle.take()
            && let Err(e) = handle.await
        {
            error!(error = %e, "replica task failed");
        }
    }
}

/// Why the cluster id could not be settled.
#[derive(Debug, thiserror::Error)]
enum ClusterIdError {
    /// The data directory belongs to another cluster than the lease store's.
    #[error(
        "the data directory {dir} belongs to cluster {local}, but the lease store keeps cluster \
         {stored}: this node was part of another cluster (remove {dir}/clusterid and the \
         databases to join this one)"
    )]
    Mismatch {
        /// The data directory.
        dir: String,
        /// Its cluster id.
        local: String,
        /// The lease store's.
        stored: String,
    },
    /// The store could not be read or written.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The data directory's `clusterid` could not be read or written.
    #[error("cluster id in the data directory: {0}")]
    Io(#[from] std::io::Error),
}

/// How leading ended.
enum Led {
    /// This node belongs to another cluster than the lease store's.
    Refused,
    /// The lease was handed to another node (`/handoff`); not released.
    HandedOff,
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
        self.stop_writes().await;
        let mut control = self.control.lock().await;
        let control = &mut *control;
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
                    match self.idle(self.reconnect_delay, &mut stop, control).await {
                        Idle::Stopped => return,
                        Idle::Elapsed => {}
                        Idle::Promote(reply) => {
                            let _ = reply.send(Err(format!(
                                "no primary is known: cannot read the lease holder ({e})"
                            )));
                        }
                    }
                }
                Ok(Some(p)) if p != *self.leaser.node_info() => {
                    if let Err(e) = self.check_cluster_id().await {
                        error!("{e}: refusing to lead or follow");
                        stopped(&mut stop).await;
                        return;
                    }
                    if let Some((lease, reply)) = self.follow(p, &mut stop, control).await {
                        let led = self.lead(lease, &mut stop, control, Some(reply)).await;
                        if !self.after_leading(led, &mut stop).await {
                            return;
                        }
                    }
                }
                // Nobody holds it, or a previous run of this node still does (its
                // session cannot be renewed from here: wait for it to expire).
                Ok(held_by_self) => {
                    if !self.leaser.candidate() {
                        match self.idle(self.reconnect_delay, &mut stop, control).await {
                            Idle::Stopped => return,
                            Idle::Elapsed => {}
                            Idle::Promote(reply) => {
                                let _ = reply.send(Err(NOT_CANDIDATE.into()));
                            }
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
                    let e = match acquired {
                        Ok(lease) => {
                            let led = self.lead(lease, &mut stop, control, None).await;
                            if !self.after_leading(led, &mut stop).await {
                                return;
                            }
                            continue;
                        }
                        Err(e) => e,
                    };
                    let wait = match e {
                        LeaseError::Unavailable { .. } => self.reconnect_delay,
                        _ => ACQUIRE_RETRY,
                    };
                    if e.is_retryable() {
                        debug!(error = %e, "lease not acquired");
                    } else {
                        warn!(error = %e, "cannot acquire the lease");
                    }
                    let reply = match self.idle(wait, &mut stop, control).await {
                        Idle::Stopped => return,
                        Idle::Elapsed => continue,
                        Idle::Promote(reply) => reply,
                    };
                    // `/promote` while nobody holds the lease: a candidate takes it
                    // now (as its election would a moment later) or says at once why
                    // it cannot.
                    let acquired = tokio::select! {
                        r = self.leaser.acquire() => r,
                        _ = stopped(&mut stop) => return,
                    };
                    match acquired {
                        Ok(lease) => {
                            info!("promotion: nobody held the lease; took it");
                            let led = self.lead(lease, &mut stop, control, Some(reply)).await;
                            if !self.after_leading(led, &mut stop).await {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = reply.send(Err(format!(
                                "no primary is currently available for handoff, and this \
                                 node could not take the lease yet ({e}); try again"
                            )));
                        }
                    }
                }
            }
        }
    }

    /// What follows a spell as the primary; false when the election is over.
    async fn after_leading(&self, led: Led, stop: &mut watch::Receiver<bool>) -> bool {
        match led {
            Led::Refused => {
                stopped(stop).await;
                false
            }
            Led::Stopped => false,
            Led::HandedOff => {
                self.after_handoff(stop).await;
                true
            }
            Led::Demoted => true,
        }
    }

    /// Sleeps for `d` while this node neither leads nor follows, answering requests at
    /// once instead of leaving them queued: `/handoff` is refused, a `/promote` ends
    /// the sleep and is handed to the caller.
    async fn idle(
        &self,
        d: Duration,
        stop: &mut watch::Receiver<bool>,
        control: &mut mpsc::Receiver<Control>,
    ) -> Idle {
        let until = Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Idle::Elapsed,
                _ = stopped(stop) => return Idle::Stopped,
                Some(c) = control.recv() => match c {
                    Control::Handoff { reply, .. } => {
                        let _ = reply.send(Err("not the primary".into()));
                    }
                    Control::Promote { reply } => {
                        if !reply.is_closed() {
                            return Idle::Promote(reply);
                        }
                    }
                },
            }
        }
    }

    /// Replicates from `primary` until the lease names someone else (or nobody), or the
    /// node stops. Returns only after the replica loop ended, so that everything it had
    /// received is applied before this node may become primary. A `/promote` request
    /// meanwhile asks `primary` for a handoff: on success this returns the lease taken
    /// over, with the request to answer once this node is writable.
    async fn follow(
        &self,
        primary: PrimaryInfo,
        stop: &mut watch::Receiver<bool>,
        control: &mut mpsc::Receiver<Control>,
    ) -> Option<Promoted> {
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
        let mut following = self.start_replica(&primary.advertise_url);
        let mut after = 0;
        loop {
            enum Next {
                Watched(Result<(Option<PrimaryInfo>, u64), LeaseError>),
                Control(Control),
                Stop,
            }
            let next = tokio::select! {
                r = self.leaser.watch_primary(after, WATCH_WAIT) => Next::Watched(r),
                Some(c) = control.recv() => Next::Control(c),
                _ = stopped(stop) => Next::Stop,
            };
            match next {
                Next::Stop => {
                    following.stop().await;
                    return None;
                }
                Next::Watched(Ok((holder, token))) => {
                    after = token;
                    if holder.as_ref() != Some(&primary) {
                        info!(
                            old = primary.hostname,
                            new = holder.as_ref().map(|h| h.hostname.as_str()),
                            "the lease holder changed"
                        );
                        // Everything the old primary committed first: it ends our
                        // stream once we have it all.
                        following.drain(&primary.hostname).await;
                        return None;
                    }
                }
                Next::Watched(Err(e)) => {
                    // Keep replicating from the known primary while the store is away.
                    warn!(error = %e, "cannot watch the lease holder");
                    if !pause(self.reconnect_delay, stop).await {
                        following.stop().await;
                        return None;
                    }
                }
                Next::Control(Control::Handoff { reply, .. }) => {
                    let _ = reply.send(Err("not the primary".into()));
                }
                Next::Control(Control::Promote { reply }) => {
                    if reply.is_closed() {
                        continue;
                    }
                    match self.take_over(&primary, &mut following).await {
                        Ok(lease) => return Some((lease, reply)),
                        Err(e) => {
                            warn!(error = e, "promotion failed");
                            let _ = reply.send(Err(e));
                            // A stream drained for nothing: look at the lease again.
                            following.handle.as_ref()?;
                        }
                    }
                }
            }
        }
    }

    fn start_replica(&self, url: &str) -> Following {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (drain_tx, drain_rx) = watch::channel(false);
        let replica = Replica {
            store: self.store.clone(),
            transport: self.transport.clone(),
            primary_url: url.to_string(),
            applier: self.applier.clone() as Arc<dyn Apply>,
            node_id: self.node_id,
            lag: self.lag.clone(),
            synced: self.synced.clone(),
        };
        Following {
            handle: Some(tokio::spawn(replica.run_draining(stop_rx, drain_rx))),
            stop: stop_tx,
            drain: drain_tx,
        }
    }

    /// `/promote`: asks `primary` to hand over, receives everything it committed, and
    /// takes its lease over.
    async fn take_over(
        &self,
        primary: &PrimaryInfo,
        following: &mut Following,
    ) -> Result<Box<dyn Lease>, String> {
        if !self.leaser.candidate() {
            return Err(NOT_CANDIDATE.into());
        }
        info!(
            primary = primary.hostname,
            "promotion: asking the primary to hand over"
        );
        let url = format!(
            "{}/handoff?replica={}",
            primary.advertise_url.trim_end_matches('/'),
            self.node_id
        );
        let client = reqwest::Client::builder()
            .timeout(HANDOFF_TIMEOUT)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let mut request = client.post(&url);
        if let Some(v) = self
            .info
            .auth_token
            .as_deref()
            .and_then(crate::transports::http::ops::bearer)
        {
            request = request.header(reqwest::header::AUTHORIZATION, v);
        }
        let resp = request
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!(
                "the primary refused the handoff ({status}): {}",
                body.trim()
            ));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("the primary's handoff answer: {e}"))?;
        let answer: HandoffAnswer = serde_json::from_slice(&body)
            .map_err(|e| format!("the primary's handoff answer: {e}"))?;
        // The primary ended our stream after its last file: apply it all.
        following.drain(&primary.hostname).await;
        for want in &answer.positions {
            let have = self
                .store
                .db(&want.name)
                .map(|d| d.pos())
                .unwrap_or_default();
            let have_txid = format!("{:016x}", have.txid.0);
            let have_sum = format!("{:016x}", have.post_apply_checksum.0);
            if have_txid != want.txid || have_sum != want.checksum {
                return Err(format!(
                    "not caught up with the primary: {} at {have_txid}/{have_sum}, primary at {}/{}",
                    want.name, want.txid, want.checksum
                ));
            }
        }
        let lease = self
            .leaser
            .acquire_existing(&answer.lease_id)
            .await
            .map_err(|e| format!("taking the lease over: {e}"))?;
        LeaseCounters::bump(&self.info.lease.handoffs);
        info!(lease = lease.id(), "promotion: took the lease over");
        Ok(lease)
    }

    /// Acts as primary while `lease` is held: renews every TTL/2 and demotes itself
    /// when the lease is lost or when renewing failed until [`safety_margin`] before its
    /// expiry.
    async fn lead(
        &self,
        lease: Box<dyn Lease>,
        stop: &mut watch::Receiver<bool>,
        control: &mut mpsc::Receiver<Control>,
        promoted: Option<oneshot::Sender<Result<String, String>>>,
    ) -> Led {
        info!(
            lease = lease.id(),
            "acquired the lease: this node is the primary"
        );
        LeaseCounters::bump(&self.info.lease.acquired);
        // A node that never joined a cluster founds one (or adopts the one the lease
        // store keeps); a node of another cluster refuses.
        if let Err(e) = self.cluster_id_as_primary().await {
            if let Some(r) = promoted {
                let _ = r.send(Err(e.to_string()));
            }
            self.step_down(lease.as_ref()).await;
            if let ClusterIdError::Mismatch { .. } = e {
                error!("{e}: refusing to lead or follow");
                return Led::Refused;
            }
            error!(error = %e, "cannot settle the cluster id: gave the lease up");
            let _ = pause(self.reconnect_delay, stop).await;
            return Led::Demoted;
        }
        self.applier.set_primary_hostname(None);
        self.store.set_primary(true);
        let me = self.leaser.node_info();
        self.info
            .primary_changed(true, Some((me.hostname.clone(), me.advertise_url.clone())));
        self.synced.send_replace(true);
        if let Some(r) = promoted {
            let _ = r.send(Ok("promoted: this node is the primary".into()));
        }
        self.renew_loop(lease.as_ref(), stop, control).await
    }

    async fn renew_loop(
        &self,
        lease: &dyn Lease,
        stop: &mut watch::Receiver<bool>,
        control: &mut mpsc::Receiver<Control>,
    ) -> Led {
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
                Some(c) = control.recv() => match c {
                    Control::Promote { reply } => {
                        let _ = reply.send(Ok("already the primary".into()));
                        continue;
                    }
                    Control::Handoff { replica, reply } => {
                        if reply.is_closed() {
                            continue;
                        }
                        return self.hand_off(lease, replica, reply).await;
                    }
                },
            }
            if Instant::now() >= deadline {
                self.demote(
                    lease,
                    "could not renew the lease before it could expire",
                    false,
                )
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
                    self.demote(lease, &e.to_string(), true).await;
                    return Led::Demoted;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "renewing the lease failed; retrying while it is valid");
                    failing = true;
                }
                Err(_) => {
                    self.demote(lease, "renewing the lease timed out", false)
                        .await;
                    return Led::Demoted;
                }
            }
        }
    }

    /// `/handoff` from `replica`: stops writes, lets transactions in flight finish,
    /// waits until `replica`'s stream ended after its last file, then answers with the
    /// lease id and the final positions. The lease is not released: `replica` takes it
    /// over (or, if it never does, it expires).
    async fn hand_off(
        &self,
        lease: &dyn Lease,
        replica: u64,
        reply: oneshot::Sender<Result<HandoffAnswer, String>>,
    ) -> Led {
        info!(replica, "handing the lease over");
        let ttl = lease.ttl().unwrap_or(RELEASE_TIMEOUT);
        // A full TTL for the new holder to take the lease over in.
        if let Err(e) = lease.renew().await {
            let _ = reply.send(Err(format!("renewing the lease before the handoff: {e}")));
            return Led::Demoted;
        }
        self.stop_writes().await;
        self.finish_transactions(ttl / 4).await;
        self.info.primary_changed(false, None);
        let deadline = Instant::now() + ttl / 2;
        while self.info.connected_replicas().contains(&replica) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if self.info.connected_replicas().contains(&replica) {
            warn!(replica, waited = ?(ttl / 2), "the replica did not receive every committed file in time");
        }
        let mut positions: Vec<_> = self
            .store
            .databases()
            .iter()
            .map(|db| {
                let p = db.pos();
                crate::transports::http::ops::DbInfo {
                    name: db.name().to_string(),
                    txid: format!("{:016x}", p.txid.0),
                    checksum: format!("{:016x}", p.post_apply_checksum.0),
                }
            })
            .collect();
        positions.sort_by(|a, b| a.name.cmp(&b.name));
        let answer = HandoffAnswer {
            lease_id: lease.id().to_string(),
            positions,
        };
        if reply.send(Ok(answer)).is_err() {
            warn!(
                replica,
                "the replica went away during the handoff: releasing the lease"
            );
            match tokio::time::timeout(RELEASE_TIMEOUT, lease.release()).await {
                Ok(Ok(())) => info!(lease = lease.id(), "released the lease"),
                _ => warn!("releasing the lease failed; it will expire"),
            }
            return Led::Demoted;
        }
        LeaseCounters::bump(&self.info.lease.handoffs);
        info!(
            replica,
            lease = lease.id(),
            "handed the lease over: this node is a replica now"
        );
        Led::HandedOff
    }

    /// After a handoff: waits (at most a TTL and a second) until the lease store names
    /// the new holder, so that this node follows it rather than trying to acquire.
    async fn after_handoff(&self, stop: &mut watch::Receiver<bool>) {
        let me = self.leaser.node_info().clone();
        let deadline = Instant::now() + WATCH_WAIT;
        let mut after = 0;
        while Instant::now() < deadline {
            let r = tokio::select! {
                r = tokio::time::timeout_at(deadline, self.leaser.watch_primary(after, WATCH_WAIT)) => r,
                _ = stopped(stop) => return,
            };
            match r {
                Ok(Ok((holder, token))) => {
                    if holder.as_ref() != Some(&me) {
                        return;
                    }
                    after = token;
                }
                Ok(Err(_)) => {
                    if !pause(ACQUIRE_RETRY, stop).await {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// The cluster id as the new primary: the lease store's (`<key>/clusterid`) wins;
    /// with none stored, this node's (created if it has none) is stored. A data
    /// directory of another cluster is refused.
    async fn cluster_id_as_primary(&self) -> Result<String, ClusterIdError> {
        let dir = &self.store.options().data_dir;
        let local = cluster_id::read(dir)?;
        let stored = match self.leaser.cluster_id().await? {
            Some(s) => s,
            None => {
                let ours = match &local {
                    Some(l) => l.clone(),
                    None => cluster_id::read_or_create(dir)?,
                };
                self.leaser.set_cluster_id_if_absent(&ours).await?
            }
        };
        match local {
            Some(l) if l != stored => Err(ClusterIdError::Mismatch {
                dir: dir.display().to_string(),
                local: l,
                stored,
            }),
            _ => {
                cluster_id::write(dir, &stored)?;
                Ok(stored)
            }
        }
    }

    /// Before following: a data directory of another cluster than the lease store's
    /// is refused (an unreachable store is not: the primary's stream checks too).
    async fn check_cluster_id(&self) -> Result<(), ClusterIdError> {
        let dir = &self.store.options().data_dir;
        let Some(local) = cluster_id::read(dir)? else {
            return Ok(());
        };
        match self.leaser.cluster_id().await {
            Ok(Some(stored)) if stored != local => Err(ClusterIdError::Mismatch {
                dir: dir.display().to_string(),
                local,
                stored,
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(error = %e, "cannot read the cluster id from the lease store");
                Ok(())
            }
        }
    }

    /// Turns the mount read-only: returns once no file-system operation that saw this
    /// node as the primary is still running (the store's write gate). Transactions
    /// that began before may still commit (see [`Election::finish_transactions`]).
    async fn stop_writes(&self) {
        let store = self.store.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || store.set_primary(false)).await {
            error!(error = %e, "turning the mount read-only failed");
        }
    }

    /// Waits up to `within` for the write transactions that began while this node
    /// was the primary to end, then fences the rest (their later writes fail).
    async fn finish_transactions(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut logged = false;
        while self.store.writers_in_flight() > 0 && Instant::now() < deadline {
            if !logged {
                info!(
                    transactions = self.store.writers_in_flight(),
                    "waiting for transactions in flight to finish"
                );
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = self.store.writers_in_flight();
        if left > 0 {
            warn!(transactions = left, waited = ?within, "fencing transactions still open: their writes fail from now on");
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.fence_writers()).await;
    }

    /// Waits up to `within` for every replica stream to end: each ends with `End` once
    /// its replica has every committed file. Logs the replicas that did not finish.
    async fn drain_streams(&self, within: Duration) {
        let t0 = Instant::now();
        let deadline = t0 + within;
        while self.info.streams.load(std::sync::atomic::Ordering::Relaxed) > 0
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let left = self.info.connected_replicas();
        if left.is_empty() {
            debug!(took = ?t0.elapsed(), "every replica has every committed file");
        } else {
            for replica in left {
                warn!(
                    replica,
                    waited = ?within,
                    "replica did not receive every committed file before the step-down timed out"
                );
            }
        }
    }

    /// Stops taking writes first, lets transactions in flight finish while the lease
    /// is surely valid, then gives the lease up (best effort). Streams end by
    /// themselves once their replica has everything.
    async fn demote(&self, lease: &dyn Lease, reason: &str, lost: bool) {
        self.stop_writes().await;
        let grace = if lost {
            Duration::ZERO
        } else {
            lease
                .expires_at()
                .map(|e| e.saturating_duration_since(std::time::Instant::now()) / 2)
                .unwrap_or_default()
        };
        self.finish_transactions(grace).await;
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
        self.stop_writes().await;
        let ttl = lease.ttl().unwrap_or(RELEASE_TIMEOUT);
        // A full TTL ahead for what follows (best effort: the lease stays valid
        // until its current expiry anyway).
        if lease.expires_at().is_some() {
            match tokio::time::timeout(ttl / 4, lease.renew()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "renewing before the step-down failed"),
                Err(_) => debug!("renewing before the step-down timed out"),
            }
        }
        self.finish_transactions(ttl / 4).await;
        self.info.primary_changed(false, None);
        self.drain_streams(ttl / 2).await;
        match tokio::time::timeout(RELEASE_TIMEOUT, lease.release()).await {
            Ok(Ok(())) => info!(lease = lease.id(), "released the lease"),
            Ok(Err(e)) => warn!(error = %e, "releasing the lease failed; it will expire"),
            Err(_) => warn!("releasing the lease timed out; it will expire"),
        }
    }
}
