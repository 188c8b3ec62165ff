//! The use cases behind the user endpoints: the Admin registers and removes users; a user reads itself and
//! changes its own password; a user's applications go with it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Identity, User, ADMIN, ADMIN_ROLE, PROVIDER_ROLE};
use super::error::RootError;
use super::store::USERS;
use super::Root;
use crate::model::{self, SlaError};

/// Longest password accepted (Argon2 takes any length; this bounds the work a request can ask for).
pub const MAX_PASSWORD: usize = 1024;

/// A new user (`POST /api/auth/register`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct Registration {
    pub name: String,
    pub password: String,
    /// `Admin` or `Application_Provider` (the default).
    #[serde(default)]
    pub roles: Vec<String>,
}

/// A user as the API shows it (never the hash).
#[derive(Debug, Serialize, ToSchema)]
pub struct UserDoc {
    pub name: String,
    pub roles: Vec<String>,
}

impl From<&User> for UserDoc {
    fn from(u: &User) -> Self {
        Self { name: u.name.clone(), roles: u.roles.clone() }
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> RootError {
    RootError::InvalidField(SlaError { field: field.into(), problem: problem.into() })
}

fn check_password(field: &str, pw: &str) -> Result<(), RootError> {
    if pw.is_empty() || pw.len() > MAX_PASSWORD {
        return Err(invalid(field, format!("a password is 1 to {MAX_PASSWORD} bytes")));
    }
    Ok(())
}

impl Root {
    /// The user named by a token, if it still exists (a removed user's tokens stop working).
    pub fn identity(&self, name: &str) -> Result<Option<Identity>, RootError> {
        Ok(self.store.get::<User>(USERS, name)?.map(|u| u.identity()))
    }

    /// The stored password hash of `name`, if there is such a user.
    pub fn password_hash(&self, name: &str) -> Result<Option<String>, RootError> {
        Ok(self.store.get::<User>(USERS, name)?.map(|u| u.password_hash))
    }

    /// Registers a user (Admin only).
    pub async fn register_user(&self, who: &Identity, r: Registration) -> Result<UserDoc, RootError> {
        who.require_admin("registering users")?;
        if !model::is_name(&r.name) {
            return Err(invalid("name", model::NAME_RULE));
        }
        check_password("password", &r.password)?;
        let roles = if r.roles.is_empty() { vec![PROVIDER_ROLE.to_string()] } else { r.roles };
        if let Some(bad) = roles.iter().find(|x| *x != ADMIN_ROLE && *x != PROVIDER_ROLE) {
            return Err(invalid("roles", format!("unknown role {bad:?} (expected {ADMIN_ROLE} or {PROVIDER_ROLE})")));
        }
        let password_hash = self.auth.passwords.hash(r.password).await?;
        let user = User { name: r.name, password_hash, roles };
        self.store.update(|tx| {
            if tx.get::<User>(USERS, &user.name)?.is_some() {
                return Ok(Err(RootError::UserExists(user.name.clone())));
            }
            tx.put(USERS, &user.name, &user)?;
            Ok(Ok(()))
        })??;
        tracing::info!(user = %user.name, roles = ?user.roles, by = %who.name, "user registered");
        Ok(UserDoc::from(&user))
    }

    /// Every user (Admin only).
    pub fn users(&self, who: &Identity) -> Result<Vec<UserDoc>, RootError> {
        who.require_admin("listing users")?;
        Ok(self.store.list::<User>(USERS)?.iter().map(UserDoc::from).collect())
    }

    /// User `name`: the caller itself, or anyone for the Admin.
    pub fn user(&self, who: &Identity, name: &str) -> Result<UserDoc, RootError> {
        if !who.may_see(name) {
            return Err(RootError::AdminOnly(format!("reading user {name}")));
        }
        let u = self.store.get::<User>(USERS, name)?.ok_or_else(|| RootError::UserNotFound(name.into()))?;
        Ok(UserDoc::from(&u))
    }

    /// Removes user `name` and its applications (Admin only; the Admin user itself stays).
    pub fn delete_user(&self, who: &Identity, name: &str) -> Result<(), RootError> {
        who.require_admin("removing users")?;
        if name == ADMIN {
            return Err(invalid("name", "the Admin user cannot be removed"));
        }
        self.user(who, name)?;
        let owner = Identity { name: name.into(), admin: false };
        for app in self.applications_of(&owner)? {
            self.delete_application(&app)?;
        }
        self.store.update(|tx| tx.delete(USERS, name))?;
        tracing::info!(user = %name, by = %who.name, "user removed");
        Ok(())
    }

    /// Changes the caller's own password; the old one must be given.
    pub async fn change_password(&self, who: &Identity, name: &str, old: String, new: String) -> Result<(), RootError> {
        if who.name != name {
            return Err(RootError::AdminOnly(format!("changing the password of {name}")));
        }
        check_password("newPassword", &new)?;
        let hash = self.password_hash(name)?;
        if !self.auth.passwords.verify(old, hash).await? {
            return Err(invalid("oldPassword", "does not match the current password"));
        }
        let password_hash = self.auth.passwords.hash(new).await?;
        self.store.update(|tx| {
            let mut u = tx.get::<User>(USERS, name)?.ok_or_else(|| anyhow::anyhow!("user {name} vanished"))?;
            u.password_hash = password_hash;
            tx.put(USERS, name, &u)
        })?;
        Ok(())
    }
}
