//! The configuration: LiteFS 0.5's `litefs.yml` schema, the seed-era flat form, and
//! this project's additions (`lease.type: etcd`, `backup.type: file | s3`).
//!
//! Loading is: read the file, expand `${VAR}` ([`expand`]), parse the YAML strictly
//! (every struct rejects unknown keys), map seed-era keys ([`legacy`]), check the
//! values ([`Config::validate`]), and fill in the node's identity the way LiteFS does
//! at start-up ([`LeaseConfig::hostname`], [`LeaseConfig::advertise_url`]).
//!
//! Key names and defaults are LiteFS's, so an existing file loads unchanged. Every
//! error names the file, the line and the key ([`ConfigError`]).

pub mod duration;
mod error;
pub mod expand;
pub mod legacy;
pub mod locate;
mod parse_error;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

pub use error::{ConfigError, Location, ValidationError};

/// The embedded default config (`config/litefs.yml`): a single node that is its own
/// primary (static lease), with a local file backup. Used when no file is found.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/litefs.yml");

/// Name used in messages for the embedded default.
pub const EMBEDDED_NAME: &str = "<embedded config/litefs.yml>";

/// LiteFS's default HTTP port, used to derive `lease.advertise-url`.
pub const DEFAULT_HTTP_PORT: u16 = 20202;

/// A whole configuration, after loading and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Exit when a start-up or runtime error occurs, instead of staying up so an
    /// operator can inspect the node. Default true.
    pub exit_on_error: bool,
    /// Start `exec` before this node has caught up with the primary.
    pub skip_sync: bool,
    /// Recompute the full database checksum after every commit (slow; for tests).
    pub strict_verify: bool,
    /// Commands to run once the node is ready; all but the last run to completion in
    /// order, the last is supervised. `litefs mount -- CMD` replaces the list.
    pub exec: Vec<ExecConfig>,
    /// Where databases and LTX files are kept.
    pub data: DataConfig,
    /// The FUSE mount.
    pub fuse: FuseConfig,
    /// The node's HTTP API server (replication, control).
    pub http: HttpConfig,
    /// The optional HTTP proxy in front of the application.
    pub proxy: ProxyConfig,
    /// Leader election.
    pub lease: LeaseConfig,
    /// Archive of LTX files.
    pub backup: BackupConfig,
    /// Logging.
    pub log: LogConfig,
    /// LiteFS's on-disk trace log; accepted so LiteFS files load unchanged.
    pub tracing: TracingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            exit_on_error: true,
            skip_sync: false,
            strict_verify: false,
            exec: Vec::new(),
            data: DataConfig::default(),
            fuse: FuseConfig::default(),
            http: HttpConfig::default(),
            proxy: ProxyConfig::default(),
            lease: LeaseConfig::default(),
            backup: BackupConfig::default(),
            log: LogConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

/// One `exec` entry. In the file, `exec` is a string (one command) or a list of these.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExecConfig {
    /// Shell-style command line.
    pub cmd: String,
    /// Run only on a node that can become primary (e.g. migrations).
    #[serde(default)]
    pub if_candidate: bool,
}

/// `data` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DataConfig {
    /// Data directory. Default `/var/lib/litefs`.
    pub dir: PathBuf,
    /// Compress LTX files. Default true.
    pub compress: bool,
    /// How long LTX files are kept. Default 10m.
    #[serde(deserialize_with = "duration::de")]
    pub retention: Duration,
    /// How often retention runs. Default 1m.
    #[serde(deserialize_with = "duration::de")]
    pub retention_monitor_interval: Duration,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: PathBuf::from("/var/lib/litefs"),
            compress: true,
            retention: Duration::from_secs(600),
            retention_monitor_interval: Duration::from_secs(60),
        }
    }
}

/// `fuse` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct FuseConfig {
    /// Mount point. Default `/litefs`.
    pub dir: PathBuf,
    /// Let users other than the mounting one use the mount (needs `user_allow_other`).
    pub allow_other: bool,
    /// Log every FUSE call.
    pub debug: bool,
    /// Serve FUSE requests over io_uring when the kernel offers it. Default true.
    pub io_uring: bool,
    /// Threads per CPU serving FUSE requests over io_uring. Default 2.
    pub io_uring_threads: usize,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            dir: PathBuf::from("/litefs"),
            allow_other: false,
            debug: false,
            io_uring: true,
            io_uring_threads: crate::fuse::DEFAULT_IO_URING_THREADS,
        }
    }
}

