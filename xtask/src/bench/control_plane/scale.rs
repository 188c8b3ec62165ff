//! The storm (many workers joining one cluster at once) and scale (clusters whose workers double step by
//! step) parts of the control-plane bench. Both run on the embedded store, with TLS on every gRPC link.
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use super::procs::{percent, wait, CpuWindow, Procs};
use super::table::{count, fig, mib, ratio, Table};
use super::{scratch, start_cluster, start_root, start_sim, Root, Store};
use crate::bench::stats::rss_kb;
use crate::util::step;

/// Polls the root every 100 ms until it shows `want` active workers in all, calling `sample` each time
/// and printing progress every 5 s; fails when a process exits or after `timeout`. Returns how long it
/// took.
fn until_active(
    procs: &mut Procs,
    root: &Root,
    want: u64,
    timeout: Duration,
    mut sample: impl FnMut(),
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut note = Instant::now();
    loop {
        sample();
        let n = root.active().map_or(0, |(_, n)| n);
        if n >= want {
            return Ok(t.elapsed());
        }
        procs.check_alive()?;
        if t.elapsed() > timeout {
            bail!("only {n} of {want} workers active after {timeout:?}");
        }
        if note.elapsed() > Duration::from_secs(5) {
            eprintln!("    {} / {} workers active ({:.0} s)", count(n), count(want), t.elapsed().as_secs_f64());
            note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `workers` simulated workers (one process) join one cluster at once: time until the root shows them all
/// active, against one worker joining alone first; the cluster's RSS and CPU meanwhile.
pub(super) fn storm(bins: &Path, p: u16, workers: u32) -> anyhow::Result<String> {
    let work = scratch("storm")?;
    let mut procs = Procs::new(&work, false);
    // clusters report their workers every 250 ms here, so the root sees a join within a quarter second
    let root = start_root(&mut procs, bins, &work, p, Store::Embedded, 250)?;
    let (cluster, wport) = start_cluster(&mut procs, bins, &work, &root, p, 0)?;
    wait("the cluster active", Duration::from_secs(60), || {
        procs.check_alive().is_err() || root.active() == Some((1, 0))
    })?;
    procs.check_alive()?;

    step("baseline: one simulated worker joining alone");
    let t = Instant::now();
    start_sim(&mut procs, bins, wport, 1, "alone")?;
    until_active(&mut procs, &root, 1, Duration::from_secs(60), || {})?;
    let alone = t.elapsed().as_secs_f64();
    eprintln!("    one worker active after {:.2} s", alone);
    let rss_before = rss_kb(cluster);

    step(&format!("{} simulated workers joining at once", count(workers.into())));
    let sim = start_sim(&mut procs, bins, wport, workers, "storm")?;
    let cpu = CpuWindow::start(&[cluster, root.pid, sim]);
    let mut peak = rss_before;
    let took = until_active(&mut procs, &root, u64::from(workers) + 1, Duration::from_secs(600), || {
        peak = peak.max(rss_kb(cluster));
    })?
    .as_secs_f64();
    let (wall, used) = (cpu.elapsed(), cpu.used());
    eprintln!("    {} workers active after {took:.2} s", count(workers.into()));
    // settled: the joins done, heartbeats only
    std::thread::sleep(Duration::from_secs(3));
    let settled = CpuWindow::start(&[cluster]);
    std::thread::sleep(Duration::from_secs(5));
    let settled_cpu = percent(settled.used()[0], settled.elapsed());
    let rss_after = rss_kb(cluster);
    procs.check_alive()?;
    drop(procs);
    let _ = fs::remove_dir_all(&work);

    let mut tab = Table::new(&["", "figure", "baseline", "ratio"]);
    tab.row([
        format!("time until all {} are active", count(workers.into())),
        fig(took, "s"),
        fig(alone, "s"),
        ratio(took, alone),
    ]);
    tab.row(["joins per second".into(), fig(f64::from(workers) / took, "/s"), String::new(), String::new()]);
    tab.row([
        "cluster RSS, peak during the storm".into(),
        mib(peak),
        mib(rss_before),
        ratio(peak as f64, rss_before as f64),
    ]);
    tab.row(["cluster RSS, after".into(), mib(rss_after), mib(rss_before), ratio(rss_after as f64, rss_before as f64)]);
    tab.row([
        "cluster CPU during the storm".into(),
        fig(percent(used[0], wall), "%"),
        format!("{:.2} s CPU", used[0]),
        String::new(),
    ]);
    tab.row(["cluster CPU after (heartbeats only)".into(), fig(settled_cpu, "%"), String::new(), String::new()]);
    tab.row(["root CPU during the storm".into(), fig(percent(used[1], wall), "%"), String::new(), String::new()]);
    tab.row([
        "simulator process CPU during the storm".into(),
        fig(percent(used[2], wall), "%"),
        String::new(),
        String::new(),
    ]);
    Ok(format!(
        "registration storm: {} simulated workers (one process) joining one cluster at once, TLS on; \
         baseline: one worker joining alone, the cluster with that one worker; CPU in % of one core \
         (2 cores = 200 %), the simulator shares the machine\n{}",
        count(workers.into()),
        tab.render()
    ))
}

/// The workers per cluster at each step: `max` halved three times, doubling up to `max` (each step above
/// zero and above the one before).
pub(super) fn doubling_steps(max: u32) -> Vec<u32> {
    let mut v: Vec<u32> = [max / 8, max / 4, max / 2, max].into_iter().filter(|&w| w > 0).collect();
    v.dedup();
    v
}

/// One step's figures.
struct Step {
    per_cluster: u32,
    /// seconds from starting the step's simulators until the root showed every worker active
    join_s: f64,
    root_rss: u64,
    root_cpu: f64,
    cluster_rss: Vec<u64>,
    /// all clusters together, % of one core
    clusters_cpu: f64,
    sims_cpu: f64,
}

/// `clusters` clusters; at each step every cluster gets more simulated workers (one simulator process per
/// cluster and step) until it has the step's count; then CPU over `window` seconds and RSS. The first row is
/// the same clusters without workers.
pub(super) fn scale(bins: &Path, p: u16, clusters: u32, max: u32, window: u64) -> anyhow::Result<String> {
    let work = scratch("scale")?;
    let mut procs = Procs::new(&work, false);
    let root = start_root(&mut procs, bins, &work, p, Store::Embedded, 1000)?;
    let mut cl = Vec::new();
    for i in 0..clusters {
        cl.push(start_cluster(&mut procs, bins, &work, &root, p, i)?);
    }
    wait(&format!("{clusters} clusters active"), Duration::from_secs(120), || {
        procs.check_alive().is_err() || root.active() == Some((clusters, 0))
    })?;
    procs.check_alive()?;
    let cluster_pids: Vec<u32> = cl.iter().map(|c| c.0).collect();
    let mut sims: Vec<u32> = Vec::new();
    let measure = |per_cluster: u32, join_s: f64, sims: &[u32]| -> Step {
        eprintln!("    measuring CPU over {window} s");
        let pids: Vec<u32> =
            [root.pid].into_iter().chain(cluster_pids.iter().copied()).chain(sims.iter().copied()).collect();
        let w = CpuWindow::start(&pids);
        std::thread::sleep(Duration::from_secs(window));
        let (wall, used) = (w.elapsed(), w.used());
        let n = cluster_pids.len();
        Step {
            per_cluster,
            join_s,
            root_rss: rss_kb(root.pid),
            root_cpu: percent(used[0], wall),
            cluster_rss: cluster_pids.iter().map(|&p| rss_kb(p)).collect(),
            clusters_cpu: percent(used[1..=n].iter().sum(), wall),
            sims_cpu: if sims.is_empty() { f64::NAN } else { percent(used[n + 1..].iter().sum(), wall) },
        }
    };
    step(&format!("{clusters} clusters without workers"));
    let mut steps = vec![measure(0, f64::NAN, &sims)];
    let mut have = 0;
    for (k, per) in doubling_steps(max).into_iter().enumerate() {
        let total = u64::from(clusters * per);
        step(&format!("step {}: {} more workers per cluster, {} workers in all", k + 1, per - have, count(total)));
        for (i, &(_, wport)) in cl.iter().enumerate() {
            sims.push(start_sim(&mut procs, bins, wport, per - have, &format!("c{i}s{k}"))?);
        }
        let join = until_active(&mut procs, &root, total, Duration::from_secs(900), || {})?;
        eprintln!("    {} workers active after {:.1} s", count(total), join.as_secs_f64());
        have = per;
        // the joins' aftermath (first reports, subnet leases) settles before the window
        std::thread::sleep(Duration::from_secs(3));
        steps.push(measure(per, join.as_secs_f64(), &sims));
        procs.check_alive()?;
    }
    let sim_rss: u64 = sims.iter().map(|&p| rss_kb(p)).sum();
    drop(procs);
    let _ = fs::remove_dir_all(&work);
    Ok(scale_table(clusters, window, &steps, sim_rss))
}

fn scale_table(clusters: u32, window: u64, steps: &[Step], sim_rss: u64) -> String {
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let mut t = Table::new(&[
        "workers",
        "per cluster",
        "all active after",
        "root RSS",
        "root CPU",
        "cluster RSS mean",
        "max",
        "x previous",
        "clusters' CPU",
        "x previous",
        "simulators' CPU",
    ]);
    let mut prev: Option<&Step> = None;
    for s in steps {
        let cm = mean(&s.cluster_rss);
        t.row([
            count(u64::from(clusters * s.per_cluster)),
            s.per_cluster.to_string(),
            if s.join_s.is_nan() { "-".into() } else { fig(s.join_s, "s") },
            mib(s.root_rss),
            fig(s.root_cpu, "%"),
            mib(cm as u64),
            mib(s.cluster_rss.iter().copied().max().unwrap_or(0)),
            prev.map_or("-".into(), |p| ratio(cm, mean(&p.cluster_rss))),
            fig(s.clusters_cpu, "%"),
            prev.map_or("-".into(), |p| ratio(s.clusters_cpu, p.clusters_cpu)),
            fig(s.sims_cpu, "%"),
        ]);
        prev = Some(s);
    }
    // memory per worker: what the last step's cluster holds above the same cluster without workers
    let per_worker = match (steps.first(), steps.last()) {
        (Some(idle), Some(last)) if last.per_cluster > 0 => {
            (mean(&last.cluster_rss) - mean(&idle.cluster_rss)) / f64::from(last.per_cluster)
        }
        _ => f64::NAN,
    };
    format!(
        "scale: {clusters} clusters, simulated workers doubling, TLS on; baseline: the same clusters without \
         workers (first row); CPU over {window} s at each step in % of one core (2 cores = 200 %; \
         clusters' and simulators' summed over all processes)\n{}\n  \
         cluster memory per worker (last step over no workers): {:.1} KiB; simulator processes at the end: {}",
        t.render(),
        per_worker,
        mib(sim_rss)
    )
}

#[cfg(test)]
mod tests {
    use super::doubling_steps;

    #[test]
    fn steps_double_up_to_the_maximum() {
        assert_eq!(doubling_steps(200), [25, 50, 100, 200]);
        assert_eq!(doubling_steps(100), [12, 25, 50, 100]);
        assert_eq!(doubling_steps(4), [1, 2, 4]);
        assert_eq!(doubling_steps(1), [1]);
        assert!(doubling_steps(0).is_empty());
    }
}
