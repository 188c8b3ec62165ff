//! The `token` subcommand both orchestrators have: join tokens are made, listed and revoked in the
//! authority's directory (`<data-dir>/ca/join-tokens`), whether or not the daemon runs (it reads them at
//! each join).

use std::path::Path;

use anyhow::Result;

/// `<binary> token …`
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Join tokens: what a newcomer presents once to get its certificate.
    Token {
        #[command(subcommand)]
        op: TokenOp,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenOp {
    /// Make a join token and print it (the secret is shown this once).
    Create {
        /// How long it is valid: 30m, 24h, 7d, ... or 0 for until revoked.
        #[arg(long, default_value = "24h", value_parser = oak_trust::parse_ttl)]
        ttl: u64,
        /// What it is for (kept with it, shown by `token list`).
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the join tokens (ids, expiry, revocation; never secrets).
    List,
    /// Revoke a join token by id (members that joined with it keep their certificates).
    Revoke { id: String },
}

/// Whose tokens: the root's (for clusters) or a cluster's (for its workers).
#[derive(Clone, Copy, Debug)]
pub enum Tier {
    Root,
    Cluster,
}

/// Runs `op` on the authority of `tier` in `<data_dir>/ca`.
pub fn run(op: TokenOp, data_dir: &Path, tier: Tier) -> Result<()> {
    run_with(op, data_dir, tier, None)
}

/// [`run`] for a replicated root: the CA directory is first brought in line with `store` (where the
/// replicas share it), and a token made or revoked goes to the store, so every replica has it.
pub fn run_with(op: TokenOp, data_dir: &Path, tier: Tier, store: Option<&crate::root::store::Store>) -> Result<()> {
    let (ca_name, server_name) = match tier {
        Tier::Root => (crate::root::CA_NAME, oak_trust::ROOT_SERVER),
        Tier::Cluster => (crate::cluster::CA_NAME, oak_trust::CLUSTER_SERVER),
    };
    let ca_dir = data_dir.join("ca");
    let a = match store {
        Some(s) => crate::root::ca_sync::open_authority(s, &ca_dir, ca_name, server_name)?,
        None => oak_trust::Authority::open(&ca_dir, ca_name, server_name)?,
    };
    let publish = |id: &str| match store {
        Some(s) => crate::root::ca_sync::publish(s, &ca_dir, &format!("join-tokens/{id}.json")),
        None => Ok(()),
    };
    match op {
        TokenOp::Create { ttl, description } => {
            let (token, t) = a.tokens.create(&a.pin(), ttl, &description)?;
            publish(&t.id)?;
            let until = if t.expires_ms == 0 { "until revoked".to_string() } else { format!("for {}", show_ttl(ttl)) };
            eprintln!("join token {} (valid {until}):", t.id);
            println!("{token}");
        }
        TokenOp::List => {
            let now = oak_proto::now_ms();
            println!("{:<10} {:<24} DESCRIPTION", "ID", "STATE");
            for t in a.tokens.list()? {
                let state = if t.revoked {
                    "revoked".to_string()
                } else if t.expires_ms == 0 {
                    "valid".to_string()
                } else if t.expires_ms < now {
                    "expired".to_string()
                } else {
                    format!("valid for {}", show_ttl(t.expires_ms - now))
                };
                println!("{:<10} {:<24} {}", t.id, state, t.description);
            }
        }
        TokenOp::Revoke { id } => {
            anyhow::ensure!(a.tokens.revoke(&id)?, "no join token {id}");
            publish(&id)?;
            eprintln!("join token {id} revoked");
        }
    }
    Ok(())
}

fn show_ttl(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}
