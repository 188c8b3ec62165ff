//! Oakestra SLA v2.0: serde types, validation naming the offending field, conversion to the wire spec.
//! Pure types + functions so the cluster orchestrator can use them too.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest accepted free-text string (code, cmd entry, description, ...).
pub const MAX_STRING: usize = 4096;
/// Longest accepted list (applications, microservices, cmd, env, constraints, ...).
pub const MAX_ARRAY: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Sla {
    pub sla_version: String,
    #[serde(rename = "customerID", default)]
    pub customer_id: String,
    pub applications: Vec<Application>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Application {
    #[serde(rename = "applicationID", default)]
    pub application_id: String,
    pub application_name: String,
    pub application_namespace: String,
    #[serde(default)]
    pub application_desc: String,
    #[serde(default)]
    pub microservices: Vec<Microservice>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Microservice {
    #[serde(rename = "microserviceID", default)]
    pub microservice_id: String,
    pub microservice_name: String,
    pub microservice_namespace: String,
    pub virtualization: String,
    pub code: String,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub environment: Vec<String>,
    #[serde(default)]
    pub arch: Vec<String>,
    #[serde(default)]
    pub memory: u64,
    #[serde(default)]
    pub vcpus: f64,
    #[serde(default)]
    pub vgpus: u32,
    #[serde(default)]
    pub vtpus: u32,
    #[serde(default)]
    pub storage: u64,
    #[serde(default)]
    pub bandwidth_in: u64,
    #[serde(default)]
    pub bandwidth_out: u64,
    #[serde(default)]
    pub port: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub added_files: Vec<String>,
    #[serde(default)]
    pub one_shot: bool,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub addresses: Addresses,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    #[serde(default)]
    pub connectivity: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Addresses {
    #[serde(default)]
    pub rr_ip: String,
    #[serde(default)]
    pub rr_ip_v6: String,
    #[serde(default)]
    pub closest_ip: String,
    #[serde(default)]
    pub closest_ip_v6: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Constraint {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub area: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub threshold: f64,
    #[serde(default)]
    pub rigidness: f64,
    #[serde(default)]
    pub convergence_time: u64,
    #[serde(default)]
    pub allowed: Vec<String>,
    #[serde(default)]
    pub needs: Vec<String>,
}

/// A validation error: `field` is a JSON path like `applications[0].microservices[1].memory`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SlaError {
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> SlaError {
    SlaError { field: field.into(), problem: problem.into() }
}

fn is_name(s: &str) -> bool {
    (1..=30).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

// ---- raw JSON checks: give precise field paths before serde sees the document

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a serde_json::Map<String, Value>, SlaError> {
    v.as_object().ok_or_else(|| err(path, "expected an object"))
}

fn opt_str(o: &serde_json::Map<String, Value>, path: &str, key: &str, required: bool) -> Result<(), SlaError> {
    let p = format!("{path}{key}");
    match o.get(key) {
        None | Some(Value::Null) if required => Err(err(p, "required field is missing")),
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s.len() > MAX_STRING => {
            Err(err(p, format!("string too long ({} bytes, at most {MAX_STRING})", s.len())))
        }
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err(err(p, "expected a string")),
    }
}

fn opt_uint(o: &serde_json::Map<String, Value>, path: &str, key: &str) -> Result<(), SlaError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(()),
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f >= 0.0 && f.fract() == 0.0 && f < 1e15) => Ok(()),
        Some(_) => Err(err(format!("{path}{key}"), "expected a non-negative integer")),
    }
}

fn opt_num(o: &serde_json::Map<String, Value>, path: &str, key: &str) -> Result<(), SlaError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f >= 0.0 && f.is_finite()) => Ok(()),
        Some(_) => Err(err(format!("{path}{key}"), "expected a non-negative number")),
    }
}

fn opt_bool(o: &serde_json::Map<String, Value>, path: &str, key: &str) -> Result<(), SlaError> {
    match o.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err(err(format!("{path}{key}"), "expected true or false")),
    }
}

