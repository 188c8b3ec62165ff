//! Parsing an SLA document: serde (through `serde_path_to_error`, so a type error names its field path)
//! against the types in the parent module, the size limits on the raw document, then the semantic checks
//! the types cannot say (name rules, ranges, the allowed values of a few strings).

use serde::de::{self, Deserializer, Visitor};
use serde_json::Value;

use super::{Constraint, Microservice, Sla, CONSTRAINT_TYPES, SLA_VERSIONS, VIRTUALIZATIONS};

/// Longest accepted free-text string (code, cmd entry, description, ...).
pub const MAX_STRING: usize = 4096;
/// Longest accepted list (applications, microservices, cmd, env, constraints, ...).
pub const MAX_ARRAY: usize = 256;

/// What [`is_name`] asks for, as error messages say it.
pub const NAME_RULE: &str = "must match ^[a-zA-Z0-9]{1,30}$";

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

/// An application or microservice name or namespace: 1 to 30 ASCII letters and digits.
pub fn is_name(s: &str) -> bool {
    (1..=30).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `path.key`, or `key` at the top.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Parses and validates an SLA document; the error names the first bad field.
pub fn parse_sla(v: &Value) -> Result<Sla, SlaError> {
    if !v.is_object() {
        return Err(err("$", "expected an object"));
    }
    check_sizes(v, "")?;
    let sla: Sla = serde_path_to_error::deserialize(without_nulls(v)).map_err(type_error)?;
    validate(&sla)?;
    Ok(sla)
}

/// A serde error as a field path and a problem. serde reports a missing field at the object holding it
/// and names it only in its message, so the name is moved onto the path like every other field's.
fn type_error(e: serde_path_to_error::Error<serde_json::Error>) -> SlaError {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let problem = e.into_inner().to_string();
    match problem.strip_prefix("missing field `").and_then(|r| r.strip_suffix('`')) {
        Some(field) => err(join(&path, field), "required field is missing"),
        None if path.is_empty() => err("$", problem),
        None => err(path, problem),
    }
}

/// The document with every `null` member of an object left out: a null field counts as absent.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            Value::Object(o.iter().filter(|(_, e)| !e.is_null()).map(|(k, e)| (k.clone(), without_nulls(e))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Every string at most [`MAX_STRING`] bytes, every list at most [`MAX_ARRAY`] entries.
fn check_sizes(v: &Value, path: &str) -> Result<(), SlaError> {
    match v {
        Value::String(s) if s.len() > MAX_STRING => {
            Err(err(path, format!("string too long ({} bytes, at most {MAX_STRING})", s.len())))
        }
        Value::Array(a) if a.len() > MAX_ARRAY => {
            Err(err(path, format!("too many entries ({}, at most {MAX_ARRAY})", a.len())))
        }
        Value::Array(a) => a.iter().enumerate().try_for_each(|(i, e)| check_sizes(e, &format!("{path}[{i}]"))),
        Value::Object(o) => o.iter().try_for_each(|(k, e)| check_sizes(e, &join(path, k))),
        _ => Ok(()),
    }
}

/// Deserializes a count or size: a non-negative integer, also written as an integral number (`100.0`).
pub(super) fn uint<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    struct Uint;
    impl Visitor<'_> for Uint {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            if v >= 0.0 && v.fract() == 0.0 && v < 1e15 {
                Ok(v as u64)
            } else {
                Err(E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
    }
    let n = d.deserialize_any(Uint)?;
    T::try_from(n).map_err(|_| de::Error::invalid_value(de::Unexpected::Unsigned(n), &"a smaller non-negative integer"))
}

