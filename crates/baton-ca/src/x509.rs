//! X.509 parsing shared by the CA and the workload side: CSR checks, the
//! facts an agent reads off a received chain, and the JWK view of a CA
//! certificate's key used by the SPIFFE bundle format.

use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_core::SpiffeId;
use rcgen::{PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber, SignatureAlgorithm};
use serde_json::{Map, Value};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::CaError;
use crate::time_util::from_unix_i64;

/// Length of an uncompressed P-256 point: `0x04 || x || y`.
pub(crate) const P256_POINT_LEN: usize = 65;

/// A P-256 public key taken from a CSR whose self-signature verified.
#[derive(Debug, Clone)]
pub(crate) struct VerifiedCsrKey {
    point: Vec<u8>,
}

impl PublicKeyData for VerifiedCsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Parses a PKCS#10 CSR and checks its proof of possession. Everything the
/// CSR asks for (subject, SANs, usages) is deliberately dropped: the broker,
/// not the requester, decides what goes into an SVID.
pub(crate) fn verify_csr(der: &[u8]) -> Result<VerifiedCsrKey, CaError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CaError::CsrParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::CsrParse(format!(
            "{} trailing bytes after the CSR",
            rest.len()
        )));
    }
    let sig_alg = &csr.signature_algorithm.algorithm;
    if *sig_alg != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CaError::CsrUnsupportedAlgorithm(sig_alg.to_id_string()));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let curve_ok = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == OID_EC_P256);
    let point = spki.subject_public_key.data.as_ref();
    if !curve_ok || point.len() != P256_POINT_LEN || point.first() != Some(&0x04) {
        return Err(CaError::CsrUnsupportedKey);
    }
    csr.verify_signature()
        .map_err(|_| CaError::CsrBadSignature)?;
    Ok(VerifiedCsrKey {
        point: point.to_vec(),
    })
}

/// A fresh positive serial with 127 random bits, and its hex form as
/// [`leaf_info`] reports it (leading zero bytes stripped, as DER does).
pub(crate) fn random_serial() -> Result<(SerialNumber, String), CaError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| CaError::Crypto("random serial"))?;
    // Positive INTEGER: the top bit of a DER integer is its sign.
    bytes[0] &= 0x7f;
    let trimmed = trim_leading_zeros(&bytes);
    Ok((SerialNumber::from_slice(trimmed), hex::encode(trimmed)))
}

fn trim_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    &bytes[start..]
}

/// A loose RFC 1123 check so a typo fails at issuance, not at a TLS peer.
pub(crate) fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// What an agent needs to know about the SVID it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub spiffe_id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lowercase hex, without leading zero bytes.
    pub serial_hex: String,
    /// The signing authority's id (the leaf's authorityKeyIdentifier, hex).
    pub authority_id: Option<String>,
}

/// Parses a DER certificate chain (leaf first) and reads the leaf's SPIFFE
/// ID, validity and serial. It does not verify the chain: that is the TLS
/// verifier's job; this only tells the agent what it was given.
pub fn leaf_info(chain: &[Vec<u8>]) -> Result<LeafInfo, CaError> {
    let leaf = chain.first().ok_or(CaError::EmptyChain)?;
    let cert = parse_cert(leaf)?;
    let uris = uri_sans(&cert)?;
    let [uri] = uris.as_slice() else {
        return Err(CaError::UriSanCount(uris.len()));
    };
    let spiffe_id = SpiffeId::parse(uri)?;
    let validity = cert.validity();
    Ok(LeafInfo {
        spiffe_id,
        not_before: from_unix_i64(validity.not_before.timestamp()),
        not_after: from_unix_i64(validity.not_after.timestamp()),
        serial_hex: hex::encode(trim_leading_zeros(cert.raw_serial())),
        authority_id: crate::authority::authority_key_id(&cert),
    })
}

pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, CaError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CaError::Certificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::Certificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

pub(crate) fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, CaError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::Certificate(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The JWK members (`kty`, `crv`/`x`/`y` or `n`/`e`) describing a
/// certificate's public key, for the SPIFFE bundle's `x509-svid` entries.
/// `None` for key types a JWK cannot describe here (callers then emit only
/// `x5c`).
pub(crate) fn jwk_members_for_cert(der: &[u8]) -> Option<Map<String, Value>> {
    let cert = parse_cert(der).ok()?;
    let spki = cert.public_key();
    let mut m = Map::new();
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            let (crv, width) = if curve == OID_EC_P256 {
                ("P-256", 32)
            } else if curve == OID_NIST_EC_P384 {
                ("P-384", 48)
            } else {
                return None;
            };
            let data = point.data();
            if data.len() != 1 + 2 * width || data.first() != Some(&0x04) {
                return None;
            }
            let (x, y) = data[1..].split_at(width);
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), crv.into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(x).into());
            m.insert("y".into(), URL_SAFE_NO_PAD.encode(y).into());
        }
        PublicKey::RSA(rsa) => {
            m.insert("kty".into(), "RSA".into());
            m.insert(
                "n".into(),
                URL_SAFE_NO_PAD
                    .encode(trim_leading_zeros(rsa.modulus))
                    .into(),
            );
            m.insert(
                "e".into(),
                URL_SAFE_NO_PAD
                    .encode(trim_leading_zeros(rsa.exponent))
                    .into(),
            );
        }
        _ => return None,
    }
    Some(m)
}
