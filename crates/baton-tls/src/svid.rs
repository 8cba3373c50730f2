use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_core::{SpiffeId, TrustDomain};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{BundleStore, SvidError};

/// Which verified peers may connect (server side of mTLS) or which servers
/// we expect to reach (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any SPIFFE ID whose trust domain is in the list (and has a bundle).
    AnyInTrustDomains(Vec<TrustDomain>),
    /// Exactly these SPIFFE IDs.
    Exact(Vec<SpiffeId>),
}

impl PeerPolicy {
    /// True when `id` is allowed by this policy.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            PeerPolicy::AnyInTrustDomains(tds) => tds.iter().any(|td| id.is_member_of(td)),
            PeerPolicy::Exact(ids) => ids.contains(id),
        }
    }
}

/// A peer X509-SVID that passed [`verify_svid`].
///
/// Only `verify_svid` builds one, so holding it proves the checks ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    spiffe_id: SpiffeId,
}

impl VerifiedSvid {
    /// The peer's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The peer's SPIFFE ID, by value.
    pub fn into_spiffe_id(self) -> SpiffeId {
        self.spiffe_id
    }
}

/// Verifies a peer's X509-SVID chain.
///
/// In order: the leaf rules of the X509-SVID standard that rustls-webpki
/// does not enforce (exactly one URI SAN holding a SPIFFE ID with a path,
/// `cA=false`, KeyUsage with `digitalSignature` and without
/// `keyCertSign`/`cRLSign`); then RFC 5280 path validation by webpki
/// against the bundle of the leaf's own trust domain, read from `bundles`
/// now (so a swapped bundle applies to the next handshake); then `policy`.
///
/// The leaf rules are checked before the chain only so that the error names
/// the broken rule (webpki would report a CA leaf as a generic chain error);
/// a certificate is accepted only if every check passes.
///
/// webpki also refuses leaves under a CA carrying URI name constraints;
/// Baton's CA does not set them.
///
/// The leaf's extended key usage, if present, must allow clientAuth or
/// serverAuth; the rustls verifiers of this crate require the one matching
/// the peer's role.
pub fn verify_svid(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &BundleStore,
    policy: &PeerPolicy,
    now: UnixTime,
) -> Result<VerifiedSvid, SvidError> {
    verify_svid_for_usage(
        end_entity,
        intermediates,
        bundles,
        policy,
        now,
        AnySvidUsage,
    )
}

pub(crate) fn verify_svid_for_usage(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &BundleStore,
    policy: &PeerPolicy,
    now: UnixTime,
    usage: impl webpki::ExtendedKeyUsageValidator,
) -> Result<VerifiedSvid, SvidError> {
    let id = check_leaf(end_entity)?;
    let td = id.trust_domain();
    let authorities = bundles
        .authorities(td)
        .filter(|a| !a.anchors.is_empty())
        .ok_or_else(|| SvidError::UntrustedTrustDomain { td: td.clone() })?;

    let leaf = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|err| SvidError::Malformed(err.to_string()))?;
    let algs = crate::provider().signature_verification_algorithms;
    let result = leaf.verify_for_usage(
        algs.all,
        &authorities.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    );
    if let Err(err) = result {
        return Err(match err {
            webpki::Error::CertExpired { .. } => SvidError::Expired { id },
            webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid { id },
            other => SvidError::BadChain {
                td: td.clone(),
                reason: other.to_string(),
                id,
            },
        });
    }

    if !policy.allows(&id) {
        return Err(SvidError::NotAllowed { id });
    }
    Ok(VerifiedSvid { spiffe_id: id })
}

const OID_SERVER_AUTH: [usize; 9] = [1, 3, 6, 1, 5, 5, 7, 3, 1];
const OID_CLIENT_AUTH: [usize; 9] = [1, 3, 6, 1, 5, 5, 7, 3, 2];

/// Accepts a leaf whose EKU, if present, allows clientAuth or serverAuth.
///
/// Used when the caller does not say which end of the connection the peer
/// is; the rustls verifiers ask for the precise purpose instead.
#[derive(Debug, Clone, Copy)]
struct AnySvidUsage;

impl webpki::ExtendedKeyUsageValidator for AnySvidUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        let mut present = Vec::new();
        for purpose in iter {
            let oid = purpose?.to_decoded_oid();
            if oid == OID_SERVER_AUTH || oid == OID_CLIENT_AUTH {
                return Ok(());
            }
            present.push(oid);
        }
        if present.is_empty() {
            return Ok(());
        }
        Err(webpki::Error::RequiredEkuNotFoundContext(
            webpki::RequiredEkuNotFoundContext {
                required: webpki::KeyUsage::client_auth(),
                present,
            },
        ))
    }
}

