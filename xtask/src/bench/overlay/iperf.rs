//! TCP throughput by iperf3: one run, and a datapath's runs alternated with plain veth's.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::Value;

use super::measure::median;
use super::world::{check_interrupted, Ns};
use super::PLAIN;

/// How iperf3 runs: for `secs` seconds, `streams` parallel streams, congestion control `cc`, the client on
/// `cpus`.
#[derive(Clone, Copy)]
pub(super) struct Iperf<'a> {
    pub(super) secs: u32,
    pub(super) streams: u32,
    pub(super) cc: &'a str,
    pub(super) cpus: &'a [usize],
}

/// One iperf3 TCP run `how` from `client` to `server`; bits/s received and the sender's retransmits.
pub(super) fn iperf(client: &Ns, server: Ipv4Addr, how: Iperf) -> anyhow::Result<(f64, u64)> {
    let Iperf { secs, streams, cc, cpus } = how;
    let mut c = Command::new("timeout");
    c.arg((secs + 30).to_string());
    let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
    c.args(["taskset", "-c", &list.join(",")]);
    let inner = client.cmd("iperf3");
    c.arg(inner.get_program());
    c.args(inner.get_args());
    c.args([
        "-c",
        &server.to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    c.args(["-C", cc]);
    let out = c.output().context("running iperf3")?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    match v["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => Ok((bps, v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0))),
        None => bail!(
            "iperf3 -P {streams} to {server} failed ({}): {} {}",
            out.status,
            v["error"].as_str().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// One datapath's throughput, logged: one iperf3 run `how`; Gbit/s.
pub(super) fn iperf_logged(label: &str, client: &Ns, server: Ipv4Addr, how: Iperf) -> anyhow::Result<f64> {
    let (bps, retrans) = iperf(client, server, how)?;
    let streams = how.streams;
    eprintln!("      {label}: iperf3 -P {streams}: {:.2} Gbit/s (retransmits {retrans})", bps / 1e9);
    Ok(bps / 1e9)
}

/// Plain veth's throughput (from `base` to `base_to`) and a datapath's (from `own` to `to`): `how.secs`
/// 1-second iperf3 runs each, alternating (plain, datapath, plain, ...), so both see the same seconds of
/// this machine (its speed changes within seconds). Each figure is the median of its runs (a slow second of the
/// machine hits one side only), in Gbit/s.
pub(super) fn iperf_pair(
    label: &str,
    (base, base_to): (&Ns, Ipv4Addr),
    (own, to): (&Ns, Ipv4Addr),
    how: Iperf,
) -> anyhow::Result<(anyhow::Result<f64>, anyhow::Result<f64>)> {
    let streams = how.streams;
    // per side: every run's (bits/s, retransmits), or why one failed
    type Runs = anyhow::Result<Vec<(f64, u64)>>;
    let (mut rb, mut ro): (Runs, Runs) = (Ok(Vec::new()), Ok(Vec::new()));
    for _ in 0..how.secs.max(1) {
        check_interrupted()?;
        for (r, ns, ip) in [(&mut rb, base, base_to), (&mut ro, own, to)] {
            if let Ok(v) = r {
                match iperf(ns, ip, Iperf { secs: 1, ..how }) {
                    Ok(x) => v.push(x),
                    Err(e) => *r = Err(e),
                }
            }
        }
    }
    let summary = |label: &str, r: Runs| -> anyhow::Result<f64> {
        let v = r?;
        let g: Vec<f64> = v.iter().map(|(b, _)| b / 1e9).collect();
        let mid = median(g.clone()).unwrap_or(0.0);
        let (lo, hi) = (g.iter().cloned().fold(f64::MAX, f64::min), g.iter().cloned().fold(0.0, f64::max));
        let retrans: u64 = v.iter().map(|(_, r)| r).sum();
        eprintln!("      {label}: iperf3 -P {streams}, {} x 1 s: median {mid:.2} Gbit/s (runs {lo:.2}-{hi:.2}, retransmits {retrans})", g.len());
        Ok(mid)
    };
    Ok((summary(PLAIN, rb), summary(label, ro)))
}
