//! Implementations of [`crate::transport::Transport`]: [`http`] (LiteFS's `/stream`
//! over HTTP/1.1, with this project's versioned binary frames). Nothing outside this
//! folder names a concrete transport.

pub mod http;
