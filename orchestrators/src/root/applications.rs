//! The use cases behind the REST API: a user's applications and services (create from an SLA, read,
//! update, delete). Handlers parse the request, call one of these and map the answer.

use std::net::Ipv4Addr;

use serde::Deserialize;

use super::auth::Identity;
use super::error::RootError;
use super::records::{ApplicationRecord, ServiceRecord};
use super::store::{new_id, APPLICATIONS, SERVICES};
use super::{Outgoing, Root};
use crate::model::{self, Microservice, Sla, SlaError};

/// The fields of an application a user may change; absent ones stay as they are.
#[derive(Debug, Default, Deserialize)]
pub struct ApplicationUpdate {
    pub application_name: Option<String>,
    pub application_namespace: Option<String>,
    pub application_desc: Option<String>,
}

fn invalid(field: &str, problem: impl Into<String>) -> RootError {
    RootError::InvalidField(SlaError { field: field.into(), problem: problem.into() })
}

impl ApplicationUpdate {
    fn check(&self) -> Result<(), RootError> {
        for (k, v) in
            [("application_name", &self.application_name), ("application_namespace", &self.application_namespace)]
        {
            if v.as_deref().is_some_and(|s| !model::is_name(s)) {
                return Err(invalid(k, model::NAME_RULE));
            }
        }
        if self.application_desc.as_ref().is_some_and(|d| d.len() > model::MAX_STRING) {
            return Err(invalid("application_desc", "string too long"));
        }
        Ok(())
    }
}

/// The address the SLA asks for in `addresses.<field>` of the microservice at `path`, if any.
fn wanted_ip(value: &str, path: &str, field: &str) -> Result<Option<Ipv4Addr>, RootError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        RootError::InvalidSla(SlaError {
            field: format!("{path}.{field}"),
            problem: format!("{value:?} is not an IPv4 address"),
        })
    })
}

/// What only the Admin role may ask for: privileged containers and host ports below 1024. The first such
/// request is refused, naming its field.
fn needs_no_admin(sla: &Sla) -> Result<(), RootError> {
    for (ai, a) in sla.applications.iter().enumerate() {
        for (mi, ms) in a.microservices.iter().enumerate() {
            let path = format!("applications[{ai}].microservices[{mi}]");
            if ms.privileged {
                return Err(RootError::Forbidden {
                    field: format!("{path}.privileged"),
                    what: "a privileged instance".into(),
                });
            }
            let ports = oak_proto::ports::parse_port_mappings(&ms.port).unwrap_or_default();
            if let Some(p) = ports.iter().find(|p| p.is_privileged()) {
                let what = format!("host port {} (below 1024)", p.host);
                return Err(RootError::Forbidden { field: format!("{path}.port"), what });
            }
        }
    }
    Ok(())
}

impl Root {
    /// Creates the applications of an SLA for `user` and returns their ids. Every service gets its service
    /// IPs first (the SLA may ask for ones that are taken), then everything is stored in one transaction;
    /// on any error nothing is stored and the IPs are given back.
    pub fn create_applications(&self, sla: &Sla, who: &Identity) -> Result<Vec<String>, RootError> {
        if !who.admin {
            needs_no_admin(sla)?;
        }
        let user = who.name.as_str();
        let mut allocated = Vec::new();
        let r = self
            .allocate_services(sla, &mut allocated)
            .and_then(|planned| self.store_applications(sla, &planned, user));
        if r.is_err() {
            self.release_service_ips(&allocated);
        }
        r
    }

