//! `cargo xtask bench deploy`: a 1-DOC stack (root, cluster, NetManager, NodeEngine with `-u=true`; release
//! builds) in a network namespace of its own, with the machine's containerd. Deploys a locally present image
//! N times through the REST API and measures request -> RUNNING; the baseline, measured in the same run, is
//! containerd alone starting the same image (`ctr run -d`). Then VMs ([`super::vms`]): a unikernel and a
//! microVM, deploy -> RUNNING (the guest answers at its overlay address) under TCG and, where it works, KVM,
//! beside qemu booting the same guest alone, and qemu's RSS per instance. Last, the NodeEngine's idle RSS
//! and CPU.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use oak_proto::InstanceState;
use serde_json::{json, Value};
use testbed::{in_netns, ip};

use super::stats::{pct, rss_kb};
use crate::util::{cargo, sh, step};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Deployments to time.
    #[arg(long, default_value_t = 20)]
    deployments: u32,
    /// Deployments to time per kind of VM and accelerator (0: no VMs).
    #[arg(long, default_value_t = 5)]
    vm_deployments: u32,
    /// Seconds of idle time over which the NodeEngine's CPU use is measured.
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// Do not build (use the release binaries already there).
    #[arg(long)]
    skip_build: bool,
}

pub(super) struct Stack {
    pub ns: String,
    procs: Vec<Child>,
    ctr_ns: String,
    /// Where the stack's state, logs and images are.
    pub work: PathBuf,
    /// The NodeEngine's binary and arguments (to start it again with others).
    ne: (PathBuf, Vec<String>),
    /// The running NodeEngine's pid.
    pub ne_pid: u32,
}

impl Stack {
    /// Stops the NodeEngine and starts it again with `more` arguments; answers its pid.
    pub fn restart_nodeengine(&mut self, more: &[&str]) -> anyhow::Result<u32> {
        if let Some(i) = self.procs.iter().position(|c| c.id() == self.ne_pid) {
            let mut c = self.procs.remove(i);
            // SIGTERM: a NodeEngine leaves its instances running; none runs between measurements
            let _ = Command::new("kill").arg(self.ne_pid.to_string()).status();
            let _ = c.wait();
        }
        let (bin, args) = self.ne.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).chain(more.iter().copied()).collect();
        let work = self.work.clone();
        self.ne_pid = spawn(self, "nodeengine", &bin, &args, &[], &work)?;
        Ok(self.ne_pid)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        // whatever the NodeEngine left (nothing, if undeploys worked), the images, the namespaces
        let ls = |ns: &str, what: &str| {
            let out = Command::new("ctr").args(["-n", ns, what, "ls", "-q"]).output();
            out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
        };
        for ns in [self.ctr_ns.as_str(), "oakbench-baseline"] {
            for id in ls(ns, "containers").lines() {
                let _ = Command::new("ctr").args(["-n", ns, "tasks", "kill", "-s", "SIGKILL", id]).output();
                let _ = Command::new("ctr").args(["-n", ns, "tasks", "rm", "-f", id]).output();
                let _ = Command::new("ctr").args(["-n", ns, "containers", "rm", id]).output();
            }
            for img in ls(ns, "images").lines() {
                let _ = Command::new("ctr").args(["-n", ns, "images", "rm", "--sync", img]).output();
            }
            let _ = Command::new("ctr").args(["namespaces", "rm", ns]).output();
        }
    }
}

fn spawn(
    stack: &mut Stack,
    name: &str,
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    logs: &Path,
) -> anyhow::Result<u32> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{name}.log")))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &stack.ns]).arg(bin).args(args);
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).env("RUST_LOG", "warn");
    // the bench's roots and clusters share one join token
    cmd.env("OAK_CLUSTER_TOKEN", testbed::JOIN_TOKEN).env("OAK_WORKER_TOKEN", testbed::WORKER_TOKEN);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let c = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let pid = c.id();
    stack.procs.push(c);
    Ok(pid)
}

