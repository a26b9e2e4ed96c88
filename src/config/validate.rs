//! Semantic checks of a parsed config: what a file can say but a node cannot run.

use std::time::Duration;

use super::{BackupType, Config, LeaseType, ValidationError, is_http_url};

impl Config {
    /// Checks that the configuration can work. Reports the first problem found.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the key and what is allowed.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let err = |k: &str, m: String| Err(ValidationError::new(k, m));
        let positive = |k: &str, d: Duration| {
            if d.is_zero() {
                err(k, "must be a positive duration, like \"10s\"".to_string())
            } else {
                Ok(())
            }
        };

        for (i, e) in self.exec.iter().enumerate() {
            if e.cmd.trim().is_empty() {
                return err(
                    &format!("exec[{i}].cmd"),
                    "is empty; give the command to run".into(),
                );
            }
        }

        if self.data.dir.as_os_str().is_empty() {
            return err("data.dir", "must not be empty".into());
        }
        if self.fuse.dir.as_os_str().is_empty() {
            return err("fuse.dir", "must not be empty".into());
        }
        if self.data.dir.starts_with(&self.fuse.dir) {
            return err(
                "data.dir",
                format!(
                    "'{}' is inside the mount directory '{}'; the mount would hide it. Use a directory outside fuse.dir",
                    self.data.dir.display(),
                    self.fuse.dir.display()
                ),
            );
        }
        if self.fuse.dir.starts_with(&self.data.dir) {
            return err(
                "fuse.dir",
                format!(
                    "'{}' is inside the data directory '{}'; use a directory outside data.dir",
                    self.fuse.dir.display(),
                    self.data.dir.display()
                ),
            );
        }
        if self.fuse.io_uring_threads == 0 || self.fuse.io_uring_threads > 64 {
            return err(
                "fuse.io-uring-threads",
                format!(
                    "is {}; give the threads per CPU from 1 to 64 (or set fuse.io-uring: false)",
                    self.fuse.io_uring_threads
                ),
            );
        }
        positive("data.retention", self.data.retention)?;
        positive(
            "data.retention-monitor-interval",
            self.data.retention_monitor_interval,
        )?;

        if let Err(m) = self.http.port() {
            return err("http.addr", m);
        }

        if self.proxy.addr.is_some() {
            if self.proxy.target.as_deref().unwrap_or("").is_empty() {
                return err(
                    "proxy.target",
                    "is required when proxy.addr is set: the application's host:port".into(),
                );
            }
            if self.proxy.db.as_deref().unwrap_or("").is_empty() {
                return err(
                    "proxy.db",
                    "is required when proxy.addr is set: the database that tracks TXIDs".into(),
                );
            }
            positive("proxy.max-lag", self.proxy.max_lag)?;
        }

