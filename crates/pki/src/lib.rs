//! The cluster's certificate authority and the TLS configurations built from it: mutual
//! TLS between peers, and HTTPS to the members, trusted by the CA's fingerprint.
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
    #[error("no trusted root certificate on this machine (install ca-certificates)")]
    NoRoots,
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
        self.issue_for_hosts(name, &[], now)
    }

    /// [`ClusterCa::issue`], valid also for `hosts` (IP addresses or DNS names): what a
    /// member's HTTPS listener presents, named by the address clients reach it at. The
    /// PEM holds the CA's certificate after the member's, so that a client that knows
    /// only the CA's fingerprint ([`CaTrust`]) can check the chain.
    pub fn issue_for_hosts(
        &self,
        name: &str,
        hosts: &[String],
        now: SystemTime,
    ) -> Result<Identity, PkiError> {
        check_name(name)?;
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::new(ca_params(&self.name), ca_key);
        let key = KeyPair::generate()?;
        let names: Vec<String> = std::iter::once(name.to_string())
            .chain(hosts.iter().cloned())
            .collect();
        let mut params = CertificateParams::new(names)?;
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
        let cert_pem = if hosts.is_empty() {
            cert.pem()
        } else {
            format!("{}{}", cert.pem(), self.cert_pem)
        };
        Ok(Identity {
            cert_pem,
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

/// HTTPS server side (a member's API and Raft RPC): presents `id` and asks for no client
/// certificate — callers prove themselves with tokens and the cluster key.
pub fn https_server_config(id: &Identity) -> Result<ServerConfig, PkiError> {
    let (certs, key) = chain(id)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// HTTPS client side: trusts a server whose chain ends in the CA `trust` names, and whose
/// certificate names the host it was reached at.
pub fn https_client_config(trust: Arc<CaTrust>) -> Result<ClientConfig, PkiError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(trust)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A TLS client configuration for servers outside the cluster (notification URLs): the
/// roots this machine trusts (its certificate store), TLS 1.2 or 1.3. Unreadable
/// certificates in the store are skipped; none at all is an error.
pub fn public_https_client_config() -> Result<ClientConfig, PkiError> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(PkiError::NoRoots);
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Trust in the cluster CA by its fingerprint (what a join token carries): a server must
/// send the CA's certificate after its own, the CA's must hash to the fingerprint, and
/// its own must be signed by it and name the host — checked by rustls's WebPKI verifier
/// with that CA as the only root. Until a fingerprint is set (a member that has not yet
/// learnt its cluster's CA), every server is refused.
#[derive(Debug, Default)]
pub struct CaTrust {
    fingerprint: std::sync::RwLock<Option<String>>,
}

impl CaTrust {
    pub fn new(fingerprint: Option<String>) -> Arc<CaTrust> {
        Arc::new(CaTrust {
            fingerprint: std::sync::RwLock::new(fingerprint.map(|f| f.to_ascii_lowercase())),
        })
    }

    /// Trust the CA of this fingerprint from now on.
    pub fn set(&self, fingerprint: &str) {
        let mut f = self.fingerprint.write().unwrap_or_else(|p| p.into_inner());
        *f = Some(fingerprint.to_ascii_lowercase());
    }

    fn pinned(&self) -> Option<String> {
        self.fingerprint
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl rustls::client::danger::ServerCertVerifier for CaTrust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let unknown = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let pin = self.pinned().ok_or_else(unknown)?;
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == pin)
            .ok_or_else(unknown)?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
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

    /// Run a TLS handshake in memory between the two configurations.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
        host: &str,
    ) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn https_is_trusted_by_the_ca_fingerprint_and_the_host() {
        let now = SystemTime::now();
        let ca = ClusterCa::generate("starling-test", now).unwrap();
        let id = ca
            .issue_for_hosts("member-1", &["127.0.0.1".into()], now)
            .unwrap();
        let server = || https_server_config(&id).unwrap();
        let fp = fingerprint(&ca.cert_pem).unwrap();
        let client = |pin: Option<String>| https_client_config(CaTrust::new(pin)).unwrap();
        handshake(client(Some(fp.clone())), server(), "127.0.0.1").unwrap();
        handshake(client(Some(fp.to_uppercase())), server(), "member-1").unwrap();
        // Another host, no pin, another CA's pin: refused.
        assert!(handshake(client(Some(fp.clone())), server(), "127.0.0.2").is_err());
        assert!(handshake(client(None), server(), "127.0.0.1").is_err());
        let other = ClusterCa::generate("starling-test", now).unwrap();
        let other_fp = fingerprint(&other.cert_pem).unwrap();
        assert!(handshake(client(Some(other_fp.clone())), server(), "127.0.0.1").is_err());
        // A server of another CA that sends the pinned CA's certificate along: refused.
        let mut forged = other
            .issue_for_hosts("member-1", &["127.0.0.1".into()], now)
            .unwrap();
        forged.cert_pem = format!(
            "{}{}",
            forged
                .cert_pem
                .split_inclusive("-----END CERTIFICATE-----\n")
                .next()
                .unwrap(),
            ca.cert_pem
        );
        let forged_server = https_server_config(&forged).unwrap();
        assert!(handshake(client(Some(fp.clone())), forged_server, "127.0.0.1").is_err());
        // A pin set later is used from then on.
        let late = CaTrust::new(None);
        late.set(&fp);
        handshake(https_client_config(late).unwrap(), server(), "127.0.0.1").unwrap();
    }

    #[test]
    fn names_are_dns_labels() {
        let ca = ClusterCa::generate("starling-test", SystemTime::now()).unwrap();
        for bad in ["", "Upper", "a.b", "-x", "x-", "a b", &"x".repeat(64)] {
            assert!(ca.issue(bad, SystemTime::now()).is_err(), "{bad:?}");
        }
    }
}
