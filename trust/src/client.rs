//! The newcomer's side: joining an authority once (a key made here, a signing request, the token; the
//! server checked against the token's CA pin), keeping the certificate it got (`<dir>/{ca.pem,cert.pem,
//! key.pem}`, key 0600), and opening gRPC channels that present it and accept only that CA's server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use oak_proto::trust::v1 as pb;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Channel, Endpoint};

use crate::authority::PeerId;
use crate::files::{private_dir, write_private};
use crate::token::{sha256_hex, JoinSecret};

/// The authority could not be reached (as opposed to refusing): worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// What a joined newcomer holds.
#[derive(Clone)]
pub struct Credentials {
    pub identity: PeerId,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("identity", &self.identity).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        out.push(CertificateDer::from(p.map_err(|e| anyhow!("bad PEM: {e}"))?.contents));
    }
    anyhow::ensure!(!out.is_empty(), "no certificate in PEM");
    Ok(out)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    let kp = rcgen::KeyPair::from_pem(pem).context("not a private key")?;
    PrivateKeyDer::try_from(kp.serialize_der()).map_err(|e| anyhow!("{e}"))
}

/// Accepts the server when the chain it sends ends in a CA whose SHA-256 is the token's pin (any CA when
/// the token has none: trust on first use) and the leaf is that CA's certificate for the server name;
/// remembers the CA.
#[derive(Debug)]
struct PinnedCa {
    pin: Option<String>,
    seen: Mutex<Option<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some((ca, rest)) = intermediates.split_last() else {
            return Err(rustls::Error::General("the server sent no CA certificate with its own".into()));
        };
        if let Some(pin) = &self.pin {
            if sha256_hex(ca.as_ref()) != *pin {
                return Err(rustls::Error::General(
                    "the server's CA is not the one the join token pins (a token of another authority, or the \
                     connection is intercepted)"
                        .into(),
                ));
            }
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok = v.verify_server_cert(end_entity, rest, server_name, ocsp, now)?;
        *self.seen.lock() = Some(ca.clone().into_owned());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connector for tonic channels: TCP to the URI's host and port, then TLS with `config` for the
/// fixed server name.
fn connector(
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let (config, name) = (config.clone(), server_name.clone());
        async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

fn client_config(verifier: Option<Arc<dyn ServerCertVerifier>>, creds: Option<&Credentials>) -> Result<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let b = match (verifier, creds) {
        (Some(v), _) => b.dangerous().with_custom_certificate_verifier(v),
        (None, Some(c)) => {
            let mut roots = RootCertStore::empty();
            for ca in certs(&c.ca_pem)? {
                roots.add(ca)?;
            }
            b.with_root_certificates(roots)
        }
        (None, None) => bail!("no CA to verify the server against"),
    };
    let mut cfg = match creds {
        Some(c) => b.with_client_auth_cert(certs(&c.cert_pem)?, key(&c.key_pem)?)?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Where a newcomer keeps what it got: a directory, or memory (a simulator that is new at each start).
#[derive(Clone)]
enum Keep {
    Dir(PathBuf),
    Memory(Arc<Mutex<Option<Credentials>>>),
}

/// A newcomer of one authority: how to join it and how to call it afterwards.
#[derive(Clone)]
pub struct Member {
    /// The authority's URL (`http://host:port` or `https://…`; TLS either way).
    pub url: String,
    /// The name in the authority's server certificate.
    pub server_name: &'static str,
    pub kind: &'static str,
    pub name: String,
    token: String,
    keep: Keep,
    /// One join at a time (two links of one process must not join twice).
    joining: Arc<tokio::sync::Mutex<()>>,
}

impl Member {
    /// A member that keeps its certificate in `dir`.
    pub fn new(
        url: &str,
        server_name: &'static str,
        kind: &'static str,
        name: &str,
        token: &str,
        dir: PathBuf,
    ) -> Self {
        Self {
            url: url.into(),
            server_name,
            kind,
            name: name.into(),
            token: token.trim().into(),
            keep: Keep::Dir(dir),
            joining: Default::default(),
        }
    }

    /// The same member (its certificate, its one join at a time) joining and calling the authority at
    /// another URL: one replica of several, the one that answers.
    pub fn at(&self, url: &str) -> Self {
        Self {
            url: url.into(),
            server_name: self.server_name,
            kind: self.kind,
            name: self.name.clone(),
            token: self.token.clone(),
            keep: self.keep.clone(),
            joining: self.joining.clone(),
        }
    }

    /// A member that keeps its certificate in memory only.
    pub fn in_memory(url: &str, server_name: &'static str, kind: &'static str, name: &str, token: &str) -> Self {
        Self {
            keep: Keep::Memory(Default::default()),
            ..Self::new(url, server_name, kind, name, token, PathBuf::new())
        }
    }

    /// What this member holds, if it has joined.
    pub fn credentials(&self) -> Result<Option<Credentials>> {
        match &self.keep {
            Keep::Memory(m) => Ok(m.lock().clone()),
            Keep::Dir(d) => {
                let read = |f: &str| std::fs::read_to_string(d.join(f));
                let Ok(id) = read("identity") else { return Ok(None) };
                let ctx = |f: &str| format!("{}: remove the directory to join again", d.join(f).display());
                Ok(Some(Credentials {
                    identity: PeerId::parse(id.trim()).with_context(|| ctx("identity"))?,
                    ca_pem: read("ca.pem").with_context(|| ctx("ca.pem"))?,
                    cert_pem: read("cert.pem").with_context(|| ctx("cert.pem"))?,
                    key_pem: read("key.pem").with_context(|| ctx("key.pem"))?,
                }))
            }
        }
    }

    fn keep(&self, c: &Credentials) -> Result<()> {
        match &self.keep {
            Keep::Memory(m) => *m.lock() = Some(c.clone()),
            Keep::Dir(d) => {
                private_dir(d)?;
                write_private(&d.join("key.pem"), c.key_pem.as_bytes())?;
                write_private(&d.join("cert.pem"), c.cert_pem.as_bytes())?;
                write_private(&d.join("ca.pem"), c.ca_pem.as_bytes())?;
                // last: its presence says the rest is complete
                write_private(&d.join("identity"), c.identity.to_string().as_bytes())?;
            }
        }
        Ok(())
    }

    fn endpoint(url: &str) -> Result<Endpoint> {
        let url = url.strip_prefix("https://").map(|r| format!("http://{r}")).unwrap_or_else(|| url.to_string());
        Endpoint::from_shared(url.clone()).with_context(|| format!("bad URL {url:?}"))
    }

    fn server_name(&self) -> ServerName<'static> {
        ServerName::try_from(self.server_name).expect("a valid DNS name").to_owned()
    }

    /// The credentials, joining first when there are none (with the token; the server checked against its
    /// pin).
    pub async fn ensure_joined(&self) -> Result<Credentials> {
        let _one = self.joining.lock().await;
        if let Some(c) = self.credentials()? {
            return Ok(c);
        }
        if self.token.is_empty() {
            bail!(
                "not joined yet and no join token given: a {} joins its authority at {} once with its join token",
                self.kind,
                self.url
            );
        }
        let secret: JoinSecret = self.token.parse()?;
        if secret.pin.is_none() {
            tracing::warn!(
                url = %self.url,
                "the join token has no CA pin: trusting the CA the server shows on this first connection (use the \
                 whole oak10… token to rule out interception)"
            );
        }
        let verifier = Arc::new(PinnedCa { pin: secret.pin.clone(), seen: Mutex::new(None), provider: provider() });
        let cfg = client_config(Some(verifier.clone()), None)?;
        let ep = Self::endpoint(&self.url)?
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(20));
        let ch = if crate::plaintext() {
            ep.connect().await
        } else {
            ep.connect_with_connector(connector(Arc::new(cfg), self.server_name())).await
        }
        .map_err(|e| Unreachable(format!("connecting to {} to join: {}", self.url, crate::error_chain(&e))))?;
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?.pem()?;
        let reply = pb::enrollment_client::EnrollmentClient::new(ch)
            .join(pb::JoinRequest {
                token: secret.presented(),
                csr_pem: csr,
                kind: self.kind.into(),
                name: self.name.clone(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable => {
                    anyhow::Error::new(Unreachable(format!("joining {}: {}", self.url, s.message())))
                }
                _ => anyhow!("joining {}: {}", self.url, s.message()),
            })?
            .into_inner();
        let ca = certs(&reply.ca_pem).context("the join answer's CA")?;
        if !crate::plaintext() {
            let seen = verifier.seen.lock().clone().context("the handshake showed no CA")?;
            anyhow::ensure!(ca.first() == Some(&seen), "the join answer names another CA than the server's");
        }
        let identity = PeerId::parse(&reply.identity).context("the join answer's identity")?;
        anyhow::ensure!(identity.kind == self.kind, "joined as {identity}, not as a {}", self.kind);
        let c = Credentials { identity, ca_pem: reply.ca_pem, cert_pem: reply.cert_pem, key_pem: key.serialize_pem() };
        self.keep(&c)?;
        tracing::info!(url = %self.url, identity = %c.identity, "joined; the certificate is kept for later sessions");
        Ok(c)
    }

    /// A channel to `url` (the authority, or another of its ports) presenting this member's certificate,
    /// accepting only the authority's server; `tune` sets timeouts and keepalive. Joins first if needed.
    pub async fn channel(&self, url: &str, tune: impl FnOnce(Endpoint) -> Endpoint) -> Result<(Channel, Credentials)> {
        let c = self.ensure_joined().await?;
        let ep = tune(Self::endpoint(url)?);
        let ch = if crate::plaintext() {
            Self::claim(ep, &c)?.connect().await
        } else {
            let cfg = Arc::new(client_config(None, Some(&c))?);
            ep.connect_with_connector(connector(cfg, self.server_name())).await
        }
        .map_err(|e| Unreachable(format!("connecting to {url}: {}", crate::error_chain(&e))))?;
        Ok((ch, c))
    }

    /// Like [`Member::channel`], connecting at first use (the member must have joined already).
    pub fn lazy_channel(&self, url: &str, tune: impl FnOnce(Endpoint) -> Endpoint) -> Result<Channel> {
        let c = self.credentials()?.context("not joined yet")?;
        let ep = tune(Self::endpoint(url)?);
        if crate::plaintext() {
            return Ok(Self::claim(ep, &c)?.connect_lazy());
        }
        let cfg = Arc::new(client_config(None, Some(&c))?);
        Ok(ep.connect_with_connector_lazy(connector(cfg, self.server_name())))
    }

    /// Without TLS (measurements only, [`crate::plaintext`]): the identity is claimed in the user agent.
    fn claim(ep: Endpoint, c: &Credentials) -> Result<Endpoint> {
        Ok(ep.user_agent(format!("{}{}", crate::CLAIM, c.identity))?)
    }
}
