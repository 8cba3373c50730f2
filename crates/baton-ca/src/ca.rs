//! The broker's certificate authority: one self-signed X.509 root per trust
//! domain that signs X509-SVIDs, and one ES256 key that signs JWT-SVIDs.
//!
//! Authorities and JWT keys are held in lists with an active index so that
//! rotation (prepared → active → old) can be added without changing the
//! issuing paths; today each list has exactly one element.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_core::{Secret, SpiffeId, TrustDomain};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::json;

use crate::CaError;
use crate::bundle::TrustBundle;
use crate::jwt::JwtSigningKey;
use crate::keystore;
use crate::time_util::{floor_secs, from_unix_i64, to_offset, unix_secs};
use crate::workload::WorkloadKey;
use crate::x509::{parse_cert, random_serial, uri_sans, valid_dns_name, verify_csr};

/// Default lifetime of the X.509 authority.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default cap on any SVID's lifetime.
pub const DEFAULT_MAX_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far NotBefore is back-dated, to absorb clock skew between the
/// broker and relying parties (SPIRE uses the same 10 s).
pub const BACKDATE: Duration = Duration::from_secs(10);
/// Path of the broker's own SPIFFE ID inside its trust domain.
pub const BROKER_ID_PATH: &str = "/baton/broker";

const X509_KEY_FILE: &str = "x509-authority.key";
const X509_CERT_FILE: &str = "x509-authority.der";
const JWT_KEY_FILE: &str = "jwt-authority.key";

/// How to build the CA.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
    /// Lifetime of a newly created X.509 authority.
    pub ca_ttl: Duration,
    /// Where keys persist; `None` keeps them in memory only (dev: every
    /// restart makes a new trust bundle).
    pub key_dir: Option<PathBuf>,
    /// Upper bound on any SVID lifetime, whatever a caller asks for.
    pub max_svid_ttl: Duration,
}

impl CaConfig {
    /// In-memory CA with the default lifetimes.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            ca_ttl: DEFAULT_CA_TTL,
            key_dir: None,
            max_svid_ttl: DEFAULT_MAX_SVID_TTL,
        }
    }
}

/// A private key in PKCS#8 DER that must not reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyBytes(Vec<u8>);

impl PrivateKeyBytes {
    pub fn new(pkcs8_der: Vec<u8>) -> Self {
        Self(pkcs8_der)
    }
    /// The PKCS#8 DER. Never log it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for PrivateKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyBytes(\"...\")")
    }
}

/// An X509-SVID as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    pub spiffe_id: SpiffeId,
    /// Leaf first. For a self-signed root the chain is just the leaf.
    pub cert_chain_der: Vec<Vec<u8>>,
    /// Lowercase hex without leading zero bytes, as [`crate::leaf_info`] reports it.
    pub serial_hex: String,
    pub not_after: SystemTime,
}

/// One X.509 signing authority, parsed once at load so issuance never
/// re-reads the CA certificate.
struct X509Authority {
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Authority")
            .field("not_after", &unix_secs(self.not_after))
            .finish_non_exhaustive()
    }
}

impl X509Authority {
    /// Self-signs a new root certificate for `key`.
    fn create(
        td: &TrustDomain,
        ca_ttl: Duration,
        key: KeyPair,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        params.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH))?;
        params.not_after = to_offset(
            now.checked_add(ca_ttl)
                .ok_or(CaError::TimeOutOfRange(now))?,
        )?;
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        // Distinct subjects per authority keep path building unambiguous once
        // rotation puts two roots in one bundle.
        let short: String = serial_hex.chars().take(16).collect();
        dn.push(DnType::CommonName, format!("Baton CA {short}"));
        params.distinguished_name = dn;
        // Path length 0: this root signs leaves only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(td.id_string())?)];
        let cert = params.self_signed(&key)?;
        Self::from_parts(cert.der().to_vec(), key)
    }

    fn from_parts(cert_der: Vec<u8>, key: KeyPair) -> Result<Self, CaError> {
        let not_after = {
            let cert = parse_cert(&cert_der)?;
            from_unix_i64(cert.validity().not_after.timestamp())
        };
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.as_slice()), key)?;
        Ok(Self {
            cert_der,
            issuer,
            not_after,
        })
    }
}

/// The certificate authority. `Send + Sync`; issuance takes `&self`.
pub struct Ca {
    trust_domain: TrustDomain,
    max_svid_ttl: Duration,
    // INVARIANT: `active_x509 < x509_authorities.len()` and
    // `active_jwt < jwt_keys.len()`; only `load_or_create` builds a Ca.
    x509_authorities: Vec<X509Authority>,
    active_x509: usize,
    jwt_keys: Vec<JwtSigningKey>,
    active_jwt: usize,
    sequence: u64,
    refresh_hint_secs: u64,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("max_svid_ttl", &self.max_svid_ttl)
            .field("x509_authorities", &self.x509_authorities)
            .field("active_x509", &self.active_x509)
            .field("jwt_keys", &self.jwt_keys)
            .field("active_jwt", &self.active_jwt)
            .field("sequence", &self.sequence)
            .finish()
    }
}

