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
    #[error(
        "id_token is not valid before {nbf} (now {now}, {NBF_LEEWAY_SECS} s of clock leeway allowed)"
    )]
    NotYetValid { nbf: u64, now: u64 },
    #[error("id_token header typ \"{}\" names another kind of token; an ID token has typ JWT or none", .0.escape_debug())]
    Type(String),
    #[error("id_token authorized party (azp) {}; it must be \"{}\"", .found, .expected.escape_debug())]
    AuthorizedParty { found: String, expected: String },
    #[error("cannot load the issuer's JWKS: {0}")]
    Jwks(String),
}

/// How long past its expiry an ID token's single use is remembered: longer
/// than any clock difference between brokers sharing a datastore (or a
/// clock stepped back), so that no broker forgets a token another one
/// still accepts.
pub const REPLAY_MARGIN_SECS: u64 = 600;

/// How far ahead of ours an IdP's clock may be: an ID token whose `nbf` is
/// at most this far in the future is accepted.
pub const NBF_LEEWAY_SECS: u64 = 60;

impl Initiator {
    /// Until when the token's use must be remembered (unix seconds).
    pub fn replay_until(&self) -> u64 {
        self.exp.saturating_add(REPLAY_MARGIN_SECS)
    }
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
    /// The token's `email`, if any, and its `email_verified`.
    pub email: Option<String>,
    pub email_verified: bool,
    /// The token's `groups` claim (empty when absent), for the admission
    /// policy.
    pub groups: Vec<String>,
}

/// The most groups an ID token may carry (a bound on what each task start
/// costs the policy engine).
pub const MAX_GROUPS: usize = 256;

#[derive(Debug, Deserialize)]
struct IdClaims {
    iss: String,
    sub: String,
    exp: u64,
    aud: Audience,
    #[serde(default)]
    nbf: Option<u64>,
    /// The authorized party: the client the token was issued to.
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    email: Option<String>,
    /// A boolean, or (as some IdPs send it) the string "true"/"false".
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    /// A list of strings; some IdPs send a single group as a string.
    #[serde(default)]
    groups: Option<serde_json::Value>,
}

impl IdClaims {
    /// `email_verified`, read strictly: anything but true (or "true") is false.
    fn email_verified(&self) -> bool {
        match &self.email_verified {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s == "true",
            _ => false,
        }
    }

    /// The `groups` claim; a claim of another shape refuses the token
    /// rather than reading it as "no groups" (a policy may forbid by group).
    fn groups(&self) -> Result<Vec<String>, OidcError> {
        let bad = |why: &str| OidcError::Invalid(format!("groups claim {why}"));
        let groups = match &self.groups {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(g)) => vec![g.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|g| g.as_str().map(str::to_owned))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| bad("must be a list of strings"))?,
            Some(_) => return Err(bad("must be a list of strings")),
        };
        if groups.len() > MAX_GROUPS {
            return Err(bad(&format!(
                "has {} entries; at most {MAX_GROUPS} are accepted",
                groups.len()
            )));
        }
        Ok(groups)
    }
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
    /// The file its JWKS was read from, read again on a reload
    /// ([`OidcIssuer::reread`]); `None` for a JWKS given in memory.
    source: Option<std::path::PathBuf>,
}

