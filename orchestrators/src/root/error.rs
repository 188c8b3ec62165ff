//! What can go wrong in the root's use cases; the REST API maps each kind to a status code in one place
//! (`api::error`).

use crate::model::SlaError;

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The SLA (or a value in it) is not acceptable; nothing was stored.
    #[error("invalid SLA: {0}")]
    InvalidSla(SlaError),
    /// A field of an update is not acceptable.
    #[error("{0}")]
    InvalidField(SlaError),
    #[error("application {name}.{namespace} already exists (applications[{index}])")]
    DuplicateApplication { name: String, namespace: String, index: usize },
    #[error("another application has this name+namespace")]
    NameTaken,
    #[error("application {0} not found")]
    ApplicationNotFound(String),
    #[error("service {0} not found")]
    ServiceNotFound(String),
    #[error("service {0} has no instance {1}")]
    NoSuchInstance(String, u32),
    /// The caller's role does not allow this; `field` names the request field that asked for it.
    #[error("{what} needs the Admin role ({field})")]
    Forbidden { field: String, what: String },
    /// An action on users that only the Admin role (or the user itself) may take.
    #[error("{0} needs the Admin role")]
    AdminOnly(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("user {0} not found")]
    UserNotFound(String),
    #[error("user {0} already exists")]
    UserExists(String),
    /// What the request needs is not reachable now (a cluster or worker is not connected, or did not answer).
    #[error("{0}")]
    Unavailable(String),
    /// The password checks' queue is full.
    #[error(transparent)]
    Busy(#[from] super::passwords::Busy),
    /// The store or another part of the root failed.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl RootError {
    /// The request field at fault, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidSla(e) | Self::InvalidField(e) => Some(&e.field),
            Self::Forbidden { field, .. } => Some(field),
            _ => None,
        }
    }
}
