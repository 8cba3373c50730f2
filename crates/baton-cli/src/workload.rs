//! `baton svid ...`: a Workload API client for people and scripts. It uses
//! the third-party `spiffe` crate on purpose: what it fetches is what any
//! SPIFFE client would get.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use base64::Engine;
use spiffe::WorkloadApiClient;

use crate::cli::{EXIT_REFUSED, EXIT_UNREACHABLE, OutputFormat, SvidCmd, exit};
use crate::output;

/// Accepts `unix:///abs`, `unix:/abs` or a plain (relative or absolute) path.
fn endpoint(socket: &str) -> Result<String> {
    Ok(format!(
        "unix://{}",
        crate::creds::trusted_socket(socket)?.display()
    ))
}

async fn connect(socket: &str) -> Result<WorkloadApiClient> {
    let ep = endpoint(socket)?;
    WorkloadApiClient::connect_to(&ep).await.map_err(|e| {
        exit(
            EXIT_UNREACHABLE,
            format!("cannot connect to the Workload API at {ep}: {e}. Is `baton dev` or `baton agent` running?"),
        )
    })
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Creates `dir` (and its parents) if missing; new directories are 0700,
/// since they hold private keys and tokens.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the directory {}", dir.display()))
}

/// Writes `contents` to `path` with exactly `mode`, replacing what is there
/// atomically and never writing through a symbolic link.
///
/// A symbolic link (or anything but a regular file) at `path` is refused.
/// The new contents go to a fresh file in the same directory, created with
/// `O_CREAT | O_EXCL` (which never follows a link) and mode 0600, are
/// synced to disk, given `mode` through the open handle and then renamed
/// over `path` (a rename replaces a link planted meanwhile rather than
/// following it). So a key never exists with a wider mode than asked for,
/// a pre-existing file's mode does not survive, and a crash leaves either
/// the old or the new file.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("cannot write {}: no file name", path.display()))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    check_target(path)?;
    let (tmp, mut file) = create_temp(dir, &name.to_string_lossy())?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    // Make the rename itself durable.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))
}

/// Refuses a path that [`write_file`] must not replace: a symbolic link or
/// anything but a regular file. Callers writing several files check them
/// all first, so a refusal leaves none of them changed.
pub fn check_target(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(path)
                .map(|t| format!(" (to {})", t.display()))
                .unwrap_or_default();
            return Err(exit(
                EXIT_REFUSED,
                format!(
                    "refusing to write {}: it is a symbolic link{target}; remove it or write to another directory",
                    path.display()
                ),
            ));
        }
        Ok(meta) if !meta.is_file() => {
            return Err(exit(
                EXIT_REFUSED,
                format!(
                    "refusing to write {}: it exists and is not a regular file",
                    path.display()
                ),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    Ok(())
}

/// A new, empty file (mode 0600) beside `name` in `dir`, for [`write_file`].
fn create_temp(dir: &Path, name: &str) -> Result<(std::path::PathBuf, std::fs::File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut last_err = None;
    for _ in 0..16 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{name}.{}.{}.{nanos}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("creating a temporary file for {name} in {}", dir.display())
                });
            }
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no free name")))
        .with_context(|| format!("creating a temporary file for {name} in {}", dir.display()))
}

pub async fn svid(cmd: SvidCmd) -> Result<()> {
    match cmd {
        SvidCmd::Fetch {
            socket,
            spiffe_id,
            write,
            output: format,
        } => {
            let client = connect(&socket.socket).await?;
            let ctx = client
                .fetch_x509_context()
                .await
                .map_err(|e| exit(EXIT_REFUSED, format!("Workload API refused: {e}")))?;
            let svid = match &spiffe_id {
                None => ctx
                    .default_svid()
                    .ok_or_else(|| exit(EXIT_REFUSED, "the Workload API returned no SVID"))?,
                Some(want) => ctx
                    .svids()
                    .iter()
                    .find(|s| s.spiffe_id().to_string() == *want)
                    .ok_or_else(|| {
                        exit(
                            EXIT_REFUSED,
                            format!(
                                "no SVID for {want} among those this process is entitled to; `baton entry list` shows the registrations"
                            ),
                        )
                    })?,
            };
            let leaf = x509_parser::parse_x509_certificate(svid.leaf().as_bytes())
                .map_err(|e| exit(EXIT_REFUSED, format!("unparseable SVID: {e}")))?
                .1;
            let not_after = leaf.validity().not_after.to_rfc2822().unwrap_or_default();
            let serial = leaf.raw_serial_as_string();
            match format {
                OutputFormat::Json => output::json(&serde_json::json!({
                    "spiffe_id": svid.spiffe_id().to_string(),
                    "not_after": not_after,
                    "serial": serial,
                    "chain_len": svid.cert_chain().len(),
                })),
                OutputFormat::Table => {
                    output::line(&format!("SPIFFE ID:  {}", svid.spiffe_id()));
                    output::line(&format!(
                        "Expires:    {}",
                        output::when(
                            u64::try_from(leaf.validity().not_after.timestamp()).unwrap_or(0)
                        )
                    ));
                    output::line(&format!("Serial:     {serial}"));
                }
            }
            if let Some(dir) = write {
                create_private_dir(&dir)?;
                for name in ["svid.pem", "key.pem", "bundle.pem"] {
                    check_target(&dir.join(name))?;
                }
                let chain: String = svid
                    .cert_chain()
                    .iter()
                    .map(|c| pem("CERTIFICATE", c.as_bytes()))
                    .collect();
                write_file(&dir.join("svid.pem"), chain.as_bytes(), 0o644)?;
                write_file(
                    &dir.join("key.pem"),
                    pem("PRIVATE KEY", svid.private_key().as_bytes()).as_bytes(),
                    0o600,
                )?;
                let bundle: String = ctx
                    .bundle_set()
                    .get(svid.spiffe_id().trust_domain())
                    .map(|b| {
                        b.authorities()
                            .iter()
                            .map(|c| pem("CERTIFICATE", c.as_bytes()))
                            .collect()
                    })
                    .unwrap_or_default();
                write_file(&dir.join("bundle.pem"), bundle.as_bytes(), 0o644)?;
            }
            Ok(())
        }
        SvidCmd::FetchJwt {
            socket,
            audience,
            output: format,
        } => {
            let client = connect(&socket.socket).await?;
            let token = client
                .fetch_jwt_token(&audience, None)
                .await
                .map_err(|e| exit(EXIT_REFUSED, format!("Workload API refused: {e}")))?;
            match format {
                OutputFormat::Json => output::json(&serde_json::json!({
                    "token": token,
                    "audience": audience,
                })),
                OutputFormat::Table => output::line(&token),
            }
            Ok(())
        }
        SvidCmd::ValidateJwt {
            socket,
            audience,
            token,
            output: format,
        } => {
            let token = crate::creds::secret_input(Some(&token), None, "token")?
                .ok_or_else(|| exit(EXIT_REFUSED, "no token to validate"))?;
            let client = connect(&socket.socket).await?;
            let svid = client
                .validate_jwt_token(&audience, token.expose())
                .await
                .map_err(|e| exit(EXIT_REFUSED, format!("token rejected: {e}")))?;
            match format {
                OutputFormat::Json => output::json(&serde_json::json!({
                    "valid": true,
                    "spiffe_id": svid.spiffe_id().to_string(),
                    "audience": audience,
                })),
                OutputFormat::Table => {
                    output::line(&format!("valid JWT-SVID for {}", svid.spiffe_id()));
                }
            }
            Ok(())
        }
    }
}