        self.validate_lease()?;
        self.validate_backup()
    }

    fn validate_lease(&self) -> Result<(), ValidationError> {
        let l = &self.lease;
        let err = |k: &str, m: &str| Err(ValidationError::new(k, m));
        let Some(kind) = l.kind else {
            return err("lease.type", "is required: one of consul, static, etcd");
        };
        if !l.advertise_url.is_empty() && !is_http_url(&l.advertise_url) {
            return Err(ValidationError::new(
                "lease.advertise-url",
                format!("'{}' is not an http:// or https:// URL", l.advertise_url),
            ));
        }
        if l.reconnect_delay.is_zero() {
            return err(
                "lease.reconnect-delay",
                "must be a positive duration, like \"1s\"",
            );
        }
        match kind {
            LeaseType::Static => {
                if !l.candidate && l.advertise_url.is_empty() {
                    return err(
                        "lease.advertise-url",
                        "is required for a static lease when candidate is false: the primary's URL, e.g. http://primary:20202",
                    );
                }
            }
            LeaseType::Consul => {
                if l.consul.url.is_empty() {
                    return err(
                        "lease.consul.url",
                        "is required for a consul lease, e.g. http://127.0.0.1:8500",
                    );
                }
                if !is_http_url(&l.consul.url) {
                    return Err(ValidationError::new(
                        "lease.consul.url",
                        format!("'{}' is not an http:// or https:// URL", l.consul.url),
                    ));
                }
                if l.consul.key.is_empty() {
                    return err(
                        "lease.consul.key",
                        "is required for a consul lease, e.g. litefs/my-app",
                    );
                }
                if l.consul.ttl.is_zero() {
                    return err(
                        "lease.consul.ttl",
                        "must be a positive duration, like \"10s\"",
                    );
                }
            }
            LeaseType::Etcd => {
                if l.etcd.endpoints.is_empty()
                    || l.etcd.endpoints.iter().any(|e| e.trim().is_empty())
                {
                    return err(
                        "lease.etcd.endpoints",
                        "needs at least one etcd URL, e.g. [http://127.0.0.1:2379]",
                    );
                }
                if l.etcd.key.is_empty() {
                    return err(
                        "lease.etcd.key",
                        "is required for an etcd lease, e.g. litefs/my-app",
                    );
                }
                if l.etcd.ttl < Duration::from_secs(1) || l.etcd.ttl.subsec_nanos() != 0 {
                    return err(
                        "lease.etcd.ttl",
                        "must be a whole number of seconds, at least \"1s\" (etcd leases count in seconds)",
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_backup(&self) -> Result<(), ValidationError> {
        let b = &self.backup;
        let err = |k: &str, m: &str| Err(ValidationError::new(k, m));
        let Some(kind) = b.kind else {
            let set = [
                ("backup.path", b.path.is_some()),
                ("backup.bucket", b.bucket.is_some()),
                ("backup.endpoint", b.endpoint.is_some()),
            ];
            if let Some((key, _)) = set.iter().find(|(_, s)| *s) {
                return Err(ValidationError::new(
                    *key,
                    "is set but backup.type is not; set backup.type to file or s3",
                ));
            }
            return Ok(());
        };
        match kind {
            BackupType::LitefsCloud => {
                return err(
                    "backup.type",
                    "'litefs-cloud' is no longer available: LiteFS Cloud was shut down in October 2024. \
                     Use 'file' (backup.path: a directory) or 's3' (backup.bucket, backup.path as prefix)",
                );
            }
            BackupType::File => {
                if b.path.as_deref().unwrap_or("").is_empty() {
                    return err(
                        "backup.path",
                        "is required for a file backup: the directory to write to",
                    );
                }
            }
            BackupType::S3 => {
                if b.bucket.as_deref().unwrap_or("").is_empty() {
                    return err("backup.bucket", "is required for an s3 backup");
                }
                if b.access_key_id.is_some() != b.secret_access_key.is_some() {
                    let missing = if b.access_key_id.is_some() {
                        "backup.secret-access-key"
                    } else {
                        "backup.access-key-id"
                    };
                    return err(
                        missing,
                        "is required when the other half of the S3 credentials is set",
                    );
                }
                if let Some(ep) = &b.endpoint
                    && !is_http_url(ep)
                {
                    return Err(ValidationError::new(
                        "backup.endpoint",
                        format!("'{ep}' is not an http:// or https:// URL"),
                    ));
                }
            }
        }
        for (key, present) in [
            ("backup.url", b.url.is_some()),
            ("backup.cluster", b.cluster.is_some()),
            ("backup.auth-token", b.auth_token.is_some()),
        ] {
            if present {
                return err(
                    key,
                    "belongs to LiteFS Cloud, which was shut down in October 2024; remove it",
                );
            }
        }
        for (key, d) in [
            ("backup.sync-interval", b.sync_interval),
            ("backup.snapshot-interval", b.snapshot_interval),
            ("backup.retention", b.retention),
        ] {
            if d.is_zero() {
                return err(key, "must be a positive duration, like \"1s\"");
            }
        }
        if b.max_files_per_sync == 0 {
            return err("backup.max-files-per-sync", "must be at least 1");
        }
        if b.compaction_levels.len() > 8 {
            return err(
                "backup.compaction-levels",
                "has more than 8 levels (Litestream's layout has levels 1 to 8)",
            );
        }
        if b.compaction_levels.iter().any(|d| d.is_zero()) {
            return err(
                "backup.compaction-levels",
                "must hold positive durations, like [30s, 5m, 1h]",
            );
        }
        Ok(())
    }
}
