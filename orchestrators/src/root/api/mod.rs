//! REST API compatible with Oakestra's root API as `oak-cli` uses it. Handlers are thin: parse the
//! request, call a use case on [`Root`], map the answer; errors become responses in [`error`].

pub mod error;
pub mod types;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::{request::Parts, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use oak_proto::InstanceState;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tower::Layer;
use tower_http::normalize_path::{NormalizePath, NormalizePathLayer};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::applications::ApplicationUpdate;
use super::auth::Identity;
use super::error::RootError;
use super::records::ApplicationRecord;
use super::users::{Registration, UserDoc, MAX_PASSWORD};
use super::Root;
use crate::model::{self, Sla};
pub use error::ApiError;
use oak_trust::JoinToken;
use types::{ApplicationDoc, ClusterDoc, DeployAnswer, Health, Login, LogsDoc, Message, ServiceDoc, Tokens, WorkerDoc};

type ApiResult<T = Value> = Result<Json<T>, ApiError>;

/// A request body, parsed by the handler (so a bad one is answered with the field at fault). Named
/// apart from `Bytes` so utoipa does not document it as a raw byte body: each handler names its body.
type Body = Bytes;

/// The caller of an authenticated endpoint: the root, and the user named by `Authorization: Bearer <access
/// token>`.
pub struct Caller {
    root: Arc<Root>,
    who: Identity,
}

fn bearer_header(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")).map(str::trim)
}

impl FromRequestParts<Arc<Root>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, root: &Arc<Root>) -> Result<Self, ApiError> {
        let Some(t) = bearer_header(&parts.headers) else {
            return Err(ApiError::Unauthorized("missing Authorization: Bearer <token> header".into()));
        };
        let claims = root.auth.check(t, "access").map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
        match root.identity(&claims.sub)? {
            Some(who) => Ok(Caller { root: root.clone(), who }),
            None => Err(ApiError::Unauthorized(format!("user {} no longer exists", claims.sub))),
        }
    }
}

/// The answers any call on one of the caller's objects may get besides its own (OpenAPI only).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum OwnObject {
    #[response(status = 401, description = "no valid token")]
    Unauthorized(Message),
    #[response(status = 404, description = "unknown id")]
    NotFound(Message),
}

/// The object id in the path (OpenAPI only).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct Id {
    id: String,
}

/// The API as a service: the routes and their OpenAPI document come from the handlers' `#[utoipa::path]`
/// annotations (one source, so they cannot drift); a trailing slash is trimmed before routing, since
/// Oakestra's clients call both spellings.
pub fn service(root: Arc<Root>) -> NormalizePath<Router> {
    let (api, doc) = routes();
    let doc = Arc::new(super::openapi::document(doc));
    let page = Html(super::openapi::html(&doc));
    let router = api
        .route("/api/docs/openapi.json", get(move || async move { Json(doc.as_ref().clone()) }))
        .route("/api/docs", get(move || async move { page }))
        .fallback(|| async { ApiError::NoSuchEndpoint })
        // a replica that does not lead forwards what needs the leader
        .layer(axum::middleware::from_fn_with_state(root.clone(), super::ha::forward))
        .with_state(root);
    NormalizePathLayer::trim_trailing_slash().layer(router)
}

/// The handlers, routed by their annotations, and the OpenAPI operations those describe.
pub(super) fn routes() -> (Router<Arc<Root>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(register))
        .routes(routes!(list_users))
        .routes(routes!(get_user, delete_user, change_password))
        .routes(routes!(create_join_token, list_join_tokens))
        .routes(routes!(revoke_join_token))
        .routes(routes!(create_application))
        .routes(routes!(list_applications))
        .routes(routes!(get_application, update_application, delete_application))
        .routes(routes!(list_services))
        .routes(routes!(list_all_services))
        .routes(routes!(get_service, delete_service))
        .routes(routes!(deploy_instance))
        .routes(routes!(undeploy_instance))
        .routes(routes!(instance_logs))
        .routes(routes!(clusters_all))
        .routes(routes!(clusters_active))
        .routes(routes!(cluster_workers))
        .split_for_parts()
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.len() > 1 << 20 {
        return Err(ApiError::BadRequest("body too large (at most 1 MiB)".into()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))
}

