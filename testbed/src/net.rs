//! Hosts on one switch: every host is a network namespace with one veth into a bridge that sits in a
//! namespace of its own, so a topology touches nothing in the machine's own namespace and parallel tests
//! cannot collide.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::cmd::ip;
use crate::proc::Proc;

/// Tells apart the topologies of one test process (with its pid, those of parallel ones).
static SEQ: AtomicU32 = AtomicU32::new(0);

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
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]);
        self.spawn_with(cmd, name, program, args, env)
    }

    /// [`Host::spawn`] without the private `/sys` that `ip netns exec` mounts (which hides
    /// `/sys/fs/cgroup`): for a NodeEngine, which reads its instances' use from their cgroups as it does on
    /// a machine of its own. Its `/sys/class/net` is the machine's; it touches no interface.
    pub fn spawn_with_cgroups(&self, name: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns)).arg("--");
        self.spawn_with(cmd, name, program, args, env)
    }

    fn spawn_with(
        &self,
        mut cmd: Command,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let log = self.logs.join(format!("{name}.log"));
        cmd.arg(program).args(args);
        cmd.env("RUST_LOG", "info").env_remove("RUST_LOG_STYLE").env("NO_COLOR", "1");
        // one join token for the test's roots and clusters (a test can name another in `env`)
        cmd.env("OAK_CLUSTER_TOKEN", crate::JOIN_TOKEN).env("OAK_WORKER_TOKEN", crate::WORKER_TOKEN);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc::start(format!("{name}@{}", self.name), cmd, log, &format!("{} in {}", program.display(), self.ns))
    }

    /// A cluster-orchestrator on this host joining the root at `root_ip`, its state under `data_dir`, with
    /// `CLUSTER_NAME`/`CLUSTER_LOCATION` set and `args` after the root address and data directory.
    pub fn spawn_cluster(
        &self,
        root_ip: &str,
        data_dir: &str,
        name: &str,
        location: &str,
        args: &[&str],
    ) -> Result<Proc> {
        let mut all = vec!["--root-address", root_ip, "--data-dir", data_dir];
        all.extend_from_slice(args);
        let env = [("CLUSTER_NAME", name), ("CLUSTER_LOCATION", location)];
        self.spawn("cluster", &crate::bin("cluster-orchestrator"), &all, &env)
    }

    /// A simulated worker named `name` on this host joining the cluster orchestrator at `cluster`
    /// (address:port), `args` after those.
    pub fn spawn_sim_worker(&self, cluster: &str, name: &str, args: &[&str]) -> Result<Proc> {
        let mut all = vec!["--cluster", cluster, "--name", name];
        all.extend_from_slice(args);
        self.spawn(name, &crate::bin("oak-sim-worker"), &all, &[])
    }

    /// Runs `f` on a thread inside this host's network namespace (sockets it opens live there); panics
    /// when the namespace cannot be entered or `f` panics.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        crate::in_netns(&self.ns, f).unwrap_or_else(|e| panic!("{e:#}"))
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
        // what a failed test's NodeEngines left running
        crate::stop_vms_under(self.dir.path());
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}
