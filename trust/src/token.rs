//! Join tokens: what lets a newcomer get an identity from an authority (the root for clusters, a cluster
//! for its workers).
//!
//! A token reads `oak10<ca-pin>::<id>.<secret>`: the pin is the SHA-256 of the authority's CA
//! certificate, so the newcomer's first TLS connection cannot be intercepted; `<id>.<secret>` is what it
//! presents. The short form `<id>.<secret>` is accepted too, then the first CA seen is trusted (with a
//! warning). The authority keeps each token as a file `<dir>/<id>.json` (0600) holding the secret's
//! SHA-256, its expiry and whether it was revoked: the `token create|list|revoke` commands and a running
//! daemon share the directory, so tokens can be made while it runs, and never leave it in clear.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::random_string;

const PREFIX: &str = "oak10";
const ID_LEN: usize = 8;
const SECRET_LEN: usize = 32;

/// A join token as written by its user.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSecret {
    /// SHA-256 (hex) of the authority's CA certificate, when the token carries it.
    pub pin: Option<String>,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinSecret").field("pin", &self.pin).field("id", &self.id).finish_non_exhaustive()
    }
}

/// Why a token string is not a join token.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("a join token reads oak10<64 hex digits of the CA pin>::<id>.<secret> or <id>.<secret> ({0})")]
pub struct BadToken(pub &'static str);

impl std::str::FromStr for JoinSecret {
    type Err = BadToken;
    fn from_str(s: &str) -> Result<Self, BadToken> {
        let s = s.trim();
        let (pin, rest) = match s.strip_prefix(PREFIX) {
            Some(r) => {
                let (pin, rest) = r.split_once("::").ok_or(BadToken("no :: after the pin"))?;
                if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(BadToken("the pin is not 64 hex digits"));
                }
                (Some(pin.to_ascii_lowercase()), rest)
            }
            None => (None, s),
        };
        let (id, secret) = rest.split_once('.').ok_or(BadToken("no . between id and secret"))?;
        let ok = |x: &str, max| !x.is_empty() && x.len() <= max && x.bytes().all(|b| b.is_ascii_alphanumeric());
        if !ok(id, 32) || !ok(secret, 128) {
            return Err(BadToken("id and secret are letters and digits"));
        }
        Ok(Self { pin, id: id.into(), secret: secret.into() })
    }
}

impl JoinSecret {
    /// A new random token pinned to `pin`.
    pub fn generate(pin: &str) -> Self {
        Self { pin: Some(pin.into()), id: random_string(ID_LEN).to_lowercase(), secret: random_string(SECRET_LEN) }
    }

    /// What the newcomer sends: `<id>.<secret>`.
    pub fn presented(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// The whole token, pinned to `pin`.
    pub fn full(&self, pin: &str) -> String {
        format!("{PREFIX}{pin}::{}.{}", self.id, self.secret)
    }
}

/// SHA-256 of a string, hex.
pub fn sha256_hex(s: impl AsRef<[u8]>) -> String {
    format!("{:x}", Sha256::digest(s.as_ref()))
}

/// A join token as the authority stores it (never the secret).
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
    /// What it is for (free text from its creator).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// Why a presented join token was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JoinRefused {
    #[error("no join token given")]
    Missing,
    #[error("the join token is not one of this authority's")]
    Unknown,
    #[error("join token {0} has expired")]
    Expired(String),
    #[error("join token {0} was revoked")]
    Revoked(String),
}

/// The join tokens of an authority: one file each under a directory (0700).
#[derive(Debug, Clone)]
pub struct Tokens {
    dir: PathBuf,
}

