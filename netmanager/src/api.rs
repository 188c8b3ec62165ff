//! Local API for the NodeEngine (HTTP/JSON on 127.0.0.1:<port>), per the worker-side contract.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use oak_proto::netmanager_api::{DeployAnswer, DeployRequest, ErrorAnswer, UndeployRequest};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use crate::control::Control;
use crate::wiring::{WireError, Wiring};

/// What the API needs once the NetManager is up (set once after the lease and the bridge).
pub struct Ready {
    pub control: Control,
    pub wiring: Arc<Wiring>,
}

pub struct ApiState {
    pub ready: OnceCell<Ready>,
    pub public: SocketAddr,
    /// Datapath counters of the userspace proxy (set when it runs).
    pub counters: std::sync::OnceLock<Arc<crate::proxy::counters::Counters>>,
    /// The eBPF fast path (set when it loaded).
    pub fastpath: std::sync::OnceLock<Arc<parking_lot::Mutex<crate::ebpf::FastPath>>>,
    /// The credential the instance endpoints take (`Authorization: Bearer`), and the file it is in.
    pub credential: Credential,
}

/// The local API's credential: a random secret in a file only root reads (0600), so another local user
/// cannot wire a process of its choice; the NodeEngine reads the file.
#[derive(Clone)]
pub struct Credential {
    pub secret: String,
    pub file: std::path::PathBuf,
}

impl Credential {
    /// Reads `file`, or creates it with a new secret.
    pub fn load_or_create(file: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        if let Ok(s) = std::fs::read_to_string(file) {
            let secret = s.trim().to_string();
            if secret.len() >= 32 {
                return Ok(Self { secret, file: file.to_path_buf() });
            }
        }
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let secret = oak_trust::random_string(43);
        oak_trust::write_private(file, secret.as_bytes())
            .with_context(|| format!("writing the API credential {}", file.display()))?;
        Ok(Self { secret, file: file.to_path_buf() })
    }