/// `http` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HttpConfig {
    /// Bind address, Go style (`:20202` means all interfaces). Default `:20202`.
    pub addr: String,
    /// Limit on serving one snapshot to a replica; unset means no limit.
    #[serde(deserialize_with = "duration::de_opt")]
    pub snapshot_timeout: Option<Duration>,
    /// Shared secret every HTTP request to a node must carry as
    /// `Authorization: Bearer <token>` (except `GET /metrics`); the node sends it to
    /// its primary too. Unset: the [`AUTH_TOKEN_ENV`] environment variable; neither: no
    /// check.
    pub auth_token: Option<String>,
    /// How long the primary keeps a replica's HALT lock (write forwarding) before it
    /// drops it by itself. Default 30s.
    #[serde(deserialize_with = "duration::de_opt")]
    pub halt_lock_ttl: Option<Duration>,
}

/// Environment variable holding the auth token when `http.auth-token` is not set; the
/// `litefs status`, `export` and `import` commands read it too.
pub const AUTH_TOKEN_ENV: &str = "LITEFS_AUTH_TOKEN";

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: format!(":{DEFAULT_HTTP_PORT}"),
            snapshot_timeout: None,
            auth_token: None,
            halt_lock_ttl: None,
        }
    }
}

impl HttpConfig {
    /// `auth-token`, else [`AUTH_TOKEN_ENV`]; an empty value is no token.
    pub fn resolved_auth_token(&self) -> Option<String> {
        self.auth_token
            .clone()
            .or_else(|| std::env::var(AUTH_TOKEN_ENV).ok())
            .filter(|t| !t.is_empty())
    }

    /// The port of [`HttpConfig::addr`].
    ///
    /// # Errors
    /// A message when the address has no numeric port.
    pub fn port(&self) -> Result<u16, String> {
        let port = self.addr.rsplit_once(':').map(|(_, p)| p).ok_or_else(|| {
            format!(
                "'{}' has no port; write it like \":20202\" or \"127.0.0.1:20202\"",
                self.addr
            )
        })?;
        port.parse()
            .map_err(|_| format!("'{}' has an invalid port '{port}'", self.addr))
    }
}

/// `proxy` section. The proxy is off unless `addr` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ProxyConfig {
    /// Bind address of the proxy.
    pub addr: Option<String>,
    /// `host:port` of the application behind it.
    pub target: Option<String>,
    /// Database whose TXID drives read-your-writes.
    pub db: Option<String>,
    /// Replica lag above which `/litefs/health` fails. Default 10s.
    #[serde(deserialize_with = "duration::de")]
    pub max_lag: Duration,
    /// Log every proxied request.
    pub debug: bool,
    /// Path patterns sent straight to the target.
    pub passthrough: Vec<String>,
    /// Path patterns always forwarded to the primary.
    pub always_forward: Vec<String>,
    /// How long a write waits for a primary to be known. Default 5s.
    #[serde(deserialize_with = "duration::de")]
    pub primary_redirect_timeout: Duration,
    /// HTTP server read timeout; unset: the server's default.
    #[serde(deserialize_with = "duration::de_opt")]
    pub read_timeout: Option<Duration>,
    /// HTTP server read-header timeout; unset: the server's default.
    #[serde(deserialize_with = "duration::de_opt")]
    pub read_header_timeout: Option<Duration>,
    /// HTTP server write timeout; unset: the server's default.
    #[serde(deserialize_with = "duration::de_opt")]
    pub write_timeout: Option<Duration>,
    /// HTTP server idle timeout; unset: the server's default.
    #[serde(deserialize_with = "duration::de_opt")]
    pub idle_timeout: Option<Duration>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            addr: None,
            target: None,
            db: None,
            max_lag: Duration::from_secs(10),
            debug: false,
            passthrough: Vec::new(),
            always_forward: Vec::new(),
            primary_redirect_timeout: Duration::from_secs(5),
            read_timeout: None,
            read_header_timeout: None,
            write_timeout: None,
            idle_timeout: None,
        }
    }
}

