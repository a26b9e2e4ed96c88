//! The Consul leaser against the in-repo Consul server (and against a real
//! `consul agent -dev` when one is on PATH).

use std::sync::Arc;
use std::time::{Duration, Instant};

use litefs::backends::ConsulLeaser;
use litefs::backends::conformance::{self, Timing};
use litefs::config::{LeaseConfig, LeaseType};
use litefs::lease::{LeaseError, Leaser, PrimaryInfo};

use crate::consul_server::{ConsulServer, ConsulServerOptions, Fault};
use crate::support::consul_agent::{ConsulAgent, find_on_path};

const TTL: Duration = Duration::from_secs(1);
const LOCK_DELAY: Duration = Duration::from_millis(300);

fn cfg(url: &str, host: &str, candidate: bool, ttl: Duration, lock_delay: Duration) -> LeaseConfig {
    let mut cfg = LeaseConfig {
        kind: Some(LeaseType::Consul),
        hostname: host.into(),
        advertise_url: format!("http://{host}:20202"),
        candidate,
        ..LeaseConfig::default()
    };
    cfg.consul.url = url.into();
    cfg.consul.key = "litefs/primary".into();
    cfg.consul.ttl = ttl;
    cfg.consul.lock_delay = lock_delay;
    cfg
}

fn leaser(url: &str, host: &str) -> ConsulLeaser {
    ConsulLeaser::new(&cfg(url, host, true, TTL, LOCK_DELAY), None).unwrap()
}

/// A server with short TTLs allowed, expiring sessions at `factor` x TTL.
fn server(factor: f64) -> ConsulServer {
    ConsulServer::start_with(ConsulServerOptions {
        expiry_factor: factor,
        min_ttl: Duration::from_millis(100),
        acl_token: None,
    })
}

