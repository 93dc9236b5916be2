//! `certs`: TLS material for clusters without cert-manager.
//!
//! Writes a CA (`ca.crt`, `ca.key`), a serving certificate for the webhook Service
//! (`tls.crt`, `tls.key`), the same as a `kubernetes.io/tls` Secret manifest (`secret.yaml`),
//! and a JSON patch that sets the CA as `caBundle` of the MutatingWebhookConfiguration
//! (`cabundle-patch.json`). Idempotent: an existing CA is reused, so re-running (e.g. to renew
//! the serving certificate) never changes the caBundle.

use crate::{Error, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::json;
use std::fmt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Name of the MutatingWebhookConfiguration the caBundle patch is for.
pub const WEBHOOK_CONFIGURATION: &str = "multus-eni-webhook";
/// Webhook entries in that configuration (`/mutate`, `/mutate/gate` twice and `/mutate/direct`,
/// docs/contract.md):
/// the patch sets the caBundle of each.
pub const WEBHOOK_ENTRIES: usize = 4;

/// What to generate.
#[derive(Debug, Clone)]
pub struct CertsRequest {
    pub out_dir: PathBuf,
    pub namespace: String,
    pub service: String,
    pub secret_name: String,
    pub validity_days: u32,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct CertsReport {
    /// True when `ca.crt`/`ca.key` already existed and were reused.
    pub ca_reused: bool,
    /// The serving certificate's DNS names.
    pub dns_names: Vec<String>,
    pub out_dir: PathBuf,
}

impl fmt::Display for CertsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = self.out_dir.display();
        writeln!(
            f,
            "{} CA, new serving certificate for {}",
            if self.ca_reused { "reused" } else { "created" },
            self.dns_names.join(", ")
        )?;
        writeln!(f, "apply with:")?;
        writeln!(f, "  kubectl apply -f {dir}/secret.yaml")?;
        write!(
            f,
            "  kubectl patch mutatingwebhookconfiguration {WEBHOOK_CONFIGURATION} --type=json --patch-file {dir}/cabundle-patch.json"
        )
    }
}

/// The names the kube-apiserver may use to reach the Service.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Generates (or reuses) the CA and writes all files into `out_dir`.
pub fn write_certs(request: &CertsRequest) -> Result<CertsReport> {
    let dir = &request.out_dir;
    let created = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    // Private keys must never be committed, wherever the directory is. Only in a directory
    // of our own: `--out-dir .` in a repository must not ignore the whole repository.
    let ignore = dir.join(".gitignore");
    if created {
        write(
            &ignore,
            b"# written by multus-eni-webhook certs: keys stay out of git\n*\n",
            false,
        )?;
    }
    let ca_crt = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    let now = OffsetDateTime::now_utc();
    let days = i64::from(request.validity_days.max(1));

    let (ca_pem, ca_key_pair, ca_reused) = match (ca_crt.exists(), ca_key.exists()) {
        (true, true) => {
            let cert = read(&ca_crt)?;
            let key = KeyPair::from_pem(&read(&ca_key)?)?;
            (cert, key, true)
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let cert = ca_params(now, days * 10).self_signed(&key)?;
            write(&ca_crt, cert.pem().as_bytes(), false)?;
            write(&ca_key, key.serialize_pem().as_bytes(), true)?;
            (cert.pem(), key, false)
        }
        _ => {
            return Err(Error::HalfCa { ca_crt, ca_key });
        }
    };
    let not_after = now + Duration::days(days);
    refuse_leaf_outliving_ca(&ca_crt, &ca_pem, not_after)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key_pair)?;

    let names = dns_names(&request.service, &request.namespace);
    let mut params = CertificateParams::new(names.clone())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("{}.{}.svc", request.service, request.namespace),
    );
    params.distinguished_name = dn;
    params.not_before = now - Duration::hours(1);
    params.not_after = not_after;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate()?;
    let leaf = params.signed_by(&leaf_key, &issuer)?;
    let tls_crt = leaf.pem();
    let tls_key = leaf_key.serialize_pem();
    write(&dir.join("tls.crt"), tls_crt.as_bytes(), false)?;
    write(&dir.join("tls.key"), tls_key.as_bytes(), true)?;

    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": request.secret_name,
            "namespace": request.namespace,
            "labels": { "app.kubernetes.io/name": "multus-eni-webhook" },
        },
        "data": {
            "tls.crt": STANDARD.encode(&tls_crt),
            "tls.key": STANDARD.encode(&tls_key),
            "ca.crt": STANDARD.encode(&ca_pem),
        },
    });
    let secret_yaml =
        serde_yaml_ng::to_string(&secret).map_err(|source| Error::Yaml { index: 0, source })?;
    write(&dir.join("secret.yaml"), secret_yaml.as_bytes(), true)?;

    let ca_bundle = STANDARD.encode(&ca_pem);
    let patch: Vec<_> = (0..WEBHOOK_ENTRIES)
        .map(|i| {
            json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": ca_bundle,
            })
        })
        .collect();
    let patch_text = serde_json::to_string_pretty(&patch).unwrap_or_default() + "\n";
    write(
        &dir.join("cabundle-patch.json"),
        patch_text.as_bytes(),
        false,
    )?;
    Ok(CertsReport {
        ca_reused,
        dns_names: names,
        out_dir: dir.clone(),
    })
}

