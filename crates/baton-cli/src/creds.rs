//! Task credentials on the agent side: `baton grant redeem` (through the node
//! daemon's delegation service) and `baton delegate` (a hop, over mTLS with
//! the task SVID). A credential lives in a directory:
//! `svid.pem` (chain), `key.pem` (PKCS#8, 0600), `bundle.pem`, `token`
//! (0600) and `task.json`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use baton_core::api::{DelegateRequest, HandoffGrant};
use baton_core::{Purpose, Scope, Secret, SpiffeId, TrustDomain};
use baton_proto::delegation::delegation_client::DelegationClient;
use baton_proto::delegation::{
    RedeemGrantRequest, RedeemGrantResponse, RenewTaskCredentialRequest,
};
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::transport::Endpoint;

use crate::cli::{
    DelegateArgs, EXIT_FAILURE, EXIT_REFUSED, EXIT_UNREACHABLE, GrantCmd, OutputFormat, SecretCmd,
    exit,
};
use crate::output;
use crate::workload::{check_target, create_private_dir, pem, write_file};

/// A secret in a file every user can read or write (a join token, a grant,
/// an ID token, a password) is not one: whoever reads it first spends it.
/// Refused, naming `flag` and the mode; its group may read it (a
/// Kubernetes Secret under `fsGroup`, a systemd credential's ACL).
pub(crate) fn refuse_shared_secret_file(flag: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| {
            exit(
                EXIT_REFUSED,
                format!("{flag}: cannot read {}: {e}", path.display()),
            )
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o007 != 0 {
        return Err(exit(
            EXIT_REFUSED,
            format!(
                "{flag} {}: every user can read or write it (mode {mode:o}), so it is no secret; run `chmod 600` on it",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A secret given as an argument or its environment variable (`value`;
/// `-` means standard input) or in a file (`file`; `-` is standard input
/// too). Surrounding whitespace, such as a trailing newline, is dropped;
/// an empty secret is refused. `flag` names the option in messages. A file
/// every user can read is refused ([`refuse_shared_secret_file`]).
pub fn secret_input(
    value: Option<&str>,
    file: Option<&Path>,
    flag: &str,
) -> Result<Option<Secret>> {
    secret_input_checked(value, file, flag, true)
}

/// As [`secret_input`], but a file every user can read is only warned
/// about: the node daemon's join token, read at every start though used
/// only while the node has no identity (a node attested before this check
/// existed keeps starting; `chmod 600` the file).
pub fn join_token_input(value: Option<&str>, file: Option<&Path>) -> Result<Option<Secret>> {
    secret_input_checked(value, file, "join-token", false)
}

fn secret_input_checked(
    value: Option<&str>,
    file: Option<&Path>,
    flag: &str,
    strict: bool,
) -> Result<Option<Secret>> {
    let (raw, from) = match (value, file) {
        (_, Some(path)) if path == Path::new("-") => {
            (read_stdin(flag)?, "standard input".to_owned())
        }
        (_, Some(path)) => {
            if let Err(e) = refuse_shared_secret_file(&format!("--{flag}-file"), path) {
                if strict {
                    return Err(e);
                }
                tracing::warn!(error = %format!("{e:#}"), "a secret file every user can read");
            }
            (
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --{flag}-file {}", path.display()))?,
                path.display().to_string(),
            )
        }
        (Some("-"), None) => (read_stdin(flag)?, "standard input".to_owned()),
        (Some(v), None) => (v.to_owned(), format!("--{flag}")),
        (None, None) => return Ok(None),
    };
    let secret = raw.trim();
    if secret.is_empty() {
        return Err(exit(
            EXIT_REFUSED,
            format!("--{flag}: the value from {from} is empty"),
        ));
    }
    Ok(Some(Secret::new(secret.to_owned())))
}

fn read_stdin(flag: &str) -> Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .with_context(|| format!("reading --{flag} from standard input"))?;
    Ok(s)
}

/// The files of a credential directory.
const CREDENTIAL_FILES: [&str; 5] = ["svid.pem", "key.pem", "bundle.pem", "token", "task.json"];

/// A task credential loaded from its directory.
pub struct Credential {
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
    pub bundle: Vec<Vec<u8>>,
    pub token: Secret,
    pub task: serde_json::Value,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("task", &self.task)
            .finish_non_exhaustive()
    }
}

fn pem_certs(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    CertificateDer::pem_slice_iter(bytes)
        .map(|c| {
            c.map(|c| c.to_vec())
                .map_err(|e| anyhow::anyhow!("bad PEM: {e}"))
        })
        .collect()
}

impl Credential {
    pub fn load(dir: &Path) -> Result<Self> {
        // A directory or file that is not there is a usage error (exit 2),
        // not a failure of Baton.
        if !dir.is_dir() {
            return Err(exit(
                EXIT_REFUSED,
                format!(
                    "--credential {}: no such directory (a credential directory comes from `baton grant redeem --out DIR`)",
                    dir.display()
                ),
            ));
        }
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                let message = format!(
                    "reading {} (a credential directory from `baton grant redeem`): {e}",
                    dir.join(name).display()
                );
                if e.kind() == std::io::ErrorKind::NotFound {
                    exit(EXIT_REFUSED, message)
                } else {
                    anyhow::anyhow!(message)
                }
            })
        };
        let key_pem = read("key.pem")?;
        let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&key_pem)
            .map_err(|e| anyhow::anyhow!("key.pem: {e}"))?
            .secret_pkcs8_der()
            .to_vec();
        Ok(Self {
            chain: pem_certs(&read("svid.pem")?)?,
            key,
            bundle: pem_certs(&read("bundle.pem")?)?,
            token: Secret::new(String::from_utf8_lossy(&read("token")?).trim().to_owned()),
            task: serde_json::from_slice(&read("task.json")?).context("task.json")?,
        })
    }

    pub fn spiffe_id(&self) -> Result<SpiffeId> {
        SpiffeId::parse(self.task["spiffe_id"].as_str().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("task.json spiffe_id: {e}"))
    }

    /// A reqwest client presenting this credential's certificate and
    /// trusting `expected` peers of its trust domain.
    pub fn client(&self, expected: PeerPolicy) -> Result<reqwest::Client> {
        let td = self.spiffe_id()?.trust_domain().clone();
        let bundles = BundleStore::new();
        bundles.set(td, self.bundle.clone());
        let identity = ClientIdentity::new(self.chain.clone(), &self.key)
            .map_err(|e| anyhow::anyhow!("credential key/cert: {e}"))?;
        let tls = baton_tls::client_config(identity, bundles, expected)
            .map_err(|e| anyhow::anyhow!("TLS config: {e}"))?;
        reqwest::Client::builder()
            // A broker never redirects: an answer that does is final, never
            // followed (with this client's certificate) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_preconfigured(tls)
            .connect_timeout(BROKER_CONNECT_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))
    }
}

