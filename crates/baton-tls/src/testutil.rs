//! Test PKI made with rcgen: a self-signed CA per trust domain and
//! X509-SVID leaves, with a hook to break any leaf rule.
//!
//! Every certificate gets an explicit validity window (rcgen's default is
//! 1975–4096) and a distinct serial (rcgen's default reuses one per key).

use std::sync::atomic::{AtomicU64, Ordering};

use baton_core::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{BundleStore, ClientIdentity, ServerIdentity};

static SERIAL: AtomicU64 = AtomicU64::new(1);

fn window(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::hours(1);
    params.serial_number = Some(SERIAL.fetch_add(1, Ordering::Relaxed).into());
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A signing CA for one trust domain.
pub(crate) struct TestCa {
    pub(crate) td: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    der: Vec<u8>,
}

/// A leaf chain (leaf first) and its PKCS#8 key.
pub(crate) struct Leaf {
    pub(crate) chain: Vec<Vec<u8>>,
    pub(crate) key: Vec<u8>,
}

impl Leaf {
    pub(crate) fn der(&self) -> rustls_pki_types::CertificateDer<'static> {
        self.chain[0].clone().into()
    }
    pub(crate) fn intermediates(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.chain[1..].iter().cloned().map(Into::into).collect()
    }
    pub(crate) fn server_identity(&self) -> ServerIdentity {
        ServerIdentity::new(self.chain.clone(), &self.key).unwrap()
    }
    pub(crate) fn client_identity(&self) -> ClientIdentity {
        ClientIdentity::new(self.chain.clone(), &self.key).unwrap()
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    window(&mut params);
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Parameters of a well-formed X509-SVID for `id`.
pub(crate) fn svid_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    window(&mut params);
    params.subject_alt_names = vec![uri(id)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

impl TestCa {
    pub(crate) fn new(td: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let params = ca_params(&format!("{td} test CA"));
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Self {
            td: td.parse().unwrap(),
            issuer: Issuer::new(params, key),
            der,
        }
    }

    pub(crate) fn der(&self) -> Vec<u8> {
        self.der.clone()
    }

    /// A bundle store trusting only this CA for its trust domain.
    pub(crate) fn bundles(&self) -> BundleStore {
        let store = BundleStore::new();
        store.set(self.td.clone(), vec![self.der()]);
        store
    }

    /// A good SVID for `spiffe://<td><path>`.
    pub(crate) fn leaf(&self, path: &str) -> Leaf {
        self.leaf_with(path, |_| {})
    }

    /// An SVID for `spiffe://<td><path>` after `tweak` has edited it.
    pub(crate) fn leaf_with(&self, path: &str, tweak: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut params = svid_params(&format!("spiffe://{}{path}", self.td));
        tweak(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain: vec![cert.der().to_vec()],
            key: key.serialize_der(),
        }
    }

    /// A good SVID signed by an intermediate CA under this one; the chain
    /// holds the leaf then the intermediate.
    pub(crate) fn leaf_via_intermediate(&self, path: &str) -> Leaf {
        let int_key = KeyPair::generate().unwrap();
        let int_params = ca_params("intermediate");
        let int_cert = int_params.signed_by(&int_key, &self.issuer).unwrap();
        let int_issuer = Issuer::new(int_params, int_key);
        let params = svid_params(&format!("spiffe://{}{path}", self.td));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &int_issuer).unwrap();
        Leaf {
            chain: vec![cert.der().to_vec(), int_cert.der().to_vec()],
            key: key.serialize_der(),
        }
    }
}
