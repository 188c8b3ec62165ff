//! The authority side: a CA made at first start (`<dir>/ca.pem`, key `ca.key` 0600), the server
//! certificate its gRPC ports present, the join tokens, the Enrollment service that turns a valid token
//! and a signing request into a client certificate, and reading the identity of a caller from the
//! certificate it presented.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use oak_proto::trust::v1 as pb;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::{Request, Response, Status};

use crate::files::{private_dir, write_private};
use crate::token::{sha256_hex, JoinRefused, Tokens};

/// Largest signing request accepted (a P-256 or RSA-4096 request is far smaller).
const MAX_CSR: usize = 16 * 1024;

/// A certificate authority with its server certificate and join tokens.
pub struct Authority {
    dir: PathBuf,
    ca_pem: String,
    ca_der: Vec<u8>,
    /// The CA as rcgen's issuer (re-made from the stored certificate and key).
    issuer: rcgen::Certificate,
    ca_key: KeyPair,
    server_chain_pem: String,
    server_key_pem: String,
    /// The name the server certificate carries and clients check.
    pub server_name: String,
    pub tokens: Tokens,
}

fn pem_der(pem: &str) -> Result<Vec<u8>> {
    let p = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| anyhow::anyhow!("not a PEM: {e}"))?.1;
    Ok(p.contents)
}

impl Authority {
    /// Opens the authority kept in `dir`, making its CA (named `ca_name`) and a server certificate for
    /// `server_name` at first start.
    pub fn open(dir: &Path, ca_name: &str, server_name: &str) -> Result<Self> {
        private_dir(dir)?;
        let (ca_file, key_file) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !ca_file.exists() {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name.push(DnType::CommonName, ca_name);
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            let ca = p.self_signed(&key)?;
            write_private(&key_file, key.serialize_pem().as_bytes())?;
            write_private(&ca_file, ca.pem().as_bytes())?;
            tracing::info!(path = %ca_file.display(), "created the certificate authority {ca_name:?}");
        }
        let ca_pem = std::fs::read_to_string(&ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        let ca_key = KeyPair::from_pem(
            &std::fs::read_to_string(&key_file).with_context(|| format!("reading {}", key_file.display()))?,
        )
        .with_context(|| format!("{}: not a private key", key_file.display()))?;
        let ca_der = pem_der(&ca_pem).with_context(|| ca_file.display().to_string())?;
        let issuer = CertificateParams::from_ca_cert_pem(&ca_pem)
            .with_context(|| format!("{}: not a certificate", ca_file.display()))?
            .self_signed(&ca_key)?;
        let (srv_file, srv_key_file) = (dir.join("server.pem"), dir.join("server.key"));
        let current = std::fs::read_to_string(&srv_file).ok().filter(|c| c.ends_with(&ca_pem));
        let (server_chain_pem, server_key_pem) = match (current, std::fs::read_to_string(&srv_key_file).ok()) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                let key = KeyPair::generate()?;
                let mut p = CertificateParams::new(vec![server_name.to_string()])?;
                p.distinguished_name.push(DnType::CommonName, server_name);
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                let cert = p.signed_by(&key, &issuer, &ca_key)?;
                let chain = format!("{}{}", cert.pem(), ca_pem);
                write_private(&srv_key_file, key.serialize_pem().as_bytes())?;
                write_private(&srv_file, chain.as_bytes())?;
                (chain, key.serialize_pem())
            }
        };
        let tokens = Tokens::open(&dir.join("join-tokens"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca_pem,
            ca_der,
            issuer,
            ca_key,
            server_chain_pem,
            server_key_pem,
            server_name: server_name.into(),
            tokens,
        })
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses) and writes its chain (with
    /// the CA) and key (0600) to `cert` and `key`: HTTPS for a port outside the gRPC links, trusted by
    /// whoever trusts `ca.pem`.
    pub fn issue_server(&self, names: &[String], cert: &Path, key: &Path) -> Result<()> {
        anyhow::ensure!(!names.is_empty(), "a server certificate needs at least one name");
        let kp = KeyPair::generate()?;
        let mut p = CertificateParams::new(names.to_vec()).context("the certificate's names")?;
        p.distinguished_name.push(DnType::CommonName, names[0].as_str());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let c = p.signed_by(&kp, &self.issuer, &self.ca_key)?;
        write_private(key, kp.serialize_pem().as_bytes())?;
        write_private(cert, format!("{}{}", c.pem(), self.ca_pem).as_bytes())
    }

    /// SHA-256 (hex) of the CA certificate: the pin every join token of this authority carries.
    pub fn pin(&self) -> String {
        sha256_hex(&self.ca_der)
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// TLS for the authority's gRPC ports: its server certificate; client certificates of this CA are
    /// verified when presented (a newcomer without one can only call Enrollment.Join).
    pub fn server_tls(&self) -> tonic::transport::ServerTlsConfig {
        debug_assert!(!crate::plaintext(), "no TLS when measuring without it");
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.server_chain_pem, &self.server_key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }

    /// A newcomer's signing request, checked (size, signature) before anything is recorded for it.
    pub fn signing_request(csr_pem: &str) -> Result<CertificateSigningRequestParams> {
        anyhow::ensure!(csr_pem.len() <= MAX_CSR, "the signing request is larger than {MAX_CSR} bytes");
        CertificateSigningRequestParams::from_pem(csr_pem).context("csr_pem is not a valid signing request")
    }

    /// Signs a client certificate for `identity` over the public key of `csr` (nothing else of the
    /// request is taken).
    pub fn issue(&self, csr: &CertificateSigningRequestParams, identity: &str) -> Result<String> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, identity);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        Ok(p.signed_by(&csr.public_key, &self.issuer, &self.ca_key)?.pem())
    }

    /// The initial join token: `given` (either form) is added; with none and no token stored yet, one is
    /// made. Either way, the first token is written whole to `file` (0600) for the operator, unless it
    /// is there already. Returns the file's token, if any.
    pub fn init_tokens(&self, given: Option<&str>, file: &Path, what: &str) -> Result<Option<String>> {
        let pin = self.pin();
        if let Some(g) = given.filter(|g| !g.trim().is_empty()) {
            let s: crate::JoinSecret = g.parse()?;
            if s.pin.as_ref().is_some_and(|p| *p != pin) {
                anyhow::bail!("the token's CA pin is not this authority's ({pin})");
            }
            self.tokens.add(&s, 0, "given at start")?;
            let full = s.full(&pin);
            if std::fs::read_to_string(file).ok().as_deref().map(str::trim) != Some(full.as_str()) {
                write_private(file, full.as_bytes())?;
            }
            return Ok(Some(full));
        }
        if let Ok(t) = std::fs::read_to_string(file) {
            return Ok(Some(t.trim().to_string()));
        }
        if !self.tokens.list()?.is_empty() {
            return Ok(None);
        }
        let (full, _) = self.tokens.create(&pin, 0, "made at first start")?;
        write_private(file, full.as_bytes())?;
        tracing::warn!(path = %file.display(), "created a join token for {what}: give them the token in {}", file.display());
        Ok(Some(full))
    }
}