/// Semantic checks on a typed SLA.
pub fn validate(sla: &Sla) -> Result<(), SlaError> {
    if !SLA_VERSIONS.contains(&sla.sla_version.as_str()) {
        return Err(err("sla_version", format!("expected \"v2.0\", got {:?}", sla.sla_version)));
    }
    if sla.applications.is_empty() {
        return Err(err("applications", "at least one application is required"));
    }
    for (ai, a) in sla.applications.iter().enumerate() {
        let ap = format!("applications[{ai}]");
        if !is_name(&a.application_name) {
            return Err(err(format!("{ap}.application_name"), NAME_RULE));
        }
        if !is_name(&a.application_namespace) {
            return Err(err(format!("{ap}.application_namespace"), NAME_RULE));
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
        return Err(err(format!("{path}.microservice_name"), NAME_RULE));
    }
    if !is_name(&s.microservice_namespace) {
        return Err(err(format!("{path}.microservice_namespace"), NAME_RULE));
    }
    if !VIRTUALIZATIONS.contains(&s.virtualization.as_str()) {
        return Err(err(
            format!("{path}.virtualization"),
            format!("expected \"container\", \"unikernel\" or \"microvm\", got {:?}", s.virtualization),
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
    if let Err(e) = oak_proto::ports::parse_port_mappings(&s.port) {
        return Err(err(format!("{path}.port"), format!("{e}: expected \"host:container[/tcp|udp];...\"")));
    }
    for (i, c) in s.constraints.iter().enumerate() {
        if !CONSTRAINT_TYPES.contains(&c.kind.as_str()) {
            return Err(err(
                format!("{path}.constraints[{i}].type"),
                format!("expected direct|latency|geo|clusters|addons, got {:?}", c.kind),
            ));
        }
        if c.kind == "latency" {
            check_latency(c, &format!("{path}.constraints[{i}]"))?;
            if c.area.trim().is_empty() {
                return Err(err(
                    format!("{path}.constraints[{i}].area"),
                    "a latency constraint needs the area its users are in (a worker or cluster name)",
                ));
            }
        }
    }
    for (i, t) in s.connectivity.iter().enumerate() {
        let at = format!("{path}.connectivity[{i}]");
        if t.target_microservice_id.trim().is_empty() {
            return Err(err(format!("{at}.target_microservice_id"), "must name the target microservice"));
        }
        for (j, c) in t.con_constraints.iter().enumerate() {
            if c.kind != "latency" {
                return Err(err(
                    format!("{at}.con_constraints[{j}].type"),
                    format!("expected \"latency\" (the one service-to-service constraint), got {:?}", c.kind),
                ));
            }
            check_latency(c, &format!("{at}.con_constraints[{j}]"))?;
        }
    }
    Ok(())
}

/// A latency constraint's threshold: milliseconds of round-trip time, above zero.
fn check_latency(c: &Constraint, at: &str) -> Result<(), SlaError> {
    if !(c.threshold.is_finite() && c.threshold > 0.0 && c.threshold <= 3_600_000.0) {
        return Err(err(format!("{at}.threshold"), "a latency threshold is a round-trip time in ms, above 0"));
    }
    Ok(())
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
    #[test]
    fn latency_constraints_need_a_threshold_an_area_and_a_target() {
        let mut v = good();
        v["applications"][0]["microservices"][1]["memory"] = json!(50);
        let set = |v: &Value, key: &str, val: Value| {
            let mut b = v.clone();
            b["applications"][0]["microservices"][0][key] = val;
            b
        };
        let ok =
            set(&v, "constraints", json!([{"type":"latency","area":"w-user","threshold":10,"convergence_time":5}]));
        let ok = set(
            &ok,
            "connectivity",
            json!([{"target_microservice_id":"nginx",
            "con_constraints":[{"type":"latency","threshold":20}]}]),
        );
        let sla = parse_sla(&ok).unwrap();
        let m = &sla.applications[0].microservices[0];
        assert_eq!((m.constraints[0].threshold, m.connectivity[0].target_microservice_id.as_str()), (10.0, "nginx"));
        let at = "applications[0].microservices[0]";
        let cases = [
            (json!([{"type":"latency","area":"w-user"}]), "constraints", format!("{at}.constraints[0].threshold")),
            (
                json!([{"type":"latency","threshold":-1,"area":"x"}]),
                "constraints",
                format!("{at}.constraints[0].threshold"),
            ),
            (json!([{"type":"latency","threshold":5}]), "constraints", format!("{at}.constraints[0].area")),
            (json!([{"con_constraints":[]}]), "connectivity", format!("{at}.connectivity[0].target_microservice_id")),
            (
                json!([{"target_microservice_id":"x","con_constraints":[{"type":"geo","threshold":5}]}]),
                "connectivity",
                format!("{at}.connectivity[0].con_constraints[0].type"),
            ),
        ];
        for (val, key, field) in cases {
            let e = parse_sla(&set(&v, key, val.clone())).unwrap_err();
            assert_eq!(e.field, field, "{val}: {e}");
        }
    }
}