fn opt_str_array(o: &serde_json::Map<String, Value>, path: &str, key: &str) -> Result<(), SlaError> {
    let p = format!("{path}{key}");
    match o.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) => {
            if a.len() > MAX_ARRAY {
                return Err(err(p, format!("too many entries ({}, at most {MAX_ARRAY})", a.len())));
            }
            for (i, e) in a.iter().enumerate() {
                match e {
                    Value::String(s) if s.len() > MAX_STRING => {
                        return Err(err(
                            format!("{p}[{i}]"),
                            format!("string too long ({} bytes, at most {MAX_STRING})", s.len()),
                        ))
                    }
                    Value::String(_) => {}
                    _ => return Err(err(format!("{p}[{i}]"), "expected a string")),
                }
            }
            Ok(())
        }
        Some(_) => Err(err(p, "expected an array of strings")),
    }
}

fn array<'a>(
    o: &'a serde_json::Map<String, Value>,
    path: &str,
    key: &str,
    required: bool,
) -> Result<&'a [Value], SlaError> {
    let p = format!("{path}{key}");
    match o.get(key) {
        None | Some(Value::Null) if required => Err(err(p, "required field is missing")),
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) if a.len() > MAX_ARRAY => {
            Err(err(p, format!("too many entries ({}, at most {MAX_ARRAY})", a.len())))
        }
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(err(p, "expected an array")),
    }
}

fn check_raw_service(v: &Value, path: &str) -> Result<(), SlaError> {
    let o = obj(v, path.trim_end_matches('.'))?;
    for k in ["microservice_name", "microservice_namespace", "virtualization", "code"] {
        opt_str(o, path, k, true)?;
    }
    for k in ["microserviceID", "port", "state"] {
        opt_str(o, path, k, false)?;
    }
    for k in ["cmd", "args", "environment", "arch", "added_files"] {
        opt_str_array(o, path, k)?;
    }
    for k in ["memory", "vgpus", "vtpus", "storage", "bandwidth_in", "bandwidth_out"] {
        opt_uint(o, path, k)?;
    }
    opt_num(o, path, "vcpus")?;
    opt_bool(o, path, "one_shot")?;
    opt_bool(o, path, "privileged")?;
    if let Some(a) = o.get("addresses").filter(|a| !a.is_null()) {
        let ap = format!("{path}addresses.");
        let ao = obj(a, &format!("{path}addresses"))?;
        for k in ["rr_ip", "rr_ip_v6", "closest_ip", "closest_ip_v6"] {
            opt_str(ao, &ap, k, false)?;
        }
    }
    for (i, c) in array(o, path, "constraints", false)?.iter().enumerate() {
        let cp = format!("{path}constraints[{i}].");
        let co = obj(c, cp.trim_end_matches('.'))?;
        opt_str(co, &cp, "type", true)?;
        for k in ["cluster", "node", "area", "location"] {
            opt_str(co, &cp, k, false)?;
        }
        opt_num(co, &cp, "threshold")?;
        opt_num(co, &cp, "rigidness")?;
        opt_uint(co, &cp, "convergence_time")?;
        opt_str_array(co, &cp, "allowed")?;
        opt_str_array(co, &cp, "needs")?;
    }
    array(o, path, "connectivity", false)?;
    Ok(())
}

/// Parses and validates an SLA document; the error names the first bad field.
pub fn parse_sla(v: &Value) -> Result<Sla, SlaError> {
    let o = obj(v, "$")?;
    opt_str(o, "", "sla_version", true)?;
    opt_str(o, "", "customerID", false)?;
    let apps = array(o, "", "applications", true)?;
    for (ai, a) in apps.iter().enumerate() {
        let ap = format!("applications[{ai}].");
        let ao = obj(a, ap.trim_end_matches('.'))?;
        opt_str(ao, &ap, "application_name", true)?;
        opt_str(ao, &ap, "application_namespace", true)?;
        opt_str(ao, &ap, "application_desc", false)?;
        opt_str(ao, &ap, "applicationID", false)?;
        for (si, s) in array(ao, &ap, "microservices", false)?.iter().enumerate() {
            check_raw_service(s, &format!("{ap}microservices[{si}]."))?;
        }
    }
    let sla: Sla = serde_json::from_value(v.clone()).map_err(|e| err("$", e.to_string()))?;
    validate(&sla)?;
    Ok(sla)
}

