//! [`SnapshotSink`] over the `object_store` crate: a local directory
//! (`LocalFileSystem`) or an S3 bucket (`AmazonS3`, any S3-compatible endpoint).
//!
//! Layout: `<prefix>/<db>/ltx/<level>/<min>-<max>.ltx`, so `<prefix>/<db>` is a
//! Litestream 0.5 replica of that database (`litestream restore file:///<dir>/<db>`).
//!
//! Create-if-absent: files up to [`SINGLE_PUT_MAX`] are written with one conditional
//! PUT (`PutMode::Create`: `If-None-Match: *` on S3, a no-clobber link locally), which
//! is atomic. Larger files (snapshots) are streamed as a multipart upload, which
//! object stores cannot make conditional; for those the sink checks that the object is
//! absent first, so two writers racing on the same large key within the upload's
//! duration could both succeed. LTX files with the same key hold the same TXID range;
//! a diverged old primary is stopped before that by the lease.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};
use tokio::io::AsyncReadExt;

use crate::config::BackupConfig;
use crate::sink::{LtxKey, LtxObject, LtxReader, SinkError, SnapshotSink};

use super::BuildError;

/// Largest file written with a single (conditional, atomic) PUT; larger files are
/// streamed in parts of this size (S3 needs parts of at least 5 MiB).
pub const SINGLE_PUT_MAX: u64 = 8 << 20;

/// An LTX archive in an object store.
#[derive(Debug)]
pub struct ObjectStoreSink {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    backend: &'static str,
    location: String,
}

impl ObjectStoreSink {
    /// A sink over any object store; `backend` names it in errors and logs, and with
    /// `prefix` in its [`SnapshotSink::location`] (`<backend>:<prefix>`).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, backend: &'static str) -> Self {
        let location = format!("{backend}:{prefix}");
        ObjectStoreSink {
            store,
            prefix,
            backend,
            location,
        }
    }

    /// A sink writing under the local directory `dir` (created if absent).
    ///
    /// # Errors
    /// [`BuildError::Backend`] if the directory cannot be created or used.
    pub fn local(dir: &FsPath) -> Result<Self, BuildError> {
        let fail = |e: &dyn std::fmt::Display| BuildError::Backend {
            key: "backup.path",
            message: format!("cannot use {}: {e}", dir.display()),
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| fail(&e))?;
        let abs = std::fs::canonicalize(dir).map_err(|e| fail(&e))?;
        let mut sink = ObjectStoreSink::new(Arc::new(store), Path::default(), "file");
        sink.location = format!("file://{}", abs.display());
        Ok(sink)
    }

    /// A sink writing to the S3 bucket of `cfg` under the prefix `cfg.path`.
    /// Credentials not in the config come from the usual `AWS_*` environment variables.
    ///
    /// # Errors
    /// [`BuildError::Backend`] if the client cannot be configured.
    pub fn s3(cfg: &BackupConfig) -> Result<Self, BuildError> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(cfg.bucket.clone().unwrap_or_default())
            .with_virtual_hosted_style_request(!cfg.force_path_style)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            // object_store retries failed requests itself; keep that short so an outage
            // reaches the node (which keeps the backlog and backs off) within seconds.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..RetryConfig::default()
            });
        if let Some(region) = &cfg.region {
            b = b.with_region(region);
        }
        if let Some(endpoint) = &cfg.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b.build().map_err(|e| BuildError::Backend {
            key: "backup",
            message: format!("cannot configure the S3 client: {e}"),
        })?;
        let prefix = Path::from(cfg.path.as_deref().unwrap_or("").trim_matches('/'));
        let mut sink = ObjectStoreSink::new(Arc::new(store), prefix, "s3");
        sink.location = format!(
            "s3://{}/{}",
            cfg.bucket.as_deref().unwrap_or_default(),
            sink.prefix
        );
        Ok(sink)
    }

    fn level_dir(&self, db: &str, level: u8) -> Path {
        self.prefix
            .clone()
            .join(db)
            .join("ltx")
            .join(level.to_string().as_str())
    }

    fn meta_path(&self, db: &str, name: &str) -> Path {
        name.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone().join(db).join("litefs"), |p, part| {
                p.join(part)
            })
    }

    fn object_path(&self, key: &LtxKey) -> Path {
        self.level_dir(&key.db, key.level)
            .join(key.file_name().as_str())
    }

    fn store_error(&self, operation: String, e: object_store::Error) -> SinkError {
        let retryable = matches!(
            e,
            object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
        );
        SinkError::Store {
            backend: self.backend,
            operation,
            retryable,
            source: Box::new(e),
        }
    }

    fn exists_error(&self, key: &LtxKey) -> SinkError {
        SinkError::AlreadyExists {
            backend: self.backend,
            key: key.clone(),
        }
    }

    async fn put_multipart(
        &self,
        key: &LtxKey,
        location: &Path,
        mut file: tokio::fs::File,
        local: &FsPath,
    ) -> Result<(), SinkError> {
        match self.store.head(location).await {
            Ok(_) => return Err(self.exists_error(key)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.store_error(format!("head {key}"), e)),
        }
        let mut upload = self
            .store
            .put_multipart(location)
            .await
            .map_err(|e| self.store_error(format!("put {key}"), e))?;
        let result = async {
            loop {
                let mut part = Vec::with_capacity(SINGLE_PUT_MAX as usize);
                (&mut file)
                    .take(SINGLE_PUT_MAX)
                    .read_to_end(&mut part)
                    .await
                    .map_err(|source| SinkError::Io {
                        backend: self.backend,
                        path: local.to_path_buf(),
                        source,
                    })?;
                if part.is_empty() {
                    break;
                }
                upload
                    .put_part(PutPayload::from(part))
                    .await
                    .map_err(|e| self.store_error(format!("put {key}"), e))?;
            }
            upload
                .complete()
                .await
                .map_err(|e| self.store_error(format!("put {key}"), e))
        }
        .await;
        if result.is_err() {
            // Best effort: an abandoned upload is invisible to readers either way.
            let _ = upload.abort().await;
        }
        result.map(|_| ())
    }
}

