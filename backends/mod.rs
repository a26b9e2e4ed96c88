//! Implementations of the lease and archive seams, and the one place that builds
//! them from config.
//!
//! - [`static_lease`]: [`StaticLeaser`], `lease.type: static`.
//! - [`object_store_sink`]: [`ObjectStoreSink`], `backup.type: file | s3`.
//! - [`consul`]: [`ConsulLeaser`], `lease.type: consul` (session + KV lock).
//! - [`etcd`]: [`EtcdLeaser`], `lease.type: etcd` (lease + election transaction).
//! - [`conformance`]: the leaser conformance suite, and [`faulty`]: a leaser
//!   wrapper that injects store outages (both test infrastructure).
//!
//! Nothing outside this module names a concrete backend: the node holds
//! `Arc<dyn Leaser>` and `Arc<dyn SnapshotSink>`.

pub mod conformance;
pub mod consul;
pub mod etcd;
pub mod faulty;
pub mod object_store_sink;
pub mod static_lease;

use std::sync::Arc;

pub use consul::{ConsulLease, ConsulLeaser};
pub use etcd::{EtcdLease, EtcdLeaser};
pub use object_store_sink::ObjectStoreSink;
pub use static_lease::{StaticLease, StaticLeaser};

use crate::config::{BackupConfig, BackupType, LeaseConfig, LeaseType};
use crate::lease::{Leaser, PrimaryInfo};
use crate::sink::SnapshotSink;

/// Why a backend could not be built from a (validated) config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// `lease.type` is not set (a config that passed validation always has it).
    #[error("lease.type is not set: one of consul, static, etcd")]
    MissingLeaseType,
    /// The backend could not be set up (directory not creatable, client not
    /// configurable).
    #[error("{key}: {message}")]
    Backend {
        /// Config key the problem is about.
        key: &'static str,
        /// What failed.
        message: String,
    },
    /// The config asks for something that cannot be built.
    #[error("{key}: {message}")]
    Invalid {
        /// Config key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Builds the leaser `lease.type` names.
///
/// # Errors
/// [`BuildError::Invalid`] for a consul URL or etcd settings that cannot work,
/// [`BuildError::MissingLeaseType`] for an unvalidated config without a type.
/// Nothing is contacted here: an unreachable store shows up as a retryable
/// [`crate::lease::LeaseError::Unavailable`] on first use.
pub fn build_leaser(cfg: &LeaseConfig) -> Result<Arc<dyn Leaser>, BuildError> {
    match cfg.kind {
        None => Err(BuildError::MissingLeaseType),
        Some(LeaseType::Static) => {
            let primary = PrimaryInfo {
                hostname: cfg.hostname.clone(),
                advertise_url: cfg.advertise_url.clone(),
            };
            Ok(Arc::new(StaticLeaser::new(primary, cfg.candidate)))
        }
        Some(LeaseType::Consul) => Ok(Arc::new(ConsulLeaser::new(
            cfg,
            std::env::var("CONSUL_HTTP_TOKEN").ok(),
        )?)),
        Some(LeaseType::Etcd) => Ok(Arc::new(EtcdLeaser::new(cfg)?)),
    }
}

/// Builds the archive `backup.type` names; `Ok(None)` when no backup is configured.
///
/// # Errors
/// [`BuildError::Backend`] if the directory or client cannot be set up;
/// [`BuildError::Invalid`] for `litefs-cloud` or a missing `path`/`bucket` (a
/// validated config has them).
pub fn build_sink(cfg: &BackupConfig) -> Result<Option<Arc<dyn SnapshotSink>>, BuildError> {
    match cfg.kind {
        None => Ok(None),
        Some(BackupType::File) => {
            let Some(path) = cfg.path.as_deref().filter(|p| !p.is_empty()) else {
                return Err(BuildError::Invalid {
                    key: "backup.path",
                    message: "is required for a file backup".to_string(),
                });
            };
            Ok(Some(Arc::new(ObjectStoreSink::local(
                std::path::Path::new(path),
            )?)))
        }
        Some(BackupType::S3) => {
            if cfg.bucket.as_deref().unwrap_or("").is_empty() {
                return Err(BuildError::Invalid {
                    key: "backup.bucket",
                    message: "is required for an s3 backup".to_string(),
                });
            }
            Ok(Some(Arc::new(ObjectStoreSink::s3(cfg)?)))
        }
        Some(BackupType::LitefsCloud) => Err(BuildError::Invalid {
            key: "backup.type",
            message: "LiteFS Cloud was shut down in October 2024; use file or s3".to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_config_builds_a_static_leaser() {
        let cfg = LeaseConfig {
            kind: Some(LeaseType::Static),
            hostname: "p".into(),
            advertise_url: "http://p:20202".into(),
            candidate: false,
            ..LeaseConfig::default()
        };
        let leaser = build_leaser(&cfg).unwrap();
        assert_eq!(leaser.type_name(), "static");
        assert!(!leaser.candidate());
        let primary = leaser.primary_info().await.unwrap().unwrap();
        assert_eq!(primary.advertise_url, "http://p:20202");
    }

    #[test]
    fn consul_and_etcd_configs_build_their_leasers() {
        let mut cfg = LeaseConfig {
            kind: Some(LeaseType::Consul),
            hostname: "n1".into(),
            advertise_url: "http://n1:20202".into(),
            ..LeaseConfig::default()
        };
        cfg.consul.url = "http://127.0.0.1:8500/prefix".into();
        cfg.consul.key = "litefs".into();
        assert_eq!(build_leaser(&cfg).unwrap().type_name(), "consul");
        cfg.consul.url = "127.0.0.1:8500".into();
        assert!(matches!(
            build_leaser(&cfg).unwrap_err(),
            BuildError::Invalid {
                key: "lease.consul.url",
                ..
            }
        ));

        cfg.kind = Some(LeaseType::Etcd);
        cfg.etcd.endpoints = vec!["http://127.0.0.1:2379".into()];
        cfg.etcd.key = "litefs".into();
        let leaser = build_leaser(&cfg).unwrap();
        assert_eq!(leaser.type_name(), "etcd");
        assert_eq!(leaser.node_info().hostname, "n1");
        assert_eq!(
            build_leaser(&LeaseConfig::default()).unwrap_err(),
            BuildError::MissingLeaseType
        );
    }

    #[tokio::test]
    async fn sinks() {
        assert!(build_sink(&BackupConfig::default()).unwrap().is_none());

        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        let file = BackupConfig {
            kind: Some(BackupType::File),
            path: Some(archive.display().to_string()),
            ..BackupConfig::default()
        };
        let sink = build_sink(&file).unwrap().unwrap();
        assert_eq!(sink.type_name(), "file");
        assert!(archive.is_dir(), "the directory is created");
        assert!(sink.databases().await.unwrap().is_empty());

        let s3 = BackupConfig {
            kind: Some(BackupType::S3),
            ..BackupConfig::default()
        };
        assert!(matches!(
            build_sink(&s3),
            Err(BuildError::Invalid {
                key: "backup.bucket",
                ..
            })
        ));
        let cloud = BackupConfig {
            kind: Some(BackupType::LitefsCloud),
            ..BackupConfig::default()
        };
        assert!(
            build_sink(&cloud)
                .unwrap_err()
                .to_string()
                .contains("October 2024")
        );
    }
}
