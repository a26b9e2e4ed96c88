//! Config loading: the shipped examples, LiteFS compatibility, errors with lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use litefs::config::{
    BackupType, Config, ConfigError, EMBEDDED_DEFAULT, LeaseType, LoadOptions, LogFormat,
};

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// Parses `text` as `name` with exactly the variables in `vars` set.
fn parse_with(text: &str, name: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |k: &str| env.get(k).cloned();
    Config::parse(
        text,
        name,
        LoadOptions {
            expand_env: true,
            env: Some(&lookup),
        },
    )
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_with(text, "litefs.yml", &[])
}

fn err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:#?}"),
        Err(e) => e,
    }
}

/// (line, key) of an error, asserting the file name.
fn line_and_key(e: &ConfigError) -> (Option<usize>, String) {
    let at = e.location().expect("error has a location");
    assert_eq!(at.file, "litefs.yml");
    (at.line, e.key().unwrap_or_default().to_string())
}

const EXAMPLE_ENV: &[(&str, &str)] = &[
    ("NODE_HOSTNAME", "node1"),
    ("CONSUL_URL", "http://127.0.0.1:8500"),
    ("REGION", "ord"),
    ("PRIMARY_REGION", "ord"),
    ("ETCD_ENDPOINT", "http://127.0.0.1:2379"),
    ("HOSTNAME", "abc123"),
    ("FLY_APP_NAME", "shop"),
    ("FLY_REGION", "ord"),
    ("FLY_CONSUL_URL", "https://:token@consul.fly.io/shop-xyz/"),
];