/// The body as `T`; a type error names the field (`field: problem`).
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(parse_json(body)?).map_err(|e| {
        let field = e.path().to_string();
        RootError::InvalidField(model::SlaError { problem: e.into_inner().to_string(), field }).into()
    })
}

fn json_list<T>(items: &[T], doc: impl Fn(&T) -> Value) -> Json<Value> {
    Json(Value::Array(items.iter().map(doc).collect()))
}

fn app_json(a: &ApplicationRecord) -> Value {
    serde_json::to_value(ApplicationDoc::from(a)).unwrap_or_default()
}

fn message(m: impl Into<String>) -> Json<Message> {
    Json(Message::new(m))
}

#[utoipa::path(get, path = "/api/health", summary = "Readiness: 200 once the store is open and both listeners are bound",
    responses((status = 200, description = "OK", body = Health), (status = 503, description = "starting", body = Message)))]
async fn health(State(root): State<Arc<Root>>) -> Response {
    let (role, leader) = match root.ha.as_ref().map(|h| h.role()) {
        None => (None, None),
        Some(super::ha::Role::Leader) => {
            (Some("leader".to_string()), root.ha.as_ref().map(|h| h.cfg.advertise_api.clone()))
        }
        Some(super::ha::Role::Follower { leader_api }) => (Some("follower".to_string()), leader_api),
    };
    if root.ready.load(Ordering::SeqCst) {
        Json(Health { status: "ok".into(), role, leader }).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "starting".into(), role, leader })).into_response()
    }
}

fn tokens(root: &Root, user: &str) -> ApiResult<Tokens> {
    Ok(Json(Tokens {
        message: "Logged in".into(),
        token: root.auth.issue(user, "access")?,
        refresh_token: root.auth.issue(user, "refresh")?,
    }))
}

#[utoipa::path(post, path = "/api/auth/login", summary = "Log in; returns an access and a refresh token (JWT HS256)",
    request_body = Login,
    responses((status = 200, description = "OK", body = Tokens), (status = 401, description = "bad credentials", body = Message),
        (status = 400, description = "malformed body", body = Message),
        (status = 429, description = "too many attempts from this source, or too many password checks at once", body = Message)))]
async fn login(
    State(root): State<Arc<Root>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Tokens> {
    // one budget per source: an IPv4 client of a `[::]` listener counts as its IPv4 address; behind a
    // trusted proxy (the dashboard), the browser it names
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let source = super::auth::Auth::login_source(peer.ip(), forwarded, &root.cfg.trusted_proxies);
    root.auth.admit_login(source).inspect_err(|e| tracing::warn!("{e}"))?;
    let Ok(Login { username, password }) = serde_json::from_value(parse_json(&body)?) else {
        return Err(ApiError::BadRequest("username and password (strings) are required".into()));
    };
    if password.len() > MAX_PASSWORD {
        return Err(ApiError::Unauthorized("invalid username or password".into()));
    }
    let hash = root.password_hash(&username)?;
    if !root.auth.passwords.verify(password, hash).await.map_err(RootError::from)? {
        tracing::info!(user = %username, %source, "failed login");
        return Err(ApiError::Unauthorized("invalid username or password".into()));
    }
    tokens(&root, &username)
}

/// The body's `refresh_token` field, if it has one.
fn body_refresh_token(body: &Bytes) -> Option<String> {
    serde_json::from_slice::<Value>(body).ok().and_then(|v| v["refresh_token"].as_str().map(String::from))
}

/// The refresh token of a request: the body's `refresh_token`, else the Bearer header.
fn refresh_token(headers: &HeaderMap, body: &Bytes) -> Option<String> {
    body_refresh_token(body).or_else(|| bearer_header(headers).map(String::from))
}

#[utoipa::path(post, path = "/api/auth/refresh",
    summary = "New tokens from a refresh token (body field refresh_token or Bearer header); the refresh token used is revoked",
    responses((status = 200, description = "OK", body = Tokens), (status = 401, description = "invalid refresh token", body = Message)))]
