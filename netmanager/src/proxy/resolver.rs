//! Packets to service IPs the tables do not know yet: held (a few per IP) while the cluster is asked, then
//! replayed; an IP the cluster does not know is not asked about again for a while.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::counters::{Counters, Event};
use crate::control::Control;

const HOLD_PER_IP: usize = 8;
const HOLD_IPS: usize = 256;
/// How long an unresolvable service IP is not asked about again.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// How long one resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer of the cluster: the service IP and whether it names a service with instances.
pub type Answer = (Ipv4Addr, bool);

/// The held packets and the resolutions under way.
pub struct Resolver {
    control: Option<Control>,
    counters: Arc<Counters>,
    /// Packets waiting for the resolution (with the room in front of them they were read with).
    held: HashMap<Ipv4Addr, Vec<Vec<u8>>>,
    resolving: HashSet<Ipv4Addr>,
    negative: HashMap<Ipv4Addr, Instant>,
    tx: mpsc::Sender<Answer>,
}

impl Resolver {
    /// A resolver asking `control` (None: nothing is resolved, packets are only held), and the receiver of
    /// its answers.
    pub fn new(control: Option<Control>, counters: Arc<Counters>) -> (Self, mpsc::Receiver<Answer>) {
        let (tx, rx) = mpsc::channel(64);
        let r =
            Self { control, counters, held: HashMap::new(), resolving: HashSet::new(), negative: HashMap::new(), tx };
        (r, rx)
    }

    /// Holds `frame` for service IP `ip` and asks the cluster about it (once while a question is open).
    pub fn hold(&mut self, ip: Ipv4Addr, frame: &[u8], now: Instant) {
        if self.negative.get(&ip).is_some_and(|t| now.duration_since(*t) < NEGATIVE_TTL) {
            return;
        }
        if self.held.len() < HOLD_IPS || self.held.contains_key(&ip) {
            let q = self.held.entry(ip).or_default();
            if q.len() < HOLD_PER_IP {
                q.push(frame.to_vec());
            }
        }
        let Some(control) = self.control.clone() else { return };
        if !self.resolving.insert(ip) {
            return;
        }
        self.counters.event(Event::Resolves);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let found = match tokio::time::timeout(RESOLVE_TIMEOUT, control.resolve_ip(ip)).await {
                Ok(Ok(Some(s))) => !s.instances.is_empty(),
                Ok(Ok(None)) => false,
                Ok(Err(e)) => {
                    tracing::debug!(%ip, error = %format!("{e:#}"), "resolving a service IP");
                    false
                }
                Err(_) => false,
            };
            let _ = tx.send((ip, found)).await;
        });
    }

    /// The answer about `ip` arrived: the packets held for it.
    pub fn answered(&mut self, ip: Ipv4Addr) -> Vec<Vec<u8>> {
        self.resolving.remove(&ip);
        self.held.remove(&ip).unwrap_or_default()
    }

    /// `ip` names no service: its packets are dropped for a while without asking.
    pub fn unresolvable(&mut self, ip: Ipv4Addr) {
        tracing::debug!(%ip, "service IP not resolvable");
        self.negative.insert(ip, Instant::now());
    }

    /// Forgets unresolvable IPs whose time is up.
    pub fn expire(&mut self, now: Instant) {
        self.negative.retain(|_, t| now.duration_since(*t) < NEGATIVE_TTL);
    }
}
