//! The REST API's error answers: every error kind mapped to its status code and a `{"message", "field"}`
//! body in this one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::Message;
use crate::root::error::RootError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Root(#[from] RootError),
    /// The request itself is malformed (body, path parameter).
    #[error("{0}")]
    BadRequest(String),
    /// No valid credentials or token.
    #[error("{0}")]
    Unauthorized(String),
    #[error("no such endpoint")]
    NoSuchEndpoint,
    /// A login source used up its attempts.
    #[error(transparent)]
    Throttled(#[from] crate::root::auth::Throttled),
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::Root(RootError::Internal(e))
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NoSuchEndpoint => StatusCode::NOT_FOUND,
            Self::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Root(e) => match e {
                RootError::InvalidSla(_) | RootError::InvalidField(_) => StatusCode::BAD_REQUEST,
                RootError::DuplicateApplication { .. } | RootError::NameTaken => StatusCode::CONFLICT,
                RootError::ApplicationNotFound(_) | RootError::ServiceNotFound(_) | RootError::NoSuchInstance(..) => {
                    StatusCode::NOT_FOUND
                }
                RootError::Forbidden { .. } | RootError::AdminOnly(_) => StatusCode::FORBIDDEN,
                RootError::UserNotFound(_) | RootError::NotFound(_) => StatusCode::NOT_FOUND,
                RootError::UserExists(_) => StatusCode::CONFLICT,
                RootError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
                RootError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                RootError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{self}");
        }
        let field = match &self {
            Self::Root(e) => e.field().map(String::from),
            _ => None,
        };
        let retry_after = match &self {
            Self::Throttled(t) => Some(t.retry_after_s),
            Self::Root(RootError::Busy(_)) => Some(1),
            _ => None,
        };
        let mut r = (status, Json(Message { message: self.to_string(), field })).into_response();
        if let Some(s) = retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}
