//! Test PKI for HTTPS Azurite: a small CA plus a leaf for `127.0.0.1` / `localhost` signed by it.
//!
//! Why not one self-signed certificate: rustls (and so reqwest and the Azure SDK) rejects a CA
//! certificate presented as the server's own (`CaUsedAsEndEntity`). A real chain is also what a
//! private endpoint with a corporate CA looks like, which is what `LAKEGUARD_CA_CERT` is for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// PEM files of the CA and of the server leaf, written into a directory owned by the caller.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate: the only thing a client has to trust.
    pub ca_cert: PathBuf,
    /// The leaf certificate (SANs `127.0.0.1`, `localhost`), for the server's `--cert`.
    pub leaf_cert: PathBuf,
    /// The leaf's private key (PKCS#8 PEM), for the server's `--key`.
    pub leaf_key: PathBuf,
}

impl TestPki {
    /// Generates a fresh CA and leaf (new keys every call) and writes them into `dir`.
    pub fn generate(dir: &Path) -> TestPki {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "lakeguard test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("generate leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("sign leaf with CA");

        let pki = TestPki {
            ca_cert: dir.join("ca.pem"),
            leaf_cert: dir.join("leaf.pem"),
            leaf_key: dir.join("leaf-key.pem"),
        };
        std::fs::write(&pki.ca_cert, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&pki.leaf_cert, leaf_cert.pem()).expect("write leaf.pem");
        std::fs::write(&pki.leaf_key, leaf_key.serialize_pem()).expect("write leaf-key.pem");
        pki
    }

    /// A TLS server configuration presenting the leaf (for test servers over https).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.leaf_cert)
            .expect("read leaf.pem")
            .collect::<Result<_, _>>()
            .expect("parse leaf.pem");
        let key = PrivateKeyDer::from_pem_file(&self.leaf_key).expect("parse leaf-key.pem");
        let config = ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
        Arc::new(config)
    }

    /// A reqwest client that trusts exactly this CA.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_certs_only([self.reqwest_ca()])
            .build()
            .expect("https client")
    }

    /// The CA as a reqwest root certificate.
    pub fn reqwest_ca(&self) -> reqwest::Certificate {
        let pem = std::fs::read(&self.ca_cert).expect("read ca.pem");
        reqwest::Certificate::from_pem(&pem).expect("parse ca.pem")
    }
}

/// An axum listener that serves TLS with a [`TestPki`] leaf: `axum::serve(TlsListener::bind(..),
/// app)`. A failed handshake (a client that does not trust the CA) drops that connection only.
pub struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
}

impl TlsListener {
    pub async fn bind(pki: &TestPki) -> TlsListener {
        TlsListener {
            tcp: tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1:0"),
            acceptor: TlsAcceptor::from(pki.server_config()),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), handshake).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
