//! The simulator's throw-away PKI: a CA made at start-up and a `localhost` server certificate
//! signed by it. Clients trust the CA (its PEM is handed out), never the server certificate
//! directly, so the same verification path as against the real Onpipeline is exercised.

use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The names the server certificate is valid for.
const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A freshly generated CA and the server identity it signed.
pub(crate) struct SimPki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

impl SimPki {
    pub fn generate() -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "leadgate Onpipeline simulator CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().context("generating the simulator CA key")?;
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the simulator CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut server_params = CertificateParams::new(SERVER_NAMES.map(str::to_owned).to_vec())?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.use_authority_key_identifier_extension = true;
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().context("generating the simulator server key")?;
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("signing the simulator server certificate")?;

        Ok(Self {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_chain: vec![server_cert.der().clone(), ca_cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
        })
    }

    /// A rustls server configuration with the ring provider passed explicitly, so it never
    /// depends on (or fights over) a process-wide default provider.
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("choosing TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(
            self.server_chain.clone(),
            PrivateKeyDer::Pkcs8(self.server_key.clone_key()),
        )
        .context("loading the simulator server certificate")?;
        Ok(config)
    }

    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .context("adding the simulator CA to a root store")?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("choosing TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(config)
    }
}
