//! Joining over real TLS on a loopback port.

use std::sync::Arc;

use oak_proto::trust::v1 as pb;
use parking_lot::Mutex;
use tonic::Status;

use super::*;

#[derive(Default)]
struct Admitted(Mutex<Vec<(String, String)>>);

impl Registrar for Admitted {
    fn kinds(&self) -> &'static [&'static str] {
        &["node"]
    }
    fn admit(&self, kind: &str, name: &str, _token: &str) -> Result<String, Status> {
        if name == "refused" {
            return Err(Status::already_exists("name taken"));
        }
        let mut a = self.0.lock();
        a.push((kind.into(), name.into()));
        Ok(format!("n{}", a.len()))
    }
}

async fn serve(a: Arc<Authority>, reg: Arc<Admitted>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let router = tonic::transport::Server::builder()
        .tls_config(a.server_tls())
        .unwrap()
        .add_service(Enrollment::server(a.clone(), reg));
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)));
    url
}

#[tokio::test]
async fn join_pinned_then_mutual_tls() {
    let d = tempfile::tempdir().unwrap();
    let a = Arc::new(Authority::open(&d.path().join("ca"), "test CA", CLUSTER_SERVER).unwrap());
    let token = a.init_tokens(None, &d.path().join("token"), "workers").unwrap().unwrap();
    assert!(token.starts_with(&format!("oak10{}::", a.pin())));
    // the same CA at the next start
    let again = Authority::open(&d.path().join("ca"), "test CA", CLUSTER_SERVER).unwrap();
    assert_eq!(again.pin(), a.pin());
    let reg = Arc::new(Admitted::default());
    let url = serve(a.clone(), reg.clone()).await;

    let m = Member::new(&url, CLUSTER_SERVER, "node", "w1", &token, d.path().join("me"));
    let c = m.ensure_joined().await.unwrap();
    assert_eq!(c.identity, PeerId::new("node", "n1"));
    // kept: a second call does not join again
    let c2 = Member::new(&url, CLUSTER_SERVER, "node", "w1", "", d.path().join("me")).ensure_joined().await.unwrap();
    assert_eq!(c2.identity, c.identity);
    assert_eq!(reg.0.lock().len(), 1);
    let mode = |f: &str| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(d.path().join("me").join(f)).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode("key.pem"), 0o600);
    // the certificate names the identity and the CA signed it
    let der = x509_parser::pem::parse_x509_pem(c.cert_pem.as_bytes()).unwrap().1.contents;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), "node/n1");

    // the mutual-TLS channel works (a Join with a bad token over it is answered, and refused)
    let (ch, _) = m.channel(&url, |e| e).await.unwrap();
    let e = pb::enrollment_client::EnrollmentClient::new(ch)
        .join(pb::JoinRequest {
            token: "abc.def".into(),
            csr_pem: String::new(),
            kind: "node".into(),
            name: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not one of this authority's"), "{}", e.message());
}

#[tokio::test]
async fn refusals_name_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let a = Arc::new(Authority::open(&d.path().join("ca"), "test CA", CLUSTER_SERVER).unwrap());
    let other = Authority::open(&d.path().join("other"), "other CA", CLUSTER_SERVER).unwrap();
    let reg = Arc::new(Admitted::default());
    let url = serve(a.clone(), reg.clone()).await;
    let (good, _) = a.tokens.create(&a.pin(), 0, "").unwrap();
    let join = |tok: String, kind: &'static str, name: &str| {
        let m = Member::in_memory(&url, CLUSTER_SERVER, kind, name, &tok);
        async move { m.ensure_joined().await.map(|c| c.identity.to_string()).map_err(|e| format!("{e:#}")) }
    };
    // a token pinned to another CA: the server is not trusted, nothing is sent
    let s: JoinSecret = good.parse().unwrap();
    let e = join(s.full(&other.pin()), "node", "w").await.unwrap_err();
    assert!(e.contains("not the one the join token pins"), "{e}");
    // unknown, revoked and expired tokens
    let forged = JoinSecret { secret: "A".repeat(32), ..s.clone() };
    assert!(join(forged.full(&a.pin()), "node", "w").await.unwrap_err().contains("not one of this authority's"));
    let (revoked, rec) = a.tokens.create(&a.pin(), 0, "").unwrap();
    a.tokens.revoke(&rec.id).unwrap();
    assert!(join(revoked, "node", "w").await.unwrap_err().contains("was revoked"));
    let old = JoinSecret::generate(&a.pin());
    a.tokens.add(&old, 1, "").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert!(join(old.full(&a.pin()), "node", "w").await.unwrap_err().contains("has expired"));
    // a kind this authority does not take; the registrar's refusal
    assert!(join(good.clone(), "cluster", "w").await.unwrap_err().contains("this authority takes node"));
    assert!(join(good.clone(), "node", "refused").await.unwrap_err().contains("name taken"));
    assert!(reg.0.lock().is_empty(), "nothing admitted");
    // the short form trusts the first CA and works
    assert_eq!(join(s.presented(), "node", "w").await.unwrap(), "node/n1");

    // plaintext to the TLS port: no answer
    let ch = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await;
    if let Ok(ch) = ch {
        let r = pb::enrollment_client::EnrollmentClient::new(ch)
            .join(pb::JoinRequest { token: good, ..Default::default() })
            .await;
        assert!(r.is_err(), "plaintext was answered");
    }
}

#[test]
fn signing_requests_are_checked_before_anything_is_recorded() {
    let big = "A".repeat(64 * 1024);
    let err = |pem: &str| Authority::signing_request(pem).err().map(|e| e.to_string()).unwrap_or_default();
    let e = err(&big);
    assert!(e.contains("larger than"), "{e}");
    let e = err("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n");
    assert!(e.contains("not a valid signing request"), "{e}");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr =
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    assert!(Authority::signing_request(&csr).is_ok());
}
