//! Leaser and SnapshotSink implementations.
