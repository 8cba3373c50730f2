//! `baton audit ...`: verify the log (against witnessed tree heads), keep a
//! witness of it, check receipts, trace a task.
//!
//! A witness trusts the broker for nothing it can check itself: with
//! `--since` or `verify-receipt` over the admin socket, the broker only
//! supplies its newest signed tree head and a consistency proof; the
//! signature (under the key the witness pinned) and the proof are checked
//! here. Offline (`--db`, `--keys-dir`) the whole log is rebuilt here.

use std::path::{Path, PathBuf};

use anyhow::Result;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use baton_audit::{
    AuditLog, Kept, Receipt, ReceiptLeaf, SignedCheckpoint, TamperError, VerifyOptions, Witness,
};
use serde::Deserialize;

use crate::admin::AdminClient;
use crate::cli::{
    AdminArgs, AuditCmd, EXIT_REFUSED, EXIT_VERIFY_FAILED, OfflineLogArgs, OutputFormat, exit,
};
use crate::output;
use crate::tasks::task_segment;

/// `GET /v1/admin/audit/consistency/{size}` and `.../checkpoint`.
#[derive(Debug, Deserialize)]
struct RemoteHead {
    checkpoint: SignedCheckpoint,
    #[serde(default)]
    proof: Option<Vec<String>>,
    public_key: String,
}

/// Where the log is read: a file here, or the broker.
enum Source {
    File { db: PathBuf, public_key: Vec<u8> },
    Broker(AdminClient),
}

impl Source {
    fn new(log: OfflineLogArgs, admin: &AdminArgs) -> Result<Self> {
        match (log.db, log.keys_dir) {
            (Some(db), Some(keys)) => {
                let public_key = baton_audit::read_public_key(&keys)
                    .map_err(|e| exit(EXIT_REFUSED, format!("--keys-dir: {e}")))?;
                Ok(Source::File { db, public_key })
            }
            _ => Ok(Source::Broker(AdminClient::new(&admin.admin_socket)?)),
        }
    }

    /// The log's checkpoint key.
    async fn public_key(&self) -> Result<Vec<u8>> {
        match self {
            Source::File { public_key, .. } => Ok(public_key.clone()),
            Source::Broker(client) => {
                let v: serde_json::Value = client.get("/v1/admin/audit/public-key").await?;
                decode_key(v["public_key"].as_str().unwrap_or_default())
            }
        }
    }

    /// Verifies the log and checks that it extends `kept`. `Ok(Err(..))`
    /// is a verification failure; `Err` means the check could not run.
    async fn verify(&self, kept: Vec<Kept>) -> Result<Outcome> {
        match self {
            Source::File { db, public_key } => {
                let opts = VerifyOptions {
                    kept,
                    ..VerifyOptions::default()
                };
                Ok(match AuditLog::verify_file_with(db, public_key, &opts) {
                    Ok(report) => {
                        let head = report.head.clone();
                        Outcome::ok(serde_json::json!(report), head)
                    }
                    Err(e) => Outcome::failed(&e),
                })
            }
            Source::Broker(client) => {
                // The broker's own verdict first (every event, its head file)...
                let v: serde_json::Value = client.get("/v1/admin/audit/verify").await?;
                if v["ok"].as_bool() != Some(true) {
                    return Ok(Outcome {
                        answer: v,
                        head: None,
                    });
                }
                let mut report = v["report"].clone();
                // With heads kept, the head a witness may move to is one
                // proven here to extend them, never the one the broker's
                // report names: a broker (or whoever holds its key) could
                // name a forked log's head there and have the witness
                // follow the fork from then on.
                let mut head: Option<SignedCheckpoint> = if kept.is_empty() {
                    serde_json::from_value(report["head"].clone()).ok()
                } else {
                    None
                };
                // ...then each kept head checked here against a signed head
                // and a consistency proof from it.
                for k in kept {
                    let remote: RemoteHead = client
                        .get(&format!(
                            "/v1/admin/audit/consistency/{}",
                            k.checkpoint.size
                        ))
                        .await?;
                    let key = decode_key(&remote.public_key)?;
                    let proof = remote.proof.unwrap_or_default();
                    if let Err(e) = baton_audit::check_extends(&k, &remote.checkpoint, &proof, &key)
                    {
                        return Ok(Outcome::failed(&e));
                    }
                    if let Some(w) = report["witnessed"].as_array_mut() {
                        w.push(serde_json::json!(k.source));
                    }
                    if head
                        .as_ref()
                        .is_none_or(|h| h.size < remote.checkpoint.size)
                    {
                        head = Some(remote.checkpoint);
                    }
                }
                let mut outcome = Outcome::ok(report, head);
                if let Some(logs) = v.get("shared_logs") {
                    outcome.answer["shared_logs"] = logs.clone();
                }
                Ok(outcome)
            }
        }
    }
}

