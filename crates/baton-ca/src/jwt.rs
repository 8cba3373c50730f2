//! JWT-SVIDs (`standards/JWT-SVID.md`): the CA's ES256 signer and the
//! validator that relying parties (the node daemon's `ValidateJWTSVID`, the
//! broker's own endpoints) run against trust bundles.
//!
//! Validation policy, in order: compact JWS with three parts; `alg` must be
//! `ES256` (`none`, `HS*` and everything else are refused by name, before
//! any key is touched, so a public key can never be used as an HMAC
//! secret); `kid` required; `typ`, when present, `JWT` or `JOSE`; `sub` a
//! SPIFFE ID whose trust domain selects the bundle; `kid` known in that
//! bundle; signature; `exp` required with **no leeway** (`now >= exp` is
//! expired, as in the `spiffe` crate); `nbf`, when present, `now >= nbf`;
//! `aud` (string or array) must contain the expected audience.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_core::{SpiffeId, SpiffeIdError, TrustDomain};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value, json};

use crate::bundle::{JwtAuthority, TrustBundle};
use crate::{CaError, init};

/// Why a token is not a valid JWT-SVID for this audience. Each check has
/// its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a well-formed compact JWS: {0}")]
    Malformed(&'static str),
    #[error(
        "token signature is not in canonical low-S form (a re-encoded copy of another signature)"
    )]
    NonCanonicalSignature,
    #[error("token uses alg \"none\" (unsigned); JWT-SVIDs must be signed")]
    AlgNone,
    #[error("token uses symmetric alg {0:?}; JWT-SVIDs are signed with a public-key algorithm")]
    SymmetricAlgorithm(String),
    #[error("token uses alg {0:?}; only ES256 is accepted")]
    UnsupportedAlgorithm(String),
    #[error("token header has no \"kid\"")]
    MissingKid,
    #[error("token header typ {0:?} is neither \"JWT\" nor \"JOSE\"")]
    BadType(String),
    #[error("token has no \"sub\" claim")]
    MissingSubject,
    #[error("token \"sub\" is not a SPIFFE ID: {0}")]
    InvalidSubject(SpiffeIdError),
    #[error("no trust bundle for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error("key id {kid:?} is not in the bundle of trust domain {trust_domain}")]
    UnknownKid {
        kid: String,
        trust_domain: TrustDomain,
    },
    #[error("bundle key {0:?} is not a usable P-256 public key")]
    BadAuthorityKey(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has no numeric \"exp\" claim")]
    MissingExpiry,
    #[error("token expired at unix time {exp}")]
    Expired { exp: u64 },
    #[error("token is not valid before unix time {nbf}")]
    NotYetValid { nbf: u64 },
    #[error("token has no \"aud\" claim")]
    MissingAudience,
    #[error("token audience does not include {expected:?}")]
    AudienceMismatch { expected: String },
}

/// A JWT-SVID that passed every check of [`validate_jwt_svid`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedJwt {
    pub spiffe_id: SpiffeId,
    pub claims: Map<String, Value>,
    pub expires_at: SystemTime,
}

