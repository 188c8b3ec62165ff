//! The logged-in user's session: the root's access and refresh tokens, kept in the browser as two HttpOnly,
//! SameSite=Strict cookies (script cannot read them, other sites cannot send them), and renewed through
//! the root's `/api/auth/refresh` shortly before the access token runs out or when the root refuses it.
//!
//! The dashboard keeps no session table of its own: the cookies are the session. A refresh token works
//! once at the root, so concurrent requests of one browser (page polls) that all find the token expiring
//! share one refresh: [`Refresher`] remembers each refresh's answer for a minute, keyed by a hash of the
//! refresh token used.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::root_api::{ApiFailure, RootApi, Tokens};

pub const ACCESS_COOKIE: &str = "oak_access";
pub const REFRESH_COOKIE: &str = "oak_refresh";

/// An access token with less than this left is renewed before it is used.
pub const REFRESH_MARGIN_S: u64 = 60;

/// How long a refresh's answer is handed to other requests that present the same (now used) refresh token.
const SHARED_REFRESH: Duration = Duration::from_secs(60);

/// The value of cookie `name` in a `Cookie:` header (`a=1; b=2`).
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie:` value for a token: HttpOnly, SameSite=Strict, the whole site, `Secure` when the
/// dashboard is reached over HTTPS; it lives as long as `max_age_s` (none: until the browser closes).
pub fn set_cookie(name: &str, value: &str, max_age_s: Option<u64>, secure: bool) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(s) = max_age_s {
        c.push_str(&format!("; Max-Age={s}"));
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// A `Set-Cookie:` value that deletes cookie `name`.
pub fn clear_cookie(name: &str, secure: bool) -> String {
    set_cookie(name, "", Some(0), secure)
}

/// The Set-Cookie values that store `tokens`: both cookies live until the refresh token expires.
pub fn token_cookies(tokens: &Tokens, secure: bool) -> [String; 2] {
    let max_age = claims(&tokens.refresh_token).and_then(|c| c.exp).map(|exp| exp.saturating_sub(now_s()));
    [
        set_cookie(ACCESS_COOKIE, &tokens.token, max_age, secure),
        set_cookie(REFRESH_COOKIE, &tokens.refresh_token, max_age, secure),
    ]
}

/// What the dashboard reads from a token. It does not verify the signature (it holds no key): the root
/// checks every token it is given, and the dashboard only uses these to decide when to refresh and whose
/// name to show.
#[derive(Debug, Default, PartialEq, serde::Deserialize)]
pub struct Claims {
    pub sub: Option<String>,
    pub exp: Option<u64>,
}

/// The claims of a JWT (`header.payload.signature`, payload base64url JSON); `None` when it is not one.
pub fn claims(jwt: &str) -> Option<Claims> {
    let mut parts = jwt.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Whether an access token should be renewed before use at time `now`: it expires within the margin, or
/// its expiry cannot be read.
pub fn needs_refresh(access: &str, now: u64) -> bool {
    claims(access).and_then(|c| c.exp).is_none_or(|exp| exp <= now + REFRESH_MARGIN_S)
}

/// Refreshes tokens at the root, once per refresh token (see the module documentation).
#[derive(Default)]
pub struct Refresher {
    recent: Mutex<HashMap<[u8; 32], (Instant, Tokens)>>,
}

impl Refresher {
    pub async fn refresh(&self, api: &RootApi, refresh_token: &str) -> Result<Tokens, ApiFailure> {
        let key: [u8; 32] = Sha256::digest(refresh_token.as_bytes()).into();
        // one refresh at a time: a second request with the same token waits and takes the first's answer
        let mut recent = self.recent.lock().await;
        recent.retain(|_, (at, _)| at.elapsed() < SHARED_REFRESH);
        if let Some((_, tokens)) = recent.get(&key) {
            return Ok(tokens.clone());
        }
        let tokens = api.refresh(refresh_token).await?;
        tracing::debug!(user = ?claims(&tokens.token).and_then(|c| c.sub), "session refreshed");
        recent.insert(key, (Instant::now(), tokens.clone()));
        Ok(tokens)
    }
}

/// One request's session: the tokens it came with, renewed during the request if needed. After the
/// handler, the cookies are rewritten when [`Session::renewed`] says so, and deleted when the session
/// ended (the root refused both tokens).
pub struct Session {
    api: Arc<RootApi>,
    refresher: Arc<Refresher>,
    tokens: parking_lot::Mutex<Tokens>,
    renewed: AtomicBool,
    ended: AtomicBool,
}

impl Session {
    pub fn new(api: Arc<RootApi>, refresher: Arc<Refresher>, tokens: Tokens) -> Self {
        Self {
            api,
            refresher,
            tokens: parking_lot::Mutex::new(tokens),
            renewed: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    pub fn tokens(&self) -> Tokens {
        self.tokens.lock().clone()
    }

    /// The user's name, from the access token.
    pub fn user(&self) -> String {
        claims(&self.tokens.lock().token).and_then(|c| c.sub).unwrap_or_default()
    }

    /// The tokens were renewed during this request (the browser must get the new ones).
    pub fn renewed(&self) -> bool {
        self.renewed.load(Ordering::SeqCst)
    }

    /// The root refused the tokens: the user must log in again.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Renews the tokens through the root; a refusal ends the session.
    pub async fn refresh(&self) -> Result<(), ApiFailure> {
        let refresh = self.tokens.lock().refresh_token.clone();
        match self.refresher.refresh(&self.api, &refresh).await {
            Ok(t) => {
                *self.tokens.lock() = t;
                self.renewed.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) if e.status() == Some(401) => {
                self.ended.store(true, Ordering::SeqCst);
                Err(ApiFailure::SessionEnded)
            }
            Err(e) => Err(e),
        }
    }

    /// Renews the tokens first when the access token is about to run out.
    pub async fn refresh_if_expiring(&self) -> Result<(), ApiFailure> {
        let access = self.tokens.lock().token.clone();
        if needs_refresh(&access, now_s()) {
            self.refresh().await?;
        }
        Ok(())
    }

    /// A call to the root as this user; a 401 (expired or revoked access token) is answered by one refresh
    /// and one retry.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<serde_json::Value, ApiFailure> {
        let access = self.tokens.lock().token.clone();
        match self.api.call(method.clone(), path, Some(&access), body.clone()).await {
            Err(e) if e.status() == Some(401) => {
                self.refresh().await?;
                let access = self.tokens.lock().token.clone();
                let r = self.api.call(method, path, Some(&access), body).await;
                if r.as_ref().is_err_and(|e| e.status() == Some(401)) {
                    self.ended.store(true, Ordering::SeqCst);
                    return Err(ApiFailure::SessionEnded);
                }
                r
            }
            r => r,
        }
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, ApiFailure> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b(r#"{"alg":"HS256","typ":"JWT"}"#), b(payload))
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let h = "x=1; oak_access=aaa.bbb.ccc;oak_refresh=r.r.r; oak_access_old=zzz";
        assert_eq!(cookie(h, ACCESS_COOKIE), Some("aaa.bbb.ccc"));
        assert_eq!(cookie(h, REFRESH_COOKIE), Some("r.r.r"));
        assert_eq!(cookie(h, "oak"), None);
        assert_eq!(cookie("oak_access=", ACCESS_COOKIE), None, "an emptied cookie is no session");
        assert_eq!(cookie("", ACCESS_COOKIE), None);
    }

    #[test]
    fn set_cookie_is_http_only_and_strict() {
        assert_eq!(set_cookie("a", "v", Some(30), false), "a=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=30");
        assert_eq!(set_cookie("a", "v", None, true), "a=v; Path=/; HttpOnly; SameSite=Strict; Secure");
        assert!(clear_cookie("a", false).contains("a=; ") && clear_cookie("a", false).ends_with("Max-Age=0"));
    }

    #[test]
    fn token_cookies_live_until_the_refresh_token_expires() {
        let exp = now_s() + 1000;
        let t = Tokens { token: jwt(r#"{"sub":"Admin","exp":1}"#), refresh_token: jwt(&format!(r#"{{"exp":{exp}}}"#)) };
        let [a, r] = token_cookies(&t, false);
        assert!(a.starts_with(&format!("oak_access={};", t.token)), "{a}");
        assert!(r.starts_with(&format!("oak_refresh={};", t.refresh_token)), "{r}");
        let age: u64 = a.rsplit("Max-Age=").next().unwrap().parse().unwrap();
        assert!((990..=1000).contains(&age), "{a}");
    }

    #[test]
    fn claims_of_a_jwt() {
        let c = claims(&jwt(r#"{"sub":"Admin","exp":1700000000,"kind":"access"}"#)).unwrap();
        assert_eq!(c, Claims { sub: Some("Admin".into()), exp: Some(1_700_000_000) });
        assert_eq!(claims("not a token"), None);
        assert_eq!(claims("a.%%%.c"), None);
        assert_eq!(claims(&jwt("[1,2]")), None);
    }

    #[test]
    fn refresh_shortly_before_expiry_or_when_unreadable() {
        let t = |exp: u64| jwt(&format!(r#"{{"sub":"u","exp":{exp}}}"#));
        assert!(!needs_refresh(&t(10_000), 1_000));
        assert!(needs_refresh(&t(1_000 + REFRESH_MARGIN_S), 1_000));
        assert!(needs_refresh(&t(500), 1_000), "expired");
        assert!(needs_refresh("garbage", 1_000));
        assert!(needs_refresh(&jwt(r#"{"sub":"u"}"#), 1_000), "no exp");
    }
}