/// `lease.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseType {
    /// Consul session + KV lock (LiteFS's default for clusters).
    Consul,
    /// A fixed primary named in the config.
    Static,
    /// etcd lease + transaction on a key.
    Etcd,
}

impl LeaseType {
    /// The name as written in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseType::Consul => "consul",
            LeaseType::Static => "static",
            LeaseType::Etcd => "etcd",
        }
    }
}

impl fmt::Display for LeaseType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `lease` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LeaseConfig {
    /// Which leaser to use. Required; `None` only before validation.
    #[serde(rename = "type")]
    pub kind: Option<LeaseType>,
    /// This node's hostname (static lease: the primary's). When not written, filled at
    /// load: the host of `advertise-url` on a static replica, else the system hostname.
    pub hostname: String,
    /// URL other nodes use to reach this node's API (static lease: the primary's).
    /// When not written, filled at load with `http://<hostname>:<http port>`.
    pub advertise_url: String,
    /// Whether this node may become primary (static lease: whether it *is* the
    /// primary). Default true.
    pub candidate: bool,
    /// Ask for the lease as soon as this candidate has caught up.
    pub promote: bool,
    /// Wait after losing the primary before reconnecting or taking over. Default 1s.
    #[serde(deserialize_with = "duration::de")]
    pub reconnect_delay: Duration,
    /// Wait after a forced demotion before trying to become primary again. Default 10s.
    #[serde(deserialize_with = "duration::de")]
    pub demote_delay: Duration,
    /// Replicate only these databases (all when empty).
    pub databases: Vec<String>,
    /// `lease.consul`.
    pub consul: ConsulConfig,
    /// `lease.etcd`.
    pub etcd: EtcdConfig,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            kind: None,
            hostname: String::new(),
            advertise_url: String::new(),
            candidate: true,
            promote: false,
            reconnect_delay: Duration::from_secs(1),
            demote_delay: Duration::from_secs(10),
            databases: Vec::new(),
            consul: ConsulConfig::default(),
            etcd: EtcdConfig::default(),
        }
    }
}

/// `lease.consul` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ConsulConfig {
    /// Consul's HTTP API URL; a password in it is the ACL token, a path is a key prefix.
    pub url: String,
    /// KV key of the lock.
    pub key: String,
    /// Session TTL. Default 10s.
    #[serde(deserialize_with = "duration::de")]
    pub ttl: Duration,
    /// Session lock-delay. Default 1s.
    #[serde(deserialize_with = "duration::de")]
    pub lock_delay: Duration,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            url: String::new(),
            key: String::new(),
            ttl: Duration::from_secs(10),
            lock_delay: Duration::from_secs(1),
        }
    }
}

/// `lease.etcd` section (this project's addition).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct EtcdConfig {
    /// Client URLs of the etcd cluster.
    pub endpoints: Vec<String>,
    /// Key of the election.
    pub key: String,
    /// Lease TTL, whole seconds (etcd's unit). Default 10s.
    #[serde(deserialize_with = "duration::de")]
    pub ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            key: String::new(),
            ttl: Duration::from_secs(10),
        }
    }
}

/// `backup.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupType {
    /// A local directory.
    File,
    /// An S3 bucket (any S3-compatible endpoint).
    S3,
    /// LiteFS Cloud: parsed only to refuse it with an explanation.
    LitefsCloud,
}

