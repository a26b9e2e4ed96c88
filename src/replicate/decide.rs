//! The primary's per-database decision: what a replica at some position gets next.

use crate::ltx::{Checksum, Pos, TxId};

/// An LTX file the primary keeps, as far as the decision needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMeta {
    /// First TXID it covers.
    pub min: TxId,
    /// Last TXID it covers.
    pub max: TxId,
    /// Database checksum the file expects before it is applied.
    pub pre_apply: Checksum,
}

/// Why a replica gets a snapshot instead of the next file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotReason {
    /// The replica is at a higher TXID than the primary (a diverged former primary).
    ReplicaAhead,
    /// Same TXID, different checksum: the histories diverged.
    Diverged,
    /// The file after the replica's TXID is no longer kept (retention).
    BehindRetention,
    /// The next file expects another checksum than the replica has.
    PreApplyMismatch,
}

/// What the primary sends a replica for one database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send this file (the one starting right after the replica's TXID).
    SendFile(FileMeta),
    /// Send a snapshot of the current database.
    SendSnapshot(SnapshotReason),
    /// The replica has the primary's position.
    UpToDate,
}

/// Decides what a replica at `replica` (`None`: it does not have the database) gets,
/// given the primary's position `primary` and the files it keeps.
///
/// Rules, in order: a primary without commits has nothing to send; a replica without
/// the database (or at TXID 0) is at position zero; a replica ahead of the primary, or
/// at the primary's TXID with another checksum, gets a snapshot; at the primary's
/// position it is up to date; otherwise the file starting at the replica's TXID + 1 is
/// sent if kept and its pre-apply checksum is the replica's (a TXID 1 file is a
/// snapshot and follows position zero), else a snapshot.
pub fn decide(replica: Option<Pos>, primary: Pos, files: &[FileMeta]) -> Decision {
    let replica = replica.unwrap_or_default();
    if primary.txid.0 == 0 {
        return Decision::UpToDate;
    }
    if replica.txid > primary.txid {
        return Decision::SendSnapshot(SnapshotReason::ReplicaAhead);
    }
    if replica.txid == primary.txid {
        return if replica.post_apply_checksum == primary.post_apply_checksum {
            Decision::UpToDate
        } else {
            Decision::SendSnapshot(SnapshotReason::Diverged)
        };
    }
    let next = TxId(replica.txid.0 + 1);
    let Some(file) = files
        .iter()
        .find(|f| f.min == next && f.max >= f.min && f.max <= primary.txid)
    else {
        return Decision::SendSnapshot(SnapshotReason::BehindRetention);
    };
    let follows = if file.min == TxId(1) {
        // A TXID 1 file holds every page and applies to nothing.
        replica.txid.0 == 0
    } else {
        file.pre_apply == replica.post_apply_checksum
    };
    if follows {
        Decision::SendFile(*file)
    } else {
        Decision::SendSnapshot(SnapshotReason::PreApplyMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum after TXID `t` in the primary's history.
    fn sum(t: u64) -> Checksum {
        Checksum(0x8000_0000_0000_0000 | (t * 7 + 3))
    }

    fn pos(t: u64, c: Checksum) -> Pos {
        Pos {
            txid: TxId(t),
            post_apply_checksum: c,
        }
    }

    /// The primary's files for TXIDs `oldest..=head`, one TXID each.
    fn files(oldest: u64, head: u64) -> Vec<FileMeta> {
        (oldest..=head)
            .map(|t| FileMeta {
                min: TxId(t),
                max: TxId(t),
                pre_apply: if t == 1 { Checksum(0) } else { sum(t - 1) },
            })
            .collect()
    }

    /// Reference model written independently of `decide`: what a replica needs, from
    /// the relation between the two histories.
    fn expected(replica: Option<(u64, bool)>, head: u64, oldest: u64) -> Decision {
        if head == 0 {
            return Decision::UpToDate;
        }
        let (t, same_history) = replica.unwrap_or((0, true));
        if t > head {
            Decision::SendSnapshot(SnapshotReason::ReplicaAhead)
        } else if t == head && same_history {
            Decision::UpToDate
        } else if t == head {
            Decision::SendSnapshot(SnapshotReason::Diverged)
        } else if t + 1 < oldest || oldest == 0 {
            Decision::SendSnapshot(SnapshotReason::BehindRetention)
        } else if same_history || t == 0 {
            let f = files(t + 1, t + 1)[0];
            Decision::SendFile(f)
        } else {
            Decision::SendSnapshot(SnapshotReason::PreApplyMismatch)
        }
    }

    /// Every combination of primary head (0..=6), oldest kept file (1..=head, or none
    /// kept), replica TXID (absent, 0..=8) and replica history (same as the primary's
    /// or diverged at its last TXID).
    #[test]
    fn every_small_case_matches_the_model() {
        let mut cases = 0;
        for head in 0..=6u64 {
            let primary = pos(head, if head == 0 { Checksum(0) } else { sum(head) });
            let oldests: Vec<u64> = if head == 0 {
                vec![0]
            } else {
                (0..=head).collect()
            };
            for oldest in oldests {
                // oldest == 0: no file kept at all.
                let kept = if oldest == 0 {
                    Vec::new()
                } else {
                    files(oldest, head)
                };
                let mut replicas: Vec<Option<(u64, bool)>> = vec![None];
                for t in 0..=8u64 {
                    replicas.push(Some((t, true)));
                    if t > 0 {
                        replicas.push(Some((t, false)));
                    }
                }
                for r in replicas {
                    let rpos = r.map(|(t, same)| {
                        let c = match (t, same) {
                            (0, _) => Checksum(0),
                            (t, true) if t <= head => sum(t),
                            // Ahead of the primary, or diverged: a checksum the
                            // primary's history never had.
                            (t, _) => Checksum(0x4000_0000_0000_0000 | t),
                        };
                        pos(t, c)
                    });
                    let same = r.map(|(t, s)| s && t <= head);
                    let model = expected(r.map(|(t, _)| (t, same.unwrap_or(true))), head, oldest);
                    assert_eq!(
                        decide(rpos, primary, &kept),
                        model,
                        "head {head}, oldest kept {oldest}, replica {r:?}"
                    );
                    cases += 1;
                }
            }
        }
        assert!(cases > 500, "{cases} cases");
    }

    #[test]
    fn a_multi_txid_file_is_sent_whole_and_files_past_the_head_are_ignored() {
        let primary = pos(9, sum(9));
        let f = FileMeta {
            min: TxId(4),
            max: TxId(9),
            pre_apply: sum(3),
        };
        assert_eq!(
            decide(Some(pos(3, sum(3))), primary, &[f]),
            Decision::SendFile(f)
        );
        let beyond = FileMeta {
            min: TxId(4),
            max: TxId(12),
            pre_apply: sum(3),
        };
        assert_eq!(
            decide(Some(pos(3, sum(3))), primary, &[beyond]),
            Decision::SendSnapshot(SnapshotReason::BehindRetention)
        );
    }

    #[test]
    fn a_replica_at_zero_with_a_stray_checksum_still_takes_the_first_file() {
        // TXID 0 means "nothing": whatever checksum it reports, TXID 1 applies.
        let primary = pos(2, sum(2));
        assert_eq!(
            decide(Some(pos(0, Checksum(5))), primary, &files(1, 2)),
            Decision::SendFile(files(1, 1)[0])
        );
    }
}
