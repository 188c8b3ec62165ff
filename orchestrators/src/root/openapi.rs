//! OpenAPI document (built with utoipa) and an offline HTML page rendered from it server-side.

use serde_json::Value;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, Content, InfoBuilder, OpenApiBuilder, PathsBuilder, Ref, RefOr, Required, ResponseBuilder,
    Schema,
};

fn s() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}
fn int() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Integer)
}
fn num() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Number)
}
fn boolean() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Boolean)
}
fn arr(item: RefOr<Schema>) -> ArrayBuilder {
    ArrayBuilder::new().items(item)
}
fn obj(props: &[(&str, RefOr<Schema>)], required: &[&str]) -> Schema {
    let mut b = ObjectBuilder::new().schema_type(Type::Object);
    for (k, v) in props {
        b = b.property(*k, v.clone());
    }
    for r in required {
        b = b.required(*r);
    }
    b.build().into()
}
fn r(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}
fn o(b: ObjectBuilder) -> RefOr<Schema> {
    RefOr::T(Schema::Object(b.build()))
}
fn a(b: ArrayBuilder) -> RefOr<Schema> {
    RefOr::T(Schema::Array(b.build()))
}

fn schemas() -> Vec<(&'static str, Schema)> {
    let microservice = obj(
        &[
            ("microserviceID", o(s())),
            ("microservice_name", o(s().pattern(Some("^[a-zA-Z0-9]{1,30}$")))),
            ("microservice_namespace", o(s().pattern(Some("^[a-zA-Z0-9]{1,30}$")))),
            ("virtualization", o(s().enum_values(Some(["container", "unikernel"])))),
            ("code", o(s().description(Some("image reference or unikernel .tar.gz")))),
            ("cmd", a(arr(o(s())))),
            ("args", a(arr(o(s())))),
            ("environment", a(arr(o(s().description(Some("KEY=VALUE")))))),
            ("arch", a(arr(o(s())))),
            ("memory", o(int().description(Some("MB")))),
            ("vcpus", o(num())),
            ("vgpus", o(int())),
            ("vtpus", o(int())),
            ("storage", o(int())),
            ("bandwidth_in", o(int())),
            ("bandwidth_out", o(int())),
            ("port", o(s().description(Some("host:container[/tcp|udp];...")))),
            ("state", o(s())),
            ("added_files", a(arr(o(s())))),
            ("one_shot", o(boolean())),
            ("privileged", o(boolean())),
            ("addresses", r("Addresses")),
            ("constraints", a(arr(r("Constraint")))),
        ],
        &["microservice_name", "microservice_namespace", "virtualization", "code"],
    );
    let instance = obj(
        &[
            ("instance_number", o(int())),
            ("status", o(s().description(Some("Oakestra status vocabulary")))),
            ("status_detail", o(s())),
            ("cluster_id", o(s())),
            ("cluster_name", o(s())),
            ("worker_id", o(s())),
            ("node_name", o(s())),
            ("publicip", o(s())),
            ("logs", o(s())),
            ("cpu_history", a(arr(o(ObjectBuilder::new())))),
            ("memory_history", a(arr(o(ObjectBuilder::new())))),
            ("exit_code", o(int())),
            ("ns_address", o(s())),
        ],
        &[],
    );
    vec![
        (
            "Sla",
            obj(
                &[
                    ("sla_version", o(s().enum_values(Some(["v2.0"])))),
                    ("customerID", o(s())),
                    ("applications", a(arr(r("SlaApplication")))),
                ],
                &["sla_version", "applications"],
            ),
        ),
        (
            "SlaApplication",
            obj(
                &[
                    ("applicationID", o(s())),
                    ("application_name", o(s().pattern(Some("^[a-zA-Z0-9]{1,30}$")))),
                    ("application_namespace", o(s().pattern(Some("^[a-zA-Z0-9]{1,30}$")))),
                    ("application_desc", o(s())),
                    ("microservices", a(arr(r("Microservice")))),
                ],
                &["application_name", "application_namespace"],
            ),
        ),
        ("Microservice", microservice),
        (
            "Addresses",
            obj(&[("rr_ip", o(s())), ("rr_ip_v6", o(s())), ("closest_ip", o(s())), ("closest_ip_v6", o(s()))], &[]),
        ),
        (
            "Constraint",
            obj(
                &[
                    ("type", o(s().enum_values(Some(["direct", "latency", "geo", "clusters", "addons"])))),
                    ("cluster", o(s())),
                    ("node", o(s())),
                    ("area", o(s())),
                    ("location", o(s())),
                    ("threshold", o(num())),
                    ("rigidness", o(num())),
                    ("convergence_time", o(int())),
                    ("allowed", a(arr(o(s())))),
                    ("needs", a(arr(o(s())))),
                ],
                &["type"],
            ),
        ),
        ("Login", obj(&[("username", o(s())), ("password", o(s()))], &["username", "password"])),
        ("Tokens", obj(&[("token", o(s())), ("refresh_token", o(s())), ("message", o(s()))], &[])),
        ("Message", obj(&[("message", o(s())), ("field", o(s()))], &["message"])),
        (
            "Application",
            obj(
                &[
                    ("applicationID", o(s())),
                    ("application_name", o(s())),
                    ("application_namespace", o(s())),
                    ("application_desc", o(s())),
                    ("userId", o(s())),
                    ("microservices", a(arr(o(s().description(Some("service id")))))),
                ],
                &[],
            ),
        ),
        ("Instance", instance),
        (
            "Service",
            obj(
                &[
                    ("microserviceID", o(s())),
                    ("applicationID", o(s())),
                    ("app_name", o(s())),
                    ("app_ns", o(s())),
                    ("job_name", o(s())),
                    ("image", o(s())),
                    ("status", o(s())),
                    ("status_detail", o(s())),
                    ("instance_list", a(arr(r("Instance")))),
                ],
                &[],
            ),
        ),
        (
            "DeployAnswer",
            obj(
                &[
                    ("message", o(s())),
                    ("instance_number", o(int())),
                    ("status", o(s())),
                    ("status_detail", o(s())),
                    ("cluster_id", o(s())),
                    ("cluster_name", o(s())),
                ],
                &[],
            ),
        ),
        (
            "Cluster",
            obj(
                &[
                    ("cluster_id", o(s())),
                    ("cluster_name", o(s())),
                    ("cluster_location", o(s())),
                    ("active", o(boolean())),
                    ("active_nodes", o(int())),
                    ("total_cpu_cores", o(int())),
                    ("aggregated_cpu_percent", o(num())),
                    ("memory_in_mb", o(int())),
                    ("free_memory_in_mb", o(int())),
                    ("total_gpu_cores", o(int())),
                    ("virtualization", a(arr(o(s())))),
                    ("arch", a(arr(o(s())))),
                ],
                &[],
            ),
        ),
        ("Health", obj(&[("status", o(s()))], &["status"])),
    ]
}

