use std::path::PathBuf;

/// A configuration file that cannot be used: which file, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// e.g. `routes[2].path`; empty when the file as a whole is at fault.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why a gateway (or another enforcing server built on this crate) cannot
/// start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The Workload API or the broker did not answer.
    #[error("{0}")]
    Unreachable(String),
    /// A setting or piece of material that cannot be used.
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl GatewayError {
    pub(crate) fn refused(e: impl std::fmt::Display) -> Self {
        Self::Refused(e.to_string())
    }
}
