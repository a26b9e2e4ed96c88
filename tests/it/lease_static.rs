//! The static leaser through the conformance behaviours that apply to it (see
//! `litefs::backends::conformance` for why expiry and takeover do not).

use std::time::Duration;

use litefs::backends::StaticLeaser;
use litefs::backends::conformance::{self, Timing};
use litefs::lease::{LeaseError, Leaser, PrimaryInfo};

fn info() -> PrimaryInfo {
    PrimaryInfo {
        hostname: "primary".into(),
        advertise_url: "http://primary:20202".into(),
    }
}

#[tokio::test]
async fn static_conformance() {
    let primary = StaticLeaser::new(info(), true);
    let replica = StaticLeaser::new(info(), false);
    conformance::one_holder_at_a_time(&primary, &primary).await;
    conformance::value_names_the_holder(&primary, &replica).await;
    let timing = Timing {
        ttl: Duration::from_millis(200),
        takeover_within: Duration::from_millis(500),
    };
    conformance::renew_keeps_it(&primary, &primary, timing).await;
    conformance::release_hands_it_over(&primary, &primary).await;
    conformance::non_candidate_never_acquires(&replica).await;
    // Handoff does not apply: the static lease cannot change hands.
    let err = primary.acquire_existing("static").await.unwrap_err();
    assert!(matches!(err, LeaseError::Unsupported { .. }), "{err}");
}
