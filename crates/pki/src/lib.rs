//! The cluster's certificate authority and the mutual-TLS configurations built from it.
//!
//! The control plane makes one [`ClusterCa`] when the cluster is bootstrapped; members,
//! workers and nodes each get an [`Identity`] (a certificate for their name, and its key)
//! issued by it. Every peer connection is TLS 1.3 with a certificate on both sides from
//! that CA: a peer with no certificate, or one from another CA, is refused in the
//! handshake. The crypto provider is `ring`, named explicitly; nothing here reads a file,
//! a socket or a clock (the time a certificate starts is an argument).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

/// How long an issued certificate is valid. Renewal comes with enrolment; until then a
/// year bounds what a leaked key is worth.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the cluster CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("reading PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("bad name {0:?}: use 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'")]
    Name(String),
    #[error("time out of range")]
    Time,
}

/// The cluster CA: its certificate (shared with everyone) and its key (kept by members).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterCa {
    /// Common name of the CA, e.g. `starling-<cluster id>`.
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("name", &self.name)
            .field("fingerprint", &fingerprint(&self.cert_pem).ok())
            .finish_non_exhaustive()
    }
}

/// A certificate and its key, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| PkiError::Time)?;
    time::OffsetDateTime::from_unix_timestamp(since.as_secs() as i64).map_err(|_| PkiError::Time)
}

/// A peer name as it goes into a certificate and a TLS server name: a DNS label.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = (1..=63).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::Name(name.to_string()))
    }
}

/// The CA's parameters; made the same way whenever the CA signs, so that its subject and
/// key identifier match the certificate it was made with.
fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl ClusterCa {
    /// A new CA named `name`, valid from `now`.
    pub fn generate(name: &str, now: SystemTime) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(name);
        params.not_before = offset(now - Duration::from_secs(3600))?;
        params.not_after = offset(now + CA_VALIDITY)?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            name: name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for peer `name` (its TLS server name too), usable as a client and as
    /// a server, valid from `now` for [`LEAF_VALIDITY`].
    pub fn issue(&self, name: &str, now: SystemTime) -> Result<Identity, PkiError> {
        check_name(name)?;
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::new(ca_params(&self.name), ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = offset(now - Duration::from_secs(3600))?;
        params.not_after = offset(now + LEAF_VALIDITY)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// SHA-256 of the CA certificate's DER, in hex: what a join token carries so that a new
/// node can trust the control plane without a file handed to it (as kubeadm's discovery
/// hash does).
pub fn fingerprint(ca_cert_pem: &str) -> Result<String, PkiError> {
    let der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())?;
    Ok(hex::encode(Sha256::digest(der.as_ref())))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_cert_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())?)?;
    Ok(Arc::new(roots))
}

fn chain(
    id: &Identity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let certs =
        CertificateDer::pem_slice_iter(id.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())?;
    Ok((certs, key))
}

/// TLS 1.3 server side: presents `id`, requires a client certificate from the CA.
pub fn server_config(
    ca_cert_pem: &str,
    id: &Identity,
    alpn: &[u8],
) -> Result<ServerConfig, PkiError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca_cert_pem)?, provider()).build()?;
    let (certs, key) = chain(id)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// TLS 1.3 client side: trusts only the CA, presents `id`.
pub fn client_config(
    ca_cert_pem: &str,
    id: &Identity,
    alpn: &[u8],
) -> Result<ClientConfig, PkiError> {
    let (certs, key) = chain(id)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_cert_pem)?)
        .with_client_auth_cert(certs, key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_certificates_and_its_fingerprint_is_stable() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate("starling-test", now).unwrap();
        let id = ca.issue("eu-1-n3", now).unwrap();
        assert!(id.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let f = fingerprint(&ca.cert_pem).unwrap();
        assert_eq!(f.len(), 64);
        assert_eq!(f, fingerprint(&ca.cert_pem).unwrap());
        let other = ClusterCa::generate("starling-test", now).unwrap();
        assert_ne!(f, fingerprint(&other.cert_pem).unwrap());
        // Both ends can be configured from it.
        server_config(&ca.cert_pem, &id, b"x").unwrap();
        client_config(&ca.cert_pem, &id, b"x").unwrap();
        // The key does not show in debug output.
        assert!(!format!("{ca:?} {id:?}").contains("PRIVATE"));
    }

    #[test]
    fn names_are_dns_labels() {
        let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
        for bad in ["", "Upper", "a.b", "-x", "x-", "a b", &"x".repeat(64)] {
            assert!(ca.issue(bad, SystemTime::now()).is_err(), "{bad:?}");
        }
    }
}
