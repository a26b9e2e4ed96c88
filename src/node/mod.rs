//! The node's role and the services it runs around the mount: with the static lease,
//! a candidate is the primary (it serves the replication stream on `http.addr`), a
//! non-candidate is a read-only replica of `lease.advertise-url`. With Consul or etcd
//! the role follows the lease ([`elect`]): the holder is the primary, the others
//! replicate from it.

mod elect;

pub use elect::safety_margin;

use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::config::{Config, LeaseType};
use crate::fuse::Mount;
use crate::lease::Leaser;
use crate::replicate::replica::{Lag, Replica};
use crate::replicate::{Apply, cluster_id};
use crate::store::Store;
use crate::transports::http::{self, HttpTransport};

/// What this node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes writes and serves the stream.
    Primary,
    /// Replicates from the primary at this URL, whose hostname `.primary` shows.
    Replica {
        /// The primary's advertise URL.
        url: String,
        /// The primary's hostname.
        hostname: String,
    },
    /// Primary or replica as the lease store decides, changing at run time.
    Elected,
}

/// Services of a running node. Built before the mount, started on it, stopped after.
pub struct Node {
    role: Role,
    store: Arc<Store>,
    server: Option<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    replica: Mutex<Option<JoinHandle<()>>>,
    node_id: u64,
    /// Turns true when a replica first caught up with the primary (or an elected node
    /// became the primary).
    synced: Arc<watch::Sender<bool>>,
    /// The lease client of an elected node.
    leaser: Option<Arc<dyn Leaser>>,
    reconnect_delay: std::time::Duration,
    election: Mutex<Option<JoinHandle<()>>>,
    /// What `/info` and `/metrics` report about this node.
    info: Arc<http::ops::NodeInfo>,
}

impl Node {
    /// Decides the role from the config and binds `http.addr` (every node serves
    /// `/info`, `/metrics`, `/events`; the stream is served while primary). A static
    /// replica and every elected node (Consul, etcd) switch the store to read-only
    /// before anything is mounted: an elected node turns writable only once it holds
    /// the lease (see [`Node::on_mount`]).
    ///
    /// # Errors
    /// When `http.addr` cannot be parsed or bound, or the cluster id cannot be read or
    /// created.
    pub async fn prepare(cfg: &Config, store: Arc<Store>) -> anyhow::Result<Node> {
        let role = match (cfg.lease.kind, cfg.lease.candidate) {
            (Some(LeaseType::Static), false) => Role::Replica {
                url: cfg.lease.advertise_url.clone(),
                hostname: cfg.lease.hostname.clone(),
            },
            (Some(LeaseType::Static), true) | (None, _) => Role::Primary,
            (Some(LeaseType::Consul | LeaseType::Etcd), _) => Role::Elected,
        };
        let leaser = match role {
            Role::Elected => {
                Some(crate::backends::build_leaser(&cfg.lease).context("setting up the lease")?)
            }
            _ => None,
        };
        let (stop_tx, _) = watch::channel(false);
        let node_id = u64::from(std::process::id());
        let http_addr = http::parse_addr(&cfg.http.addr)
            .with_context(|| format!("http.addr {:?}", cfg.http.addr))?;
        let info = Arc::new(
            http::ops::NodeInfo::new(node_id, cfg.lease.candidate, cfg.fuse.dir.clone())
                .with_auth_token(cfg.http.resolved_auth_token()),
        );
        info.set_halt(crate::halt::HaltRegistry::new(
            store.clone(),
            cfg.http.halt_lock_ttl.unwrap_or(crate::halt::DEFAULT_TTL),
        ));
        match &role {
            Role::Elected => {
                // Read-only until the election says otherwise; a node that joins a
                // cluster founds none before it learnt the primary's id.
                store.set_primary(false);
                info!(
                    candidate = cfg.lease.candidate,
                    "elected role: waiting for the lease"
                );
            }
            Role::Primary => {
                store.set_primary(true);
                info.set_primary(cfg.lease.hostname.clone(), cfg.lease.advertise_url.clone());
            }
            Role::Replica { url, hostname } => {
                store.set_primary(false);
                info.set_primary(hostname.clone(), url.clone());
                info!(
                    primary = url,
                    "replica (static lease): the mount is read-only"
                );
            }
        }
        // Every node serves HTTP from the start: replicas answer `/info`, `/metrics`,
        // `/events` and `/export` (and refuse `/stream` and `/import`).
        let server = Some(serve(&role, &store, &stop_tx, &info, http_addr).await?);
        Ok(Node {
            role,
            store,
            server,
            stop_tx,
            replica: Mutex::new(None),
            node_id,
            synced: Arc::new(watch::Sender::new(false)),
            leaser,
            reconnect_delay: cfg.lease.reconnect_delay,
            election: Mutex::new(None),
            info,
        })
    }