/// An identity as certificates name it: `<kind>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerId {
    pub kind: String,
    pub id: String,
}

impl PeerId {
    pub fn new(kind: &str, id: &str) -> Self {
        Self { kind: kind.into(), id: id.into() }
    }
    pub fn parse(s: &str) -> Option<Self> {
        let (k, i) = s.split_once('/')?;
        (!k.is_empty() && !i.is_empty()).then(|| Self::new(k, i))
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// The identity in the client certificate of a TLS request (verified against the authority's CA by
/// the server's TLS); `None` without one.
pub fn peer_id<T>(req: &Request<T>) -> Option<PeerId> {
    if crate::plaintext() {
        let ua = req.metadata().get("user-agent")?.to_str().ok()?;
        return PeerId::parse(ua.split_whitespace().next()?.strip_prefix(crate::CLAIM)?);
    }
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    PeerId::parse(&cn)
}

/// The id of a caller that must be a `kind`; a clear refusal otherwise.
pub fn require<T>(req: &Request<T>, kind: &str) -> Result<String, Status> {
    match peer_id(req) {
        Some(p) if p.kind == kind => Ok(p.id),
        Some(p) => Err(Status::permission_denied(format!("this call is for a {kind}; the caller is {p}"))),
        None => Err(Status::unauthenticated(format!(
            "no client certificate: a {kind} joins with a join token first (Enrollment.Join) and then calls with \
             the certificate it got"
        ))),
    }
}

/// Decides who a newcomer with a valid join token becomes.
pub trait Registrar: Send + Sync + 'static {
    /// The kinds of newcomers this authority takes ("cluster"; "node", "netmanager").
    fn kinds(&self) -> &'static [&'static str];
    /// Records a newcomer of `kind` named `name` (joined with token `token_id`) and gives its id.
    fn admit(&self, kind: &str, name: &str, token_id: &str) -> Result<String, Status>;
}

/// The Enrollment gRPC service of an authority.
pub struct Enrollment<R> {
    pub authority: Arc<Authority>,
    pub registrar: Arc<R>,
}

impl<R: Registrar> Enrollment<R> {
    pub fn server(authority: Arc<Authority>, registrar: Arc<R>) -> pb::enrollment_server::EnrollmentServer<Self> {
        pb::enrollment_server::EnrollmentServer::new(Self { authority, registrar })
    }
}

#[tonic::async_trait]
impl<R: Registrar> pb::enrollment_server::Enrollment for Enrollment<R> {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        // where the newcomer calls from (an IPv4 client of a `[::]` listener as its IPv4 address)
        let peer = req.remote_addr().map(|a| oak_proto::endpoint::observed(a.ip()).to_string()).unwrap_or_default();
        let r = req.into_inner();
        let refuse = |s: Status| {
            tracing::warn!(%peer, kind = %r.kind, name = %r.name, "join refused: {}", s.message());
            s
        };
        if !self.registrar.kinds().contains(&r.kind.as_str()) {
            return Err(refuse(Status::invalid_argument(format!(
                "kind {:?}: this authority takes {}",
                r.kind,
                self.registrar.kinds().join(", ")
            ))));
        }
        if r.name.is_empty() || r.name.len() > 128 || r.name.chars().any(char::is_control) {
            return Err(refuse(Status::invalid_argument("name must be 1..128 printable characters")));
        }
        let token_id = self.authority.tokens.check(&r.token).map_err(|e| {
            refuse(match e {
                JoinRefused::Missing => Status::unauthenticated(format!("{e}: a {} needs a join token", r.kind)),
                e => Status::permission_denied(format!("join refused: {e}")),
            })
        })?;
        // the request's key must be usable before anything is recorded
        let csr =
            Authority::signing_request(&r.csr_pem).map_err(|e| refuse(Status::invalid_argument(format!("{e:#}"))))?;
        let id = self.registrar.admit(&r.kind, &r.name, &token_id).map_err(refuse)?;
        let identity = PeerId::new(&r.kind, &id).to_string();
        let cert_pem = self.authority.issue(&csr, &identity).map_err(|e| refuse(Status::internal(format!("{e:#}"))))?;
        tracing::info!(%peer, %identity, name = %r.name, token = %token_id, "joined");
        Ok(Response::new(pb::JoinReply { identity, cert_pem, ca_pem: self.authority.ca_pem.clone() }))
    }
}
