//! The NetManager's two datapaths need an Oakestra around them: the root and cluster orchestrators in worker
//! A's namespace, a service with a round-robin IP from the root's REST API, a NetManager on each worker,
//! and the instances registered through the NetManagers' local API, as the NodeEngine does.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::util::step;

use super::cpus::Side;
use super::world::{http, wait_for, World};
use super::{Args, ADMIN_PW, IP_A, IP_B, NM_API};

/// The application the overlays carry: a server and a client microservice, as (id, job name).
pub(super) struct Service {
    pub(super) srv: (String, String),
    pub(super) cli: (String, String),
    /// The server's round-robin service IP.
    pub(super) rr: Ipv4Addr,
}

/// Starts the root and cluster orchestrators (release binaries in `bins`) in worker A's namespace `na` and
/// creates the service through the root's REST API.
pub(super) fn orchestrators(w: &mut World, bins: &Path, na: &str) -> anyhow::Result<Service> {
    step("starting root + cluster orchestrators (release binaries) in worker A's namespace");
    let root_dir = w.work.join("root");
    let cluster_dir = w.work.join("cluster");
    let root_pid = w.spawn(
        "root",
        Command::new("ip")
            .args(["netns", "exec", na])
            .arg(bins.join("root-orchestrator"))
            .args([
                "--api-addr",
                "127.0.0.1:10000",
                "--grpc-addr",
                "127.0.0.1:50052",
                "--netsvc-addr",
                "127.0.0.1:10099",
            ])
            .arg("--data-dir")
            .arg(&root_dir)
            .args(["--report-interval-ms", "1000"])
            .env("OAK_ADMIN_PASSWORD", ADMIN_PW)
            .env("OAK_CLUSTER_TOKEN", testbed::JOIN_TOKEN),
    )?;
    let api = "http://127.0.0.1:10000";
    wait_for("root API", Duration::from_secs(30), || {
        Ok(http(na, "GET", &format!("{api}/api/health"), None, None).is_ok())
    })?;
    let cluster_pid = w.spawn(
        "cluster",
        Command::new("ip")
            .args(["netns", "exec", na])
            .arg(bins.join("cluster-orchestrator"))
            .args([
                "--root-address",
                "127.0.0.1:50052",
                "--root-netsvc-port",
                "10099",
                "--worker-addr",
                "127.0.0.1:10100",
            ])
            .args(["--netsvc-addr", &format!("{IP_A}:10110")])
            .arg("--data-dir")
            .arg(&cluster_dir)
            .env("CLUSTER_NAME", "bench")
            .env("CLUSTER_LOCATION", "bench")
            .env("OAK_CLUSTER_TOKEN", testbed::JOIN_TOKEN)
            .env("OAK_WORKER_TOKEN", testbed::WORKER_TOKEN),
    )?;
    w.placed.extend([(root_pid, Side::A), (cluster_pid, Side::A)]);
    let token = http(
        na,
        "POST",
        &format!("{api}/api/auth/login"),
        None,
        Some(json!({"username":"Admin","password":ADMIN_PW})),
    )?["token"]
        .as_str()
        .context("login: no token")?
        .to_string();
    wait_for("cluster registered at the root", Duration::from_secs(30), || {
        Ok(http(na, "GET", &format!("{api}/api/clusters/active"), Some(&token), None)?
            .as_array()
            .is_some_and(|l| !l.is_empty()))
    })?;
    let ms = |n: &str| {
        json!({"microserviceID":"","microservice_name":n,"microservice_namespace":"bench","virtualization":"container",
               "code":"docker.io/library/nginx:latest","memory":64,"vcpus":0.1})
    };
    let sla = json!({"sla_version":"v2.0","customerID":"Admin","applications":[{"applicationID":"","application_name":"overlay",
        "application_namespace":"bench","application_desc":"","microservices":[ms("srv"), ms("cli")]}]});
    let apps = http(na, "POST", &format!("{api}/api/application"), Some(&token), Some(sla))?;
    let app = apps
        .as_array()
        .and_then(|l| l.iter().find(|x| x["application_name"] == "overlay"))
        .with_context(|| format!("created application not listed: {apps}"))?;
    let mut svcs = Vec::new();
    for sid in app["microservices"].as_array().into_iter().flatten().filter_map(|s| s.as_str()) {
        let v = http(na, "GET", &format!("{api}/api/service/{sid}"), Some(&token), None)?;
        svcs.push((
            sid.to_string(),
            v["job_name"].as_str().unwrap_or("").to_string(),
            v["addresses"]["rr_ip"].as_str().unwrap_or("").to_string(),
        ));
    }
    let [(srv_id, srv_job, rr), (cli_id, cli_job, _)]: [(String, String, String); 2] =
        svcs.try_into().map_err(|v| anyhow!("expected 2 services, got {v:?}"))?;
    let rr: Ipv4Addr = rr.parse().with_context(|| format!("service {srv_id} has no rr_ip ({rr:?})"))?;
    eprintln!("    service {srv_job} ({srv_id}): round-robin IP {rr}");
    Ok(Service { srv: (srv_id, srv_job), cli: (cli_id, cli_job), rr })
}