/// The answer printed with `-o json`, and the newest head seen.
struct Outcome {
    answer: serde_json::Value,
    head: Option<SignedCheckpoint>,
}

impl Outcome {
    fn ok(report: serde_json::Value, head: Option<SignedCheckpoint>) -> Self {
        Self {
            answer: serde_json::json!({ "ok": true, "report": report }),
            head,
        }
    }

    fn failed(e: &TamperError) -> Self {
        Self {
            answer: serde_json::json!({
                "ok": false,
                "error": e.to_string(),
                "first_bad_index": e.first_bad_index,
            }),
            head: None,
        }
    }

    fn is_ok(&self) -> bool {
        self.answer["ok"].as_bool() == Some(true)
    }

    /// The exit error of a failed verification.
    fn failure(&self, what: &str) -> anyhow::Error {
        let v = &self.answer;
        let error = v["error"].as_str().unwrap_or("unknown error");
        exit(
            EXIT_VERIFY_FAILED,
            match v["first_bad_index"].as_u64() {
                Some(i) => format!("{what} FAILED at index {i}: {error}"),
                None => format!("{what} FAILED: {error}"),
            },
        )
    }
}

fn decode_key(b64: &str) -> Result<Vec<u8>> {
    B64.decode(b64).map_err(|e| {
        exit(
            EXIT_REFUSED,
            format!("the broker's audit public key is not base64: {e}"),
        )
    })
}

fn read_witness(path: &Path) -> Result<Witness> {
    baton_audit::read_witness(path).map_err(|e| exit(EXIT_REFUSED, format!("--since: {e}")))
}

/// Whether `path` holds one JSON witness (not a broker's head file, which
/// `read_witness` also reads but only the broker writes).
fn is_witness_file(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Witness>(&t).ok())
        .is_some()
}

/// Checks that `witness` names this log's key and is signed by it.
fn check_witness(witness: &Witness, path: &Path, key: &[u8]) -> Result<()> {
    witness.verify(key).map(|_| ()).map_err(|e| {
        exit(
            EXIT_VERIFY_FAILED,
            format!(
                "audit log verification FAILED: the witness file {} is not a valid tree head of this log: {e}",
                path.display()
            ),
        )
    })
}

fn write_witness(path: &Path, key: &[u8], head: &SignedCheckpoint) -> Result<()> {
    let witness = Witness::new(key, head.clone())
        .map_err(|e| exit(EXIT_REFUSED, format!("the log's key: {e}")))?;
    // Never keep a head the witness's own key did not sign.
    witness.verify(key).map_err(|e| {
        exit(
            EXIT_VERIFY_FAILED,
            format!("the tree head to move the witness to does not verify: {e}"),
        )
    })?;
    baton_audit::write_witness(path, &witness).map_err(|e| exit(EXIT_REFUSED, e.to_string()))
}

