//! Password checks on one dedicated thread with one reusable Argon2 memory. However many logins arrive at
//! once, one hash runs at a time and the memory it needs (19 MiB with the default parameters) is allocated
//! once, so a burst of logins cannot grow the root's memory; requests wait in a bounded queue and are
//! refused ([`Busy`]) when it is full.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;

/// How many checks may wait for the hashing thread.
pub const QUEUE: usize = 8;

/// The queue of password checks is full (or the hashing thread is gone).
#[derive(Debug, thiserror::Error)]
#[error("too many password checks in progress ({QUEUE} waiting); retry shortly")]
pub struct Busy;

enum Job {
    /// Does the password match the PHC string? (`None`: no such user, checked against a dummy hash so the
    /// answer takes as long as for a real one.)
    Verify { password: String, hash: Option<String>, reply: oneshot::Sender<bool> },
    /// A new PHC string for the password.
    Hash { password: String, reply: oneshot::Sender<Result<String, String>> },
}

/// Handle to the hashing thread; cheap to clone.
#[derive(Clone)]
pub struct Passwords {
    tx: SyncSender<Job>,
}

impl Passwords {
    /// Starts the hashing thread (it ends when every handle is dropped).
    pub fn start() -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new().name("oak-passwords".into()).spawn(move || work(rx))?;
        Ok(Self { tx })
    }

    fn submit(&self, job: Job) -> Result<(), Busy> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) | TrySendError::Disconnected(_) => Busy,
        })
    }

    /// Whether `password` matches the stored PHC string `hash` (`None`: unknown user, always false).
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Busy> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Verify { password, hash, reply })?;
        rx.await.map_err(|_| Busy)
    }

    /// A new PHC string (Argon2id, default parameters, random salt) for `password`.
    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Hash { password, reply })?;
        rx.await.map_err(|_| Busy)?.map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
    }
}

fn work(rx: Receiver<Job>) {
    let mut blocks: Vec<Block> = Vec::new();
    let mut dummy: Option<String> = None;
    for job in rx {
        match job {
            Job::Verify { password, hash, reply } => {
                let ok = match hash {
                    Some(h) => verify_with(&password, &h, &mut blocks),
                    None => {
                        let d = dummy.get_or_insert_with(|| hash_password("oak-dummy").unwrap_or_default());
                        verify_with(&password, d, &mut blocks);
                        false
                    }
                };
                let _ = reply.send(ok);
            }
            Job::Hash { password, reply } => {
                let _ = reply.send(hash_password(&password));
            }
        }
    }
}

/// A PHC string for `password` (Argon2id, default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| format!("salt: {e}"))?;
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt).map_err(|e| e.to_string())?.to_string())
}

/// Checks `password` against a PHC string, hashing into `blocks` (grown once to the size the parameters
/// ask for, then reused). Compared in constant time.
fn verify_with(password: &str, phc: &str, blocks: &mut Vec<Block>) -> bool {
    let Ok(h) = PasswordHash::new(phc) else { return false };
    let (Ok(alg), Ok(params)) = (Algorithm::try_from(h.algorithm), Params::try_from(&h)) else { return false };
    let version = match h.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else { return false };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let need = params.block_count();
    if blocks.len() < need {
        blocks.resize(need, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(alg, version, params);
    if argon.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks[..need]).is_err() {
        return false;
    }
    Output::new(&out).is_ok_and(|o| o == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_hashes_from_the_pool_and_from_the_standard_hasher() {
        let p = Passwords::start().unwrap();
        let h = p.hash("s3cret".into()).await.unwrap();
        assert!(p.verify("s3cret".into(), Some(h.clone())).await.unwrap());
        assert!(!p.verify("s3cres".into(), Some(h)).await.unwrap());
        // a hash made by argon2's own verifier's counterpart is read the same way
        let std_hash = hash_password("other").unwrap();
        assert!(p.verify("other".into(), Some(std_hash)).await.unwrap());
        assert!(!p.verify("other".into(), None).await.unwrap(), "an unknown user never matches");
        assert!(!p.verify("x".into(), Some("not a phc string".into())).await.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_not_grown() {
        let p = Passwords::start().unwrap();
        let h = hash_password("pw").unwrap();
        let tries: Vec<_> = (0..QUEUE * 4).map(|_| p.verify("wrong".into(), Some(h.clone()))).collect();
        let answers = futures::future::join_all(tries).await;
        let busy = answers.iter().filter(|a| a.is_err()).count();
        assert!(busy > 0, "{} checks at once must overflow a queue of {QUEUE}", QUEUE * 4);
        assert!(answers.iter().all(|a| matches!(a, Ok(false) | Err(Busy))));
    }
}
