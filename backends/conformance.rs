//! The leaser conformance suite: one `async fn` per behaviour of the
//! [`crate::lease`] contract, run by the tests of every implementation.
//!
//! Test infrastructure compiled into the library so that the integration tests (which
//! start real etcd and Consul servers) can run it; nothing in the node calls it. Each
//! function panics with a message naming the behaviour when the leaser breaks it.
//!
//! The functions take two leasers `a` and `b` for two candidate nodes of one cluster
//! (same store, same key, different [`crate::lease::PrimaryInfo`]), fresh for each call: nobody
//! holds the lease when a function starts, and nobody holds it when it returns.
//!
//! What applies to the static leaser: [`one_holder_at_a_time`],
//! [`value_names_the_holder`], [`renew_keeps_it`], [`release_hands_it_over`] and
//! [`non_candidate_never_acquires`], with `a` and `b` the same leaser (a static lease
//! has exactly one candidate). Expiry, takeover by a second candidate and learning of
//! a loss do not apply: a static lease never expires and names a fixed primary. Nor
//! do [`watch_sees_a_new_holder`] (there is no store to notify anyone) and
//! [`handoff_names_the_new_holder`] (the lease cannot change hands).

use std::future::Future;
use std::time::{Duration, Instant};

use crate::lease::{Lease, LeaseError, Leaser};

/// How long the store under test may take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The TTL the leasers were configured with.
    pub ttl: Duration,
    /// Longest time from a holder's last renewal until another candidate can acquire:
    /// for Consul up to 2x TTL plus the lock-delay, for etcd the TTL; plus slack.
    pub takeover_within: Duration,
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `within`.
async fn poll<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not done within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Acquires for `who`, retrying while another holder or a lock-delay is in the way.
async fn acquire_within(who: &dyn Leaser, within: Duration) -> Box<dyn Lease> {
    poll("acquire", within, || async {
        match who.acquire().await {
            Ok(lease) => Some(lease),
            Err(LeaseError::PrimaryExists { .. } | LeaseError::Busy { .. }) => None,
            Err(e) => panic!("acquire failed with a non-retryable error: {e}"),
        }
    })
    .await
}

fn assert_primary_exists(err: LeaseError, holder: &dyn Leaser, what: &str) {
    match err {
        LeaseError::PrimaryExists { primary, .. } => assert_eq!(
            &primary,
            holder.node_info(),
            "{what}: PrimaryExists names the wrong holder"
        ),
        other => panic!("{what}: expected PrimaryExists, got {other}"),
    }
}

/// While `a` holds the lease, neither `b` nor `a` again can acquire it, and the
/// refusal names `a`.
pub async fn one_holder_at_a_time(a: &dyn Leaser, b: &dyn Leaser) {
    let lease = a.acquire().await.expect("first acquire");
    let err = b.acquire().await.expect_err("second acquire must fail");
    assert!(err.is_retryable(), "PrimaryExists is retryable");
    assert_primary_exists(err, a, "one holder (other candidate)");
    let err = a.acquire().await.expect_err("acquiring twice must fail");
    assert_primary_exists(err, a, "one holder (same candidate)");
    lease.release().await.expect("release");
}

/// The stored value is the holder's hostname and advertise URL, as every node reads
/// it; after release nobody is named.
pub async fn value_names_the_holder(a: &dyn Leaser, b: &dyn Leaser) {
    assert_eq!(
        a.primary_info().await.expect("read"),
        None,
        "nobody holds it yet"
    );
    let lease = a.acquire().await.expect("acquire");
    for reader in [a, b] {
        assert_eq!(
            reader.primary_info().await.expect("read").as_ref(),
            Some(a.node_info()),
            "the value names the holder"
        );
    }
    lease.release().await.expect("release");
    assert_eq!(
        a.primary_info().await.expect("read"),
        None,
        "after release nobody is named"
    );
}

