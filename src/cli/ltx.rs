//! `litefs ltx ...`: inspect, verify and apply LTX files.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::ltx::{
    ApplyCheck, CHECKSUM_FLAG, Checksum, Decoder, Encoder, HEADER_FLAG_NO_CHECKSUM, Header,
    LtxError, Pos, ResultExt, RollingChecksum, TxId, apply_file_with, database_checksum,
    database_page_size, lock_pgno, page_checksum, verify_path,
};

/// Arguments of `litefs ltx`.
#[derive(Debug, clap::Args)]
pub struct LtxArgs {
    #[command(subcommand)]
    command: LtxCommand,
}

#[derive(Debug, Subcommand)]
enum LtxCommand {
    /// Verify LTX files fully (checksums, page rules, index); exit 1 if any is bad.
    Verify {
        /// LTX files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print an LTX file's header, pages and trailer.
    Dump {
        /// LTX file.
        file: PathBuf,
    },
    /// Print the database checksum of a SQLite database file (16 hex digits).
    Checksum {
        /// Database file.
        db: PathBuf,
    },
    /// Apply LTX files in order to a database file (created if absent). Refuses a
    /// gap or a mismatch and then leaves the database untouched.
    ///
    /// An absent or empty DBFILE is at TXID 0. An existing one has no recorded
    /// TXID, so its first file must be a snapshot, or carry checksums with a
    /// pre-apply checksum equal to DBFILE's current checksum.
    Apply {
        /// Database file to update.
        #[arg(short = 'o', value_name = "DBFILE")]
        output: PathBuf,
        /// LTX files, in TXID order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write a snapshot LTX file (TXID 1) of a database file. Only the database
    /// file is read: checkpoint a WAL-mode database first.
    EncodeDb {
        /// Write no database checksums (header flag 0x2), as Litestream does; the
        /// only kind `litestream restore` accepts.
        #[arg(long)]
        no_checksum: bool,
        /// LTX file to write.
        #[arg(short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// Database file.
        db: PathBuf,
    },
}

/// Runs `litefs ltx`.
pub fn run(args: LtxArgs) -> ExitCode {
    let result = match args.command {
        LtxCommand::Verify { files } => return verify(&files),
        LtxCommand::Dump { file } => dump(&file),
        LtxCommand::Checksum { db } => checksum(&db),
        LtxCommand::Apply { output, files } => apply(&output, &files),
        LtxCommand::EncodeDb {
            no_checksum,
            output,
            db,
        } => encode_db(&db, &output, no_checksum),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn verify(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for path in files {
        match verify_path(path) {
            Ok(_) => println!("{}: ok", path.display()),
            Err(e) => {
                ok = false;
                eprintln!("{e}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn timestamp_text(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            humantime::format_rfc3339_millis(t).to_string()
        }
        Err(_) => format!("{ms} ms"),
    }
}

fn dump(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut dec = Decoder::new(BufReader::with_capacity(1 << 16, file)).in_file(path)?;
    let h = dec.header().clone();
    let mut out = std::io::stdout().lock();
    writeln!(out, "# {}", path.display())?;
    writeln!(out, "Header")?;
    writeln!(out, "  format:        {:?}", dec.format())?;
    writeln!(out, "  flags:         {:#010x}", h.flags)?;
    writeln!(out, "  page size:     {}", h.page_size)?;
    writeln!(out, "  commit:        {}", h.commit)?;
    writeln!(out, "  min TXID:      {} ({})", h.min_txid, h.min_txid.0)?;
    writeln!(out, "  max TXID:      {} ({})", h.max_txid, h.max_txid.0)?;
    writeln!(out, "  timestamp:     {}", timestamp_text(h.timestamp))?;
    writeln!(out, "  pre-apply:     {}", h.pre_apply_checksum)?;
    writeln!(out, "  WAL offset:    {}", h.wal_offset)?;
    writeln!(out, "  WAL size:      {}", h.wal_size)?;
    writeln!(
        out,
        "  WAL salt:      {:08x} {:08x}",
        h.wal_salt1, h.wal_salt2
    )?;
    writeln!(out, "  node ID:       {:016x}", h.node_id)?;
    writeln!(out)?;
    writeln!(out, "Pages")?;
    let mut page = vec![0u8; h.page_size as usize];
    let mut count = 0u64;
    while let Some(pgno) = dec.next_page(&mut page).in_file(path)? {
        count += 1;
        let frame = dec
            .last_frame()
            .map(|f| (f.offset, f.len))
            .unwrap_or_default();
        writeln!(
            out,
            "  page {pgno:>10}  offset {:>10}  stored {:>6} bytes  checksum {}",
            frame.0,
            frame.1,
            page_checksum(pgno, &page)
        )?;
    }
    writeln!(out, "  ({count} pages)")?;
    let trailer = dec.finish().in_file(path)?;
    writeln!(out)?;
    writeln!(out, "Trailer")?;
    writeln!(out, "  post-apply:    {}", trailer.post_apply_checksum)?;
    writeln!(out, "  file checksum: {}", trailer.file_checksum)?;
    Ok(())
}

fn checksum(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let sum = match database_page_size(&file).in_file(path)? {
        None => Checksum(CHECKSUM_FLAG),
        Some(ps) => {
            let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
            database_checksum(file, ps).with_context(|| format!("read {}", path.display()))?
        }
    };
    println!("{sum}");
    Ok(())
}

/// A sibling path for writing before an atomic rename.
fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn rename_durably(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::rename(from, to).with_context(|| format!("rename to {}", to.display()))?;
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}

fn apply(output: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    // Work on a copy, renamed over the database only when every file applied.
    let tmp = temp_path(output);
    let existing = output.exists();
    if existing {
        fs::copy(output, &tmp).with_context(|| format!("copy {}", output.display()))?;
    }
    let result = (|| -> anyhow::Result<Pos> {
        let db = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)
            .with_context(|| format!("open {}", tmp.display()))?;
        // An empty database is at TXID 0; an existing one at an unknown TXID,
        // so its first file must be a snapshot or match its checksum.
        let mut pos = (db.metadata()?.len() == 0).then_some(Pos {
            txid: TxId(0),
            post_apply_checksum: Checksum(CHECKSUM_FLAG),
        });
        // Each apply trusts the position the previous one returned; one full
        // checksum of the result at the end keeps the chain O(database + files).
        for path in files {
            pos = Some(apply_file_with(&db, pos, path, ApplyCheck::Incremental)?);
        }
        let pos = pos.context("no files")?;
        let last = files.last().context("no files")?;
        let ps = Decoder::new(File::open(last)?)
            .in_file(last)?
            .header()
            .page_size;
        let got = database_checksum(File::open(&tmp)?, ps)
            .with_context(|| format!("read {}", tmp.display()))?;
        if got != pos.post_apply_checksum {
            bail!(
                "database checksum after applying the chain is {got}, expected {}",
                pos.post_apply_checksum
            );
        }
        Ok(pos)
    })();
    match result {
        Ok(pos) => {
            rename_durably(&tmp, output)?;
            println!(
                "{}: applied {} files, position {pos}",
                output.display(),
                files.len()
            );
            Ok(())
        }
        Err(e) => {
            // Best effort: the temporary copy is useless now.
            let _ = fs::remove_file(&tmp);
            Err(e.context(format!("{} left unchanged", output.display())))
        }
    }
}

fn encode_db(db_path: &Path, output: &Path, no_checksum: bool) -> anyhow::Result<()> {
    let open = || File::open(db_path).with_context(|| format!("open {}", db_path.display()));
    let Some(ps) = database_page_size(open()?).in_file(db_path)? else {
        bail!("{}: empty database, nothing to encode", db_path.display());
    };
    let len = open()?.metadata()?.len();
    if len % u64::from(ps) != 0 || len / u64::from(ps) > u64::from(u32::MAX) {
        return Err(LtxError::InvalidDatabase {
            reason: "size is not a whole number of pages",
            size: len,
            page_size: ps,
        }
        .with_path(db_path)
        .into());
    }
    let commit = (len / u64::from(ps)) as u32;
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let header = Header {
        flags: if no_checksum {
            HEADER_FLAG_NO_CHECKSUM
        } else {
            0
        },
        page_size: ps,
        commit,
        min_txid: TxId(1),
        max_txid: TxId(1),
        timestamp,
        ..Header::default()
    };
    let tmp = temp_path(output);
    let result = (|| -> anyhow::Result<()> {
        let out = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        let mut enc = Encoder::new(BufWriter::with_capacity(1 << 20, out), &header)?;
        let mut reader = BufReader::with_capacity(1 << 20, open()?);
        let mut page = vec![0u8; ps as usize];
        let mut sum = RollingChecksum::new();
        let lock = lock_pgno(ps);
        for pgno in 1..=commit {
            reader
                .read_exact(&mut page)
                .with_context(|| format!("read {}", db_path.display()))?;
            if pgno != lock {
                sum.toggle(page_checksum(pgno, &page));
                enc.encode_page(pgno, &page)?;
            }
        }
        let post = if no_checksum {
            Checksum(0)
        } else {
            sum.value()
        };
        let (w, _) = enc.finish(post)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        rename_durably(&tmp, output)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
