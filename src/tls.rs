//! TLS for outbound connections: rustls with the `ring` provider, Mozilla's roots (webpki-roots)
//! plus the PEM CA of `LEADGATE_CA_FILE` (or the sandbox simulator's CA).

use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs `ring` as the process-wide rustls provider (used by the Redis client's TLS).
/// Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client configuration trusting the public roots and every certificate in `extra_pem`.
pub fn client_config(extra_pem: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for pem in extra_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.context("the extra CA file is not valid PEM")?;
            roots
                .add(cert)
                .context("the extra CA certificate was refused")?;
            added += 1;
        }
        if added == 0 {
            bail!("the extra CA file holds no PEM certificate");
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused() {
        assert!(client_config(&[b"not a pem"]).is_err());
        assert!(client_config(&[]).is_ok());
    }
}
