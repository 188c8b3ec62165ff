//! Packets queued for the tun and written in batches, GRO-coalesced into super-packets when the tun takes
//! virtio headers. Each direction of the datapath has its own queue.

use super::counters::{Counters, Event, Reason};
use super::BATCH;

/// Room in front of packets queued for the tun (the virtio-net header goes there with offloads).
const VOFF: usize = 16;

/// Packets queued for the tun (VOFF bytes of room + packet), written GRO-coalesced by `flush`.
pub struct TunOut {
    gro: tun_rs::GROTable,
    out: Vec<Vec<u8>>,
    nout: usize,
}

impl Default for TunOut {
    fn default() -> Self {
        Self::new()
    }
}

impl TunOut {
    pub fn new() -> Self {
        Self { gro: tun_rs::GROTable::new(), out: Vec::new(), nout: 0 }
    }

    /// Queue a packet; true when the queue is full and should be flushed.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        if self.nout == self.out.len() {
            // GRO appends coalesced payloads in place: room for a 64 KiB super-packet
            self.out.push(Vec::with_capacity(VOFF + 65536));
        }
        let b = &mut self.out[self.nout];
        b.clear();
        b.resize(VOFF, 0);
        b.extend_from_slice(pkt);
        self.nout += 1;
        self.nout >= BATCH
    }

    /// Write the queued packets into the tun (coalesced into super-packets when offloads are on).
    pub async fn flush(&mut self, tun: &tun_rs::AsyncDevice, counters: &Counters) {
        if self.nout == 0 {
            return;
        }
        let n = self.nout;
        self.nout = 0;
        match tun.send_multiple(&mut self.gro, &mut self.out[..n], VOFF).await {
            Ok(_) => counters.add(Event::TunTx, n as u64),
            Err(e) => {
                tracing::debug!(error = %e, "writing into the tun");
                for _ in 0..n {
                    counters.drop_packet(Reason::TunWriteError);
                }
            }
        }
    }
}
