//! VMs on the overlay, on an M-DOC cluster of two workers. A unikernel (a Linux guest: Debian's kernel and a
//! busybox initramfs built here, nothing downloaded) and a microVM (the test's busybox OCI image booted by
//! the worker's own guest) are deployed through the REST API to a worker whose NodeEngine runs with
//! `-u=true`; a container on the other worker reaches each by its service's round-robin and closest IPs,
//! once on each datapath (eBPF, tun). The NetManager wires each VM's network namespace as it wires a
//! container's; the guest takes the address it gave from its kernel command line, and its console (through
//! the logs endpoint) shows it. A NodeEngine killed and started again re-adopts the running guests. A qemu
//! killed makes its instance FAILED, and the cluster places it again. Undeploying leaves no qemu, no
//! namespace holder, no mount and no files behind.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use testbed::{require_root, wait_for, Api, Net};

mod common;

const PAGE: &str = "hello-from-the-guest";

fn skip_reason() -> Option<String> {
    if !Command::new("ctr").arg("version").output().is_ok_and(|o| o.status.success()) {
        return Some("containerd is not running (cargo xtask test starts it)".into());
    }
    if oak_node_engine::metrics::find_qemu().is_none() {
        return Some("no qemu-system-* in PATH (cargo xtask setup installs it)".into());
    }
    if oak_node_engine::runtime::guest::GuestKernel::newest().is_none() {
        return Some("no kernel in /boot with its modules (cargo xtask setup installs linux-image-*)".into());
    }
    None
}

/// Whether test `name` can run here; prints why not (a failure under CI, where setup installs it all).
fn can_run(name: &str) -> bool {
    if !require_root(name) {
        return false;
    }
    if let Some(why) = skip_reason() {
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED {name}: {why}");
        return false;
    }
    true
}

/// The root API as the Admin (call from inside the host), once a worker is registered.
fn admin_api() -> Api {
    let mut api = Api::new("127.0.0.1".parse().unwrap());
    wait_for("root API", Duration::from_secs(20), || api.login("Admin", common::ADMIN_PASSWORD).ok());
    wait_for("the worker registered", Duration::from_secs(30), || {
        let (_, c) = api.call("GET", "/api/clusters/active", None);
        (c[0]["active_nodes"].as_u64() >= Some(1)).then_some(())
    });
    api
}

/// The command lines of the qemu processes running VMs of a NodeEngine whose data lies under `dir`.
fn qemus_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("qemu-system") && c.contains(&dir))
        .collect()
}

/// Waits until no VM directory is left under `dir`'s NodeEngine and no qemu runs for it; no rootfs stays
/// mounted.
fn assert_no_vm_left(dir: &Path) {
    for kind in ["unikernels", "microvms"] {
        let vms = dir.join("ne").join(kind);
        wait_for(&format!("the {kind}' files removed"), Duration::from_secs(30), || {
            std::fs::read_dir(&vms).map(|d| d.count() == 0).unwrap_or(true).then_some(())
        });
    }
    let left = qemus_under(dir);
    assert!(left.is_empty(), "qemu left running: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir.join("ne").display().to_string()), "a VM's rootfs is still mounted:\n{mounts}");
}

/// The pid of the qemu running the VM whose files lie under `vm_dir`.
fn qemu_of(dir: &Path, vm_kind: &str) -> Option<u32> {
    let needle = dir.join("ne").join(vm_kind).display().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let c = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).replace('\0', " ");
        (c.contains("qemu-system") && c.contains(&needle)).then_some(pid)
    })
}