/// Splits concatenated DER certificates.
fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(bytes)
            .map_err(|e| anyhow::anyhow!("bad certificate from the node daemon: {e}"))?;
        let used = bytes.len() - rest.len();
        out.push(bytes[..used].to_vec());
        bytes = rest;
    }
    Ok(out)
}

/// The Unix socket a `--socket` value names: `unix:///abs`, `unix:/abs`
/// or a plain path, relative ones taken from the current directory (the
/// SPIFFE endpoint URI that clients are given must be absolute).
pub fn socket_path(socket: &str) -> PathBuf {
    let s = socket
        .strip_prefix("unix://")
        .or_else(|| socket.strip_prefix("unix:"))
        .unwrap_or(socket);
    let path = PathBuf::from(s);
    if path.is_absolute() {
        return path;
    }
    std::env::current_dir().map_or(path.clone(), |cwd| cwd.join(&path))
}

/// [`socket_path`], refused where another user could have planted the
/// socket (a symbolic link, or a directory in one every user can write
/// that is neither this user's nor root's): a client of the node daemon
/// sends it grants and takes its keys, SVIDs and trust bundle from it.
pub fn trusted_socket(socket: &str) -> Result<PathBuf> {
    let path = socket_path(socket);
    crate::admin::trusted_socket_path(&path, "--socket")?;
    Ok(path)
}

