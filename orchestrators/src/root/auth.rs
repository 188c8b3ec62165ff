//! Users, argon2 password hashes and HS256 JWTs.

use std::path::Path;

use anyhow::{anyhow, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::store::{Store, META, USERS};

pub const ADMIN: &str = "Admin";
pub const ACCESS_TTL_S: u64 = 3600;
pub const REFRESH_TTL_S: u64 = 7 * 24 * 3600;

/// Whether `user` may see what `owner` owns: their own things, and the admin everything.
pub fn may_see(user: &str, owner: &str) -> bool {
    user == ADMIN || user == owner
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub password_hash: String,
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    /// "access" or "refresh"
    pub kind: String,
}

pub fn hash_password(pw: &str) -> Result<String> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| anyhow!("salt: {e}"))?;
    Ok(Argon2::default().hash_password(pw.as_bytes(), &salt).map_err(|e| anyhow!("hash: {e}"))?.to_string())
}

pub fn verify_password(pw: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
}

fn random_string(n: usize) -> String {
    const CH: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    (0..n).map(|_| CH[rand::random_range(0..CH.len())] as char).collect()
}

#[derive(Clone)]
pub struct Auth {
    secret: Vec<u8>,
}

impl Auth {
    /// Loads (or creates) the JWT secret and the admin user. The admin password is taken from
    /// `admin_password` only when no admin exists yet; otherwise one is generated into `<dir>/admin-password`.
    pub fn init(store: &Store, data_dir: &Path, admin_password: Option<&str>) -> Result<Self> {
        let secret = store.update(|tx| {
            if let Some(s) = tx.get::<String>(META, "jwt_secret")? {
                return Ok(s);
            }
            let s = random_string(48);
            tx.put(META, "jwt_secret", &s)?;
            Ok(s)
        })?;
        if store.get::<User>(USERS, ADMIN)?.is_none() {
            let (pw, generated) = match admin_password.filter(|p| !p.is_empty()) {
                Some(p) => (p.to_string(), false),
                None => (random_string(20), true),
            };
            if generated {
                let path = data_dir.join("admin-password");
                write_secret_file(&path, &pw)?;
                tracing::warn!(path = %path.display(), "no --admin-password/OAK_ADMIN_PASSWORD given; generated the Admin password and wrote it to {}", path.display());
            }
            let user = User { name: ADMIN.into(), password_hash: hash_password(&pw)?, roles: vec!["Admin".into()] };
            store.update(|tx| tx.put(USERS, ADMIN, &user))?;
            tracing::info!("created user Admin");
        }
        Ok(Self { secret: secret.into_bytes() })
    }

    pub fn issue(&self, user: &str, kind: &str) -> Result<String> {
        let now = oak_proto::now_ms() / 1000;
        let ttl = if kind == "refresh" { REFRESH_TTL_S } else { ACCESS_TTL_S };
        let c = Claims { sub: user.into(), exp: now + ttl, iat: now, kind: kind.into() };
        Ok(encode(&Header::new(Algorithm::HS256), &c, &EncodingKey::from_secret(&self.secret))?)
    }

    /// Returns the claims of a valid, unexpired token of the given kind.
    pub fn check(&self, token: &str, kind: &str) -> Result<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.required_spec_claims = ["exp".to_string(), "sub".to_string()].into();
        let c = decode::<Claims>(token, &DecodingKey::from_secret(&self.secret), &v)?.claims;
        if c.kind != kind {
            return Err(anyhow!("token is a {} token, expected {kind}", c.kind));
        }
        Ok(c)
    }
}

fn write_secret_file(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_password_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let auth = Auth::init(&store, dir.path(), None).unwrap();
        let pw = std::fs::read_to_string(dir.path().join("admin-password")).unwrap();
        let u: User = store.get(USERS, ADMIN).unwrap().unwrap();
        assert!(verify_password(pw.trim(), &u.password_hash));
        assert!(!verify_password("Admin", &u.password_hash));
        let t = auth.issue(ADMIN, "access").unwrap();
        assert_eq!(auth.check(&t, "access").unwrap().sub, ADMIN);
        assert!(auth.check(&t, "refresh").is_err());
        assert!(auth.check(&format!("{t}x"), "access").is_err());
        // re-init keeps the secret: old tokens stay valid; a given password does not replace the admin
        let auth2 = Auth::init(&store, dir.path(), Some("other")).unwrap();
        assert!(auth2.check(&t, "access").is_ok());
        let u2: User = store.get(USERS, ADMIN).unwrap().unwrap();
        assert_eq!(u.password_hash, u2.password_hash);
    }
}
