//! Proof that a task-credential holder has its private key.
//!
//! A delegation token is bound to a certificate (`cnf`), and the
//! certificate is public. Renewing a task credential therefore needs more
//! than the token and the leaf: the holder signs a short statement with the
//! leaf's private key, naming the token (by its digest) and the time, and
//! the broker checks it against the leaf's public key. A leaked token with
//! a copy of the public leaf cannot be renewed into a working credential.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::CaError;

/// Domain separation for renewal proofs.
const RENEW_CONTEXT: &str = "baton-task-renew-v1";

/// What the holder signs: the context, the token's digest and `iat`.
pub fn renew_proof_message(token: &str, iat: u64) -> Vec<u8> {
    format!(
        "{RENEW_CONTEXT}\n{}\n{iat}",
        crate::delegation::token_hash(token)
    )
    .into_bytes()
}

/// Signs a renewal proof with the holder's PKCS#8 P-256 key (fixed-size
/// `r || s`, 64 bytes).
pub fn sign_renew_proof(pkcs8_der: &[u8], token: &str, iat: u64) -> Result<Vec<u8>, CaError> {
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der)
        .map_err(|_| CaError::Crypto("the task key is not a P-256 PKCS#8 key"))?;
    let sig = key
        .sign(&SystemRandom::new(), &renew_proof_message(token, iat))
        .map_err(|_| CaError::Crypto("sign the renewal proof"))?;
    Ok(sig.as_ref().to_vec())
}

/// Checks a renewal proof against the public key of `leaf_der`.
pub fn verify_renew_proof(
    leaf_der: &[u8],
    token: &str,
    iat: u64,
    sig: &[u8],
) -> Result<(), CaError> {
    let (_, cert) = X509Certificate::from_der(leaf_der)
        .map_err(|_| CaError::Crypto("the leaf certificate does not parse"))?;
    let point = cert.public_key().subject_public_key.data.as_ref();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(&renew_proof_message(token, iat), sig)
        .map_err(|_| CaError::Crypto("the renewal proof is not signed by the certificate's key"))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use baton_core::{SpiffeId, TrustDomain};

    use super::*;
    use crate::{Ca, CaConfig, WorkloadKey};

    #[test]
    fn proof_binds_key_token_and_time() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Ca::load_or_create(CaConfig::new(td), SystemTime::now()).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/agents/a").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let other = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign_x509_svid(
                &key.csr_der(&id).unwrap(),
                &id,
                Duration::from_secs(60),
                &[],
                SystemTime::now(),
            )
            .unwrap();
        let leaf = &issued.cert_chain_der[0];
        let sig = sign_renew_proof(key.pkcs8_der(), "tok", 7).unwrap();
        verify_renew_proof(leaf, "tok", 7, &sig).unwrap();
        assert!(verify_renew_proof(leaf, "tok", 8, &sig).is_err());
        assert!(verify_renew_proof(leaf, "other", 7, &sig).is_err());
        let forged = sign_renew_proof(other.pkcs8_der(), "tok", 7).unwrap();
        assert!(verify_renew_proof(leaf, "tok", 7, &forged).is_err());
        assert!(verify_renew_proof(b"junk", "tok", 7, &sig).is_err());
    }
}
