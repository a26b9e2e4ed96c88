//! A Rust implementation of LiteFS: a FUSE file system that replicates SQLite
//! databases across a cluster by recording every transaction as an LTX file.
//!
//! # Layout
//!
//! - [`ltx`]: the LTX file format: checksums, encoder, streaming decoder (formats 1
//!   and 3), compaction, and applying a file to a database file. Pure byte work on
//!   `Read`/`Write`; no knowledge of nodes or networks.
//! - [`config`]: the configuration schema (LiteFS 0.5 files, the seed-era flat form,
//!   and this project's additions), `${VAR}` expansion and validation.
//! - [`lease`], [`transport`], [`sink`]: the three seams. Each is a trait with a
//!   `# Contract` section; implementations live outside `src/`.
//! - [`backends`] (folder `backends/`): [`lease::Leaser`] and [`sink::SnapshotSink`]
//!   implementations, and the one place that builds them from config.
//! - [`transports`] (folder `transports/`): [`transport::Transport`] implementations.
//! - [`fuse`]: the FUSE mount: a flat directory of databases and their side files,
//!   POSIX locks served by the file system, virtual `-pos`/`.primary` files, and the
//!   mount lifecycle (stale mounts, signals, clean unmount).
//! - [`archive`]: shipping every LTX file to the [`sink::SnapshotSink`] while primary
//!   (Litestream 0.5 layout with compaction levels, no database checksums, recorded
//!   positions beside it), restoring from it, and starting or catching up nodes from it.
//! - [`replicate`]: the primary's per-replica streams and the replica's apply loop.
//! - [`halt`]: write forwarding: the HALT lock a replica takes on the primary
//!   (`POST /halt`, `POST /tx`, `DELETE /halt`), its expiry, and the client and
//!   mount-side traits it runs through.
//! - [`node`]: the node's role (static lease: primary or replica; Consul/etcd: elected,
//!   with step-down, handoff and the cluster id kept in the lease store) and its services.
//! - [`progress`]: progress of long transfers: a bar on a terminal, a line per tenth
//!   otherwise.
//! - [`proxy`]: the optional HTTP proxy in front of the application (`proxy:`):
//!   read-your-writes with the `__txid` cookie, writes forwarded to the primary,
//!   `/litefs/health`, and its own accept loop with the server timeouts.
//! - [`exec`]: the application litefs runs once the node is in sync (`exec`, `-- CMD`):
//!   migrations in order, then a supervised command whose exit ends litefs.
//! - [`cli`]: the command line (`litefs mount`, `litefs run`, `litefs ltx ...`); the binary in
//!   `src/main.rs` only calls into it.

pub mod archive;
pub mod cli;
pub mod config;
pub mod exec;
pub mod fuse;
pub mod halt;
pub mod lease;
pub mod ltx;
pub mod node;
pub mod progress;
pub mod proxy;
pub mod replicate;
pub mod sink;
pub mod store;
pub mod transport;

#[path = "../backends/mod.rs"]
pub mod backends;
#[path = "../transports/mod.rs"]
pub mod transports;
