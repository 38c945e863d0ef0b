//! cellgate configuration.
//!
//! One TOML file describes an edge node: where it stands, its listeners, the
//! cells behind it, the services they serve and how each service is steered.
//! [`load`] reads and validates it and returns a [`Config`] made of validated
//! domain types ("parse, don't validate"), or an [`Error`] that names the
//! file, the key path (`services[1].cells[2]`) and what was expected, for
//! every problem found.
//!
//! This crate does no I/O beyond [`load`] reading the config file itself:
//! [`parse`] never touches the file system. Files the config names (TLS
//! certificates, the geo database, secrets, the state file) are opened and
//! checked by the components that use them, which report [`Problem`]s with
//! the same key paths. It must never depend on the other cellgate crates.

#![forbid(unsafe_code)]

pub mod file;
mod load;
mod model;
pub mod raw;

use std::{fmt, path::PathBuf};

pub use load::{load, parse};
pub use model::*;

/// One thing wrong with a config: where, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `services[1].cells[2]`; empty for the whole file.
    pub key: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    /// A problem at `key` (a key path such as `listeners.https.cert`).
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema, or its values
    /// are invalid. Every problem found is listed.
    #[error("{}", ProblemList { file, problems })]
    Invalid { file: PathBuf, problems: Vec<Problem> },
}

impl Error {
    /// The problems, one per line, each prefixed with the file name.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

struct ProblemList<'a> {
    file: &'a PathBuf,
    problems: &'a [Problem],
}

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {p}", self.file.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
