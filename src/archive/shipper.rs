//! The primary side: a background thread that ships LTX files and snapshots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{
    ArchiveError, POSITIONS_DIR, PositionRecord, PositionsFile, compact_files, peek,
    positions_name, to_archive_file,
};
use super::{ArchiveState, RestoreTarget};
use crate::ltx::{Pos, TxId};
use crate::sink::{LtxKey, MAX_COMPACTION_LEVEL, SNAPSHOT_LEVEL, SinkError, SnapshotSink};
use crate::store::{LtxFile, Store, list_ltx_files};

/// Most local files shipped per database in one round (one positions object each
/// round); `max_files_per_sync` bounds the level-0 files they become.
const MAX_BATCH: usize = 4096;
/// Longest the last round at shutdown may take.
const FINAL_ROUND_LIMIT: Duration = Duration::from_secs(10);
/// Puts in flight at once.
const PUT_CONCURRENCY: usize = 16;
/// Longest wait between retries while the sink is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a node that is not the primary reads the archive's position (its local
/// retention may then remove what the primary archived).
const FOLLOW_INTERVAL: Duration = Duration::from_secs(5);

/// Settings of the archiver (from the `backup` config section).
#[derive(Debug, Clone)]
pub struct ArchiverOptions {
    /// `backup.sync-interval`: how often new LTX files are looked for and shipped.
    pub sync_interval: Duration,
    /// `backup.snapshot-interval`: how often a level-9 snapshot is written (one is also
    /// written at start when the archive has none at the newest shipped TXID).
    pub snapshot_interval: Duration,
    /// `backup.retention`: after each snapshot, files only needed to restore points
    /// older than this are removed from the archive (see [`Archiver`]).
    pub retention: Duration,
    /// `backup.compaction-levels`: level `i + 1` merges the files of level `i` every
    /// `compaction_levels[i]`.
    pub compaction_levels: Vec<Duration>,
    /// `backup.max-files-per-sync`: most level-0 files put per database and round;
    /// above it, consecutive transactions share one level-0 file.
    pub max_files_per_sync: usize,
}

impl Default for ArchiverOptions {
    /// The defaults of the `backup` section.
    fn default() -> ArchiverOptions {
        ArchiverOptions::from_config(&crate::config::BackupConfig::default())
    }
}

impl ArchiverOptions {
    /// Options from the `backup` section.
    pub fn from_config(cfg: &crate::config::BackupConfig) -> ArchiverOptions {
        ArchiverOptions {
            sync_interval: cfg.sync_interval,
            snapshot_interval: cfg.snapshot_interval,
            retention: cfg.retention,
            compaction_levels: cfg.compaction_levels.clone(),
            max_files_per_sync: cfg.max_files_per_sync,
        }
    }
}

/// The running archiver: a thread (`litefs-archiver`) with its own async runtime, so
/// a slow or unreachable sink never touches the FUSE runtime or a commit.
///
/// Every `sync_interval` it lists each database's local LTX files (live and deleted
/// databases), re-encodes those above the archive's newest TXID without checksums
/// ([`super::to_archive_file`]), puts them at level 0, records their positions, and
/// then lets the store's retention remove them ([`Store::set_archived`]; retention
/// holds every unshipped file from the moment the archiver starts). A failure backs
/// off (1 s doubling to 30 s) per database and logs the backlog; nothing is dropped.
///
/// Snapshots are built from the archive itself: the newest level-9 snapshot (or the
/// level-0 chain from TXID 1) compacted with the level-0 files after it. They are
/// therefore consistent by construction (every input is a verified, committed
/// transaction) and never read the live database file, whose pages a writer may be
/// changing. Only when the archive has no history from TXID 1 is the first snapshot
/// read from the live database, and kept only if it hashes to the database's position.
///
/// Retention runs after each snapshot: the newest snapshot written before `now -
/// retention` is the base for restoring any point inside the window, so older
/// snapshots and the level-0 files it covers are deleted; everything after it stays.
/// Without such a snapshot nothing is deleted, so the newest state (and every point in
/// the window) always stays restorable. Positions objects are kept (a few bytes per
/// transaction).
#[derive(Debug)]
pub struct Archiver {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    status: Arc<ArchiveState>,
}