fn ca_params(now: OffsetDateTime, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "multus-eni webhook CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
    params
}

/// A reused CA that expires before the new serving certificate would leave a certificate
/// clients stop trusting early; renew the CA (delete ca.crt and ca.key) or shorten the leaf.
fn refuse_leaf_outliving_ca(
    ca_path: &Path,
    ca_pem: &str,
    leaf_not_after: OffsetDateTime,
) -> Result<()> {
    let der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .next()
        .ok_or_else(|| Error::NoPem {
            path: ca_path.to_path_buf(),
            what: "certificate",
        })?
        .map_err(|e| Error::file(ca_path, e))?;
    let ca = crate::tls::Validity::of(&der)?;
    let leaf_not_after = std::time::SystemTime::from(leaf_not_after);
    if leaf_not_after > ca.not_after {
        return Err(Error::LeafOutlivesCa {
            ca: ca_path.to_path_buf(),
            ca_not_after: humantime::format_rfc3339_seconds(ca.not_after).to_string(),
        });
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::file(path, e))
}

/// Writes a file; secrets get mode 0600.
fn write(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|e| Error::file(path, e))?;
    // `mode` applies only when the file is created; an existing key keeps its old mode.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::file(path, e))?;
    }
    file.write_all(contents).map_err(|e| Error::file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(dir: &Path) -> CertsRequest {
        CertsRequest {
            out_dir: dir.to_path_buf(),
            namespace: "multus-eni".into(),
            service: "multus-eni-webhook".into(),
            secret_name: "multus-eni-webhook-tls".into(),
            validity_days: 30,
        }
    }

    #[test]
    fn second_run_reuses_the_ca_and_issues_a_new_leaf() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let first = write_certs(&request(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        assert!(!first.ca_reused);
        let ca = std::fs::read(dir.path().join("ca.crt")).unwrap_or_default();
        let patch = std::fs::read(dir.path().join("cabundle-patch.json")).unwrap_or_default();
        let leaf = std::fs::read(dir.path().join("tls.crt")).unwrap_or_default();
        let second = write_certs(&request(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        assert!(second.ca_reused);
        assert_eq!(
            std::fs::read(dir.path().join("ca.crt")).unwrap_or_default(),
            ca
        );
        assert_eq!(
            std::fs::read(dir.path().join("cabundle-patch.json")).unwrap_or_default(),
            patch
        );
        assert_ne!(
            std::fs::read(dir.path().join("tls.crt")).unwrap_or_default(),
            leaf
        );
    }

    #[test]
    fn the_ca_bundle_patch_covers_every_webhook_entry() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write_certs(&request(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read(dir.path().join("cabundle-patch.json")).unwrap_or_default();
        let patch: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
        let paths: Vec<&str> = patch
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|op| op["path"].as_str())
            .collect();
        assert_eq!(
            paths,
            [
                "/webhooks/0/clientConfig/caBundle",
                "/webhooks/1/clientConfig/caBundle",
                "/webhooks/2/clientConfig/caBundle",
                "/webhooks/3/clientConfig/caBundle"
            ]
        );
    }

    #[test]
    fn half_a_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("ca.crt"), "x").unwrap_or_else(|e| panic!("{e}"));
        assert!(write_certs(&request(dir.path())).is_err());
    }

    #[test]
    fn a_leaf_that_would_outlive_the_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut short = request(dir.path());
        short.validity_days = 1; // the CA gets 10 days
        write_certs(&short).unwrap_or_else(|e| panic!("{e}"));
        let leaf = std::fs::read(dir.path().join("tls.crt")).unwrap_or_default();
        let mut long = request(dir.path());
        long.validity_days = 11;
        assert!(matches!(
            write_certs(&long),
            Err(Error::LeafOutlivesCa { .. })
        ));
        // Nothing was overwritten.
        assert_eq!(
            std::fs::read(dir.path().join("tls.crt")).unwrap_or_default(),
            leaf
        );
        long.validity_days = 9;
        assert!(write_certs(&long).is_ok());
    }

    #[test]
    fn a_directory_certs_creates_ignores_itself_in_git() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let out = dir.path().join("certs");
        write_certs(&request(&out)).unwrap_or_else(|e| panic!("{e}"));
        let ignore = std::fs::read_to_string(out.join(".gitignore")).unwrap_or_default();
        assert!(ignore.lines().any(|l| l == "*"), "{ignore}");
        // An existing directory (the current one, a repository) is left as it was.
        write_certs(&request(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        assert!(!dir.path().join(".gitignore").exists());
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // A key left world-readable by an earlier tool is tightened when overwritten.
        for name in ["tls.key", "secret.yaml"] {
            std::fs::write(dir.path().join(name), "old").unwrap_or_else(|e| panic!("{e}"));
            std::fs::set_permissions(
                dir.path().join(name),
                std::fs::Permissions::from_mode(0o644),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        write_certs(&request(dir.path())).unwrap_or_else(|e| panic!("{e}"));
        for name in ["ca.key", "tls.key", "secret.yaml"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or_default();
            assert_eq!(mode, 0o600, "{name}");
        }
    }
}
