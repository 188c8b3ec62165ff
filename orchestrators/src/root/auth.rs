//! Users and their roles, HS256 JWTs with ids (so a logout revokes them), and the limit on login attempts
//! per source. Password hashes are checked on the bounded pool in [`super::passwords`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::passwords::{hash_password, Passwords};
use super::store::{Store, META, REVOKED, USERS};

pub const ADMIN: &str = "Admin";
/// The role that may do everything, and see and change every user's applications.
pub const ADMIN_ROLE: &str = "Admin";
/// The role a registered user gets when none is named: their own applications only.
pub const PROVIDER_ROLE: &str = "Application_Provider";
pub const ACCESS_TTL_S: u64 = 3600;
pub const REFRESH_TTL_S: u64 = 7 * 24 * 3600;
/// Login attempts a source may make at once before it is slowed down...
pub const LOGIN_BURST: u32 = 20;
/// ...and how many per minute after that.
pub const LOGIN_PER_MINUTE: u32 = 30;

/// Who calls: a user's name and whether it holds the Admin role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub admin: bool,
}

impl Identity {
    /// Whether this caller may see and change what `owner` owns: its own things, and the admin everything.
    pub fn may_see(&self, owner: &str) -> bool {
        self.admin || self.name == owner
    }

    /// Ok for the Admin role; `what` names the action refused otherwise.
    pub fn require_admin(&self, what: &str) -> Result<(), super::error::RootError> {
        if self.admin {
            Ok(())
        } else {
            Err(super::error::RootError::AdminOnly(what.into()))
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub password_hash: String,
    pub roles: Vec<String>,
}

impl User {
    pub fn identity(&self) -> Identity {
        Identity { name: self.name.clone(), admin: self.roles.iter().any(|r| r == ADMIN_ROLE) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    /// "access" or "refresh"
    pub kind: String,
    /// The token's id, for revocation.
    #[serde(default)]
    pub jti: String,
}

/// A login source that has used up its attempts.
#[derive(Debug, thiserror::Error)]
#[error("too many login attempts from {source_ip}; retry in {retry_after_s} s")]
pub struct Throttled {
    pub source_ip: IpAddr,
    pub retry_after_s: u64,
}

pub struct Auth {
    secret: Vec<u8>,
    /// The one pool that checks and makes password hashes.
    pub passwords: Passwords,
    logins: DefaultKeyedRateLimiter<IpAddr>,
    /// Revoked token ids and when they expire (then they are forgotten: the token is dead anyway).
    revoked: Mutex<HashMap<String, u64>>,
}

impl Auth {
    /// Loads (or creates) the JWT secret, the revoked token ids and the admin user. The admin password
    /// is taken from `admin_password` only when no admin exists yet; otherwise one is generated into
    /// `<dir>/admin-password` (0600).
    pub fn init(store: &Store, data_dir: &Path, admin_password: Option<&str>) -> Result<Self> {
        // replicas starting at once (on etcd) must end with one secret: created only where none is, and
        // read again when another replica's came first
        let create = || {
            store.update(|tx| {
                if let Some(s) = tx.get::<String>(META, "jwt_secret")? {
                    return Ok(s);
                }
                let s = oak_trust::random_string(48);
                tx.put_new(META, "jwt_secret", &s)?;
                Ok(s)
            })
        };
        let secret = match create() {
            Ok(s) => s,
            Err(_) => store.get::<String>(META, "jwt_secret")?.context("the JWT secret in the store")?,
        };
        if store.get::<User>(USERS, ADMIN)?.is_none() {
            let (pw, generated) = match admin_password.filter(|p| !p.is_empty()) {
                Some(p) => (p.to_string(), false),
                None => (oak_trust::random_string(20), true),
            };
            if generated {
                let path = data_dir.join("admin-password");
                oak_trust::write_private(&path, format!("{pw}\n").as_bytes())?;
                tracing::warn!(path = %path.display(), "no --admin-password/OAK_ADMIN_PASSWORD given; generated the Admin password and wrote it to {}", path.display());
            }
            let user = User {
                name: ADMIN.into(),
                password_hash: hash_password(&pw).map_err(|e| anyhow!("hashing the Admin password: {e}"))?,
                roles: vec![ADMIN_ROLE.into()],
            };
            match store.update(|tx| tx.put_new(USERS, ADMIN, &user)) {
                Ok(()) => tracing::info!("created user Admin"),
                // another replica made it first: its password holds
                Err(_) if store.get::<User>(USERS, ADMIN)?.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        let now = oak_proto::now_ms() / 1000;
        let revoked: HashMap<String, u64> =
            store.list::<(String, u64)>(REVOKED)?.into_iter().filter(|(_, exp)| *exp > now).collect();
        let quota = Quota::per_minute(NonZeroU32::new(LOGIN_PER_MINUTE).expect("non-zero"))
            .allow_burst(NonZeroU32::new(LOGIN_BURST).expect("non-zero"));
        Ok(Self {
            secret: secret.into_bytes(),
            passwords: Passwords::start()?,
            logins: RateLimiter::keyed(quota),
            revoked: Mutex::new(revoked),
        })
    }

    /// Counts one login attempt from `source`; refused once the source has used up its attempts. An
    /// IPv4-mapped source (an IPv4 client of a `[::]` listener) shares its IPv4 address's budget.
    pub fn admit_login(&self, source: IpAddr) -> Result<(), Throttled> {
        let source = oak_proto::endpoint::observed(source);
        self.logins.retain_recent();
        self.logins.check_key(&source).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Throttled { source_ip: source, retry_after_s: wait.max(Duration::from_secs(1)).as_secs() }
        })
    }

    /// The source a login attempt counts against: the peer, or, when the peer is one of the
    /// `trusted_proxies` (the dashboard), the client it names last in `X-Forwarded-For` (the address that
    /// proxy appended; earlier entries are the client's own word). Anyone else's `X-Forwarded-For` is
    /// ignored, so a client cannot pick its own budget.
    pub fn login_source(peer: IpAddr, forwarded_for: Option<&str>, trusted_proxies: &[IpAddr]) -> IpAddr {
        let peer = oak_proto::endpoint::observed(peer);
        if !trusted_proxies.iter().any(|p| oak_proto::endpoint::observed(*p) == peer) {
            return peer;
        }
        forwarded_for
            .and_then(|v| v.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok())
            .map(oak_proto::endpoint::observed)
            .unwrap_or(peer)
    }

    pub fn issue(&self, user: &str, kind: &str) -> Result<String> {
        let now = oak_proto::now_ms() / 1000;
        let ttl = if kind == "refresh" { REFRESH_TTL_S } else { ACCESS_TTL_S };
        let c =
            Claims { sub: user.into(), exp: now + ttl, iat: now, kind: kind.into(), jti: oak_trust::random_string(22) };
        Ok(encode(&Header::new(Algorithm::HS256), &c, &EncodingKey::from_secret(&self.secret))?)
    }

    /// Returns the claims of a valid, unexpired, unrevoked token of the given kind.
    pub fn check(&self, token: &str, kind: &str) -> Result<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.required_spec_claims = ["exp".to_string(), "sub".to_string()].into();
        let c = decode::<Claims>(token, &DecodingKey::from_secret(&self.secret), &v)?.claims;
        if c.kind != kind {
            return Err(anyhow!("token is a {} token, expected {kind}", c.kind));
        }
        if c.jti.is_empty() || self.revoked.lock().contains_key(&c.jti) {
            return Err(anyhow!("token has been revoked (logged out or refreshed)"));
        }
        Ok(c)
    }

    /// Takes the revoked token ids as the store has them now (another replica revoked some).
    pub fn reload_revoked(&self, store: &Store) -> Result<()> {
        let now = oak_proto::now_ms() / 1000;
        let revoked: HashMap<String, u64> =
            store.list::<(String, u64)>(REVOKED)?.into_iter().filter(|(_, exp)| *exp > now).collect();
        *self.revoked.lock() = revoked;
        Ok(())
    }

    /// Revokes a token for the rest of its life (stored, so a restart keeps it revoked); ids of tokens that
    /// have expired meanwhile are forgotten.
    pub fn revoke(&self, store: &Store, c: &Claims) -> Result<()> {
        let now = oak_proto::now_ms() / 1000;
        let expired: Vec<String> =
            self.revoked.lock().iter().filter(|(_, exp)| **exp <= now).map(|(jti, _)| jti.clone()).collect();
        store.update(|tx| {
            for jti in &expired {
                tx.delete(REVOKED, jti)?;
            }
            tx.put(REVOKED, &c.jti, &(c.jti.clone(), c.exp))
        })?;
        let mut r = self.revoked.lock();
        for jti in &expired {
            r.remove(jti);
        }
        r.insert(c.jti.clone(), c.exp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admin_password_tokens_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let auth = Auth::init(&store, dir.path(), None).unwrap();
        let pw_file = dir.path().join("admin-password");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777, 0o600);
        let pw = std::fs::read_to_string(&pw_file).unwrap();
        let u: User = store.get(USERS, ADMIN).unwrap().unwrap();
        assert!(u.identity().admin);
        assert!(auth.passwords.verify(pw.trim().into(), Some(u.password_hash.clone())).await.unwrap());
        assert!(!auth.passwords.verify("Admin".into(), Some(u.password_hash.clone())).await.unwrap());
        let t = auth.issue(ADMIN, "access").unwrap();
        let c = auth.check(&t, "access").unwrap();
        assert_eq!(c.sub, ADMIN);
        assert!(auth.check(&t, "refresh").is_err());
        assert!(auth.check(&format!("{t}x"), "access").is_err());
        // re-init keeps the secret: old tokens stay valid; a given password does not replace the admin
        let auth2 = Auth::init(&store, dir.path(), Some("other")).unwrap();
        assert!(auth2.check(&t, "access").is_ok());
        let u2: User = store.get(USERS, ADMIN).unwrap().unwrap();
        assert_eq!(u.password_hash, u2.password_hash);
        // a revoked token stays revoked, also after a restart; others are untouched
        let other = auth.issue(ADMIN, "access").unwrap();
        auth.revoke(&store, &c).unwrap();
        let e = auth.check(&t, "access").unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");
        assert!(auth.check(&other, "access").is_ok());
        let auth3 = Auth::init(&store, dir.path(), None).unwrap();
        assert!(auth3.check(&t, "access").is_err());
        assert!(auth3.check(&other, "access").is_ok());
    }

    #[test]
    fn logins_are_limited_per_source() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let auth = Auth::init(&store, dir.path(), Some("pw")).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..LOGIN_BURST {
            auth.admit_login(a).unwrap();
        }
        let e = auth.admit_login(a).unwrap_err();
        assert_eq!(e.source_ip, a);
        assert!(e.retry_after_s >= 1, "{e}");
        assert!(auth.admit_login(b).is_ok(), "another source keeps its own attempts");
        // on a `[::]` listener the same IPv4 client arrives IPv4-mapped: the same budget, named as IPv4
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let e = auth.admit_login(mapped).unwrap_err();
        assert_eq!(e.source_ip, a, "{e}");
        assert!(e.to_string().contains("from 192.0.2.1;"), "{e}");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(auth.admit_login(v6).is_ok(), "an IPv6 source has its own attempts");
    }

    #[test]
    fn a_trusted_proxy_names_the_login_source() {
        let (dash, browser, other): (IpAddr, IpAddr, IpAddr) =
            ("127.0.0.1".parse().unwrap(), "198.51.100.7".parse().unwrap(), "203.0.113.9".parse().unwrap());
        let trusted = [dash];
        // through the dashboard: the browser it names (the last entry, the one it appended)
        assert_eq!(Auth::login_source(dash, Some("198.51.100.7"), &trusted), browser);
        assert_eq!(Auth::login_source(dash, Some("10.9.9.9, 198.51.100.7"), &trusted), browser);
        // the dashboard's own IPv4-mapped address on a `[::]` listener is still the dashboard
        assert_eq!(Auth::login_source("::ffff:127.0.0.1".parse().unwrap(), Some("198.51.100.7"), &trusted), browser);
        // a client's own X-Forwarded-For is not believed
        assert_eq!(Auth::login_source(other, Some("198.51.100.7"), &trusted), other);
        // nothing trusted, no header, or garbage: the peer
        assert_eq!(Auth::login_source(dash, Some("198.51.100.7"), &[]), dash);
        assert_eq!(Auth::login_source(dash, None, &trusted), dash);
        assert_eq!(Auth::login_source(dash, Some("not-an-address"), &trusted), dash);
    }
}