/// Why a request to the broker got no answer. A certificate the
/// credential's bundle does not trust (a bundle gone stale after a CA
/// rotation) is a TLS trust error, not an unreachable broker.
pub fn broker_send_error(e: &reqwest::Error, credential_dir: &Path) -> anyhow::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let tls = c.downcast_ref::<baton_tls::rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<baton_tls::rustls::Error>())
        });
        // The connector may hand the TLS error on in a wrapper of its own:
        // rustls' text for a refused certificate names it.
        let untrusted = matches!(tls, Some(baton_tls::rustls::Error::InvalidCertificate(_)))
            || c.to_string().starts_with("invalid peer certificate");
        if untrusted {
            return exit(
                EXIT_FAILURE,
                format!(
                    "TLS trust error: the broker's certificate is not trusted by {} ({c}); after a CA rotation the bundle there may be stale: renew the credential (`baton grant renew --credential {}`) or redeem a new one",
                    credential_dir.join("bundle.pem").display(),
                    credential_dir.display()
                ),
            );
        }
        if let Some(tls) = tls {
            return exit(EXIT_FAILURE, format!("TLS error with the broker: {tls}"));
        }
        cause = c.source();
    }
    exit(
        EXIT_UNREACHABLE,
        format!(
            "cannot reach the broker: {}",
            crate::example::error_chain(e)
        ),
    )
}

/// Redeems `grant` through the node daemon and writes the credential to `out`.
pub async fn redeem(
    socket: &str,
    grant: &str,
    spiffe_id: Option<&str>,
    out: &Path,
) -> Result<Credential> {
    let mut client = delegation_client(socket).await?;
    let mut req = tonic::Request::new(RedeemGrantRequest {
        grant: grant.to_owned(),
        spiffe_id: spiffe_id.unwrap_or_default().to_owned(),
    });
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    // The node daemon passes the caller's trace on to the broker.
    if let Some(tp) = crate::telemetry::outgoing_traceparent()
        && let Ok(v) = tp.parse()
    {
        req.metadata_mut()
            .insert(baton_core::trace_context::TRACEPARENT_HEADER, v);
    }
    let resp = client
        .redeem(req)
        .await
        .map_err(|s| exit(EXIT_REFUSED, format!("redeem refused: {}", s.message())))?
        .into_inner();
    write_credential(resp, out)
}

/// The node daemon's delegation service on `socket`.
async fn delegation_client(socket: &str) -> Result<DelegationClient<tonic::transport::Channel>> {
    let path = trusted_socket(socket)?;
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| {
            exit(
                EXIT_UNREACHABLE,
                format!("cannot reach the node daemon at {socket}: {e}"),
            )
        })?;
    Ok(DelegationClient::new(channel))
}

/// Re-issues the task credential in `dir` under the CA's active keys
/// (after a taint), through the node daemon; rewrites `dir`.
pub async fn renew(socket: &str, dir: &Path, spiffe_id: Option<&str>) -> Result<Credential> {
    let old = Credential::load(dir)?;
    let leaf = old.chain.first().cloned().ok_or_else(|| {
        exit(
            EXIT_REFUSED,
            format!("{}: svid.pem is empty", dir.display()),
        )
    })?;
    let proof_iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let proof = baton_ca::possession::sign_renew_proof(&old.key, old.token.expose(), proof_iat)
        .map_err(|e| {
            exit(
                EXIT_REFUSED,
                format!("{}: key.pem cannot sign: {e}", dir.display()),
            )
        })?;
    let mut client = delegation_client(socket).await?;
    let mut req = tonic::Request::new(RenewTaskCredentialRequest {
        token: old.token.expose().to_owned(),
        x509_svid_leaf: leaf,
        proof,
        proof_iat: i64::try_from(proof_iat).unwrap_or(i64::MAX),
        // Default: the identity the credential was issued to.
        spiffe_id: spiffe_id
            .map(str::to_owned)
            .or_else(|| old.task["spiffe_id"].as_str().map(str::to_owned))
            .unwrap_or_default(),
    });
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let resp = client
        .renew(req)
        .await
        .map_err(|s| exit(EXIT_REFUSED, format!("renewal refused: {}", s.message())))?
        .into_inner();
    write_credential(resp, dir)
}

