//! Why a policy directory cannot be loaded, with `file:line:column` for
//! every error Cedar can place in a source.

use std::fmt;
use std::path::PathBuf;

use miette::Diagnostic;

/// A position in a source file, both 1-based; the column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The line and column of byte `offset` in `src` (clamped to its end,
    /// and to the previous character boundary).
    pub fn from_offset(src: &str, offset: usize) -> Self {
        let mut end = offset.min(src.len());
        while !src.is_char_boundary(end) {
            end -= 1;
        }
        let before = &src[..end];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

/// One error in one source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    /// The file as the caller named it (the path under `load_dir`).
    pub file: String,
    /// Where in the file, when Cedar reports a position.
    pub location: Option<Location>,
    /// Cedar's message, with its help text when it has one.
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(Location { line, column }) => {
                write!(f, "{}:{line}:{column}: {}", self.file, self.message)
            }
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Why an [`Engine`](crate::Engine) could not be built. The broker refuses
/// to start on any of these.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The schema does not parse or is inconsistent (never empty).
    #[error("{}", lines(.0))]
    Schema(Vec<SourceError>),
    /// A policy file does not parse (never empty).
    #[error("{}", lines(.0))]
    Parse(Vec<SourceError>),
    /// A policy does not validate against the schema in strict mode (never empty).
    #[error("{}", lines(.0))]
    Validation(Vec<SourceError>),
    /// The schema parses but does not describe the requests Baton sends.
    #[error("{file}: {message}")]
    Model { file: String, message: String },
    #[error("policy id `{id}` is used twice: in {first} and in {second}")]
    DuplicateId {
        id: String,
        first: String,
        second: String,
    },
    #[error("{file}: `{id}` is a policy template; only static policies are supported")]
    Template { file: String, id: String },
    #[error("no policies in {what}: every request would be denied")]
    NoPolicies { what: String },
    /// Anyone could add or change a policy: the directory, the schema or
    /// a policy file is writable by every user.
    #[error(
        "{} is writable by every user (mode {mode:o}), so anyone could add or change a policy; run `chmod o-w` on it",
        path.display()
    )]
    WritableByAll { path: PathBuf, mode: u32 },
}

fn lines(errors: &[SourceError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Turns a Cedar diagnostic (and the ones related to it) into source errors
/// for `file`, whose text is `src`.
pub(crate) fn source_errors(diag: &dyn Diagnostic, file: &str, src: &str) -> Vec<SourceError> {
    let mut out = vec![one(diag, file, src)];
    if let Some(related) = diag.related() {
        out.extend(related.map(|d| one(d, file, src)));
    }
    out
}

fn one(diag: &dyn Diagnostic, file: &str, src: &str) -> SourceError {
    let location = diag.labels().and_then(|mut labels| {
        labels
            .next()
            .map(|label| Location::from_offset(src, label.offset()))
    });
    let mut message = diag.to_string();
    if let Some(help) = diag.help() {
        message.push_str("; ");
        message.push_str(&help.to_string());
    }
    SourceError {
        file: file.to_owned(),
        location,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let src = "ab\ncdé\nf";
        assert_eq!(
            Location::from_offset(src, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::from_offset(src, 3),
            Location { line: 2, column: 1 }
        );
        // 'é' is two bytes: the offset after it is column 4.
        assert_eq!(
            Location::from_offset(src, 7),
            Location { line: 2, column: 4 }
        );
        // Inside 'é': back to its start.
        assert_eq!(
            Location::from_offset(src, 6),
            Location { line: 2, column: 3 }
        );
        assert_eq!(
            Location::from_offset(src, 999),
            Location { line: 3, column: 2 }
        );
    }
}
