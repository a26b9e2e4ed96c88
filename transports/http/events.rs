//! `GET /events`: what happens on this node, as JSON lines (the shapes LiteFS uses).
//!
//! - `{"type":"init","data":{"isPrimary":B,"hostname":H}}` first, with the current
//!   state (`hostname` is the primary's, `null` while none is known);
//! - `{"type":"primaryChange","data":{"isPrimary":B,"hostname":H}}` when the primary
//!   changes (this node leads, follows another node, or lost its primary);
//! - `{"type":"tx","db":NAME,"data":{"txID":HEX,"postApplyChecksum":HEX}}` when a
//!   database's position moves (a commit on the primary, an applied file on a
//!   replica). Commits closer together than the subscriber reads may arrive as one
//!   event naming the newest TXID.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::ops::OpsState;
use crate::ltx::Pos;

/// One line of `/events`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum Event {
    /// The state when the subscriber connected.
    #[serde(rename = "init")]
    Init {
        /// Role and primary.
        data: PrimaryData,
    },
    /// The primary changed.
    #[serde(rename = "primaryChange")]
    PrimaryChange {
        /// Role and primary.
        data: PrimaryData,
    },
    /// A database moved to a new position.
    #[serde(rename = "tx")]
    Tx {
        /// The database.
        db: String,
        /// Its new position.
        data: TxData,
    },
}

/// Role and primary in `init` and `primaryChange` events.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PrimaryData {
    /// Whether this node is the primary.
    #[serde(rename = "isPrimary")]
    pub is_primary: bool,
    /// The primary's hostname, if known.
    pub hostname: Option<String>,
}

/// Position in a `tx` event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TxData {
    /// TXID, 16 hex digits.
    #[serde(rename = "txID")]
    pub txid: String,
    /// Post-apply checksum, 16 hex digits.
    #[serde(rename = "postApplyChecksum")]
    pub post_apply_checksum: String,
}

impl Event {
    pub(crate) fn primary_change(is_primary: bool, hostname: Option<String>) -> Event {
        Event::PrimaryChange {
            data: PrimaryData {
                is_primary,
                hostname,
            },
        }
    }

    fn tx(db: &str, pos: Pos) -> Event {
        Event::Tx {
            db: db.to_string(),
            data: TxData {
                txid: format!("{:016x}", pos.txid.0),
                post_apply_checksum: format!("{:016x}", pos.post_apply_checksum.0),
            },
        }
    }

    fn line(&self) -> Bytes {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    }
}

fn positions(st: &OpsState) -> HashMap<String, Pos> {
    st.store
        .databases()
        .iter()
        .map(|db| (db.name().to_string(), db.pos()))
        .collect()
}

pub(crate) async fn events(State(st): State<OpsState>) -> Response {
    // Subscribed before the snapshot is taken: nothing falls between the two.
    let mut primary_rx = st.info.subscribe_events();
    let mut changes = st.store.subscribe_changes();
    let mut seen = positions(&st);
    let init = Event::Init {
        data: PrimaryData {
            is_primary: st.store.is_primary(),
            hostname: st.info.primary().map(|p| p.0),
        },
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if tx.send(init.line()).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                r = primary_rx.recv() => match r {
                    Ok(e) => {
                        if tx.send(e.line()).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                r = changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let now = positions(&st);
                    let mut moved: Vec<_> = now
                        .iter()
                        .filter(|(db, pos)| seen.get(*db) != Some(*pos))
                        .collect();
                    moved.sort_by(|a, b| a.0.cmp(b.0));
                    for (db, pos) in moved {
                        if tx.send(Event::tx(db, *pos).line()).await.is_err() {
                            return;
                        }
                    }
                    seen = now;
                }
                _ = tx.closed() => return,
            }
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_litefs_shapes() {
        assert_eq!(
            serde_json::to_string(&Event::primary_change(false, Some("n1".into()))).unwrap(),
            r#"{"type":"primaryChange","data":{"isPrimary":false,"hostname":"n1"}}"#
        );
        let tx = Event::tx(
            "db",
            Pos {
                txid: crate::ltx::TxId(2),
                post_apply_checksum: crate::ltx::Checksum(0xab),
            },
        );
        assert_eq!(
            serde_json::to_string(&tx).unwrap(),
            r#"{"type":"tx","db":"db","data":{"txID":"0000000000000002","postApplyChecksum":"00000000000000ab"}}"#
        );
    }
}
