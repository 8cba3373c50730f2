//! `baton svid ...`: a Workload API client for people and scripts. It uses
//! the third-party `spiffe` crate on purpose: what it fetches is what any
//! SPIFFE client would get.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use spiffe::WorkloadApiClient;

use crate::cli::{EXIT_REFUSED, EXIT_UNREACHABLE, OutputFormat, SvidCmd, exit};
use crate::output;

/// Accepts `unix:///abs`, `unix:/abs` or a plain (relative or absolute) path.
fn endpoint(socket: &str) -> Result<String> {
    if socket.starts_with("unix:") {
        return Ok(socket.to_owned());
    }
    let path = Path::new(socket);
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(path)
    };
    Ok(format!("unix://{}", abs.display()))
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

pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
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
                    output::line(&format!("Expires:    {not_after}"));
                    output::line(&format!("Serial:     {serial}"));
                }
            }
            if let Some(dir) = write {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let chain: String = svid
                    .cert_chain()
                    .iter()
                    .map(|c| pem("CERTIFICATE", c.as_bytes()))
                    .collect();
                write_file(&dir.join("svid.pem"), &chain, 0o644)?;
                write_file(
                    &dir.join("key.pem"),
                    &pem("PRIVATE KEY", svid.private_key().as_bytes()),
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
                write_file(&dir.join("bundle.pem"), &bundle, 0o644)?;
            }
            Ok(())
        }
        SvidCmd::FetchJwt { socket, audience } => {
            let client = connect(&socket.socket).await?;
            let token = client
                .fetch_jwt_token(&audience, None)
                .await
                .map_err(|e| exit(EXIT_REFUSED, format!("Workload API refused: {e}")))?;
            output::line(&token);
            Ok(())
        }
        SvidCmd::ValidateJwt {
            socket,
            audience,
            token,
        } => {
            let client = connect(&socket.socket).await?;
            let svid = client
                .validate_jwt_token(&audience, &token)
                .await
                .map_err(|e| exit(EXIT_REFUSED, format!("token rejected: {e}")))?;
            output::line(&format!("valid JWT-SVID for {}", svid.spiffe_id()));
            Ok(())
        }
    }
}
