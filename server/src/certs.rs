//! The cluster's certificates (rcgen) and the TLS configurations built from
//! them (rustls, for quinn).
//!
//! One cluster CA signs a certificate per node (CN and DNS name = the node
//! name, OU `node`) and, optionally, per client (OU `client`). Peers must
//! present a node certificate from the cluster CA; clients authenticate with
//! a bearer token. A node certificate names only its node (dev
//! certificates also name `localhost`), so the key of one node cannot pass
//! for another: peers and the SDK check each node against its own name.
//! Node and client certificates are valid for at most a year
//! ([`MAX_LEAF_DAYS`], renewed with `latticed certs renew`), the CA for ten;
//! serials (random, 128 bits) can be revoked with `revoked_serials`.

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

/// Longest validity of a node or client certificate, days.
pub const MAX_LEAF_DAYS: u32 = 365;
/// Validity of a cluster CA, days. Replacing a CA means handing every node
/// and client a new trust anchor, so it lives longer than the certificates
/// it signs; its key should stay offline.
pub const CA_DAYS: u32 = 3_650;
/// Certificates start to be valid this long before their creation, so a
/// node whose clock is a little behind accepts them.
const BACKDATE_SECS: i64 = 3_600;

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

/// Sets a certificate's validity (`days` from now, backdated by an hour)
/// and a random 128-bit serial (positive, as RFC 5280 wants).
fn stamp(p: &mut CertificateParams, days: u32) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs() as i64;
    let at = |secs: i64| {
        x509_parser::time::ASN1Time::from_timestamp(secs)
            .map(|t| t.to_datetime())
            .map_err(|e| anyhow::anyhow!("certificate date: {e}"))
    };
    p.not_before = at(now - BACKDATE_SECS)?;
    p.not_after = at(now + i64::from(days) * 86_400)?;
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x40; // positive, and always 16 bytes long
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(())
}

/// Creates a new cluster CA.
pub fn new_ca(cluster: &str) -> Result<Pem> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    stamp(&mut p, CA_DAYS)?;
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

fn leaf(ca: &Pem, cn: &str, ou: &str, dns: Vec<String>, days: u32) -> Result<Pem> {
    if days == 0 || days > MAX_LEAF_DAYS {
        bail!("certificates are issued for 1 to {MAX_LEAF_DAYS} days, not {days}");
    }
    let ca_key = KeyPair::from_pem(&ca.key).context("reading the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).context("reading the CA certificate")?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(dns)?;
    stamp(&mut p, days)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationalUnitName, ou);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A node certificate for `days` (at most [`MAX_LEAF_DAYS`]): usable as
/// TLS server and client, naming only `node`, so it cannot stand in for
/// another node.
pub fn new_node_cert_for(ca: &Pem, node: &str, days: u32) -> Result<Pem> {
    check_node_name(node)?;
    leaf(ca, node, NODE_OU, vec![node.to_string()], days)
}

/// [`new_node_cert_for`] for a year.
pub fn new_node_cert(ca: &Pem, node: &str) -> Result<Pem> {
    new_node_cert_for(ca, node, MAX_LEAF_DAYS)
}

/// A node certificate of a `latticed dev` cluster: also valid for
/// `localhost`, so a client given a bare `127.0.0.1:PORT` still connects.
/// Never use one outside loopback: any dev node's key passes for any other.
pub fn new_dev_node_cert(ca: &Pem, node: &str) -> Result<Pem> {
    check_node_name(node)?;
    leaf(
        ca,
        node,
        NODE_OU,
        vec![node.to_string(), "localhost".to_string()],
        MAX_LEAF_DAYS,
    )
}

/// A client certificate named `client`, valid for a year.
pub fn new_client_cert(ca: &Pem, client: &str) -> Result<Pem> {
    leaf(ca, client, CLIENT_OU, Vec::new(), MAX_LEAF_DAYS)
}

/// Writes `name.pem` and `name.key` into `dir` (created 0700). The key is
/// created 0600 and never overwritten: an existing one is an error.
pub fn write_pem(dir: &Path, name: &str, pem: &Pem) -> Result<()> {
    crate::files::private_dir(dir)?;
    let key = dir.join(format!("{name}.key"));
    crate::files::create_secret(&key, pem.key.as_bytes())?;
    let cert = dir.join(format!("{name}.pem"));
    crate::files::replace_secret(&cert, pem.cert.as_bytes())
}

/// Replaces `name.pem` and `name.key` in `dir` (renewal): each goes to a
/// fresh 0600 file first, then is renamed into place, key first.
pub fn replace_pem(dir: &Path, name: &str, pem: &Pem) -> Result<()> {
    crate::files::private_dir(dir)?;
    crate::files::replace_secret(&dir.join(format!("{name}.key")), pem.key.as_bytes())?;
    crate::files::replace_secret(&dir.join(format!("{name}.pem")), pem.cert.as_bytes())
}

/// What `latticed certs` prints about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Common name.
    pub cn: String,
    /// Organizational unit (`node`, `client` or empty for the CA).
    pub ou: String,
    /// Serial, as [`normalize_serial`] spells it.
    pub serial: String,
    /// Last second of validity, Unix time.
    pub not_after: i64,
    /// DNS names.
    pub dns: Vec<String>,
}

