//! The processes a control-plane run starts (killed when dropped), waiting with progress, and what
//! `/proc` says about them: CPU time and resident memory.
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// USER_HZ: the unit of the CPU times in `/proc/<pid>/stat` (100 on Linux, whatever the kernel's HZ).
const USER_HZ: f64 = 100.0;

pub struct Procs {
    list: Vec<(String, Child)>,
    /// Started without TLS on their gRPC links.
    pub plaintext: bool,
    /// Where each process's log goes (`<name>.log`).
    pub logs: std::path::PathBuf,
}

impl Procs {
    pub fn new(logs: &Path, plaintext: bool) -> Self {
        Self { list: Vec::new(), plaintext, logs: logs.to_path_buf() }
    }

    /// Starts `bin` with the bench's join tokens (and without TLS when `plaintext`); its output goes to
    /// `<logs>/<name>.log`. Returns its pid.
    pub fn spawn(&mut self, name: &str, bin: &Path, args: &[String], env: &[(&str, &str)]) -> anyhow::Result<u32> {
        let log = fs::File::create(self.logs.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).env("RUST_LOG", "warn");
        // the bench's roots and clusters share one join token
        cmd.env("OAK_CLUSTER_TOKEN", testbed::JOIN_TOKEN).env("OAK_WORKER_TOKEN", testbed::WORKER_TOKEN);
        if self.plaintext {
            cmd.env(oak_trust::PLAINTEXT_ENV, "1");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        self.list.push((name.to_string(), child));
        Ok(pid)
    }

    /// Fails naming the first process that has exited (and where its log is).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.list {
            if let Some(st) = c.try_wait()? {
                bail!("{name} exited ({st}); its log: {}", self.logs.join(format!("{name}.log")).display());
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        // the sim workers first (the last started), so the clusters see no storm of reconnects
        for (_, c) in self.list.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` every 50 ms until it holds, printing a progress line every 5 s; fails after `timeout`.
/// Returns how long it took.
pub fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut note = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        if note.elapsed() > Duration::from_secs(5) {
            eprintln!("    still waiting for {what} ({:.0} s)", t.elapsed().as_secs_f64());
            note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t.elapsed();
    eprintln!("    {what}: {:.1} s", took.as_secs_f64());
    Ok(took)
}

/// utime + stime (clock ticks) from the text of a `/proc/<pid>/stat`. The command name, in parentheses,
/// may hold spaces and parentheses itself, so the fields are counted after its last `)`.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // after the command: state(0) ppid(1) ... utime(11) stime(12)
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU seconds process `pid` has used (all its threads); 0 when it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(stat_ticks).unwrap_or(0) as f64 / USER_HZ
}

/// CPU use of a set of processes over a window: started with their CPU times now.
pub struct CpuWindow {
    start: Instant,
    at_start: Vec<(u32, f64)>,
}

impl CpuWindow {
    pub fn start(pids: &[u32]) -> Self {
        Self { start: Instant::now(), at_start: pids.iter().map(|&p| (p, cpu_seconds(p))).collect() }
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Each process's CPU seconds since the start, in the order given.
    pub fn used(&self) -> Vec<f64> {
        self.at_start.iter().map(|&(p, s)| (cpu_seconds(p) - s).max(0.0)).collect()
    }
}

/// Percent of one core: `cpu_s` CPU seconds over `wall_s` seconds.
pub fn percent(cpu_s: f64, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        cpu_s / wall_s * 100.0
    } else {
        f64::NAN
    }
}

/// The soft and hard limits on open files from the text of `/proc/<pid>/limits`.
pub fn nofile_limits(limits: &str) -> Option<(u64, u64)> {
    let l = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let f: Vec<&str> = l["Max open files".len()..].split_whitespace().collect();
    let num = |s: &str| if s == "unlimited" { Some(u64::MAX) } else { s.parse().ok() };
    Some((num(f.first()?)?, num(f.get(1)?)?))
}

/// Raises this process's open-file limit (inherited by everything it starts) to at least `want`: a
/// cluster holds a connection per worker, a simulator process one per simulated worker. The soft limit
/// goes up to the hard one; the hard one only where this process may raise it.
pub fn raise_nofile(want: u64) {
    let Some((soft, hard)) = fs::read_to_string("/proc/self/limits").ok().as_deref().and_then(nofile_limits) else {
        return;
    };
    if soft >= want {
        return;
    }
    let set = |soft: u64, hard: u64| {
        Command::new("prlimit")
            .args(["--pid", &std::process::id().to_string(), &format!("--nofile={soft}:{hard}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if hard >= want && set(want, hard) || hard < want && set(want, want) {
        return;
    }
    if soft < hard && set(hard, hard) {
        eprintln!("    warning: open files limited to {hard} (wanted {want}); large runs may fail");
        return;
    }
    eprintln!("    warning: could not raise the open-file limit {soft} to {want}; large runs may fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        // a command name holding spaces and a ')' of its own
        let stat = "4242 (tokio rt) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 1500 250 0 0 20 0 9 0 100 \
                    123456789 4321 18446744073709551615 1 1 0 0 0 0 0 4096 17663 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_ticks(stat), Some(1750));
        assert_eq!(stat_ticks("4242 (short"), None);
        assert_eq!(stat_ticks("4242 (x) S 1 2"), None);
        assert_eq!(stat_ticks(""), None);
    }

    #[test]
    fn own_cpu_time_is_read() {
        // spin a little so there is something to count
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_seconds(std::process::id()) > 0.0);
        assert_eq!(cpu_seconds(u32::MAX), 0.0, "a process that is gone used nothing");
    }

    #[test]
    fn percent_of_one_core() {
        assert_eq!(percent(1.5, 10.0), 15.0);
        assert!(percent(1.0, 0.0).is_nan());
    }

    #[test]
    fn open_file_limits_are_parsed() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(nofile_limits(limits), Some((1024, 524288)));
        let unlimited = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(nofile_limits(unlimited), Some((u64::MAX, u64::MAX)));
        assert_eq!(nofile_limits("Max processes 1 2 processes\n"), None);
    }
}
