//! The cluster's certificates (rcgen) and the TLS configurations built from
//! them (rustls, for quinn).
//!
//! One cluster CA signs a certificate per node (CN and DNS name = the node
//! name, OU `node`) and, optionally, per client (OU `client`). Peers must
//! present a node certificate from the cluster CA; clients authenticate with
//! a bearer token or a client certificate.

use anyhow::{bail, Context, Result};
use lattice_core::proto::client::{CLIENT_ALPN, PEER_ALPN};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::Path;
use std::sync::Arc;

/// Organizational unit of node certificates.
pub const NODE_OU: &str = "node";
/// Organizational unit of client certificates.
pub const CLIENT_OU: &str = "client";

/// A certificate and its key, PEM encoded.
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

/// Node names must be valid DNS labels: they are the TLS server names.
pub fn check_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("node name {name:?} must be 1-63 characters of a-z, 0-9 and '-' (it is the TLS server name)");
    }
    Ok(())
}

/// Creates a new cluster CA.
pub fn new_ca(cluster: &str) -> Result<Pem> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, format!("Lattice cluster CA {cluster}"));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn leaf(ca: &Pem, cn: &str, ou: &str, dns: Vec<String>) -> Result<Pem> {
    let ca_key = KeyPair::from_pem(&ca.key).context("reading the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).context("reading the CA certificate")?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(dns)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationalUnitName, ou);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A node certificate: usable as TLS server and client, named `node`
/// (also valid for `localhost` so clients can dial 127.0.0.1 by name).
pub fn new_node_cert(ca: &Pem, node: &str) -> Result<Pem> {
    check_node_name(node)?;
    leaf(ca, node, NODE_OU, vec![node.to_string(), "localhost".to_string()])
}

/// A client certificate named `client`.
pub fn new_client_cert(ca: &Pem, client: &str) -> Result<Pem> {
    leaf(ca, client, CLIENT_OU, Vec::new())
}

/// Writes `name.pem` and `name.key` (mode 0600) into `dir`.
pub fn write_pem(dir: &Path, name: &str, pem: &Pem) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert = dir.join(format!("{name}.pem"));
    std::fs::write(&cert, &pem.cert).with_context(|| format!("writing {}", cert.display()))?;
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&key, &pem.key).with_context(|| format!("writing {}", key.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Reads `name.pem` and `name.key` from `dir`.
pub fn read_pem(dir: &Path, name: &str) -> Result<Pem> {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    Ok(Pem {
        cert: std::fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?,
        key: std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?,
    })
}

/// Parses PEM certificates (a chain).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.context("parsing a PEM certificate")?;
        if p.label == "CERTIFICATE" {
            out.push(CertificateDer::from(p.contents));
        }
    }
    if out.is_empty() {
        bail!("no certificate in PEM input");
    }
    Ok(out)
}

/// Parses a PKCS#8 PEM private key.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.context("parsing a PEM key")?;
        if p.label == "PRIVATE KEY" {
            return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(p.contents)));
        }
    }
    bail!("no PKCS#8 private key in PEM input")
}

/// The CN and OU of a DER certificate.
pub fn subject_of(der: &[u8]) -> Result<(String, String)> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| anyhow::anyhow!("parsing a peer certificate: {e}"))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((cn, ou))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c).context("adding the cluster CA")?;
    }
    Ok(roots)
}

/// The node's TLS server config: its certificate; client certificates from
/// the cluster CA are verified when presented and required on the peer
/// ALPN (checked after the handshake); both ALPNs offered.
pub fn server_tls(ca_pem: &str, node: &Pem) -> Result<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from_pem(&node.cert)?, key_from_pem(&node.key)?)
        .context("loading the node certificate")?;
    tls.alpn_protocols = vec![PEER_ALPN.to_vec(), CLIENT_ALPN.to_vec()];
    Ok(tls)
}

/// TLS client config for dialling a peer (presents the node certificate)
/// or, with `identity` = None, for a token-authenticated client.
pub fn client_tls(ca_pem: &str, identity: Option<&Pem>, alpn: &[u8]) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(certs_from_pem(&id.cert)?, key_from_pem(&id.key)?)
            .context("loading the client certificate")?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_carry_name_and_role() {
        let ca = new_ca("test").unwrap();
        let n1 = new_node_cert(&ca, "n1").unwrap();
        let der = certs_from_pem(&n1.cert).unwrap();
        assert_eq!(subject_of(&der[0]).unwrap(), ("n1".to_string(), NODE_OU.to_string()));
        assert!(server_tls(&ca.cert, &n1).is_ok());
        assert!(client_tls(&ca.cert, Some(&n1), PEER_ALPN).is_ok());
        assert!(new_node_cert(&ca, "Bad Name").is_err());
    }
}