pub async fn audit(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Receipt { index, admin } => {
            let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .get(&format!("/v1/admin/audit/receipt/{index}"))
                .await?;
            output::json(&v);
            Ok(())
        }
        AuditCmd::Verify {
            log,
            since,
            update,
            admin,
        } => verify(log, since, update, admin).await,
        AuditCmd::Checkpoint { out, log, admin } => checkpoint(out, log, admin).await,
        AuditCmd::VerifyReceipt { file, log, admin } => verify_receipt(&file, log, admin).await,
        AuditCmd::Trace { task, json, admin } => {
            let v: serde_json::Value = AdminClient::new(&admin.admin_socket)?
                .get(&format!("/v1/admin/audit/trace/{}", task_segment(&task)?))
                .await?;
            if json || admin.output == OutputFormat::Json {
                output::json(&v["trace"]);
            } else {
                // Escaped again here: a broker of another version may not
                // have escaped what callers wrote.
                output::raw(&output::shown(v["text"].as_str().unwrap_or_default()));
            }
            Ok(())
        }
    }
}

async fn verify(
    log: OfflineLogArgs,
    since: Option<PathBuf>,
    update: bool,
    admin: AdminArgs,
) -> Result<()> {
    let source = Source::new(log, &admin)?;
    let mut kept = Vec::new();
    let mut key = None;
    if let Some(path) = &since {
        let witness = read_witness(path)?;
        if update && !is_witness_file(path) {
            return Err(exit(
                EXIT_REFUSED,
                format!(
                    "--update: {} is not a witness file written by `baton audit checkpoint` (a broker's head file?); refusing to replace it",
                    path.display()
                ),
            ));
        }
        let k = source.public_key().await?;
        check_witness(&witness, path, &k)?;
        kept.push(Kept::new(
            format!("the witness file {}", path.display()),
            witness.checkpoint,
        ));
        key = Some(k);
    }
    let outcome = source.verify(kept).await?;
    if !outcome.is_ok() {
        if admin.output == OutputFormat::Json {
            output::json(&outcome.answer);
        }
        return Err(outcome.failure("audit log verification"));
    }
    let mut answer = outcome.answer.clone();
    if let (true, Some(path), Some(key)) = (update, &since, &key) {
        match &outcome.head {
            Some(head) => {
                write_witness(path, key, head)?;
                answer["witness_updated"] = serde_json::json!({
                    "file": path.display().to_string(),
                    "size": head.size,
                });
            }
            None => {
                return Err(exit(
                    EXIT_REFUSED,
                    "the log has no tree head to move the witness to",
                ));
            }
        }
    }
    match admin.output {
        OutputFormat::Json => output::json(&answer),
        OutputFormat::Table => {
            let r = &answer["report"];
            output::line(&format!(
                "audit log verified: {} events, root {}",
                r["size"],
                r["root"].as_str().unwrap_or("-")
            ));
            for l in answer["shared_logs"].as_array().into_iter().flatten() {
                output::line(&format!(
                    "shared log {}{}: {} events, {} checkpoint signatures checked, root {}",
                    l["log_id"].as_str().unwrap_or("-"),
                    if l["own"].as_bool() == Some(true) {
                        " (this broker)"
                    } else {
                        ""
                    },
                    l["size"],
                    l["signatures"],
                    l["root"].as_str().unwrap_or("-")
                ));
            }
            for w in r["witnessed"].as_array().into_iter().flatten() {
                output::line(&format!(
                    "extends {}",
                    w.as_str().unwrap_or("a kept checkpoint")
                ));
            }
            if let Some(u) = answer.get("witness_updated") {
                output::line(&format!(
                    "witness {} moved forward to {} events",
                    u["file"].as_str().unwrap_or("-"),
                    u["size"]
                ));
            }
        }
    }
    Ok(())
}