impl OidcIssuer {
    pub fn from_jwks(issuer: &str, audience: &str, jwks_json: &str) -> Result<Self, OidcError> {
        let jwks: JwkSet =
            serde_json::from_str(jwks_json).map_err(|e| OidcError::Jwks(e.to_string()))?;
        Ok(Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks,
            source: None,
        })
    }

    /// The issuer whose keys are in the JWKS file `path`. Whoever can
    /// write that file names the keys every initiator's ID token is
    /// checked against: a file every user can write is refused.
    pub fn from_jwks_file(
        issuer: &str,
        audience: &str,
        path: &std::path::Path,
    ) -> Result<Self, OidcError> {
        use std::io::Read as _;
        use std::os::unix::fs::PermissionsExt as _;
        let cannot =
            |e: std::io::Error| OidcError::Jwks(format!("cannot read {}: {e}", path.display()));
        // The mode and the keys of one file: opened once.
        let mut file = std::fs::File::open(path).map_err(cannot)?;
        let mode = file.metadata().map_err(cannot)?.permissions().mode();
        if mode & 0o002 != 0 {
            return Err(OidcError::Jwks(format!(
                "{} is writable by every user (mode {:o}), so anyone could add a signing key; run `chmod o-w` on it",
                path.display(),
                mode & 0o777
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(cannot)?;
        let mut read = Self::from_jwks(issuer, audience, &text)
            .map_err(|e| OidcError::Jwks(format!("{}: {e}", path.display())))?;
        read.source = Some(path.to_owned());
        Ok(read)
    }

    /// The file this issuer's JWKS is read from, if any.
    pub fn source(&self) -> Option<&std::path::Path> {
        self.source.as_deref()
    }

    /// This issuer with its JWKS read again from its file (itself when it
    /// has none): an IdP's rotated or withdrawn keys, on a reload.
    pub fn reread(&self) -> Result<Self, OidcError> {
        match &self.source {
            Some(path) => Self::from_jwks_file(&self.issuer, &self.audience, path),
            None => Ok(self.clone()),
        }
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

    /// The trusted issuers, in the order they are tried.
    pub fn issuers(&self) -> &[OidcIssuer] {
        &self.issuers
    }

    /// Every issuer with its JWKS read again from its file
    /// ([`OidcIssuer::reread`]); all or nothing: one file that fails
    /// fails the whole, and the keys in force stay.
    pub fn reread(&self) -> Result<Self, OidcError> {
        let issuers = self
            .issuers
            .iter()
            .map(|i| {
                i.reread().map_err(|e| match e {
                    OidcError::Jwks(why) => OidcError::Jwks(format!("issuer {}: {why}", i.issuer)),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { issuers })
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
        // An access token, a logout token or a security event signed by
        // the same IdP key is not an ID token (RFC 8725 section 3.11).
        if let Some(typ) = &header.typ
            && !["jwt", "application/jwt"].contains(&typ.to_ascii_lowercase().as_str())
        {
            return Err(OidcError::Type(typ.clone()));
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
        if let Some(nbf) = claims.nbf
            && nbf > now.saturating_add(NBF_LEEWAY_SECS)
        {
            return Err(OidcError::NotYetValid { nbf, now });
        }
        let aud_ok = match &claims.aud {
            Audience::One(a) => a == &issuer.audience,
            Audience::Many(v) => v.iter().any(|a| a == &issuer.audience),
        };
        if !aud_ok {
            return Err(OidcError::Audience(issuer.audience.clone()));
        }
        // OpenID Connect Core 3.1.3.7: a token for several audiences must
        // name us as its authorized party, and one that names a party
        // names us; else it was issued to another client, which may
        // replay it here.
        let several = matches!(&claims.aud, Audience::Many(v) if v.len() > 1);
        match &claims.azp {
            Some(azp) if azp != &issuer.audience => {
                return Err(OidcError::AuthorizedParty {
                    found: format!("is \"{}\"", azp.escape_debug()),
                    expected: issuer.audience.clone(),
                });
            }
            None if several => {
                return Err(OidcError::AuthorizedParty {
                    found: "is missing from a token for several audiences".into(),
                    expected: issuer.audience.clone(),
                });
            }
            _ => {}
        }
        if claims.sub.is_empty() {
            return Err(OidcError::Invalid("empty sub".into()));
        }
        let groups = claims.groups()?;
        let email_verified = claims.email_verified();
        let signed = token.rsplit_once('.').map_or(token, |(signed, _)| signed);
        Ok(Initiator {
            email: claims.email,
            email_verified,
            groups,
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
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
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
        self.mint_with_groups(user, &[], ttl_secs, now)
    }

    /// An ID token for `user` whose `groups` claim lists `groups` (none
    /// when empty), valid for `ttl_secs`.
    pub fn mint_with_groups(
        &self,
        user: &str,
        groups: &[String],
        ttl_secs: u64,
        now: u64,
    ) -> Result<String, OidcError> {
        baton_ca::init();
        if groups.len() > MAX_GROUPS {
            return Err(OidcError::Invalid(format!(
                "{} groups; at most {MAX_GROUPS} are accepted",
                groups.len()
            )));
        }
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
            jti: crate::error::random_hex::<16>()
                .map_err(|e| OidcError::Invalid(format!("no randomness for jti: {e}")))?,
            groups,
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

    impl DevIssuer {
        /// A token of the dev key with these header `typ` and claims.
        fn sign(&self, typ: Option<&str>, claims: &serde_json::Value) -> String {
            let mut header = Header::new(Algorithm::ES256);
            header.kid = Some(DEV_KID.into());
            header.typ = typ.map(str::to_owned);
            jsonwebtoken::encode(&header, claims, &self.key).unwrap()
        }
    }

    /// An ID token's claims that verify at `now` 1000, with `extra` set
    /// (a null removes a claim).
    fn claims_with(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "iss": DEV_ISSUER, "sub": "alice", "aud": DEV_AUDIENCE, "iat": 1000, "exp": 1060,
        });
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        v
    }

    #[test]
    fn a_token_not_yet_valid_is_refused_past_the_leeway() {
        let dev = DevIssuer::generate().unwrap();
        let v = OidcVerifier::new(vec![dev.issuer().unwrap()]);
        let at = |nbf: u64| dev.sign(Some("JWT"), &claims_with(serde_json::json!({"nbf": nbf})));
        // Control: valid now, and within the leeway of an IdP clock ahead.
        assert!(v.verify(&at(1000), 1000).is_ok());
        assert!(v.verify(&at(1000 + NBF_LEEWAY_SECS), 1000).is_ok());
        assert_eq!(
            v.verify(&at(1001 + NBF_LEEWAY_SECS), 1000),
            Err(OidcError::NotYetValid {
                nbf: 1001 + NBF_LEEWAY_SECS,
                now: 1000
            })
        );
    }

    #[test]
    fn a_token_of_another_kind_signed_by_the_idp_is_refused() {
        let dev = DevIssuer::generate().unwrap();
        let v = OidcVerifier::new(vec![dev.issuer().unwrap()]);
        let claims = claims_with(serde_json::json!({}));
        for ok in [None, Some("JWT"), Some("jwt"), Some("application/jwt")] {
            assert!(v.verify(&dev.sign(ok, &claims), 1000).is_ok(), "{ok:?}");
        }
        for kind in ["at+jwt", "application/at+JWT", "logout+jwt", "secevent+jwt"] {
            assert_eq!(
                v.verify(&dev.sign(Some(kind), &claims), 1000),
                Err(OidcError::Type(kind.to_owned()))
            );
        }
    }

    #[test]
    fn a_token_issued_to_another_client_is_refused() {
        let dev = DevIssuer::generate().unwrap();
        let v = OidcVerifier::new(vec![dev.issuer().unwrap()]);
        let verify = |extra| v.verify(&dev.sign(None, &claims_with(extra)), 1000);
        // Controls: one audience with or without azp; several with azp us.
        assert!(verify(serde_json::json!({})).is_ok());
        assert!(verify(serde_json::json!({"azp": DEV_AUDIENCE})).is_ok());
        assert!(verify(serde_json::json!({"aud": [DEV_AUDIENCE]})).is_ok());
        assert!(
            verify(serde_json::json!({"aud": [DEV_AUDIENCE, "other-app"], "azp": DEV_AUDIENCE}))
                .is_ok()
        );
        // Attacks: a token another client was issued, naming us as well.
        assert!(matches!(
            verify(serde_json::json!({"aud": ["other-app", DEV_AUDIENCE], "azp": "other-app"})),
            Err(OidcError::AuthorizedParty { found, .. }) if found.contains("other-app")
        ));
        assert!(matches!(
            verify(serde_json::json!({"aud": ["other-app", DEV_AUDIENCE]})),
            Err(OidcError::AuthorizedParty { found, .. }) if found.contains("missing")
        ));
        assert!(matches!(
            verify(serde_json::json!({"azp": "other-app"})),
            Err(OidcError::AuthorizedParty { .. })
        ));
    }

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
        // Groups travel in the `groups` claim.
        let g = dev
            .mint_with_groups("bob", &["engineering".to_owned()], 60, 1000)
            .unwrap();
        assert_eq!(v.verify(&g, 1000).unwrap().groups, vec!["engineering"]);
        assert!(v.verify(&t, 1000).unwrap().groups.is_empty());
        let none = OidcVerifier::default();
        assert!(matches!(
            none.verify(&t, 1000),
            Err(OidcError::UnknownIssuer(_))
        ));
    }

    #[test]
    fn groups_and_email_verified_are_read_strictly() {
        let claims = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"iss": "i", "sub": "s", "exp": 1, "aud": "a"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            serde_json::from_value::<IdClaims>(v).unwrap()
        };
        assert!(claims(serde_json::json!({})).groups().unwrap().is_empty());
        assert_eq!(
            claims(serde_json::json!({"groups": ["a", "b"]}))
                .groups()
                .unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            claims(serde_json::json!({"groups": "a"})).groups().unwrap(),
            vec!["a"]
        );
        // Any other shape refuses the token: a forbid by group must not be
        // dodged by sending groups as numbers or an object.
        for bad in [
            serde_json::json!({"groups": [1]}),
            serde_json::json!({"groups": {"a": true}}),
            serde_json::json!({"groups": vec!["g"; MAX_GROUPS + 1]}),
        ] {
            assert!(matches!(
                claims(bad).groups(),
                Err(OidcError::Invalid(m)) if m.starts_with("groups claim")
            ));
        }
        assert!(claims(serde_json::json!({"email_verified": true})).email_verified());
        assert!(claims(serde_json::json!({"email_verified": "true"})).email_verified());
        assert!(!claims(serde_json::json!({"email_verified": "yes"})).email_verified());
        assert!(!claims(serde_json::json!({})).email_verified());
    }
}
