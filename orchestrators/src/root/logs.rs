//! Instance logs on a user's behalf: the root asks the cluster that holds the instance, which asks the
//! worker running it; the answer comes back up the same sessions, matched by request id.

use std::time::Duration;

use oak_proto::v1 as pb;

use super::auth::Identity;
use super::error::RootError;
use super::Root;

/// How long a cluster has to answer a logs request.
pub const LOGS_TIMEOUT: Duration = Duration::from_secs(5);

impl Root {
    /// Up to `max` bytes of instance `n` of `service_id`'s log from byte `offset` (negative: its end).
    pub async fn instance_logs(
        &self,
        who: &Identity,
        service_id: &str,
        n: u32,
        offset: i64,
        max: u32,
    ) -> Result<pb::LogsChunk, RootError> {
        let svc = self.service(who, service_id)?;
        let inst = svc
            .instance_list
            .iter()
            .find(|i| i.instance_number == n)
            .ok_or_else(|| RootError::NoSuchInstance(service_id.into(), n))?;
        let cid = inst.cluster_id.clone();
        if cid.is_empty() || !self.has_session(&cid) {
            return Err(RootError::Unavailable(format!(
                "instance {service_id}/{n} is on no connected cluster (status {}): no logs to ask for",
                inst.status.as_str()
            )));
        }
        let request_id = self.next_logs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending_logs.lock().insert(request_id, (cid.clone(), tx));
        let req =
            pb::LogsRequest { request_id, service_id: service_id.into(), instance_number: n, offset, max_bytes: max };
        self.send(vec![(cid.clone(), pb::RootMessage { msg: Some(pb::root_message::Msg::Logs(req)) })]);
        let answer = tokio::time::timeout(LOGS_TIMEOUT, rx).await;
        self.pending_logs.lock().remove(&request_id);
        match answer {
            Ok(Ok(c)) if c.error.is_empty() => Ok(c),
            Ok(Ok(c)) => Err(RootError::Unavailable(c.error)),
            _ => Err(RootError::Unavailable(format!(
                "cluster {} did not answer with the logs of {service_id}/{n} within {} s",
                inst.cluster_name,
                LOGS_TIMEOUT.as_secs()
            ))),
        }
    }

    /// A cluster's answer to a logs request; only the cluster that was asked may answer it.
    pub fn on_logs(&self, cluster_id: &str, c: pb::LogsChunk) {
        let mut pending = self.pending_logs.lock();
        match pending.get(&c.request_id) {
            Some((asked, _)) if asked == cluster_id => {
                if let Some((_, tx)) = pending.remove(&c.request_id) {
                    let _ = tx.send(c);
                }
            }
            Some(_) => {
                tracing::warn!(cluster_id, request_id = c.request_id, "logs answer from a cluster not asked: ignored")
            }
            None => tracing::debug!(cluster_id, request_id = c.request_id, "late logs answer ignored"),
        }
    }
}
