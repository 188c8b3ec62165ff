//! The dashboard: HTML pages rendered on the server (maud) over the root's public REST API, called with the
//! logged-in user's token. htmx (embedded, see [`assets`]) reloads the live parts every 2 s and sends the
//! actions; nothing else runs in the browser. The dashboard keeps no state: the session is the browser's
//! two cookies ([`session`]).

pub mod assets;
pub mod geo;
pub mod model;
pub mod root_api;
pub mod session;
pub mod views;

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{html, Markup};
use serde::Deserialize;

use model::{parse, Application, Cluster, Service};
use root_api::{ApiFailure, RootApi, Tokens};
use session::{Refresher, Session, ACCESS_COOKIE, REFRESH_COOKIE};
use views::Flash;

/// What every handler shares.
#[derive(Clone)]
pub struct Dashboard {
    pub api: Arc<RootApi>,
    pub refresher: Arc<Refresher>,
    /// Cookies get `Secure` (the dashboard is reached over HTTPS, through a proxy).
    pub secure_cookies: bool,
}

impl Dashboard {
    pub fn new(api: RootApi, secure_cookies: bool) -> Self {
        Self { api: Arc::new(api), refresher: Arc::default(), secure_cookies }
    }
}

/// The dashboard's routes.
pub fn router(d: Dashboard) -> Router {
    let pages = Router::new()
        .route("/", get(|| async { see_other("/clusters") }))
        .route("/clusters", get(clusters_page))
        .route("/clusters/live", get(clusters_live))
        .route("/applications", get(applications_page))
        .route("/applications/live", get(applications_live))
        .route("/applications/new", get(editor_page).post(create_application))
        .route("/applications/{app}", get(application_page))
        .route("/applications/{app}/live", get(application_live))
        .route("/applications/{app}/delete", post(delete_application))
        .route("/applications/{app}/services/{svc}/deploy", post(deploy))
        .route("/applications/{app}/services/{svc}/delete", post(delete_service))
        .route("/applications/{app}/services/{svc}/instances/{n}", get(instance_page))
        .route("/applications/{app}/services/{svc}/instances/{n}/undeploy", post(undeploy))
        .route("/logout", post(logout))
        .layer(middleware::from_fn_with_state(d.clone(), with_session));
    Router::new()
        .merge(pages)
        .route("/login", get(|| async { views::login(None, "") }).post(login))
        .route("/healthz", get(|| async { "ok" }))
        .route(assets::HTMX_PATH, get(|| async { asset("text/javascript", assets::HTMX) }))
        .route(assets::STYLE_PATH, get(|| async { asset("text/css", assets::STYLE) }))
        .route(assets::SCRIPT_PATH, get(|| async { asset("text/javascript", assets::SCRIPT) }))
        .layer(middleware::from_fn(guard))
        .with_state(d)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "public, max-age=31536000, immutable")], body).into_response()
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to.to_string())]).into_response()
}

fn is_htmx(h: &HeaderMap) -> bool {
    h.get("hx-request").is_some_and(|v| v == "true")
}

/// Sends the browser to `to`: a redirect for a page load, `HX-Redirect` for an htmx request (which would
/// otherwise swap the target page into a fragment).
fn go(htmx: bool, to: &str) -> Response {
    if htmx {
        ([("hx-redirect", to.to_string())], "").into_response()
    } else {
        see_other(to)
    }
}

