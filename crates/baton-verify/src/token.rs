//! Delegation-token verification, bound to the mTLS peer.
//!
//! First sight of a token costs one ES256 verification and a strict parse;
//! the result is cached by the token's SHA-256, so a token seen before costs
//! one hash, one map lookup and the checks that depend on the connection or
//! the clock (see [`TokenVerifier::verify`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_ca::{BROKER_ID_PATH, DELEGATION_TOKEN_TYP};
use baton_core::{DelegationClaims, Purpose, RiskTier, Scope, SpiffeId, TaskId, TrustDomain};
use serde_json::{Map, Value};

use crate::bundles::{JwtBundles, JwtKey};
use crate::cache::{Key, TokenCache};
use crate::error::{PeerError, TokenError};
use crate::strict;

/// Longest token accepted; longer input is refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// How far `iat` may be in the future (clock skew between broker and tool
/// server). `exp` gets no leeway: `now >= exp` is expired.
pub const IAT_SKEW_SECS: u64 = 30;
/// Default number of verified tokens kept in the cache.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;

/// Whether a token (by `jti`) or its task has been revoked.
///
/// Called on every verification, cache hit or not, for the `jti` of every
/// actor in the chain (so revoking an ancestor's token refuses its
/// descendants too), so it must be an in-memory lookup. An implementation
/// that cannot know (a stale feed) must answer `true`: fail closed.
pub trait RevocationCheck: Send + Sync {
    fn is_revoked(&self, jti: &str, task: &TaskId) -> bool;
}

/// Nothing is revoked (tokens die by expiry only). Only reachable through
/// [`TokenVerifier::dangerous_without_revocation`]: a verifier that ignores
/// revocations must say so where it is built.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRevocation;

impl RevocationCheck for NoRevocation {
    fn is_revoked(&self, _jti: &str, _task: &TaskId) -> bool {
        false
    }
}

/// The peer of a verified mTLS connection: its SPIFFE ID and its leaf
/// certificate (whose thumbprint a token's `cnf` must match).
///
/// Build it only from a connection whose client certificate the TLS
/// verifier accepted ([`PeerCert::from_connection`],
/// [`PeerCert::from_extensions`] behind `baton_tls::serve_https`, or
/// [`PeerCert::from_verified_leaf`] with the leaf the handshake verified):
/// this type does not validate the chain, it reads the certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerCert {
    spiffe_id: SpiffeId,
    leaf_der: Vec<u8>,
    thumbprint: String,
    serial_hex: String,
}

impl PeerCert {
    /// Reads the SPIFFE ID from a leaf the TLS handshake already verified,
    /// and computes its `x5t#S256` once for every call on the connection.
    pub fn from_verified_leaf(leaf_der: Vec<u8>) -> Result<Self, PeerError> {
        let info = baton_ca::leaf_info(std::slice::from_ref(&leaf_der))
            .map_err(|e| PeerError::NotAnSvid(e.to_string()))?;
        Ok(Self {
            spiffe_id: info.spiffe_id,
            thumbprint: baton_ca::cert_thumbprint(&leaf_der),
            serial_hex: info.serial_hex,
            leaf_der,
        })
    }

    /// `spiffe_id` must be the one the TLS verifier read from `leaf_der`;
    /// the leaf is parsed for its serial only.
    pub(crate) fn from_parts(spiffe_id: SpiffeId, leaf_der: Vec<u8>) -> Result<Self, PeerError> {
        let info = baton_ca::leaf_info(std::slice::from_ref(&leaf_der))
            .map_err(|e| PeerError::NotAnSvid(e.to_string()))?;
        Ok(Self {
            spiffe_id,
            thumbprint: baton_ca::cert_thumbprint(&leaf_der),
            serial_hex: info.serial_hex,
            leaf_der,
        })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    pub fn leaf_der(&self) -> &[u8] {
        &self.leaf_der
    }

    /// base64url SHA-256 of the leaf (RFC 8705 `x5t#S256`).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The leaf's serial: lowercase hex without leading zero bytes, the
    /// id under which the broker registered it for revocation.
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }
}

