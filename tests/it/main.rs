//! Integration tests: one binary, one module per area.

mod store;
mod store_bench;
mod store_vfs;