fn example(name: &str) -> Config {
    let path = config_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    parse_with(&text, name, EXAMPLE_ENV).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_shipped_config_loads_and_validates() {
    let mut names: Vec<String> = std::fs::read_dir(config_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yml"))
        .collect();
    names.sort();
    for expected in [
        "consul.yml",
        "etcd.yml",
        "fly-litefs-0.5.yml",
        "litefs-0.5-all-keys.yml",
        "litefs.yml",
        "seed-flat.yml",
        "static-replica.yml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "config/{expected} missing"
        );
    }
    for name in &names {
        let cfg = example(name);
        assert!(cfg.lease.kind.is_some(), "{name}");
        // The loader fills in the node identity as LiteFS does at start-up.
        assert!(!cfg.lease.hostname.is_empty(), "{name}");
        assert!(cfg.lease.advertise_url.starts_with("http"), "{name}");
    }
}

#[test]
fn embedded_default_is_a_single_static_primary_with_file_backup() {
    let cfg = Config::embedded_default(LoadOptions::default()).unwrap();
    assert_eq!(cfg.lease.kind, Some(LeaseType::Static));
    assert!(cfg.lease.candidate);
    assert_eq!(cfg.lease.hostname, "localhost");
    assert_eq!(cfg.lease.advertise_url, "http://127.0.0.1:20202");
    assert_eq!(cfg.fuse.dir, Path::new("/litefs"));
    assert_eq!(cfg.data.dir, Path::new("/var/lib/litefs"));
    assert_eq!(cfg.backup.kind, Some(BackupType::File));
    assert_eq!(cfg.backup.path.as_deref(), Some("/var/lib/litefs-backup"));
    // It is the file shipped in config/, compiled in.
    assert_eq!(
        EMBEDDED_DEFAULT,
        std::fs::read_to_string(config_dir().join("litefs.yml")).unwrap()
    );
}

#[test]
fn defaults_are_litefs_defaults() {
    let cfg = parse("lease:\n  type: static\n  hostname: me\n").unwrap();
    assert!(cfg.exit_on_error);
    assert!(!cfg.skip_sync);
    assert!(!cfg.strict_verify);
    assert!(cfg.exec.is_empty());
    assert_eq!(cfg.data.dir, Path::new("/var/lib/litefs"));
    assert!(cfg.data.compress);
    assert_eq!(cfg.data.retention, Duration::from_secs(600));
    assert_eq!(cfg.data.retention_monitor_interval, Duration::from_secs(60));
    assert_eq!(cfg.fuse.dir, Path::new("/litefs"));
    assert!(!cfg.fuse.allow_other && !cfg.fuse.debug);
    assert!(cfg.fuse.io_uring);
    assert_eq!(cfg.fuse.io_uring_threads, 2);
    assert_eq!(cfg.http.addr, ":20202");
    assert_eq!(cfg.http.snapshot_timeout, None);
    assert_eq!(cfg.proxy.addr, None);
    assert_eq!(cfg.proxy.max_lag, Duration::from_secs(10));
    assert_eq!(cfg.proxy.primary_redirect_timeout, Duration::from_secs(5));
    assert!(cfg.lease.candidate);
    assert!(!cfg.lease.promote);
    assert_eq!(cfg.lease.reconnect_delay, Duration::from_secs(1));
    assert_eq!(cfg.lease.demote_delay, Duration::from_secs(10));
    assert_eq!(cfg.lease.consul.ttl, Duration::from_secs(10));
    assert_eq!(cfg.lease.consul.lock_delay, Duration::from_secs(1));
    assert_eq!(cfg.lease.etcd.ttl, Duration::from_secs(10));
    assert_eq!(cfg.backup.kind, None);
    assert_eq!(cfg.backup.sync_interval, Duration::from_secs(1));
    assert_eq!(cfg.backup.snapshot_interval, Duration::from_secs(86400));
    assert_eq!(cfg.backup.retention, Duration::from_secs(86400));
    assert_eq!(cfg.log.format, LogFormat::Text);
    assert!(!cfg.log.timestamp && !cfg.log.debug);
    // advertise-url derives from the hostname and the HTTP port, as in LiteFS.
    assert_eq!(cfg.lease.advertise_url, "http://me:20202");
}

#[test]
fn fuse_io_uring_keys_are_read() {
    let cfg =
        parse("lease:\n  type: static\nfuse:\n  io-uring: false\n  io-uring-threads: 3\n").unwrap();
    assert!(!cfg.fuse.io_uring);
    assert_eq!(cfg.fuse.io_uring_threads, 3);
}

#[test]
fn every_litefs_key_is_read() {
    let cfg = example("litefs-0.5-all-keys.yml");
    assert!(!cfg.exit_on_error && cfg.skip_sync && cfg.strict_verify);
    assert_eq!(cfg.exec.len(), 1);
    assert_eq!(cfg.exec[0].cmd, "sleep 1000");
    assert!(!cfg.exec[0].if_candidate);
    assert_eq!(cfg.data.dir, Path::new("/data/litefs"));
    assert!(!cfg.data.compress);
    assert_eq!(cfg.data.retention, Duration::from_secs(1200));
    assert_eq!(cfg.data.retention_monitor_interval, Duration::from_secs(30));
    assert_eq!(cfg.fuse.dir, Path::new("/mnt/litefs"));
    assert!(cfg.fuse.allow_other && cfg.fuse.debug);
    assert_eq!(cfg.http.addr, ":20300");
    assert_eq!(cfg.http.snapshot_timeout, Some(Duration::from_secs(120)));
    let p = &cfg.proxy;
    assert_eq!(p.addr.as_deref(), Some(":8080"));
    assert_eq!(p.target.as_deref(), Some("localhost:8081"));
    assert_eq!(p.db.as_deref(), Some("my.db"));
    assert_eq!(p.max_lag, Duration::from_secs(3));
    assert!(p.debug);
    assert_eq!(p.passthrough, ["*.css", "/static/*"]);
    assert_eq!(p.always_forward, ["/admin/*"]);
    assert_eq!(p.primary_redirect_timeout, Duration::from_secs(7));
    assert_eq!(p.read_timeout, Some(Duration::from_secs(30)));
    assert_eq!(p.read_header_timeout, Some(Duration::from_secs(5)));
    assert_eq!(p.write_timeout, Some(Duration::from_secs(45)));
    assert_eq!(p.idle_timeout, Some(Duration::from_secs(90)));
    let l = &cfg.lease;
    assert_eq!(l.kind, Some(LeaseType::Consul));
    assert_eq!(l.hostname, "node1");
    assert_eq!(l.advertise_url, "http://node1:20300");
    assert!(!l.candidate && l.promote);
    assert_eq!(l.reconnect_delay, Duration::from_secs(2));
    assert_eq!(l.demote_delay, Duration::from_secs(20));
    assert_eq!(l.databases, ["my.db", "other.db"]);
    assert_eq!(l.consul.url, "http://127.0.0.1:8500");
    assert_eq!(l.consul.key, "litefs/all-keys");
    assert_eq!(l.consul.ttl, Duration::from_secs(15));
    assert_eq!(l.consul.lock_delay, Duration::from_secs(3));
    assert_eq!(cfg.log.format, LogFormat::Json);
    assert!(cfg.log.timestamp && cfg.log.debug);
    assert!(!cfg.tracing.enabled);
    assert_eq!(
        cfg.tracing.path.as_deref(),
        Some(Path::new("/var/log/litefs/trace.log"))
    );
    assert_eq!((cfg.tracing.max_size, cfg.tracing.max_count), (32, 4));
    assert!(!cfg.tracing.compress);
}

#[test]
fn fly_config_loads_unchanged_and_candidate_follows_the_region() {
    let path = config_dir().join("fly-litefs-0.5.yml");
    let text = std::fs::read_to_string(path).unwrap();
    let cfg = example("fly-litefs-0.5.yml");
    assert_eq!(cfg.lease.kind, Some(LeaseType::Consul));
    assert_eq!(
        cfg.lease.advertise_url,
        "http://abc123.vm.shop.internal:20202"
    );
    assert_eq!(
        cfg.lease.consul.url,
        "https://:token@consul.fly.io/shop-xyz/"
    );
    assert_eq!(cfg.lease.consul.key, "litefs/shop");
    assert!(cfg.lease.candidate, "FLY_REGION == PRIMARY_REGION");
    assert!(cfg.lease.promote);
    assert!(!cfg.exit_on_error);
    assert_eq!(cfg.exec.len(), 2);
    assert_eq!(cfg.exec[0].cmd, "/app/bin/migrate");
    assert!(cfg.exec[0].if_candidate);
    assert_eq!(cfg.exec[1].cmd, "/app/bin/server -addr :8081");
    assert!(!cfg.exec[1].if_candidate);
    assert_eq!(cfg.proxy.passthrough, ["*.ico", "*.png"]);

    let mut env = EXAMPLE_ENV.to_vec();
    env.retain(|(k, _)| *k != "FLY_REGION");
    env.push(("FLY_REGION", "syd"));
    let replica = parse_with(&text, "fly.yml", &env).unwrap();
    assert!(
        !replica.lease.candidate,
        "a node outside the primary region"
    );
}

#[test]
fn env_expansion_and_comparisons() {
    let text = "\
fuse:
  dir: /mnt/${APP}
lease:
  type: static
  hostname: $HOST
  candidate: ${ROLE == 'primary'}
  promote: ${ROLE != \"primary\"}
  advertise-url: \"http://${HOST}:20202\"
";
    let cfg = parse_with(
        text,
        "x.yml",
        &[("APP", "shop"), ("HOST", "n1"), ("ROLE", "primary")],
    )
    .unwrap();
    assert_eq!(cfg.fuse.dir, Path::new("/mnt/shop"));
    assert_eq!(cfg.lease.hostname, "n1");
    assert_eq!(cfg.lease.advertise_url, "http://n1:20202");
    assert!(cfg.lease.candidate);
    assert!(!cfg.lease.promote);

    let cfg = parse_with(
        text,
        "x.yml",
        &[("APP", "shop"), ("HOST", "n2"), ("ROLE", "replica")],
    )
    .unwrap();
    assert!(!cfg.lease.candidate);
    assert!(cfg.lease.promote);
}

#[test]
fn no_expand_env_keeps_references_literally() {
    let text = "fuse:\n  dir: /mnt/${APP}\nlease:\n  type: static\n  hostname: h\n";
    let cfg = Config::parse(
        text,
        "x.yml",
        LoadOptions {
            expand_env: false,
            env: None,
        },
    )
    .unwrap();
    assert_eq!(cfg.fuse.dir, Path::new("/mnt/${APP}"));

    // As in LiteFS, an unexpanded boolean expression is not a boolean.
    let e = Config::parse(
        "lease:\n  type: static\n  candidate: ${A == 'b'}\n",
        "x.yml",
        LoadOptions {
            expand_env: false,
            env: None,
        },
    )
    .unwrap_err();
    assert_eq!(e.key(), Some("lease.candidate"));
    assert_eq!(e.location().unwrap().line, Some(3));
}

#[test]
fn unknown_top_level_key_names_file_line_and_key() {
    let e =
        err("# comment\n\nfuse:\n  dir: /litefs\nlease:\n  type: static\nexec-on-error: true\n");
    assert_eq!(line_and_key(&e), (Some(7), "exec-on-error".to_string()));
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            "litefs.yml:7:1: unknown key 'exec-on-error' (expected one of: exit-on-error, "
        ),
        "{msg}"
    );
}

