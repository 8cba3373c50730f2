//! Delegation tokens: the broker's ES256 signature over
//! [`DelegationClaims`], and the two digests that bind tokens to
//! certificates and to their parents.
//!
//! A delegation token is a compact JWS signed with the CA's active JWT key
//! (the same key, and so the same `kid`, that signs JWT-SVIDs and that the
//! trust bundle publishes), with the header
//! `{"alg":"ES256","kid":<kid>,"typ":"baton-delegation+jwt"}`. The explicit
//! `typ` keeps a delegation token from being accepted as a JWT-SVID and the
//! other way round: `baton-verify` requires it, and JWT-SVID validation
//! refuses any `typ` other than `JWT`/`JOSE`.

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_core::{DelegationClaims, Secret};
use serde_json::json;

use crate::{Ca, CaError};

/// The JOSE `typ` of a delegation token (RFC 8725 §3.11 explicit typing).
pub const DELEGATION_TOKEN_TYP: &str = "baton-delegation+jwt";

impl Ca {
    /// Signs `claims` as a delegation token with the active JWT key.
    ///
    /// The claims are serialized as given: the broker decides them (scope
    /// attenuation, expiry, chain) and `baton-verify` checks them. This only
    /// refuses what no delegation token may carry: an empty audience (or an
    /// empty audience entry) and `exp <= iat`.
    pub fn sign_delegation_token(&self, claims: &DelegationClaims) -> Result<Secret, CaError> {
        if claims.aud.is_empty() || claims.aud.iter().any(String::is_empty) {
            return Err(CaError::EmptyAudience);
        }
        if claims.exp <= claims.iat {
            return Err(CaError::ZeroTtl);
        }
        let payload = serde_json::to_vec(claims)
            .map_err(|_| CaError::Crypto("encode delegation token claims"))?;
        let signed = crate::ca::JwtSigned::DelegationToken { jti: &claims.jti };
        let token = self.with_active_jwt(signed, claims.exp, claims.iat, |key| {
            let header = json!({"alg": "ES256", "kid": key.kid(), "typ": DELEGATION_TOKEN_TYP});
            let mut token = String::with_capacity(1024);
            URL_SAFE_NO_PAD.encode_string(header.to_string(), &mut token);
            token.push('.');
            URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
            let sig = key
                .key_pair
                .sign(&aws_lc_rs::rand::SystemRandom::new(), token.as_bytes())
                .map_err(|_| CaError::Crypto("sign delegation token"))?;
            let mut sig = sig.as_ref().to_vec();
            crate::ecdsa::to_low_s(&mut sig);
            token.push('.');
            URL_SAFE_NO_PAD.encode_string(&sig, &mut token);
            Ok(token)
        })?;
        Ok(Secret::new(token))
    }
}

/// RFC 8705 `x5t#S256`: base64url (no padding) of the SHA-256 of a
/// certificate's DER encoding.
pub fn cert_thumbprint(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, cert_der))
}

