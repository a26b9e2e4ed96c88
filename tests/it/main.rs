//! Integration tests: one binary, one module per area.

mod archive;
mod cli_mount;
mod config;
mod consul_server;
mod elect;
mod elect_cluster;
mod etcd_server;
mod exec;
mod fuse;
mod halt;
mod lease_consul;
mod lease_consul_server;
mod lease_etcd;
mod lease_static;
mod ltx_apply;
mod ltx_litestream;
mod ltx_props;
mod ltx_support;
mod ltx_testdata;
mod ops;
mod proxy;
mod repl;
mod store;
mod store_bench;
mod store_vfs;
mod support;