#[test]
fn unknown_nested_key_reports_the_keys_own_line() {
    let text = "\
lease:
  type: consul
  hostname: n1

  # the Consul settings
  consul:
    url: http://127.0.0.1:8500

    key: litefs/x
    ttl: 10s
    lok-delay: 1s
fuse:
  dir: /litefs
";
    let e = err(text);
    assert_eq!(
        line_and_key(&e),
        (Some(11), "lease.consul.lok-delay".to_string())
    );
    assert_eq!(
        e.to_string(),
        "litefs.yml:11:5: unknown key 'lease.consul.lok-delay' (expected one of: url, key, ttl, lock-delay)"
    );

    let e = err("data:\n  dir: /d\nfuse:\n  dir: /litefs\n  dri: /x\n");
    assert_eq!(
        e.to_string(),
        "litefs.yml:5:3: unknown key 'fuse.dri' (expected one of: dir, allow-other, debug, io-uring, io-uring-threads)"
    );

    // Inside a list of exec entries, and in flow style.
    let e = err("exec:\n  - cmd: a\n  - cmd: b\n    if-candidat: true\n");
    assert_eq!(
        line_and_key(&e),
        (Some(4), "exec[1].if-candidat".to_string())
    );
    let e = err("lease: {type: static}\nbackup: {type: file, path: /b, buckt: x}\n");
    assert_eq!(line_and_key(&e), (Some(2), "backup.buckt".to_string()));
}