/// The leaf rules of the X509-SVID standard; returns the SPIFFE ID.
fn check_leaf(end_entity: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    let cert = parse(end_entity)?;
    let id = spiffe_id_of(&cert)?;
    if id.is_trust_domain_id() {
        return Err(SvidError::TrustDomainIdAsLeaf { id });
    }
    let bc = cert
        .basic_constraints()
        .map_err(|err| SvidError::Malformed(err.to_string()))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(SvidError::LeafIsCa { id });
    }
    let ku = cert
        .key_usage()
        .map_err(|err| SvidError::Malformed(err.to_string()))?;
    let Some(ku) = ku else {
        return Err(SvidError::MissingKeyUsage { id });
    };
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature { id });
    }
    if ku.value.key_cert_sign() {
        return Err(SvidError::KeyCertSign { id });
    }
    if ku.value.crl_sign() {
        return Err(SvidError::CrlSign { id });
    }
    Ok(id)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, SvidError> {
    let (rest, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|err| SvidError::Malformed(err.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed(
            "trailing bytes after the certificate".to_owned(),
        ));
    }
    Ok(cert)
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|err| SvidError::Malformed(err.to_string()))?;
    let uris: Vec<&str> = san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(|source| SvidError::InvalidSpiffeId {
            uri: (*uri).to_owned(),
            source,
        }),
        more => Err(SvidError::MultipleUriSans { count: more.len() }),
    }
}

