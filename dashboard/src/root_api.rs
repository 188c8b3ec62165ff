//! The root's public REST API, the only thing the dashboard talks to. Every failure keeps the root's own
//! words (`message`, and `field` for a bad SLA) so the pages can show them as they are.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tokens the root answers a login or refresh with.
#[derive(Clone, Serialize, Deserialize)]
pub struct Tokens {
    pub token: String,
    pub refresh_token: String,
}

// never print tokens (in logs or panics)
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    /// The root answered with an error: its status and its message as it wrote them.
    #[error("{message}")]
    Answer { status: u16, message: String, field: Option<String> },
    /// The root did not answer.
    #[error("the root API at {url} did not answer: {reason}")]
    Unreachable { url: String, reason: String },
    /// The root refused the session's tokens (both): log in again.
    #[error("your session has ended; log in again")]
    SessionEnded,
}

impl ApiFailure {
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Answer { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The SLA field the root names as at fault, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Answer { field, .. } => field.as_deref(),
            _ => None,
        }
    }
}

/// A client of one root.
pub struct RootApi {
    http: reqwest::Client,
    base: String,
}

impl RootApi {
    /// `base`: `http://127.0.0.1:10000` or an `https://` URL; `ca`: a PEM file of the CA that issued an
    /// HTTPS root's certificate (the root's own `<data-dir>/ca/ca.pem` with `--api-tls-names`).
    pub fn new(base: &str, ca: Option<&Path>, timeout: Duration) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder().timeout(timeout).connect_timeout(Duration::from_secs(5));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading the root's CA {}", ca.display()))?;
            b = b.add_root_certificate(
                reqwest::Certificate::from_pem(&pem)
                    .with_context(|| format!("{} is not a PEM certificate", ca.display()))?,
            );
        }
        Ok(Self { http: b.build().context("building the HTTP client")?, base: base.trim_end_matches('/').to_string() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One call: `body` is sent as-is as JSON (an SLA the user wrote is passed through unparsed, so a
    /// syntax error is the root's to name). Answers the response's JSON (`null` when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<String>,
    ) -> Result<Value, ApiFailure> {
        self.call_for(method, path, bearer, body, None).await
    }

    /// [`RootApi::call`] on behalf of the browser at `client`, named in `X-Forwarded-For` (a root that
    /// trusts this dashboard as a proxy counts login attempts per browser, not per dashboard).
    async fn call_for(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<String>,
        client: Option<IpAddr>,
    ) -> Result<Value, ApiFailure> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(ip) = client {
            req = req.header("x-forwarded-for", ip.to_string());
        }
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b);
        }
        let resp =
            req.send().await.map_err(|e| ApiFailure::Unreachable { url: self.base.clone(), reason: chain(&e) })?;
        let status = resp.status();
        let text =
            resp.text().await.map_err(|e| ApiFailure::Unreachable { url: self.base.clone(), reason: chain(&e) })?;
        tracing::debug!(%method, path, status = status.as_u16(), "root API");
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return Ok(json.unwrap_or(Value::Null));
        }
        let (message, field) = match &json {
            Some(v) => (
                v["message"].as_str().map(String::from),
                v["field"].as_str().filter(|f| !f.is_empty()).map(String::from),
            ),
            None => (None, None),
        };
        let message = message.unwrap_or_else(|| {
            let t = text.trim();
            if t.is_empty() {
                format!("the root answered {status}")
            } else {
                format!("the root answered {status}: {}", t.chars().take(300).collect::<String>())
            }
        });
        Err(ApiFailure::Answer { status: status.as_u16(), message, field })
    }

    /// Logs in for the browser at `client`.
    pub async fn login(&self, username: &str, password: &str, client: IpAddr) -> Result<Tokens, ApiFailure> {
        let body = serde_json::json!({"username": username, "password": password}).to_string();
        tokens(self.call_for(Method::POST, "/api/auth/login", None, Some(body), Some(client)).await?)
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, ApiFailure> {
        let body = serde_json::json!({"refresh_token": refresh_token}).to_string();
        tokens(self.call(Method::POST, "/api/auth/refresh", None, Some(body)).await?)
    }

    /// Revokes both tokens at the root.
    pub async fn logout(&self, t: &Tokens) -> Result<(), ApiFailure> {
        let body = serde_json::json!({"refresh_token": t.refresh_token}).to_string();
        self.call(Method::POST, "/api/auth/logout", Some(&t.token), Some(body)).await.map(drop)
    }
}

fn tokens(v: Value) -> Result<Tokens, ApiFailure> {
    serde_json::from_value(v).map_err(|e| ApiFailure::Answer {
        status: 502,
        message: format!("the root's token answer is not understood: {e}"),
        field: None,
    })
}

/// An error with its causes (reqwest's own message alone says little: "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