impl Archiver {
    /// Starts archiving every database of `store` to `sink`.
    ///
    /// # Errors
    /// The thread or its runtime cannot be created.
    pub fn start(
        store: Arc<Store>,
        sink: Arc<dyn SnapshotSink>,
        opts: ArchiverOptions,
    ) -> std::io::Result<Archiver> {
        store.hold_for_archive();
        let scratch = store.options().data_dir.join("archive-tmp");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stop_rx) = watch::channel(false);
        let status = Arc::new(ArchiveState::new(sink.type_name()));
        let worker = Worker {
            store,
            sink,
            opts,
            scratch,
            status: status.clone(),
            dbs: BTreeMap::new(),
            was_primary: false,
            follow_at: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("litefs-archiver".into())
            .spawn(move || rt.block_on(worker.run(stop_rx)))?;
        Ok(Archiver {
            stop,
            thread: Some(thread),
            status,
        })
    }

    /// Highest TXID of `db` known to be in the archive (`None` before the first round).
    pub fn shipped(&self, db: &str) -> Option<TxId> {
        self.status.txid(db)
    }

    /// The state `/info` and `/metrics` report.
    pub fn state(&self) -> Arc<ArchiveState> {
        self.status.clone()
    }

    /// Ships what is pending one last time (if the sink answers) and stops.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("archiver thread panicked");
        }
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the archiver knows about one database.
struct DbArchive {
    /// Newest TXID in the archive's level 0 (`None`: not listed yet).
    shipped: Option<TxId>,
    /// The archive's position at `shipped` as the primary recorded it (`None`: not
    /// recorded, e.g. a Litestream-written archive).
    last: Option<Pos>,
    /// Newest level-9 snapshot.
    snapshot: TxId,
    next_snapshot: Instant,
    /// When each compaction level (1, 2, ...) is next due.
    next_compaction: Vec<Instant>,
    retry_at: Instant,
    backoff: Duration,
    /// Another history is in the archive: stop touching it.
    halted: bool,
    /// A gap was reported (logged once).
    gap_logged: bool,
    /// Files put whose positions object is not stored yet (its put failed): it is
    /// retried before anything else, and the files are not shipped again (a new
    /// grouping would leave overlapping level-0 files).
    unrecorded: Option<Unrecorded>,
}

/// A positions object still to store, for files already in the archive.
#[derive(Clone)]
struct Unrecorded {
    /// Object name under `<db>/litefs/`.
    name: String,
    body: Vec<u8>,
    /// Position after the last of those files.
    pos: Pos,
}

/// A file re-encoded for level 0, waiting for its put.
struct Prepared {
    key: LtxKey,
    tmp: PathBuf,
    /// One per transaction in the file.
    records: Vec<PositionRecord>,
    pos: Pos,
}