/// Security headers on every answer, and a refusal of state changes started by another site (the cookies
/// are SameSite=Strict already; `Sec-Fetch-Site` covers a browser that ignores that).
async fn guard(req: Request, next: Next) -> Response {
    let cross_site = req.headers().get("sec-fetch-site").is_some_and(|v| v != "same-origin" && v != "none");
    if req.method() == Method::POST && cross_site {
        return (StatusCode::FORBIDDEN, "cross-site request refused").into_response();
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
             form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The session of a page: without the cookies, to the login page. The access token is renewed first when
/// it is about to run out; renewed tokens go back as cookies, and a session the root ended is deleted.
async fn with_session(State(d): State<Dashboard>, mut req: Request, next: Next) -> Response {
    let htmx = is_htmx(req.headers());
    let cookies = req.headers().get(COOKIE).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let (Some(access), Some(refresh)) =
        (session::cookie(cookies, ACCESS_COOKIE), session::cookie(cookies, REFRESH_COOKIE))
    else {
        return go(htmx, "/login");
    };
    let tokens = Tokens { token: access.to_string(), refresh_token: refresh.to_string() };
    let s = Arc::new(Session::new(d.api.clone(), d.refresher.clone(), tokens));
    // an unreachable root is shown by the page itself; only a refused refresh ends the session here
    let _ = s.refresh_if_expiring().await;
    let mut resp = if s.ended() {
        go(htmx, "/login")
    } else {
        req.extensions_mut().insert(s.clone());
        next.run(req).await
    };
    if s.ended() {
        tracing::info!("session ended by the root; the user logs in again");
        resp = go(htmx, "/login");
        for c in [ACCESS_COOKIE, REFRESH_COOKIE] {
            append_cookie(&mut resp, session::clear_cookie(c, d.secure_cookies));
        }
    } else if s.renewed() {
        for c in session::token_cookies(&s.tokens(), d.secure_cookies) {
            append_cookie(&mut resp, c);
        }
    }
    resp
}

fn append_cookie(resp: &mut Response, c: String) {
    if let Ok(v) = HeaderValue::from_str(&c) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
}

type S = Extension<Arc<Session>>;

/// A root failure as a whole page, with the root's status (502 when it did not answer).
fn failure_page(title: &str, s: &Session, e: &ApiFailure) -> Response {
    let status = e.status().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, views::page(title, Some(&s.user()), views::failure(e))).into_response()
}

/// Ids in paths are the root's (hex, letters, digits): anything else is not looked up.
fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn not_found(s: &Session, what: &str) -> Response {
    let e = ApiFailure::Answer { status: 404, message: format!("no such {what}"), field: None };
    failure_page("Not found", s, &e)
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
}

async fn login(State(d): State<Dashboard>, Form(f): Form<LoginForm>) -> Response {
    match d.api.login(&f.username, &f.password).await {
        Ok(tokens) => {
            tracing::info!(user = %f.username, "logged in");
            let mut resp = see_other("/clusters");
            for c in session::token_cookies(&tokens, d.secure_cookies) {
                append_cookie(&mut resp, c);
            }
            resp
        }
        Err(e) => {
            tracing::info!(user = %f.username, "login refused: {e}");
            let status = e.status().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, views::login(Some(&e), &f.username)).into_response()
        }
    }
}

async fn logout(State(d): State<Dashboard>, Extension(s): S) -> Response {
    if let Err(e) = d.api.logout(&s.tokens()).await {
        // the cookies go anyway; the tokens then only expire
        tracing::warn!("logout at the root failed: {e}");
    }
    let mut resp = see_other("/login");
    for c in [ACCESS_COOKIE, REFRESH_COOKIE] {
        append_cookie(&mut resp, session::clear_cookie(c, d.secure_cookies));
    }
    resp
}

async fn clusters(s: &Session) -> Result<Vec<Cluster>, ApiFailure> {
    parse(s.get("/api/clusters").await?, "clusters")
}

fn clusters_view(r: Result<Vec<Cluster>, ApiFailure>) -> Markup {
    match r {
        Ok(c) => views::clusters(&c),
        Err(e) => views::failure(&e),
    }
}

async fn clusters_page(Extension(s): S) -> Markup {
    let body = clusters_view(clusters(&s).await);
    views::page("Clusters", Some(&s.user()), views::live("/clusters/live", body))
}

async fn clusters_live(Extension(s): S) -> Markup {
    clusters_view(clusters(&s).await)
}

async fn all_applications(s: &Session) -> Result<(Vec<Application>, Vec<Service>), ApiFailure> {
    let apps = parse(s.get("/api/applications").await?, "applications")?;
    let services = parse(s.get("/api/services").await?, "services")?;
    Ok((apps, services))
}

fn applications_view(r: Result<(Vec<Application>, Vec<Service>), ApiFailure>) -> Markup {
    match r {
        Ok((a, svc)) => views::applications(&a, &svc),
        Err(e) => views::failure(&e),
    }
}

async fn applications_page(Extension(s): S) -> Markup {
    let body = applications_view(all_applications(&s).await);
    views::page("Applications", Some(&s.user()), views::live("/applications/live", body))
}

async fn applications_live(Extension(s): S) -> Markup {
    applications_view(all_applications(&s).await)
}

async fn services_of(s: &Session, app: &str) -> Result<Vec<Service>, ApiFailure> {
    parse(s.get(&format!("/api/services/{app}")).await?, "services")
}

async fn application_page(Extension(s): S, Path(app): Path<String>) -> Response {
    if !id_ok(&app) {
        return not_found(&s, "application");
    }
    let r = async {
        let a: Application = parse(s.get(&format!("/api/application/{app}")).await?, "application")?;
        Ok::<_, ApiFailure>((a, services_of(&s, &app).await?))
    };
    match r.await {
        Ok((a, services)) => {
            let title = format!("Application {}", a.application_name);
            views::page(&title, Some(&s.user()), views::application(&a, &services)).into_response()
        }
        Err(e) => failure_page("Application", &s, &e),
    }
}

/// The live part of an application's page, with `note` (an action's outcome) above it.
async fn services_fragment(s: &Session, app: &str, note: Option<Flash>) -> Response {
    match services_of(s, app).await {
        Ok(services) => match note {
            Some(n) => html! { (views::services_live(app, &services)) (views::note(Some(&n), true)) }.into_response(),
            None => views::services_live(app, &services).into_response(),
        },
        // the application is gone (deleted elsewhere): back to the list
        Err(e) if e.status() == Some(404) => go(true, "/applications"),
        Err(e) => views::failure(&e).into_response(),
    }
}

