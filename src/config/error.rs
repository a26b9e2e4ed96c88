//! Errors of loading a config file.

use std::fmt;
use std::path::PathBuf;

/// Where in a config file something is: the file's name and, when known, the line and
/// column (1-based). Displays as `litefs.yml:12:3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file as the user named it, or `<embedded default>`.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        Ok(())
    }
}

/// Why a configuration could not be loaded. Every variant names the file; those about
/// the contents also name the key and, when it is written in the file, its line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path that was tried.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key that the schema does not know (usually a typo).
    #[error("{at}: unknown key '{key}' (expected one of: {})", .expected.join(", "))]
    UnknownKey {
        /// Where the key is written.
        at: Location,
        /// Full dotted path of the unknown key, e.g. `fuse.dri`.
        key: String,
        /// The keys allowed at that place.
        expected: Vec<String>,
    },
    /// The file is not valid YAML, or a value has the wrong type or form.
    #[error("{at}: {}{message}", key_prefix(.key))]
    Syntax {
        /// Where the problem is.
        at: Location,
        /// Dotted path of the key whose value is wrong, when known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The file parses but describes something that cannot work.
    #[error("{at}: {key}: {message}")]
    Invalid {
        /// Where the key (or its nearest written parent) is.
        at: Location,
        /// Dotted path of the key, e.g. `lease.consul.url`.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

impl ConfigError {
    /// The dotted key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Syntax { key, .. } => key.as_deref(),
            ConfigError::Read { .. } => None,
        }
    }

    /// The location in the file, for errors about its contents.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::UnknownKey { at, .. }
            | ConfigError::Syntax { at, .. }
            | ConfigError::Invalid { at, .. } => Some(at),
            ConfigError::Read { .. } => None,
        }
    }
}

/// A semantic problem found by [`crate::config::Config::validate`], before it is tied
/// to a place in a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ValidationError {
    /// Dotted path of the offending key.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl ValidationError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            key: key.into(),
            message: message.into(),
        }
    }
}