/// Semantic checks on a typed SLA.
pub fn validate(sla: &Sla) -> Result<(), SlaError> {
    if sla.sla_version != "v2.0" {
        return Err(err("sla_version", format!("expected \"v2.0\", got {:?}", sla.sla_version)));
    }
    if sla.applications.is_empty() {
        return Err(err("applications", "at least one application is required"));
    }
    for (ai, a) in sla.applications.iter().enumerate() {
        let ap = format!("applications[{ai}]");
        if !is_name(&a.application_name) {
            return Err(err(format!("{ap}.application_name"), "must match ^[a-zA-Z0-9]{1,30}$"));
        }
        if !is_name(&a.application_namespace) {
            return Err(err(format!("{ap}.application_namespace"), "must match ^[a-zA-Z0-9]{1,30}$"));
        }
        for (si, s) in a.microservices.iter().enumerate() {
            validate_service(s, &format!("{ap}.microservices[{si}]"))?;
        }
        for (si, s) in a.microservices.iter().enumerate() {
            if a.microservices[..si].iter().any(|o| {
                o.microservice_name == s.microservice_name && o.microservice_namespace == s.microservice_namespace
            }) {
                return Err(err(
                    format!("{ap}.microservices[{si}].microservice_name"),
                    "duplicate microservice name+namespace in this application",
                ));
            }
        }
    }
    Ok(())
}

/// Checks one microservice; `path` prefixes field names in errors.
pub fn validate_service(s: &Microservice, path: &str) -> Result<(), SlaError> {
    if !is_name(&s.microservice_name) {
        return Err(err(format!("{path}.microservice_name"), "must match ^[a-zA-Z0-9]{1,30}$"));
    }
    if !is_name(&s.microservice_namespace) {
        return Err(err(format!("{path}.microservice_namespace"), "must match ^[a-zA-Z0-9]{1,30}$"));
    }
    if s.virtualization != "container" && s.virtualization != "unikernel" {
        return Err(err(
            format!("{path}.virtualization"),
            format!("expected \"container\" or \"unikernel\", got {:?}", s.virtualization),
        ));
    }
    if s.code.trim().is_empty() {
        return Err(err(format!("{path}.code"), "must not be empty"));
    }
    if !(s.vcpus.is_finite() && s.vcpus >= 0.0 && s.vcpus <= 1024.0) {
        return Err(err(format!("{path}.vcpus"), "expected a number between 0 and 1024"));
    }
    if s.memory > 16 * 1024 * 1024 {
        return Err(err(format!("{path}.memory"), "too large (at most 16777216 MB)"));
    }
    for (i, e) in s.environment.iter().enumerate() {
        if !e.contains('=') {
            return Err(err(format!("{path}.environment[{i}]"), "expected \"KEY=VALUE\""));
        }
    }
    if !s.port.is_empty() {
        for (i, p) in s.port.split(';').filter(|p| !p.is_empty()).enumerate() {
            let body = p.split('/').next().unwrap_or("");
            let proto_ok = p.split('/').nth(1).is_none_or(|pr| pr == "tcp" || pr == "udp");
            let nums_ok = body.split(':').all(|n| n.parse::<u16>().is_ok()) && body.split(':').count() <= 2;
            if !proto_ok || !nums_ok {
                return Err(err(
                    format!("{path}.port"),
                    format!("entry {i} ({p:?}) is not \"host:container[/tcp|udp]\""),
                ));
            }
        }
    }
    for (i, c) in s.constraints.iter().enumerate() {
        if !["direct", "latency", "geo", "clusters", "addons"].contains(&c.kind.as_str()) {
            return Err(err(
                format!("{path}.constraints[{i}].type"),
                format!("expected direct|latency|geo|clusters|addons, got {:?}", c.kind),
            ));
        }
    }
    Ok(())
}

impl Microservice {
    /// `app.appns.svc.svcns`
    pub fn job_name(&self, app: &str, app_ns: &str) -> String {
        format!("{app}.{app_ns}.{}.{}", self.microservice_name, self.microservice_namespace)
    }

