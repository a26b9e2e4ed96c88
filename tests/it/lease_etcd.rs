//! The etcd leaser against a real etcd started for each test.

use std::time::{Duration, Instant};

use litefs::backends::EtcdLeaser;
use litefs::backends::conformance::{self, Timing};
use litefs::config::{LeaseConfig, LeaseType};
use litefs::lease::{LeaseError, Leaser};

use crate::etcd_server::EtcdServer;

const TTL: Duration = Duration::from_secs(1);

fn leaser(url: &str, host: &str, candidate: bool) -> EtcdLeaser {
    let mut cfg = LeaseConfig {
        kind: Some(LeaseType::Etcd),
        hostname: host.into(),
        advertise_url: format!("http://{host}:20202"),
        candidate,
        ..LeaseConfig::default()
    };
    cfg.etcd.endpoints = vec![url.to_string()];
    cfg.etcd.key = "litefs/primary".into();
    cfg.etcd.ttl = TTL;
    EtcdLeaser::new(&cfg).unwrap()
}

/// etcd expires a lease at its TTL (its leader checks every 500 ms), plus slack.
fn timing() -> Timing {
    Timing {
        ttl: TTL,
        takeover_within: TTL + Duration::from_millis(1500),
    }
}

fn pair(e: &EtcdServer) -> (EtcdLeaser, EtcdLeaser) {
    (leaser(&e.url(), "a", true), leaser(&e.url(), "b", true))
}

#[tokio::test]
async fn etcd_one_holder_at_a_time() {
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::one_holder_at_a_time(&a, &b).await;
}

#[tokio::test]
async fn etcd_value_names_the_holder() {
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::value_names_the_holder(&a, &b).await;
}

#[tokio::test]
async fn etcd_renew_keeps_it() {
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::renew_keeps_it(&a, &b, timing()).await;
}

#[tokio::test]
async fn etcd_release_hands_it_over() {
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::release_hands_it_over(&a, &b).await;
}

#[tokio::test]
async fn etcd_expiry_takeover_and_loss() {
    // One etcd for the three expiry behaviours keeps the suite short.
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::expires_after_ttl(&a, timing()).await;
    conformance::second_candidate_takes_over(&a, &b, timing()).await;
    conformance::holder_learns_it_lost(&a, &b, timing()).await;
}

#[tokio::test]
async fn etcd_non_candidate_never_acquires() {
    let e = EtcdServer::start();
    conformance::non_candidate_never_acquires(&leaser(&e.url(), "r", false)).await;
}

#[tokio::test]
async fn etcd_watch_sees_a_new_holder() {
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::watch_sees_a_new_holder(&a, &b).await;
}

#[tokio::test]
async fn etcd_recreated_key_means_the_lease_is_lost() {
    let e = EtcdServer::start();
    let a = leaser(&e.url(), "a", true);
    let lease = a.acquire().await.unwrap();
    let mut client = etcd_client::Client::connect([e.url()], None).await.unwrap();
    // An operator deletes the key and writes another holder without a lease.
    client.delete("litefs/primary", None).await.unwrap();
    client
        .put(
            "litefs/primary",
            r#"{"hostname":"x","advertise-url":"http://x:20202"}"#,
            None,
        )
        .await
        .unwrap();
    let err = lease.renew().await.unwrap_err();
    assert!(matches!(err, LeaseError::Lost { .. }), "{err}");
    assert!(err.to_string().contains("create revision"), "{err}");
    assert_eq!(a.primary_info().await.unwrap().unwrap().hostname, "x");
}

#[tokio::test]
async fn etcd_watch_primary_and_unreachable_store() {
    let mut e = EtcdServer::start();
    let (a, b) = pair(&e);
    let (none, rev) = b.watch_primary(0, Duration::from_secs(1)).await.unwrap();
    assert_eq!(none, None);
    // Longer than one request's timeout: a quiet watch is not a failure.
    let started = Instant::now();
    let (still, same) = b
        .watch_primary(rev, Duration::from_millis(1200))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1200));
    assert_eq!((still, same), (None, rev));

    let watcher = tokio::spawn(async move {
        let r = b.watch_primary(rev, Duration::from_secs(10)).await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lease = a.acquire().await.unwrap();
    let acquired = Instant::now();
    let (result, woke) = watcher.await.unwrap();
    let (holder, next) = result.unwrap();
    assert_eq!(holder.as_ref(), Some(a.node_info()));
    assert!(next > rev);
    assert!(woke.duration_since(acquired) < Duration::from_secs(1));

    // The store goes away: renewals fail as retryable, the lease's validity stays.
    let valid_until = lease.expires_at().unwrap();
    e.stop();
    let err = lease.renew().await.unwrap_err();
    assert!(matches!(err, LeaseError::Unavailable { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(lease.expires_at(), Some(valid_until));
    let fresh = leaser(&e.url(), "c", true);
    assert!(matches!(
        fresh.primary_info().await,
        Err(LeaseError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn etcd_handoff_names_the_new_holder() {
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::handoff_names_the_new_holder(&a, &b).await;
}

#[tokio::test]
async fn etcd_cluster_id_is_kept_once() {
    let e = EtcdServer::start();
    let (a, b) = pair(&e);
    conformance::cluster_id_is_kept_once(&a, &b).await;
}
