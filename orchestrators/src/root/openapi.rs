//! The OpenAPI document, built from the handlers' `#[utoipa::path]` annotations and the types' derived
//! schemas, and an offline HTML page rendered from it server-side.

use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa::openapi::{ComponentsBuilder, InfoBuilder};

/// The API's OpenAPI document (its operations as the router collected them) completed and as JSON.
pub fn document(mut doc: OpenApi) -> Value {
    doc.info = InfoBuilder::new().title("oakestra-rs root orchestrator").version(env!("CARGO_PKG_VERSION")).build();
    let bearer = SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build());
    match doc.components.as_mut() {
        Some(c) => c.add_security_scheme("bearer", bearer),
        None => doc.components = Some(ComponentsBuilder::new().security_scheme("bearer", bearer).build()),
    }
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
        let d = super::document(super::super::api::routes().1);
        assert!(d["paths"]["/api/service/{id}/instance"]["post"].is_object());
        assert!(d["paths"]["/api/application/{id}"]["delete"].is_object());
        assert!(d["components"]["schemas"]["Microservice"]["properties"]["virtualization"].is_object());
        assert!(d["components"]["schemas"]["Connectivity"]["properties"]["target_microservice_id"].is_object());
        // the answers and the path parameter shared by the calls on one object
        let get = &d["paths"]["/api/service/{id}"]["get"];
        for code in ["200", "401", "404"] {
            assert!(get["responses"][code].is_object(), "GET /api/service/{{id}} lacks {code}: {get}");
        }
        assert_eq!(get["parameters"][0]["name"], "id");
        assert_eq!(get["parameters"][0]["in"], "path");
        // the deploy answer is the message with the instance document flattened into it
        let answer = d["components"]["schemas"]["DeployAnswer"].to_string();
        for part in ["\"message\"", "#/components/schemas/Instance"] {
            assert!(answer.contains(part), "DeployAnswer lacks {part}: {answer}");
        }
        assert!(d["components"]["schemas"]["Instance"]["properties"]["status_detail"].is_object());
        let h = super::html(&d);
        assert!(h.contains("POST /api/application"));
        assert!(h.contains("id=\"schema-Sla\""));
        assert!(!h.contains("<script"));
    }
}
