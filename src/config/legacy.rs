//! The seed-era flat form (LiteFS before 0.3, and this project's seed README), mapped
//! onto the modern sections.
//!
//! | flat key | becomes |
//! |---|---|
//! | `mount-dir` | `fuse.dir` |
//! | `data-dir` | `data.dir`; when absent, `.<name>` next to `mount-dir` (`/mnt` -> `/.mnt`), as old LiteFS did |
//! | `debug` | `fuse.debug` |
//! | `candidate` | `lease.candidate` |
//! | `retention.duration`, `retention.monitor-interval` | `data.retention`, `data.retention-monitor-interval` |
//! | `consul.url`, `consul.key`, `consul.ttl`, `consul.lock-delay` | `lease.type: consul` and `lease.consul.*`; `key` defaults to `litefs/primary`, the old default |
//! | `consul.advertise-url`, `consul.hostname` | `lease.advertise-url`, `lease.hostname` |
//! | `static.primary`, `static.hostname`, `static.advertise-url` | `lease.type: static`, `lease.candidate`, `lease.hostname`, `lease.advertise-url` |
//!
//! `http` and `exec` have the same shape in both forms. Anything not in the table takes
//! the modern default (so `consul.lock-delay` defaults to 1s, not the old 5s). Writing a
//! flat key and its modern counterpart in one file is an error: which one wins would be
//! a guess.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::ValidationError;
use super::{Config, LeaseType, duration};

/// The Consul key old LiteFS used when none was configured.
pub const LEGACY_CONSUL_KEY: &str = "litefs/primary";

/// Flat-form keys, as read from the top level of a file.
#[derive(Debug, Default)]
pub(super) struct Legacy {
    pub mount_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub debug: Option<bool>,
    pub candidate: Option<bool>,
    pub retention: Option<LegacyRetention>,
    pub consul: Option<LegacyConsul>,
    pub static_: Option<LegacyStatic>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct LegacyRetention {
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub duration: Option<Duration>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub monitor_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct LegacyConsul {
    pub url: Option<String>,
    pub advertise_url: Option<String>,
    pub hostname: Option<String>,
    pub key: Option<String>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub ttl: Option<Duration>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub lock_delay: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct LegacyStatic {
    pub primary: Option<bool>,
    pub hostname: Option<String>,
    pub advertise_url: Option<String>,
}

impl Legacy {
    /// Applies the flat keys to `cfg`. `written` says whether a modern key is written in
    /// the file (so a flat key can be refused when both are there).
    pub fn apply(
        self,
        cfg: &mut Config,
        written: &dyn Fn(&str) -> bool,
    ) -> Result<(), ValidationError> {
        let set = |flat: &str, modern: &str| -> Result<(), ValidationError> {
            if written(modern) {
                return Err(ValidationError::new(
                    flat,
                    format!(
                        "the seed-era key '{flat}' and '{modern}' are both set; keep only '{modern}'"
                    ),
                ));
            }
            Ok(())
        };
        if let Some(dir) = self.mount_dir {
            set("mount-dir", "fuse.dir")?;
            if self.data_dir.is_none() && !written("data.dir") {
                cfg.data.dir = hidden_sibling(&dir);
            }
            cfg.fuse.dir = dir;
        }
        if let Some(dir) = self.data_dir {
            set("data-dir", "data.dir")?;
            cfg.data.dir = dir;
        }
        if let Some(debug) = self.debug {
            set("debug", "fuse.debug")?;
            cfg.fuse.debug = debug;
        }
        if let Some(candidate) = self.candidate {
            set("candidate", "lease.candidate")?;
            cfg.lease.candidate = candidate;
        }
        if let Some(r) = self.retention {
            if let Some(d) = r.duration {
                set("retention.duration", "data.retention")?;
                cfg.data.retention = d;
            }
            if let Some(d) = r.monitor_interval {
                set(
                    "retention.monitor-interval",
                    "data.retention-monitor-interval",
                )?;
                cfg.data.retention_monitor_interval = d;
            }
        }
        if self.consul.is_some() && self.static_.is_some() {
            return Err(ValidationError::new(
                "static",
                "the seed-era sections 'consul' and 'static' are both set; a node has one lease type",
            ));
        }
        if self.consul.is_some() || self.static_.is_some() {
            set(
                if self.consul.is_some() {
                    "consul"
                } else {
                    "static"
                },
                "lease.type",
            )?;
        }
        if let Some(c) = self.consul {
            cfg.lease.kind = Some(LeaseType::Consul);
            cfg.lease.consul.url = c.url.unwrap_or_default();
            cfg.lease.consul.key = c.key.unwrap_or_else(|| LEGACY_CONSUL_KEY.to_string());
            if let Some(ttl) = c.ttl {
                cfg.lease.consul.ttl = ttl;
            }
            if let Some(d) = c.lock_delay {
                cfg.lease.consul.lock_delay = d;
            }
            if let Some(url) = c.advertise_url {
                set("consul.advertise-url", "lease.advertise-url")?;
                cfg.lease.advertise_url = url;
            }
            if let Some(h) = c.hostname {
                set("consul.hostname", "lease.hostname")?;
                cfg.lease.hostname = h;
            }
        }
        if let Some(s) = self.static_ {
            cfg.lease.kind = Some(LeaseType::Static);
            if let Some(p) = s.primary {
                set("static.primary", "lease.candidate")?;
                cfg.lease.candidate = p;
            }
            if let Some(url) = s.advertise_url {
                set("static.advertise-url", "lease.advertise-url")?;
                cfg.lease.advertise_url = url;
            }
            if let Some(h) = s.hostname {
                set("static.hostname", "lease.hostname")?;
                cfg.lease.hostname = h;
            }
        }
        Ok(())
    }
}

/// `/path/to/mnt` -> `/path/to/.mnt`: where old LiteFS kept data when no `data-dir` was set.
fn hidden_sibling(mount: &Path) -> PathBuf {
    match (mount.parent(), mount.file_name()) {
        (Some(parent), Some(name)) => {
            let mut hidden = std::ffi::OsString::from(".");
            hidden.push(name);
            parent.join(hidden)
        }
        _ => mount.with_extension("data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_sibling_matches_old_litefs() {
        assert_eq!(
            hidden_sibling(Path::new("/path/to/mnt")),
            Path::new("/path/to/.mnt")
        );
        assert_eq!(hidden_sibling(Path::new("/litefs")), Path::new("/.litefs"));
    }
}