/// How both workers' NetManagers are started (the release binary, the eBPF object, the run's flags).
pub(super) struct NetManagers<'a> {
    pub(super) args: &'a Args,
    pub(super) bins: &'a Path,
    pub(super) object: &'a Path,
    pub(super) id: u32,
}

impl NetManagers<'_> {
    /// Starts worker `tag`'s NetManager in namespace `ns` (with the eBPF fast path or `--no-ebpf`) and waits
    /// until it is ready; says so when it runs without the fast path it was asked for.
    pub(super) fn start(&self, w: &mut World, tag: &str, ns: &str, ebpf: bool) -> anyhow::Result<()> {
        let cfg = w.work.join(format!("netcfg-{tag}.json"));
        let ip = if tag == "a" { IP_A } else { IP_B };
        let node = format!("bench-ovl-{}-{tag}", self.id);
        fs::write(
            &cfg,
            json!({"NodePublicAddress": ip.to_string(), "NodePublicPort": "50103", "ClusterUrl": IP_A.to_string(),
                   "ClusterNetPort": "10110", "NodeName": node})
            .to_string(),
        )?;
        let pin = PathBuf::from("/sys/fs/bpf/oakestra-rs").join(format!("{node}-oak0"));
        if !w.pins.contains(&pin) {
            w.pins.push(pin);
        }
        let mut c = Command::new("ip");
        // the NetManager joins the cluster with its worker join token
        c.env("OAK_WORKER_TOKEN", testbed::WORKER_TOKEN)
            .args(["netns", "exec", ns])
            .arg(self.bins.join("NetManager"))
            .arg("-c")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(w.work.join(format!("nm-{tag}")));
        c.args(["-p", &NM_API.to_string(), "--bridge", "oak0", "--tun", "oaktun0", "--log-level", "info"]);
        c.args(&self.args.nm_args);
        if ebpf {
            c.arg("--ebpf-object").arg(self.object);
        } else {
            c.arg("--no-ebpf");
        }
        let name = format!("netmanager-{tag}");
        let pid = w.spawn(&name, &mut c)?;
        w.placed.push((pid, if tag == "a" { Side::A } else { Side::B }));
        let p = ns.to_string();
        let r = wait_for(
            &format!("NetManager {tag} ready (eBPF {})", if ebpf { "on" } else { "off" }),
            Duration::from_secs(30),
            || {
                let v = http(&p, "GET", &format!("http://127.0.0.1:{NM_API}/status"), None, None)?;
                Ok(v["ready"] == true)
            },
        );
        if let Err(e) = r {
            bail!("{e:#}\nlog tail:\n{}", w.log_tail(&name));
        }
        if ebpf {
            let c = http(&p, "GET", &format!("http://127.0.0.1:{NM_API}/counters"), None, None)?;
            if c["ebpf"] == false || c["ebpf"].is_null() {
                eprintln!(
                    "    WARNING: NetManager {tag} runs WITHOUT the eBPF fast path; log tail:\n{}",
                    w.log_tail(&name)
                );
            }
        }
        Ok(())
    }
}

/// The counters of the NetManager in namespace `ns`.
pub(super) fn counters(ns: &str) -> anyhow::Result<Value> {
    http(ns, "GET", &format!("http://127.0.0.1:{NM_API}/counters"), None, None)
}

/// Registers instance 0 of `sid` (job `job`), the process `pid`, with NetManager `tag` in namespace `ns`;
/// its overlay address.
pub(super) fn deploy(w: &World, tag: &str, ns: &str, pid: u32, sid: &str, job: &str) -> anyhow::Result<String> {
    let cred_file = w.work.join(format!("nm-{tag}")).join("api-token");
    let cred = std::fs::read_to_string(&cred_file).with_context(|| format!("reading {}", cred_file.display()))?;
    let v = http(
        ns,
        "POST",
        &format!("http://127.0.0.1:{NM_API}/container/deploy"),
        Some(cred.trim()),
        Some(json!({"pid": pid, "serviceName": job, "serviceId": sid, "instanceNumber": 0})),
    )?;
    Ok(v["nsAddress"].as_str().unwrap_or("?").to_string())
}
