//! The trust bundle of one trust domain and its encodings: the SPIFFE bundle
//! JSON (federation, `standards/SPIFFE_Trust_Domain_and_Bundle.md`), the
//! Workload API's concatenated DER and JWKS, and PEM for bootstrapping.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use baton_core::TrustDomain;
use serde_json::{Map, Value, json};

use crate::CaError;
use crate::x509::{P256_POINT_LEN, jwk_members_for_cert, parse_cert};

const USE_X509: &str = "x509-svid";
const USE_JWT: &str = "jwt-svid";

/// A JWT-SVID signing key as relying parties see it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JwtAuthority {
    pub kid: String,
    /// Uncompressed P-256 point, `0x04 || x || y` (65 bytes).
    pub public_key: Vec<u8>,
}

impl fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl JwtAuthority {
    /// `(x, y)` when `public_key` is a well-formed uncompressed P-256 point.
    fn coordinates(&self) -> Option<(&[u8], &[u8])> {
        match self.public_key.split_first() {
            Some((0x04, xy)) if self.public_key.len() == P256_POINT_LEN => Some(xy.split_at(32)),
            _ => None,
        }
    }

    fn to_jwk(&self) -> Option<Value> {
        let (x, y) = self.coordinates()?;
        Some(json!({
            "use": USE_JWT,
            "kty": "EC",
            "crv": "P-256",
            "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
        }))
    }
}

/// The trust bundle of one trust domain.
///
/// Holds lists of X.509 authorities and JWT keys because a bundle carries
/// the old and the new authority side by side while a CA rotates.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    /// DER CA certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: changes (upwards) whenever the content changes.
    pub sequence: u64,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint_secs: u64,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("trust_domain", &self.trust_domain)
            .field("x509_authorities", &self.x509_authorities.len())
            .field("jwt_authorities", &self.jwt_authorities)
            .field("sequence", &self.sequence)
            .field("refresh_hint_secs", &self.refresh_hint_secs)
            .finish()
    }
}

impl TrustBundle {
    /// The SPIFFE bundle document.
    ///
    /// `x509-svid` keys carry `x5c` (one standard-base64 DER certificate)
    /// and the key's JWK members, no `kid`; `jwt-svid` keys carry `kid`,
    /// `kty`, `crv`, `x`, `y`. A JWT authority whose `public_key` is not a
    /// 65-byte uncompressed point is left out (no parser here produces one).
    pub fn to_spiffe_json(&self) -> Value {
        let mut keys: Vec<Value> = self
            .x509_authorities
            .iter()
            .map(|der| {
                let mut m = jwk_members_for_cert(der).unwrap_or_default();
                m.insert("use".into(), USE_X509.into());
                m.insert("x5c".into(), json!([STANDARD.encode(der)]));
                Value::Object(m)
            })
            .collect();
        keys.extend(self.jwt_authorities.iter().filter_map(JwtAuthority::to_jwk));
        json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_secs,
        })
    }

    /// Parses a SPIFFE bundle document for trust domain `td` (the document
    /// does not name its trust domain: the caller knows where it came from).
    ///
    /// Strict about what it understands: a malformed `x509-svid` or P-256
    /// `jwt-svid` key is an error naming its index and field. As the
    /// standard requires, keys with an unknown `use` or `kty` are ignored;
    /// so are `jwt-svid` keys on curves other than P-256, which Baton
    /// cannot verify (tokens signed by them fail as "unknown kid").
    pub fn from_spiffe_json(td: &TrustDomain, v: &Value) -> Result<TrustBundle, CaError> {
        let obj = v
            .as_object()
            .ok_or_else(|| CaError::Bundle("document is not a JSON object".into()))?;
        let keys = obj
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| CaError::Bundle("missing \"keys\" array".into()))?;
        let sequence = optional_u64(obj, "spiffe_sequence")?;
        let refresh_hint_secs = optional_u64(obj, "spiffe_refresh_hint")?;
        let mut bundle = TrustBundle {
            trust_domain: td.clone(),
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence,
            refresh_hint_secs,
        };
        for (index, key) in keys.iter().enumerate() {
            let bad = |field: &'static str, reason: &str| CaError::BundleKey {
                index,
                field,
                reason: reason.to_owned(),
            };
            let key = key
                .as_object()
                .ok_or_else(|| bad("", "key is not a JSON object"))?;
            let use_ = str_field(key, "use").map_err(|r| bad("use", r))?;
            let kty = str_field(key, "kty").map_err(|r| bad("kty", r))?;
            match use_ {
                USE_X509 => {
                    if let Some(der) = parse_x509_key(key, kty).map_err(|(f, r)| bad(f, &r))? {
                        bundle.x509_authorities.push(der);
                    }
                }
                USE_JWT => {
                    if let Some(a) = parse_jwt_key(key, kty).map_err(|(f, r)| bad(f, &r))? {
                        if bundle.jwt_authorities.iter().any(|b| b.kid == a.kid) {
                            return Err(bad("kid", "duplicate kid"));
                        }
                        bundle.jwt_authorities.push(a);
                    }
                }
                _ => {}
            }
        }
        Ok(bundle)
    }

    /// The X.509 authorities as concatenated DER, the encoding of the
    /// Workload API's `bundle` fields.
    pub fn x509_authorities_concat_der(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT authorities as RFC 7517 JWKS bytes, every key with its `kid`:
    /// what the Workload API's JWT bundle maps carry and what the `spiffe`
    /// crate (`JwtBundle::from_jwt_authorities`) and go-spiffe parse. With
    /// the SPIFFE bundle's `spiffe_sequence`, so that every change of the
    /// CA's keys, a taint included, is a new JWT bundle on the Workload
    /// API's stream: how holders of delegation tokens hear of a taint.
    pub fn jwks_json(&self) -> Vec<u8> {
        let keys: Vec<Value> = self
            .jwt_authorities
            .iter()
            .filter_map(JwtAuthority::to_jwk)
            .collect();
        serde_json::to_vec(&json!({ "keys": keys, "spiffe_sequence": self.sequence }))
            .unwrap_or_default()
    }

    /// The X.509 authorities as PEM `CERTIFICATE` blocks.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for der in &self.x509_authorities {
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = STANDARD.encode(der);
            for line in b64.as_bytes().chunks(64) {
                out.push_str(&String::from_utf8_lossy(line));
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }

    /// Reads X.509 authorities from PEM (every block must be a parseable
    /// `CERTIFICATE`); used to bootstrap an agent's trust in the broker.
    /// The result has no JWT authorities and sequence 0.
    pub fn from_pem(td: &TrustDomain, pem: &str) -> Result<TrustBundle, CaError> {
        let x509_authorities = pem_certificates(pem).map_err(CaError::Pem)?;
        Ok(TrustBundle {
            trust_domain: td.clone(),
            x509_authorities,
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint_secs: 0,
        })
    }
}