impl fmt::Debug for PeerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCert")
            .field("spiffe_id", &self.spiffe_id)
            .field("x5t#S256", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// What a verification established about a token, independent of the
/// connection it arrived on. Shared between the cache and the witnesses.
struct Verified {
    claims: DelegationClaims,
    /// Current actor first.
    chain: Vec<SpiffeId>,
    trust_domain: TrustDomain,
    key: Arc<JwtKey>,
    token_hash: String,
}

/// A delegation token that passed every check of [`TokenVerifier::verify`]
/// for one peer at one time.
///
/// Only `verify` builds one. It is not `Clone`: verify the token again for
/// the next call (a cache hit), so the peer binding, expiry and revocation
/// are checked for that call.
pub struct VerifiedDelegation {
    inner: Arc<Verified>,
    /// Serial of the mTLS peer's certificate the token was verified for.
    peer_serial: String,
}

impl VerifiedDelegation {
    /// Serial (hex) of the peer certificate this call arrived with.
    pub fn peer_serial(&self) -> &str {
        &self.peer_serial
    }
    /// The `kid` of the JWT key that signed the token.
    pub fn kid(&self) -> &str {
        &self.inner.key.kid
    }
    /// The token's claims, as signed.
    pub fn claims(&self) -> &DelegationClaims {
        &self.inner.claims
    }
    pub fn task_id(&self) -> &TaskId {
        &self.inner.claims.task.id
    }
    pub fn purpose(&self) -> &Purpose {
        &self.inner.claims.task.purpose
    }
    pub fn risk_ceiling(&self) -> RiskTier {
        self.inner.claims.task.risk_ceiling
    }
    /// The scope this token grants.
    pub fn scope(&self) -> &Scope {
        &self.inner.claims.scope
    }
    /// 0 for the root agent, +1 per hop.
    pub fn depth(&self) -> u32 {
        self.inner.claims.depth
    }
    /// The actors' SPIFFE IDs, current actor (the peer) first, root agent last.
    pub fn chain(&self) -> &[SpiffeId] {
        &self.inner.chain
    }
    /// The current actor: the mTLS peer that presented the token.
    pub fn agent(&self) -> &SpiffeId {
        &self.inner.claims.act.sub
    }
    /// The human (OIDC subject) who started the task.
    pub fn initiator(&self) -> &str {
        &self.inner.claims.sub
    }
    pub fn jti(&self) -> &str {
        &self.inner.claims.jti
    }
    pub fn expires_at(&self) -> u64 {
        self.inner.claims.exp
    }
    pub fn justification(&self) -> Option<&str> {
        self.inner.claims.justification.as_deref()
    }
    /// The broker's trust domain (from `iss`).
    pub fn issuer_trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }
    /// base64url SHA-256 of the compact token: log this, never the token.
    pub fn token_hash(&self) -> &str {
        &self.inner.token_hash
    }
}

impl fmt::Debug for VerifiedDelegation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedDelegation")
            .field("task", self.task_id())
            .field("agent", self.agent())
            .field("jti", &self.jti())
            .field("depth", &self.depth())
            .field("token_hash", &self.token_hash())
            .finish_non_exhaustive()
    }
}

/// Cache counters, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

/// Verifies delegation tokens against the brokers' JWT authorities.
///
/// One verifier per audience: the cache remembers that a token passed the
/// audience check, so a verifier never mixes audiences.
pub struct TokenVerifier {
    bundles: JwtBundles,
    /// `None` only for the broker's own check of a holder's token.
    audience: Option<String>,
    revocation: Arc<dyn RevocationCheck>,
    cache: TokenCache<Verified>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("bundles", &self.bundles)
            .field("audience", &self.audience)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A tool server's verifier: tokens must name `audience` in `aud`, and
    /// no `jti` of their chain may be revoked according to `revocation`
    /// (the broker's feed, [`crate::BrokerFeed`], or Redis's).
    pub fn new(
        bundles: JwtBundles,
        audience: String,
        revocation: Arc<dyn RevocationCheck>,
    ) -> Self {
        Self::build(bundles, Some(audience), revocation)
    }

    /// A verifier that never learns of revocations: a revoked token stays
    /// valid until it expires. For tests and offline tools only; the name
    /// is meant to stand out in review.
    pub fn dangerous_without_revocation(bundles: JwtBundles, audience: String) -> Self {
        Self::build(bundles, Some(audience), Arc::new(NoRevocation))
    }

    /// The broker's verifier for a holder presenting its own token at a hop
    /// (`POST /v1/delegate`): every check except the audience, which names
    /// the tool servers the token is for, not the broker.
    pub fn for_broker(bundles: JwtBundles, revocation: Arc<dyn RevocationCheck>) -> Self {
        Self::build(bundles, None, revocation)
    }

