//! Join tokens: the secret a new cluster presents to register with the root. Stored as SHA-256 hashes,
//! each with an expiry (or none) and revocable; the root makes one at first start (written to
//! `<data-dir>/join-token`, 0600) and the Admin makes more through the API. A registered cluster then
//! proves its id with the credential the root gave it in its welcome, never with a join token again.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::auth::random_string;
use super::error::RootError;
use super::store::JOIN_TOKENS;

const PREFIX: &str = "oakj";

/// A join token as stored (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JoinToken {
    pub id: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    #[schema(ignore)]
    pub hash: String,
    /// Unix ms after which it is refused; 0: never.
    pub expires_ms: u64,
    pub revoked: bool,
    pub created_ms: u64,
}

/// SHA-256 of a secret, hex.
pub fn hash(secret: &str) -> String {
    format!("{:x}", Sha256::digest(secret.as_bytes()))
}

/// A new credential for a registered id: the secret (told once, in the welcome) and its hash (stored).
pub fn new_credential() -> (String, String) {
    let secret = random_string(40);
    let h = hash(&secret);
    (secret, h)
}

/// Whether `presented` is the secret of a stored credential hash (never when none is stored).
pub fn proves(presented: &str, held_hash: &str) -> bool {
    !held_hash.is_empty() && hash(presented) == held_hash
}

fn id_of(token: &str) -> Option<&str> {
    let mut it = token.splitn(3, '.');
    (it.next()? == PREFIX).then_some(())?;
    let id = it.next()?;
    it.next()?;
    Some(id)
}

/// Why a join token was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JoinRefused {
    #[error(
        "no join token given (start the cluster orchestrator with --token, from the root's <data-dir>/join-token)"
    )]
    Missing,
    #[error("the join token is not one of this root's")]
    Unknown,
    #[error("join token {0} has expired")]
    Expired(String),
    #[error("join token {0} was revoked")]
    Revoked(String),
}

impl super::Root {
    /// Stores a join token with the secret `token` (`oakj.<id>.<secret>`) unless it is there already.
    pub fn add_join_token(&self, token: &str, ttl_ms: u64) -> Result<JoinToken, RootError> {
        let id = id_of(token).ok_or_else(|| {
            RootError::InvalidField(crate::model::SlaError {
                field: "token".into(),
                problem: format!("a join token looks like {PREFIX}.<id>.<secret>"),
            })
        })?;
        let now = oak_proto::now_ms();
        let t = JoinToken {
            id: id.to_string(),
            hash: hash(token),
            expires_ms: if ttl_ms == 0 { 0 } else { now + ttl_ms },
            revoked: false,
            created_ms: now,
        };
        self.store
            .update(|tx| {
                if let Some(old) = tx.get::<JoinToken>(JOIN_TOKENS, id)? {
                    return Ok(old);
                }
                tx.put(JOIN_TOKENS, id, &t)?;
                Ok(t.clone())
            })
            .map_err(RootError::from)
    }

    /// A new join token valid for `ttl_ms` (0: until revoked); the secret is only in the answer.
    pub fn create_join_token(&self, ttl_ms: u64) -> Result<(String, JoinToken), RootError> {
        let token = format!("{PREFIX}.{}.{}", random_string(8), random_string(32));
        let t = self.add_join_token(&token, ttl_ms)?;
        tracing::info!(id = %t.id, expires_ms = t.expires_ms, "join token created");
        Ok((token, t))
    }

    /// Every join token (without hashes).
    pub fn join_tokens(&self) -> Result<Vec<JoinToken>, RootError> {
        let all: Vec<JoinToken> = self.store.list(JOIN_TOKENS)?;
        Ok(all.into_iter().map(|t| JoinToken { hash: String::new(), ..t }).collect())
    }

    /// Revokes join token `id` (clusters already registered keep their credentials).
    pub fn revoke_join_token(&self, id: &str) -> Result<(), RootError> {
        self.store.update(|tx| {
            let Some(mut t) = tx.get::<JoinToken>(JOIN_TOKENS, id)? else {
                return Ok(Err(RootError::NotFound(format!("join token {id}"))));
            };
            t.revoked = true;
            tx.put(JOIN_TOKENS, id, &t)?;
            Ok(Ok(()))
        })??;
        tracing::info!(%id, "join token revoked");
        Ok(())
    }

    /// Checks a join token a cluster presented.
    pub fn check_join_token(&self, token: &str) -> Result<String, JoinRefused> {
        if token.is_empty() {
            return Err(JoinRefused::Missing);
        }
        let id = id_of(token).ok_or(JoinRefused::Unknown)?;
        let t: JoinToken = self.store.get(JOIN_TOKENS, id).ok().flatten().ok_or(JoinRefused::Unknown)?;
        if t.hash != hash(token) {
            return Err(JoinRefused::Unknown);
        }
        if t.revoked {
            return Err(JoinRefused::Revoked(t.id));
        }
        if t.expires_ms != 0 && t.expires_ms < oak_proto::now_ms() {
            return Err(JoinRefused::Expired(t.id));
        }
        Ok(t.id)
    }

    /// At start: the join token given (`--token`) is added; with none and no token stored yet, one is made
    /// and written to `<data-dir>/join-token` (0600) for the clusters' operator.
    pub(super) fn init_join_tokens(&self, given: Option<&str>) -> anyhow::Result<()> {
        if let Some(t) = given.filter(|t| !t.is_empty()) {
            self.add_join_token(t, 0).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
            return Ok(());
        }
        if !self.store.list::<JoinToken>(JOIN_TOKENS)?.is_empty() {
            return Ok(());
        }
        let (token, _) = self.create_join_token(0).map_err(|e| anyhow::anyhow!("{e}"))?;
        let path = self.cfg.data_dir.join("join-token");
        super::auth::write_secret_file(&path, &token)?;
        tracing::warn!(path = %path.display(), "created a join token for clusters (no --token given): start cluster orchestrators with --token from {}", path.display());
        Ok(())
    }
}
