//! Multi-host test harness: every "host" is a network namespace joined to the others by veth pairs on one
//! bridge (itself in a namespace of its own), so a test topology touches nothing in the machine's own
//! namespace and parallel tests cannot collide. The real binaries run inside the hosts as processes;
//! the test talks to them from threads that enter a host's namespace.
//!
//! Needs root (network namespaces). [`require_root`] tells a test to skip, with the reason printed,
//! where that is missing.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// true when the test may run; otherwise prints why it is skipped.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces)");
    false
}

/// Directory of the built binaries (the one holding this test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut d = exe.parent().expect("deps dir").to_path_buf();
    if d.ends_with("deps") {
        d.pop();
    }
    d
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins, or cargo xtask test)",
        p.display()
    );
    p
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A running process inside a host; killed when dropped. Its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
    fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.pid() > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
        }
    }
    /// SIGSTOP: the process stays, its sockets stay open, it sends nothing (a hung host).
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
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
        self.signal(nix::sys::signal::Signal::SIGTERM);
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

/// One host: a network namespace with one interface on the test network.
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    logs: PathBuf,
}

impl Host {
    /// Starts `program` inside this host. Its stdout and stderr go to `<name>.log`.
    pub fn spawn(&self, name: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let log = self.logs.join(format!("{name}.log"));
        let f = File::create(&log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program).args(args);
        cmd.env("RUST_LOG", "info").env_remove("RUST_LOG_STYLE").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {} in {}", program.display(), self.ns))?;
        Ok(Proc { name: format!("{name}@{}", self.name), child: Some(child), log })
    }

    /// Runs `f` on a thread inside this host's network namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// Runs a command inside this host and returns its stdout (fails on a non-zero exit).
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip").args(["netns", "exec", &self.ns]).args(args).output()?;
        if !out.status.success() {
            bail!("{} in {}: {}", args.join(" "), self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A set of hosts on one switch (a bridge in its own namespace), 10.99.0.0/24, host i at 10.99.0.(i+1).
pub struct Net {
    pub hosts: Vec<Host>,
    switch: String,
    pub dir: tempfile::TempDir,
}

impl Net {
    pub fn new(names: &[&str]) -> Result<Self> {
        let id = format!("{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::Builder::new().prefix(&format!("oak-net-{id}-")).tempdir()?;
        let switch = format!("oak{id}sw");
        let mut net = Net { hosts: Vec::new(), switch: switch.clone(), dir };
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("oak{id}{name}");
            ip(&["netns", "add", &ns])?;
            let addr = Ipv4Addr::new(10, 99, 0, i as u8 + 1);
            net.hosts.push(Host {
                name: name.to_string(),
                ns: ns.clone(),
                ip: addr,
                logs: net.dir.path().to_path_buf(),
            });
            let port = format!("p{i}");
            ip(&["-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Cuts a host off the network (its link goes down) or reconnects it.
    pub fn set_link(&self, name: &str, up: bool) -> Result<()> {
        let i = self.hosts.iter().position(|h| h.name == name).context("no such host")?;
        ip(&["-n", &self.switch, "link", "set", &format!("p{i}"), if up { "up" } else { "down" }])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

/// Polls `f` every 50 ms until it returns Some, failing with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client of the root's REST API, used from inside a host.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    pub fn new(root_ip: Ipv4Addr) -> Self {
        Self { base: format!("http://{root_ip}:10000"), token: None }
    }

    /// (status, JSON body or Null)
    pub fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, serde_json::Value) {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
        let mut req = agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let r = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return (0, serde_json::Value::String(e.to_string())),
        };
        let code = resp.status();
        (code, resp.into_json().unwrap_or(serde_json::Value::Null))
    }

    pub fn login(&mut self, user: &str, password: &str) -> Result<()> {
        let (c, v) =
            self.call("POST", "/api/auth/login", Some(&serde_json::json!({"username": user, "password": password})));
        if c != 200 {
            bail!("login failed: {c} {v}");
        }
        self.token = Some(v["token"].as_str().context("no token")?.to_string());
        Ok(())
    }
}