async fn application_live(Extension(s): S, Path(app): Path<String>) -> Response {
    if !id_ok(&app) {
        return not_found(&s, "application");
    }
    services_fragment(&s, &app, None).await
}

/// An action's outcome as a note: the root's own message when it refused.
fn outcome(r: Result<String, ApiFailure>) -> Option<Flash> {
    Some(match r {
        Ok(text) => Flash { ok: true, text },
        Err(e) => Flash { ok: false, text: e.to_string() },
    })
}

async fn deploy(Extension(s): S, Path((app, svc)): Path<(String, String)>) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let r = s.call(reqwest::Method::POST, &format!("/api/service/{svc}/instance"), None).await.map(|v| {
        match (v["message"].as_str(), v["instance_number"].as_u64()) {
            (Some("ok"), Some(n)) => format!("instance {n} deployed"),
            (Some(m), _) => m.to_string(),
            _ => "deployed".to_string(),
        }
    });
    services_fragment(&s, &app, outcome(r)).await
}

async fn undeploy(Extension(s): S, Path((app, svc, n)): Path<(String, String, u32)>) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let r = s.call(reqwest::Method::DELETE, &format!("/api/service/{svc}/instance/{n}"), None).await;
    services_fragment(&s, &app, outcome(r.map(|_| format!("instance {n} is being undeployed")))).await
}

async fn delete_service(Extension(s): S, Path((app, svc)): Path<(String, String)>) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let r = s.call(reqwest::Method::DELETE, &format!("/api/service/{svc}"), None).await;
    let r = r.map(|v| v["message"].as_str().unwrap_or("service deleted").to_string());
    services_fragment(&s, &app, outcome(r)).await
}

async fn delete_application(Extension(s): S, headers: HeaderMap, Path(app): Path<String>) -> Response {
    if !id_ok(&app) {
        return not_found(&s, "application");
    }
    match s.call(reqwest::Method::DELETE, &format!("/api/application/{app}"), None).await {
        Ok(_) => go(is_htmx(&headers), "/applications"),
        Err(e) if is_htmx(&headers) => {
            views::note(Some(&Flash { ok: false, text: e.to_string() }), true).into_response()
        }
        Err(e) => failure_page("Application", &s, &e),
    }
}

async fn instance_page(Extension(s): S, Path((app, svc, n)): Path<(String, String, u32)>) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let service: Service = match s.get(&format!("/api/service/{svc}")).await.and_then(|v| parse(v, "service")) {
        Ok(x) => x,
        Err(e) => return failure_page("Instance", &s, &e),
    };
    let Some(i) = service.instance_list.iter().find(|i| i.instance_number == n) else {
        return not_found(&s, "instance");
    };
    let title = format!("{} instance {n}", service.microservice_name);
    views::page(&title, Some(&s.user()), views::instance(&service, i)).into_response()
}

async fn editor_page(Extension(s): S) -> Markup {
    views::page("New application", Some(&s.user()), views::editor("", None))
}

#[derive(Deserialize)]
struct SlaForm {
    sla: String,
}

/// The (name, namespace) pairs of the applications an SLA text declares, if it is JSON.
fn declared_applications(sla: &str) -> HashSet<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(sla).unwrap_or_default();
    v["applications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some((a["application_name"].as_str()?.to_string(), a["application_namespace"].as_str()?.to_string()))
        })
        .collect()
}

/// Sends the SLA as written; on success to the new application's page (to the list when the SLA made
/// several), else the editor again with the text and the root's message beside it.
async fn create_application(Extension(s): S, Form(f): Form<SlaForm>) -> Response {
    match s.call(reqwest::Method::POST, "/api/application", Some(f.sla.clone())).await {
        Ok(v) => {
            let declared = declared_applications(&f.sla);
            let apps: Vec<Application> = parse(v, "applications").unwrap_or_default();
            let made: Vec<&Application> = apps
                .iter()
                .filter(|a| declared.contains(&(a.application_name.clone(), a.application_namespace.clone())))
                .collect();
            tracing::info!(user = %s.user(), applications = made.len(), "applications created");
            match made.as_slice() {
                [one] => see_other(&format!("/applications/{}", one.id)),
                _ => see_other("/applications"),
            }
        }
        Err(e) => {
            let status = e.status().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, views::page("New application", Some(&s.user()), views::editor(&f.sla, Some(&e)))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_shaped_ids_are_looked_up() {
        assert!(id_ok("65f1c0ffee0123456789abcd"));
        for bad in ["", "../users", "a/b", "a%2Fb", "x y", &"a".repeat(65)] {
            assert!(!id_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_applications_an_sla_declares() {
        let sla = r#"{"applications":[{"application_name":"web","application_namespace":"demo"},
            {"application_name":"db"}]}"#;
        let d = declared_applications(sla);
        assert_eq!(d, HashSet::from([("web".to_string(), "demo".to_string())]));
        assert!(declared_applications("not json").is_empty());
    }
}