/// GET `url` from the network namespace of `pid` (the machine's curl): the body, or None.
fn fetch_from(pid: &str, url: &str) -> Option<String> {
    let out = Command::new("nsenter").args(["-t", pid, "-n", "curl", "-sS", "--max-time", "3", url]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

const MICROVM_PAGE: &str = "hello-from-the-microvm";

#[test]
fn vms_answer_a_container_on_another_worker_on_the_ebpf_path() {
    reach_vms("ebpf", &[]);
}

#[test]
fn vms_answer_a_container_on_another_worker_on_the_tun_path() {
    reach_vms("tun", &["--no-ebpf"]);
}

/// The scenario, with the NetManagers' datapath `datapath` (started with `nm_args`).
fn reach_vms(datapath: &'static str, nm_args: &[&str]) {
    if !can_run(&format!("vms_answer_a_container_on_another_worker_on_the_{datapath}_path")) {
        return;
    }
    let net = Net::new(&["uk", "cl"]).unwrap();
    let (h, other) = (net.host("uk"), net.host("cl"));
    let d = net.dir.path().to_path_buf();
    let ctr_ns = format!("oak-uk-{datapath}-{}", std::process::id());
    let ctr_ns2 = format!("oak-uk-{datapath}-cl-{}", std::process::id());
    let image = oak_node_engine::testimage::build_busybox_image(&d, "localhost/oak/busybox:uk").unwrap();
    let guest = oak_node_engine::testguest::build_linux_guest(&d, "guest", PAGE).unwrap();
    // a failed instance is placed again 3 s later (15 s by default)
    let stack = common::start_full(h, &d, &ctr_ns, &["--redeploy-after-ms", "3000"], nm_args, &["-u=true"]);
    let (_nm2, _ne2) = common::add_worker(other, &d, "cl-worker", &h.ip.to_string(), &ctr_ns2, nm_args);

    let serve = format!("mkdir -p /www && echo {MICROVM_PAGE} > /www/index.html && exec httpd -f -p 8080 -h /www");
    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{"applicationID": "",
        "application_name": format!("uk{datapath}"), "application_namespace": "doc",
        "application_desc": "networked VMs",
        "microservices": [
          {"microserviceID": "", "microservice_name": "vm", "microservice_namespace": "doc",
           "virtualization": "unikernel", "code": guest.display().to_string(), "memory": 256, "vcpus": 1},
          {"microserviceID": "", "microservice_name": "mvm", "microservice_namespace": "doc",
           "virtualization": "microvm", "code": format!("oci-archive:{}", image.display()),
           "cmd": ["/bin/sh", "-c", serve], "memory": 128, "vcpus": 1},
          {"microserviceID": "", "microservice_name": "client", "microservice_namespace": "doc",
           "virtualization": "container", "code": format!("oci-archive:{}", image.display()),
           "cmd": ["sleep", "3600"], "memory": 32, "vcpus": 0.1,
           "constraints": [{"type": "direct", "node": "cl-worker", "cluster": "doc"}]}]}]});
    let services = h.run(move || {
        let api = admin_api();
        wait_for("both workers registered", Duration::from_secs(60), || {
            let (_, c) = api.call("GET", "/api/clusters/active", None);
            (c[0]["active_nodes"].as_u64() == Some(2)).then_some(())
        });
        let (code, v) = api.call("POST", "/api/application", Some(&sla));
        assert_eq!(code, 200, "{v}");
        let (_, services) = api.call("GET", "/api/services", None);
        let by_name = |n: &str| {
            services.as_array().and_then(|a| a.iter().find(|s| s["microservice_name"] == n)).cloned().unwrap()
        };
        let ids = ["vm", "mvm", "client"].map(|n| by_name(n)["microserviceID"].as_str().unwrap().to_string());
        for id in &ids {
            let (code, v) = api.call("POST", &format!("/api/service/{id}/instance"), None);
            assert_eq!(code, 200, "{v}");
        }
        ids.map(|id| running(&api, &id, Duration::from_secs(180)))
    });
    let [vm, mvm, client] = services;
    for (s, node) in [(&vm, "doc-worker"), (&mvm, "doc-worker"), (&client, "cl-worker")] {
        assert_eq!(s["instance_list"][0]["node_name"], node, "{s}");
    }
    // the workers run the datapath this run is about
    let (_, workers) = h.run(|| admin_api().call("GET", "/api/cluster/doc/workers", None));
    for w in workers.as_array().unwrap() {
        assert_eq!(w["network"]["datapath"], datapath, "{workers}");
    }
    let client_pid = common::task_pid(&ctr_ns2, "client");
    fetch_all(&client_pid, &[(&vm, PAGE), (&mvm, MICROVM_PAGE)], "from the other worker");

    // each guest configured the address the API reports (its console, through the logs endpoint)
    for (s, line) in [(&vm, oak_node_engine::testguest::READY), (&mvm, "oak-microvm: network ready")] {
        let (sid, ns) = (s["microserviceID"].as_str().unwrap(), s["instance_list"][0]["ns_address"].as_str().unwrap());
        let path = format!("/api/service/{sid}/instance/0/logs?offset=-1");
        let (code, logs) = h.run(move || admin_api().call("GET", &path, None));
        assert_eq!(code, 200, "{logs}");
        let console = logs["text"].as_str().unwrap_or_default().to_string();
        assert!(console.contains(&format!("{line} eth0 {ns}/")), "{ns} configured; the console:\n{console}");
    }

    // the NodeEngine killed and started again: the guests keep running (the same qemus), are re-adopted and
    // still answer
    let before = qemus_under(&d);
    assert_eq!(before.len(), 2, "two qemus: {before:?}");
    let mut stack = stack;
    stack.nodeengine.kill9();
    stack.nodeengine = common::spawn_nodeengine(h, "nodeengine-2", &stack.ne_args);
    wait_for("both VMs re-adopted", Duration::from_secs(30), || {
        (stack.nodeengine.output().matches("re-adopted running VM").count() == 2).then_some(())
    });
    assert_eq!(qemus_under(&d), before, "the same qemus run on");
    fetch_all(&client_pid, &[(&vm, PAGE), (&mvm, MICROVM_PAGE)], "after the NodeEngine restart");

    // a qemu killed: its instance FAILED with the reason, then placed again by the cluster and answering
    let ids = [&vm, &mvm].map(|s| s["microserviceID"].as_str().unwrap().to_string());
    for (kind, id) in [("unikernels", &ids[0]), ("microvms", &ids[1])] {
        let pid = qemu_of(&d, kind).unwrap_or_else(|| panic!("a qemu for the {kind}"));
        assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
        let sid = id.clone();
        let failed = h.run(move || {
            let api = admin_api();
            wait_for(&format!("the {kind} instance FAILED"), Duration::from_secs(30), || {
                let (_, s) = api.call("GET", &format!("/api/service/{sid}"), None);
                let i = s["instance_list"][0].clone();
                (i["status"] == "FAILED").then_some(i)
            })
        });
        let detail = failed["status_detail"].as_str().unwrap_or_default();
        assert!(detail.contains("the cluster places it again in 3.0 s"), "{kind}: {failed}");
        let sid = id.clone();
        h.run(move || {
            let api = admin_api();
            wait_for(&format!("the {kind} instance RUNNING again"), Duration::from_secs(180), || {
                let (_, s) = api.call("GET", &format!("/api/service/{sid}"), None);
                (s["instance_list"][0]["status"] == "RUNNING").then_some(())
            })
        });
        let new_pid = qemu_of(&d, kind).expect("a new qemu");
        assert_ne!(new_pid, pid, "{kind}: a new VM runs");
    }
    // the new instances answer too (the service IPs stay; the overlay addresses may change)
    let [vm, mvm] = ids.clone().map(|id| h.run(move || admin_api().call("GET", &format!("/api/service/{id}"), None).1));
    fetch_all(&client_pid, &[(&vm, PAGE), (&mvm, MICROVM_PAGE)], "after the redeploy");

    // undeploy: no qemu, no namespace holder, no mount, no files of the VMs left
    let holders: Vec<u32> = ["unikernels", "microvms"]
        .iter()
        .flat_map(|k| std::fs::read_dir(d.join("ne").join(k)).unwrap().flatten())
        .filter_map(|e| std::fs::read_to_string(e.path().join("netns-holder.pid")).ok()?.trim().parse().ok())
        .collect();
    assert_eq!(holders.len(), 2, "one namespace holder per VM");
    h.run(move || {
        let api = admin_api();
        for id in &ids {
            let (code, v) = api.call("DELETE", &format!("/api/service/{id}/instance/0"), None);
            assert_eq!(code, 200, "{v}");
        }
        for id in &ids {
            wait_for("the VM undeployed", Duration::from_secs(60), || {
                let (_, s) = api.call("GET", &format!("/api/service/{id}"), None);
                s["instance_list"].as_array().is_some_and(|l| l.is_empty()).then_some(())
            });
        }
    });
    assert_no_vm_left(&d);
    for pid in holders {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!cmd.starts_with(b"sleep"), "the namespace holder {pid} is gone");
    }

    // the rest goes with the application; then the test's containerd namespaces
    h.run(move || {
        let api = admin_api();
        let (_, apps) = api.call("GET", "/api/applications", None);
        let app = apps[0]["applicationID"].as_str().unwrap().to_string();
        let (code, v) = api.call("DELETE", &format!("/api/application/{app}"), None);
        assert_eq!(code, 200, "{v}");
    });
    let containers = || {
        let out = Command::new("ctr").args(["-n", &ctr_ns2, "containers", "ls", "-q"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_for("the client's container removed", Duration::from_secs(30), || containers().is_empty().then_some(()));
    drop(stack);
    common::remove_ctr_namespace(&ctr_ns);
    common::remove_ctr_namespace(&ctr_ns2);
}

/// Fetches each service's page (`services`: the service and its page) from the network namespace of
/// `client_pid` by the service's round-robin IP, its closest IP and its instance's overlay address.
fn fetch_all(client_pid: &str, services: &[(&Value, &str)], what: &str) {
    for (s, page) in services {
        let name = s["microservice_name"].as_str().unwrap();
        let ns = s["instance_list"][0]["ns_address"].as_str().unwrap_or_default().to_string();
        assert!(!ns.is_empty(), "{name} has an overlay address: {s}");
        let ip = |k: &str| s["addresses"][k].as_str().unwrap_or_else(|| panic!("no addresses.{k}: {s}")).to_string();
        for (how, addr) in [("round-robin", ip("rr_ip")), ("closest", ip("closest_ip")), ("overlay address", ns)] {
            let url = format!("http://{addr}:8080/index.html");
            let body = wait_for(&format!("{name}'s page by its {how} {addr} {what}"), Duration::from_secs(180), || {
                fetch_from(client_pid, &url).filter(|b| b == page)
            });
            assert_eq!(body, *page);
        }
    }
}

/// Service `id` once its instance 0 is RUNNING (it must not be FAILED or DEAD on the way).
fn running(api: &Api, id: &str, timeout: Duration) -> Value {
    wait_for(&format!("{id} RUNNING"), timeout, || {
        let (_, s) = api.call("GET", &format!("/api/service/{id}"), None);
        let i = s["instance_list"][0].clone();
        assert!(!matches!(i["status"].as_str(), Some("FAILED" | "DEAD")), "instance failed: {i}");
        (i["status"] == "RUNNING").then_some(s)
    })
}

/// A guest that never answers at its address is stopped and FAILED after `--vm-answer-timeout` (30 s here:
/// room for a booting guest on a loaded machine, which the crashing one needs to get to its crash), and
/// one whose qemu exits before answering FAILED at once; each with the reason and the end of its console, and
/// neither leaves a qemu or a namespace holder.
#[test]
fn a_guest_that_does_not_answer_fails_with_the_reason() {
    if !can_run("a_guest_that_does_not_answer_fails_with_the_reason") {
        return;
    }
    let net = Net::new(&["ukf"]).unwrap();
    let h = net.host("ukf");
    let d = net.dir.path().to_path_buf();
    let ctr_ns = format!("oak-ukf-{}", std::process::id());
    let guest = oak_node_engine::testguest::build_linux_guest(&d, "guest", PAGE).unwrap();
    // a failed instance stays FAILED here (no redeploy)
    let stack = common::start_full(
        h,
        &d,
        &ctr_ns,
        &["--redeploy-after-ms", "0"],
        &[],
        &["-u=true", "--vm-answer-timeout", "30"],
    );
    let vm = |name: &str, args: Value| {
        json!({"microserviceID": "", "microservice_name": name, "microservice_namespace": "doc",
               "virtualization": "unikernel", "code": guest.display().to_string(), "memory": 256, "vcpus": 1,
               "args": args})
    };
    // silent: an empty address on the command line after ours, so the guest configures no network;
    // crash: init is busybox's help, which exits, and the kernel's panic reboots: qemu (-no-reboot) exits
    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{"applicationID": "",
        "application_name": "ukf", "application_namespace": "doc", "application_desc": "guests that fail",
        "microservices": [vm("silent", json!(["oak.ip="])), vm("crash", json!(["rdinit=/bin/busybox", "panic=-1"]))]}]});
    let failed = h.run(move || {
        let api = admin_api();
        let (code, v) = api.call("POST", "/api/application", Some(&sla));
        assert_eq!(code, 200, "{v}");
        let (_, services) = api.call("GET", "/api/services", None);
        let mut out = Vec::new();
        for n in ["silent", "crash"] {
            let s = services.as_array().and_then(|a| a.iter().find(|s| s["microservice_name"] == n)).cloned();
            let id = s.unwrap()["microserviceID"].as_str().unwrap().to_string();
            let (code, v) = api.call("POST", &format!("/api/service/{id}/instance"), None);
            assert_eq!(code, 200, "{v}");
            let i = wait_for(&format!("{n} FAILED"), Duration::from_secs(90), || {
                let (_, s) = api.call("GET", &format!("/api/service/{id}"), None);
                let i = s["instance_list"][0].clone();
                assert_ne!(i["status"], "RUNNING", "{n} must not be RUNNING: its guest never answers: {i}");
                (i["status"] == "FAILED").then_some(i)
            });
            out.push((n, i));
        }
        out
    });
    for (n, i) in &failed {
        let detail = i["status_detail"].as_str().unwrap_or_default();
        eprintln!("{n}: {detail}");
        match *n {
            "silent" => assert!(
                detail.contains("did not answer at 10.18.") && detail.contains("within 30s (--vm-answer-timeout)"),
                "{detail}"
            ),
            _ => assert!(detail.contains("qemu exited (code 0) before the guest answered at 10.18."), "{detail}"),
        }
        assert!(detail.contains("its console ends:"), "{detail}");
    }
    // undeployed while it boots: a silent guest again, undeployed once qemu runs; the undeploy does not wait
    // for the answer timeout (30 s), and the instance goes without being reported FAILED
    let dir = d.clone();
    h.run(move || {
        let api = admin_api();
        let (_, services) = api.call("GET", "/api/services", None);
        let s = services.as_array().and_then(|a| a.iter().find(|s| s["microservice_name"] == "silent")).cloned();
        let id = s.unwrap()["microserviceID"].as_str().unwrap().to_string();
        let (code, v) = api.call("POST", &format!("/api/service/{id}/instance"), None);
        assert_eq!(code, 200, "{v}");
        let n = v["instance_number"].as_u64().unwrap_or_else(|| panic!("{v}"));
        let instance = |api: &Api| {
            let (_, s) = api.call("GET", &format!("/api/service/{id}"), None);
            s["instance_list"].as_array().and_then(|l| l.iter().find(|i| i["instance_number"] == n).cloned())
        };
        wait_for("the second silent guest's qemu started", Duration::from_secs(60), || {
            let i = instance(&api)?;
            assert_ne!(i["status"], "FAILED", "{i}");
            (i["status"] == "CREATED" && qemus_under(&dir).len() == 1).then_some(())
        });
        let t = std::time::Instant::now();
        let (code, v) = api.call("DELETE", &format!("/api/service/{id}/instance/{n}"), None);
        assert_eq!(code, 200, "{v}");
        wait_for("the booting guest undeployed", Duration::from_secs(20), || match instance(&api) {
            Some(i) => {
                assert_ne!(i["status"], "FAILED", "an undeployed guest is not reported FAILED: {i}");
                None
            }
            None => Some(()),
        });
        eprintln!("undeployed while booting in {:?}", t.elapsed());
    });
    // nothing of any VM left
    assert_no_vm_left(&d);
    drop(stack);
    let _ = Command::new("ctr").args(["namespaces", "rm", &ctr_ns]).output();
}