/// `backup` section. No backup unless `type` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BackupConfig {
    /// `file` or `s3`; `None`: no backup.
    #[serde(rename = "type")]
    pub kind: Option<BackupType>,
    /// `file`: the directory. `s3`: the key prefix inside the bucket.
    pub path: Option<String>,
    /// `s3`: bucket name.
    pub bucket: Option<String>,
    /// `s3`: endpoint URL for S3-compatible services; unset: AWS.
    pub endpoint: Option<String>,
    /// `s3`: region.
    pub region: Option<String>,
    /// `s3`: access key id; unset: the usual AWS environment and profile chain.
    pub access_key_id: Option<String>,
    /// `s3`: secret access key.
    pub secret_access_key: Option<String>,
    /// `s3`: path-style URLs (needed by most S3-compatible servers).
    pub force_path_style: bool,
    /// How long after a commit its LTX file is shipped (batching). Default 1s.
    #[serde(deserialize_with = "duration::de")]
    pub sync_interval: Duration,
    /// How often a full snapshot is written. Default 24h.
    #[serde(deserialize_with = "duration::de")]
    pub snapshot_interval: Duration,
    /// How long archived files are kept. Default 24h.
    #[serde(deserialize_with = "duration::de")]
    pub retention: Duration,
    /// Compaction levels 1, 2, ...: how often the files of the level below are merged
    /// into one file of this level (Litestream 0.5 layout). At most 8. Default 30s,
    /// 5m, 1h.
    #[serde(deserialize_with = "duration::de_list")]
    pub compaction_levels: Vec<Duration>,
    /// Most level-0 files shipped per database and sync; above it, consecutive
    /// transactions share one file (restore `-txid` then stops only at file ends).
    /// Default 256.
    pub max_files_per_sync: usize,
    /// At start-up, bring missing or lagging databases to the archive's newest state
    /// before mounting. Default true.
    pub bootstrap: bool,
    /// LiteFS Cloud's keys, accepted only so that such a file gets the explanation
    /// that the service is gone instead of an "unknown key" error.
    pub url: Option<String>,
    /// See [`BackupConfig::url`].
    pub cluster: Option<String>,
    /// See [`BackupConfig::url`].
    pub auth_token: Option<String>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            kind: None,
            path: None,
            bucket: None,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            force_path_style: false,
            sync_interval: Duration::from_secs(1),
            snapshot_interval: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(24 * 3600),
            bootstrap: true,
            max_files_per_sync: 256,
            compaction_levels: vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ],
            url: None,
            cluster: None,
            auth_token: None,
        }
    }
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `log` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// Prefix lines with a timestamp.
    pub timestamp: bool,
    /// Debug-level logging.
    pub debug: bool,
}

/// `tracing` section: LiteFS's rotating on-disk trace log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct TracingConfig {
    /// Default true (the log is written only when `path` is set).
    pub enabled: bool,
    /// File to write; unset: no trace log.
    pub path: Option<PathBuf>,
    /// Size of one file in MB before rotation. Default 64.
    pub max_size: u64,
    /// Rotated files kept. Default 8.
    pub max_count: u32,
    /// Compress rotated files. Default true.
    pub compress: bool,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            enabled: true,
            path: None,
            max_size: 64,
            max_count: 8,
            compress: true,
        }
    }
}

/// `exec`: a string or a list of `{cmd, if-candidate}`.
#[derive(Debug, Default)]
struct ExecList(Vec<ExecConfig>);

impl<'de> Deserialize<'de> for ExecList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExecList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a command string or a list of {cmd, if-candidate}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ExecList, E> {
                Ok(ExecList(vec![ExecConfig {
                    cmd: v.to_string(),
                    if_candidate: false,
                }]))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ExecList, E> {
                Ok(ExecList(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ExecList, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = seq.next_element::<ExecConfig>()? {
                    out.push(e);
                }
                Ok(ExecList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// The top level as written: modern sections plus the seed-era flat keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
struct RawConfig {
    exit_on_error: Option<bool>,
    skip_sync: Option<bool>,
    strict_verify: Option<bool>,
    exec: Option<ExecList>,
    data: Option<DataConfig>,
    fuse: Option<FuseConfig>,
    http: Option<HttpConfig>,
    proxy: Option<ProxyConfig>,
    lease: Option<LeaseConfig>,
    backup: Option<BackupConfig>,
    log: Option<LogConfig>,
    tracing: Option<TracingConfig>,
    // Seed-era flat form; see `legacy`.
    mount_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    debug: Option<bool>,
    candidate: Option<bool>,
    retention: Option<legacy::LegacyRetention>,
    consul: Option<legacy::LegacyConsul>,
    #[serde(rename = "static")]
    static_: Option<legacy::LegacyStatic>,
}

/// Where a loaded config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file on disk.
    File(PathBuf),
    /// The embedded default ([`EMBEDDED_DEFAULT`]), because no file was found.
    Embedded,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Embedded => f.write_str(EMBEDDED_NAME),
        }
    }
}

/// Reads one environment variable; `None` when it is not set.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// How to read a config.
#[derive(Clone, Copy)]
pub struct LoadOptions<'a> {
    /// Expand `${VAR}` (LiteFS's default; `-no-expand-env` turns it off).
    pub expand_env: bool,
    /// Reads a variable; `None` means the process environment.
    pub env: Option<EnvLookup<'a>>,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions {
            expand_env: true,
            env: None,
        }
    }
}