async fn refresh(State(root): State<Arc<Root>>, headers: HeaderMap, body: Body) -> ApiResult<Tokens> {
    let Some(t) = refresh_token(&headers, &body) else {
        return Err(ApiError::Unauthorized("refresh_token missing (body field or Bearer header)".into()));
    };
    let c =
        root.auth.check(&t, "refresh").map_err(|e| ApiError::Unauthorized(format!("invalid refresh token: {e}")))?;
    if root.identity(&c.sub)?.is_none() {
        return Err(ApiError::Unauthorized(format!("user {} no longer exists", c.sub)));
    }
    root.auth.revoke(&root.store, &c)?;
    tokens(&root, &c.sub)
}

#[utoipa::path(post, path = "/api/auth/logout",
    summary = "Revoke the access token of the request, and the refresh token in the body's refresh_token if given",
    security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Message), (status = 401, description = "no valid token", body = Message)))]
async fn logout(State(root): State<Arc<Root>>, headers: HeaderMap, body: Body) -> ApiResult<Message> {
    let Some(access) = bearer_header(&headers) else {
        return Err(ApiError::Unauthorized("missing Authorization: Bearer <token> header".into()));
    };
    let c = root.auth.check(access, "access").map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
    root.auth.revoke(&root.store, &c)?;
    if let Some(r) = body_refresh_token(&body) {
        match root.auth.check(&r, "refresh") {
            Ok(rc) if rc.sub == c.sub => root.auth.revoke(&root.store, &rc)?,
            _ => return Err(ApiError::BadRequest("refresh_token is not a valid refresh token of this user".into())),
        }
    }
    Ok(message(format!("{} logged out", c.sub)))
}

#[utoipa::path(post, path = "/api/auth/register", summary = "Register a user (Admin only)", request_body = Registration,
    security(("bearer" = [])),
    responses((status = 200, description = "OK", body = UserDoc), (status = 400, description = "bad field", body = Message),
        (status = 401, description = "no valid token", body = Message), (status = 403, description = "not Admin", body = Message),
        (status = 409, description = "the user exists", body = Message)))]
async fn register(Caller { root, who }: Caller, body: Body) -> ApiResult<UserDoc> {
    let r: Registration = parse_body(&body)?;
    Ok(Json(root.register_user(&who, r).await?))
}

#[utoipa::path(get, path = "/api/users", summary = "Every user (Admin only)", security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Vec<UserDoc>), (status = 403, description = "not Admin", body = Message)))]
async fn list_users(Caller { root, who }: Caller) -> ApiResult<Vec<UserDoc>> {
    Ok(Json(root.users(&who)?))
}

#[utoipa::path(get, path = "/api/user/{name}", summary = "One user: yourself, or anyone for Admin", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, description = "OK", body = UserDoc), (status = 403, description = "another user", body = Message), OwnObject))]
async fn get_user(Caller { root, who }: Caller, Path(name): Path<String>) -> ApiResult<UserDoc> {
    Ok(Json(root.user(&who, &name)?))
}

#[utoipa::path(delete, path = "/api/user/{name}", summary = "Remove a user and its applications (Admin only)",
    security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 200, description = "OK", body = Message), (status = 403, description = "not Admin", body = Message), OwnObject))]
async fn delete_user(Caller { root, who }: Caller, Path(name): Path<String>) -> ApiResult<Message> {
    root.delete_user(&who, &name)?;
    Ok(message(format!("user {name} removed")))
}

/// A new join token's lifetime.
#[derive(serde::Deserialize, utoipa::ToSchema, Default)]
struct JoinTokenRequest {
    /// Seconds it is valid; 0 or absent: until revoked.
    #[serde(default)]
    ttl_s: u64,
    /// What it is for (kept with it, shown in the list).
    #[serde(default)]
    description: String,
}

