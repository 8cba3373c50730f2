//! One X.509 signing authority: a self-signed root, or an intermediate
//! signed by an upstream PKI. Parsed once at load so issuance never
//! re-reads the CA certificate.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_core::TrustDomain;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::ParsedExtension;

use crate::CaError;
use crate::ca::BACKDATE;
use crate::time_util::{from_unix_i64, to_offset, unix_secs};
use crate::x509::{parse_cert, random_serial, uri_sans};

/// An existing PKI the broker runs under: the CA certificate that signs
/// Baton's intermediates, its key, and the chain above it up to the root.
pub struct UpstreamAuthority {
    /// The signing CA certificate first, the root last (one element when
    /// the upstream CA is itself the root).
    chain_der: Vec<Vec<u8>>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl fmt::Debug for UpstreamAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuthority")
            .field("chain_len", &self.chain_der.len())
            .field("not_after", &unix_secs(self.not_after))
            .finish_non_exhaustive()
    }
}

impl UpstreamAuthority {
    /// Reads the upstream CA from PEM files: `cert_path` holds the signing
    /// CA certificate first and, after it, every certificate up to and
    /// including the root; `key_path` holds the signing CA's PKCS#8 key
    /// (mode 0600).
    pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let certs_pem = std::fs::read_to_string(cert_path).map_err(|source| CaError::Io {
            path: cert_path.to_owned(),
            source,
        })?;
        let key_der = crate::keystore::read_key_pem(key_path)?;
        let chain_der = crate::bundle::pem_certificates(&certs_pem)
            .map_err(|e| CaError::Upstream(format!("{}: {e}", cert_path.display())))?;
        Self::from_der(chain_der, &key_der)
            .map_err(|e| CaError::Upstream(format!("{}: {e}", cert_path.display())))
    }

    /// Builds the upstream from DER certificates (signing CA first, root
    /// last) and the signing CA's PKCS#8 key.
    pub fn from_der(chain_der: Vec<Vec<u8>>, key_pkcs8: &[u8]) -> Result<Self, CaError> {
        let first = chain_der
            .first()
            .ok_or_else(|| CaError::Upstream("no certificate in the upstream chain".into()))?;
        let key = KeyPair::try_from(key_pkcs8)
            .map_err(|e| CaError::Upstream(format!("the upstream key is not usable: {e}")))?;
        let not_after = {
            let cert = parse_cert(first)?;
            let bc = cert
                .basic_constraints()
                .map_err(|e| CaError::Upstream(e.to_string()))?;
            if !bc.is_some_and(|b| b.value.ca) {
                return Err(CaError::Upstream(
                    "the first certificate is not a CA certificate (basicConstraints cA=false)"
                        .into(),
                ));
            }
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::Upstream(
                    "the key does not belong to the first certificate of the chain".into(),
                ));
            }
            from_unix_i64(cert.validity().not_after.timestamp())
        };
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(first.as_slice()), key)?;
        Ok(Self {
            chain_der,
            issuer,
            not_after,
        })
    }

    /// The root certificate: what trust bundles carry.
    pub fn root_der(&self) -> &[u8] {
        self.chain_der.last().map_or(&[], Vec::as_slice)
    }

    /// Certificates between an intermediate and the root (the root left
    /// out: relying parties have it in their bundle).
    pub(crate) fn chain_below_root(&self) -> &[Vec<u8>] {
        match self.chain_der.split_last() {
            Some((_, rest)) => rest,
            None => &[],
        }
    }
}

/// One X.509 signing authority.
pub(crate) struct X509Key {
    /// Lowercase hex of the certificate's subjectKeyIdentifier: the id
    /// operators use and that every leaf names in its authorityKeyIdentifier.
    pub(crate) id: String,
    pub(crate) cert_der: Vec<u8>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// Certificates that follow the authority in an SVID's chain (an
    /// upstream's intermediates); empty for a self-signed root.
    pub(crate) chain_tail: Vec<Vec<u8>>,
    /// Whether the bundle carries an upstream root for it instead of its
    /// own certificate.
    pub(crate) upstream_root: Option<Vec<u8>>,
}

impl fmt::Debug for X509Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Key")
            .field("id", &self.id)
            .field("not_after", &unix_secs(self.not_after))
            .field("upstream", &self.upstream_root.is_some())
            .finish_non_exhaustive()
    }
}