    /// Setting it to true stops the node's services (as [`Node::stop`] does, without
    /// waiting).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop_tx.clone()
    }

    /// Resolves once the node is in sync: at once on a static primary (as
    /// [`crate::exec::in_sync_without_replication`] says), on a replica when the
    /// primary first reports it caught up (`Ready`), on an elected node at that moment
    /// or when it became the primary.
    pub fn in_sync(&self, lease: &crate::config::LeaseConfig) -> crate::exec::InSync {
        match self.role {
            Role::Primary => crate::exec::in_sync_without_replication(lease),
            Role::Replica { .. } | Role::Elected => {
                let mut rx = self.synced.subscribe();
                Box::pin(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
            }
        }
    }

    /// Reports the archiver's state in `/info`, `/metrics` and `litefs status`.
    pub fn set_archive(&self, state: Arc<crate::archive::ArchiveState>) {
        self.info.set_archive(state);
    }

    /// What `/info` reports about this node (shared with the proxy).
    pub fn info(&self) -> Arc<http::ops::NodeInfo> {
        self.info.clone()
    }

    /// This node's role.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// Called once the file system is mounted: a replica names its primary in
    /// `.primary` and starts streaming from it; an elected node starts its election.
    pub fn on_mount(&self, mount: &Mount) {
        // Write forwarding: served while primary, used while replica.
        if let Some(halt) = self.info.halt() {
            halt.set_host(mount.halt_host());
        }
        mount.set_halt_client(Arc::new(http::halt::HttpHaltClient::new(
            self.info.clone(),
            tokio::runtime::Handle::current(),
        )));
        if self.role == Role::Elected {
            self.start_election(mount);
            return;
        }
        let Role::Replica { url, hostname } = &self.role else {
            return;
        };
        mount.set_primary_hostname(Some(hostname.clone()));
        let lag = Arc::new(Lag::default());
        self.info.set_lag(lag.clone());
        let Some(applier) = mount.replica_applier(lag.clone()) else {
            error!("the mount has no session: cannot replicate");
            return;
        };
        let transport = match HttpTransport::with_auth_token(self.info.auth_token.as_deref()) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                error!(error = %e, "cannot build the HTTP client: not replicating");
                return;
            }
        };
        let replica = Replica {
            store: self.store.clone(),
            transport,
            primary_url: url.clone(),
            applier: applier as Arc<dyn Apply>,
            node_id: self.node_id,
            lag,
            synced: self.synced.clone(),
        };
        let stop = self.stop_tx.subscribe();
        let handle = tokio::spawn(replica.run(stop));
        *self.replica.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    fn start_election(&self, mount: &Mount) {
        let Some(leaser) = self.leaser.clone() else {
            return;
        };
        let lag = Arc::new(Lag::default());
        let Some(applier) = mount.replica_applier(lag.clone()) else {
            error!("the mount has no session: cannot take part in the election");
            return;
        };
        let transport = match HttpTransport::with_auth_token(self.info.auth_token.as_deref()) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                error!(error = %e, "cannot build the HTTP client: not taking part in the election");
                return;
            }
        };
        let (control_tx, control) = tokio::sync::mpsc::channel(8);
        self.info.set_control(control_tx);
        let election = elect::Election {
            leaser,
            store: self.store.clone(),
            applier,
            lag,
            transport,
            node_id: self.node_id,
            synced: self.synced.clone(),
            reconnect_delay: self.reconnect_delay,
            info: self.info.clone(),
            control: tokio::sync::Mutex::new(control),
        };
        let handle = tokio::spawn(election.run(self.stop_tx.subscribe()));
        *self.election.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Stops the node's services and waits until an elected primary stopped taking
    /// writes and released its lease, so that another candidate takes over before
    /// this node unmounts.
    pub async fn step_down(&self) {
        let _ = self.stop_tx.send(true);
        let election = self
            .election
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = election {
            let _ = h.await;
        }
    }

    /// Stops the replica loop and the server (open streams are dropped).
    pub async fn stop(mut self) {
        self.step_down().await;
        let replica = self
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = replica {
            let _ = h.await;
        }
        if let Some(h) = self.server.take() {
            // Streams never end on their own: do not wait for them.
            h.abort();
            let _ = h.await;
        }
    }
}

/// Binds `http.addr` and serves the stream (while primary) and the operator endpoints
/// until the node stops. Only a static primary creates the cluster id here; an
/// elected node creates it when it first leads, a replica adopts its primary's.
async fn serve(
    role: &Role,
    store: &Arc<Store>,
    stop_tx: &watch::Sender<bool>,
    info: &Arc<http::ops::NodeInfo>,
    http_addr: std::net::SocketAddr,
) -> anyhow::Result<JoinHandle<()>> {
    let data_dir = &store.options().data_dir;
    let id = if *role == Role::Primary {
        cluster_id::read_or_create(data_dir).map(Some)
    } else {
        cluster_id::read(data_dir)
    }
    .with_context(|| format!("cluster id in {}", data_dir.display()))?;
    let addr = http_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding http.addr {addr}"))?;
    if *role == Role::Primary {
        info!(%addr, cluster_id = id.as_deref(), "primary (static lease): serving replicas");
    }
    let mut stop = stop_tx.subscribe();
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let st = store.clone();
    let server_info = info.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = http::serve(listener, st, server_info, shutdown).await {
            error!(error = %e, "HTTP server failed");
        }
    }))
}
