//! Baton's tamper-evident audit log of delegation chains.
//!
//! Place in the flow: the broker calls [`AuditLog::append`] on every task
//! start, hop granted or refused, redeem, tool-call report, purpose change and
//! task end, *before* the credential or answer leaves it; an append error
//! refuses the issuance (fail closed, like Vault's audit devices). The
//! returned [`Receipt`] goes back to the caller, who can check it offline
//! with [`verify_receipt`] and the log's public key. `baton audit verify`
//! runs [`AuditLog::verify_file`]; `baton audit trace TASK` runs
//! [`AuditLog::events_for_task`] then [`trace()`].
//!
//! Construction (RFC 9162 §2.1):
//! - each event is encoded canonically ([`event`] module docs), with the
//!   sensitive values (initiator, justification) replaced by HMAC-SHA256
//!   under the log's key; their clear text sits in a separate display column
//!   outside the tree that [`AuditLog::redact_clear_text`] can wipe;
//! - leaf hash `SHA-256(0x00 || encoding)`, interior
//!   `SHA-256(0x01 || left || right)`, split at the largest power of two
//!   below `n`;
//! - every committed batch of appends (concurrent appends are
//!   group-committed; a lone append is a batch of one) writes its events and
//!   ONE [`SignedCheckpoint`] of the new size (ECDSA P-256 over
//!   `"baton-audit-checkpoint\n{size}\n{root_hex}\n{at}\n"`) in one SQLite
//!   transaction, and each event's [`Receipt`] proves its inclusion in that
//!   checkpoint; older logs with a checkpoint per event verify the same way;
//! - [`AuditLog::verify`] recomputes every leaf, checks the indexes and every
//!   checkpoint, and names the first bad index ([`TamperError`]).
//!
//! What it cannot see alone: deleting the newest events *together with*
//! their checkpoints leaves a shorter log that is consistent. Tree heads
//! kept outside the log catch it ([`witness`]): the log's own head file
//! beside the database, checked at open and by every verify, and witness
//! files an operator keeps elsewhere (`baton audit verify --since FILE`), or
//! a receipt's checkpoint: pass them in [`VerifyOptions::kept`], or check a
//! log you cannot read with [`check_extends`] and a consistency proof.

pub mod error;
pub mod event;
pub mod keys;
mod log;
pub mod merkle;
pub mod proof;
pub mod trace;
pub mod witness;

pub use error::{AuditError, ProofError, TamperError, TamperReason};
pub use event::{
    AuditEvent, AuditRecord, CanonicalError, CanonicalEvent, EventKind, decode_canonical,
};
pub use keys::{AuditKeys, read_public_key};
pub use log::mirror::{Mirror, MirrorError, MirrorLeaf, SharedLog, SharedLogReport, log_id};
pub use log::{
    AppendObserver, AuditLog, Durability, HeadPolicy, LogOptions, SignatureCheck, VerifyOptions,
    VerifyReport,
};
pub use proof::{
    Receipt, ReceiptLeaf, SignedCheckpoint, checkpoint_message, verify_consistency, verify_receipt,
};
pub use trace::{AgentNode, TaskEvent, Trace, TraceItem, trace};
pub use witness::{Kept, Witness, check_extends, head_path, read_witness, write_witness};

#[cfg(test)]
mod tests;
