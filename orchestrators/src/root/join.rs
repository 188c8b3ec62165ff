//! Clusters joining the root. The root is their certificate authority (`<data-dir>/ca`): a cluster
//! presents a join token once (made at first start into `<data-dir>/join-token`, or by the Admin through
//! the API or `root-orchestrator token create`) and gets a certificate naming `cluster/<id>`; its
//! sessions (:50052) and service-manager calls (:10099) are then authenticated by that certificate.

use oak_trust::{JoinToken, Registrar};
use tonic::Status;

use super::error::RootError;
use super::records::ClusterRecord;
use super::store::{self, CLUSTERS};

impl super::Root {
    /// A new join token valid for `ttl_ms` (0: until revoked); the whole token is only in the answer.
    pub fn create_join_token(&self, ttl_ms: u64, description: &str) -> Result<(String, JoinToken), RootError> {
        let pin = self.authority.pin();
        let (whole, t) = self.authority.tokens.create(&pin, ttl_ms, description).map_err(RootError::Internal)?;
        self.publish_token(&t.id)?;
        Ok((whole, t))
    }

    /// A replicated root: the token's file as it is here now goes to the store, so every replica has it
    /// (the store is the CA directory's source of truth, see [`super::ca_sync`]).
    fn publish_token(&self, id: &str) -> Result<(), RootError> {
        if self.ha.is_none() {
            return Ok(());
        }
        let dir = self.cfg.data_dir.join("ca");
        super::ca_sync::publish(&self.store, &dir, &format!("join-tokens/{id}.json")).map_err(RootError::Internal)
    }

    /// Every join token (without hashes).
    pub fn join_tokens(&self) -> Result<Vec<JoinToken>, RootError> {
        self.authority.tokens.list().map_err(RootError::Internal)
    }

    /// Revokes join token `id` (clusters that joined with it keep their certificates).
    pub fn revoke_join_token(&self, id: &str) -> Result<(), RootError> {
        match self.authority.tokens.revoke(id) {
            Ok(true) => self.publish_token(id),
            Ok(false) => Err(RootError::NotFound(format!("join token {id}"))),
            Err(e) => Err(RootError::Internal(e)),
        }
    }
}

impl Registrar for super::Root {
    fn kinds(&self) -> &'static [&'static str] {
        &["cluster"]
    }

    /// A new cluster: its record (with the name it gave) and a new id.
    fn admit(&self, _kind: &str, name: &str, token_id: &str) -> Result<String, Status> {
        let id = store::new_id();
        let rec = ClusterRecord {
            cluster_id: id.clone(),
            cluster_name: name.into(),
            registered_ms: oak_proto::now_ms(),
            joined_with: token_id.into(),
            ..Default::default()
        };
        self.store
            .update(|tx| tx.put(CLUSTERS, &id, &rec))
            .map_err(|e| Status::internal(format!("recording the cluster: {e:#}")))?;
        Ok(id)
    }
}