/// The SPIFFE ID of a leaf that a verifier of this crate already accepted.
/// When a verified leaf stops being valid (its notAfter).
pub(crate) fn not_after_of_verified_leaf(end_entity: &CertificateDer<'_>) -> Option<SystemTime> {
    let secs = parse(end_entity).ok()?.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

pub(crate) fn spiffe_id_of_verified_leaf(
    end_entity: &CertificateDer<'_>,
) -> Result<SpiffeId, SvidError> {
    spiffe_id_of(&parse(end_entity)?)
}

#[cfg(test)]
mod tests {
    use rcgen::{IsCa, KeyUsagePurpose, SanType};

    use super::*;
    use crate::testutil::TestCa;

    fn any(ca: &TestCa) -> PeerPolicy {
        PeerPolicy::AnyInTrustDomains(vec![ca.td.clone()])
    }

    fn check(ca: &TestCa, leaf: &crate::testutil::Leaf) -> Result<VerifiedSvid, SvidError> {
        verify_svid(
            &leaf.der(),
            &leaf.intermediates(),
            &ca.bundles(),
            &any(ca),
            UnixTime::now(),
        )
    }

    #[test]
    fn good_svid_is_accepted() {
        let ca = TestCa::new("example.org");
        let ok = check(&ca, &ca.leaf("/agent/one")).unwrap();
        assert_eq!(ok.spiffe_id().as_str(), "spiffe://example.org/agent/one");
    }

    #[test]
    fn chain_through_intermediate_is_accepted() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_via_intermediate("/agent/two");
        let ok = check(&ca, &leaf).unwrap();
        assert_eq!(ok.into_spiffe_id().path(), "/agent/two");
    }

    #[test]
    fn leaf_without_uri_san_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| {
            p.subject_alt_names = vec![SanType::DnsName("x.example.org".try_into().unwrap())]
        });
        assert_eq!(check(&ca, &leaf), Err(SvidError::NoUriSan));
    }

    #[test]
    fn leaf_with_two_uri_sans_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| {
            p.subject_alt_names
                .push(SanType::URI("spiffe://example.org/y".try_into().unwrap()))
        });
        assert_eq!(
            check(&ca, &leaf),
            Err(SvidError::MultipleUriSans { count: 2 })
        );
    }

    #[test]
    fn leaf_with_non_spiffe_uri_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| {
            p.subject_alt_names = vec![SanType::URI("https://example.org/x".try_into().unwrap())]
        });
        assert!(matches!(
            check(&ca, &leaf),
            Err(SvidError::InvalidSpiffeId { .. })
        ));
    }

    #[test]
    fn trust_domain_id_as_leaf_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf("");
        assert!(matches!(
            check(&ca, &leaf),
            Err(SvidError::TrustDomainIdAsLeaf { .. })
        ));
    }

    #[test]
    fn ca_leaf_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| {
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
        });
        assert!(matches!(check(&ca, &leaf), Err(SvidError::LeafIsCa { .. })));
    }

    #[test]
    fn key_cert_sign_leaf_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign));
        assert!(matches!(
            check(&ca, &leaf),
            Err(SvidError::KeyCertSign { .. })
        ));
    }

    #[test]
    fn crl_sign_leaf_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| p.key_usages.push(KeyUsagePurpose::CrlSign));
        assert!(matches!(check(&ca, &leaf), Err(SvidError::CrlSign { .. })));
    }

    #[test]
    fn leaf_without_key_usage_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| p.key_usages.clear());
        assert!(matches!(
            check(&ca, &leaf),
            Err(SvidError::MissingKeyUsage { .. })
        ));
    }

    #[test]
    fn leaf_without_digital_signature_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]
        });
        assert!(matches!(
            check(&ca, &leaf),
            Err(SvidError::NoDigitalSignature { .. })
        ));
    }

    #[test]
    fn leaf_for_code_signing_only_is_refused() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf_with("/x", |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning]
        });
        assert!(matches!(check(&ca, &leaf), Err(SvidError::BadChain { .. })));
    }

    #[test]
    fn other_trust_domain_is_refused_with_a_readable_message() {
        let ours = TestCa::new("example.org");
        let theirs = TestCa::new("other.org");
        let leaf = theirs.leaf("/intruder");
        let err = verify_svid(
            &leaf.der(),
            &[],
            &ours.bundles(),
            &any(&ours),
            UnixTime::now(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            SvidError::UntrustedTrustDomain {
                td: theirs.td.clone()
            }
        );
        assert!(err.to_string().contains("trust domain other.org"), "{err}");
    }

    #[test]
    fn same_name_different_ca_is_refused() {
        let real = TestCa::new("example.org");
        let fake = TestCa::new("example.org");
        let leaf = fake.leaf("/agent");
        let err = check(&real, &leaf).unwrap_err();
        assert!(matches!(err, SvidError::BadChain { .. }), "{err}");
    }

    #[test]
    fn expired_and_not_yet_valid_are_distinct() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf("/agent");
        let bundles = ca.bundles();
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            UnixTime::now().as_secs() + 2 * 3600,
        ));
        // The CA expires with the leaf; webpki reports the leaf first.
        let err = verify_svid(&leaf.der(), &[], &bundles, &any(&ca), later).unwrap_err();
        assert!(matches!(err, SvidError::Expired { .. }), "{err}");
        let earlier = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            UnixTime::now().as_secs() - 3600,
        ));
        let err = verify_svid(&leaf.der(), &[], &bundles, &any(&ca), earlier).unwrap_err();
        assert!(matches!(err, SvidError::NotYetValid { .. }), "{err}");
    }

    #[test]
    fn policy_is_enforced_after_the_chain() {
        let ca = TestCa::new("example.org");
        let leaf = ca.leaf("/agent/a");
        let only_b = PeerPolicy::Exact(vec!["spiffe://example.org/agent/b".parse().unwrap()]);
        let err =
            verify_svid(&leaf.der(), &[], &ca.bundles(), &only_b, UnixTime::now()).unwrap_err();
        assert!(matches!(err, SvidError::NotAllowed { .. }), "{err}");

        let other_td = PeerPolicy::AnyInTrustDomains(vec!["other.org".parse().unwrap()]);
        let err =
            verify_svid(&leaf.der(), &[], &ca.bundles(), &other_td, UnixTime::now()).unwrap_err();
        assert!(matches!(err, SvidError::NotAllowed { .. }), "{err}");
    }

    #[test]
    fn bundle_changes_apply_at_once() {
        let old = TestCa::new("example.org");
        let new = TestCa::new("example.org");
        let bundles = old.bundles();
        let old_leaf = old.leaf("/a");
        let new_leaf = new.leaf("/a");
        let policy = any(&old);
        let now = UnixTime::now();
        assert!(verify_svid(&old_leaf.der(), &[], &bundles, &policy, now).is_ok());
        bundles.set(old.td.clone(), vec![new.der()]);
        assert!(verify_svid(&old_leaf.der(), &[], &bundles, &policy, now).is_err());
        assert!(verify_svid(&new_leaf.der(), &[], &bundles, &policy, now).is_ok());
        bundles.remove(&old.td);
        assert!(matches!(
            verify_svid(&new_leaf.der(), &[], &bundles, &policy, now),
            Err(SvidError::UntrustedTrustDomain { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        let ca = TestCa::new("example.org");
        let der = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        let err = verify_svid(&der, &[], &ca.bundles(), &any(&ca), UnixTime::now()).unwrap_err();
        assert!(matches!(err, SvidError::Malformed(_)), "{err}");
    }

    #[test]
    fn try_set_refuses_garbage_and_set_drops_it() {
        let ca = TestCa::new("example.org");
        let store = BundleStore::new();
        assert!(store.try_set(ca.td.clone(), vec![vec![1, 2, 3]]).is_err());
        assert!(store.get(&ca.td).is_none());
        store.set(ca.td.clone(), vec![vec![1, 2, 3], ca.der()]);
        assert_eq!(store.get(&ca.td).unwrap().len(), 2);
        let leaf = ca.leaf("/a");
        assert!(verify_svid(&leaf.der(), &[], &store, &any(&ca), UnixTime::now()).is_ok());
    }
}
