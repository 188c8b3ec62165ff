//! The dashboard: HTML pages rendered on the server (maud) over the root's public REST API, called with the
//! logged-in user's token. htmx (embedded, see [`assets`]) reloads the live parts every 2 s and sends the
//! actions; nothing else runs in the browser. The dashboard keeps no state: the session is the browser's
//! two cookies ([`session`]).

pub mod assets;
pub mod charts;
pub mod counters;
pub mod geo;
pub mod model;
pub mod root_api;
pub mod scale;
pub mod session;
pub mod views;

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::{html, Markup};
use serde::Deserialize;

use charts::{line_chart, line_chart_or, rates, Point, Samples, Series, Unit};
use model::{parse, Application, Cluster, Logs, Service, Worker};
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
    /// The samples the charts draw, taken when pages poll.
    pub samples: Arc<Samples>,
}

impl Dashboard {
    pub fn new(api: RootApi, secure_cookies: bool) -> Self {
        Self { api: Arc::new(api), refresher: Arc::default(), secure_cookies, samples: Arc::default() }
    }
}

/// The dashboard's routes.
pub fn router(d: Dashboard) -> Router {
    let pages = Router::new()
        .route("/", get(|| async { see_other("/clusters") }))
        .route("/clusters", get(clusters_page))
        .route("/clusters/live", get(clusters_live))
        .route("/clusters/{id}", get(cluster_page))
        .route("/clusters/{id}/live", get(cluster_live))
        .route("/network", get(network_page))
        .route("/network/live", get(network_live))
        .route("/applications", get(applications_page))
        .route("/applications/live", get(applications_live))
        .route("/applications/new", get(editor_page).post(create_application))
        .route("/applications/{app}", get(application_page))
        .route("/applications/{app}/live", get(application_live))
        .route("/applications/{app}/delete", post(delete_application))
        .route("/applications/{app}/services/{svc}/deploy", post(deploy))
        .route("/applications/{app}/services/{svc}/delete", post(delete_service))
        .route("/applications/{app}/services/{svc}/scale", post(scale_service))
        .route("/applications/{app}/services/{svc}/instances/{n}", get(instance_page))
        .route("/applications/{app}/services/{svc}/instances/{n}/live", get(instance_live))
        .route("/applications/{app}/services/{svc}/instances/{n}/logs", get(instance_logs))
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

async fn login(
    State(d): State<Dashboard>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    match d.api.login(&f.username, &f.password, oak_proto::endpoint::observed(peer.ip())).await {
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

/// The clusters, each sampled for its charts.
async fn sampled_clusters(d: &Dashboard, s: &Session) -> Result<Vec<Cluster>, ApiFailure> {
    let list = clusters(s).await?;
    for c in &list {
        record_cluster(&d.samples, c);
    }
    Ok(list)
}

async fn clusters_page(State(d): State<Dashboard>, Extension(s): S) -> Markup {
    let body = clusters_view(sampled_clusters(&d, &s).await);
    views::page("Clusters", Some(&s.user()), views::live("/clusters/live", body))
}

async fn clusters_live(State(d): State<Dashboard>, Extension(s): S) -> Markup {
    clusters_view(sampled_clusters(&d, &s).await)
}

/// Records a cluster's CPU and memory use (percent) at its last report; answers both series.
fn record_cluster(samples: &Samples, c: &Cluster) -> (Vec<Point>, Vec<Point>) {
    let t = if c.last_modified_timestamp > 0.0 { c.last_modified_timestamp } else { session::now_s() as f64 };
    let memory = if c.memory_in_mb > 0 {
        c.memory_in_mb.saturating_sub(c.free_memory_in_mb) as f64 * 100.0 / c.memory_in_mb as f64
    } else {
        0.0
    };
    (
        samples.record(&format!("cluster/{}/cpu", c.cluster_id), t, c.aggregated_cpu_percent),
        samples.record(&format!("cluster/{}/memory", c.cluster_id), t, memory),
    )
}

fn usage_chart(id: &str, title: &str, cpu: Vec<Point>, memory: Vec<Point>) -> Markup {
    let series =
        [Series { label: "CPU used".into(), points: cpu }, Series { label: "memory used".into(), points: memory }];
    line_chart(id, title, Unit::Percent, &series)
}

/// Records each worker's byte counters (eBPF fast path, tun path tunnel) now; answers the throughput per
/// worker and path.
fn record_workers<'a>(samples: &Samples, workers: impl Iterator<Item = &'a Worker>) -> Vec<Series> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let mut out = Vec::new();
    for w in workers {
        let Some(n) = &w.network else { continue };
        for (path, total) in [("eBPF", n.ebpf_bytes()), ("tun", n.tun_bytes())] {
            let counter = samples.record(&format!("worker/{}/bytes/{path}", w.node_id), now, total as f64);
            // a path this worker does not run and that carried nothing is left out
            if path == "eBPF" && n.datapath != "ebpf" && total == 0 {
                continue;
            }
            out.push(Series { label: format!("{} {path}", w.node_name), points: rates(&counter) });
        }
    }
    out
}

fn throughput_chart(series: &[Series]) -> Markup {
    line_chart(
        "throughput",
        "Throughput per worker and path (bytes counted by the datapath)",
        Unit::BytesPerSecond,
        series,
    )
}

/// A cluster by id or name, with its live workers (or why they are not shown).
async fn cluster_and_workers(
    s: &Session,
    id: &str,
) -> Result<Option<(Cluster, Result<Vec<Worker>, ApiFailure>)>, ApiFailure> {
    let Some(c) = clusters(s).await?.into_iter().find(|c| c.cluster_id == id || c.cluster_name == id) else {
        return Ok(None);
    };
    let workers = match s.get(&format!("/api/cluster/{}/workers", c.cluster_id)).await {
        Ok(v) => parse(v, "workers"),
        Err(e) => Err(e),
    };
    Ok(Some((c, workers)))
}

fn cluster_view(d: &Dashboard, c: &Cluster, workers: &Result<Vec<Worker>, ApiFailure>) -> Markup {
    let (cpu, memory) = record_cluster(&d.samples, c);
    let usage = usage_chart("usage", "CPU and memory of the cluster", cpu, memory);
    let throughput = match workers {
        Ok(ws) => throughput_chart(&record_workers(&d.samples, ws.iter())),
        Err(_) => html! {},
    };
    views::cluster_live(c, workers, usage, throughput)
}

async fn cluster_page(State(d): State<Dashboard>, Extension(s): S, Path(id): Path<String>) -> Response {
    if !id_ok(&id) {
        return not_found(&s, "cluster");
    }
    match cluster_and_workers(&s, &id).await {
        Ok(Some((c, workers))) => {
            let title = format!("Cluster {}", c.cluster_name);
            let body = cluster_view(&d, &c, &workers);
            views::page(&title, Some(&s.user()), views::live(&format!("/clusters/{id}/live"), body)).into_response()
        }
        Ok(None) => not_found(&s, "cluster"),
        Err(e) => failure_page("Cluster", &s, &e),
    }
}

async fn cluster_live(State(d): State<Dashboard>, Extension(s): S, Path(id): Path<String>) -> Response {
    if !id_ok(&id) {
        return not_found(&s, "cluster");
    }
    match cluster_and_workers(&s, &id).await {
        Ok(Some((c, workers))) => cluster_view(&d, &c, &workers).into_response(),
        Ok(None) => views::failure(&ApiFailure::Answer {
            status: 404,
            message: format!("cluster {id} is no longer registered"),
            field: None,
        })
        .into_response(),
        Err(e) => views::failure(&e).into_response(),
    }
}

/// Every service, and the live workers of every active cluster with the cluster's name (a non-Admin gets
/// the root's 403 in their place).
async fn network_data(s: &Session) -> Result<(Vec<Service>, Result<Vec<(String, Worker)>, ApiFailure>), ApiFailure> {
    let services: Vec<Service> = parse(s.get("/api/services").await?, "services")?;
    let mut workers = Vec::new();
    let mut failed = None;
    for c in clusters(s).await?.into_iter().filter(|c| c.active) {
        match s.get(&format!("/api/cluster/{}/workers", c.cluster_id)).await.and_then(|v| parse(v, "workers")) {
            Ok(ws) => {
                let ws: Vec<Worker> = ws;
                workers.extend(ws.into_iter().map(|w| (c.cluster_name.clone(), w)));
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    Ok((services, failed.map_or(Ok(workers), Err)))
}

async fn network_view(d: &Dashboard, s: &Session) -> Markup {
    match network_data(s).await {
        Ok((services, workers)) => {
            let throughput = match &workers {
                Ok(ws) => throughput_chart(&record_workers(&d.samples, ws.iter().map(|(_, w)| w))),
                Err(_) => html! {},
            };
            views::network(&services, &workers, throughput)
        }
        Err(e) => views::failure(&e),
    }
}

async fn network_page(State(d): State<Dashboard>, Extension(s): S) -> Markup {
    let body = network_view(&d, &s).await;
    views::page("Network", Some(&s.user()), views::live("/network/live", body))
}

async fn network_live(State(d): State<Dashboard>, Extension(s): S) -> Markup {
    network_view(&d, &s).await
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
    let r = s.call(reqwest::Method::POST, &format!("/api/service/{svc}/instance"), None).await.map(|v| deploy_note(&v));
    services_fragment(&s, &app, outcome(r)).await
}

/// The root's answer to a deploy, in words: the instance deployed, or the root's message (the instance
/// exists but could not be placed yet, and why).
fn deploy_note(v: &serde_json::Value) -> String {
    match (v["message"].as_str(), v["instance_number"].as_u64()) {
        (Some("ok"), Some(n)) => format!("instance {n} deployed"),
        (Some(m), _) if m != "ok" => m.to_string(),
        _ => "an instance deployed".to_string(),
    }
}

async fn undeploy(Extension(s): S, Path((app, svc, n)): Path<(String, String, u32)>) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let r = s.call(reqwest::Method::DELETE, &format!("/api/service/{svc}/instance/{n}"), None).await;
    services_fragment(&s, &app, outcome(r.map(|_| format!("instance {n} is being undeployed")))).await
}

#[derive(Deserialize)]
struct ScaleForm {
    instances: String,
}

/// Scales a service to the number of instances asked: deploys or undeploys one at a time through the
/// root, and says what it did (or where it stopped, with the root's words).
async fn scale_service(
    Extension(s): S,
    Path((app, svc)): Path<(String, String)>,
    Form(f): Form<ScaleForm>,
) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let Some(target) = f.instances.trim().parse::<u32>().ok().filter(|n| *n <= scale::MAX_INSTANCES) else {
        let text = format!(
            "the number of instances must be a whole number from 0 to {}, not {:?}",
            scale::MAX_INSTANCES,
            f.instances
        );
        return services_fragment(&s, &app, Some(Flash { ok: false, text })).await;
    };
    let service: Service = match s.get(&format!("/api/service/{svc}")).await.and_then(|v| parse(v, "service")) {
        Ok(x) => x,
        Err(e) => return services_fragment(&s, &app, outcome(Err(e))).await,
    };
    let (add, remove) = scale::plan(&service.instance_list, target);
    let name = &service.microservice_name;
    let mut done = Vec::new();
    let mut failed = None;
    for _ in 0..add {
        match s.call(reqwest::Method::POST, &format!("/api/service/{svc}/instance"), None).await {
            Ok(v) => done.push(deploy_note(&v)),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    for n in remove {
        match s.call(reqwest::Method::DELETE, &format!("/api/service/{svc}/instance/{n}"), None).await {
            Ok(_) => done.push(format!("instance {n} undeployed")),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let did = if done.is_empty() { "nothing to do".to_string() } else { done.join(", ") };
    let note = match failed {
        None => Flash { ok: true, text: format!("{name} scaled to {target}: {did}") },
        Some(e) => Flash { ok: false, text: format!("scaling {name} to {target} stopped ({did}): {e}") },
    };
    services_fragment(&s, &app, Some(note)).await
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

/// One instance of a service, or None when the service has no instance `n`.
async fn instance_of(s: &Session, svc: &str, n: u32) -> Result<Option<(Service, model::Instance)>, ApiFailure> {
    let mut service: Service = parse(s.get(&format!("/api/service/{svc}")).await?, "service")?;
    let Some(at) = service.instance_list.iter().position(|i| i.instance_number == n) else {
        return Ok(None);
    };
    let i = service.instance_list.swap_remove(at);
    Ok(Some((service, i)))
}

/// The instance's state, place and use over time (what its page refreshes every 2 s).
fn instance_view(service: &Service, i: &model::Instance) -> Markup {
    let points = |h: &[model::Sample]| h.iter().map(|x| Point { t: x.timestamp, v: x.value }).collect::<Vec<_>>();
    let (cpu, memory) = (points(&i.cpu_history), points(&i.memory_history));
    let usage = if cpu.is_empty() && memory.is_empty() {
        html! { p.muted #no-usage { "Its worker has reported no CPU or memory use of this instance yet." } }
    } else {
        let cpu = Series { label: "CPU used".into(), points: cpu };
        let memory = Series { label: "memory used".into(), points: memory };
        let none = "no samples reported";
        html! {
            (line_chart_or("instance-cpu", "CPU of the instance", Unit::Percent, &[cpu], none))
            (line_chart_or("instance-memory", "Memory of the instance", Unit::Bytes, &[memory], none))
        }
    };
    views::instance(service, i, usage)
}

async fn instance_page(Extension(s): S, Path((app, svc, n)): Path<(String, String, u32)>) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let (service, i) = match instance_of(&s, &svc, n).await {
        Ok(Some(x)) => x,
        Ok(None) => return not_found(&s, "instance"),
        Err(e) => return failure_page("Instance", &s, &e),
    };
    let title = format!("{} instance {n}", service.microservice_name);
    let logs = read_logs(&s, &svc, n, -1).await;
    let base = format!("/applications/{app}/services/{svc}/instances/{n}");
    let body = html! {
        (views::live(&format!("{base}/live"), instance_view(&service, &i)))
        (views::instance_log(&format!("{base}/logs"), &i, &logs))
    };
    views::page(&title, Some(&s.user()), body).into_response()
}

async fn instance_live(Extension(s): S, Path((app, svc, n)): Path<(String, String, u32)>) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    match instance_of(&s, &svc, n).await {
        Ok(Some((service, i))) => instance_view(&service, &i).into_response(),
        Ok(None) => views::failure(&ApiFailure::Answer {
            status: 404,
            message: format!("instance {n} is no longer deployed"),
            field: None,
        })
        .into_response(),
        Err(e) => views::failure(&e).into_response(),
    }
}

async fn read_logs(s: &Session, svc: &str, n: u32, offset: i64) -> Result<Logs, ApiFailure> {
    parse(s.get(&format!("/api/service/{svc}/instance/{n}/logs?offset={offset}")).await?, "logs")
}

#[derive(Deserialize)]
struct LogsQuery {
    offset: Option<u64>,
    #[serde(default)]
    follow: u8,
    /// Follow was switched on or off: the controls come too.
    #[serde(default)]
    toggle: u8,
}

/// What an instance's log has from `offset` on, then the element that asks for the rest (polling while
/// following); a failure keeps the offset, says why inside that element and asks again later.
async fn instance_logs(
    Extension(s): S,
    Path((app, svc, n)): Path<(String, String, u32)>,
    q: Result<axum::extract::Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !id_ok(&app) || !id_ok(&svc) {
        return not_found(&s, "service");
    }
    let Ok(axum::extract::Query(q)) = q else {
        return (StatusCode::BAD_REQUEST, "offset: a byte offset into the log").into_response();
    };
    let url = format!("/applications/{app}/services/{svc}/instances/{n}/logs");
    let follow = q.follow == 1;
    let offset = q.offset.unwrap_or(0);
    let controls = (q.toggle == 1).then(|| views::log_controls(&url, follow, true));
    let body = match read_logs(&s, &svc, n, i64::try_from(offset).unwrap_or(i64::MAX)).await {
        Ok(l) => html! { (l.text) (views::log_next(&url, l.next_offset, follow, None)) },
        Err(e) => views::log_next(&url, offset, follow, Some(&e)),
    };
    html! { (body) @if let Some(c) = controls { (c) } }.into_response()
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
    fn a_deploy_answer_in_words() {
        let placed = serde_json::json!({"message": "ok", "instance_number": 2, "status": "CLUSTER_SCHEDULED"});
        assert_eq!(deploy_note(&placed), "instance 2 deployed");
        let why = "instance 3 not placed yet: NoResourcesAvailable: no cluster has 64 GB free";
        let waiting = serde_json::json!({"message": why, "instance_number": 3, "status": "NoResourcesAvailable"});
        assert_eq!(deploy_note(&waiting), why);
        assert_eq!(deploy_note(&serde_json::json!({})), "an instance deployed");
    }

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
