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
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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