impl fmt::Debug for LoadOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadOptions")
            .field("expand_env", &self.expand_env)
            .field("env", &self.env.map(|_| "custom"))
            .finish()
    }
}

/// The standard places a config is looked for when no `-config` is given, in order:
/// `./litefs.yml`, `~/litefs.yml`, `/etc/litefs.yml`.
pub fn search_paths() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("litefs.yml")];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        paths.push(PathBuf::from(home).join("litefs.yml"));
    }
    paths.push(PathBuf::from("/etc/litefs.yml"));
    paths
}

impl Config {
    /// Loads `path` if given; otherwise the first of [`search_paths`] that exists;
    /// otherwise the embedded default. Returns where the config came from.
    ///
    /// # Errors
    /// [`ConfigError`] when a file cannot be read, parsed or validated. An explicit
    /// `path` that does not exist is an error (no fallback).
    pub fn find_and_load(
        path: Option<&Path>,
        opts: LoadOptions<'_>,
    ) -> Result<(Config, ConfigSource), ConfigError> {
        if let Some(p) = path {
            return Ok((Config::load(p, opts)?, ConfigSource::File(p.to_path_buf())));
        }
        for p in search_paths() {
            match std::fs::read_to_string(&p) {
                Ok(text) => {
                    let cfg = Config::parse(&text, &p.display().to_string(), opts)?;
                    return Ok((cfg, ConfigSource::File(p)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ConfigError::Read { path: p, source }),
            }
        }
        Ok((Config::embedded_default(opts)?, ConfigSource::Embedded))
    }

    /// Reads, parses and validates one file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if it cannot be read; otherwise as [`Config::parse`].
    pub fn load(path: &Path, opts: LoadOptions<'_>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), opts)
    }

    /// The embedded default ([`EMBEDDED_DEFAULT`]).
    ///
    /// # Errors
    /// Only if an environment variable it references makes it invalid.
    pub fn embedded_default(opts: LoadOptions<'_>) -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, EMBEDDED_NAME, opts)
    }

    /// Parses and validates config text. `file` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::UnknownKey`], [`ConfigError::Syntax`] or [`ConfigError::Invalid`],
    /// each with the file, line and key.
    pub fn parse(text: &str, file: &str, opts: LoadOptions<'_>) -> Result<Config, ConfigError> {
        let text = if opts.expand_env {
            let process_env = |k: &str| std::env::var(k).ok();
            let lookup: &dyn Fn(&str) -> Option<String> = opts.env.unwrap_or(&process_env);
            let expanded = expand::expand(text, lookup);
            for name in &expanded.unset {
                tracing::warn!(file, variable = %name, "config references an unset environment variable; it expands to an empty string");
            }
            expanded.text
        } else {
            text.to_string()
        };
        let at = |key: &str| {
            let pos = locate::locate_nearest(&text, key);
            Location {
                file: file.to_string(),
                line: pos.map(|p| p.line),
                column: pos.map(|p| p.column),
            }
        };
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| parse_error::yaml_error(&e, &text, file))?
        };
        let written = |key: &str| locate::locate(&text, key).is_some();
        let mut cfg = Config::from_raw(raw, &written).map_err(|e| ConfigError::Invalid {
            at: at(&e.key),
            key: e.key,
            message: e.message,
        })?;
        cfg.validate().map_err(|e| ConfigError::Invalid {
            at: at(&e.key),
            key: e.key,
            message: e.message,
        })?;
        cfg.fill_node_identity();
        Ok(cfg)
    }