/// Worst case for the test server at factor 2: 2x TTL, then the lock-delay, plus slack.
fn timing() -> Timing {
    Timing {
        ttl: TTL,
        takeover_within: TTL * 2 + LOCK_DELAY + Duration::from_millis(700),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test]
async fn consul_one_holder_at_a_time() {
    let s = server(2.0);
    conformance::one_holder_at_a_time(&leaser(&s.url(), "a"), &leaser(&s.url(), "b")).await;
}

#[tokio::test]
async fn consul_value_names_the_holder_as_litefs_json() {
    let s = server(2.0);
    let (a, b) = (leaser(&s.url(), "a"), leaser(&s.url(), "b"));
    conformance::value_names_the_holder(&a, &b).await;

    // What other tools (and LiteFS nodes) read from the key: the raw JSON value.
    let lease = a.acquire().await.unwrap();
    let raw = http()
        .get(format!("{}/v1/kv/litefs/primary?raw", s.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(raw, r#"{"hostname":"a","advertise-url":"http://a:20202"}"#);
    lease.release().await.unwrap();
}

#[tokio::test]
async fn consul_renew_keeps_it() {
    let s = server(2.0);
    conformance::renew_keeps_it(&leaser(&s.url(), "a"), &leaser(&s.url(), "b"), timing()).await;
}

#[tokio::test]
async fn consul_release_hands_it_over_and_destroys_the_session() {
    let s = server(2.0);
    let (a, b) = (leaser(&s.url(), "a"), leaser(&s.url(), "b"));
    let lease = a.acquire().await.unwrap();
    assert!(s.has_session(lease.id()));
    lease.release().await.unwrap();
    assert!(!s.has_session(lease.id()), "release destroys the session");
    conformance::release_hands_it_over(&a, &b).await;
}

#[tokio::test]
async fn consul_expires_after_ttl_at_the_early_edge() {
    // Consul may invalidate a session as early as its TTL.
    let s = server(1.0);
    let t = Timing {
        ttl: TTL,
        takeover_within: TTL + Duration::from_millis(500),
    };
    conformance::expires_after_ttl(&leaser(&s.url(), "a"), t).await;
}

#[tokio::test]
async fn consul_expires_after_ttl_at_the_late_edge() {
    // ... and as late as twice its TTL: the key must still be held at 1.8x TTL.
    let s = server(2.0);
    let a = leaser(&s.url(), "a");
    let started = Instant::now();
    drop(a.acquire().await.unwrap());
    tokio::time::sleep(TTL.mul_f64(1.8).saturating_sub(started.elapsed())).await;
    assert_eq!(
        a.primary_info().await.unwrap().map(|p| p.hostname),
        Some("a".to_string()),
        "still held at 1.8x TTL"
    );
    let deadline = started + TTL * 2 + Duration::from_millis(500);
    while a.primary_info().await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "not expired by 2x TTL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started.elapsed() >= TTL * 2, "expired before 2x TTL");
    assert_eq!(s.expired_sessions().len(), 1, "the session expired by TTL");
}

#[tokio::test]
async fn consul_second_candidate_takes_over() {
    let s = server(2.0);
    conformance::second_candidate_takes_over(
        &leaser(&s.url(), "a"),
        &leaser(&s.url(), "b"),
        timing(),
    )
    .await;
}

#[tokio::test]
async fn consul_holder_learns_it_lost() {
    for factor in [1.0, 2.0] {
        let s = server(factor);
        conformance::holder_learns_it_lost(
            &leaser(&s.url(), "a"),
            &leaser(&s.url(), "b"),
            timing(),
        )
        .await;
    }
}

#[tokio::test]
async fn consul_non_candidate_never_acquires() {
    let s = server(2.0);
    let replica = ConsulLeaser::new(&cfg(&s.url(), "r", false, TTL, LOCK_DELAY), None).unwrap();
    conformance::non_candidate_never_acquires(&replica).await;
}

#[tokio::test]
async fn consul_session_is_created_as_litefs_creates_it() {
    let s = server(2.0);
    let a = ConsulLeaser::new(
        &cfg(
            &s.url(),
            "a",
            true,
            Duration::from_secs(10),
            Duration::from_secs(1),
        ),
        None,
    )
    .unwrap();
    let lease = a.acquire().await.unwrap();
    assert_eq!(lease.ttl(), Some(Duration::from_secs(10)));
    let info = http()
        .get(format!("{}/v1/session/info/{}", s.url(), lease.id()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let session = &info[0];
    assert_eq!(session["Name"], "litefs");
    assert_eq!(session["Behavior"], "delete");
    assert_eq!(session["LockDelay"], 1_000_000_000u64);
    assert_eq!(session["TTL"], "10000ms");
    lease.release().await.unwrap();
}

#[tokio::test]
async fn consul_lock_delay_holds_off_takeover_after_a_crash() {
    let s = server(1.0);
    let lock_delay = Duration::from_millis(800);
    let a = ConsulLeaser::new(&cfg(&s.url(), "a", true, TTL, lock_delay), None).unwrap();
    let b = ConsulLeaser::new(&cfg(&s.url(), "b", true, TTL, lock_delay), None).unwrap();
    let crashed = a.acquire().await.unwrap();
    let id = crashed.id().to_string();
    drop(crashed);
    // Wait for the server to expire the session (at TTL).
    let deadline = Instant::now() + TTL * 2;
    while s.has_session(&id) {
        assert!(Instant::now() < deadline, "session did not expire");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expired_at = s.expired_sessions()[0].1;
    // The key is gone (behaviour delete) but cannot be taken yet.
    assert_eq!(b.primary_info().await.unwrap(), None);
    let err = b.acquire().await.expect_err("lock-delay refuses the key");
    assert!(matches!(err, LeaseError::Busy { .. }), "{err}");
    assert!(err.is_retryable());
    let lease = loop {
        match b.acquire().await {
            Ok(lease) => break lease,
            Err(LeaseError::Busy { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    };
    let waited = expired_at.elapsed();
    assert!(waited >= lock_delay, "acquired {waited:?} after expiry");
    assert!(
        waited < lock_delay + Duration::from_millis(500),
        "{waited:?}"
    );
    lease.release().await.unwrap();
}

#[tokio::test]
async fn consul_acl_token_from_url_password_or_environment() {
    let s = ConsulServer::start_with(ConsulServerOptions {
        expiry_factor: 2.0,
        min_ttl: Duration::from_millis(100),
        acl_token: Some("s3cret".into()),
    });
    let no_token = leaser(&s.url(), "a");
    let err = no_token.acquire().await.err().unwrap();
    assert!(err.to_string().contains("403"), "{err}");

    let with_url = format!("http://:s3cret@{}", s.addr());
    let a = ConsulLeaser::new(&cfg(&with_url, "a", true, TTL, LOCK_DELAY), None).unwrap();
    let lease = a.acquire().await.unwrap();
    lease.renew().await.unwrap();
    lease.release().await.unwrap();

    let b = ConsulLeaser::new(
        &cfg(&s.url(), "b", true, TTL, LOCK_DELAY),
        Some("s3cret".into()),
    )
    .unwrap();
    let lease = b.acquire().await.unwrap();
    assert_eq!(a.primary_info().await.unwrap().unwrap().hostname, "b");
    lease.release().await.unwrap();
}

#[tokio::test]
async fn consul_key_prefix_comes_from_the_url_path() {
    let s = server(2.0);
    let a = leaser(&format!("{}/apps/one/", s.url()), "a");
    assert_eq!(a.key(), "apps/one/litefs/primary");
    let lease = a.acquire().await.unwrap();
    let prefixed = http()
        .get(format!("{}/v1/kv/apps/one/litefs/primary?raw", s.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(prefixed.status(), 200);
    let unprefixed = http()
        .get(format!("{}/v1/kv/litefs/primary", s.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unprefixed.status(), 404);
    // Another cluster (another prefix) on the same Consul is independent.
    let other = leaser(&format!("{}/apps/two", s.url()), "b");
    other.acquire().await.unwrap().release().await.unwrap();
    lease.release().await.unwrap();
}

#[tokio::test]
async fn consul_watch_sees_a_new_holder() {
    let s = server(2.0);
    conformance::watch_sees_a_new_holder(&leaser(&s.url(), "a"), &leaser(&s.url(), "b")).await;
}

#[tokio::test]
async fn consul_watch_primary_wakes_on_a_change_of_holder() {
    let s = server(2.0);
    let a = Arc::new(leaser(&s.url(), "a"));
    let b = leaser(&s.url(), "b");
    let (none, index) = b.watch_primary(0, Duration::from_secs(1)).await.unwrap();
    assert_eq!(none, None);

    // Nothing changes: the query waits out `wait` and keeps the index.
    let started = Instant::now();
    let (still, same) = b
        .watch_primary(index, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((still, same), (None, index));

    let acquirer = Arc::clone(&a);
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        acquirer.acquire().await.unwrap()
    });
    let started = Instant::now();
    let (holder, next) = b
        .watch_primary(index, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woke on the change"
    );
    assert_eq!(holder.as_ref(), Some(a.node_info()));
    assert!(next > index);
    task.await.unwrap().release().await.unwrap();
}

#[tokio::test]
async fn consul_partition_renew_fails_before_the_lease_runs_out() {
    let s = server(2.0);
    let a = leaser(&s.url(), "a");
    let lease = a.acquire().await.unwrap();
    lease.renew().await.unwrap();
    let valid_until = lease.expires_at().unwrap();

    s.set_fault(Fault::Blackhole);
    let started = Instant::now();
    let err = lease.renew().await.unwrap_err();
    assert!(matches!(err, LeaseError::Unavailable { .. }), "{err}");
    assert!(
        Instant::now() < valid_until,
        "a hung renewal returned after {:?}, past the lease's validity",
        started.elapsed()
    );
    assert_eq!(
        lease.expires_at(),
        Some(valid_until),
        "a failed renew moves nothing"
    );

    s.set_fault(Fault::Unavailable);
    let err = lease.renew().await.unwrap_err();
    assert!(matches!(err, LeaseError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("unavailable"));

    // Healed after the session expired: the holder learns it lost.
    s.set_fault(Fault::None);
    let deadline = Instant::now() + timing().takeover_within;
    while s.has_session(lease.id()) {
        assert!(Instant::now() < deadline, "session did not expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(lease.renew().await, Err(LeaseError::Lost { .. })));
}

#[tokio::test]
async fn consul_deleted_key_means_the_lease_is_lost() {
    let s = server(2.0);
    let a = leaser(&s.url(), "a");
    let lease = a.acquire().await.unwrap();
    // An operator deletes the key; the session lives on.
    let deleted = http()
        .delete(format!("{}/v1/kv/litefs/primary", s.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert!(s.has_session(lease.id()));
    let err = lease.renew().await.unwrap_err();
    assert!(matches!(err, LeaseError::Lost { .. }), "{err}");
    assert!(err.to_string().contains("no longer locked"), "{err}");
}

#[tokio::test]
async fn consul_handoff_names_the_new_holder() {
    let s = server(2.0);
    conformance::handoff_names_the_new_holder(&leaser(&s.url(), "a"), &leaser(&s.url(), "b")).await;
}

#[tokio::test]
async fn consul_cluster_id_is_kept_once() {
    let s = server(2.0);
    conformance::cluster_id_is_kept_once(&leaser(&s.url(), "a"), &leaser(&s.url(), "b")).await;
}

/// The same suite against a real Consul agent, when the `consul` binary exists.
#[tokio::test]
async fn consul_suite_against_a_real_consul_agent() {
    let Some(agent) = ConsulAgent::start_or_skip("consul_suite_against_a_real_consul_agent") else {
        return;
    };
    // Consul's default minimum TTL (the agent here accepts 1 s, as LiteFS users'
    // agents do not) and its expiry at up to 2x TTL.
    let ttl = Duration::from_secs(10);
    let lock_delay = Duration::from_secs(1);
    let url = agent.url();
    let mk = |host: &str, candidate: bool| {
        ConsulLeaser::new(&cfg(&url, host, candidate, ttl, lock_delay), None).unwrap()
    };
    let t = Timing {
        ttl,
        takeover_within: ttl * 2 + lock_delay + Duration::from_secs(2),
    };
    conformance::one_holder_at_a_time(&mk("a", true), &mk("b", true)).await;
    conformance::value_names_the_holder(&mk("a", true), &mk("b", true)).await;
    conformance::release_hands_it_over(&mk("a", true), &mk("b", true)).await;
    conformance::non_candidate_never_acquires(&mk("r", false)).await;
    conformance::watch_sees_a_new_holder(&mk("a", true), &mk("b", true)).await;
    conformance::handoff_names_the_new_holder(&mk("a", true), &mk("b", true)).await;
    conformance::cluster_id_is_kept_once(&mk("a", true), &mk("b", true)).await;
    conformance::renew_keeps_it(&mk("a", true), &mk("b", true), t).await;
    conformance::holder_learns_it_lost(&mk("a", true), &mk("b", true), t).await;
    let info = PrimaryInfo {
        hostname: "a".into(),
        advertise_url: "http://a:20202".into(),
    };
    assert_eq!(mk("a", true).node_info(), &info);
}

/// Writes an executable script `dir/consul`.
fn fake_consul(dir: &std::path::Path, script: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("consul");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A fake `consul agent -dev`: records its arguments as JSON in `args.json` beside
/// itself, refuses to start when an argument mentions `refuse`, else answers
/// `/v1/status/leader` on its `-http-port`.
fn fake_agent_script(refuse: &str) -> String {
    format!(
        r#"#!/usr/bin/env python3
import http.server, json, os, sys
args = sys.argv[1:]
json.dump(args, open(os.path.join(os.path.dirname(sys.argv[0]), "args.json"), "w"))
if "{refuse}" and any("{refuse}" in a for a in args):
    print("invalid config key ports.{refuse}")
    sys.exit(1)
port = int(next(a for a in args if a.startswith("-http-port=")).split("=")[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'"127.0.0.1:8300"' if self.path == "/v1/status/leader" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#
    )
}

/// The switch between the in-repo server and a real agent, checked with fake `consul`
/// binaries (no real one is installed here): only an executable `consul` on PATH
/// counts; the agent is started on its own free ports with short TTLs allowed and
/// waited for until it has a leader; an agent that refuses the gRPC TLS setting
/// (Consul before 1.14) is started again without it; one that exits at once is
/// reported with its output, without waiting; dropping the agent stops it.
#[test]
fn consul_agent_starter_runs_whatever_consul_is_on_path() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if find_on_path("python3", &path).is_none() {
        eprintln!("skipped: the fake consul agents need python3");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let read_args = |d: &std::path::Path| -> Vec<String> {
        serde_json::from_str(&std::fs::read_to_string(d.join("args.json")).unwrap()).unwrap()
    };

    // Found only when executable.
    let fake = fake_consul(dir, &fake_agent_script(""));
    assert_eq!(find_on_path("consul", dir.as_os_str()), Some(fake.clone()));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_on_path("consul", dir.as_os_str()), None);
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    let agent = ConsulAgent::start_from(&fake).unwrap();
    let args = read_args(dir);
    assert_eq!(&args[..2], ["agent", "-dev"], "{args:?}");
    assert!(
        args.contains(&format!("-http-port={}", agent.addr().port())),
        "{args:?}"
    );
    let hcl = args.iter().find(|a| a.starts_with("-hcl=")).unwrap();
    assert!(hcl.contains("session_ttl_min = \"1s\""), "{hcl}");
    assert!(hcl.contains("grpc_tls = -1"), "{hcl}");
    let addr = agent.addr();
    drop(agent);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the agent still runs after the drop"
    );

    // An older Consul refusing the gRPC TLS port setting.
    let old = tempfile::tempdir().unwrap();
    let fake = fake_consul(old.path(), &fake_agent_script("grpc_tls"));
    let agent = ConsulAgent::start_from(&fake).unwrap();
    let hcl = read_args(old.path())
        .into_iter()
        .find(|a| a.starts_with("-hcl="))
        .unwrap();
    assert!(!hcl.contains("grpc_tls"), "{hcl}");
    drop(agent);

    // A binary that is no agent at all.
    let broken = tempfile::tempdir().unwrap();
    let fake = fake_consul(
        broken.path(),
        "#!/bin/sh\necho 'flag provided but not defined: -dev'\nexit 2\n",
    );
    let t0 = Instant::now();
    let err = ConsulAgent::start_from(&fake).err().unwrap();
    assert!(err.contains("flag provided but not defined"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}