/// Polls service `sid` (from a thread in the stack's namespace) until its instance `num` is RUNNING; an error
/// when it fails or `timeout` passes.
pub(super) fn wait_running(api: &str, auth: &str, sid: &str, num: u64, timeout: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let v: Value = ureq::get(&format!("{api}/api/service/{sid}")).set("Authorization", auth).call()?.into_json()?;
        let inst = v["instance_list"].as_array().into_iter().flatten().find(|i| i["instance_number"] == num).cloned();
        let inst = inst.unwrap_or_default();
        match inst["status"].as_str().and_then(InstanceState::parse) {
            Some(InstanceState::Running) => return Ok(()),
            Some(InstanceState::Failed | InstanceState::Dead) => {
                bail!("FAILED: {}", inst["status_detail"].as_str().unwrap_or_default())
            }
            _ if t.elapsed() > timeout => bail!("not RUNNING after {timeout:?}: {inst}"),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after the command: state(0) ... utime(11) stime(12)
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !a.skip_build {
        step("building release binaries");
        sh(cargo().args([
            "build",
            "--release",
            "--bins",
            "-p",
            "oak-orchestrators",
            "-p",
            "oak-netmanager",
            "-p",
            "oak-node-engine",
        ]))?;
        crate::ebpf::build()?;
    }
    crate::up::ensure_containerd()?;
    let bins: PathBuf = crate::util::target_dir().join("release");
    let work = std::env::temp_dir().join(format!("oak-bench-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let w = |s: &str| work.join(s).display().to_string();
    step("building a local busybox OCI image (oak-image)");
    let out = Command::new(bins.join("oak-image"))
        .args(["--out-dir", &w("img"), "--name", "localhost/oak/bench:1"])
        .output()?;
    if !out.status.success() {
        bail!("oak-image: {}", String::from_utf8_lossy(&out.stderr));
    }
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();

    let ns = format!("oakbench{}", std::process::id());
    let mut stack = Stack {
        ns: ns.clone(),
        procs: Vec::new(),
        ctr_ns: format!("oakbench-{}", std::process::id()),
        work: work.clone(),
        ne: (PathBuf::new(), Vec::new()),
        ne_pid: 0,
    };
    ip(&["netns", "add", &ns])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    // (no dummy driver in every kernel: a veth pair inside the namespace serves as the uplink)
    ip(&["-n", &ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1"])?;
    ip(&["-n", &ns, "link", "set", "up1", "up"])?;
    ip(&["-n", &ns, "addr", "add", "10.250.0.1/24", "dev", "up0"])?;
    ip(&["-n", &ns, "link", "set", "up0", "up"])?;
    std::fs::write(
        work.join("netcfg.json"),
        json!({"NodePublicAddress": "10.250.0.1", "NodePublicPort": "50103", "ClusterUrl": "127.0.0.1", "NodeName": "bench-worker"}).to_string(),
    )?;
    step("starting root, cluster, NetManager, NodeEngine in their own network namespace");
    spawn(
        &mut stack,
        "root",
        &bins.join("root-orchestrator"),
        &["--data-dir", &w("root")],
        &[("OAK_ADMIN_PASSWORD", "bench")],
        &work,
    )?;
    spawn(
        &mut stack,
        "cluster",
        &bins.join("cluster-orchestrator"),
        &["--data-dir", &w("cluster"), "--heartbeat-interval-ms", "1000"],
        &[("CLUSTER_NAME", "bench"), ("CLUSTER_LOCATION", "bench")],
        &work,
    )?;
    let obj = crate::util::target_dir().join("bpf/netmanager-ebpf.o").display().to_string();
    spawn(
        &mut stack,
        "netmanager",
        &bins.join("NetManager"),
        &["-c", &w("netcfg.json"), "--data-dir", &w("nm"), "--ebpf-object", &obj],
        &[],
        &work,
    )?;
    let ctr_ns = stack.ctr_ns.clone();
    let ne_args: Vec<String> = [
        "-n",
        "6000",
        "--data-dir",
        &w("ne"),
        "--namespace",
        &ctr_ns,
        "--node-name",
        "bench-worker",
        "--image-dir",
        &w("img"),
        "--netmanager-credential",
        &w("nm/api-token"),
        "-u=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    stack.ne = (bins.join("NodeEngine"), ne_args);
    stack.restart_nodeengine(&[])?;
    // (`ip netns exec` execs the program: the pid is the NodeEngine's)

    let api = "http://127.0.0.1:10000".to_string();
    let token: String = in_netns(&ns, {
        let api = api.clone();
        move || -> anyhow::Result<String> {
            let t = Instant::now();
            loop {
                if let Ok(r) = ureq::post(&format!("{api}/api/auth/login"))
                    .send_json(json!({"username":"Admin","password":"bench"}))
                {
                    let v: Value = r.into_json()?;
                    return v["token"].as_str().map(str::to_string).context("no token");
                }
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("root API not up within 30 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })??;
    let auth = format!("Bearer {token}");
    let (n, api2, auth2, image2) = (a.deployments, api.clone(), auth.clone(), image.clone());
    let mut times: Vec<f64> = in_netns(&ns, move || -> anyhow::Result<Vec<f64>> {
        let get = |p: &str| -> anyhow::Result<Value> {
            Ok(ureq::get(&format!("{api2}{p}")).set("Authorization", &auth2).call()?.into_json()?)
        };
        let t = Instant::now();
        while get("/api/clusters/active")?[0]["active_nodes"] != 1 {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the worker did not register within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":"bench",
          "application_namespace":"bench","application_desc":"","microservices":[{"microserviceID":"","microservice_name":"httpd",
          "microservice_namespace":"bench","virtualization":"container","code":format!("oci-archive:{image2}"),
          "cmd":["httpd","-f","-p","8080","-h","/www"],"memory":64,"vcpus":0.2}]}]});
        let apps: Value =
            ureq::post(&format!("{api2}/api/application")).set("Authorization", &auth2).send_json(sla)?.into_json()?;
        let sid = apps[0]["microservices"][0].as_str().context("no service id")?.to_string();
        let mut times = Vec::new();
        // one warm-up deployment imports the image; the timed ones find it present
        for k in 0..=n {
            let t = Instant::now();
            let r: Value = ureq::post(&format!("{api2}/api/service/{sid}/instance"))
                .set("Authorization", &auth2)
                .call()?
                .into_json()?;
            let num = r["instance_number"].as_u64().context("no instance number")?;
            wait_running(&api2, &auth2, &sid, num, Duration::from_secs(60))?;
            if k > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
                eprintln!("    deployment {k}/{n}: {:.0} ms", times.last().unwrap());
            }
            ureq::delete(&format!("{api2}/api/service/{sid}/instance/{num}")).set("Authorization", &auth2).call()?;
            let t2 = Instant::now();
            while get(&format!("/api/service/{sid}"))?["instance_list"].as_array().is_some_and(|l| !l.is_empty()) {
                if t2.elapsed() > Duration::from_secs(60) {
                    bail!("undeploy did not finish within 60 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(times)
    })??;

    step(&format!("baseline: containerd alone starting the same image {} times (ctr run -d)", a.deployments));
    let bns = "oakbench-baseline";
    sh(Command::new("ctr").args(["-n", bns, "images", "import", "--no-unpack", &image]).stdout(Stdio::null()))?;
    let mut base = Vec::new();
    for k in 0..=a.deployments {
        let id = format!("oakbench-{}-{k}", std::process::id());
        let t = Instant::now();
        let ok = Command::new("ctr")
            .args([
                "-n",
                bns,
                "run",
                "-d",
                "--memory-limit",
                &(64u64 << 20).to_string(),
                "localhost/oak/bench:1",
                &id,
                "httpd",
                "-f",
                "-p",
                "8080",
                "-h",
                "/www",
            ])
            .stdout(Stdio::null())
            .status()?;
        if !ok.success() {
            bail!("ctr run failed");
        }
        if k > 0 {
            base.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let _ = Command::new("ctr").args(["-n", bns, "tasks", "kill", "-s", "SIGKILL", &id]).output();
        let _ = Command::new("ctr").args(["-n", bns, "tasks", "rm", "-f", &id]).output();
        let _ = Command::new("ctr").args(["-n", bns, "containers", "rm", &id]).output();
    }
    let _ = Command::new("ctr").args(["-n", bns, "images", "rm", "localhost/oak/bench:1"]).output();

    let vms = if a.vm_deployments > 0 {
        super::vms::run(&mut stack, &api, &auth, &bins, a.vm_deployments)?
    } else {
        Vec::new()
    };
    let ne = stack.ne_pid;

    step(&format!("NodeEngine idle for {} s", a.idle_seconds));
    let hz = 100.0; // USER_HZ on Linux
    let c0 = cpu_ticks(ne);
    std::thread::sleep(Duration::from_secs(a.idle_seconds));
    let c1 = cpu_ticks(ne);
    let idle_cpu = (c1 - c0) as f64 / hz / a.idle_seconds as f64 * 100.0;
    let rss = rss_kb(ne);

    let (m, p95) = (pct(&mut times, 0.5), pct(&mut times, 0.95));
    let (bm, bp95) = (pct(&mut base, 0.5), pct(&mut base, 0.95));
    println!();
    println!("deploy: {} deployments of a locally present image (busybox httpd, 64 MB, 0.2 vcpus)", a.deployments);
    println!("  baseline: containerd alone (ctr run -d)      median {bm:7.1} ms  p95 {bp95:7.1} ms");
    println!("  REST API deploy -> RUNNING (1-DOC stack)     median {m:7.1} ms  p95 {p95:7.1} ms   ({:.2}x / {:.2}x baseline)", m / bm, p95 / bp95);
    super::vms::print(&vms, a.vm_deployments);
    println!("  NodeEngine idle: RSS {:.1} MiB, CPU {idle_cpu:.2} % of one core", rss as f64 / 1024.0);
    drop(stack);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
