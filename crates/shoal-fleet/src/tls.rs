//! `shoal up --tls`: a local certificate authority and one certificate for
//! the fleet's members, under `DATA_DIR/tls/`. The CA is made once and
//! kept (clients that trust it keep working across restarts); the members'
//! certificate is issued afresh at each start, for loopback and the
//! addresses the fleet listens on, and serves as both a server and a
//! client certificate (mutual TLS between members).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files of a local fleet's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTls {
    /// The CA certificate clients trust (`--ca`, `curl --cacert`).
    pub ca: PathBuf,
    /// The members' certificate (`--tls-cert`).
    pub cert: PathBuf,
    /// Its key (`--tls-key`), mode 0600.
    pub key: PathBuf,
}

fn write_private(path: &Path, pem: &str) -> anyhow::Result<()> {
    shoal_client::secret::write(path, pem.trim_end())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Makes (or reuses) the CA under `data_dir/tls` and issues the members'
/// certificate for `hosts` (names or IP addresses) plus loopback.
pub fn ensure(data_dir: &Path, hosts: &[String]) -> anyhow::Result<LocalTls> {
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = LocalTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("fleet.pem"),
        key: dir.join("fleet-key.pem"),
    };
    let ca_key_path = dir.join("ca-key.pem");
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Shoal local fleet CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = match std::fs::read_to_string(&ca_key_path) {
        Ok(pem) if files.ca.is_file() => {
            // The same parameters and key make the same issuer: its name
            // and key identifier match the certificate on disk.
            let key = KeyPair::from_pem(&pem)
                .with_context(|| format!("cannot read the CA key {}", ca_key_path.display()))?;
            Issuer::new(ca_params, key)
        }
        _ => {
            let key = KeyPair::generate()?;
            let ca = ca_params.self_signed(&key)?;
            write_private(&ca_key_path, &key.serialize_pem())?;
            std::fs::write(&files.ca, ca.pem())
                .with_context(|| format!("cannot write {}", files.ca.display()))?;
            Issuer::new(ca_params, key)
        }
    };
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Shoal local fleet member");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&files.key, &key.serialize_pem())?;
    std::fs::write(&files.cert, cert.pem())
        .with_context(|| format!("cannot write {}", files.cert.display()))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_kept_and_the_member_certificate_verifies_against_it() {
        let dir = std::env::temp_dir().join(format!("shoal-up-tls-{}", std::process::id()));
        let first = ensure(&dir, &["10.0.0.5".into()]).unwrap();
        let ca = std::fs::read(&first.ca).unwrap();
        let again = ensure(&dir, &[]).unwrap();
        assert_eq!(
            std::fs::read(&again.ca).unwrap(),
            ca,
            "the CA survives restarts"
        );
        // The member certificate chains to the CA and names loopback.
        let server = shoal_http::tls::ServerTls {
            cert: again.cert.clone(),
            key: again.key.clone(),
            client_ca: Some(again.ca.clone()),
        };
        server.config().expect("a usable server configuration");
        let client = shoal_client::tls::ClientTls {
            ca: Some(again.ca.clone()),
            cert: Some(again.cert.clone()),
            key: Some(again.key.clone()),
        };
        client.config().expect("a usable client configuration");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&again.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
