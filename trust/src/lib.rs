//! Trust for the control plane. Each tier is the certificate authority of the tier below it: the root
//! of its clusters (ports 50052 and 10099), a cluster of its NodeEngines and NetManagers (10100 and
//! 10110). A newcomer joins once with a join token that pins the authority's CA and gets a client
//! certificate naming its identity (`cluster/<id>`, `node/<id>`, `netmanager/<id>`); every later call is
//! mutually authenticated TLS, and servers take the caller's identity from its certificate only.

mod authority;
mod client;
mod files;
mod token;

pub use authority::{peer_id, require, Authority, Enrollment, PeerId, Registrar};
pub use client::{Credentials, Member, Unreachable};
pub use files::{private_dir, write_private};
pub use token::{parse_ttl, sha256_hex, BadToken, JoinRefused, JoinSecret, JoinToken, Tokens};

/// Set to `1` on every process of a control plane only to measure what TLS costs
/// (`cargo xtask bench control-plane` does): the gRPC links then run without TLS and a caller's identity
/// is what it claims (its user agent). Joining still needs a join token. Never on a network you do not
/// trust: anyone can act as anyone.
pub const PLAINTEXT_ENV: &str = "OAK_INSECURE_PLAINTEXT_GRPC";

/// Whether [`PLAINTEXT_ENV`] is set (read once).
pub fn plaintext() -> bool {
    static P: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        let on = std::env::var(PLAINTEXT_ENV).is_ok_and(|v| v == "1");
        if on {
            tracing::warn!("{PLAINTEXT_ENV}=1: the gRPC links run WITHOUT TLS and callers are who they claim to be (for measurements only)");
        }
        on
    })
}

/// The user-agent prefix a caller names itself with when [`plaintext`] is on.
const CLAIM: &str = "oak-identity/";

/// The name in the root's server certificate.
pub const ROOT_SERVER: &str = "oak-root";
/// The name in a cluster's server certificate.
pub const CLUSTER_SERVER: &str = "oak-cluster";

/// A random string of letters and digits.
pub fn random_string(n: usize) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), n)
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let m = x.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests;