/// Validates a JWT-SVID; see the module documentation for the exact policy.
pub fn validate_jwt_svid(
    token: &str,
    audience: &str,
    bundles: &[TrustBundle],
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    // Verification goes through jsonwebtoken's process-wide provider; make
    // sure one is installed even if the caller forgot `baton_ca::init()`.
    init();
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let header = decode_object(header_b64, "header")?;
    match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => {}
        Some(alg) if alg.eq_ignore_ascii_case("none") => return Err(JwtError::AlgNone),
        Some(alg) if alg.starts_with("HS") => {
            return Err(JwtError::SymmetricAlgorithm(alg.to_owned()));
        }
        Some(alg) => return Err(JwtError::UnsupportedAlgorithm(alg.to_owned())),
        None => return Err(JwtError::Malformed("header has no string \"alg\"")),
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or(JwtError::MissingKid)?;
    if let Some(typ) = header.get("typ") {
        match typ.as_str() {
            Some("JWT" | "JOSE") => {}
            _ => return Err(JwtError::BadType(typ.to_string())),
        }
    }

    let claims = decode_object(payload_b64, "payload")?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingSubject)?;
    let spiffe_id = SpiffeId::parse(sub).map_err(JwtError::InvalidSubject)?;
    let td = spiffe_id.trust_domain();
    let bundle = bundles
        .iter()
        .find(|b| &b.trust_domain == td)
        .ok_or_else(|| JwtError::NoBundle(td.clone()))?;
    let authority = bundle
        .jwt_authorities
        .iter()
        .find(|a| a.kid == kid)
        .ok_or_else(|| JwtError::UnknownKid {
            kid: kid.to_owned(),
            trust_domain: td.clone(),
        })?;

    // The signed message is the first two parts exactly as received.
    let message_len = header_b64.len() + 1 + payload_b64.len();
    let message = token.as_bytes().get(..message_len).unwrap_or_default();
    let key = DecodingKey::from_ec_der(&authority.public_key);
    match jsonwebtoken::crypto::verify(sig_b64, message, &key, Algorithm::ES256) {
        Ok(true) => {
            // One token, one encoding: the high-S twin of a valid signature
            // is refused, so a revocation keyed by the token's digest holds.
            let raw = URL_SAFE_NO_PAD
                .decode(sig_b64)
                .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
            if !crate::ecdsa::is_low_s(&raw) {
                return Err(JwtError::NonCanonicalSignature);
            }
        }
        Ok(false) => return Err(JwtError::BadSignature),
        Err(e) => {
            return Err(match e.kind() {
                ErrorKind::Base64(_) => JwtError::Malformed("signature is not base64url"),
                ErrorKind::InvalidSignature => JwtError::BadSignature,
                _ => JwtError::BadAuthorityKey(authority.kid.clone()),
            });
        }
    }

    let exp = claims
        .get("exp")
        .and_then(numeric_date)
        .ok_or(JwtError::MissingExpiry)?;
    if now >= exp {
        return Err(JwtError::Expired {
            exp: crate::time_util::unix_secs(exp),
        });
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = numeric_date(nbf).ok_or(JwtError::Malformed("\"nbf\" is not a number"))?;
        if now < nbf {
            return Err(JwtError::NotYetValid {
                nbf: crate::time_util::unix_secs(nbf),
            });
        }
    }
    let audience_ok = match claims.get("aud") {
        None => return Err(JwtError::MissingAudience),
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(items)) => items.iter().any(|a| a.as_str() == Some(audience)),
        Some(_) => {
            return Err(JwtError::Malformed(
                "\"aud\" is neither a string nor an array",
            ));
        }
    };
    if !audience_ok {
        return Err(JwtError::AudienceMismatch {
            expected: audience.to_owned(),
        });
    }
    Ok(ValidatedJwt {
        spiffe_id,
        claims,
        expires_at: exp,
    })
}

/// The `kid` of a compact JWS's header, without verifying anything: which
/// key a token names (to track or drop tokens per key), never whether to
/// trust it.
pub fn header_kid(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(header).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("kid")?.as_str().map(str::to_owned)
}

fn decode_object(part: &str, what: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        JwtError::Malformed(if what == "header" {
            "header is not unpadded base64url"
        } else {
            "payload is not unpadded base64url"
        })
    })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed(if what == "header" {
            "header is not a JSON object"
        } else {
            "payload is not a JSON object"
        })),
    }
}

/// RFC 7519 NumericDate: seconds since the epoch, possibly fractional.
fn numeric_date(v: &Value) -> Option<SystemTime> {
    let secs = v.as_f64()?;
    let d = Duration::try_from_secs_f64(secs).ok()?;
    UNIX_EPOCH.checked_add(d)
}

/// The CA's ES256 signing key. The parsed key pair and the encoded header
/// are built once, so signing costs one ECDSA signature and two base64
/// encodings.
pub(crate) struct JwtSigningKey {
    kid: String,
    pub(crate) key_pair: EcdsaKeyPair,
    public_key: Vec<u8>,
    header_b64: String,
}

impl fmt::Debug for JwtSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtSigningKey {
    pub(crate) fn generate_pkcs8() -> Result<Vec<u8>, CaError> {
        let doc = EcdsaKeyPair::generate_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .map_err(|_| CaError::Crypto("generate JWT signing key"))?;
        Ok(doc.as_ref().to_vec())
    }

    pub(crate) fn from_pkcs8(der: &[u8]) -> Result<Self, CaError> {
        let key_pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| CaError::Crypto("JWT signing key is not a P-256 PKCS#8 key"))?;
        let public_key = key_pair.public_key().as_ref().to_vec();
        // The kid is derived from the key, so a reloaded key keeps its kid
        // without storing it.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public_key);
        let kid = URL_SAFE_NO_PAD.encode(digest.as_ref().get(..16).unwrap_or_default());
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        Ok(Self {
            kid,
            key_pair,
            public_key,
            header_b64,
        })
    }

    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    pub(crate) fn authority(&self) -> JwtAuthority {
        JwtAuthority {
            kid: self.kid.clone(),
            public_key: self.public_key.clone(),
        }
    }

    pub(crate) fn sign(&self, claims: &Value) -> Result<String, CaError> {
        let mut token = String::with_capacity(512);
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims.to_string(), &mut token);
        let sig = self
            .key_pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), token.as_bytes())
            .map_err(|_| CaError::Crypto("sign JWT-SVID"))?;
        let mut sig = sig.as_ref().to_vec();
        crate::ecdsa::to_low_s(&mut sig);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&sig, &mut token);
        Ok(token)
    }
}