/// Renewing every TTL/2 keeps the lease past the longest expiry the store may use,
/// and moves [`Lease::expires_at`] forward.
pub async fn renew_keeps_it(a: &dyn Leaser, b: &dyn Leaser, timing: Timing) {
    let lease = a.acquire().await.expect("acquire");
    let period = timing.ttl / 2;
    let hold_until = Instant::now() + timing.takeover_within;
    let mut last = lease.expires_at();
    while Instant::now() < hold_until {
        tokio::time::sleep(period).await;
        lease.renew().await.expect("renew keeps the lease");
        let now = lease.expires_at();
        if let (Some(before), Some(after)) = (last, now) {
            assert!(after > before, "renew moves expires_at forward");
            assert!(after > Instant::now(), "a renewed lease is valid now");
        }
        last = now;
    }
    let err = b.acquire().await.expect_err("still held after renewals");
    assert_primary_exists(err, a, "renew keeps it");
    lease.release().await.expect("release");
}

/// After a clean release another candidate acquires at once (well within a second),
/// the released handle reports [`LeaseError::Lost`] on renew, and a second release is
/// not an error.
pub async fn release_hands_it_over(a: &dyn Leaser, b: &dyn Leaser) {
    let first = a.acquire().await.expect("acquire");
    first.release().await.expect("release");
    first.release().await.expect("release twice");
    let started = Instant::now();
    let second = acquire_within(b, Duration::from_secs(1)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "handover took {:?}",
        started.elapsed()
    );
    assert_eq!(
        a.primary_info().await.expect("read").as_ref(),
        Some(b.node_info()),
        "the new holder is named"
    );
    assert!(
        matches!(first.renew().await, Err(LeaseError::Lost { .. })),
        "a released lease cannot be renewed"
    );
    second.release().await.expect("release");
}

/// A holder that stops renewing (a crash) loses the lease no sooner than its TTL and
/// within [`Timing::takeover_within`]: readers then see nobody.
pub async fn expires_after_ttl(a: &dyn Leaser, timing: Timing) {
    let before = Instant::now();
    let lease = a.acquire().await.expect("acquire");
    drop(lease); // crash: no release, no renewals
    let gone_at = poll(
        "the lease expires",
        timing.takeover_within + timing.ttl,
        || async {
            match a.primary_info().await {
                Ok(None) => Some(Instant::now()),
                Ok(Some(_)) | Err(_) => None,
            }
        },
    )
    .await;
    let lived = gone_at - before;
    assert!(
        lived >= timing.ttl,
        "the lease vanished after {lived:?}, before its TTL {:?}",
        timing.ttl
    );
}

/// When the holder crashes, a second candidate takes over within
/// [`Timing::takeover_within`], and every reader then names it.
pub async fn second_candidate_takes_over(a: &dyn Leaser, b: &dyn Leaser, timing: Timing) {
    let lease = a.acquire().await.expect("acquire");
    drop(lease);
    let started = Instant::now();
    let taken = acquire_within(b, timing.takeover_within).await;
    assert!(
        started.elapsed() >= timing.ttl.saturating_sub(Duration::from_millis(100)),
        "taken over after {:?}, before the TTL",
        started.elapsed()
    );
    for reader in [a, b] {
        assert_eq!(
            reader.primary_info().await.expect("read").as_ref(),
            Some(b.node_info()),
            "the new holder is named"
        );
    }
    taken.release().await.expect("release");
}

/// A holder that stopped renewing learns it lost the lease: after another candidate
/// took over, its renew is [`LeaseError::Lost`]; and its own
/// [`Lease::expires_at`] had passed before the other candidate got the lease, so the
/// two never both believed they held it.
pub async fn holder_learns_it_lost(a: &dyn Leaser, b: &dyn Leaser, timing: Timing) {
    let old = a.acquire().await.expect("acquire");
    let new = acquire_within(b, timing.takeover_within).await;
    let won_at = Instant::now();
    if let Some(expired) = old.expires_at() {
        assert!(
            expired <= won_at,
            "the old holder believed its lease valid until after the takeover"
        );
    }
    match old.renew().await {
        Err(e @ LeaseError::Lost { .. }) => assert!(!e.is_retryable(), "Lost is final"),
        Err(e) => panic!("renew after losing the lease: expected Lost, got {e:?}"),
        Ok(()) => panic!("renew after losing the lease succeeded"),
    }
    // Cleaning up the lost handle must not free the new holder's lease. Whether it
    // reports an error is up to the store; it must not take the lease with it.
    let _ = old.release().await;
    assert_eq!(
        a.primary_info().await.expect("read").as_ref(),
        Some(b.node_info()),
        "the new holder keeps the lease after the old one cleans up"
    );
    new.renew().await.expect("the new holder renews");
    new.release().await.expect("release");
}