struct Ep {
    method: HttpMethod,
    path: &'static str,
    summary: &'static str,
    auth: bool,
    body: Option<&'static str>,
    ok: (&'static str, bool), // schema, is array
    errors: &'static [(&'static str, &'static str)],
}

fn endpoints() -> Vec<Ep> {
    use HttpMethod::*;
    let e = |method, path, summary, auth, body, ok, errors| Ep { method, path, summary, auth, body, ok, errors };
    vec![
        e(Get, "/api/health", "Readiness: 200 once the store is open and both listeners are bound", false, None, ("Health", false), &[("503", "starting")]),
        e(Post, "/api/auth/login", "Log in; returns an access and a refresh token (JWT HS256)", false, Some("Login"), ("Tokens", false), &[("401", "bad credentials"), ("400", "malformed body")]),
        e(Post, "/api/auth/refresh", "New tokens from a refresh token (body field refresh_token or Bearer header)", false, None, ("Tokens", false), &[("401", "invalid refresh token")]),
        e(Post, "/api/application", "Create the applications of an SLA; answers the user's list of applications", true, Some("Sla"), ("Application", true), &[("400", "malformed SLA; message names the field; nothing stored"), ("401", "no valid token"), ("409", "duplicate application name+namespace")]),
        e(Get, "/api/applications", "The user's applications (all for Admin)", true, None, ("Application", true), &[("401", "no valid token")]),
        e(Get, "/api/application/{id}", "One application", true, None, ("Application", false), &[("404", "unknown id"), ("401", "no valid token")]),
        e(Put, "/api/application/{id}", "Update name, namespace or description", true, Some("Application"), ("Application", false), &[("400", "bad field"), ("404", "unknown id"), ("409", "duplicate name+namespace")]),
        e(Delete, "/api/application/{id}", "Delete an application, its services and their instances", true, None, ("Message", false), &[("404", "unknown id")]),
        e(Get, "/api/services/{app_id}", "Services of an application", true, None, ("Service", true), &[("404", "unknown id")]),
        e(Get, "/api/service/{id}", "One service (job document with instance_list)", true, None, ("Service", false), &[("404", "unknown id")]),
        e(Delete, "/api/service/{id}", "Delete a service and undeploy all its instances", true, None, ("Message", false), &[("404", "unknown id")]),
        e(Post, "/api/service/{id}/instance", "Deploy one more instance (no body). 200 also when it cannot be placed yet: status/status_detail say why, and it is retried", true, None, ("DeployAnswer", false), &[("404", "unknown id")]),
        e(Delete, "/api/service/{id}/instance/{n}", "Undeploy instance n", true, None, ("Message", false), &[("404", "unknown id or instance"), ("400", "n is not a number")]),
        e(Get, "/api/clusters/", "All registered clusters", false, None, ("Cluster", true), &[]),
        e(Get, "/api/clusters/active", "Active clusters", false, None, ("Cluster", true), &[]),
    ]
}

/// The OpenAPI document as JSON.
pub fn document() -> Value {
    let mut paths = PathsBuilder::new();
    for ep in endpoints() {
        let mut op = OperationBuilder::new().summary(Some(ep.summary));
        for seg in ep.path.split('/').filter(|s| s.starts_with('{')) {
            let name = seg.trim_matches(|c| c == '{' || c == '}');
            op = op.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(s().build())),
            );
        }
        if let Some(b) = ep.body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", Content::new(Some(r(b))))
                    .required(Some(Required::True))
                    .build(),
            ));
        }
        let ok_schema = if ep.ok.1 { a(arr(r(ep.ok.0))) } else { r(ep.ok.0) };
        op = op.response(
            "200",
            ResponseBuilder::new().description("OK").content("application/json", Content::new(Some(ok_schema))).build(),
        );
        for (code, why) in ep.errors {
            op = op.response(
                *code,
                ResponseBuilder::new()
                    .description(*why)
                    .content("application/json", Content::new(Some(r("Message"))))
                    .build(),
            );
        }
        if ep.auth {
            op = op.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        }
        paths = paths.path(ep.path, PathItem::new(ep.method, op.build()));
    }
    let mut comps = ComponentsBuilder::new().security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
    );
    for (name, sch) in schemas() {
        comps = comps.schema(name, sch);
    }
    let doc = OpenApiBuilder::new()
        .info(InfoBuilder::new().title("oakestra-rs root orchestrator").version(env!("CARGO_PKG_VERSION")).build())
        .paths(paths.build())
        .components(Some(comps.build()))
        .build();
    serde_json::to_value(&doc).unwrap_or_default()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn schema_text(v: &Value) -> String {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let n = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(n));
    }
    if let Some(items) = v.get("items") {
        return format!("array of {}", schema_text(items));
    }
    let t = v.get("type").map(|t| t.to_string().trim_matches('"').to_string()).unwrap_or_else(|| "any".into());
    esc(&t)
}

