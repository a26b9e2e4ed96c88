//! Implementations of [`crate::transport::Transport`]. The HTTP transport comes with
//! the replication issue; nothing here yet, and nothing outside this folder will name
//! a concrete transport.
