//! One datapath's rounds of measurements beside plain veth's, and the rows the report prints.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::cpus::{allowed_cpus, placements, Placement, Side};
use super::iperf::{iperf_logged, iperf_pair, Iperf};
use super::rr::{can_connect, rr_client, rr_pair, rr_server, RrEnd};
use super::world::{check_interrupted, wait_for, Ns, World};
use super::{Args, Layout, PLAIN, RR_PORT};

/// One datapath's figures in one CPU layout: a line of the report.
#[derive(Clone, Debug)]
pub(super) struct Row {
    pub(super) name: &'static str,
    pub(super) layout: Layout,
    pub(super) one: Option<f64>,
    pub(super) eight: Option<f64>,
    pub(super) p50: Option<f64>,
    pub(super) p99: Option<f64>,
    /// Every round's figures (1-stream, 8-stream, p50, p99), for the spread.
    pub(super) all: [Vec<f64>; 4],
    /// Per measure, the median over the rounds of this datapath's figure divided by plain veth's, measured
    /// beside it in the same round (None for plain veth itself, or when no round has both).
    pub(super) ratio: [Option<f64>; 4],
    pub(super) note: String,
}

/// The median (the mean of the middle two for an even count); None when nothing was measured.
pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

/// The median of `x[i] / base[i]` over the rounds where both were measured.
pub(super) fn paired_ratio(x: &[Option<f64>], base: &[Option<f64>]) -> Option<f64> {
    median(x.iter().zip(base).filter_map(|(x, b)| Some(x.as_ref()? / b.filter(|b| *b > 0.0)?)).collect())
}

/// Plain veth, the baseline: a veth pair of its own between the two worker namespaces (nothing attached to
/// it, no NetManager uses it), with iperf3 -s and the ping-pong server running in worker B for the whole run.
/// Each other datapath's iperf3 runs are preceded by plain veth's, in the same round and CPU layout, and
/// their ping-pongs are interleaved with plain veth's (`rr_pair`), so each ratio compares figures taken
/// seconds apart: this machine's speed drifts over seconds to minutes.
pub(super) struct Plain {
    pub(super) client: Ns,
    pub(super) server: Ns,
    pub(super) ip: Ipv4Addr,
    /// The CPUs its ping-pong server serves the next connection on.
    pub(super) rr_cpus: Arc<Mutex<Vec<usize>>>,
    /// Per placement: every plain veth figure of the run (1-stream, 8-stream, p50, p99).
    pub(super) all: Vec<[Vec<f64>; 4]>,
}