fn write_credential(resp: RedeemGrantResponse, out: &Path) -> Result<Credential> {
    create_private_dir(out)?;
    for name in CREDENTIAL_FILES {
        check_target(&out.join(name))?;
    }
    let chain = split_der(&resp.x509_svid)?;
    let bundle = split_der(&resp.bundle)?;
    let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let bundle_pem: String = bundle.iter().map(|c| pem("CERTIFICATE", c)).collect();
    write_file(&out.join("svid.pem"), chain_pem.as_bytes(), 0o644)?;
    write_file(
        &out.join("key.pem"),
        pem("PRIVATE KEY", &resp.x509_svid_key).as_bytes(),
        0o600,
    )?;
    write_file(&out.join("bundle.pem"), bundle_pem.as_bytes(), 0o644)?;
    write_file(&out.join("token"), resp.token.as_bytes(), 0o600)?;
    let task = serde_json::json!({
        "task_id": resp.task_id,
        "spiffe_id": resp.spiffe_id,
        "expires_at": resp.expires_at,
    });
    write_file(&out.join("task.json"), task.to_string().as_bytes(), 0o644)?;
    Ok(Credential {
        chain,
        key: resp.x509_svid_key,
        bundle,
        token: Secret::new(resp.token),
        task,
    })
}

pub async fn grant(cmd: GrantCmd) -> Result<()> {
    match cmd {
        GrantCmd::Renew {
            socket,
            credential,
            spiffe_id,
            output: format,
        } => {
            let cred = renew(&socket.socket, &credential, spiffe_id.as_deref()).await?;
            if format == OutputFormat::Json {
                output::json(&serde_json::json!({
                    "renewed": true,
                    "task": cred.task,
                    "credential": credential,
                }));
                return Ok(());
            }
            output::line(&format!(
                "renewed: {} for task {} under the active CA authority (credential in {})",
                cred.task["spiffe_id"].as_str().unwrap_or("-"),
                cred.task["task_id"].as_str().unwrap_or("-"),
                credential.display()
            ));
            Ok(())
        }
        GrantCmd::Redeem {
            socket,
            grant,
            grant_file,
            spiffe_id,
            out,
            output: format,
        } => {
            let grant = secret_input(grant.as_deref(), grant_file.as_deref(), "grant")?
                .ok_or_else(|| {
                    exit(
                        EXIT_REFUSED,
                        "pass --grant-file FILE, --grant - (standard input) or BATON_GRANT",
                    )
                })?;
            let cred = redeem(&socket.socket, grant.expose(), spiffe_id.as_deref(), &out).await?;
            if format == OutputFormat::Json {
                output::json(&serde_json::json!({
                    "redeemed": true,
                    "task": cred.task,
                    "credential": out,
                }));
                return Ok(());
            }
            output::line(&format!(
                "redeemed: {} for task {} (credential in {})",
                cred.task["spiffe_id"].as_str().unwrap_or("-"),
                cred.task["task_id"].as_str().unwrap_or("-"),
                out.display()
            ));
            Ok(())
        }
    }
}