impl Tokens {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        crate::files::private_dir(dir)?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn read(&self, id: &str) -> Option<JoinToken> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        let s = std::fs::read(self.file(id)).ok()?;
        serde_json::from_slice(&s).ok()
    }

    fn write(&self, t: &JoinToken) -> anyhow::Result<()> {
        crate::files::write_private(&self.file(&t.id), &serde_json::to_vec_pretty(t)?)
    }

    /// Stores `secret` valid for `ttl_ms` (0: until revoked) unless a token with its id is there already
    /// (then that one is returned unchanged).
    pub fn add(&self, secret: &JoinSecret, ttl_ms: u64, description: &str) -> anyhow::Result<JoinToken> {
        if let Some(old) = self.read(&secret.id) {
            return Ok(old);
        }
        let now = oak_proto::now_ms();
        let t = JoinToken {
            id: secret.id.clone(),
            hash: sha256_hex(secret.presented()),
            expires_ms: if ttl_ms == 0 { 0 } else { now.saturating_add(ttl_ms) },
            revoked: false,
            created_ms: now,
            description: description.chars().take(200).collect(),
        };
        self.write(&t)?;
        tracing::info!(id = %t.id, expires_ms = t.expires_ms, "join token created");
        Ok(t)
    }

    /// A new token pinned to `pin`, valid for `ttl_ms` (0: until revoked): the whole token (told once) and
    /// what is stored.
    pub fn create(&self, pin: &str, ttl_ms: u64, description: &str) -> anyhow::Result<(String, JoinToken)> {
        let s = JoinSecret::generate(pin);
        let t = self.add(&s, ttl_ms, description)?;
        Ok((s.full(pin), t))
    }

    /// Every token (without hashes), oldest first.
    pub fn list(&self) -> anyhow::Result<Vec<JoinToken>> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let p = e?.path();
            let Some(id) = p.file_stem().and_then(|s| s.to_str()) else { continue };
            if let Some(t) = self.read(id) {
                all.push(JoinToken { hash: String::new(), ..t });
            }
        }
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(all)
    }

    /// Revokes token `id`; `false` when there is none (identities already issued with it stay valid).
    pub fn revoke(&self, id: &str) -> anyhow::Result<bool> {
        let Some(mut t) = self.read(id) else { return Ok(false) };
        t.revoked = true;
        self.write(&t)?;
        tracing::info!(%id, "join token revoked");
        Ok(true)
    }

    /// Checks what a newcomer presented (`<id>.<secret>`); the token's id when it is valid.
    pub fn check(&self, presented: &str) -> Result<String, JoinRefused> {
        if presented.is_empty() {
            return Err(JoinRefused::Missing);
        }
        let s: JoinSecret = presented.parse().map_err(|_| JoinRefused::Unknown)?;
        let t = self.read(&s.id).ok_or(JoinRefused::Unknown)?;
        if t.hash != sha256_hex(s.presented()) {
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
}

/// Parses a duration for token expiry: `0` (never), or a number with `s`, `m`, `h` or `d`.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(0);
    }
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number and a unit (30m, 24h, 7d) or 0"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    n.checked_mul(ms).ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn token_forms() {
        let s = JoinSecret::generate(PIN);
        let full = s.full(PIN);
        assert!(full.starts_with("oak10") && full.contains("::"));
        assert_eq!(full.parse::<JoinSecret>().unwrap(), s);
        let short: JoinSecret = s.presented().parse().unwrap();
        assert_eq!(short.pin, None);
        assert_eq!(short.id, s.id);
        for bad in ["", "abc", "oak10abc::x.y", &format!("oak10{PIN}x.y"), "a.b c", "a./"] {
            assert!(bad.parse::<JoinSecret>().is_err(), "{bad:?} parsed");
        }
        assert!(format!("{s:?}").contains(&s.id) && !format!("{s:?}").contains(&s.secret));
    }

    #[test]
    fn store_check_expire_revoke() {
        let d = tempfile::tempdir().unwrap();
        let t = Tokens::open(&d.path().join("tokens")).unwrap();
        let (full, rec) = t.create(PIN, 0, "first").unwrap();
        let s: JoinSecret = full.parse().unwrap();
        assert_eq!(t.check(&s.presented()).unwrap(), rec.id);
        assert_eq!(t.check(""), Err(JoinRefused::Missing));
        let forged = JoinSecret { secret: "x".repeat(32), ..s.clone() };
        assert_eq!(t.check(&forged.presented()), Err(JoinRefused::Unknown));
        // the secret is not on disk
        let on_disk = std::fs::read_to_string(d.path().join("tokens").join(format!("{}.json", s.id))).unwrap();
        assert!(!on_disk.contains(&s.secret));
        // an expired one
        let old = JoinSecret::generate(PIN);
        t.add(&old, 1, "").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(t.check(&old.presented()), Err(JoinRefused::Expired(old.id.clone())));
        assert!(t.revoke(&rec.id).unwrap());
        assert_eq!(t.check(&s.presented()), Err(JoinRefused::Revoked(rec.id.clone())));
        assert!(!t.revoke("nosuch").unwrap());
        let all = t.list().unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|t| t.hash.is_empty()));
    }

    #[test]
    fn ttl() {
        assert_eq!(parse_ttl("0"), Ok(0));
        assert_eq!(parse_ttl("90s"), Ok(90_000));
        assert_eq!(parse_ttl("24h"), Ok(86_400_000));
        assert_eq!(parse_ttl("7d"), Ok(7 * 86_400_000));
        assert!(parse_ttl("7").is_err() && parse_ttl("h").is_err() && parse_ttl("3w").is_err());
    }
}
