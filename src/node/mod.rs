//! The node's role and the services it runs around the mount: with the static lease,
//! a candidate is the primary (it serves the replication stream on `http.addr`), a
//! non-candidate is a read-only replica of `lease.advertise-url`.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{Config, LeaseType};
use crate::fuse::Mount;
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
}

/// Services of a running node. Built before the mount, started on it, stopped after.
pub struct Node {
    role: Role,
    store: Arc<Store>,
    server: Option<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    replica: Mutex<Option<JoinHandle<()>>>,
    node_id: u64,
    /// Turns true when a replica first caught up with the primary.
    synced: Arc<watch::Sender<bool>>,
    /// What `/info` and `/metrics` report about this node.
    info: Arc<http::ops::NodeInfo>,
}

impl Node {
    /// Decides the role from the config; a primary binds `http.addr` and starts serving
    /// (streams are served once the store is open; the mount comes next), a replica
    /// switches the store to read-only before anything is mounted.
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
            (Some(k), _) => {
                warn!(
                    lease = k.as_str(),
                    "elections are not in this build: running as primary"
                );
                Role::Primary
            }
        };
        let (stop_tx, _) = watch::channel(false);
        let node_id = u64::from(std::process::id());
        let info = Arc::new(http::ops::NodeInfo::new(
            node_id,
            cfg.lease.candidate,
            cfg.fuse.dir.clone(),
        ));
        match &role {
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
        // Every node serves HTTP: replicas answer `/info`, `/metrics` and `/export`
        // (and refuse `/stream` and `/import`).
        // Only a primary creates the cluster id; a replica adopts its primary's.
        let data_dir = &store.options().data_dir;
        let id = if role == Role::Primary {
            cluster_id::read_or_create(data_dir)
        } else {
            cluster_id::read(data_dir).map(Option::unwrap_or_default)
        }
        .with_context(|| format!("cluster id in {}", data_dir.display()))?;
        let addr = http::parse_addr(&cfg.http.addr)
            .with_context(|| format!("http.addr {:?}", cfg.http.addr))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding http.addr {addr}"))?;
        if role == Role::Primary {
            info!(%addr, cluster_id = id, "primary (static lease): serving replicas");
        }
        let mut stop = stop_tx.subscribe();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let st = store.clone();
        let server_info = info.clone();
        let server = Some(tokio::spawn(async move {
            if let Err(e) = http::serve(listener, st, id, server_info, shutdown).await {
                error!(error = %e, "HTTP server failed");
            }
        }));
        Ok(Node {
            role,
            store,
            server,
            stop_tx,
            replica: Mutex::new(None),
            node_id,
            synced: Arc::new(watch::Sender::new(false)),
            info,
        })
    }

    /// Setting it to true stops the node's services (as [`Node::stop`] does, without
    /// waiting).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop_tx.clone()
    }

    /// Resolves once the node is in sync: at once on a static primary (as
    /// [`crate::exec::in_sync_without_replication`] says for other leases), on a
    /// replica when the primary first reports it caught up (`Ready`).
    pub fn in_sync(&self, lease: &crate::config::LeaseConfig) -> crate::exec::InSync {
        match self.role {
            Role::Primary => crate::exec::in_sync_without_replication(lease),
            Role::Replica { .. } => {
                let mut rx = self.synced.subscribe();
                Box::pin(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
            }
        }
    }

    /// This node's role.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// Called once the file system is mounted: a replica names its primary in
    /// `.primary` and starts streaming from it.
    pub fn on_mount(&self, mount: &Mount) {
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
        let transport = match HttpTransport::new() {
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

    /// Stops the replica loop and the server (open streams are dropped).
    pub async fn stop(mut self) {
        let _ = self.stop_tx.send(true);
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
