//! Integration tests: one binary, one module per area.

mod cli_mount;
mod config;
mod fuse;
mod support;