/// A plain HTML page listing the document's endpoints and schemas (works offline, no scripts).
pub fn html(doc: &Value) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>oakestra-rs root API</title><style>body{font-family:sans-serif;max-width:70em;margin:auto}code{background:#eee}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style></head><body>",
    );
    h.push_str(&format!(
        "<h1>{} {}</h1><p>Machine-readable document: <a href=\"/api/docs/openapi.json\">/api/docs/openapi.json</a>. Authenticated endpoints need <code>Authorization: Bearer &lt;token&gt;</code> from <code>POST /api/auth/login</code>.</p><h2>Endpoints</h2>",
        esc(doc["info"]["title"].as_str().unwrap_or("")),
        esc(doc["info"]["version"].as_str().unwrap_or(""))
    ));
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for (method, op) in item.as_object().into_iter().flatten() {
                h.push_str(&format!(
                    "<h3><code>{} {}</code>{}</h3><p>{}</p>",
                    method.to_uppercase(),
                    esc(path),
                    if op.get("security").is_some() { " 🔒" } else { "" },
                    esc(op["summary"].as_str().unwrap_or(""))
                ));
                if let Some(b) = op.pointer("/requestBody/content/application~1json/schema") {
                    h.push_str(&format!("<p>Body: {}</p>", schema_text(b)));
                }
                h.push_str("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>");
                for (code, resp) in op["responses"].as_object().into_iter().flatten() {
                    let body = resp.pointer("/content/application~1json/schema").map(schema_text).unwrap_or_default();
                    h.push_str(&format!(
                        "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(code),
                        esc(resp["description"].as_str().unwrap_or("")),
                        body
                    ));
                }
                h.push_str("</table>");
            }
        }
    }
    h.push_str("<h2>Schemas</h2>");
    if let Some(sch) = doc.pointer("/components/schemas").and_then(Value::as_object) {
        for (name, s) in sch {
            let req: Vec<&str> = s["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            h.push_str(&format!(
                "<h3 id=\"schema-{0}\">{0}</h3><table><tr><th>field</th><th>type</th><th>notes</th></tr>",
                esc(name)
            ));
            for (f, fs) in s["properties"].as_object().into_iter().flatten() {
                let mut notes = Vec::new();
                if req.contains(&f.as_str()) {
                    notes.push("required".to_string());
                }
                if let Some(p) = fs["pattern"].as_str() {
                    notes.push(format!("pattern {p}"));
                }
                if let Some(e) = fs["enum"].as_array() {
                    notes.push(format!("one of {}", e.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")));
                }
                if let Some(d) = fs["description"].as_str() {
                    notes.push(d.to_string());
                }
                h.push_str(&format!(
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                    esc(f),
                    schema_text(fs),
                    esc(&notes.join("; "))
                ));
            }
            h.push_str("</table>");
        }
    }
    h.push_str("</body></html>");
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_lists_endpoints_and_page_renders_them() {
        let d = super::document();
        assert!(d["paths"]["/api/service/{id}/instance"]["post"].is_object());
        assert!(d["paths"]["/api/application/{id}"]["delete"].is_object());
        assert!(d["components"]["schemas"]["Microservice"]["properties"]["virtualization"].is_object());
        let h = super::html(&d);
        assert!(h.contains("POST /api/application"));
        assert!(h.contains("id=\"schema-Sla\""));
        assert!(!h.contains("<script"));
    }
}