    fn build(
        bundles: JwtBundles,
        audience: Option<String>,
        revocation: Arc<dyn RevocationCheck>,
    ) -> Self {
        baton_ca::init();
        Self {
            bundles,
            audience,
            revocation,
            cache: TokenCache::new(DEFAULT_CACHE_CAPACITY),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Consults `check` on every verification (replacing the one given at
    /// construction).
    pub fn with_revocation(mut self, check: Arc<dyn RevocationCheck>) -> Self {
        self.revocation = check;
        self
    }

    /// Keeps at most about `capacity` verified tokens (0 disables the cache).
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = TokenCache::new(capacity);
        self
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.cache.len(),
        }
    }

    /// Forgets every cached token (the next verification of each is a
    /// first sight again).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// The task a token names if this verifier's keys signed it (well
    /// formed, unexpired), whoever presents it. Only for deciding whether a
    /// refused token is recorded under the task it names (a forged one is
    /// not: anyone could fill a task's trace); never an authorization,
    /// since nothing here binds it to a holder or checks revocation.
    pub fn signed_task_unbound(&self, token: &str, now: u64) -> Option<TaskId> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let key = cache_key(token);
        if let Some(v) = self.cache.get(&key, now) {
            return Some(v.claims.task.id.clone());
        }
        self.verify_fresh(token, &key, now)
            .ok()
            .map(|v| v.claims.task.id.clone())
    }

    /// Verifies `token` as presented by `peer` at unix time `now`.
    ///
    /// First sight, in order: size and compact form; header `alg` exactly
    /// `ES256` (`none`, `HS*` and everything else refused by name before a
    /// key is touched), `typ` exactly `baton-delegation+jwt`, `kid` present,
    /// no other header parameter; `iss` a broker SPIFFE ID
    /// (`spiffe://<td>/baton/broker`) whose trust domain has a bundle holding
    /// `kid`; the ES256 signature over the first two parts as received; the
    /// claims parse as `DelegationClaims` with no unknown member at any
    /// level; `iat < exp`; `aud` contains the audience (not for
    /// [`for_broker`](Self::for_broker)); the chain: `depth == chain length
    /// - 1 <= task.max_depth`, the current actor's `jti`/`exp`/`scope` equal
    /// the token's, every actor's expiry at or before its delegator's and
    /// its scope within its delegator's, `parent` present exactly when
    /// `depth > 0` and naming the delegator's `jti`.
    ///
    /// Every time (first sight or cache hit): `now < exp` (no leeway);
    /// `iat <= now + IAT_SKEW_SECS`; the signing key still published in the
    /// bundle; `cnf.x5t#S256` equals the peer leaf's thumbprint; `act.sub`
    /// equals the peer's SPIFFE ID; no `jti` of the chain revoked.
    pub fn verify(
        &self,
        token: &str,
        peer: &PeerCert,
        now: u64,
    ) -> Result<VerifiedDelegation, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge { max: MAX_TOKEN_LEN });
        }
        let key = cache_key(token);
        let verified = match self.cache.get(&key, now) {
            Some(v) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                v
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                let v = Arc::new(self.verify_fresh(token, &key, now)?);
                self.cache.insert(key, v.clone(), v.claims.exp, now);
                v
            }
        };
        self.check_per_call(&verified, peer, now)?;
        Ok(VerifiedDelegation {
            inner: verified,
            peer_serial: peer.serial_hex.clone(),
        })
    }

    /// What an answer still streaming to the holder of `d` (an event
    /// stream, a long body) checks while it flows: the token's expiry,
    /// its key still published, and no revocation of its chain, its task
    /// or the certificate it arrived with. A call is verified once, when
    /// it arrives; a stream outlives that moment.
    pub fn standing(&self, d: &VerifiedDelegation) -> Standing {
        Standing {
            verified: d.inner.clone(),
            peer_serial: d.peer_serial.clone(),
            bundles: self.bundles.clone(),
            revocation: self.revocation.clone(),
        }
    }

    fn check_per_call(&self, v: &Verified, peer: &PeerCert, now: u64) -> Result<(), TokenError> {
        let c = &v.claims;
        check_times(c, now)?;
        check_key_published(&self.bundles, v)?;
        if c.cnf.x5t_s256 != peer.thumbprint {
            return Err(TokenError::CertificateMismatch);
        }
        if c.act.sub != peer.spiffe_id {
            return Err(TokenError::ActorMismatch {
                actor: c.act.sub.clone(),
                peer: peer.spiffe_id.clone(),
            });
        }
        check_not_revoked(self.revocation.as_ref(), c, &peer.serial_hex)
    }

    fn verify_fresh(&self, token: &str, hash: &Key, now: u64) -> Result<Verified, TokenError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let header = decode_header(header_b64)?;
        let kid = check_header(&header)?;

        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| TokenError::Malformed("payload is not unpadded base64url"))?;
        let iss = strict::issuer(&payload)?;
        let trust_domain = match SpiffeId::parse(&iss) {
            Ok(id) if id.path() == BROKER_ID_PATH => id.trust_domain().clone(),
            _ => return Err(TokenError::BadIssuer(iss)),
        };
        let key = match self.bundles.key(&trust_domain, kid) {
            None => return Err(TokenError::NoBundle(trust_domain)),
            Some(None) => {
                return Err(TokenError::UnknownKid {
                    kid: kid.to_owned(),
                    trust_domain,
                });
            }
            Some(Some(k)) => k,
        };

        // The signed message is the first two parts exactly as received.
        let message_len = header_b64.len() + 1 + payload_b64.len();
        let message = token.as_bytes().get(..message_len).unwrap_or_default();
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed("signature is not unpadded base64url"))?;
        if sig.len() != 64 || key.key.verify_sig(message, &sig).is_err() {
            return Err(TokenError::BadSignature);
        }
        // ECDSA signatures are malleable: (r, n - s) verifies too. Only the
        // low-S form the broker emits is accepted, so one token has exactly
        // one encoding and nothing keyed by its bytes can be bypassed.
        if !baton_ca::is_low_s(&sig) {
            return Err(TokenError::NonCanonicalSignature);
        }

        let claims = strict::claims(&payload)?;
        if claims.jti.is_empty() {
            return Err(TokenError::InvalidClaims("\"jti\" is empty".into()));
        }
        if claims.iat >= claims.exp {
            return Err(TokenError::InvalidClaims(format!(
                "\"iat\" ({}) is not before \"exp\" ({})",
                claims.iat, claims.exp
            )));
        }
        check_times(&claims, now)?;
        if let Some(expected) = &self.audience
            && !claims.aud.iter().any(|a| a == expected)
        {
            return Err(TokenError::AudienceMismatch {
                expected: expected.clone(),
                found: claims.aud.clone(),
            });
        }
        check_chain(&claims)?;
        let chain = claims.act.chain().iter().map(|a| a.sub.clone()).collect();
        Ok(Verified {
            chain,
            trust_domain,
            key,
            // Same digest as `baton_ca::token_hash`, already computed for the cache.
            token_hash: URL_SAFE_NO_PAD.encode(hash),
            claims,
        })
    }
}

