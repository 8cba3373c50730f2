//! Operator verbs: talk to the broker's admin API over its Unix socket.

use std::path::{Path, PathBuf};

use anyhow::Result;
use baton_core::api::{ApiError, EntryList, JoinTokenRequest, JoinTokenResponse};
use baton_core::{Entry, NewEntry};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cli::{
    BundleCmd, BundleFormat, EXIT_REFUSED, EXIT_UNREACHABLE, EntryCmd, OutputFormat, TokenCmd, exit,
};
use crate::output;

/// A client for the admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    socket: PathBuf,
}

/// Refuses a socket another user could have put in the broker's place:
/// the socket or its directory reached through a symbolic link, or a
/// directory every user can write. What the CLI sends there (ID tokens,
/// revocations, the trust bundle it is shown) must reach the broker.
pub(crate) fn trusted_socket_path(socket: &Path, flag: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let refuse = |why: String| {
        Err(exit(
            EXIT_REFUSED,
            format!("{flag} {}: {why}", socket.display()),
        ))
    };
    let dir = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(m) = std::fs::symlink_metadata(socket)
        && m.file_type().is_symlink()
    {
        return refuse("is a symbolic link; name the socket itself".into());
    }
    // Every directory on the way that sits in a directory every user can
    // write (`/tmp`) must be this user's or root's: another user could
    // have made it (`/tmp/x/.baton-dev`, mode 0755, reached by the
    // default relative path from a shell in /tmp/x) and served a socket
    // in it.
    if let Ok(abs) = std::fs::canonicalize(dir) {
        use std::os::unix::fs::MetadataExt as _;
        let me = std::fs::metadata("/proc/self").map(|p| p.uid()).ok();
        let chain: Vec<&Path> = abs.ancestors().collect();
        for pair in chain.windows(2) {
            let [inner, outer] = pair else { continue };
            let (Ok(o), Ok(i)) = (std::fs::metadata(outer), std::fs::metadata(inner)) else {
                continue;
            };
            let open = o.permissions().mode() & 0o002 != 0;
            let trusted = Some(i.uid()) == me || i.uid() == 0;
            if open && !trusted {
                return refuse(format!(
                    "the directory {} is owned by uid {}, neither you nor root, and sits in {}, which every user can write, so anyone could have made it",
                    inner.display(),
                    i.uid(),
                    outer.display()
                ));
            }
        }
    }
    if let Ok(m) = std::fs::symlink_metadata(dir) {
        if m.file_type().is_symlink() {
            return refuse(format!(
                "its directory {} is a symbolic link; name the socket's real path",
                dir.display()
            ));
        }
        let mode = m.permissions().mode();
        // In a directory every user can write (a Kubernetes emptyDir is
        // 0777), only a socket of this user or root is the broker's: anyone
        // else's could be a planted one.
        if mode & 0o002 != 0 {
            use std::os::unix::fs::MetadataExt as _;
            let me = std::fs::metadata("/proc/self").map(|p| p.uid()).ok();
            let owner = std::fs::symlink_metadata(socket).map(|s| s.uid()).ok();
            let trusted = matches!((owner, me), (Some(o), Some(me)) if o == me || o == 0);
            if !trusted && owner.is_some() {
                return refuse(format!(
                    "its directory {} is writable by every user (mode {:o}) and the socket is owned by uid {}, neither you nor root, so anyone could have put it there",
                    dir.display(),
                    mode & 0o7777,
                    owner.unwrap_or_default()
                ));
            }
        }
    }
    Ok(())
}

impl AdminClient {
    pub fn new(socket: &Path) -> Result<Self> {
        trusted_socket_path(socket, "--admin-socket")?;
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .build()
            .map_err(|e| {
                exit(
                    EXIT_UNREACHABLE,
                    format!("cannot build the admin client: {e}"),
                )
            })?;
        Ok(Self {
            http,
            socket: socket.to_owned(),
        })
    }

    fn url(path: &str) -> String {
        // The host is ignored on a Unix socket.
        format!("http://baton-admin{path}")
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let req = match crate::telemetry::outgoing_traceparent() {
            Some(tp) => req.header(baton_core::trace_context::TRACEPARENT_HEADER, tp),
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| unreachable_admin(&self.socket, &e))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| exit(EXIT_UNREACHABLE, format!("broker answer cut short: {e}")))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| exit(EXIT_REFUSED, format!("unexpected broker answer: {e}")));
        }
        let message = match serde_json::from_slice::<ApiError>(&body) {
            Ok(err) => match err.field {
                Some(field) => format!("{} (field `{field}`)", err.message),
                None => err.message,
            },
            Err(_) => format!("broker answered {status}"),
        };
        // 503: a store the broker needs is down and nothing was done; the
        // command may be run again (at this broker later, or at another),
        // as when the broker cannot be reached. Anything else is a refusal.
        let code = if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            EXIT_UNREACHABLE
        } else {
            EXIT_REFUSED
        };
        Err(exit(code, message))
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.http.post(Self::url(path)).json(body)).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(Self::url(path))).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.delete(Self::url(path))).await
    }

    pub async fn join_token(&self, req: &JoinTokenRequest) -> Result<JoinTokenResponse> {
        self.post("/v1/admin/join-tokens", req).await
    }

    pub async fn create_entry(&self, new: &NewEntry) -> Result<Entry> {
        self.post("/v1/admin/entries", new).await
    }
}