/// The three measurements from `client` (on worker A) to `server_ip`, with iperf3 -s and the ping-pong server
/// in `server` (on worker B): one row per placement, every round measuring each placement in turn, and
/// beside each measurement the same one over plain veth (`plain`; None measures this datapath alone).
#[allow(clippy::too_many_arguments)]
pub(super) fn measure(
    w: &mut World,
    a: &Args,
    places: &[Placement],
    name: &'static str,
    client: &Ns,
    server: &Ns,
    server_ip: Ipv4Addr,
    mut plain: Option<&mut Plain>,
) -> anyhow::Result<Vec<Row>> {
    check_interrupted()?;
    let mut errs = Vec::new();
    let tag = format!("iperf3-server-{}", name.split_whitespace().next().unwrap_or("x"));
    match w.spawn(&tag, server.cmd("iperf3").arg("-s")) {
        Ok(pid) => w.placed.push((pid, Side::B)),
        Err(e) => errs.push(format!("{e:#}")),
    }
    let stop = Arc::new(AtomicBool::new(false));
    w.stops.push(stop.clone());
    let rr_cpus = Arc::new(Mutex::new(allowed_cpus()));
    let server_thread = match rr_server(&server.path(), a.rr_bytes, stop.clone(), rr_cpus.clone()) {
        Ok(h) => Some(h),
        Err(e) => {
            errs.push(format!("ping-pong server: {e:#}"));
            None
        }
    };
    // reachable (for the overlays: the first connection resolves the service IP), iperf3 server up
    if let Err(e) = wait_for(&format!("{name}: {server_ip}:{RR_PORT} reachable"), Duration::from_secs(30), || {
        can_connect(&client.path(), server_ip, RR_PORT)
    }) {
        errs.push(format!("{e:#}"));
    }
    let _ = wait_for(&format!("{name}: iperf3 server up"), Duration::from_secs(10), || {
        can_connect(&client.path(), server_ip, 5201)
    });
    // per placement and measure (1-stream, 8-stream, p50, p99): this datapath's figure and plain veth's
    // of the same round (None: failed or not measured)
    let mut own: Vec<[Vec<Option<f64>>; 4]> = places.iter().map(|_| Default::default()).collect();
    let mut base: Vec<[Vec<Option<f64>>; 4]> = places.iter().map(|_| Default::default()).collect();
    let note_err = |errs: &mut Vec<String>, e: anyhow::Error| {
        eprintln!("      {e:#}");
        errs.push(format!("{e:#}"));
    };
    for round in 1..=a.rounds.max(1) {
        for (i, p) in places.iter().enumerate() {
            check_interrupted()?;
            w.apply(p)?;
            *rr_cpus.lock() = p.b.clone();
            if let Some(pl) = plain.as_deref() {
                *pl.rr_cpus.lock() = p.b.clone();
            }
            eprintln!("    round {round}/{}, {} layout", a.rounds.max(1), p.layout);
            for (streams, slot) in [(1, 0), (8, 1)] {
                check_interrupted()?;
                let how = Iperf { secs: a.seconds, streams, cc: &a.congestion, cpus: &p.a };
                let (rb, r) = match plain.as_deref() {
                    Some(pl) => {
                        let (rb, r) = iperf_pair(name, (&pl.client, pl.ip), (client, server_ip), how)?;
                        (Some(rb), r)
                    }
                    None => (None, iperf_logged(name, client, server_ip, how)),
                };
                if let Some(rb) = rb {
                    base[i][slot].push(rb.as_ref().ok().copied());
                    if let Err(e) = rb {
                        note_err(&mut errs, e.context("plain veth"));
                    }
                }
                own[i][slot].push(r.as_ref().ok().copied());
                if let Err(e) = r {
                    note_err(&mut errs, e);
                }
            }
            check_interrupted()?;
            let (rb, r) = match plain.as_deref() {
                Some(pl) => {
                    let base = RrEnd { client_ns: &pl.client.path(), server_ns: &pl.server.path(), to: pl.ip };
                    let own = RrEnd { client_ns: &client.path(), server_ns: &server.path(), to: server_ip };
                    let (rb, r) = rr_pair(base, own, a.rr_bytes, a.round_trips, &p.a, &p.b);
                    (Some(rb), r)
                }
                None => (None, rr_client(&client.path(), server_ip, a.rr_bytes, a.round_trips, &p.a)),
            };
            if let Some(rb) = rb {
                if let Ok((p50, p99)) = rb {
                    eprintln!(
                        "      {PLAIN}: ping-pong {} x {} B: p50 {p50:.1} µs, p99 {p99:.1} µs",
                        a.round_trips, a.rr_bytes
                    );
                }
                base[i][2].push(rb.as_ref().ok().map(|r| r.0));
                base[i][3].push(rb.as_ref().ok().map(|r| r.1));
                if let Err(e) = rb {
                    note_err(&mut errs, e.context("plain veth ping-pong"));
                }
            }
            match &r {
                Ok((p50, p99)) => eprintln!(
                    "      {name}: ping-pong {} x {} B: p50 {p50:.1} µs, p99 {p99:.1} µs",
                    a.round_trips, a.rr_bytes
                ),
                Err(e) => eprintln!("      {name}: ping-pong failed: {e:#}"),
            }
            own[i][2].push(r.as_ref().ok().map(|r| r.0));
            own[i][3].push(r.as_ref().ok().map(|r| r.1));
            if let Err(e) = r {
                errs.push(format!("ping-pong: {e:#}"));
            }
        }
    }
    w.stop_proc(&tag);
    stop.store(true, Ordering::Relaxed);
    if let Some(h) = server_thread {
        let _ = h.join();
    }
    // leave everything free to run anywhere between measurements (and while held)
    if let Some(shared) = placements(&[Layout::Shared]).first() {
        w.apply(shared)?;
    }
    if let Some(pl) = plain.as_deref_mut() {
        for (acc, b) in pl.all.iter_mut().zip(&base) {
            for k in 0..4 {
                acc[k].extend(b[k].iter().flatten());
            }
        }
    }
    let note = errs.join("; ");
    let paired = plain.is_some();
    Ok(places
        .iter()
        .zip(own.iter().zip(&base))
        .map(|(p, (own, base))| {
            let all: [Vec<f64>; 4] = std::array::from_fn(|k| own[k].iter().flatten().copied().collect());
            let ratio: [Option<f64>; 4] =
                std::array::from_fn(|k| if paired { paired_ratio(&own[k], &base[k]) } else { None });
            Row {
                name,
                layout: p.layout,
                one: median(all[0].clone()),
                eight: median(all[1].clone()),
                p50: median(all[2].clone()),
                p99: median(all[3].clone()),
                all,
                ratio,
                note: note.clone(),
            }
        })
        .collect())
}

/// The plain veth rows (every plain veth figure of the run, per placement) followed by `rows`.
pub(super) fn with_plain(pl: &Plain, places: &[Placement], rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = places
        .iter()
        .zip(&pl.all)
        .map(|(p, all)| Row {
            name: PLAIN,
            layout: p.layout,
            one: median(all[0].clone()),
            eight: median(all[1].clone()),
            p50: median(all[2].clone()),
            p99: median(all[3].clone()),
            all: all.clone(),
            ratio: [None; 4],
            note: String::new(),
        })
        .collect();
    out.extend_from_slice(rows);
    out
}

#[cfg(test)]
mod tests {
    use super::{median, paired_ratio};

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn paired_ratios() {
        // each round's figure over the baseline of the same round; rounds without both are left out
        assert_eq!(paired_ratio(&[Some(9.0), Some(8.0), Some(1.0)], &[Some(10.0), Some(10.0), Some(2.0)]), Some(0.8));
        assert_eq!(paired_ratio(&[Some(9.0), None, Some(4.0)], &[Some(10.0), Some(10.0), None]), Some(0.9));
        assert_eq!(paired_ratio(&[Some(9.0)], &[Some(0.0)]), None);
        assert_eq!(paired_ratio(&[], &[]), None);
    }
}
