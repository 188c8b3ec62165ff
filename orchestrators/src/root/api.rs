//! REST API compatible with Oakestra's root API as `oak-cli` uses it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{request::Parts, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::{self, User};
use super::store::{new_id, APPLICATIONS, SERVICES, USERS};
use super::{ApplicationRecord, Outgoing, Root, ServiceRecord};
use crate::model;

/// An error answer: `{"message": ...}` with a status code.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub Value);

impl ApiError {
    pub fn new(code: StatusCode, msg: impl Into<String>) -> Self {
        Self(code, json!({"message": msg.into()}))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!("internal error: {e:#}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e:#}"))
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// The authenticated user (from `Authorization: Bearer <access token>`).
pub struct AuthUser(pub String);

impl AuthUser {
    fn is_admin(&self) -> bool {
        self.0 == auth::ADMIN
    }
    fn may_see(&self, owner: &str) -> bool {
        self.is_admin() || self.0 == owner
    }
}

fn bearer(parts: &Parts) -> Option<&str> {
    let h = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")).map(str::trim)
}

impl FromRequestParts<Arc<Root>> for AuthUser {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, root: &Arc<Root>) -> Result<Self, ApiError> {
        let Some(t) = bearer(parts) else {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing Authorization: Bearer <token> header"));
        };
        match root.auth.check(t, "access") {
            Ok(c) => Ok(AuthUser(c.sub)),
            Err(e) => Err(ApiError::new(StatusCode::UNAUTHORIZED, format!("invalid token: {e}"))),
        }
    }
}

pub fn router(root: Arc<Root>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/auth/login", post(login))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/application", post(create_application))
        .route("/api/application/", post(create_application))
        .route("/api/applications", get(list_applications))
        .route("/api/applications/", get(list_applications))
        .route("/api/application/{id}", get(get_application).put(update_application).delete(delete_application))
        .route("/api/services/{app_id}", get(list_services))
        .route("/api/services/", get(list_all_services))
        .route("/api/services", get(list_all_services))
        .route("/api/service/{id}", get(get_service).delete(delete_service))
        .route("/api/service/{id}/instance", post(deploy_instance))
        .route("/api/service/{id}/instance/{n}", axum::routing::delete(undeploy_instance))
        .route("/api/clusters/", get(clusters_all))
        .route("/api/clusters", get(clusters_all))
        .route("/api/clusters/active", get(clusters_active))
        .route("/api/clusters/active/", get(clusters_active))
        .route("/api/docs/openapi.json", get(openapi_json))
        .route("/api/docs", get(docs_page))
        .route("/api/docs/", get(docs_page))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(root)
}

async fn health(State(root): State<Arc<Root>>) -> Response {
    if root.ready.load(std::sync::atomic::Ordering::SeqCst) {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "starting"}))).into_response()
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.len() > 1 << 20 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "body too large (at most 1 MiB)"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("body is not valid JSON: {e}")))
}

fn tokens(root: &Root, user: &str) -> ApiResult {
    Ok(Json(json!({
        "message": "Logged in",
        "token": root.auth.issue(user, "access")?,
        "refresh_token": root.auth.issue(user, "refresh")?,
    })))
}

async fn login(State(root): State<Arc<Root>>, body: Bytes) -> ApiResult {
    let v = parse_json(&body)?;
    let (Some(u), Some(p)) = (v["username"].as_str(), v["password"].as_str()) else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "username and password (strings) are required"));
    };
    let user: Option<User> = root.store.get(USERS, u)?;
    let root2 = root.clone();
    let p = p.to_string();
    let ok =
        tokio::task::spawn_blocking(move || user.is_some_and(|user| auth::verify_password(&p, &user.password_hash)))
            .await
            .unwrap_or(false);
    if !ok {
        tracing::info!(user = u, "failed login");
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid username or password"));
    }
    tokens(&root2, u)
}

async fn refresh(State(root): State<Arc<Root>>, headers: axum::http::HeaderMap, body: Bytes) -> ApiResult {
    let from_body =
        serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["refresh_token"].as_str().map(String::from));
    let from_header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(String::from);
    let Some(t) = from_body.or(from_header) else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "refresh_token missing (body field or Bearer header)"));
    };
    match root.auth.check(&t, "refresh") {
        Ok(c) => tokens(&root, &c.sub),
        Err(e) => Err(ApiError::new(StatusCode::UNAUTHORIZED, format!("invalid refresh token: {e}"))),
    }
}

