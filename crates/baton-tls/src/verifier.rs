use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::svid::verify_svid_for_usage;
use crate::{BundleStore, ClientAuth, PeerPolicy, SvidError};

fn to_rustls(err: SvidError) -> rustls::Error {
    // `Other` keeps our message, so the handshake failure logged by the
    // accept loop names the broken rule.
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Verifies client X509-SVIDs on a server (the client side of mTLS).
///
/// Runs [`verify_svid`](crate::verify_svid) (requiring the clientAuth EKU
/// when the leaf has an EKU extension) against the bundle store at each
/// handshake. Sends no CA hints: SPIFFE clients pick their SVID themselves.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: BundleStore,
    policy: PeerPolicy,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    /// `client_auth` says whether a client may connect without a certificate
    /// (routes then see `PeerIdentity(None)` and must decide themselves).
    pub fn new(bundles: BundleStore, policy: PeerPolicy, client_auth: ClientAuth) -> Self {
        Self {
            bundles,
            policy,
            mandatory: matches!(client_auth, ClientAuth::Required),
            algorithms: crate::provider().signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_svid_for_usage(
            end_entity,
            intermediates,
            &self.bundles,
            &self.policy,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map(|_| ClientCertVerified::assertion())
        .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a server's X509-SVID on a client.
///
/// Validates the chain and the SPIFFE ID against `policy`, requiring the
/// serverAuth EKU when the leaf has an EKU extension. The DNS name the
/// client dialled is ignored: SPIFFE server certificates need no DNS SAN,
/// and the SPIFFE ID policy is what names the server.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: BundleStore,
    policy: PeerPolicy,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundles: BundleStore, policy: PeerPolicy) -> Self {
        Self {
            bundles,
            policy,
            algorithms: crate::provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_svid_for_usage(
            end_entity,
            intermediates,
            &self.bundles,
            &self.policy,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