/// A new join token: its secret is shown this once.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct NewJoinToken {
    token: String,
    #[serde(flatten)]
    info: JoinToken,
}

#[utoipa::path(post, path = "/api/join-tokens", summary = "A join token for clusters (Admin only; the secret is shown once)",
    request_body = JoinTokenRequest, security(("bearer" = [])),
    responses((status = 200, description = "OK", body = NewJoinToken), (status = 403, description = "not Admin", body = Message)))]
async fn create_join_token(Caller { root, who }: Caller, body: Body) -> ApiResult<NewJoinToken> {
    who.require_admin("making join tokens")?;
    let r: JoinTokenRequest = if body.is_empty() { JoinTokenRequest::default() } else { parse_body(&body)? };
    let (token, info) = root.create_join_token(r.ttl_s.saturating_mul(1000), &r.description)?;
    Ok(Json(NewJoinToken { token, info }))
}

#[utoipa::path(get, path = "/api/join-tokens", summary = "The join tokens (Admin only; no secrets)", security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Vec<JoinToken>), (status = 403, description = "not Admin", body = Message)))]
async fn list_join_tokens(Caller { root, who }: Caller) -> ApiResult<Vec<JoinToken>> {
    who.require_admin("listing join tokens")?;
    Ok(Json(root.join_tokens()?))
}

#[utoipa::path(delete, path = "/api/join-tokens/{id}", summary = "Revoke a join token (Admin only)", security(("bearer" = [])),
    params(Id), responses((status = 200, description = "OK", body = Message), (status = 403, description = "not Admin", body = Message), OwnObject))]
async fn revoke_join_token(Caller { root, who }: Caller, Path(id): Path<String>) -> ApiResult<Message> {
    who.require_admin("revoking join tokens")?;
    root.revoke_join_token(&id)?;
    Ok(message(format!("join token {id} revoked")))
}

/// A password change.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct PasswordChange {
    old_password: String,
    new_password: String,
}

#[utoipa::path(post, path = "/api/user/{name}", summary = "Change your own password", request_body = PasswordChange,
    security(("bearer" = [])), params(("name" = String, Path)),
    responses((status = 200, description = "OK", body = Message), (status = 400, description = "old password wrong", body = Message),
        (status = 403, description = "another user", body = Message), OwnObject))]
async fn change_password(Caller { root, who }: Caller, Path(name): Path<String>, body: Body) -> ApiResult<Message> {
    let c: PasswordChange = parse_body(&body)?;
    root.change_password(&who, &name, c.old_password, c.new_password).await?;
    Ok(message(format!("password of {name} changed")))
}

#[utoipa::path(post, path = "/api/application", summary = "Create the applications of an SLA; answers the user's list of applications",
    request_body = Sla, security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Vec<ApplicationDoc>),
        (status = 400, description = "malformed SLA; message names the field; nothing stored", body = Message),
        (status = 401, description = "no valid token", body = Message),
        (status = 409, description = "duplicate application name+namespace", body = Message)))]
async fn create_application(Caller { root, who }: Caller, body: Body) -> ApiResult {
    let sla = model::parse_sla(&parse_json(&body)?).map_err(RootError::InvalidSla)?;
    let ids = root.create_applications(&sla, &who)?;
    tracing::info!(?ids, user = %who.name, "applications created");
    Ok(json_list(&root.applications_of(&who)?, app_json))
}

#[utoipa::path(get, path = "/api/applications", summary = "The user's applications (all for Admin)", security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Vec<ApplicationDoc>), (status = 401, description = "no valid token", body = Message)))]
async fn list_applications(Caller { root, who }: Caller) -> ApiResult {
    Ok(json_list(&root.applications_of(&who)?, app_json))
}

#[utoipa::path(get, path = "/api/application/{id}", summary = "One application", security(("bearer" = [])), params(Id),
    responses((status = 200, description = "OK", body = ApplicationDoc), OwnObject))]