/// Name, serial, expiry and DNS names of a DER certificate.
pub fn info_of(der: &[u8]) -> Result<CertInfo> {
    let (cn, ou) = subject_of(der)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| anyhow::anyhow!("parsing a certificate: {e}"))?;
    let dns = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertInfo {
        cn,
        ou,
        serial: serial_hex(cert.raw_serial()),
        not_after: cert.validity().not_after.timestamp(),
        dns,
    })
}

pub use lattice_core::serial::{normalize_serial, serial_hex};

/// Serials a node refuses (the `revoked_serials` setting).
#[derive(Debug, Clone, Default)]
pub struct DenyList(std::collections::BTreeSet<String>);

impl DenyList {
    /// The deny-list of these serials (each as [`normalize_serial`] accepts).
    pub fn new(serials: &[String]) -> Result<DenyList> {
        serials
            .iter()
            .map(|s| normalize_serial(s).map_err(anyhow::Error::new))
            .collect::<Result<_>>()
            .map(DenyList)
    }

    /// The revoked serial in `chain`'s first certificate, if it is revoked
    /// (or cannot be parsed).
    pub fn revoked(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        let first = chain.first()?;
        match x509_parser::parse_x509_certificate(first) {
            Ok((_, cert)) => {
                let serial = serial_hex(cert.raw_serial());
                self.0.contains(&serial).then_some(serial)
            }
            Err(_) => Some("unparsable".into()),
        }
    }
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

/// TLS server config of the RESP listener: the node's certificate and key,
/// no client certificate (RESP clients authenticate with `AUTH <token>`),
/// TLS 1.2 or 1.3 (redis-cli and client libraries speak either), no ALPN.
pub fn resp_server_tls(node: &Pem) -> Result<rustls::ServerConfig> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs_from_pem(&node.cert)?, key_from_pem(&node.key)?)
        .context("loading the node certificate for the RESP listener")
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

    #[test]
    fn a_node_certificate_names_its_node_only_and_lives_a_year() {
        let ca = new_ca("test").unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let info = info_of(&certs_from_pem(&new_node_cert(&ca, "n1").unwrap().cert).unwrap()[0]).unwrap();
        assert_eq!(info.dns, vec!["n1".to_string()], "no localhost outside dev");
        assert!(info.not_after <= now + 366 * 86_400, "valid for at most a year");
        assert_eq!(info.serial.len(), 32, "a random 128-bit serial");
        let dev = info_of(&certs_from_pem(&new_dev_node_cert(&ca, "n1").unwrap().cert).unwrap()[0]).unwrap();
        assert_eq!(dev.dns, vec!["n1".to_string(), "localhost".to_string()]);
        assert_ne!(dev.serial, info.serial);
        let ca_info = info_of(&certs_from_pem(&ca.cert).unwrap()[0]).unwrap();
        assert!(ca_info.not_after <= now + i64::from(CA_DAYS + 1) * 86_400);
        assert!(new_node_cert_for(&ca, "n1", MAX_LEAF_DAYS + 1).is_err());
    }

    #[test]
    fn the_deny_list_matches_serials_however_spelled() {
        let ca = new_ca("test").unwrap();
        let chain = certs_from_pem(&new_node_cert(&ca, "n1").unwrap().cert).unwrap();
        let serial = info_of(&chain[0]).unwrap().serial;
        let colons: Vec<String> = (0..serial.len())
            .step_by(2)
            .map(|i| serial[i..i + 2].to_uppercase())
            .collect();
        let spelled = format!("00:{}", colons.join(":"));
        assert_eq!(normalize_serial(&spelled).unwrap(), serial);
        assert_eq!(DenyList::new(&[spelled]).unwrap().revoked(&chain), Some(serial));
        assert_eq!(DenyList::new(&["0102".into()]).unwrap().revoked(&chain), None);
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
    }
}
