//! The NodeEngine ↔ NetManager contract: the JSON bodies of the NetManager's local API
//! (`POST /container/deploy`, `POST /container/undeploy`), in Oakestra's field names. The NodeEngine sends
//! them, the NetManager reads them; both use these types.

use serde::{Deserialize, Serialize};

/// Wire the network namespace of `pid` as instance `instance_number` of a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeployRequest {
    pub pid: u32,
    /// The job name (`app.ns.service.ns`).
    pub service_name: String,
    #[serde(default)]
    pub service_id: String,
    pub instance_number: u32,
    /// Host exposure, `host:container[/tcp|udp];...` (SLA `port`).
    #[serde(default)]
    pub port_mappings: String,
}

/// Remove instance `instance_number`'s wiring.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UndeployRequest {
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub service_id: String,
    pub instance_number: u32,
}

/// The overlay addresses given to a wired instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeployAnswer {
    #[serde(rename = "nsAddress", default)]
    pub ns_address: String,
    #[serde(rename = "nsAddressv6", default)]
    pub ns_address_v6: String,
}

/// The body of every refusal: `{"error": "..."}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r = DeployRequest {
            pid: 42,
            service_name: "a.b.c.d".into(),
            service_id: "s1".into(),
            instance_number: 3,
            port_mappings: "80:8080".into(),
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pid":42,"serviceName":"a.b.c.d","serviceId":"s1","instanceNumber":3,"portMappings":"80:8080"})
        );
        assert_eq!(serde_json::from_value::<DeployRequest>(v).unwrap(), r);
        let a: DeployAnswer = serde_json::from_str(r#"{"nsAddress":"10.18.0.3","nsAddressv6":""}"#).unwrap();
        assert_eq!(a.ns_address, "10.18.0.3");
        let e = serde_json::from_str::<DeployRequest>(r#"{"pid":1,"serviceName":"x","instanceNumber":0,"extra":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `extra`"), "{e}");
    }
}
