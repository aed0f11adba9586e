//! TLS on both sides: the client listener's acceptor (PEM certificate and
//! key, HTTP/2 or HTTP/1.1 by ALPN) and the upstream client's configuration
//! (system roots plus an optional CA file).
//!
//! Skipping upstream certificate verification exists only behind the
//! explicit `upstream_insecure_skip_tls_verify` setting, and is logged at
//! warn on every start.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// The acceptor for the client listener.
pub fn acceptor(files: &TlsFiles) -> std::io::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::fs::read(&files.cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{}: no PEM certificate found",
            files.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut std::fs::read(&files.key)?.as_slice())?
        .ok_or_else(|| invalid(format!("{}: no PEM private key found", files.key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(invalid)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(invalid)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The upstream client's TLS configuration.
pub fn client_config(
    ca_file: Option<&Path>,
    insecure_skip_verify: bool,
) -> std::io::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(invalid)?;
    if insecure_skip_verify {
        tracing::warn!("upstream_insecure_skip_tls_verify is set: the registry's TLS certificate is NOT verified");
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system store with an odd certificate must not stop archmerge.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in rustls_pemfile::certs(&mut std::fs::read(path)?.as_slice()) {
            roots.add(cert?).map_err(invalid)?;
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts any server certificate (signatures are still checked, so the
/// handshake is well-formed): the insecure opt-in.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
