//! Throwaway TLS material: a CA and a serving certificate for the webhook Service name, and a
//! client configuration that trusts only that CA, as the kube-apiserver does with `caBundle`.

use crate::{Error, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::path::PathBuf;
use std::sync::Arc;

/// The name the kube-apiserver dials and verifies (`<service>.<namespace>.svc`).
pub const SERVICE_DNS_NAME: &str = "multus-eni-webhook.multus-eni.svc";

/// Certificate files for the server and the matching client configuration.
pub struct ThrowawayCerts {
    /// Holds the files; removed on drop.
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Trusts only the throwaway CA; TLS 1.2 and 1.3, aws-lc-rs.
    pub client: Arc<ClientConfig>,
    /// The name to verify the server certificate against.
    pub server_name: ServerName<'static>,
}

/// Generates a CA and a serving certificate and writes `tls/tls.crt`, `tls/tls.key` in a temp dir.
pub fn generate() -> Result<ThrowawayCerts> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "webhook-load throwaway CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(vec![SERVICE_DNS_NAME.to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVICE_DNS_NAME);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let leaf = params.signed_by(&key, &issuer)?;

    let dir = tempfile::Builder::new()
        .prefix("webhook-load-")
        .tempdir()
        .map_err(|e| Error::io("creating a temp dir", e))?;
    // A directory of their own: the webhook re-reads its certificate on any change in the
    // directory it watches, so the server log (written next to `tls/`) must not be in it.
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir(&tls_dir).map_err(|e| Error::io("creating the tls dir", e))?;
    let cert_path = tls_dir.join("tls.crt");
    let key_path = tls_dir.join("tls.key");
    std::fs::write(&cert_path, leaf.pem()).map_err(|e| Error::io("writing tls.crt", e))?;
    std::fs::write(&key_path, key.serialize_pem()).map_err(|e| Error::io("writing tls.key", e))?;

    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = ServerName::try_from(SERVICE_DNS_NAME)
        .map_err(|e| Error::Server(format!("server name: {e}")))?
        .to_owned();
    Ok(ThrowawayCerts {
        dir,
        cert: cert_path,
        key: key_path,
        client: Arc::new(client),
        server_name,
    })
}
