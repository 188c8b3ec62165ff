//! A blocking JSON-over-HTTP client (the root's REST API, a NetManager's local API), used from a thread
//! inside a host.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A client of a JSON API, used from inside a host: the root's REST API, or any other at [`Api::at`].
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    /// The root's REST API at `root_ip`.
    pub fn new(root_ip: Ipv4Addr) -> Self {
        Self::at(format!("http://{root_ip}:10000"))
    }

    /// The API whose URLs start with `base` (`http://127.0.0.1:6000`), without a token.
    pub fn at(base: impl Into<String>) -> Self {
        Self { base: base.into(), token: None }
    }

    /// (status, JSON body or Null)
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
        let mut req = agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let r = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return (0, Value::String(e.to_string())),
        };
        let code = resp.status();
        (code, resp.into_json().unwrap_or(Value::Null))
    }

    pub fn login(&mut self, user: &str, password: &str) -> Result<()> {
        let (c, v) =
            self.call("POST", "/api/auth/login", Some(&serde_json::json!({"username": user, "password": password})));
        if c != 200 {
            bail!("login failed: {c} {v}");
        }
        self.token = Some(v["token"].as_str().context("no token")?.to_string());
        Ok(())
    }
}
