//! Implementations of the lease and archive seams, and the one place that builds
//! them from config.
//!
//! - [`static_lease`]: [`StaticLeaser`], `lease.type: static`.
//! - Consul and etcd leasers, and the object_store archive, come with their issues;
//!   until then [`build_leaser`] and [`build_sink`] say so instead of pretending.
//!
//! Nothing outside this module names a concrete backend: the node holds
//! `Arc<dyn Leaser>` and `Arc<dyn SnapshotSink>`.

pub mod static_lease;

use std::sync::Arc;

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
    /// The backend exists in the schema but not in this build yet.
    #[error("{key}: '{kind}' is not implemented in this build yet (available: {available})")]
    NotImplemented {
        /// Config key that selects it (`lease.type`, `backup.type`).
        key: &'static str,
        /// The value asked for.
        kind: &'static str,
        /// What this build offers.
        available: &'static str,
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
/// [`BuildError::NotImplemented`] for consul and etcd (not in this build yet),
/// [`BuildError::MissingLeaseType`] for an unvalidated config without a type.
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
        Some(kind @ (LeaseType::Consul | LeaseType::Etcd)) => Err(BuildError::NotImplemented {
            key: "lease.type",
            kind: kind.as_str(),
            available: "static",
        }),
    }
}

/// Builds the archive `backup.type` names; `Ok(None)` when no backup is configured.
///
/// # Errors
/// [`BuildError::NotImplemented`] for file and s3 (the archive is not in this build
/// yet); [`BuildError::Invalid`] for `litefs-cloud`.
pub fn build_sink(cfg: &BackupConfig) -> Result<Option<Arc<dyn SnapshotSink>>, BuildError> {
    match cfg.kind {
        None => Ok(None),
        Some(BackupType::File) => Err(BuildError::NotImplemented {
            key: "backup.type",
            kind: "file",
            available: "none",
        }),
        Some(BackupType::S3) => Err(BuildError::NotImplemented {
            key: "backup.type",
            kind: "s3",
            available: "none",
        }),
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
    fn consul_and_etcd_say_they_are_not_implemented() {
        for kind in [LeaseType::Consul, LeaseType::Etcd] {
            let cfg = LeaseConfig {
                kind: Some(kind),
                ..LeaseConfig::default()
            };
            let err = build_leaser(&cfg).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "lease.type: '{kind}' is not implemented in this build yet (available: static)"
                )
            );
        }
        assert_eq!(
            build_leaser(&LeaseConfig::default()).unwrap_err(),
            BuildError::MissingLeaseType
        );
    }

    #[test]
    fn sinks() {
        assert!(build_sink(&BackupConfig::default()).unwrap().is_none());
        let s3 = BackupConfig {
            kind: Some(BackupType::S3),
            ..BackupConfig::default()
        };
        assert!(matches!(
            build_sink(&s3),
            Err(BuildError::NotImplemented { kind: "s3", .. })
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