#[test]
fn unknown_key_from_a_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yml");
    std::fs::write(&path, "lease:\n  type: static\n  candidat: true\n").unwrap();
    let e = Config::load(&path, LoadOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:3:3: unknown key 'lease.candidat' (expected one of: type, hostname, advertise-url, candidate, promote, reconnect-delay, demote-delay, databases, consul, etcd)",
            path.display()
        )
    );
}

#[test]
fn wrong_values_name_key_and_line() {
    let e = err("lease:\n  type: zookeeper\n");
    assert_eq!(line_and_key(&e), (Some(2), "lease.type".to_string()));
    assert!(
        e.to_string()
            .contains("unknown value 'zookeeper' (expected one of: consul, static, etcd)"),
        "{e}"
    );

    let e = err("lease:\n  type: static\ndata:\n  retention: 10\n");
    assert_eq!(line_and_key(&e), (Some(4), "data.retention".to_string()));

    let e = err("lease:\n  type: static\nfuse:\n  allow-other: sometimes\n");
    assert_eq!(line_and_key(&e), (Some(4), "fuse.allow-other".to_string()));

    let e = err("log:\n  format: xml\nlease:\n  type: static\n");
    assert_eq!(line_and_key(&e), (Some(2), "log.format".to_string()));
}

#[test]
fn litefs_cloud_is_refused_with_an_explanation() {
    let text = "\
lease:
  type: static
backup:
  type: litefs-cloud
  url: https://litefs.fly.io
  cluster: my-cluster
  auth-token: secret
";
    let e = err(text);
    assert_eq!(line_and_key(&e), (Some(4), "backup.type".to_string()));
    let msg = e.to_string();
    assert!(
        msg.contains("LiteFS Cloud was shut down in October 2024"),
        "{msg}"
    );
    assert!(msg.contains("'file'") && msg.contains("'s3'"), "{msg}");

    let e = err("lease:\n  type: static\nbackup:\n  type: file\n  path: /b\n  auth-token: x\n");
    assert_eq!(line_and_key(&e), (Some(6), "backup.auth-token".to_string()));
}