#[async_trait]
impl SnapshotSink for ObjectStoreSink {
    fn type_name(&self) -> &'static str {
        self.backend
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    async fn put(&self, key: &LtxKey, path: &FsPath) -> Result<LtxObject, SinkError> {
        let io_err = |source| SinkError::Io {
            backend: self.backend,
            path: path.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io_err)?;
        let size = file.metadata().await.map_err(io_err)?.len();
        let location = self.object_path(key);
        if size <= SINGLE_PUT_MAX {
            let mut data = Vec::with_capacity(size as usize);
            file.read_to_end(&mut data).await.map_err(io_err)?;
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match self.store.put_opts(&location, data.into(), opts).await {
                Ok(_) => {}
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return Err(self.exists_error(key));
                }
                Err(e) => return Err(self.store_error(format!("put {key}"), e)),
            }
        } else {
            self.put_multipart(key, &location, file, path).await?;
        }
        Ok(LtxObject {
            key: key.clone(),
            size,
            last_modified: SystemTime::now(),
        })
    }

    async fn list(&self, db: &str, level: u8) -> Result<Vec<LtxObject>, SinkError> {
        let dir = self.level_dir(db, level);
        let metas: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.store_error(format!("list {dir}"), e))?;
        let mut out: Vec<LtxObject> = metas
            .into_iter()
            .filter(|m| {
                m.location.prefix_match(&dir).is_some_and(|mut rest| {
                    // Only files directly in the level directory.
                    rest.next().is_some() && rest.next().is_none()
                })
            })
            .filter_map(|m| {
                let (min_txid, max_txid) = parse_file_name(m.location.filename()?)?;
                Some(LtxObject {
                    key: LtxKey {
                        db: db.to_string(),
                        level,
                        min_txid,
                        max_txid,
                    },
                    size: m.size,
                    last_modified: m.last_modified.into(),
                })
            })
            .collect();
        out.sort_by_key(|o| (o.key.min_txid, o.key.max_txid));
        Ok(out)
    }

    async fn databases(&self) -> Result<Vec<String>, SinkError> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listing = self
            .store
            .list_with_delimiter(prefix)
            .await
            .map_err(|e| self.store_error(format!("list {}", self.prefix), e))?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn open(&self, key: &LtxKey) -> Result<LtxReader, SinkError> {
        let location = self.object_path(key);
        let result = match self.store.get(&location).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(SinkError::NotFound {
                    backend: self.backend,
                    key: key.clone(),
                });
            }
            Err(e) => return Err(self.store_error(format!("get {key}"), e)),
        };
        let stream = result
            .into_stream()
            .map(|r| r.map_err(std::io::Error::other));
        Ok(Box::pin(tokio_util::io::StreamReader::new(stream)))
    }

    async fn delete(&self, key: &LtxKey) -> Result<(), SinkError> {
        match self.store.delete(&self.object_path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_error(format!("delete {key}"), e)),
        }
    }

    async fn delete_meta(&self, db: &str, name: &str) -> Result<(), SinkError> {
        let location = self.meta_path(db, name);
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_error(format!("delete {location}"), e)),
        }
    }

    async fn put_meta(&self, db: &str, name: &str, data: Vec<u8>) -> Result<bool, SinkError> {
        let location = self.meta_path(db, name);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.store.put_opts(&location, data.into(), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.store_error(format!("put {location}"), e)),
        }
    }

    async fn list_meta(&self, db: &str, dir: &str) -> Result<Vec<String>, SinkError> {
        let dir = self.meta_path(db, dir);
        let listing = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|e| self.store_error(format!("list {dir}"), e))?;
        let mut names: Vec<String> = listing
            .objects
            .iter()
            .filter_map(|m| m.location.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn get_meta(&self, db: &str, name: &str) -> Result<Option<Vec<u8>>, SinkError> {
        let location = self.meta_path(db, name);
        match self.store.get(&location).await {
            Ok(r) => r
                .bytes()
                .await
                .map(|b| Some(b.to_vec()))
                .map_err(|e| self.store_error(format!("get {location}"), e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_error(format!("get {location}"), e)),
        }
    }
}

/// `%016x-%016x.ltx` -> (min, max).
fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".ltx")?;
    let (min, max) = stem.split_once('-')?;
    if min.len() != 16 || max.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(min, 16).ok()?,
        u64::from_str_radix(max, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::SNAPSHOT_LEVEL;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    fn key(db: &str, level: u8, min: u64, max: u64) -> LtxKey {
        LtxKey {
            db: db.into(),
            level,
            min_txid: min,
            max_txid: max,
        }
    }

    fn local_file(dir: &FsPath, name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    async fn read_all(sink: &dyn SnapshotSink, k: &LtxKey) -> Vec<u8> {
        let mut r = sink.open(k).await.unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    /// Behaviours every sink has; run against each store.
    async fn conformance(sink: &dyn SnapshotSink, big: bool) {
        let tmp = tempfile::tempdir().unwrap();
        let a = local_file(tmp.path(), "a", b"first file");
        let b = local_file(tmp.path(), "b", b"second");
        let k1 = key("app.db", 0, 1, 1);
        let k2 = key("app.db", 0, 2, 3);

        // Put, read back, list in TXID order.
        assert_eq!(sink.put(&k2, &b).await.unwrap().size, 6);
        assert_eq!(sink.put(&k1, &a).await.unwrap().size, 10);
        assert_eq!(read_all(sink, &k1).await, b"first file");
        let listed = sink.list("app.db", 0).await.unwrap();
        assert_eq!(
            listed.iter().map(|o| o.key.clone()).collect::<Vec<_>>(),
            [k1.clone(), k2.clone()]
        );
        assert_eq!(listed[1].size, 6);
        assert!(sink.list("app.db", 1).await.unwrap().is_empty());
        assert!(sink.list("other.db", 0).await.unwrap().is_empty());

        // Create-if-absent: the stored bytes stay.
        let err = sink.put(&k1, &b).await.unwrap_err();
        assert!(matches!(err, SinkError::AlreadyExists { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert_eq!(read_all(sink, &k1).await, b"first file");

        // Databases and levels are separate.
        let snap = key("b.db", SNAPSHOT_LEVEL, 1, 9);
        sink.put(&snap, &a).await.unwrap();
        assert_eq!(sink.databases().await.unwrap(), ["app.db", "b.db"]);
        assert_eq!(sink.list("b.db", SNAPSHOT_LEVEL).await.unwrap().len(), 1);

        // Missing files; delete is idempotent.
        let missing = key("app.db", 0, 4, 4);
        assert!(matches!(
            sink.open(&missing).await,
            Err(SinkError::NotFound { .. })
        ));
        sink.delete(&k1).await.unwrap();
        sink.delete(&k1).await.unwrap();
        assert_eq!(sink.list("app.db", 0).await.unwrap().len(), 1);
        assert!(matches!(
            sink.open(&k1).await,
            Err(SinkError::NotFound { .. })
        ));

        // A local file that cannot be read is an Io error naming it.
        let err = sink
            .put(&missing, &tmp.path().join("nope"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SinkError::Io { path, .. } if path.ends_with("nope")),
            "{err:?}"
        );

        // Our own objects live beside ltx/, create-if-absent, listed by directory.
        assert!(
            sink.put_meta("app.db", "positions/b.json", b"1".to_vec())
                .await
                .unwrap()
        );
        assert!(
            sink.put_meta("app.db", "positions/a.json", b"2".to_vec())
                .await
                .unwrap()
        );
        assert!(
            !sink
                .put_meta("app.db", "positions/a.json", b"3".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(
            sink.get_meta("app.db", "positions/a.json").await.unwrap(),
            Some(b"2".to_vec())
        );
        assert_eq!(
            sink.get_meta("app.db", "positions/c.json").await.unwrap(),
            None
        );
        assert_eq!(
            sink.list_meta("app.db", "positions").await.unwrap(),
            ["a.json", "b.json"]
        );
        assert!(
            sink.list_meta("b.db", "positions")
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            sink.list("app.db", 0).await.unwrap().len(),
            1,
            "not in ltx/"
        );

        if big {
            // Larger than one PUT: streamed in parts, read back byte for byte.
            let data: Vec<u8> = (0..SINGLE_PUT_MAX as usize + 3_000_000)
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            let big = local_file(tmp.path(), "big", &data);
            let k = key("app.db", SNAPSHOT_LEVEL, 1, 3);
            assert_eq!(sink.put(&k, &big).await.unwrap().size, data.len() as u64);
            assert!(read_all(sink, &k).await == data);
            let err = sink.put(&k, &big).await.unwrap_err();
            assert!(matches!(err, SinkError::AlreadyExists { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn local_directory_sink() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ObjectStoreSink::local(&dir.path().join("archive")).unwrap();
        conformance(&sink, true).await;
        // The Litestream layout on disk.
        assert!(
            dir.path()
                .join("archive/app.db/ltx/0/0000000000000002-0000000000000003.ltx")
                .is_file()
        );
        // The location names the directory however it was reached.
        let again = ObjectStoreSink::local(&dir.path().join("archive/../archive")).unwrap();
        assert_eq!(sink.location(), again.location());
        let abs = std::fs::canonicalize(dir.path().join("archive")).unwrap();
        assert_eq!(sink.location(), format!("file://{}", abs.display()));
    }

    #[test]
    fn file_names() {
        assert_eq!(
            parse_file_name("0000000000000001-00000000000000ff.ltx"),
            Some((1, 255))
        );
        assert_eq!(parse_file_name("1-2.ltx"), None);
        assert_eq!(
            parse_file_name("0000000000000001-00000000000000ff.ltx.tmp"),
            None
        );
    }

    struct Moto(Child);

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Starts `moto_server` (installed by the README's test set-up: `pip install
    /// 'moto[server]'`) on a free port and creates `bucket`.
    fn start_moto(bucket: &str) -> (Moto, String) {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server must be on PATH: pip install 'moto[server]'");
        let moto = Moto(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let req = format!(
                    "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                s.write_all(req.as_bytes()).unwrap();
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                assert!(resp.starts_with("HTTP/1.1 200"), "create bucket: {resp}");
                return (moto, format!("http://127.0.0.1:{port}"));
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[tokio::test]
    async fn s3_sink_against_moto() {
        let (_moto, endpoint) = start_moto("archive");
        let cfg = BackupConfig {
            kind: Some(crate::config::BackupType::S3),
            bucket: Some("archive".into()),
            path: Some("/cluster-1/".into()),
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            force_path_style: true,
            ..BackupConfig::default()
        };
        let sink = ObjectStoreSink::s3(&cfg).unwrap();
        assert_eq!(sink.type_name(), "s3");
        assert_eq!(sink.location(), "s3://archive/cluster-1");
        conformance(&sink, true).await;
        // Everything lives under the prefix.
        let all: Vec<_> = sink.store.list(None).try_collect().await.unwrap();
        assert!(!all.is_empty());
        assert!(
            all.iter()
                .all(|m| m.location.as_ref().starts_with("cluster-1/")),
            "{all:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_s3_is_a_retryable_store_error() {
        let cfg = BackupConfig {
            kind: Some(crate::config::BackupType::S3),
            bucket: Some("b".into()),
            endpoint: Some(format!("http://127.0.0.1:{}", free_port())),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            force_path_style: true,
            region: Some("us-east-1".into()),
            ..BackupConfig::default()
        };
        let sink = ObjectStoreSink::s3(&cfg).unwrap();
        let err = sink.list("app.db", 0).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
    }
}
