//! A throwaway certificate authority for TLS tests: a CA and a server
//! certificate for `127.0.0.1` and `localhost`, made with rcgen at test
//! time (nothing secret is checked in), written as PEM files the way
//! archmerge, the registry and skopeo each want them.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// A CA and one server certificate signed by it, as files in a temp dir.
pub struct TestCa {
    dir: TempDir,
    /// The CA certificate, DER (to add as a root to a rustls client).
    pub ca_der: Vec<u8>,
}

impl TestCa {
    /// Makes the CA and a server certificate valid for `127.0.0.1`,
    /// `localhost` and `::1`.
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("archmerge-ca-")
            .tempdir()
            .expect("creating the CA temp dir");

        let ca_key = KeyPair::generate().expect("generating the CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "archmerge test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-signing the CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let names = vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "::1".to_owned(),
        ];
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "archmerge test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("generating the server key");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("signing the server certificate");

        fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        fs::write(dir.path().join("server-key.pem"), key.serialize_pem()).unwrap();
        // skopeo's --cert-dir trusts every `*.crt` in the directory as a CA.
        fs::create_dir(dir.path().join("certs.d")).unwrap();
        fs::write(dir.path().join("certs.d/ca.crt"), ca_cert.pem()).unwrap();
        TestCa {
            ca_der: ca_cert.der().to_vec(),
            dir,
        }
    }

    /// The CA certificate, PEM (`--upstream-ca`).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate, PEM (`--tls-cert`).
    pub fn cert_pem(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server key, PEM (`--tls-key`).
    pub fn key_pem(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// A directory holding only `ca.crt`, for skopeo's `--cert-dir`.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}