fn user_apps(root: &Root, user: &AuthUser) -> Result<Vec<Value>, ApiError> {
    let apps: Vec<ApplicationRecord> = root.store.list(APPLICATIONS)?;
    Ok(apps.iter().filter(|a| user.may_see(&a.user_id)).map(ApplicationRecord::to_json).collect())
}

async fn create_application(State(root): State<Arc<Root>>, user: AuthUser, body: Bytes) -> ApiResult {
    let v = parse_json(&body)?;
    let sla = model::parse_sla(&v).map_err(|e| {
        ApiError(StatusCode::BAD_REQUEST, json!({"message": format!("invalid SLA: {e}"), "field": e.field}))
    })?;
    // Service IPs first (they may be asked for in the SLA and be taken): nothing is stored on failure.
    let mut planned: Vec<Vec<crate::model::Microservice>> = Vec::new();
    let mut allocated: Vec<String> = Vec::new();
    let release = |ids: &[String]| {
        for sid in ids {
            if let Err(e) = root.net.release_service_ips(sid) {
                tracing::error!(service_id = %sid, "releasing service IPs: {e:#}");
            }
        }
    };
    for (ai, a) in sla.applications.iter().enumerate() {
        let mut list = Vec::new();
        for (mi, ms) in a.microservices.iter().enumerate() {
            let path = format!("applications[{ai}].microservices[{mi}].addresses");
            let want = |v: &str, f: &str| -> Result<Option<std::net::Ipv4Addr>, ApiError> {
                if v.is_empty() {
                    return Ok(None);
                }
                v.parse().map(Some).map_err(|_| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        json!({"message": format!("invalid SLA: {path}.{f}: {v:?} is not an IPv4 address"), "field": format!("{path}.{f}")}),
                    )
                })
            };
            let wanted = want(&ms.addresses.rr_ip, "rr_ip")
                .and_then(|rr| Ok((rr, want(&ms.addresses.closest_ip, "closest_ip")?)));
            let (want_rr, want_cl) = match wanted {
                Ok(w) => w,
                Err(e) => {
                    release(&allocated);
                    return Err(e);
                }
            };
            let sid = new_id();
            let job = ms.job_name(&a.application_name, &a.application_namespace);
            match root.net.allocate_service_ips_as(&sid, &job, want_rr, want_cl) {
                Ok((rr, cl)) => {
                    allocated.push(sid.clone());
                    let mut m = ms.clone();
                    m.microservice_id = sid;
                    m.addresses.rr_ip = rr.to_string();
                    m.addresses.closest_ip = cl.to_string();
                    list.push(m);
                }
                Err(e) => {
                    release(&allocated);
                    let msg = format!("{e:#}");
                    let field =
                        if msg.contains("closest_ip") { format!("{path}.closest_ip") } else { format!("{path}.rr_ip") };
                    return Err(ApiError(
                        StatusCode::BAD_REQUEST,
                        json!({"message": format!("invalid SLA: {path}: {msg}"), "field": field}),
                    ));
                }
            }
        }
        planned.push(list);
    }
    let created = root.store.update(|tx| {
        let existing: Vec<ApplicationRecord> = tx.list(APPLICATIONS)?;
        let mut ids = Vec::new();
        for (ai, a) in sla.applications.iter().enumerate() {
            let dup = existing.iter().any(|e| {
                e.application_name == a.application_name && e.application_namespace == a.application_namespace
            }) || sla.applications[..ai].iter().any(|o| {
                o.application_name == a.application_name && o.application_namespace == a.application_namespace
            });
            if dup {
                // nothing written yet: returning before any put keeps the store unchanged
                return Ok(Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "application {}.{} already exists (applications[{ai}])",
                        a.application_name, a.application_namespace
                    ),
                )));
            }
        }
        for (a, services) in sla.applications.iter().zip(&planned) {
            let app_id = new_id();
            let mut rec = ApplicationRecord {
                application_id: app_id.clone(),
                application_name: a.application_name.clone(),
                application_namespace: a.application_namespace.clone(),
                application_desc: a.application_desc.clone(),
                user_id: user.0.clone(),
                microservices: vec![],
            };
            for sla_ms in services {
                let sid = sla_ms.microservice_id.clone();
                let ms = sla_ms;
                let sla_ms = sla_ms.clone();
                let svc = ServiceRecord {
                    microservice_id: sid.clone(),
                    application_id: app_id.clone(),
                    app_name: a.application_name.clone(),
                    app_ns: a.application_namespace.clone(),
                    job_name: ms.job_name(&a.application_name, &a.application_namespace),
                    user_id: user.0.clone(),
                    sla: sla_ms,
                    instance_list: vec![],
                    next_instance: 0,
                };
                tx.put(SERVICES, &sid, &svc)?;
                rec.microservices.push(sid);
            }
            tx.put(APPLICATIONS, &app_id, &rec)?;
            ids.push(app_id);
        }
        Ok(Ok(ids))
    });
    let ids = match created {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => {
            release(&allocated);
            return Err(e);
        }
        Err(e) => {
            release(&allocated);
            return Err(e.into());
        }
    };
    tracing::info!(?ids, user = %user.0, "applications created");
    Ok(Json(Value::Array(user_apps(&root, &user)?)))
}

