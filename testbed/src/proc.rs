//! A real binary running inside a host: its log, its signals, its end.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running process inside a host; killed when dropped. Its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub(crate) fn new(name: String, child: Child, log: PathBuf) -> Self {
        Self { name, child: Some(child), log }
    }

    /// Starts `cmd` with no stdin and its stdout and stderr into a new file `log`; `what` names it in an
    /// error.
    pub(crate) fn start(name: String, mut cmd: Command, log: PathBuf, what: &str) -> Result<Self> {
        let f = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self::new(name, child, log))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn signal(&self, sig: Signal) {
        if self.pid() > 0 {
            let _ = kill(Pid::from_raw(self.pid()), sig);
        }
    }

    /// SIGSTOP: the process stays, its sockets stay open, it sends nothing (a hung host).
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `grace` for the exit; returns the exit status if it exited.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (a readiness line), failing after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: no {needle:?} in its log within {timeout:?}; log:\n{}", self.name, tail(&self.output(), 40));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.thaw();
        self.kill9();
        if std::thread::panicking() {
            eprintln!("----- {} log (last 60 lines) -----\n{}", self.name, tail(&self.output(), 60));
        }
    }
}