struct Worker {
    store: Arc<Store>,
    sink: Arc<dyn SnapshotSink>,
    opts: ArchiverOptions,
    scratch: PathBuf,
    status: Arc<ArchiveState>,
    dbs: BTreeMap<String, DbArchive>,
    /// The node was the primary at the previous round.
    was_primary: bool,
    /// When a non-primary node next reads the archive's position.
    follow_at: Instant,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        info!(sink = self.sink.type_name(), "archiver started");
        // Rounds start every sync interval (a long round delays the next one, it does
        // not add a full interval on top).
        let mut ticks = tokio::time::interval(self.opts.sync_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => false,
                _ = stop.changed() => true,
            };
            if stopping {
                // Bounded: with the sink down, the files stay local and the next start
                // ships them.
                if tokio::time::timeout(FINAL_ROUND_LIMIT, self.round(true))
                    .await
                    .is_err()
                {
                    warn!("archive not caught up at shutdown; the next start ships the rest");
                }
                break;
            }
            self.round(false).await;
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
        info!("archiver stopped");
    }

    /// One pass over every database. Only the primary ships: a node that is not (a
    /// replica, an elected node while another leads) only follows the archive's
    /// position; when it becomes the primary it forgets what it knew and reads the
    /// archive's position again (another primary may have extended it meanwhile).
    async fn round(&mut self, last: bool) {
        let primary = self.store.is_primary();
        self.status.set_active(primary);
        if primary != self.was_primary {
            self.was_primary = primary;
            self.dbs.clear();
            if primary {
                info!("primary: archiving from the archive's current position");
            } else {
                info!("not the primary: archiving paused");
            }
        }
        if !primary {
            if !last && Instant::now() >= self.follow_at {
                self.follow_at = Instant::now() + FOLLOW_INTERVAL.max(self.opts.sync_interval);
                self.follow().await;
            }
            return;
        }
        let data = self.store.options().data_dir.join("dbs");
        let mut names: Vec<String> = self
            .store
            .databases()
            .iter()
            .map(|d| d.name().to_string())
            .collect();
        names.extend(self.store.deleted_databases().into_iter().map(|(n, _)| n));
        names.sort();
        names.dedup();
        let now = Instant::now();
        for name in names {
            let st = self.dbs.entry(name.clone()).or_insert_with(|| DbArchive {
                shipped: None,
                last: None,
                snapshot: TxId(0),
                next_snapshot: now,
                next_compaction: self
                    .opts
                    .compaction_levels
                    .iter()
                    .map(|d| now + *d)
                    .collect(),
                retry_at: now,
                backoff: Duration::ZERO,
                halted: false,
                gap_logged: false,
                unrecorded: None,
            });
            if st.halted || (now < st.retry_at && !last) {
                continue;
            }
            let ltx_dir = data.join(&name).join("ltx");
            let result = self.sync_db(&name, &ltx_dir, last).await;
            self.report_backlog(&name, &ltx_dir);
            let st = self.dbs.get_mut(&name).expect("inserted above");
            match result {
                Ok(()) => st.backoff = Duration::ZERO,
                Err(ArchiveError::Diverged { key }) => {
                    error!(db = name, %key, "the archive holds another history for this database; archiving of it stopped (nothing overwritten)");
                    st.halted = true;
                }
                Err(e) => {
                    st.backoff = (st.backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                    st.retry_at = Instant::now() + st.backoff;
                    let local = list_ltx_files(&ltx_dir)
                        .ok()
                        .and_then(|f| f.last().map(|f| f.max))
                        .unwrap_or_default();
                    let shipped = st.shipped.unwrap_or_default();
                    warn!(
                        db = name,
                        error = %e,
                        backlog = local.0.saturating_sub(shipped.0),
                        shipped = %shipped,
                        retry_in = ?st.backoff,
                        "archive failed; LTX files are kept until shipped"
                    );
                }
            }
        }
    }

    /// On a node that is not the primary: lets local retention remove what the
    /// primary archived (the newest TXID in the archive, per database).
    async fn follow(&mut self) {
        let names: Vec<String> = self
            .store
            .databases()
            .iter()
            .map(|d| d.name().to_string())
            .collect();
        for db in names {
            match archive_top(self.sink.as_ref(), &db).await {
                Ok(top) => {
                    self.store.set_archived(&db, top);
                    self.status.set_txid(&db, top);
                    self.status.set_backlog(&db, 0, 0);
                }
                Err(e) => debug!(db, error = %e, "cannot read the archive's position"),
            }
        }
    }

    /// Counts the local files not in the archive yet and the age of the oldest.
    fn report_backlog(&self, db: &str, ltx_dir: &Path) {
        let shipped = self.dbs.get(db).and_then(|s| s.shipped).unwrap_or_default();
        let Ok(files) = list_ltx_files(ltx_dir) else {
            return;
        };
        let pending: Vec<_> = files.iter().filter(|f| f.max > shipped).collect();
        let lag_ms = pending
            .first()
            .and_then(|f| std::fs::metadata(&f.path).and_then(|m| m.modified()).ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0, |d| d.as_millis() as u64);
        self.status.set_backlog(db, pending.len() as u64, lag_ms);
    }

    fn set_shipped(&mut self, db: &str, txid: TxId) {
        if let Some(st) = self.dbs.get_mut(db) {
            st.shipped = Some(txid);
        }
        self.store.set_archived(db, txid);
        self.status.set_txid(db, txid);
    }

    async fn sync_db(&mut self, db: &str, ltx_dir: &Path, last: bool) -> Result<(), ArchiveError> {
        let (known, snapshot) = {
            let st = &self.dbs[db];
            (st.shipped, st.snapshot)
        };
        let shipped = match known {
            Some(t) => t,
            None => {
                let snaps = self.sink.list(db, SNAPSHOT_LEVEL).await?;
                let snap = snaps.iter().map(|o| o.key.max_txid).max().unwrap_or(0);
                if let Some(st) = self.dbs.get_mut(db) {
                    st.snapshot = TxId(snap);
                }
                let t = archive_top(self.sink.as_ref(), db).await?;
                let last = recorded_position(self.sink.as_ref(), db, t).await?;
                if let Some(st) = self.dbs.get_mut(db) {
                    st.last = last;
                }
                self.set_shipped(db, t);
                info!(db, shipped = %t, snapshot = %TxId(snap), "archive position");
                t
            }
        };
        self.record_positions(db).await?;
        let files =
            list_ltx_files(ltx_dir).map_err(|e| ArchiveError::io(db, "list", ltx_dir, e))?;
        let pending: Vec<_> = files
            .into_iter()
            .filter(|f| f.max > shipped)
            .take(MAX_BATCH)
            .collect();
        let groups = batches(&pending, self.opts.max_files_per_sync);
        let mut prepared = Vec::with_capacity(groups.len());
        let mut result = Ok(());
        let (mut expect, mut last_pos) = (shipped, self.dbs[db].last);
        for group in &groups {
            let (f, end) = (group[0], group[group.len() - 1].max);
            if f.min.0 != expect.0 + 1 && f.min.0 != 1 && !self.dbs[db].gap_logged {
                warn!(db, archive = %expect, next = %f.min, "the local LTX history does not continue the archive: restores need a snapshot after this point");
                if let Some(st) = self.dbs.get_mut(db) {
                    st.gap_logged = true;
                }
            }
            match self.prepare(db, group, expect, last_pos) {
                Ok(p) => {
                    expect = end;
                    last_pos = Some(p.pos);
                    prepared.push(p);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Several puts in flight (an object store answers each in milliseconds); the
        // results come back in order, and only the prefix that succeeded counts.
        let outcomes: Vec<Result<(), ArchiveError>> =
            futures_util::stream::iter(prepared.iter().map(|p| self.put(&p.key, &p.tmp)))
                .buffered(PUT_CONCURRENCY)
                .collect()
                .await;
        let mut records = Vec::new();
        let mut top = shipped;
        let mut shipped_last = None;
        for (p, outcome) in prepared.iter().zip(outcomes) {
            if let Err(e) = outcome {
                result = Err(e);
                break;
            }
            records.extend(p.records.iter().cloned());
            top = TxId(p.key.max_txid);
            shipped_last = Some(p.pos);
        }
        for p in &prepared {
            let _ = std::fs::remove_file(&p.tmp);
        }
        if let (Some(first), Some(pos)) = (pending.first(), shipped_last) {
            let name = positions_name(first.min, top);
            let files = records.len();
            let body = serde_json::to_vec_pretty(&PositionsFile { positions: records })
                .expect("plain strings and integers always serialize");
            if let Some(st) = self.dbs.get_mut(db) {
                // Put: never shipped again, even if the positions object fails now.
                st.shipped = Some(top);
                st.unrecorded = Some(Unrecorded { name, body, pos });
            }
            self.record_positions(db).await?;
            debug!(db, files, shipped = %top, "shipped LTX files");
        }
        result?;

        if !last {
            self.compact_due(db).await?;
        }
        let st = &self.dbs[db];
        if !last && top > snapshot && Instant::now() >= st.next_snapshot {
            if let Some(st) = self.dbs.get_mut(db) {
                st.next_snapshot = Instant::now() + self.opts.snapshot_interval;
            }
            self.snapshot(db, top).await?;
        }
        Ok(())
    }

    /// Stores the positions object of files already put, if one is pending; only then
    /// do they count as archived (the store's retention may remove them).
    async fn record_positions(&mut self, db: &str) -> Result<(), ArchiveError> {
        let Some(u) = self.dbs.get(db).and_then(|st| st.unrecorded.clone()) else {
            return Ok(());
        };
        self.sink.put_meta(db, &u.name, u.body).await?;
        if let Some(st) = self.dbs.get_mut(db) {
            st.last = Some(u.pos);
            st.unrecorded = None;
        }
        self.set_shipped(db, u.pos.txid);
        Ok(())
    }

    /// Re-encodes local files (one, or consecutive ones merged) without checksums
    /// for one level-0 file. A file that continues the archive (`archived + 1`) must
    /// start from the archive's position `last`: otherwise this node's history
    /// diverged from the archive's.
    fn prepare(
        &self,
        db: &str,
        files: &[&LtxFile],
        archived: TxId,
        last: Option<Pos>,
    ) -> Result<Prepared, ArchiveError> {
        let ends = files
            .iter()
            .map(|f| peek(&f.path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ArchiveError::ltx(db, e))?;
        let (first, _) = &ends[0];
        let (final_header, final_trailer) = &ends[ends.len() - 1];
        let key = LtxKey {
            db: db.to_string(),
            level: 0,
            min_txid: first.min_txid.0,
            max_txid: final_header.max_txid.0,
        };
        if let Some(last) = last
            && last.txid == archived
            && first.min_txid.0 == archived.0 + 1
            && !first.is_snapshot()
            && !first.no_checksum()
            && first.pre_apply_pos() != last
        {
            warn!(db, archive = %last, local = %first.pre_apply_pos(), "this node's history differs from the archive's");
            return Err(ArchiveError::Diverged { key });
        }
        let tmp = self.scratch.join(format!("{db}.{}.ltx", first.min_txid));
        if files.len() == 1 {
            to_archive_file(&files[0].path, &tmp).map_err(|e| ArchiveError::ltx(db, e))?;
        } else {
            let paths: Vec<PathBuf> = files.iter().map(|f| f.path.clone()).collect();
            compact_files(&paths, &tmp).map_err(|e| ArchiveError::ltx(db, e))?;
        }
        Ok(Prepared {
            key,
            tmp,
            records: ends
                .iter()
                .map(|(h, t)| PositionRecord {
                    txid: h.max_txid.to_string(),
                    checksum: t.post_apply_checksum.to_string(),
                    timestamp_ms: h.timestamp,
                })
                .collect(),
            pos: Pos {
                txid: final_header.max_txid,
                post_apply_checksum: final_trailer.post_apply_checksum,
            },
        })
    }

    /// Create-if-absent put; an existing identical file counts as shipped.
    async fn put(&self, key: &LtxKey, path: &Path) -> Result<(), ArchiveError> {
        match self.sink.put(key, path).await {
            Ok(_) => Ok(()),
            Err(SinkError::AlreadyExists { .. }) => {
                let mut stored = Vec::new();
                self.sink
                    .open(key)
                    .await?
                    .read_to_end(&mut stored)
                    .await
                    .map_err(|e| ArchiveError::io(&key.db, "read back", path, e))?;
                let ours =
                    std::fs::read(path).map_err(|e| ArchiveError::io(&key.db, "read", path, e))?;
                if stored == ours {
                    debug!(%key, "already in the archive");
                    Ok(())
                } else {
                    Err(ArchiveError::Diverged { key: key.clone() })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the level-9 snapshot at `top` from the archive: the files the restore
    /// planner picks for `top` (the newest snapshot or TXID-1 file, then the highest
    /// compaction levels that fit, then level 0), compacted into one.
    async fn snapshot(&mut self, db: &str, top: TxId) -> Result<(), ArchiveError> {
        let started = Instant::now();
        let inputs: Vec<LtxKey> =
            match super::restore::plan(self.sink.as_ref(), db, RestoreTarget::Txid(top)).await {
                Ok(files) => files.into_iter().map(|o| o.key).collect(),
                Err(ArchiveError::Unrestorable { .. }) => {
                    return self.snapshot_from_database(db).await;
                }
                Err(e) => return Err(e),
            };
        if inputs.len() == 1 && inputs[0].level == SNAPSHOT_LEVEL {
            return Ok(());
        }
        let dir = self.scratch.join(format!("{db}.snapshot"));
        self.merge(db, &inputs, &dir, SNAPSHOT_LEVEL).await?;
        if let Some(st) = self.dbs.get_mut(db) {
            st.snapshot = top;
        }
        info!(db, txid = %top, files = inputs.len(), elapsed = ?started.elapsed(), "snapshot written to the archive");
        let removed = self.retain(db).await?;
        if removed > 0 {
            info!(db, files = removed, "archive retention removed files");
        }
        Ok(())
    }

    /// Runs the compactions whose interval passed (lowest level first, so a higher
    /// level sees what the lower one just wrote).
    async fn compact_due(&mut self, db: &str) -> Result<(), ArchiveError> {
        for i in 0..self.opts.compaction_levels.len() {
            let due = self.dbs[db].next_compaction.get(i).copied();
            if due.is_none_or(|t| Instant::now() < t) {
                continue;
            }
            let level = (i + 1) as u8;
            self.compact_level(db, level).await?;
            if let Some(t) = self
                .dbs
                .get_mut(db)
                .and_then(|st| st.next_compaction.get_mut(i))
            {
                *t = Instant::now() + self.opts.compaction_levels[i];
            }
        }
        Ok(())
    }

    /// Merges the contiguous run of level `level - 1` files above this level's newest
    /// TXID into one file at `level` (Litestream 0.5's compaction layout).
    async fn compact_level(&mut self, db: &str, level: u8) -> Result<(), ArchiveError> {
        let upper = self.sink.list(db, level).await?;
        let top = upper.iter().map(|o| o.key.max_txid).max().unwrap_or(0);
        let lower = self.sink.list(db, level - 1).await?;
        let mut run: Vec<LtxKey> = Vec::new();
        for o in lower.iter().filter(|o| o.key.min_txid > top) {
            if run
                .last()
                .is_some_and(|prev| o.key.min_txid != prev.max_txid + 1)
            {
                break;
            }
            run.push(o.key.clone());
        }
        if run.len() < 2 {
            return Ok(());
        }
        let dir = self.scratch.join(format!("{db}.compact{level}"));
        self.merge(db, &run, &dir, level).await?;
        debug!(
            db,
            level,
            files = run.len(),
            min = %TxId(run[0].min_txid),
            max = %TxId(run[run.len() - 1].max_txid),
            "compacted"
        );
        Ok(())
    }

    /// Downloads `inputs` (contiguous), compacts them into one file and puts it at
    /// `level`, using `dir` as scratch space.
    async fn merge(
        &self,
        db: &str,
        inputs: &[LtxKey],
        dir: &Path,
        level: u8,
    ) -> Result<(), ArchiveError> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| ArchiveError::io(db, "create", dir, e))?;
        let result = async {
            let mut paths = Vec::with_capacity(inputs.len());
            for (i, key) in inputs.iter().enumerate() {
                let p = dir.join(format!("{i:08}.ltx"));
                super::restore::download(self.sink.as_ref(), key, &p).await?;
                paths.push(p);
            }
            let out = dir.join("merged.ltx");
            let header = compact_files(&paths, &out).map_err(|e| ArchiveError::ltx(db, e))?;
            let key = LtxKey {
                db: db.to_string(),
                level,
                min_txid: header.min_txid.0,
                max_txid: header.max_txid.0,
            };
            self.put(&key, &out).await
        }
        .await;
        let _ = std::fs::remove_dir_all(dir);
        result
    }

    /// The archive cannot build a snapshot (no history from TXID 1 in it): read one from
    /// the live database ([`super::live::snapshot_live`]); if a writer got in the way,
    /// the next round tries again.
    async fn snapshot_from_database(&mut self, db: &str) -> Result<(), ArchiveError> {
        let Some(live) = self.store.db(db) else {
            return Ok(());
        };
        let out = self.scratch.join(format!("{db}.live.ltx"));
        let taken = super::live::snapshot_live(&live, &out);
        let result = match taken {
            Ok(Some(pos)) => {
                let key = LtxKey {
                    db: db.to_string(),
                    level: SNAPSHOT_LEVEL,
                    min_txid: 1,
                    max_txid: pos.txid.0,
                };
                let put = self.put(&key, &out).await;
                if put.is_ok() {
                    if let Some(st) = self.dbs.get_mut(db) {
                        st.snapshot = pos.txid;
                    }
                    info!(db, txid = %pos.txid, "no history from TXID 1 in the archive: snapshot read from the database");
                }
                put
            }
            Ok(None) => {
                if let Some(st) = self.dbs.get_mut(db) {
                    st.next_snapshot = Instant::now();
                }
                debug!(
                    db,
                    "database changed while it was read for a snapshot; retrying"
                );
                Ok(())
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&out);
        result
    }

    /// Archive retention (see [`Archiver`]); returns the number of files deleted.
    async fn retain(&self, db: &str) -> Result<usize, ArchiveError> {
        let cutoff = SystemTime::now()
            .checked_sub(self.opts.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let snaps = self.sink.list(db, SNAPSHOT_LEVEL).await?;
        let Some(base) = snaps
            .iter()
            .filter(|o| o.last_modified <= cutoff)
            .map(|o| o.key.max_txid)
            .max()
        else {
            return Ok(0);
        };
        let mut removed = 0;
        for o in snaps.iter().filter(|o| o.key.max_txid < base) {
            self.sink.delete(&o.key).await?;
            removed += 1;
        }
        for level in 0..=MAX_COMPACTION_LEVEL {
            for o in self.sink.list(db, level).await? {
                if o.key.max_txid <= base {
                    self.sink.delete(&o.key).await?;
                    removed += 1;
                }
            }
        }
        // Positions below the base are never checked again (the base's own is kept).
        for name in self.sink.list_meta(db, POSITIONS_DIR).await? {
            let below = name
                .strip_suffix(".json")
                .and_then(|stem| crate::ltx::parse_filename(&format!("{stem}.ltx")))
                .is_some_and(|(_, max)| max.0 < base);
            if below {
                self.sink
                    .delete_meta(db, &format!("{POSITIONS_DIR}/{name}"))
                    .await?;
            }
        }
        Ok(removed)
    }
}

/// Splits `pending` (TXID order) into runs that each become one level-0 file: at most
/// `max_files` runs of about equal length when there are more files than that, one
/// file per run otherwise. A run never spans a TXID gap or a snapshot.
fn batches(pending: &[LtxFile], max_files: usize) -> Vec<Vec<&LtxFile>> {
    let per = pending.len().div_ceil(max_files.max(1)).max(1);
    let mut out: Vec<Vec<&LtxFile>> = Vec::new();
    for f in pending {
        let joins = out.last().is_some_and(|run| {
            let prev = run[run.len() - 1];
            run.len() < per && f.min.0 == prev.max.0 + 1 && f.min.0 != 1
        });
        match out.last_mut() {
            Some(run) if joins => run.push(f),
            _ => out.push(vec![f]),
        }
    }
    out
}

/// Newest TXID up to which the archive holds `db` without a gap (0: none): the newest
/// snapshot, then the unbroken run of level-0 files after it (from the first level-0
/// file when there is no snapshot). A round puts its files in parallel, so a round cut
/// short (crash, step-down) can leave later files without the ones under them; the next
/// primary ships from the gap (files already there with the same bytes count as
/// shipped), and a replica's retention never counts the missing ones as archived.
pub(crate) async fn archive_top(sink: &dyn SnapshotSink, db: &str) -> Result<TxId, ArchiveError> {
    let snapshot = sink
        .list(db, SNAPSHOT_LEVEL)
        .await?
        .iter()
        .map(|o| o.key.max_txid)
        .max();
    let mut l0: Vec<(u64, u64)> = sink
        .list(db, 0)
        .await?
        .iter()
        .map(|o| (o.key.min_txid, o.key.max_txid))
        .collect();
    l0.sort_unstable();
    let mut top = match (snapshot, l0.first()) {
        (Some(t), _) => t,
        (None, Some(&(min, _))) => min.saturating_sub(1),
        (None, None) => 0,
    };
    for (min, max) in l0 {
        if max <= top {
            continue;
        }
        if min > top + 1 {
            break;
        }
        top = max;
    }
    Ok(TxId(top))
}

/// The position recorded for `txid` (from the positions object whose range holds it).
async fn recorded_position(
    sink: &dyn SnapshotSink,
    db: &str,
    txid: TxId,
) -> Result<Option<Pos>, ArchiveError> {
    if txid.0 == 0 {
        return Ok(None);
    }
    let names = sink.list_meta(db, POSITIONS_DIR).await?;
    let holding = names.iter().rev().find(|n| {
        n.strip_suffix(".json")
            .and_then(|stem| crate::ltx::parse_filename(&format!("{stem}.ltx")))
            .is_some_and(|(min, max)| min <= txid && txid <= max)
    });
    let Some(name) = holding else {
        return Ok(None);
    };
    let Some(body) = sink
        .get_meta(db, &format!("{POSITIONS_DIR}/{name}"))
        .await?
    else {
        return Ok(None);
    };
    let file: PositionsFile = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            warn!(db, object = name, error = %e, "unreadable positions object");
            return Ok(None);
        }
    };
    Ok(file
        .positions
        .iter()
        .filter_map(PositionRecord::pos)
        .find(|p| p.txid == txid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::object_store_sink::ObjectStoreSink;

    async fn put(sink: &dyn SnapshotSink, tmp: &Path, level: u8, min: u64, max: u64) {
        let f = tmp.join("obj");
        std::fs::write(&f, b"bytes").unwrap();
        let key = LtxKey {
            db: "db".into(),
            level,
            min_txid: min,
            max_txid: max,
        };
        sink.put(&key, &f).await.unwrap();
    }

    /// A round cut short can leave later files without the ones under them: the
    /// archive's position is the end of the unbroken run, not its newest file.
    #[tokio::test]
    async fn archive_top_stops_at_the_first_gap() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ObjectStoreSink::local(&dir.path().join("archive")).unwrap();
        assert_eq!(archive_top(&sink, "db").await.unwrap(), TxId(0));
        for (min, max) in [(1, 1), (2, 3), (6, 6), (7, 7)] {
            put(&sink, dir.path(), 0, min, max).await;
        }
        assert_eq!(archive_top(&sink, "db").await.unwrap(), TxId(3));
        // A snapshot covers the gap; level 0 continues after it.
        put(&sink, dir.path(), SNAPSHOT_LEVEL, 1, 5).await;
        assert_eq!(archive_top(&sink, "db").await.unwrap(), TxId(7));
        // A file past a gap does not count.
        put(&sink, dir.path(), 0, 9, 9).await;
        assert_eq!(archive_top(&sink, "db").await.unwrap(), TxId(7));
    }
}