async fn list_applications(State(root): State<Arc<Root>>, user: AuthUser) -> ApiResult {
    Ok(Json(Value::Array(user_apps(&root, &user)?)))
}

fn load_app(root: &Root, user: &AuthUser, id: &str) -> Result<ApplicationRecord, ApiError> {
    match root.store.get::<ApplicationRecord>(APPLICATIONS, id)? {
        Some(a) if user.may_see(&a.user_id) => Ok(a),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, format!("application {id} not found"))),
    }
}

fn load_service(root: &Root, user: &AuthUser, id: &str) -> Result<ServiceRecord, ApiError> {
    match root.store.get::<ServiceRecord>(SERVICES, id)? {
        Some(s) if user.may_see(&s.user_id) => Ok(s),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, format!("service {id} not found"))),
    }
}

async fn get_application(State(root): State<Arc<Root>>, user: AuthUser, Path(id): Path<String>) -> ApiResult {
    Ok(Json(load_app(&root, &user, &id)?.to_json()))
}

async fn update_application(
    State(root): State<Arc<Root>>,
    user: AuthUser,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let v = parse_json(&body)?;
    let mut app = load_app(&root, &user, &id)?;
    for (k, target) in [("application_name", 0), ("application_namespace", 1), ("application_desc", 2)] {
        match v.get(k) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                if target < 2 && !((1..=30).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())) {
                    return Err(ApiError(
                        StatusCode::BAD_REQUEST,
                        json!({"message": format!("{k}: must match ^[a-zA-Z0-9]{{1,30}}$"), "field": k}),
                    ));
                }
                if s.len() > model::MAX_STRING {
                    return Err(ApiError(
                        StatusCode::BAD_REQUEST,
                        json!({"message": format!("{k}: string too long"), "field": k}),
                    ));
                }
                match target {
                    0 => app.application_name = s.clone(),
                    1 => app.application_namespace = s.clone(),
                    _ => app.application_desc = s.clone(),
                }
            }
            Some(_) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    json!({"message": format!("{k}: expected a string"), "field": k}),
                ))
            }
        }
    }
    let r = root.store.update(|tx| {
        let all: Vec<ApplicationRecord> = tx.list(APPLICATIONS)?;
        if all.iter().any(|o| {
            o.application_id != app.application_id
                && o.application_name == app.application_name
                && o.application_namespace == app.application_namespace
        }) {
            return Ok(false);
        }
        tx.put(APPLICATIONS, &id, &app)?;
        Ok(true)
    })?;
    if !r {
        return Err(ApiError::new(StatusCode::CONFLICT, "another application has this name+namespace"));
    }
    Ok(Json(app.to_json()))
}