fn token_claims(token: &str) -> Result<serde_json::Value> {
    use base64::Engine;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("token is not a JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .context("token payload")?;
    serde_json::from_slice(&bytes).context("token claims")
}

pub async fn delegate(args: DelegateArgs) -> Result<()> {
    let cred = Credential::load(&args.credential)?;
    let claims = token_claims(cred.token.expose())?;
    let purpose: Purpose = match &args.purpose {
        Some(p) => p
            .parse()
            .map_err(|e| exit(EXIT_REFUSED, format!("--purpose: {e}")))?,
        None => serde_json::from_value(claims["task"]["purpose"].clone())
            .context("purpose in the token")?,
    };
    let scope =
        Scope::parse(&args.scope).map_err(|e| exit(EXIT_REFUSED, format!("--scope: {e}")))?;
    let target =
        SpiffeId::parse(&args.target).map_err(|e| exit(EXIT_REFUSED, format!("--target: {e}")))?;
    let td: &TrustDomain = target.trust_domain();
    let broker_id = td
        .id("/baton/broker")
        .map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
    let http = cred.client(PeerPolicy::Exact(vec![broker_id]))?;
    let urls = baton_verify::broker_urls(&args.broker_url)
        .map_err(|e| exit(EXIT_REFUSED, format!("--broker-url: {e}")))?;
    let request = DelegateRequest {
        token: cred.token.clone(),
        target,
        scope,
        purpose,
        audience: args.audience.clone(),
        justification: args.justification.clone(),
        ttl_secs: args.ttl.map(|t| t.as_secs().max(1)),
    };
    let traceparent = crate::telemetry::outgoing_traceparent();
    // A hop spends nothing, so one whose answer was lost (the broker died
    // after it) is asked again at the next broker: the first grant, never
    // delivered, expires unredeemed (the trail shows it issued and never
    // redeemed).
    let resp = post_first_answer(
        &http,
        &urls,
        "/v1/delegate",
        &request,
        traceparent,
        Replay::AnyTransport,
    )
    .await?
    .map_err(|e| broker_send_error(&e, &args.credential))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(exit(
            EXIT_REFUSED,
            format!(
                "hop refused ({}): {}",
                body["code"].as_str().unwrap_or("?"),
                body["message"].as_str().unwrap_or("no reason given")
            ),
        ));
    }
    let grant: HandoffGrant = serde_json::from_value(body).context("broker answer")?;
    match args.output {
        OutputFormat::Json => output::json(&serde_json::json!({
            "grant": grant.grant.expose(),
            "task_id": grant.task_id,
            "target": grant.target,
            "expires_at": grant.expires_at,
        })),
        OutputFormat::Table => {
            output::line(&format!("Grant:   {}", grant.grant.expose()));
            output::line(&format!("Target:  {}", grant.target));
            output::line(&format!("Task:    {}", grant.task_id));
        }
    }
    Ok(())
}

/// How long a connection to a broker may take to open.
const BROKER_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a broker may take to answer a hop or a secret request before
/// the next one is tried.
const BROKER_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Which failures move a request to the next broker URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Only a connection that could not be made: the request never
    /// reached a broker (its effect may not be repeatable).
    ConnectOnly,
    /// Any failure before an HTTP answer (refused, reset, timeout): the
    /// request spends nothing, so one asked twice is harmless.
    AnyTransport,
}

/// POSTs `body` to `path` at the first broker of `urls` that answers: any
/// HTTP answer, whatever its status, is final; a broker that gives none
/// is skipped for the next as `replay` allows. The last error when none
/// answers.
async fn post_first_answer<T: serde::Serialize + ?Sized>(
    http: &reqwest::Client,
    urls: &[String],
    path: &str,
    body: &T,
    traceparent: Option<String>,
    replay: Replay,
) -> Result<std::result::Result<reqwest::Response, reqwest::Error>> {
    let Some((last, first)) = urls.split_last() else {
        return Err(exit(EXIT_REFUSED, "--broker-url: no broker URL"));
    };
    let send = |base: &String| {
        let mut post = http.post(format!("{base}{path}"));
        if let Some(tp) = &traceparent {
            post = post.header(baton_core::trace_context::TRACEPARENT_HEADER, tp.clone());
        }
        post.json(body).timeout(BROKER_ANSWER_TIMEOUT).send()
    };
    for base in first {
        match send(base).await {
            Err(e) if e.is_connect() || (replay == Replay::AnyTransport && !e.is_builder()) => {
                tracing::warn!(broker = %base, error = %e, "no answer from the broker, trying the next");
            }
            answered => return Ok(answered),
        }
    }
    Ok(send(last).await)
}