impl Ca {
    /// Loads the CA from `cfg.key_dir`, or creates and persists it.
    ///
    /// Files: `x509-authority.key` and `jwt-authority.key` (PKCS#8 DER, mode
    /// 0600; a key file that group or others can access is refused) and
    /// `x509-authority.der`. An expired authority is replaced by a new key
    /// and certificate. The key is the source of truth: if the certificate
    /// is missing or belongs to another key (a crash between the two
    /// renames of a replacement), a new certificate is self-signed for it.
    /// A persisted authority of another trust domain is an error.
    pub fn load_or_create(cfg: CaConfig, now: SystemTime) -> Result<Ca, CaError> {
        if cfg.ca_ttl < Duration::from_secs(1) || cfg.max_svid_ttl < Duration::from_secs(1) {
            return Err(CaError::ZeroTtl);
        }
        let td = &cfg.trust_domain;
        let (authority, jwt_key) = match &cfg.key_dir {
            None => (
                X509Authority::create(td, cfg.ca_ttl, new_p256_key()?, now)?,
                JwtSigningKey::from_pkcs8(&JwtSigningKey::generate_pkcs8()?)?,
            ),
            Some(dir) => {
                keystore::ensure_dir(dir)?;
                (
                    load_x509_authority(dir, td, cfg.ca_ttl, now)?,
                    load_jwt_key(dir)?,
                )
            }
        };
        Ok(Ca {
            trust_domain: cfg.trust_domain,
            max_svid_ttl: cfg.max_svid_ttl,
            x509_authorities: vec![authority],
            active_x509: 0,
            jwt_keys: vec![jwt_key],
            active_jwt: 0,
            // Seconds at load: increases across restarts (which is when the
            // content can change today) without persisting a counter.
            sequence: unix_secs(now),
            refresh_hint_secs: (cfg.ca_ttl.as_secs() / 10).clamp(60, 300),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When the active X.509 authority expires; no SVID outlives it.
    pub fn authority_not_after(&self) -> SystemTime {
        self.active_x509().map_or(UNIX_EPOCH, |a| a.not_after)
    }

    /// The key id that new JWT-SVIDs carry.
    pub fn jwt_key_id(&self) -> &str {
        self.active_jwt().map_or("", JwtSigningKey::kid)
    }

    fn active_x509(&self) -> Result<&X509Authority, CaError> {
        self.x509_authorities
            .get(self.active_x509)
            .ok_or(CaError::Crypto("no active X.509 authority"))
    }

    pub(crate) fn active_jwt(&self) -> Result<&JwtSigningKey, CaError> {
        self.jwt_keys
            .get(self.active_jwt)
            .ok_or(CaError::Crypto("no active JWT key"))
    }

    fn check_subject(&self, id: &SpiffeId) -> Result<(), CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if id.is_trust_domain_id() {
            return Err(CaError::TrustDomainIdNotAllowed(id.clone()));
        }
        Ok(())
    }

    /// Issues an X509-SVID for the key in `csr_der`.
    ///
    /// The CSR must be a P-256 key signed with ECDSA-SHA256, and its
    /// self-signature must verify; everything it requests is ignored. The
    /// leaf has exactly one URI SAN (`spiffe_id`, which must be in this trust
    /// domain and not the trust domain's own ID), `dns_names` as DNS SANs,
    /// critical basicConstraints cA=false, critical keyUsage
    /// digitalSignature, EKU serverAuth+clientAuth, SKI and AKI, a random
    /// positive 127-bit serial, NotBefore `now - 10 s`, and NotAfter
    /// `min(now + ttl, now + max_svid_ttl, authority NotAfter)`.
    pub fn sign_x509_svid(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        ttl: Duration,
        dns_names: &[String],
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        self.check_subject(spiffe_id)?;
        let key = verify_csr(csr_der)?;
        self.issue(&key, spiffe_id, dns_names, &[], ttl, now)
    }

    fn issue(
        &self,
        subject_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if ttl < Duration::from_secs(1) {
            return Err(CaError::ZeroTtl);
        }
        let authority = self.active_x509()?;
        let mut not_after = authority.not_after;
        for cap in [ttl, self.max_svid_ttl] {
            if let Some(t) = now.checked_add(cap) {
                not_after = not_after.min(t);
            }
        }
        let not_after = floor_secs(not_after);
        if not_after <= now {
            return Err(CaError::AuthorityExpired {
                not_after: authority.not_after,
            });
        }
        let mut sans = Vec::with_capacity(1 + dns_names.len() + ips.len());
        sans.push(SanType::URI(Ia5String::try_from(spiffe_id.as_str())?));
        for name in dns_names {
            if !valid_dns_name(name) {
                return Err(CaError::InvalidDnsName { name: name.clone() });
            }
            sans.push(SanType::DnsName(Ia5String::try_from(name.as_str())?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));

        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        params.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH))?;
        params.not_after = to_offset(not_after)?;
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        // ExplicitNoCa writes a critical basicConstraints with cA=false and the SKI.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(subject_key, &authority.issuer)?;
        Ok(IssuedSvid {
            spiffe_id: spiffe_id.clone(),
            cert_chain_der: vec![cert.der().to_vec()],
            serial_hex,
            not_after,
        })
    }

    /// Signs an ES256 JWT-SVID: header `alg`, `kid` (the active key's id),
    /// `typ: JWT`; claims `sub`, `aud` (array, at least one non-empty
    /// entry), `exp = now + min(ttl, max_svid_ttl)` in whole seconds,
    /// `iat`, and `jti` (128 random bits, hex). Returns the token and `exp`.
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Secret, SystemTime), CaError> {
        self.check_subject(spiffe_id)?;
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(CaError::EmptyAudience);
        }
        let ttl = ttl.min(self.max_svid_ttl);
        if ttl < Duration::from_secs(1) {
            return Err(CaError::ZeroTtl);
        }
        let iat = unix_secs(now);
        let exp = iat.saturating_add(ttl.as_secs());
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| CaError::Crypto("random jti"))?;
        let claims = json!({
            "sub": spiffe_id.as_str(),
            "aud": audience,
            "exp": exp,
            "iat": iat,
            "jti": hex::encode(jti),
        });
        let token = self.active_jwt()?.sign(&claims)?;
        Ok((Secret::new(token), UNIX_EPOCH + Duration::from_secs(exp)))
    }

    /// The current trust bundle: every X.509 authority and JWT key.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities: self
                .x509_authorities
                .iter()
                .map(|a| a.cert_der.clone())
                .collect(),
            jwt_authorities: self.jwt_keys.iter().map(JwtSigningKey::authority).collect(),
            sequence: self.sequence,
            refresh_hint_secs: self.refresh_hint_secs,
        }
    }

    /// A certificate and fresh key for the broker's own HTTPS listener: an
    /// X509-SVID for `spiffe://<td>/baton/broker` with `dns_names` as DNS
    /// SANs and the IP SAN 127.0.0.1, issued like any other SVID.
    pub fn broker_serving_identity(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<Vec<u8>>, PrivateKeyBytes), CaError> {
        let id = self.trust_domain.id(BROKER_ID_PATH)?;
        let key = WorkloadKey::generate()?;
        let svid = self.issue(
            key.key_pair(),
            &id,
            dns_names,
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ttl,
            now,
        )?;
        Ok((
            svid.cert_chain_der,
            PrivateKeyBytes::new(key.pkcs8_der().to_vec()),
        ))
    }
}

