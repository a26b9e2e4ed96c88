//! `POST /promote` (on a replica: become the primary by handoff) and `POST /handoff`
//! (on the primary: hand the lease to the replica named by `?replica=NODE_ID`). Both
//! forward to the node's election and wait for its answer.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::ops::{Control, OpsState};

/// Longest a handoff may take end to end (catching up, taking the lease over).
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

fn text(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, format!("{msg}\n")).into_response()
}

async fn ask<T>(
    st: &OpsState,
    make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Control,
) -> Result<T, Response> {
    let Some(control) = st.info.control() else {
        return Err(text(
            StatusCode::CONFLICT,
            "this node's lease cannot be handed over (static lease)",
        ));
    };
    let (tx, rx) = oneshot::channel();
    if control.send(make(tx)).await.is_err() {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is stopping",
        ));
    }
    match tokio::time::timeout(HANDOFF_TIMEOUT, rx).await {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(text(StatusCode::CONFLICT, e)),
        Ok(Err(_)) => Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is stopping",
        )),
        Err(_) => Err(text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {HANDOFF_TIMEOUT:?}"),
        )),
    }
}

pub(crate) async fn promote(State(st): State<OpsState>) -> Response {
    if st.store.is_primary() {
        return text(StatusCode::OK, "already the primary");
    }
    match ask(&st, |reply| Control::Promote { reply }).await {
        Ok(msg) => text(StatusCode::OK, msg),
        Err(r) => r,
    }
}

/// `?replica=NODE_ID`.
#[derive(Debug, Deserialize)]
pub(crate) struct HandoffQuery {
    replica: u64,
}

pub(crate) async fn handoff(State(st): State<OpsState>, q: Query<HandoffQuery>) -> Response {
    if !st.store.is_primary() {
        return text(StatusCode::CONFLICT, "not the primary");
    }
    match ask(&st, |reply| Control::Handoff {
        replica: q.replica,
        reply,
    })
    .await
    {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(r) => r,
    }
}