    /// Every microservice of the SLA with a new service id and its service IPs; the ids allocated so far
    /// are in `allocated`, also on error.
    fn allocate_services(&self, sla: &Sla, allocated: &mut Vec<String>) -> Result<Vec<Vec<Microservice>>, RootError> {
        let mut planned = Vec::new();
        for (ai, a) in sla.applications.iter().enumerate() {
            let mut list = Vec::new();
            for (mi, ms) in a.microservices.iter().enumerate() {
                let path = format!("applications[{ai}].microservices[{mi}].addresses");
                let want_rr = wanted_ip(&ms.addresses.rr_ip, &path, "rr_ip")?;
                let want_cl = wanted_ip(&ms.addresses.closest_ip, &path, "closest_ip")?;
                let sid = new_id();
                let job = ms.job_name(&a.application_name, &a.application_namespace);
                let (rr, cl) =
                    self.net.allocate_service_ips_as(&sid, &job, want_rr, want_cl).map_err(|e| match e.field() {
                        Some(f) => {
                            RootError::InvalidSla(SlaError { field: format!("{path}.{f}"), problem: e.to_string() })
                        }
                        None => RootError::Internal(e.into()),
                    })?;
                allocated.push(sid.clone());
                let mut m = ms.clone();
                m.microservice_id = sid;
                m.addresses.rr_ip = rr.to_string();
                m.addresses.closest_ip = cl.to_string();
                list.push(m);
            }
            planned.push(list);
        }
        Ok(planned)
    }

    /// Stores the SLA's applications with their `planned` services, unless one's name+namespace is taken.
    fn store_applications(
        &self,
        sla: &Sla,
        planned: &[Vec<Microservice>],
        user: &str,
    ) -> Result<Vec<String>, RootError> {
        self.store.update(|tx| {
            let existing: Vec<ApplicationRecord> = tx.list(APPLICATIONS)?;
            for (ai, a) in sla.applications.iter().enumerate() {
                let same = |name: &str, ns: &str| name == a.application_name && ns == a.application_namespace;
                let dup = existing.iter().any(|e| same(&e.application_name, &e.application_namespace))
                    || sla.applications[..ai].iter().any(|o| same(&o.application_name, &o.application_namespace));
                if dup {
                    // nothing written yet: returning before any put keeps the store unchanged
                    return Ok(Err(RootError::DuplicateApplication {
                        name: a.application_name.clone(),
                        namespace: a.application_namespace.clone(),
                        index: ai,
                    }));
                }
            }
            let mut ids = Vec::new();
            for (a, services) in sla.applications.iter().zip(planned) {
                let app_id = new_id();
                let mut rec = ApplicationRecord {
                    application_id: app_id.clone(),
                    application_name: a.application_name.clone(),
                    application_namespace: a.application_namespace.clone(),
                    application_desc: a.application_desc.clone(),
                    user_id: user.to_string(),
                    microservices: vec![],
                };
                for ms in services {
                    let svc = ServiceRecord {
                        microservice_id: ms.microservice_id.clone(),
                        application_id: app_id.clone(),
                        app_name: a.application_name.clone(),
                        app_ns: a.application_namespace.clone(),
                        job_name: ms.job_name(&a.application_name, &a.application_namespace),
                        user_id: user.to_string(),
                        sla: ms.clone(),
                        instance_list: vec![],
                        next_instance: 0,
                    };
                    tx.put(SERVICES, &svc.microservice_id, &svc)?;
                    rec.microservices.push(svc.microservice_id);
                }
                tx.put(APPLICATIONS, &app_id, &rec)?;
                ids.push(app_id);
            }
            Ok(Ok(ids))
        })?
    }

    /// The applications `who` may see (all of them for the admin).
    pub fn applications_of(&self, who: &Identity) -> Result<Vec<ApplicationRecord>, RootError> {
        let apps: Vec<ApplicationRecord> = self.store.list(APPLICATIONS)?;
        Ok(apps.into_iter().filter(|a| who.may_see(&a.user_id)).collect())
    }

    /// Application `id`, if `who` may see it.
    pub fn application(&self, who: &Identity, id: &str) -> Result<ApplicationRecord, RootError> {
        match self.store.get::<ApplicationRecord>(APPLICATIONS, id)? {
            Some(a) if who.may_see(&a.user_id) => Ok(a),
            _ => Err(RootError::ApplicationNotFound(id.to_string())),
        }
    }