fn cache_key(token: &str) -> Key {
    let d = digest(&SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

/// A verified call's token, checked again while its answer streams (see
/// [`TokenVerifier::standing`]).
pub struct Standing {
    verified: Arc<Verified>,
    peer_serial: String,
    bundles: JwtBundles,
    revocation: Arc<dyn RevocationCheck>,
}

impl fmt::Debug for Standing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Standing")
            .field("jti", &self.verified.claims.jti)
            .field("peer_serial", &self.peer_serial)
            .finish_non_exhaustive()
    }
}

impl Standing {
    /// `Ok` while the token still holds at `now`.
    pub fn check(&self, now: u64) -> Result<(), TokenError> {
        let v = &self.verified;
        check_times(&v.claims, now)?;
        check_key_published(&self.bundles, v)?;
        check_not_revoked(self.revocation.as_ref(), &v.claims, &self.peer_serial)
    }

    /// When the token expires (unix seconds).
    pub fn expires_at(&self) -> u64 {
        self.verified.claims.exp
    }
}

/// The key that signed `v` is still published in its trust domain's
/// bundle: dropping a key refuses its tokens at once, cached ones too.
fn check_key_published(bundles: &JwtBundles, v: &Verified) -> Result<(), TokenError> {
    match bundles.key(&v.trust_domain, &v.key.kid) {
        None => Err(TokenError::NoBundle(v.trust_domain.clone())),
        Some(Some(k)) if Arc::ptr_eq(&k, &v.key) || k.key.as_ref() == v.key.key.as_ref() => Ok(()),
        Some(_) => Err(TokenError::UnknownKid {
            kid: v.key.kid.clone(),
            trust_domain: v.trust_domain.clone(),
        }),
    }
}

