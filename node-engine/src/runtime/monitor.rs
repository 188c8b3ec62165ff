//! Monitor: waits for an instance to end and reports how (COMPLETED, DEAD, FAILED with the exit
//! code, the signal or the OOM kill), unless it is being undeployed.

use std::sync::Arc;
use std::time::Duration;

use oak_proto::{instance_key, InstanceState};
use tracing::warn;

use super::backend::{Backend, Exit};
use super::Runtime;

impl Runtime {
    /// Watches instance `id` on `backend` in the background.
    pub(super) fn spawn_monitor(self: &Arc<Self>, backend: Arc<dyn Backend>, service_id: String, n: u32, id: String) {
        let me = self.clone();
        tokio::spawn(async move { me.monitor(backend, service_id, n, id).await });
    }

    async fn monitor(self: Arc<Self>, backend: Arc<dyn Backend>, service_id: String, n: u32, id: String) {
        let mut backoff = Duration::from_millis(500);
        let exit = loop {
            match backend.wait(&id).await {
                Ok(exit) => break exit,
                Err(e) => {
                    if self.is_undeploying(&service_id, n) {
                        return;
                    }
                    warn!(instance = %id, error = %format!("{e:#}"), "waiting on the instance failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        match exit {
            Exit::Code(code) => self.report_exit(backend.as_ref(), &service_id, n, &id, code),
            Exit::Ended { state, detail, exit_code } => {
                if !self.is_undeploying(&service_id, n) {
                    self.emit(&service_id, n, state, detail, exit_code);
                }
            }
        }
    }

    /// Reports the end of instance `id` with exit status `code`.
    pub(super) fn report_exit(&self, backend: &dyn Backend, service_id: &str, n: u32, id: &str, code: u32) {
        let (undeploying, one_shot, memory_mb) = {
            let map = self.instances.lock();
            match map.get(&instance_key(service_id, n)) {
                Some(i) if i.id == id => (i.undeploying, i.one_shot, i.memory_mb),
                _ => return,
            }
        };
        if undeploying {
            return;
        }
        let oom_kills = backend.oom_kills(id);
        let (state, detail) = exit_report(code, one_shot, memory_mb, oom_kills);
        self.emit(service_id, n, state, detail, Some(code as i32));
    }
}

/// The state and detail for an exit status: OOM kills (counted, or a SIGKILL under a memory limit
/// when they cannot be counted) first, then a one-shot's success, a service's unexpected end, a
/// signal, an error code.
fn exit_report(code: u32, one_shot: bool, memory_mb: u64, oom_kills: Option<u64>) -> (InstanceState, String) {
    let ooms = oom_kills.unwrap_or(0);
    if ooms > 0 || (code == 137 && memory_mb > 0 && oom_kills.is_none()) {
        let certain = if ooms > 0 { "OOM-killed" } else { "killed (SIGKILL), probably OOM" };
        (InstanceState::Failed, format!("{certain}: memory limit exceeded ({memory_mb} MB), exit code {code}"))
    } else if code == 0 && one_shot {
        (InstanceState::Completed, "one-shot instance exited with code 0".into())
    } else if code == 0 {
        (InstanceState::Dead, "exited with code 0 although the service is not one_shot".into())
    } else if code > 128 {
        (InstanceState::Failed, format!("killed by signal {} (exit code {code})", code - 128))
    } else {
        (InstanceState::Failed, format!("exited with code {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_classified() {
        let failed = |d: &str| (InstanceState::Failed, d.to_string());
        assert_eq!(exit_report(0, true, 0, Some(0)).0, InstanceState::Completed);
        assert_eq!(exit_report(0, false, 0, Some(0)).0, InstanceState::Dead);
        assert_eq!(exit_report(3, false, 0, Some(0)), failed("exited with code 3"));
        assert_eq!(exit_report(137, false, 0, Some(0)), failed("killed by signal 9 (exit code 137)"));
        assert_eq!(
            exit_report(137, false, 16, Some(1)),
            failed("OOM-killed: memory limit exceeded (16 MB), exit code 137")
        );
        let probably = "killed (SIGKILL), probably OOM: memory limit exceeded (16 MB), exit code 137";
        assert_eq!(exit_report(137, false, 16, None), failed(probably));
    }
}
