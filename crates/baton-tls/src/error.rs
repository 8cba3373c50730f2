use baton_core::{SpiffeId, SpiffeIdError, TrustDomain};

/// Why a peer's X509-SVID was refused.
///
/// One variant per rule, so a log line says which rule failed. Deliberately
/// not `#[non_exhaustive]`: a new refusal reason should break callers that
/// match on these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("peer certificate is not a valid X.509 certificate: {0}")]
    Malformed(String),
    #[error("peer certificate has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("peer certificate has {count} URI SANs; an X509-SVID must have exactly one")]
    MultipleUriSans { count: usize },
    #[error("peer certificate URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    InvalidSpiffeId {
        uri: String,
        #[source]
        source: SpiffeIdError,
    },
    #[error(
        "peer certificate carries the trust domain's own ID {id}; a workload SVID needs a path"
    )]
    TrustDomainIdAsLeaf { id: SpiffeId },
    #[error("peer certificate for {id} is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa { id: SpiffeId },
    #[error("peer certificate for {id} has no KeyUsage extension")]
    MissingKeyUsage { id: SpiffeId },
    #[error("peer certificate for {id} lacks the digitalSignature key usage")]
    NoDigitalSignature { id: SpiffeId },
    #[error("peer certificate for {id} may sign certificates (keyCertSign key usage)")]
    KeyCertSign { id: SpiffeId },
    #[error("peer certificate for {id} may sign CRLs (cRLSign key usage)")]
    CrlSign { id: SpiffeId },
    #[error(
        "peer certificate is from trust domain {td}, which we do not trust (no trust bundle for it)"
    )]
    UntrustedTrustDomain { td: TrustDomain },
    #[error("peer certificate for {id} has expired")]
    Expired { id: SpiffeId },
    #[error("peer certificate for {id} is not valid yet")]
    NotYetValid { id: SpiffeId },
    #[error("peer certificate for {id} does not chain to the {td} trust bundle: {reason}")]
    BadChain {
        id: SpiffeId,
        td: TrustDomain,
        reason: String,
    },
    #[error("peer {id} is not allowed to connect here")]
    NotAllowed { id: SpiffeId },
}

/// Errors from binding a Unix socket at a path ([`crate::bind_unix_socket`]).
#[derive(Debug, thiserror::Error)]
pub enum SocketFileError {
    #[error(
        "{}: another process is serving a socket at this path (a second daemon given the same path?); it is not replaced: stop that process or choose another path",
        path.display()
    )]
    InUse { path: std::path::PathBuf },
    #[error(
        "{}: the path holds something that is not a socket (a file, a directory, a symbolic link); refusing to replace it",
        path.display()
    )]
    NotASocket { path: std::path::PathBuf },
    #[error(
        "{}: {why}; it serialises the daemons that bind this socket, so only this process's user may hold it",
        path.display()
    )]
    LockFile {
        path: std::path::PathBuf,
        why: String,
    },
    #[error(
        "{}: still locked after {waited_secs} s by another process starting on the same socket path",
        path.display()
    )]
    LockBusy {
        path: std::path::PathBuf,
        waited_secs: u64,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Errors from building TLS material or running a listener.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("invalid private key or certificate: {0}")]
    Key(#[source] rustls::Error),
    #[error("cannot build TLS config: {0}")]
    Config(#[source] rustls::Error),
    #[error("invalid trust anchor for {td}: {reason}")]
    BadTrustAnchor { td: TrustDomain, reason: String },
    #[error("listener I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("listener limit {field}: {reason}")]
    InvalidLimit { field: &'static str, reason: String },
}