/// No link of the chain (by `jti`), nor the task, nor the certificate the
/// call came with (`serial`) is revoked. The certificate is checked apart
/// from its token, failing closed on a peer without a serial: every
/// verifier checks it, whether or not its server also gave a `ToolGate`
/// the revocation check.
fn check_not_revoked(
    revocation: &dyn RevocationCheck,
    c: &DelegationClaims,
    serial: &str,
) -> Result<(), TokenError> {
    let mut actor = Some(&c.act);
    while let Some(a) = actor {
        if revocation.is_revoked(&a.jti, &c.task.id) {
            return Err(TokenError::Revoked {
                jti: a.jti.clone(),
                task: c.task.id.clone(),
            });
        }
        actor = a.act.as_deref();
    }
    if serial.is_empty() || revocation.is_revoked(serial, &c.task.id) {
        return Err(TokenError::CertificateRevoked {
            serial: serial.to_owned(),
            task: c.task.id.clone(),
        });
    }
    Ok(())
}

fn check_times(c: &DelegationClaims, now: u64) -> Result<(), TokenError> {
    if now >= c.exp {
        return Err(TokenError::Expired { exp: c.exp, now });
    }
    if c.iat > now.saturating_add(IAT_SKEW_SECS) {
        return Err(TokenError::IssuedInFuture { iat: c.iat, now });
    }
    Ok(())
}

/// Returns the `kid`.
fn check_header(header: &Map<String, Value>) -> Result<&str, TokenError> {
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "ES256" => {}
        Some(Value::String(alg)) if alg.eq_ignore_ascii_case("none") => {
            return Err(TokenError::AlgNone);
        }
        Some(Value::String(alg)) if alg.to_ascii_uppercase().starts_with("HS") => {
            return Err(TokenError::SymmetricAlgorithm(alg.clone()));
        }
        Some(Value::String(alg)) => return Err(TokenError::UnsupportedAlgorithm(alg.clone())),
        _ => return Err(TokenError::Malformed("header has no string \"alg\"")),
    }
    match header.get("typ") {
        Some(Value::String(t)) if t == DELEGATION_TOKEN_TYP => {}
        other => {
            return Err(TokenError::WrongType {
                found: other.map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
            });
        }
    }
    let kid = match header.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.as_str(),
        _ => return Err(TokenError::MissingKid),
    };
    if let Some(name) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "typ" | "kid"))
    {
        return Err(TokenError::UnexpectedHeader(name.clone()));
    }
    Ok(kid)
}

fn decode_header(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("header is not unpadded base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(TokenError::Malformed("header is not a JSON object")),
    }
}

fn check_chain(c: &DelegationClaims) -> Result<(), TokenError> {
    let chain = c.act.chain();
    if usize::try_from(c.depth).ok() != Some(chain.len() - 1) {
        return Err(TokenError::DepthMismatch {
            depth: c.depth,
            chain_len: chain.len(),
        });
    }
    if c.depth > c.task.max_depth {
        return Err(TokenError::DepthExceeded {
            depth: c.depth,
            max_depth: c.task.max_depth,
        });
    }
    let top = &c.act;
    if top.jti != c.jti {
        return Err(TokenError::ActorClaimMismatch { field: "jti" });
    }
    if top.exp != c.exp {
        return Err(TokenError::ActorClaimMismatch { field: "exp" });
    }
    if top.scope != c.scope {
        return Err(TokenError::ActorClaimMismatch { field: "scope" });
    }
    if top.aud != c.aud {
        return Err(TokenError::ActorClaimMismatch { field: "aud" });
    }
    for pair in chain.windows(2) {
        let [outer, inner] = pair else { continue };
        if outer.exp > inner.exp {
            return Err(TokenError::ExpiryWidened {
                actor: outer.sub.clone(),
                exp: outer.exp,
                delegator_exp: inner.exp,
            });
        }
        let widened: Vec<String> = outer
            .aud
            .iter()
            .filter(|a| !inner.aud.contains(a))
            .cloned()
            .collect();
        if !widened.is_empty() {
            return Err(TokenError::AudienceWidened {
                actor: outer.sub.clone(),
                widened,
            });
        }
        if !outer.scope.is_subset_of(&inner.scope) {
            return Err(TokenError::ScopeWidened {
                actor: outer.sub.clone(),
                widened: outer
                    .scope
                    .not_covered_by(&inner.scope)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            });
        }
    }
    match (&c.parent, top.act.as_deref()) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(TokenError::UnexpectedParent),
        (None, Some(_)) => Err(TokenError::ParentMissing { depth: c.depth }),
        (Some(p), Some(delegator)) if p.jti != delegator.jti => Err(TokenError::ParentMismatch {
            parent: p.jti.clone(),
            actor: delegator.jti.clone(),
        }),
        (Some(_), Some(_)) => Ok(()),
    }
}