#[test]
fn semantic_errors_name_the_key_and_line() {
    let cases: &[(&str, usize, &str)] = &[
        ("fuse:\n  dir: /litefs\n", 0, "lease.type"),
        ("lease:\n  candidate: true\n", 1, "lease.type"),
        (
            "lease:\n  type: static\n  candidate: false\n",
            1,
            "lease.advertise-url",
        ),
        (
            "lease:\n  type: consul\n  consul:\n    key: k\n",
            3,
            "lease.consul.url",
        ),
        (
            "lease:\n  type: consul\n  consul:\n    url: http://c:8500\n",
            3,
            "lease.consul.key",
        ),
        (
            "lease:\n  type: consul\n  consul:\n    url: c:8500\n    key: k\n",
            4,
            "lease.consul.url",
        ),
        (
            "lease:\n  type: etcd\n  etcd:\n    key: k\n",
            3,
            "lease.etcd.endpoints",
        ),
        (
            "lease:\n  type: etcd\n  etcd:\n    endpoints: [http://e:2379]\n",
            3,
            "lease.etcd.key",
        ),
        (
            "lease:\n  type: etcd\n  etcd:\n    endpoints: [a]\n    key: k\n    ttl: 1500ms\n",
            6,
            "lease.etcd.ttl",
        ),
        (
            "lease:\n  type: static\nbackup:\n  type: s3\n  path: prefix\n",
            3,
            "backup.bucket",
        ),
        (
            "lease:\n  type: static\nbackup:\n  type: file\n",
            3,
            "backup.path",
        ),
        (
            "lease:\n  type: static\nbackup:\n  bucket: b\n",
            4,
            "backup.bucket",
        ),
        (
            "lease:\n  type: static\nbackup:\n  type: s3\n  bucket: b\n  access-key-id: a\n",
            3,
            "backup.secret-access-key",
        ),
        (
            "lease:\n  type: static\ndata:\n  retention: 0s\n",
            4,
            "data.retention",
        ),
        (
            "lease:\n  type: static\n  reconnect-delay: 0s\n",
            3,
            "lease.reconnect-delay",
        ),
        (
            "lease:\n  type: static\nbackup:\n  type: file\n  path: /b\n  sync-interval: 0s\n",
            6,
            "backup.sync-interval",
        ),
        (
            "lease:\n  type: static\nfuse:\n  dir: /x\ndata:\n  dir: /x/data\n",
            6,
            "data.dir",
        ),
        (
            "lease:\n  type: static\nhttp:\n  addr: localhost\n",
            4,
            "http.addr",
        ),
        (
            "lease:\n  type: static\nproxy:\n  addr: \":8080\"\n  db: d\n",
            3,
            "proxy.target",
        ),
        (
            "lease:\n  type: static\nexec:\n  - cmd: \"\"\n",
            4,
            "exec[0].cmd",
        ),
        (
            "lease:\n  type: static\nfuse:\n  io-uring-threads: 0\n",
            4,
            "fuse.io-uring-threads",
        ),
    ];
    for (text, line, key) in cases {
        let e = err(text);
        let (got_line, got_key) = line_and_key(&e);
        assert_eq!(got_key, *key, "{text}\n{e}");
        assert_eq!(got_line, (*line > 0).then_some(*line), "{text}\n{e}");
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
    }
    // The message says what is allowed.
    assert!(
        err("fuse:\n  dir: /x\n")
            .to_string()
            .contains("one of consul, static, etcd")
    );
}