/// `baton secret lease|introspect`: mTLS with a task credential to the broker.
pub async fn secret(cmd: SecretCmd) -> Result<()> {
    let (credential, broker_url, path, body, format) = match &cmd {
        SecretCmd::Lease {
            credential,
            broker_url,
            engine,
            output,
        } => {
            let cred = Credential::load(credential)?;
            let body = serde_json::json!({ "token": cred.token.expose(), "engine": engine });
            (cred, broker_url, "lease", body, *output)
        }
        SecretCmd::Introspect {
            credential,
            broker_url,
            key,
            key_file,
            output,
        } => {
            let key =
                secret_input(key.as_deref(), key_file.as_deref(), "key")?.ok_or_else(|| {
                    exit(
                        EXIT_REFUSED,
                        "pass --key-file FILE, --key - (standard input) or BATON_API_KEY",
                    )
                })?;
            (
                Credential::load(credential)?,
                broker_url,
                "introspect",
                serde_json::json!({ "key": key.expose() }),
                *output,
            )
        }
    };
    let credential_dir = match &cmd {
        SecretCmd::Lease { credential, .. } | SecretCmd::Introspect { credential, .. } => {
            credential.as_path()
        }
    };
    let td = credential.spiffe_id()?.trust_domain().clone();
    let broker_id = td
        .id("/baton/broker")
        .map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
    let http = credential.client(PeerPolicy::Exact(vec![broker_id]))?;
    let urls = baton_verify::broker_urls(broker_url)
        .map_err(|e| exit(EXIT_REFUSED, format!("--broker-url: {e}")))?;
    // Each broker keeps its own API-key store, and a lease creates a
    // secret: only a broker that could not be reached is skipped.
    let resp = post_first_answer(
        &http,
        &urls,
        &format!("/v1/secrets/{path}"),
        &body,
        None,
        Replay::ConnectOnly,
    )
    .await?
    .map_err(|e| broker_send_error(&e, credential_dir))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(exit(
            EXIT_REFUSED,
            format!(
                "secret {path} refused ({}): {}",
                body["code"].as_str().unwrap_or("?"),
                body["message"].as_str().unwrap_or("no reason given")
            ),
        ));
    }
    match format {
        OutputFormat::Json => output::json(&body),
        OutputFormat::Table => {
            let s = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            if path == "lease" {
                output::line(&format!("Lease:    {}", s(&body["lease_id"])));
                output::line(&format!("Engine:   {}", s(&body["engine"])));
                output::line(&format!(
                    "Expires:  {}",
                    output::when(body["expires_at"].as_u64().unwrap_or(0))
                ));
                let m = &body["material"];
                if m.get("key").is_some() {
                    output::line(&format!("Key:      {}", s(&m["key"])));
                } else {
                    output::line(&format!(
                        "Connect:  host={} port={} dbname={} user={} password={}",
                        s(&m["host"]),
                        s(&m["port"]),
                        s(&m["dbname"]),
                        s(&m["username"]),
                        s(&m["password"])
                    ));
                }
            } else {
                output::line(&format!("Active:   {}", s(&body["active"])));
                for (label, field) in [
                    ("Task:     ", "task_id"),
                    ("Agent:    ", "agent"),
                    ("Expires:  ", "expires_at"),
                ] {
                    if let Some(t) = body.get(field).and_then(serde_json::Value::as_u64) {
                        output::line(&format!("{label}{}", output::when(t)));
                    } else if body.get(field).is_some() {
                        output::line(&format!("{label}{}", s(&body[field])));
                    }
                }
            }
        }
    }
    Ok(())
}