impl X509Key {
    /// Makes a new authority for `key`: self-signed, or signed by `upstream`.
    pub(crate) fn create(
        td: &TrustDomain,
        ca_ttl: Duration,
        key: KeyPair,
        upstream: Option<&UpstreamAuthority>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        params.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH))?;
        let mut not_after = now
            .checked_add(ca_ttl)
            .ok_or(CaError::TimeOutOfRange(now))?;
        if let Some(up) = upstream {
            if up.not_after <= now {
                return Err(CaError::Upstream(format!(
                    "the upstream CA expired at unix time {}",
                    unix_secs(up.not_after)
                )));
            }
            not_after = not_after.min(up.not_after);
        }
        params.not_after = to_offset(not_after)?;
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        // Distinct subjects per authority keep path building unambiguous
        // while rotation puts two authorities in one bundle.
        let short: String = serial_hex.chars().take(16).collect();
        dn.push(DnType::CommonName, format!("Baton CA {short}"));
        params.distinguished_name = dn;
        // Path length 0: it signs leaves only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(td.id_string())?)];
        let cert = match upstream {
            None => params.self_signed(&key)?,
            Some(up) => {
                params.use_authority_key_identifier_extension = true;
                params.signed_by(&key, &up.issuer)?
            }
        };
        Self::from_parts(cert.der().to_vec(), key, upstream)
    }

    /// Rebuilds an authority from its persisted certificate and key.
    pub(crate) fn from_parts(
        cert_der: Vec<u8>,
        key: KeyPair,
        upstream: Option<&UpstreamAuthority>,
    ) -> Result<Self, CaError> {
        let (id, not_before, not_after, self_signed) = {
            let cert = parse_cert(&cert_der)?;
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(CaError::Certificate(
                    "the authority certificate does not belong to its key".into(),
                ));
            }
            (
                subject_key_id(&cert)?,
                from_unix_i64(cert.validity().not_before.timestamp()),
                from_unix_i64(cert.validity().not_after.timestamp()),
                cert.subject() == cert.issuer(),
            )
        };
        let (chain_tail, upstream_root) = match (self_signed, upstream) {
            (true, _) => (Vec::new(), None),
            (false, Some(up)) => (up.chain_below_root().to_vec(), Some(up.root_der().to_vec())),
            (false, None) => {
                return Err(CaError::Upstream(
                    "an authority signed by an upstream CA is persisted, but no upstream CA is configured; start the broker with the upstream CA again".into(),
                ));
            }
        };
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.as_slice()), key)?;
        Ok(Self {
            id,
            cert_der,
            issuer,
            not_before,
            not_after,
            chain_tail,
            upstream_root,
        })
    }

    /// Checks that the certificate names trust domain `td` (its URI SAN).
    pub(crate) fn check_trust_domain(&self, td: &TrustDomain, path: &Path) -> Result<(), CaError> {
        let cert = parse_cert(&self.cert_der)?;
        let uris = uri_sans(&cert)?;
        if uris.contains(&td.id_string().as_str()) {
            return Ok(());
        }
        Err(CaError::TrustDomainMismatch {
            path: path.to_owned(),
            expected: td.clone(),
            found: if uris.is_empty() {
                "(no URI SAN)".to_owned()
            } else {
                uris.join(", ")
            },
        })
    }

    /// What relying parties must trust for SVIDs of this authority.
    pub(crate) fn trust_anchor(&self) -> &[u8] {
        self.upstream_root.as_deref().unwrap_or(&self.cert_der)
    }
}

pub(crate) fn new_p256_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

pub(crate) fn p256_key_from_pkcs8(der: &[u8], path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::CorruptStore {
            path: path.to_owned(),
            reason: format!("not a P-256 PKCS#8 key: {e}"),
        })
}

fn subject_key_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<String, CaError> {
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(k) = ext.parsed_extension() {
            return Ok(hex::encode(k.0));
        }
    }
    Err(CaError::Certificate(
        "the authority certificate has no subjectKeyIdentifier".into(),
    ))
}

/// The authorityKeyIdentifier of a leaf, lowercase hex: the id of the
/// authority that signed it.
pub(crate) fn authority_key_id(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Option<String> {
    cert.extensions().iter().find_map(|ext| {
        if let ParsedExtension::AuthorityKeyIdentifier(aki) = ext.parsed_extension() {
            aki.key_identifier.as_ref().map(|k| hex::encode(k.0))
        } else {
            None
        }
    })
}
