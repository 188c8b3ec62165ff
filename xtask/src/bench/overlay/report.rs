//! The tables, the spread of the rounds and the targets, printed at the end of a run.

use std::fs;
use std::time::{Duration, Instant};

use super::measure::Row;
use super::world::check_interrupted;
use super::{Args, Layout, EBPF, ROUTED, TUN, VXLAN};

/// With --hold: waits for Ctrl-C, leaving everything up for inspection.
pub(super) fn hold(a: &Args, what: &str) {
    if a.hold {
        eprintln!("holding (Ctrl-C cleans up): {what}");
        while check_interrupted().is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The 1-minute load average and the CPU count (the numbers depend on what else runs on the machine).
pub(super) fn loadavg() -> String {
    let l = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{} (on {cpus} CPUs)", l.split_whitespace().next().unwrap_or("?"))
}

pub(super) fn report(rows: &[Row], a: &Args, verdict: Option<&str>, load_start: &str, t0: Instant) {
    println!();
    println!(
        "overlay datapaths: 2 worker namespaces on a veth underlay; medians of {} rounds of iperf3 TCP ({}) {} s and ping-pong {} x {} B on one connection",
        a.rounds.max(1),
        a.congestion,
        a.seconds,
        a.round_trips,
        a.rr_bytes
    );
    println!(
        "1-min load average: {load_start} at the start, {} at the end; {:.0} s so far",
        loadavg(),
        t0.elapsed().as_secs_f64()
    );
    let mut layouts: Vec<Layout> = Vec::new();
    for r in rows {
        if !layouts.contains(&r.layout) {
            layouts.push(r.layout);
        }
    }
    for layout in layouts {
        let of: Vec<&Row> = rows.iter().filter(|r| r.layout == layout).collect();
        table(&of, layout);
    }
    if let Some(v) = verdict {
        println!();
        println!("eBPF run: {v}");
    }
}

/// One layout's table, its notes and its targets (`rows[0]` is plain veth, the baseline).
pub(super) fn table(rows: &[&Row], layout: Layout) {
    let f = |v: Option<f64>, prec: usize| v.map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "failed".into());
    let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into());
    let base = rows[0];
    println!();
    match layout {
        Layout::Hosts => println!("hosts layout: each worker on its own CPUs, received packets processed on the receiver's CPUs (as two machines)"),
        Layout::Shared => println!("shared layout: every process on every CPU, a veth's receiving side on the sender's CPU (as workers sharing one machine)"),
    }
    println!(
        "{:<16} | {:>15} | {:>15} | {:>15} | {:>15}",
        "datapath", "1-stream Gbit/s", "8-stream Gbit/s", "RR p50 µs", "RR p99 µs"
    );
    println!("{}", "-".repeat(16 + 4 * 18));
    for r in rows {
        let cell = |v: Option<f64>, k: usize, prec: usize| {
            if std::ptr::eq(*r, base) {
                f(v, prec)
            } else {
                format!("{} ({})", f(v, prec), ratio(r.ratio[k]))
            }
        };
        println!(
            "{:<16} | {:>15} | {:>15} | {:>15} | {:>15}",
            r.name,
            cell(r.one, 0, 2),
            cell(r.eight, 1, 2),
            cell(r.p50, 2, 1),
            cell(r.p99, 3, 1)
        );
    }
    println!(
        "(ratios: the median over the rounds of the datapath's figure / plain veth's measured beside it in the same"
    );
    println!(" round; for latency lower is better. Plain veth's row: all its measurements of the run)");
    println!("spread (lowest-highest of the rounds):");
    for r in rows {
        let span = |v: &Vec<f64>, prec: usize| match (
            v.iter().cloned().reduce(f64::min),
            v.iter().cloned().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) => format!("{lo:.prec$}-{hi:.prec$}"),
            _ => "-".into(),
        };
        println!(
            "{:<16} | {:>15} | {:>15} | {:>15} | {:>15}",
            r.name,
            span(&r.all[0], 2),
            span(&r.all[1], 2),
            span(&r.all[2], 1),
            span(&r.all[3], 1)
        );
    }
    for r in rows {
        if !r.note.is_empty() {
            println!("note {}: {}", r.name, r.note);
        }
    }
    let row = |n: &str| rows.iter().find(|r| r.name == n);
    let (vx, tun, eb) = (row(VXLAN), row(TUN), row(EBPF));
    let mut checks: Vec<(String, Option<bool>)> = Vec::new();
    // against plain veth: the paired ratios; eBPF against VXLAN (measured minutes apart): their ratios
    let ge = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(x >= y),
        _ => None,
    };
    if let Some(tun) = tun {
        checks.push(("tun   1-stream >= 0.5x veth".into(), ge(tun.ratio[0], Some(0.5))));
    }
    if let Some(eb) = eb {
        checks.push(("eBPF  1-stream >= 0.9x veth".into(), ge(eb.ratio[0], Some(0.9))));
        checks.push(("eBPF  8-stream >= 0.9x veth".into(), ge(eb.ratio[1], Some(0.9))));
        checks.push(("eBPF  RR p50 <= 1.15x veth".into(), ge(Some(1.15), eb.ratio[2])));
        if let Some(vx) = vx {
            checks.push(("eBPF  1-stream > kernel VXLAN".into(), ge(eb.ratio[0], vx.ratio[0])));
            checks.push(("eBPF  8-stream > kernel VXLAN".into(), ge(eb.ratio[1], vx.ratio[1])));
            checks.push(("eBPF  RR p50 < kernel VXLAN".into(), ge(vx.ratio[2], eb.ratio[2])));
        }
    }
    println!("targets ({layout} layout):");
    for (what, ok) in checks {
        let mark = match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "MISSED (no measurement)",
        };
        println!("  {what:<32} {mark}");
    }
    // not a target: how the fast path compares with the kernel's own routing of the same topology
    if let (Some(eb), Some(rt)) = (eb, row(ROUTED)) {
        let cmp = |x: Option<f64>, y: Option<f64>, higher_better: bool| match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => {
                format!("{:.2}x{}", x / y, if (x >= y) == higher_better { "" } else { " (behind)" })
            }
            _ => "-".into(),
        };
        println!(
            "eBPF against routed, no overlay: 1-stream {}, 8-stream {}, RR p50 {}",
            cmp(eb.ratio[0], rt.ratio[0], true),
            cmp(eb.ratio[1], rt.ratio[1], true),
            cmp(eb.ratio[2], rt.ratio[2], false)
        );
    }
}