async fn get_application(Caller { root, who }: Caller, Path(id): Path<String>) -> ApiResult {
    Ok(Json(app_json(&root.application(&who, &id)?)))
}

#[utoipa::path(put, path = "/api/application/{id}", summary = "Update name, namespace or description", security(("bearer" = [])),
    params(Id), request_body = ApplicationDoc,
    responses((status = 200, description = "OK", body = ApplicationDoc), (status = 400, description = "bad field", body = Message),
        OwnObject, (status = 409, description = "duplicate name+namespace", body = Message)))]
async fn update_application(Caller { root, who }: Caller, Path(id): Path<String>, body: Body) -> ApiResult {
    let change: ApplicationUpdate = parse_body(&body)?;
    Ok(Json(app_json(&root.update_application(&who, &id, change)?)))
}

#[utoipa::path(delete, path = "/api/application/{id}", summary = "Delete an application, its services and their instances",
    security(("bearer" = [])), params(Id),
    responses((status = 200, description = "OK", body = Message), OwnObject))]
async fn delete_application(Caller { root, who }: Caller, Path(id): Path<String>) -> ApiResult<Message> {
    root.delete_application(&root.application(&who, &id)?)?;
    Ok(message(format!("application {id} deleted")))
}

#[utoipa::path(get, path = "/api/services/{app_id}", summary = "Services of an application", security(("bearer" = [])),
    params(("app_id" = String, Path)),
    responses((status = 200, description = "OK", body = Vec<ServiceDoc>), OwnObject))]
async fn list_services(Caller { root, who }: Caller, Path(app_id): Path<String>) -> ApiResult {
    let app = root.application(&who, &app_id)?;
    Ok(json_list(&root.with_usage(root.services_of_application(&app)?), ServiceDoc::json))
}

#[utoipa::path(get, path = "/api/services", summary = "All the user's services", security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Vec<ServiceDoc>), OwnObject))]
async fn list_all_services(Caller { root, who }: Caller) -> ApiResult {
    Ok(json_list(&root.with_usage(root.services_of(&who)?), ServiceDoc::json))
}

#[utoipa::path(get, path = "/api/service/{id}", summary = "One service (job document with instance_list)", security(("bearer" = [])),
    params(Id),
    responses((status = 200, description = "OK", body = ServiceDoc), OwnObject))]
async fn get_service(Caller { root, who }: Caller, Path(id): Path<String>) -> ApiResult {
    Ok(Json(ServiceDoc::json(&root.with_usage(vec![root.service(&who, &id)?])[0])))
}

#[utoipa::path(delete, path = "/api/service/{id}", summary = "Delete a service and undeploy all its instances", security(("bearer" = [])),
    params(Id),
    responses((status = 200, description = "OK", body = Message), OwnObject))]
async fn delete_service(Caller { root, who }: Caller, Path(id): Path<String>) -> ApiResult<Message> {
    root.delete_service(&root.service(&who, &id)?)?;
    Ok(message(format!("service {id} deleted")))
}

#[utoipa::path(post, path = "/api/service/{id}/instance",
    summary = "Deploy one more instance (no body). 200 also when it cannot be placed yet: status/status_detail say why, and it is retried",
    security(("bearer" = [])), params(Id),
    responses((status = 200, description = "OK", body = DeployAnswer), OwnObject))]
async fn deploy_instance(Caller { root, who }: Caller, Path(id): Path<String>) -> ApiResult<DeployAnswer> {
    root.service(&who, &id)?;
    let inst = root.deploy_instance(&id)?.ok_or_else(|| RootError::ServiceNotFound(id.clone()))?;
    // 200 even when unplaceable: the instance exists and is retried; oak-cli fails on any non-200.
    let placed = inst.status == InstanceState::ClusterScheduled;
    let message = if placed {
        "ok".to_string()
    } else {
        format!("instance {} not placed yet: {}", inst.instance_number, inst.status_detail)
    };
    Ok(Json(DeployAnswer { message, instance: inst }))
}

