//! Signed checkpoints, receipts and their offline verification.
//!
//! A checkpoint signs the byte string
//!
//! ```text
//! baton-audit-checkpoint\n{size}\n{root_hex}\n{at}\n
//! ```
//!
//! (`size` and `at` in decimal, `root_hex` lowercase) with ECDSA P-256
//! SHA-256; the signature is ASN.1 DER, base64 (standard alphabet, padded).
//! The same check therefore works with `openssl dgst -sha256 -verify`.
//! Public keys are accepted as the 65-byte uncompressed point or as P-256
//! SubjectPublicKeyInfo DER.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::error::ProofError;
use crate::keys::P256_SPKI_PREFIX;
use crate::merkle::{self, Hash};

/// A signed tree head: the root of the first `size` events at time `at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCheckpoint {
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub root_hash: String,
    /// Unix seconds: the newest event time of the batch that made this
    /// size, never earlier than the previous checkpoint's.
    pub at: u64,
    /// Base64 ASN.1 DER ECDSA P-256 SHA-256 over [`checkpoint_message`].
    pub signature: String,
}

/// The exact bytes a checkpoint signature covers.
pub fn checkpoint_message(size: u64, root_hex: &str, at: u64) -> Vec<u8> {
    format!("baton-audit-checkpoint\n{size}\n{root_hex}\n{at}\n").into_bytes()
}

impl SignedCheckpoint {
    /// Checks the signature under `public_key` and returns the decoded root.
    pub fn verify(&self, public_key: &[u8]) -> Result<Hash, ProofError> {
        let (root, msg, sig) = self.parts()?;
        verify_signature(public_point(public_key)?, &msg, &sig)?;
        Ok(root)
    }

    /// The decoded root, the signed message and the raw signature.
    pub(crate) fn parts(&self) -> Result<(Hash, Vec<u8>, Vec<u8>), ProofError> {
        let root = parse_hash(&self.root_hash, "checkpoint root")?;
        // Only lowercase hex is canonical: the signed message spells it so.
        if self.root_hash.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ProofError::BadHash {
                what: "checkpoint root (not lowercase)".into(),
            });
        }
        let sig = B64
            .decode(self.signature.as_bytes())
            .map_err(|_| ProofError::BadSignatureEncoding)?;
        Ok((
            root,
            checkpoint_message(self.size, &self.root_hash, self.at),
            sig,
        ))
    }
}

/// ECDSA P-256 SHA-256 (ASN.1 DER signature) check against an uncompressed point.
pub(crate) fn verify_signature(point: &[u8], msg: &[u8], sig: &[u8]) -> Result<(), ProofError> {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
        .verify(msg, sig)
        .map_err(|_| ProofError::BadSignature)
}

/// Proof that one event is in the log: its index and leaf hash, a signed
/// checkpoint of the log just after it was appended, and the inclusion path
/// from the leaf to that checkpoint's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub index: u64,
    /// Lowercase hex `SHA-256(0x00 || canonical event bytes)`.
    pub leaf_hash: String,
    pub checkpoint: SignedCheckpoint,
    /// Lowercase hex hashes, leaf-most first (RFC 9162 §2.1.3.1).
    pub inclusion_proof: Vec<String>,
}

/// What the verifier of a receipt knows about the event.
#[derive(Debug, Clone, Copy)]
pub enum ReceiptLeaf<'a> {
    /// The canonical event bytes (the leaf hash is computed from them).
    Canonical(&'a [u8]),
    /// The leaf hash, computed elsewhere.
    Hash(&'a Hash),
}

/// Offline check of a receipt: the leaf matches, the inclusion path leads to
/// the checkpoint's root, and the checkpoint is signed by `public_key`.
pub fn verify_receipt(
    receipt: &Receipt,
    leaf: ReceiptLeaf<'_>,
    public_key: &[u8],
) -> Result<(), ProofError> {
    let root = receipt.checkpoint.verify(public_key)?;
    let claimed = parse_hash(&receipt.leaf_hash, "receipt leaf hash")?;
    let actual = match leaf {
        ReceiptLeaf::Canonical(bytes) => merkle::leaf_hash(bytes),
        ReceiptLeaf::Hash(h) => *h,
    };
    if claimed != actual {
        return Err(ProofError::LeafMismatch);
    }
    let path = parse_hashes(&receipt.inclusion_proof)?;
    merkle::verify_inclusion(
        &actual,
        receipt.index,
        receipt.checkpoint.size,
        &path,
        &root,
    )
}

/// Offline check that `new` extends `old`: both signatures, then the RFC 9162
/// §2.1.4.2 consistency proof (lowercase hex hashes).
pub fn verify_consistency(
    old: &SignedCheckpoint,
    new: &SignedCheckpoint,
    proof: &[String],
    public_key: &[u8],
) -> Result<(), ProofError> {
    let old_root = old.verify(public_key)?;
    let new_root = new.verify(public_key)?;
    let path = parse_hashes(proof)?;
    merkle::verify_consistency(old.size, &old_root, new.size, &new_root, &path)
}

pub(crate) fn parse_hash(s: &str, what: &str) -> Result<Hash, ProofError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| ProofError::BadHash {
        what: what.to_owned(),
    })?;
    Ok(out)
}

fn parse_hashes(v: &[String]) -> Result<Vec<Hash>, ProofError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| parse_hash(s, &format!("proof hash #{i}")))
        .collect()
}

/// The uncompressed point inside either accepted public key form.
pub(crate) fn public_point(public_key: &[u8]) -> Result<&[u8], ProofError> {
    let point = match public_key.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(p) => p,
        None => public_key,
    };
    if point.len() == 65 && point.first() == Some(&0x04) {
        Ok(point)
    } else {
        Err(ProofError::BadPublicKey)
    }
}

pub(crate) fn hex_all(v: &[Hash]) -> Vec<String> {
    v.iter().map(|h| to_hex(h)).collect()
}

/// Lowercase hex (the `hex` crate's encoder goes char by char; this is on
/// the append path several times per event).
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    // Only ASCII digits were pushed.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn to_hex_matches_the_hex_crate() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(super::to_hex(&bytes), hex::encode(&bytes));
    }
}