fn new_p256_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn load_x509_authority(
    dir: &Path,
    td: &TrustDomain,
    ca_ttl: Duration,
    now: SystemTime,
) -> Result<X509Authority, CaError> {
    let key_path = dir.join(X509_KEY_FILE);
    let cert_path = dir.join(X509_CERT_FILE);
    let create_all = || -> Result<X509Authority, CaError> {
        let key = new_p256_key()?;
        // Key first: if we crash before the certificate lands, the next
        // start sees a mismatched certificate and re-signs for this key.
        keystore::write_key(&key_path, key.serialized_der())?;
        let authority = X509Authority::create(td, ca_ttl, key, now)?;
        keystore::write_public(&cert_path, &authority.cert_der)?;
        Ok(authority)
    };
    let Some(key_der) = keystore::read_key(&key_path)? else {
        return create_all();
    };
    let key = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(key_der.as_slice()),
        &PKCS_ECDSA_P256_SHA256,
    )
    .map_err(|e| CaError::CorruptStore {
        path: key_path.clone(),
        reason: format!("not a P-256 PKCS#8 key: {e}"),
    })?;
    let recertify = |key: KeyPair| -> Result<X509Authority, CaError> {
        let authority = X509Authority::create(td, ca_ttl, key, now)?;
        keystore::write_public(&cert_path, &authority.cert_der)?;
        Ok(authority)
    };
    let Some(cert_der) = keystore::read_public(&cert_path)? else {
        return recertify(key);
    };
    let (matches_key, not_after) = {
        let cert = parse_cert(&cert_der).map_err(|e| CaError::CorruptStore {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        let uris = uri_sans(&cert)?;
        if !uris.contains(&td.id_string().as_str()) {
            return Err(CaError::TrustDomainMismatch {
                path: cert_path.clone(),
                expected: td.clone(),
                found: if uris.is_empty() {
                    "(no URI SAN)".to_owned()
                } else {
                    uris.join(", ")
                },
            });
        }
        (
            cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
            from_unix_i64(cert.validity().not_after.timestamp()),
        )
    };
    if now >= not_after {
        return create_all();
    }
    if !matches_key {
        return recertify(key);
    }
    X509Authority::from_parts(cert_der, key)
}

fn load_jwt_key(dir: &Path) -> Result<JwtSigningKey, CaError> {
    let path = dir.join(JWT_KEY_FILE);
    match keystore::read_key(&path)? {
        Some(der) => JwtSigningKey::from_pkcs8(&der).map_err(|e| CaError::CorruptStore {
            path,
            reason: e.to_string(),
        }),
        None => {
            let der = JwtSigningKey::generate_pkcs8()?;
            keystore::write_key(&path, &der)?;
            JwtSigningKey::from_pkcs8(&der)
        }
    }
}