    /// Whether the request's `Authorization: Bearer` header carries the secret (compared in constant time).
    fn admits(&self, headers: &axum::http::HeaderMap) -> bool {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        given.len() == self.secret.len()
            && given.bytes().zip(self.secret.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Lets a request to an instance endpoint through only with the credential.
async fn authorized(
    State(st): State<Arc<ApiState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if st.credential.admits(req.headers()) {
        return next.run(req).await;
    }
    ApiError::Unauthorized(st.credential.file.display().to_string()).into_response()
}

/// Why a request was refused; [`ApiError::status`] is the one place that maps a reason to an HTTP code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON the endpoint takes (`what`: deploy, undeploy).
    #[error("bad {what} request: {why}")]
    BadBody { what: &'static str, why: String },
    #[error("NetManager not ready: no worker subnet leased yet")]
    NotReady,
    /// A well-formed request with a field that cannot be right.
    #[error("{0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Anything else that failed on this host.
    #[error("{0:#}")]
    Internal(anyhow::Error),
    /// No or a wrong credential (the file holding the right one).
    #[error("missing or wrong credential: send Authorization: Bearer <the contents of {0}>")]
    Unauthorized(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadBody { .. } | ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Wire(WireError::PortMapping(_) | WireError::NoProcess { .. }) => StatusCode::BAD_REQUEST,
            ApiError::Wire(WireError::Host(_)) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(ErrorAnswer { error: self.to_string() })).into_response()
    }
}

/// The request body, or why it is not one.
fn body<T>(what: &'static str, body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|e| ApiError::BadBody { what, why: e.body_text() })
}

fn service_key(id: &str, name: &str) -> String {
    if id.is_empty() {
        name.to_string()
    } else {
        id.to_string()
    }
}

async fn status(State(st): State<Arc<ApiState>>) -> Json<Value> {
    let subnet = st.ready.get().map(|r| r.wiring.subnet().to_string());
    Json(json!({
        "ready": st.ready.initialized(),
        "subnet": subnet,
        "publicAddress": st.public.ip().to_string(),
        "tunnelPort": st.public.port(),
        "proxy": st.counters.get().is_some(),
        "ebpf": st.fastpath.get().is_some(),
    }))
}

/// Datapath counters: drops per reason and events (`{"proxy": false}` when the proxy is disabled).
/// With the fast path, `"ebpf"` holds its counters per path and reason (`false` without it).
async fn counters(State(st): State<Arc<ApiState>>) -> Json<Value> {
    let mut v = match st.counters.get() {
        Some(c) => {
            let mut v = c.to_json();
            v["proxy"] = true.into();
            v
        }
        None => json!({"proxy": false}),
    };
    v["ebpf"] = match st.fastpath.get().map(|fp| fp.lock().counters()) {
        Some(Ok(c)) => json!(c),
        Some(Err(e)) => json!({"error": format!("{e:#}")}),
        None => false.into(),
    };
    Json(v)
}

async fn deploy(
    State(st): State<Arc<ApiState>>,
    req: Result<Json<DeployRequest>, JsonRejection>,
) -> Result<Json<DeployAnswer>, ApiError> {
    let req = body("deploy", req)?;
    let ready = st.ready.get().ok_or(ApiError::NotReady)?;
    if req.service_name.is_empty() {
        return Err(ApiError::Invalid("serviceName is empty"));
    }
    if req.pid == 0 {
        return Err(ApiError::Invalid("pid must be the pid of the instance's process"));
    }
    let sid = service_key(&req.service_id, &req.service_name);
    let ip = ready
        .wiring
        .attach(req.pid, &sid, &req.service_name, req.instance_number, &req.port_mappings)
        .await
        .inspect_err(|e| tracing::warn!(error = %e, pid = req.pid, "deploy failed"))?;
    if let Some(fp) = st.fastpath.get() {
        let veth = ready.wiring.attachments().await.into_iter().find(|a| a.ip == ip).map(|a| a.host_veth);
        if let Some(veth) = veth {
            if let Err(e) = fp.lock().attach_instance(&veth, ip, crate::wiring::instance_mac(ip)) {
                tracing::warn!(%veth, "instance stays on the kernel path: {e:#}");
            }
        }
    }
    register_with_retry(ready.control.clone(), sid, req.service_name, req.instance_number, ip);
    Ok(Json(DeployAnswer { ns_address: ip.to_string(), ns_address_v6: String::new() }))
}

/// Register the instance with the cluster; retry in the background while the cluster is unreachable.
fn register_with_retry(control: Control, sid: String, job: String, instance: u32, ip: Ipv4Addr) {
    tokio::spawn(async move {
        for attempt in 0..60u32 {
            match control.register_instance(&sid, &job, instance, ip).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), attempt, job = %job, "instance registration failed; retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        tracing::error!(job = %job, instance, "gave up registering the instance with the cluster network service");
    });
}

async fn undeploy(
    State(st): State<Arc<ApiState>>,
    req: Result<Json<UndeployRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body("undeploy", req)?;
    let ready = st.ready.get().ok_or(ApiError::NotReady)?;
    if req.service_id.is_empty() && req.service_name.is_empty() {
        return Err(ApiError::Invalid("serviceId or serviceName is required"));
    }
    let sid = service_key(&req.service_id, &req.service_name);
    let att = ready.wiring.detach(&sid, req.instance_number).await.map_err(ApiError::Internal)?;
    if let Some(att) = att {
        if let Some(fp) = st.fastpath.get() {
            let _ = fp.lock().detach_instance(&att.host_veth);
        }
        let control = ready.control.clone();
        tokio::spawn(async move {
            if let Err(e) = control.deregister_instance(&att.service_id, &att.job_name, att.instance_number).await {
                tracing::warn!(error = %format!("{e:#}"), "instance deregistration failed");
            }
        });
    }
    Ok(Json(json!({})))
}

/// `/status` and `/counters` answer anyone on the API's address; the instance endpoints need the credential.
pub fn router(state: Arc<ApiState>) -> Router {
    let instances = Router::new()
        .route("/container/deploy", post(deploy))
        .route("/container/undeploy", post(undeploy))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorized));
    Router::new().route("/status", get(status)).route("/counters", get(counters)).merge(instances).with_state(state)
}