/// base64url (no padding) of the SHA-256 of a compact JWS, as it travels.
/// This is what `parent.hash` holds and what logs show instead of a token.
pub fn token_hash(compact: &str) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, compact.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    use baton_core::{
        Actor, Confirmation, Purpose, RiskTier, Scope, SpiffeId, TaskClaims, TaskId, TrustDomain,
    };
    use serde_json::Value;

    use super::*;
    use crate::CaConfig;

    fn claims(now: u64) -> DelegationClaims {
        let scope = Scope::parse(&["tool:crm.search:read"]).unwrap();
        DelegationClaims {
            iss: "spiffe://example.org/baton/broker".into(),
            sub: "alice@example.com".into(),
            aud: vec!["crm-tool".into()],
            exp: now + 300,
            iat: now,
            jti: "j1".into(),
            act: Actor {
                sub: SpiffeId::parse("spiffe://example.org/agents/planner").unwrap(),
                jti: "j1".into(),
                scope: scope.clone(),
                exp: now + 300,
                aud: vec!["crm-tool".into()],
                act: None,
            },
            task: TaskClaims {
                id: TaskId::from_random([7; 16]),
                purpose: "support.case-research".parse::<Purpose>().unwrap(),
                risk_ceiling: RiskTier::Write,
                max_depth: 2,
                initiator_iss: "https://idp.example.com".into(),
            },
            scope,
            depth: 0,
            parent: None,
            justification: None,
            cnf: Confirmation {
                x5t_s256: cert_thumbprint(b"cert"),
            },
        }
    }

    #[test]
    fn signs_with_the_bundle_key_and_explicit_typ() {
        let now = 1_700_000_000;
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca =
            Ca::load_or_create(CaConfig::new(td), UNIX_EPOCH + Duration::from_secs(now)).unwrap();
        let c = claims(now);
        let token = ca.sign_delegation_token(&c).unwrap();
        let parts: Vec<&str> = token.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], DELEGATION_TOKEN_TYP);
        assert_eq!(header["kid"], ca.jwt_key_id());
        let payload: DelegationClaims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(payload, c);

        let bundle = ca.bundle();
        let key = &bundle.jwt_authorities[0];
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let message = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.public_key)
            .verify(message.as_bytes(), &sig)
            .unwrap();
        // A JWT-SVID validator must not take it for a JWT-SVID.
        assert!(matches!(
            crate::jwt::validate_jwt_svid(
                token.expose(),
                "crm-tool",
                &[bundle],
                UNIX_EPOCH + Duration::from_secs(now)
            ),
            Err(crate::jwt::JwtError::BadType(_))
        ));
    }

    /// The active JWT key signs no delegation token past its own end (as
    /// it signs no JWT-SVID): verifiers cannot tell from the bundle, and
    /// an ended key is pruned without a usage check, which would end every
    /// token it signed at once. The control: the same key just before.
    #[test]
    fn an_active_jwt_key_past_its_end_signs_nothing() {
        let t0 = 1_700_000_000;
        let td: TrustDomain = "example.org".parse().unwrap();
        let mut cfg = CaConfig::new(td.clone());
        cfg.ca_ttl = Duration::from_secs(1000);
        let ca = Ca::load_or_create(cfg, UNIX_EPOCH + Duration::from_secs(t0)).unwrap();
        ca.sign_delegation_token(&claims(t0 + 990)).unwrap();
        assert!(matches!(
            ca.sign_delegation_token(&claims(t0 + 1000)),
            Err(CaError::AuthorityExpired { .. })
        ));
        let w = td.id("/w").unwrap();
        assert!(
            ca.sign_jwt_svid(
                &w,
                &["a".into()],
                Duration::from_secs(60),
                UNIX_EPOCH + Duration::from_secs(t0 + 1001)
            )
            .is_err()
        );
    }

    #[test]
    fn refuses_empty_audience_and_lifetime() {
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca =
            Ca::load_or_create(CaConfig::new(td), UNIX_EPOCH + Duration::from_secs(100)).unwrap();
        let mut c = claims(100);
        c.aud.clear();
        assert!(matches!(
            ca.sign_delegation_token(&c),
            Err(CaError::EmptyAudience)
        ));
        let mut c = claims(100);
        c.exp = c.iat;
        assert!(matches!(
            ca.sign_delegation_token(&c),
            Err(CaError::ZeroTtl)
        ));
    }

    #[test]
    fn a_jwt_key_is_not_revoked_while_a_token_it_signed_is_live() {
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
        let td: TrustDomain = "example.org".parse().unwrap();
        let mut cfg = CaConfig::new(td.clone());
        cfg.max_svid_ttl = Duration::from_secs(100);
        let ca = Ca::load_or_create(cfg, t(0)).unwrap();
        let k1 = ca.jwt_key_id();
        let w = td.id("/w").unwrap();
        ca.sign_jwt_svid(&w, &["a".into()], Duration::from_secs(60), t(0))
            .unwrap();
        let mut planner = claims(1_700_000_000);
        planner.exp = 1_700_000_200;
        ca.sign_delegation_token(&planner).unwrap();
        let mut researcher = claims(1_700_000_000);
        researcher.jti = "j2".into();
        researcher.exp = 1_700_000_150;
        ca.sign_delegation_token(&researcher).unwrap();
        let u = ca.jwt_key_usage(&k1, t(10));
        assert_eq!(
            (u.jwt_svids, u.delegation_tokens, u.until()),
            (1, 2, 1_700_000_200)
        );

        let k2 = ca.prepare(&[crate::AuthorityKind::Jwt], t(10)).unwrap()[0]
            .authority
            .id
            .clone();
        ca.activate(Some(&k2), t(10)).unwrap();
        ca.taint(&k1, t(10)).unwrap();
        match ca.revoke(&k1, t(10)) {
            Err(e @ CaError::KeyInUse { .. }) => {
                let m = e.to_string();
                assert!(m.contains("1 JWT-SVID(s) and 2 delegation token(s)"), "{m}");
                assert!(m.contains("--force"), "{m}");
            }
            other => panic!("expected KeyInUse, got {other:?}"),
        }
        // Renewing the researcher's token (same jti, new key) takes it off k1.
        researcher.iat = 1_700_000_020;
        ca.sign_delegation_token(&researcher).unwrap();
        let u = ca.jwt_key_usage(&k1, t(60));
        assert_eq!((u.jwt_svids, u.delegation_tokens), (0, 1));
        assert_eq!(ca.jwt_key_usage(&k2, t(60)).delegation_tokens, 1);
        assert!(matches!(
            ca.revoke(&k1, t(199)),
            Err(CaError::KeyInUse { .. })
        ));
        // Once the planner's expired (no leeway), the revoke goes through.
        ca.revoke(&k1, t(200)).unwrap();
        assert!(ca.bundle().jwt_authorities.iter().all(|a| a.kid != k1));
    }

    #[test]
    fn force_revokes_a_key_in_use() {
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Ca::load_or_create(CaConfig::new(td), t(0)).unwrap();
        let k1 = ca.jwt_key_id();
        ca.sign_delegation_token(&claims(1_700_000_000)).unwrap();
        ca.prepare(&[crate::AuthorityKind::Jwt], t(1)).unwrap();
        ca.activate(None, t(1)).unwrap();
        ca.taint(&k1, t(1)).unwrap();
        assert!(ca.revoke(&k1, t(2)).is_err());
        ca.force_revoke(&k1, t(2)).unwrap();
        assert!(ca.bundle().jwt_authorities.iter().all(|a| a.kid != k1));
    }

    #[test]
    fn digests() {
        // SHA-256 of the empty string.
        assert_eq!(
            cert_thumbprint(b""),
            "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"
        );
        assert_eq!(token_hash(""), cert_thumbprint(b""));
        assert_eq!(token_hash("a.b.c").len(), 43);
    }
}