async fn checkpoint(out: Option<PathBuf>, log: OfflineLogArgs, admin: AdminArgs) -> Result<()> {
    if let Some(path) = &out
        && std::fs::symlink_metadata(path).is_ok()
    {
        return Err(exit(
            EXIT_REFUSED,
            format!(
                "{} exists; to move a witness forward, run `baton audit verify --since {} --update`",
                path.display(),
                path.display()
            ),
        ));
    }
    let source = Source::new(log, &admin)?;
    let (head, key) = match &source {
        // Offline, only a log that verifies is witnessed.
        Source::File { public_key, .. } => {
            let outcome = source.verify(Vec::new()).await?;
            if !outcome.is_ok() {
                return Err(outcome.failure("audit log verification"));
            }
            (outcome.head, public_key.clone())
        }
        Source::Broker(client) => {
            let remote: RemoteHead = client.get("/v1/admin/audit/checkpoint").await?;
            (Some(remote.checkpoint), decode_key(&remote.public_key)?)
        }
    };
    let head =
        head.ok_or_else(|| exit(EXIT_REFUSED, "the audit log is empty: nothing to witness"))?;
    let witness = Witness::new(&key, head.clone())
        .map_err(|e| exit(EXIT_REFUSED, format!("the log's key: {e}")))?;
    // A head that does not verify under the key given with it is not kept.
    witness.verify(&key).map_err(|e| {
        exit(
            EXIT_VERIFY_FAILED,
            format!("the log's newest tree head does not verify: {e}"),
        )
    })?;
    match &out {
        None => output::json(&witness),
        Some(path) => {
            write_witness(path, &key, &head)?;
            match admin.output {
                OutputFormat::Json => output::json(&serde_json::json!({
                    "file": path.display().to_string(),
                    "witness": witness,
                })),
                OutputFormat::Table => output::line(&format!(
                    "witnessed {} events, root {} -> {}",
                    head.size,
                    head.root_hash,
                    path.display()
                )),
            }
        }
    }
    Ok(())
}

async fn verify_receipt(file: &Path, log: OfflineLogArgs, admin: AdminArgs) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| exit(EXIT_REFUSED, format!("{}: {e}", file.display())))?;
    let receipt: Receipt = serde_json::from_str(&text).map_err(|e| {
        exit(
            EXIT_REFUSED,
            format!("{} is not a receipt: {e}", file.display()),
        )
    })?;
    let source = Source::new(log, &admin)?;
    let key = source.public_key().await?;
    let mut leaf = [0u8; 32];
    hex::decode_to_slice(&receipt.leaf_hash, &mut leaf).map_err(|_| {
        exit(
            EXIT_REFUSED,
            "the receipt's leaf hash is not 32 bytes of hex",
        )
    })?;
    // The receipt itself: leaf, inclusion path, the checkpoint's signature.
    baton_audit::verify_receipt(&receipt, ReceiptLeaf::Hash(&leaf), &key).map_err(|e| {
        exit(
            EXIT_VERIFY_FAILED,
            format!("receipt verification FAILED: the receipt does not verify: {e}"),
        )
    })?;
    // The log now extends the receipt's checkpoint, so the event is still
    // at its index (inclusion in a prefix of the log).
    let kept = Kept::new(
        format!("the receipt of event #{}", receipt.index),
        receipt.checkpoint.clone(),
    );
    let outcome = source.verify(vec![kept]).await?;
    if !outcome.is_ok() {
        if admin.output == OutputFormat::Json {
            output::json(&outcome.answer);
        }
        return Err(outcome.failure("receipt verification"));
    }
    let size = outcome.head.as_ref().map_or(0, |h| h.size);
    match admin.output {
        OutputFormat::Json => output::json(&serde_json::json!({
            "ok": true,
            "index": receipt.index,
            "leaf_hash": receipt.leaf_hash,
            "receipt_checkpoint_size": receipt.checkpoint.size,
            "log_size": size,
        })),
        OutputFormat::Table => output::line(&format!(
            "receipt verified: event #{} (leaf {}) is still in the log of {size} events, which extends the receipt's checkpoint of size {}",
            receipt.index, receipt.leaf_hash, receipt.checkpoint.size
        )),
    }
    Ok(())
}