/// Every `CERTIFICATE` block of `pem`, in order, each checked to parse;
/// at least one. The error names the block.
pub(crate) fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for (i, block) in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).enumerate() {
        let block = block.map_err(|e| format!("PEM block #{i}: {e}"))?;
        if block.label != "CERTIFICATE" {
            return Err(format!(
                "PEM block #{i} is {:?}, expected CERTIFICATE",
                block.label
            ));
        }
        parse_cert(&block.contents).map_err(|e| format!("PEM block #{i}: {e}"))?;
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(out)
}

fn optional_u64(obj: &Map<String, Value>, field: &str) -> Result<u64, CaError> {
    match obj.get(field) {
        None => Ok(0),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| CaError::Bundle(format!("{field:?} must be a non-negative integer"))),
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a str, &'static str> {
    match obj.get(field) {
        None => Err("missing"),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err("must be a string"),
    }
}

type KeyResult<T> = Result<Option<T>, (&'static str, String)>;

fn parse_x509_key(key: &Map<String, Value>, kty: &str) -> KeyResult<Vec<u8>> {
    if !matches!(kty, "EC" | "RSA") {
        return Ok(None);
    }
    let x5c = key
        .get("x5c")
        .and_then(Value::as_array)
        .ok_or(("x5c", "missing or not an array".to_owned()))?;
    let [cert] = x5c.as_slice() else {
        return Err((
            "x5c",
            format!("must hold exactly one certificate, has {}", x5c.len()),
        ));
    };
    let der = cert
        .as_str()
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or(("x5c", "not standard base64".to_owned()))?;
    parse_cert(&der).map_err(|e| ("x5c", e.to_string()))?;
    // Members that describe the key must agree with the certificate.
    let expected = jwk_members_for_cert(&der).ok_or((
        "x5c",
        "certificate key is not a supported EC or RSA key".to_owned(),
    ))?;
    for (name, want) in &expected {
        if key.get(name).is_some_and(|got| got != want) {
            let field = match name.as_str() {
                "kty" => "kty",
                "crv" => "crv",
                "x" => "x",
                "y" => "y",
                "n" => "n",
                _ => "e",
            };
            return Err((field, "does not match the certificate in x5c".to_owned()));
        }
    }
    Ok(Some(der))
}

fn parse_jwt_key(key: &Map<String, Value>, kty: &str) -> KeyResult<JwtAuthority> {
    if kty != "EC" {
        return Ok(None);
    }
    let crv = str_field(key, "crv").map_err(|r| ("crv", r.to_owned()))?;
    if crv != "P-256" {
        return Ok(None);
    }
    let kid = str_field(key, "kid").map_err(|r| ("kid", r.to_owned()))?;
    if kid.is_empty() {
        return Err(("kid", "empty".to_owned()));
    }
    let coord = |field: &'static str| -> Result<Vec<u8>, (&'static str, String)> {
        let s = str_field(key, field).map_err(|r| (field, r.to_owned()))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| (field, "not unpadded base64url".to_owned()))?;
        if bytes.len() != 32 {
            return Err((field, format!("is {} bytes, P-256 needs 32", bytes.len())));
        }
        Ok(bytes)
    };
    let mut public_key = Vec::with_capacity(P256_POINT_LEN);
    public_key.push(0x04);
    public_key.extend(coord("x")?);
    public_key.extend(coord("y")?);
    Ok(Some(JwtAuthority {
        kid: kid.to_owned(),
        public_key,
    }))
}
