//! Initiating identities: OIDC ID tokens verified against the JWKS of a
//! configured issuer. `baton dev` ships a local dev issuer so tasks can be
//! started offline; production brokers list their IdPs with a JWKS file.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why an ID token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error("id_token is not a JWT: {0}")]
    Malformed(String),
    #[error("id_token issuer \"{}\" is not a configured OIDC issuer", .0.escape_debug())]
    UnknownIssuer(String),
    #[error("id_token key id \"{}\" is not in the issuer's JWKS", .0.escape_debug())]
    UnknownKey(String),
    #[error("id_token uses algorithm {0}; only RS256 and ES256 are accepted")]
    Algorithm(String),
    #[error("id_token signature or claims are invalid: {0}")]
    Invalid(String),
    #[error("id_token has expired")]
    Expired,
    #[error("id_token audience does not include \"{}\"", .0.escape_debug())]
    Audience(String),
    #[error("cannot load the issuer's JWKS: {0}")]
    Jwks(String),
}

/// The verified initiating identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiator {
    pub sub: String,
    pub iss: String,
    /// When the ID token expires (unix seconds).
    pub exp: u64,
    /// base64url SHA-256 of the token's signed part (header and payload):
    /// the same for every re-encoding of its signature, so a replay of
    /// the token is recognised whatever its signature bytes.
    pub replay_key: String,
}

#[derive(Debug, Deserialize)]
struct IdClaims {
    iss: String,
    sub: String,
    exp: u64,
    aud: Audience,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// One trusted OIDC issuer.
#[derive(Debug, Clone)]
pub struct OidcIssuer {
    pub issuer: String,
    pub audience: String,
    jwks: JwkSet,
}

impl OidcIssuer {
    pub fn from_jwks(issuer: &str, audience: &str, jwks_json: &str) -> Result<Self, OidcError> {
        let jwks: JwkSet =
            serde_json::from_str(jwks_json).map_err(|e| OidcError::Jwks(e.to_string()))?;
        Ok(Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks,
        })
    }
}

/// Verifies ID tokens from any of the configured issuers.
#[derive(Debug, Clone, Default)]
pub struct OidcVerifier {
    issuers: Vec<OidcIssuer>,
}

impl OidcVerifier {
    pub fn new(issuers: Vec<OidcIssuer>) -> Self {
        Self { issuers }
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Verifies signature, issuer, audience and expiry (`now` in unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Initiator, OidcError> {
        baton_ca::init();
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| OidcError::Malformed(e.to_string()))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            // The algorithm's registered name (`HS256`...), as it is serialised.
            let name = serde_json::to_value(header.alg)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".to_owned());
            return Err(OidcError::Algorithm(name));
        }
        // Read the issuer before verifying, only to pick the right JWKS.
        let payload = token
            .split('.')
            .nth(1)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|p| serde_json::from_slice::<IdClaims>(&p).ok())
            .ok_or_else(|| OidcError::Malformed("payload is not JSON claims".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == payload.iss)
            .ok_or_else(|| OidcError::UnknownIssuer(payload.iss.clone()))?;
        let kid = header.kid.clone().unwrap_or_default();
        let jwk = issuer
            .jwks
            .find(&kid)
            .ok_or_else(|| OidcError::UnknownKey(kid.clone()))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| OidcError::Jwks(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        // Expiry is checked below against the `now` we were given.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        validation.set_issuer(&[&issuer.issuer]);
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
            .map_err(|e| OidcError::Invalid(e.to_string()))?;
        let claims = data.claims;
        if now >= claims.exp {
            return Err(OidcError::Expired);
        }
        let aud_ok = match &claims.aud {
            Audience::One(a) => a == &issuer.audience,
            Audience::Many(v) => v.iter().any(|a| a == &issuer.audience),
        };
        if !aud_ok {
            return Err(OidcError::Audience(issuer.audience.clone()));
        }
        if claims.sub.is_empty() {
            return Err(OidcError::Invalid("empty sub".into()));
        }
        let signed = token.rsplit_once('.').map_or(token, |(signed, _)| signed);
        Ok(Initiator {
            sub: claims.sub,
            iss: claims.iss,
            exp: claims.exp,
            replay_key: URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                signed.as_bytes(),
            )),
        })
    }
}

