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
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use crate::control::Control;
use crate::wiring::Wiring;

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
    pub fastpath: std::sync::OnceLock<Arc<std::sync::Mutex<crate::ebpf::FastPath>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeployRequest {
    pub pid: u32,
    pub service_name: String,
    #[serde(default)]
    pub service_id: String,
    pub instance_number: u32,
    #[serde(default)]
    pub port_mappings: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UndeployRequest {
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub service_id: String,
    pub instance_number: u32,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({"error": msg.into()}))).into_response()
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
    v["ebpf"] = match st.fastpath.get().map(|fp| fp.lock().expect("fast path lock").counters()) {
        Some(Ok(c)) => json!(c),
        Some(Err(e)) => json!({"error": format!("{e:#}")}),
        None => false.into(),
    };
    Json(v)
}

async fn deploy(State(st): State<Arc<ApiState>>, body: Result<Json<DeployRequest>, JsonRejection>) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad deploy request: {}", e.body_text())),
    };
    let Some(ready) = st.ready.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "NetManager not ready: no worker subnet leased yet");
    };
    if req.service_name.is_empty() {
        return error(StatusCode::BAD_REQUEST, "serviceName is empty");
    }
    if req.pid == 0 {
        return error(StatusCode::BAD_REQUEST, "pid must be the pid of the instance's process");
    }
    let sid = service_key(&req.service_id, &req.service_name);
    let ip = match ready.wiring.attach(req.pid, &sid, &req.service_name, req.instance_number, &req.port_mappings).await
    {
        Ok(ip) => ip,
        Err(e) => {
            let msg = format!("{e:#}");
            let code = if msg.contains("port mapping") || msg.contains("does not exist") {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            tracing::warn!(error = %msg, pid = req.pid, "deploy failed");
            return error(code, msg);
        }
    };
    if let Some(fp) = st.fastpath.get() {
        let veth = ready.wiring.attachments().await.into_iter().find(|a| a.ip == ip).map(|a| a.host_veth);
        if let Some(veth) = veth {
            if let Err(e) =
                fp.lock().expect("fast path lock").attach_instance(&veth, ip, crate::wiring::instance_mac(ip))
            {
                tracing::warn!(%veth, "instance stays on the kernel path: {e:#}");
            }
        }
    }
    register_with_retry(ready.control.clone(), sid, req.service_name, req.instance_number, ip);
    Json(json!({"nsAddress": ip.to_string(), "nsAddressv6": ""})).into_response()
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

async fn undeploy(State(st): State<Arc<ApiState>>, body: Result<Json<UndeployRequest>, JsonRejection>) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad undeploy request: {}", e.body_text())),
    };
    let Some(ready) = st.ready.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "NetManager not ready: no worker subnet leased yet");
    };
    if req.service_id.is_empty() && req.service_name.is_empty() {
        return error(StatusCode::BAD_REQUEST, "serviceId or serviceName is required");
    }
    let sid = service_key(&req.service_id, &req.service_name);
    match ready.wiring.detach(&sid, req.instance_number).await {
        Ok(att) => {
            if let Some(att) = att {
                if let Some(fp) = st.fastpath.get() {
                    let _ = fp.lock().expect("fast path lock").detach_instance(&att.host_veth);
                }
                let control = ready.control.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        control.deregister_instance(&att.service_id, &att.job_name, att.instance_number).await
                    {
                        tracing::warn!(error = %format!("{e:#}"), "instance deregistration failed");
                    }
                });
            }
            Json(json!({})).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/counters", get(counters))
        .route("/container/deploy", post(deploy))
        .route("/container/undeploy", post(undeploy))
        .with_state(state)
}