#[utoipa::path(delete, path = "/api/service/{id}/instance/{n}", summary = "Undeploy instance n", security(("bearer" = [])),
    params(("id" = String, Path), ("n" = String, Path)),
    responses((status = 200, description = "OK", body = Message), (status = 404, description = "unknown id or instance", body = Message),
        (status = 400, description = "n is not a number", body = Message)))]
async fn undeploy_instance(Caller { root, who }: Caller, Path((id, n)): Path<(String, String)>) -> ApiResult<Message> {
    root.service(&who, &id)?;
    let n: u32 =
        n.parse().map_err(|_| ApiError::BadRequest(format!("instance number {n:?} is not a non-negative integer")))?;
    if !root.undeploy_instance(&id, n)? {
        return Err(RootError::NoSuchInstance(id, n).into());
    }
    Ok(message("ok"))
}

/// `offset`: a byte offset into the log (negative, the default: its last `max` bytes); `max`: at most this
/// many bytes (default 65536, at most 1 MiB).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    offset: Option<i64>,
    max: Option<u32>,
}

#[utoipa::path(get, path = "/api/service/{id}/instance/{n}/logs",
    summary = "A piece of an instance's log (stdout and stderr, or a VM's console); follow it by asking from next_offset",
    security(("bearer" = [])), params(("id" = String, Path), ("n" = String, Path), LogsQuery),
    responses((status = 200, description = "OK", body = LogsDoc), (status = 404, description = "unknown id or instance", body = Message),
        (status = 503, description = "its cluster or worker is not connected or did not answer; the message says which", body = Message)))]
async fn instance_logs(
    Caller { root, who }: Caller,
    Path((id, n)): Path<(String, String)>,
    q: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<LogsDoc> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let n: u32 =
        n.parse().map_err(|_| ApiError::BadRequest(format!("instance number {n:?} is not a non-negative integer")))?;
    let c = root.instance_logs(&who, &id, n, q.offset.unwrap_or(-1), q.max.unwrap_or(65536)).await?;
    let next_offset = c.offset + c.data.len() as u64;
    Ok(Json(LogsDoc {
        service_id: id,
        instance_number: n,
        offset: c.offset,
        next_offset,
        size: c.size,
        text: String::from_utf8_lossy(&c.data).into_owned(),
    }))
}

fn clusters(root: &Root, only_active: bool) -> ApiResult {
    let docs = root.clusters(only_active)?.into_iter().map(|(c, active)| ClusterDoc::new(c, active));
    Ok(Json(Value::Array(docs.map(|d| serde_json::to_value(d).unwrap_or_default()).collect())))
}

#[utoipa::path(get, path = "/api/clusters", summary = "All registered clusters", security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Vec<ClusterDoc>), (status = 401, description = "no valid token", body = Message)))]
async fn clusters_all(Caller { root, .. }: Caller) -> ApiResult {
    clusters(&root, false)
}

#[utoipa::path(get, path = "/api/clusters/active", summary = "Active clusters", security(("bearer" = [])),
    responses((status = 200, description = "OK", body = Vec<ClusterDoc>), (status = 401, description = "no valid token", body = Message)))]
async fn clusters_active(Caller { root, .. }: Caller) -> ApiResult {
    clusters(&root, true)
}

#[utoipa::path(get, path = "/api/cluster/{id}/workers",
    summary = "The workers of a cluster (by id or name), live and lost, as it last reported them (Admin only)",
    security(("bearer" = [])), params(Id),
    responses((status = 200, description = "OK (empty while the cluster is inactive)", body = Vec<WorkerDoc>),
        (status = 403, description = "not Admin", body = Message), (status = 404, description = "no such cluster", body = Message)))]
async fn cluster_workers(Caller { root, who }: Caller, Path(id): Path<String>) -> ApiResult<Vec<WorkerDoc>> {
    Ok(Json(root.cluster_workers(&who, &id)?.into_iter().map(WorkerDoc::from).collect()))
}