async fn delete_application(State(root): State<Arc<Root>>, user: AuthUser, Path(id): Path<String>) -> ApiResult {
    let app = load_app(&root, &user, &id)?;
    let mut out = Outgoing::new();
    root.store.update(|tx| {
        for sid in &app.microservices {
            if let Some(s) = tx.get::<ServiceRecord>(SERVICES, sid)? {
                root.undeploy_all(&s, &mut out);
                tx.delete(SERVICES, sid)?;
            }
        }
        tx.delete(APPLICATIONS, &id)
    })?;
    root.send(out);
    for sid in &app.microservices {
        if let Err(e) = root.net.release_service_ips(sid) {
            tracing::error!(service_id = %sid, "releasing service IPs: {e:#}");
        }
    }
    tracing::info!(application_id = %id, "application deleted");
    Ok(Json(json!({"message": format!("application {id} deleted")})))
}

async fn list_services(State(root): State<Arc<Root>>, user: AuthUser, Path(app_id): Path<String>) -> ApiResult {
    let app = load_app(&root, &user, &app_id)?;
    let mut out = Vec::new();
    for sid in &app.microservices {
        if let Some(s) = root.store.get::<ServiceRecord>(SERVICES, sid)? {
            out.push(s.to_json());
        }
    }
    Ok(Json(Value::Array(out)))
}

async fn list_all_services(State(root): State<Arc<Root>>, user: AuthUser) -> ApiResult {
    let all: Vec<ServiceRecord> = root.store.list(SERVICES)?;
    Ok(Json(Value::Array(all.iter().filter(|s| user.may_see(&s.user_id)).map(ServiceRecord::to_json).collect())))
}

async fn get_service(State(root): State<Arc<Root>>, user: AuthUser, Path(id): Path<String>) -> ApiResult {
    Ok(Json(load_service(&root, &user, &id)?.to_json()))
}

async fn delete_service(State(root): State<Arc<Root>>, user: AuthUser, Path(id): Path<String>) -> ApiResult {
    let svc = load_service(&root, &user, &id)?;
    let mut out = Outgoing::new();
    root.store.update(|tx| {
        root.undeploy_all(&svc, &mut out);
        tx.delete(SERVICES, &id)?;
        if let Some(mut app) = tx.get::<ApplicationRecord>(APPLICATIONS, &svc.application_id)? {
            app.microservices.retain(|s| s != &id);
            tx.put(APPLICATIONS, &app.application_id, &app)?;
        }
        Ok(())
    })?;
    root.send(out);
    if let Err(e) = root.net.release_service_ips(&id) {
        tracing::error!(service_id = %id, "releasing service IPs: {e:#}");
    }
    Ok(Json(json!({"message": format!("service {id} deleted")})))
}

async fn deploy_instance(State(root): State<Arc<Root>>, user: AuthUser, Path(id): Path<String>) -> ApiResult {
    load_service(&root, &user, &id)?;
    let Some(inst) = root.deploy_instance(&id)? else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("service {id} not found")));
    };
    // 200 even when unplaceable: the instance exists and is retried; oak-cli fails on any non-200.
    let placed = inst.status == oak_proto::InstanceState::ClusterScheduled;
    Ok(Json(json!({
        "message": if placed { "ok".to_string() } else { format!("instance {} not placed yet: {}", inst.instance_number, inst.status_detail) },
        "instance_number": inst.instance_number,
        "status": inst.status,
        "status_detail": inst.status_detail,
        "cluster_id": inst.cluster_id,
        "cluster_name": inst.cluster_name,
    })))
}

async fn undeploy_instance(
    State(root): State<Arc<Root>>,
    user: AuthUser,
    Path((id, n)): Path<(String, String)>,
) -> ApiResult {
    load_service(&root, &user, &id)?;
    let n: u32 = n.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("instance number {n:?} is not a non-negative integer"))
    })?;
    if !root.undeploy_instance(&id, n)? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("service {id} has no instance {n}")));
    }
    Ok(Json(json!({"message": "ok"})))
}

async fn clusters_all(State(root): State<Arc<Root>>) -> ApiResult {
    Ok(Json(Value::Array(root.clusters_json(false)?)))
}

async fn clusters_active(State(root): State<Arc<Root>>) -> ApiResult {
    Ok(Json(Value::Array(root.clusters_json(true)?)))
}

async fn openapi_json() -> Response {
    Json(super::openapi::document()).into_response()
}

async fn docs_page() -> Html<String> {
    Html(super::openapi::html(&super::openapi::document()))
}