/// Why the admin socket did not answer, told apart: not there (exit 3),
/// there but not ours to open (exit 2, with its owner and mode), or there
/// with nobody listening (a broker that stopped; exit 3).
fn unreachable_admin(socket: &Path, e: &reqwest::Error) -> anyhow::Error {
    use std::os::unix::fs::MetadataExt;
    let mut io_kind = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
            break;
        }
        cause = c.source();
    }
    let shown = socket.display();
    let hint = "Set --admin-socket or BATON_ADMIN_SOCKET to the broker's socket.";
    match io_kind {
        Some(std::io::ErrorKind::PermissionDenied) => {
            let me = std::fs::metadata("/proc/self")
                .map_or_else(|_| "?".into(), |m| m.uid().to_string());
            let owner = match std::fs::metadata(socket) {
                Ok(m) => format!(
                    "it is owned by uid {} with mode {:o}",
                    m.uid(),
                    m.mode() & 0o777
                ),
                Err(_) => "its directory is not accessible to you".into(),
            };
            exit(
                EXIT_REFUSED,
                format!(
                    "permission denied on the admin socket {shown} ({owner}; you are uid {me}): run as the broker's user or root, or have the broker started with --admin-uid {me}"
                ),
            )
        }
        Some(std::io::ErrorKind::NotFound) => exit(
            EXIT_UNREACHABLE,
            format!(
                "no admin socket at {shown}: is the broker running (`baton dev` or `baton broker`)? {hint}"
            ),
        ),
        Some(std::io::ErrorKind::ConnectionRefused) => exit(
            EXIT_UNREACHABLE,
            format!(
                "nothing listens on the admin socket {shown} (a broker that stopped left it behind?): start the broker. {hint}"
            ),
        ),
        _ => exit(
            EXIT_UNREACHABLE,
            format!(
                "cannot reach the broker's admin socket {shown}: {}. Is the broker running (`baton dev` or `baton broker`)? {hint}",
                crate::example::error_chain(e)
            ),
        ),
    }
}

pub async fn token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Generate {
            ttl,
            node_id,
            admin,
        } => {
            let client = AdminClient::new(&admin.admin_socket)?;
            let resp = client
                .join_token(&JoinTokenRequest {
                    ttl_secs: ttl.as_secs().max(1),
                    node_id,
                })
                .await?;
            match admin.output {
                OutputFormat::Json => output::json(&serde_json::json!({
                    "token": resp.token.expose(),
                    "expires_at": resp.expires_at,
                    "node_id": resp.node_id,
                })),
                OutputFormat::Table => {
                    output::line(&format!("token:      {}", resp.token.expose()));
                    output::line(&format!("node id:    {}", resp.node_id));
                    output::line(&format!("expires at: {}", output::when(resp.expires_at)));
                }
            }
            Ok(())
        }
    }
}

fn check_local(new: &NewEntry) -> Result<()> {
    // Validate before sending so the operator hears about a bad flag even
    // when the broker is down; the broker validates again.
    new.validate()
        .map(|_| ())
        .map_err(|e| exit(EXIT_REFUSED, format!("invalid entry: {e}")))
}

fn print_entries(format: OutputFormat, entries: &[Entry]) {
    match format {
        OutputFormat::Json => output::json(&EntryList {
            entries: entries.to_vec(),
        }),
        OutputFormat::Table => output::entry_table(entries),
    }
}

pub async fn entry(cmd: EntryCmd) -> Result<()> {
    match cmd {
        EntryCmd::Create {
            spiffe_id,
            parent_id,
            selectors,
            x509_ttl,
            jwt_ttl,
            dns_names,
            admin,
        } => {
            let new = NewEntry {
                spiffe_id,
                parent_id,
                selectors,
                x509_ttl_secs: x509_ttl.as_secs(),
                jwt_ttl_secs: jwt_ttl.as_secs(),
                dns_names,
            };
            check_local(&new)?;
            let entry = AdminClient::new(&admin.admin_socket)?
                .create_entry(&new)
                .await?;
            print_entries(admin.output, &[entry]);
            Ok(())
        }
        EntryCmd::Show { id, admin } => {
            let entry: Entry = AdminClient::new(&admin.admin_socket)?
                .get(&format!("/v1/admin/entries/{}", path_segment(&id)?))
                .await?;
            print_entries(admin.output, &[entry]);
            Ok(())
        }
        EntryCmd::List { admin } => {
            let list: EntryList = AdminClient::new(&admin.admin_socket)?
                .get("/v1/admin/entries")
                .await?;
            print_entries(admin.output, &list.entries);
            Ok(())
        }
        EntryCmd::Delete { id, admin } => {
            let _: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .delete(&format!("/v1/admin/entries/{}", path_segment(&id)?))
                .await?;
            match admin.output {
                OutputFormat::Json => output::json(&serde_json::json!({ "deleted": id })),
                OutputFormat::Table => output::line(&format!("deleted entry {id}")),
            }
            Ok(())
        }
    }
}