    /// Wire form handed to clusters and workers.
    pub fn to_spec(&self, service_id: &str, application_id: &str, job_name: &str) -> oak_proto::v1::ServiceSpec {
        use oak_proto::v1 as pb;
        pb::ServiceSpec {
            service_id: service_id.to_string(),
            job_name: job_name.to_string(),
            application_id: application_id.to_string(),
            virtualization: self.virtualization.clone(),
            code: self.code.clone(),
            cmd: self.cmd.clone(),
            args: self.args.clone(),
            environment: self.environment.clone(),
            arch: self.arch.clone(),
            memory_mb: self.memory,
            vcpus: self.vcpus,
            vgpus: self.vgpus,
            storage_mb: self.storage,
            port: self.port.clone(),
            one_shot: self.one_shot,
            privileged: self.privileged,
            constraints: self
                .constraints
                .iter()
                .map(|c| pb::Constraint {
                    r#type: c.kind.clone(),
                    cluster: c.cluster.clone(),
                    node: c.node.clone(),
                    area: c.area.clone(),
                    location: c.location.clone(),
                    threshold: c.threshold,
                    rigidness: c.rigidness,
                    convergence_time: c.convergence_time,
                    allowed: c.allowed.clone(),
                    needs: c.needs.clone(),
                })
                .collect(),
            addresses: Some(pb::ServiceAddresses {
                rr_ip: self.addresses.rr_ip.clone(),
                rr_ip_v6: self.addresses.rr_ip_v6.clone(),
                closest_ip: self.addresses.closest_ip.clone(),
                closest_ip_v6: self.addresses.closest_ip_v6.clone(),
            }),
            bandwidth_in_kbps: self.bandwidth_in,
            bandwidth_out_kbps: self.bandwidth_out,
            added_files: self.added_files.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":"clientsrvr",
          "application_namespace":"test","application_desc":"x","microservices":[
            {"microserviceID":"","microservice_name":"curl","microservice_namespace":"test","virtualization":"container",
             "cmd":["sh","-c","curl 10.30.30.30"],"memory":100,"vcpus":1,"code":"docker.io/curlimages/curl:7.82.0",
             "addresses":{"rr_ip":"10.30.30.31"},"constraints":[]},
            {"microservice_name":"nginx","microservice_namespace":"test","virtualization":"container","code":"nginx",
             "port":"80:80/tcp;81:81","memory":"oops"}]}]})
    }

    #[test]
    fn names_bad_field() {
        let e = parse_sla(&good()).unwrap_err();
        assert_eq!(e.field, "applications[0].microservices[1].memory");
        assert!(e.to_string().contains("non-negative integer"), "{e}");
    }

    #[test]
    fn accepts_good_and_converts() {
        let mut v = good();
        v["applications"][0]["microservices"][1]["memory"] = json!(50);
        let sla = parse_sla(&v).unwrap();
        let ms = &sla.applications[0].microservices[0];
        let spec = ms.to_spec("a", "b", &ms.job_name("clientsrvr", "test"));
        assert_eq!(spec.job_name, "clientsrvr.test.curl.test");
        assert_eq!(spec.memory_mb, 100);
        assert_eq!(spec.addresses.unwrap().rr_ip, "10.30.30.31");
    }

    #[test]
    fn rejects_bad_names_virt_and_oversize() {
        let mut v = good();
        v["applications"][0]["microservices"][1]["memory"] = json!(50);
        let mut b = v.clone();
        b["applications"][0]["application_name"] = json!("bad-name");
        assert_eq!(parse_sla(&b).unwrap_err().field, "applications[0].application_name");
        let mut b = v.clone();
        b["applications"][0]["microservices"][0]["virtualization"] = json!("vm");
        assert_eq!(parse_sla(&b).unwrap_err().field, "applications[0].microservices[0].virtualization");
        let mut b = v.clone();
        b["applications"][0]["microservices"][0]["code"] = json!("x".repeat(MAX_STRING + 1));
        let e = parse_sla(&b).unwrap_err();
        assert!(e.problem.contains("too long"), "{e}");
        let mut b = v.clone();
        b["applications"][0]["microservices"][0]["cmd"] = json!(vec!["a"; MAX_ARRAY + 1]);
        assert!(parse_sla(&b).unwrap_err().problem.contains("too many"));
        let mut b = v.clone();
        b["applications"][0]["microservices"][1]["port"] = json!("80:http");
        assert_eq!(parse_sla(&b).unwrap_err().field, "applications[0].microservices[1].port");
        let mut b = v;
        b["applications"][0]["microservices"][0].as_object_mut().unwrap().remove("code");
        assert_eq!(parse_sla(&b).unwrap_err().field, "applications[0].microservices[0].code");
    }
}