#[test]
fn seed_flat_form_maps_onto_modern_sections() {
    let cfg = example("seed-flat.yml");
    assert_eq!(cfg.fuse.dir, Path::new("/path/to/mnt"));
    assert_eq!(
        cfg.data.dir,
        Path::new("/path/to/.mnt"),
        "old LiteFS's hidden sibling"
    );
    assert_eq!(cfg.http.addr, ":20202");
    assert_eq!(cfg.lease.kind, Some(LeaseType::Consul));
    assert_eq!(cfg.lease.consul.url, "http://localhost:8500");
    assert_eq!(cfg.lease.consul.key, "litefs/primary");
    assert_eq!(cfg.lease.advertise_url, "http://localhost:20202");
    assert!(cfg.lease.candidate);

    // The rest of the old form: data-dir, debug, candidate, retention, consul's other
    // keys, and the static section.
    let cfg = parse(
        "\
mount-dir: /m
data-dir: /d
debug: true
candidate: false
exec: app -port 8080
retention:
  duration: 60s
  monitor-interval: 30s
consul:
  url: http://c:8500
  advertise-url: http://n:20202
  hostname: n
  key: litefs/old
  ttl: 20s
  lock-delay: 5s
",
    )
    .unwrap();
    assert_eq!(cfg.fuse.dir, Path::new("/m"));
    assert_eq!(cfg.data.dir, Path::new("/d"));
    assert!(cfg.fuse.debug);
    assert!(!cfg.lease.candidate);
    assert_eq!(cfg.exec[0].cmd, "app -port 8080");
    assert_eq!(cfg.data.retention, Duration::from_secs(60));
    assert_eq!(cfg.data.retention_monitor_interval, Duration::from_secs(30));
    assert_eq!(cfg.lease.hostname, "n");
    assert_eq!(cfg.lease.consul.key, "litefs/old");
    assert_eq!(cfg.lease.consul.ttl, Duration::from_secs(20));
    assert_eq!(cfg.lease.consul.lock_delay, Duration::from_secs(5));

    let cfg = parse("mount-dir: /m\nstatic:\n  primary: false\n  advertise-url: http://p:20202\n")
        .unwrap();
    assert_eq!(cfg.lease.kind, Some(LeaseType::Static));
    assert!(!cfg.lease.candidate);
    assert_eq!(
        cfg.lease.hostname, "p",
        "a static replica names the primary's host"
    );
}

#[test]
fn flat_and_modern_forms_of_one_key_conflict() {
    let e = err("mount-dir: /m\nfuse:\n  dir: /litefs\nlease:\n  type: static\n");
    assert_eq!(line_and_key(&e), (Some(1), "mount-dir".to_string()));
    assert!(e.to_string().contains("keep only 'fuse.dir'"), "{e}");

    let e = err("consul:\n  url: http://c:8500\nlease:\n  type: consul\n");
    assert_eq!(line_and_key(&e), (Some(1), "consul".to_string()));

    let e = err("consul:\n  url: http://c:8500\nstatic:\n  primary: true\n");
    assert_eq!(line_and_key(&e), (Some(3), "static".to_string()));
}

#[test]
fn exec_string_and_list_forms() {
    let cfg = parse("lease: {type: static}\nexec: \"myapp -addr :8080\"\n").unwrap();
    assert_eq!(cfg.exec.len(), 1);
    assert_eq!(cfg.exec[0].cmd, "myapp -addr :8080");
    let e = err("lease: {type: static}\nexec: 42\n");
    assert_eq!(line_and_key(&e).1, "exec");
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let e = err("lease:\n  type: static\n  hostname: a\n hostname: b\n");
    let at = e.location().unwrap();
    assert_eq!(at.file, "litefs.yml");
    assert_eq!(at.line, Some(4), "{e}");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");

    let e = err("lease:\n  type: static\n  type: consul\n");
    assert_eq!(
        e.to_string(),
        "litefs.yml:3:3: lease.type: is set twice; keep one"
    );
}