/// The local OIDC issuer of `baton dev`: an in-memory P-256 key that mints
/// ID tokens for any user name. Never enable it in production.
#[derive(Clone)]
pub struct DevIssuer {
    key: EncodingKey,
    jwk: Jwk,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevIssuer { key: \"...\" }")
    }
}

/// The dev issuer's name and the audience its tokens carry.
pub const DEV_ISSUER: &str = "https://baton.dev.invalid/oidc";
pub const DEV_AUDIENCE: &str = "baton";
const DEV_KID: &str = "baton-dev-1";

#[derive(Serialize)]
struct DevClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    /// Random: two tokens minted in the same second differ.
    jti: String,
}

impl DevIssuer {
    pub fn generate() -> Result<Self, OidcError> {
        let key = baton_ca::WorkloadKey::generate().map_err(|e| OidcError::Jwks(e.to_string()))?;
        let raw = key.public_key_raw();
        if raw.len() != 65 {
            return Err(OidcError::Jwks("unexpected public key encoding".into()));
        }
        let jwk_json = serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": DEV_KID,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        });
        let jwk: Jwk =
            serde_json::from_value(jwk_json).map_err(|e| OidcError::Jwks(e.to_string()))?;
        Ok(Self {
            key: EncodingKey::from_ec_der(key.pkcs8_der()),
            jwk,
        })
    }

    pub fn jwks_json(&self) -> String {
        serde_json::json!({ "keys": [self.jwk] }).to_string()
    }

    pub fn issuer(&self) -> Result<OidcIssuer, OidcError> {
        OidcIssuer::from_jwks(DEV_ISSUER, DEV_AUDIENCE, &self.jwks_json())
    }

    /// An ID token for `user`, valid for `ttl_secs`.
    pub fn mint(&self, user: &str, ttl_secs: u64, now: u64) -> Result<String, OidcError> {
        baton_ca::init();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(DEV_KID.into());
        let exp = now.checked_add(ttl_secs).ok_or_else(|| {
            OidcError::Invalid(format!(
                "ttl_secs {ttl_secs} is too large: the token would expire past the end of time"
            ))
        })?;
        let claims = DevClaims {
            iss: DEV_ISSUER,
            sub: user,
            aud: DEV_AUDIENCE,
            iat: now,
            exp,
            jti: crate::service::random_hex::<16>()
                .map_err(|e| OidcError::Invalid(format!("no randomness for jti: {e}")))?,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| OidcError::Invalid(e.to_string()))
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_tokens_verify_and_fail_properly() {
        let dev = DevIssuer::generate().unwrap();
        let v = OidcVerifier::new(vec![dev.issuer().unwrap()]);
        let t = dev.mint("alice@example.com", 60, 1000).unwrap();
        assert_eq!(v.verify(&t, 1000).unwrap().sub, "alice@example.com");
        assert_eq!(v.verify(&t, 1060), Err(OidcError::Expired));
        let other = DevIssuer::generate().unwrap();
        let forged = other.mint("mallory", 60, 1000).unwrap();
        assert!(matches!(
            v.verify(&forged, 1000),
            Err(OidcError::Invalid(_))
        ));
        assert!(matches!(
            v.verify("x.y.z", 1000),
            Err(OidcError::Malformed(_))
        ));
        // Regression (found by the fuzz tests): a huge TTL overflowed `now + ttl`.
        assert!(matches!(
            dev.mint("alice", u64::MAX, 1000),
            Err(OidcError::Invalid(m)) if m.contains("ttl_secs")
        ));
        let none = OidcVerifier::default();
        assert!(matches!(
            none.verify(&t, 1000),
            Err(OidcError::UnknownIssuer(_))
        ));
    }
}
