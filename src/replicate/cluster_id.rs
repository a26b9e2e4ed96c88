//! The cluster id (`LFSC` + 16 hex digits), kept in `<data.dir>/clusterid`.

use std::fs;
use std::io;
use std::path::Path;

const FILE: &str = "clusterid";

/// Reads the cluster id of the node with data directory `data_dir`; `None` if it has
/// not joined a cluster yet.
///
/// # Errors
/// I/O errors other than a missing file, or a file that does not hold a valid id.
pub fn read(data_dir: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(data_dir.join(FILE)) {
        Ok(s) => {
            let id = s.trim().to_string();
            if is_valid(&id) {
                Ok(Some(id))
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a cluster id: {id:?}",
                        data_dir.join(FILE).display()
                    ),
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the cluster id (durably).
///
/// # Errors
/// I/O errors.
pub fn write(data_dir: &Path, id: &str) -> io::Result<()> {
    fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    fs::write(&tmp, format!("{id}\n"))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, data_dir.join(FILE))?;
    fs::File::open(data_dir)?.sync_all()
}

/// The node's cluster id, creating a new one if it has none (a primary founding a
/// cluster).
///
/// # Errors
/// I/O errors.
pub fn read_or_create(data_dir: &Path) -> io::Result<String> {
    if let Some(id) = read(data_dir)? {
        return Ok(id);
    }
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut b))?;
    let id = format!("LFSC{}", hex::encode_upper(b));
    write(data_dir, &id)?;
    Ok(id)
}

/// Whether `id` has the form `LFSC` + 16 hex digits.
pub fn is_valid(id: &str) -> bool {
    id.len() == 20 && id.starts_with("LFSC") && id[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_read_back() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None);
        let id = read_or_create(d.path()).unwrap();
        assert!(is_valid(&id), "{id}");
        assert_eq!(read_or_create(d.path()).unwrap(), id);
        fs::write(d.path().join(FILE), "junk").unwrap();
        assert!(read(d.path()).is_err());
    }
}