    /// Service `id`, if `who` may see it.
    pub fn service(&self, who: &Identity, id: &str) -> Result<ServiceRecord, RootError> {
        match self.store.get::<ServiceRecord>(SERVICES, id)? {
            Some(s) if who.may_see(&s.user_id) => Ok(s),
            _ => Err(RootError::ServiceNotFound(id.to_string())),
        }
    }

    /// The services of an application.
    pub fn services_of_application(&self, app: &ApplicationRecord) -> Result<Vec<ServiceRecord>, RootError> {
        let mut out = Vec::new();
        for sid in &app.microservices {
            out.extend(self.store.get::<ServiceRecord>(SERVICES, sid)?);
        }
        Ok(out)
    }

    /// `services` with their instances' use over time (not stored: see [`super::usage`]).
    pub fn with_usage(&self, mut services: Vec<ServiceRecord>) -> Vec<ServiceRecord> {
        self.usage.fill(&mut services);
        services
    }

    /// The services `who` may see.
    pub fn services_of(&self, who: &Identity) -> Result<Vec<ServiceRecord>, RootError> {
        let all: Vec<ServiceRecord> = self.store.list(SERVICES)?;
        Ok(all.into_iter().filter(|s| who.may_see(&s.user_id)).collect())
    }

    /// Changes application `id`'s names or description; the name+namespace must stay unique.
    pub fn update_application(
        &self,
        who: &Identity,
        id: &str,
        change: ApplicationUpdate,
    ) -> Result<ApplicationRecord, RootError> {
        let mut app = self.application(who, id)?;
        change.check()?;
        if let Some(v) = change.application_name {
            app.application_name = v;
        }
        if let Some(v) = change.application_namespace {
            app.application_namespace = v;
        }
        if let Some(v) = change.application_desc {
            app.application_desc = v;
        }
        let stored = self.store.update(|tx| {
            let all: Vec<ApplicationRecord> = tx.list(APPLICATIONS)?;
            if all.iter().any(|o| {
                o.application_id != app.application_id
                    && o.application_name == app.application_name
                    && o.application_namespace == app.application_namespace
            }) {
                return Ok(false);
            }
            tx.put(APPLICATIONS, id, &app)?;
            Ok(true)
        })?;
        if !stored {
            return Err(RootError::NameTaken);
        }
        Ok(app)
    }

    /// Deletes an application, its services and their instances.
    pub fn delete_application(&self, app: &ApplicationRecord) -> Result<(), RootError> {
        let mut out = Outgoing::new();
        self.store.update(|tx| {
            for sid in &app.microservices {
                if let Some(s) = tx.get::<ServiceRecord>(SERVICES, sid)? {
                    self.undeploy_all(&s, &mut out);
                    tx.delete(SERVICES, sid)?;
                }
            }
            tx.delete(APPLICATIONS, &app.application_id)
        })?;
        self.send(out);
        self.release_service_ips(&app.microservices);
        tracing::info!(application_id = %app.application_id, "application deleted");
        Ok(())
    }

    /// Deletes a service and undeploys all its instances.
    pub fn delete_service(&self, svc: &ServiceRecord) -> Result<(), RootError> {
        let id = &svc.microservice_id;
        let mut out = Outgoing::new();
        self.store.update(|tx| {
            self.undeploy_all(svc, &mut out);
            tx.delete(SERVICES, id)?;
            if let Some(mut app) = tx.get::<ApplicationRecord>(APPLICATIONS, &svc.application_id)? {
                app.microservices.retain(|s| s != id);
                tx.put(APPLICATIONS, &app.application_id, &app)?;
            }
            Ok(())
        })?;
        self.send(out);
        self.release_service_ips(std::slice::from_ref(id));
        Ok(())
    }

    /// Gives back the service IPs of deleted (or never stored) services; a failure is logged.
    fn release_service_ips(&self, service_ids: &[String]) {
        for sid in service_ids {
            if let Err(e) = self.net.release_service_ips(sid) {
                tracing::error!(service_id = %sid, "releasing service IPs: {e:#}");
            }
        }
    }
}