    fn from_raw(raw: RawConfig, written: &dyn Fn(&str) -> bool) -> Result<Config, ValidationError> {
        let defaults = Config::default();
        let mut cfg = Config {
            exit_on_error: raw.exit_on_error.unwrap_or(defaults.exit_on_error),
            skip_sync: raw.skip_sync.unwrap_or(defaults.skip_sync),
            strict_verify: raw.strict_verify.unwrap_or(defaults.strict_verify),
            exec: raw.exec.map(|e| e.0).unwrap_or_default(),
            data: raw.data.unwrap_or_default(),
            fuse: raw.fuse.unwrap_or_default(),
            http: raw.http.unwrap_or_default(),
            proxy: raw.proxy.unwrap_or_default(),
            lease: raw.lease.unwrap_or_default(),
            backup: raw.backup.unwrap_or_default(),
            log: raw.log.unwrap_or_default(),
            tracing: raw.tracing.unwrap_or_default(),
        };
        let flat = legacy::Legacy {
            mount_dir: raw.mount_dir,
            data_dir: raw.data_dir,
            debug: raw.debug,
            candidate: raw.candidate,
            retention: raw.retention,
            consul: raw.consul,
            static_: raw.static_,
        };
        flat.apply(&mut cfg, written)?;
        Ok(cfg)
    }

    /// Fills `lease.hostname` and `lease.advertise-url` when they are not written,
    /// the way LiteFS does at start-up.
    fn fill_node_identity(&mut self) {
        let l = &mut self.lease;
        if l.hostname.is_empty() {
            l.hostname = if l.kind == Some(LeaseType::Static) && !l.candidate {
                url_host(&l.advertise_url).unwrap_or_default().to_string()
            } else {
                system_hostname()
            };
        }
        if l.advertise_url.is_empty() {
            let port = self.http.port().unwrap_or(DEFAULT_HTTP_PORT);
            l.advertise_url = format!("http://{}:{port}", l.hostname);
        }
    }

    /// One line describing the node, for the log.
    pub fn summary(&self) -> String {
        let role = match (self.lease.kind, self.lease.candidate) {
            (Some(LeaseType::Static), true) => "primary (static lease)".to_string(),
            (Some(LeaseType::Static), false) => {
                format!("replica of {} (static lease)", self.lease.advertise_url)
            }
            (Some(k), true) => format!("candidate ({k} lease)"),
            (Some(k), false) => format!("replica only ({k} lease)"),
            (None, _) => "no lease".to_string(),
        };
        let backup = match self.backup.kind {
            Some(BackupType::File) => format!("file {}", self.backup.path.as_deref().unwrap_or("")),
            Some(BackupType::S3) => format!("s3 {}", self.backup.bucket.as_deref().unwrap_or("")),
            _ => "none".to_string(),
        };
        format!(
            "{role}; fuse.dir {}; data.dir {}; http {}; backup {backup}",
            self.fuse.dir.display(),
            self.data.dir.display(),
            self.http.addr
        )
    }
}

fn is_http_url(s: &str) -> bool {
    url_host(s).is_some_and(|h| !h.is_empty())
}

/// Host part of an `http(s)://[user@]host[:port][/path]` URL.
fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split(']').next();
    }
    Some(hostport.split(':').next().unwrap_or(""))
}

/// The system hostname, as LiteFS's `os.Hostname()`; `localhost` if unreadable.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("http://primary:20202"), Some("primary"));
        assert_eq!(url_host("https://u:p@h.example/x"), Some("h.example"));
        assert_eq!(url_host("http://[::1]:20202"), Some("::1"));
        assert_eq!(url_host("primary:20202"), None);
    }

    #[test]
    fn http_port() {
        let mut h = HttpConfig::default();
        assert_eq!(h.port(), Ok(20202));
        h.addr = "127.0.0.1:3000".into();
        assert_eq!(h.port(), Ok(3000));
        h.addr = "localhost".into();
        assert!(h.port().is_err());
    }
}