/// A non-candidate never acquires, and says why.
pub async fn non_candidate_never_acquires(replica: &dyn Leaser) {
    assert!(!replica.candidate());
    let err = replica.acquire().await.expect_err("must refuse");
    assert!(
        matches!(err, LeaseError::NotCandidate { .. }),
        "expected NotCandidate, got {err}"
    );
    assert!(!err.is_retryable());
}

/// [`Leaser::watch_primary`] answers soon after another candidate acquires (well
/// before its `wait`), naming it, with a new token. For stores with change
/// notifications (Consul, etcd); the static leaser's default implementation waits out
/// `wait` instead.
pub async fn watch_sees_a_new_holder(a: &dyn Leaser, b: &dyn Leaser) {
    let (holder, token) = b
        .watch_primary(0, Duration::from_secs(1))
        .await
        .expect("first watch answers at once");
    assert_eq!(holder, None, "nobody holds it yet");
    let wait = Duration::from_secs(20);
    let watch = async {
        let started = Instant::now();
        let mut token = token;
        loop {
            let (holder, next) = b.watch_primary(token, wait).await.expect("watch");
            if holder.is_some() {
                return (holder, next, started.elapsed());
            }
            token = next;
        }
    };
    let acquire = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.acquire().await.expect("acquire")
    };
    let ((holder, next, took), lease) = tokio::join!(watch, acquire);
    assert_eq!(
        holder.as_ref(),
        Some(a.node_info()),
        "the watch names the holder"
    );
    assert!(next > token, "the token moves forward");
    assert!(
        took < Duration::from_secs(2),
        "the watch answered after {took:?}"
    );
    lease.release().await.expect("release");
}

/// The cluster id: none at first; the first id stored wins, whoever stores next
/// gets it back, and every client reads it. For stores that keep one (Consul, etcd).
pub async fn cluster_id_is_kept_once(a: &dyn Leaser, b: &dyn Leaser) {
    assert_eq!(a.cluster_id().await.expect("read"), None);
    let first = "LFSC00000000000000AA";
    assert_eq!(a.set_cluster_id_if_absent(first).await.expect("set"), first);
    assert_eq!(
        b.set_cluster_id_if_absent("LFSC00000000000000BB")
            .await
            .expect("set"),
        first,
        "the first id stays"
    );
    assert_eq!(b.cluster_id().await.expect("read").as_deref(), Some(first));
}

/// Handoff: the holder gives [`Lease::id`] to `b`, which takes the lease over with
/// [`Leaser::acquire_existing`] without it ever being free; every reader then names
/// `b`, `b` renews and releases it. For stores where a lease can change hands
/// (Consul, etcd); the static leaser refuses with `Unsupported`.
pub async fn handoff_names_the_new_holder(a: &dyn Leaser, b: &dyn Leaser) {
    let old = a.acquire().await.expect("acquire");
    let new = b
        .acquire_existing(old.id())
        .await
        .expect("take over the handed-over lease");
    assert_eq!(new.id(), old.id(), "the same lease changed hands");
    for reader in [a, b] {
        assert_eq!(
            reader.primary_info().await.expect("read").as_ref(),
            Some(b.node_info()),
            "after a handoff the value names the new holder"
        );
    }
    new.renew().await.expect("the new holder renews");
    new.release().await.expect("release");
    assert_eq!(a.primary_info().await.expect("read"), None);
    let err = b
        .acquire_existing(old.id())
        .await
        .expect_err("a released lease cannot be taken over");
    assert!(
        matches!(err, LeaseError::Lost { .. }),
        "expected Lost, got {err}"
    );
}
