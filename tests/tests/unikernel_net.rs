//! A unikernel instance on the overlay. A Linux guest (Debian's kernel and a busybox initramfs built here,
//! nothing downloaded) is deployed through the REST API on a 1-DOC stack whose NodeEngine runs with
//! `-u=true`, once on each datapath (eBPF, tun). The NetManager wires the VM's network namespace as it wires a container; the guest takes the
//! address it gave from its kernel command line. A container on the same worker reaches the guest's web
//! server by the service's round-robin and closest IPs; the guest's console (through the logs endpoint)
//! shows the address it configured, which is the one the API reports. A NodeEngine killed and started
//! again re-adopts the running guest. Undeploying leaves no qemu, no namespace holder and no files behind.

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

/// The root API as the Admin (call from inside the host), once the 1-DOC worker is registered.
fn admin_api() -> Api {
    let mut api = Api::new("127.0.0.1".parse().unwrap());
    wait_for("root API", Duration::from_secs(20), || api.login("Admin", common::ADMIN_PASSWORD).ok());
    wait_for("the worker registered", Duration::from_secs(30), || {
        let (_, c) = api.call("GET", "/api/clusters/active", None);
        (c[0]["active_nodes"].as_u64() == Some(1)).then_some(())
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

/// Waits until no VM directory is left under `dir`'s NodeEngine and no qemu runs for it.
fn assert_no_vm_left(dir: &Path) {
    let vms = dir.join("ne").join("unikernels");
    wait_for("the VMs' files removed", Duration::from_secs(30), || {
        std::fs::read_dir(&vms).map(|d| d.count() == 0).unwrap_or(true).then_some(())
    });
    let left = qemus_under(dir);
    assert!(left.is_empty(), "qemu left running: {left:?}");
}

/// GET `url` from the network namespace of `pid` (the machine's curl): the body, or None.
fn fetch_from(pid: &str, url: &str) -> Option<String> {
    let out = Command::new("nsenter").args(["-t", pid, "-n", "curl", "-sS", "--max-time", "3", url]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn a_unikernel_answers_on_its_service_ips_on_the_ebpf_path() {
    reach_a_unikernel("ebpf", &[]);
}

#[test]
fn a_unikernel_answers_on_its_service_ips_on_the_tun_path() {
    reach_a_unikernel("tun", &["--no-ebpf"]);
}

/// The scenario, with the NetManager's datapath `datapath` (started with `nm_args`).
fn reach_a_unikernel(datapath: &'static str, nm_args: &[&str]) {
    if !can_run(&format!("a_unikernel_answers_on_its_service_ips_on_the_{datapath}_path")) {
        return;
    }
    let net = Net::new(&["uk"]).unwrap();
    let h = net.host("uk");
    let d = net.dir.path().to_path_buf();
    let ctr_ns = format!("oak-uk-{datapath}-{}", std::process::id());
    let image = oak_node_engine::testimage::build_busybox_image(&d, "localhost/oak/busybox:uk").unwrap();
    let guest = oak_node_engine::testguest::build_linux_guest(&d, "guest", PAGE).unwrap();
    let stack = common::start_with(h, &d, &ctr_ns, nm_args, &["-u=true"]);

    let sla = json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{"applicationID": "",
        "application_name": format!("uk{datapath}"), "application_namespace": "doc",
        "application_desc": "a networked unikernel",
        "microservices": [
          {"microserviceID": "", "microservice_name": "vm", "microservice_namespace": "doc",
           "virtualization": "unikernel", "code": guest.display().to_string(), "memory": 256, "vcpus": 1},
          {"microserviceID": "", "microservice_name": "client", "microservice_namespace": "doc",
           "virtualization": "container", "code": format!("oci-archive:{}", image.display()),
           "cmd": ["sleep", "3600"], "memory": 32, "vcpus": 0.1}]}]});
    let (vm, client) = h.run(move || {
        let api = admin_api();
        let (code, v) = api.call("POST", "/api/application", Some(&sla));
        assert_eq!(code, 200, "{v}");
        let (_, services) = api.call("GET", "/api/services", None);
        let by_name = |n: &str| {
            services.as_array().and_then(|a| a.iter().find(|s| s["microservice_name"] == n)).cloned().unwrap()
        };
        let ids = ["vm", "client"].map(|n| by_name(n)["microserviceID"].as_str().unwrap().to_string());
        for id in &ids {
            let (code, v) = api.call("POST", &format!("/api/service/{id}/instance"), None);
            assert_eq!(code, 200, "{v}");
        }
        let running = |id: &str| {
            let (_, s) = api.call("GET", &format!("/api/service/{id}"), None);
            let i = s["instance_list"][0].clone();
            assert!(!matches!(i["status"].as_str(), Some("FAILED" | "DEAD")), "instance failed: {i}");
            (i["status"] == "RUNNING").then_some(s)
        };
        let vm = wait_for("the VM RUNNING", Duration::from_secs(120), || running(&ids[0]));
        let client = wait_for("the client RUNNING", Duration::from_secs(60), || running(&ids[1]));
        (vm, client)
    });
    // the worker runs the datapath this run is about
    let (_, workers) = h.run(|| {
        let api = admin_api();
        api.call("GET", "/api/cluster/doc/workers", None)
    });
    assert_eq!(workers[0]["network"]["datapath"], datapath, "{workers}");
    let vm_id = vm["microserviceID"].as_str().unwrap().to_string();
    let ns_address = vm["instance_list"][0]["ns_address"].as_str().unwrap_or_default().to_string();
    assert!(!ns_address.is_empty(), "the VM has an overlay address: {vm}");
    let ip = |k: &str| vm["addresses"][k].as_str().unwrap_or_else(|| panic!("no addresses.{k}: {vm}")).to_string();
    let (rr, closest) = (ip("rr_ip"), ip("closest_ip"));
    assert!(client["instance_list"][0]["ns_address"].as_str().is_some_and(|a| !a.is_empty()));

    // the guest boots (TCG can take a while), configures what it was given and serves
    let pid = common::task_pid(&ctr_ns, "client");
    for (what, addr) in [("round-robin", &rr), ("closest", &closest), ("overlay address", &ns_address)] {
        let url = format!("http://{addr}:8080/index.html");
        let body = wait_for(&format!("the guest's page by its {what} {addr}"), Duration::from_secs(180), || {
            fetch_from(&pid, &url).filter(|b| b == PAGE)
        });
        assert_eq!(body, PAGE);
    }
    let (code, logs) = h.run(move || {
        let api = admin_api();
        api.call("GET", &format!("/api/service/{vm_id}/instance/0/logs?offset=-1"), None)
    });
    assert_eq!(code, 200, "{logs}");
    let console = logs["text"].as_str().unwrap_or_default().to_string();
    assert!(
        console.contains(&format!("{} eth0 {ns_address}/", oak_node_engine::testguest::READY)),
        "the guest configured the address the API reports ({ns_address}); its console:\n{console}"
    );

    // the NodeEngine killed and started again: the guest keeps running (the same qemu), is re-adopted and
    // still answers by its service IP
    let before = qemus_under(&d);
    assert_eq!(before.len(), 1, "one qemu: {before:?}");
    let mut stack = stack;
    stack.nodeengine.kill9();
    stack.nodeengine = common::spawn_nodeengine(h, "nodeengine-2", &stack.ne_args);
    stack.nodeengine.wait_log("re-adopted running unikernel VM", Duration::from_secs(30)).unwrap();
    assert_eq!(qemus_under(&d), before, "the same qemu runs on");
    let url = format!("http://{rr}:8080/index.html");
    wait_for("the guest's page after the NodeEngine restart", Duration::from_secs(30), || {
        fetch_from(&pid, &url).filter(|b| b == PAGE)
    });

    // undeploy: no qemu, no namespace holder, no files of the VM left
    let vm_id = vm["microserviceID"].as_str().unwrap().to_string();
    let vms = d.join("ne").join("unikernels");
    let holders: Vec<u32> = std::fs::read_dir(&vms)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("netns-holder.pid")).ok()?.trim().parse().ok())
        .collect();
    assert_eq!(holders.len(), 1, "one namespace holder for the one VM");
    h.run(move || {
        let api = admin_api();
        let (code, v) = api.call("DELETE", &format!("/api/service/{vm_id}/instance/0"), None);
        assert_eq!(code, 200, "{v}");
        wait_for("the VM undeployed", Duration::from_secs(60), || {
            let (_, s) = api.call("GET", &format!("/api/service/{vm_id}"), None);
            s["instance_list"].as_array().is_some_and(|l| l.is_empty()).then_some(())
        });
    });
    assert_no_vm_left(&d);
    for pid in holders {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!cmd.starts_with(b"sleep"), "the namespace holder {pid} is gone");
    }

    // the rest goes with the application; then the test's containerd namespace
    h.run(move || {
        let api = admin_api();
        let (_, apps) = api.call("GET", "/api/applications", None);
        let app = apps[0]["applicationID"].as_str().unwrap().to_string();
        let (code, v) = api.call("DELETE", &format!("/api/application/{app}"), None);
        assert_eq!(code, 200, "{v}");
    });
    let containers = || {
        let out = Command::new("ctr").args(["-n", &ctr_ns, "containers", "ls", "-q"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_for("the client's container removed", Duration::from_secs(30), || containers().is_empty().then_some(()));
    drop(stack);
    let images = Command::new("ctr").args(["-n", &ctr_ns, "images", "ls", "-q"]).output().unwrap();
    for img in String::from_utf8_lossy(&images.stdout).lines() {
        let _ = Command::new("ctr").args(["-n", &ctr_ns, "images", "rm", "--sync", img]).output();
    }
    let _ = Command::new("ctr").args(["namespaces", "rm", &ctr_ns]).output();
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
    let stack = common::start_with(h, &d, &ctr_ns, &[], &["-u=true", "--vm-answer-timeout", "30"]);
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
    // nothing of either VM left
    assert_no_vm_left(&d);
    drop(stack);
    let _ = Command::new("ctr").args(["namespaces", "rm", &ctr_ns]).output();
}