/// Entry ids are UUIDs; anything else is refused before it reaches a URL.
fn path_segment(id: &str) -> Result<String> {
    baton_core::EntryId::parse(id)
        .map(|id| id.to_string())
        .map_err(|e| exit(EXIT_REFUSED, e.to_string()))
}

pub async fn bundle(cmd: BundleCmd) -> Result<()> {
    match cmd {
        BundleCmd::Show { format, admin } => {
            let answer: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .get("/v1/admin/bundle")
                .await?;
            match (admin.output, format) {
                (OutputFormat::Json, _) => output::json(&serde_json::json!({
                    "pem": answer["pem"],
                    "spiffe": answer["spiffe"],
                })),
                (OutputFormat::Table, BundleFormat::Spiffe) => output::json(&answer["spiffe"]),
                (OutputFormat::Table, BundleFormat::Pem) => {
                    output::raw(answer["pem"].as_str().unwrap_or_default());
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::cli::Exit;

    /// A socket another user could have planted where the CLI looks (a
    /// directory every user can write, a symbolic link to it or to its
    /// directory, as a checked-out `.baton-dev` link would be) is refused
    /// before anything is sent. The control: the same socket in a private
    /// directory, named by its real path.
    #[tokio::test]
    async fn a_socket_someone_else_could_have_planted_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        baton_tls::install_crypto_provider();
        let base = tempfile::tempdir().unwrap();
        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let planted = shared.join("admin.sock");
        let _listener = tokio::net::UnixListener::bind(&planted).unwrap();
        // Another user's socket there is refused; this user's (or root's,
        // a Kubernetes emptyDir) is the broker's.
        // (Giving the socket away needs root; as another user the planted
        // socket is this user's own, which is accepted.)
        let root =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
        if root {
            std::os::unix::fs::lchown(&planted, Some(65534), None).unwrap();
            let e = format!("{:#}", AdminClient::new(&planted).unwrap_err());
            assert!(e.contains("writable by every user"), "{e}");
            std::os::unix::fs::lchown(&planted, Some(0), None).unwrap();
        }
        AdminClient::new(&planted).unwrap();

        let private = base.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let real = private.join("admin.sock");
        let _real = tokio::net::UnixListener::bind(&real).unwrap();
        let link = private.join("link.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = format!("{:#}", AdminClient::new(&link).unwrap_err());
        assert!(e.contains("symbolic link"), "{e}");
        let dir_link = base.path().join(".baton-dev");
        std::os::unix::fs::symlink(&private, &dir_link).unwrap();
        let e = format!(
            "{:#}",
            AdminClient::new(&dir_link.join("admin.sock")).unwrap_err()
        );
        assert!(e.contains("symbolic link"), "{e}");

        AdminClient::new(&real).unwrap();

        // Another user's directory made in a directory every user can
        // write, its own mode 0755, with a socket of that user: what the
        // default relative path finds from a shell in it. Refused.
        if root {
            let theirs = shared.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
            let dev = theirs.join(".baton-dev");
            std::fs::create_dir(&dev).unwrap();
            let sock = dev.join("admin.sock");
            let _theirs = tokio::net::UnixListener::bind(&sock).unwrap();
            for p in [&theirs, &dev, &sock] {
                std::os::unix::fs::lchown(p, Some(65534), Some(65534)).unwrap();
            }
            let e = format!("{:#}", AdminClient::new(&sock).unwrap_err());
            assert!(e.contains("anyone could have made it"), "{e}");
            // Control: the same tree made by root is trusted.
            for p in [&theirs, &dev, &sock] {
                std::os::unix::fs::lchown(p, Some(0), Some(0)).unwrap();
            }
            AdminClient::new(&sock).unwrap();
        }
    }

    /// An admin socket that answers one request with `status` and an
    /// `ApiError` body.
    async fn answer_once(sock: &Path, status: &'static str) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(sock).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"code":"unavailable","message":"nothing was done; try again later"}"#;
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
        })
    }

    #[tokio::test]
    async fn a_503_exits_3_so_it_is_retried_and_other_refusals_exit_2() {
        // As `main` does: reqwest is built without a provider of its own.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        for (status, want) in [
            ("503 Service Unavailable", EXIT_UNREACHABLE),
            ("403 Forbidden", EXIT_REFUSED),
            ("500 Internal Server Error", EXIT_REFUSED),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("admin.sock");
            let server = answer_once(&sock, status).await;
            let err = AdminClient::new(&sock)
                .unwrap()
                .get::<serde_json::Value>("/v1/admin/entries")
                .await
                .unwrap_err();
            let exit = err.downcast_ref::<Exit>().unwrap();
            assert_eq!(exit.code, want, "{status}: {}", exit.message);
            assert!(
                exit.message.contains("nothing was done"),
                "{}",
                exit.message
            );
            server.await.unwrap();
        }
    }
}
