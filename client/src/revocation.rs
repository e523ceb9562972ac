//! Refusing nodes whose certificate serial is revoked: a TLS server
//! certificate verifier that runs rustls' normal webpki checks (chain to the
//! cluster CA, validity, the endpoint's node name) and then refuses an
//! end-entity certificate whose serial is in the client's deny-list, the
//! list a node keeps as `revoked_serials`.

use lattice_core::serial::serial_hex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::collections::BTreeSet;
use std::sync::Arc;

/// A serial as the deny-list compares it (see [`lattice_core::serial`]).
pub fn normalize_serial(s: &str) -> Result<String, String> {
    lattice_core::serial::normalize_serial(s).map_err(|e| format!("revoked serial {s:?}: {e}"))
}

/// Why a node's certificate was refused after it verified.
struct Revoked(String);

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node's certificate (serial {}) is revoked (in revoked_serials)",
            self.0
        )
    }
}

// rustls and quinn report an `OtherError` by its `Debug`: the message is
// what the caller sees.
impl std::fmt::Debug for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Revoked {}

/// rustls' webpki verifier, then the deny-list.
#[derive(Debug)]
pub(crate) struct RevocationVerifier {
    inner: Arc<WebPkiServerVerifier>,
    revoked: BTreeSet<String>,
}

impl RevocationVerifier {
    pub(crate) fn new(inner: Arc<WebPkiServerVerifier>, revoked: BTreeSet<String>) -> RevocationVerifier {
        RevocationVerifier { inner, revoked }
    }

    /// The listed serial of `cert`, if it is listed (or cannot be parsed).
    fn revoked(&self, cert: &CertificateDer<'_>) -> Option<String> {
        match x509_parser::parse_x509_certificate(cert) {
            Ok((_, c)) => Some(serial_hex(c.raw_serial())).filter(|s| self.revoked.contains(s)),
            Err(_) => Some("unparsable".into()),
        }
    }
}

impl ServerCertVerifier for RevocationVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        if let Some(serial) = self.revoked(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(Revoked(serial))),
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spelling itself is `lattice_core::serial`'s (tested there); the
    /// SDK's error names the entry it refused.
    #[test]
    fn serials_are_compared_in_one_form() {
        assert_eq!(normalize_serial("0A:1b").unwrap(), "0a1b");
        let e = normalize_serial("xyz").unwrap_err();
        assert!(e.contains("revoked serial \"xyz\""), "{e}");
    }
}
