//! MicroVMs: the test's busybox OCI image booted by a Linux guest (Debian's kernel, the guest's
//! busybox initramfs) on qemu's microvm machine, without a NetManager.

mod common;

use oak_node_engine::runtime::backend::qemu::microvm_unavailable;
use oak_node_engine::runtime::guest::{GuestKernel, EXITED};
use oak_node_engine::runtime::{instance_id, unikernel, Runtime};

fn skip() -> Option<String> {
    if let Some(r) = common::skip_reason() {
        return Some(r);
    }
    if oak_node_engine::metrics::find_qemu().is_none() {
        return Some("no qemu-system-* in PATH".into());
    }
    let kernel = GuestKernel::newest().map(|_| ()).ok_or("no guest kernel");
    microvm_unavailable(kernel.err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvm_runs_an_oci_image_stops_cleanly_and_is_readopted() {
    if let Some(r) = skip() {
        eprintln!("SKIPPED: {r}");
        return;
    }
    // TCG: deterministic on CI hosts where nested KVM misbehaves (this binary holds this single test)
    std::env::set_var("OAK_NODE_ENGINE_NO_KVM", "1");
    let env = common::Env::new("mvm");
    // without -u a worker offers containers only (what the schedulers see)
    let (plain, _) = env.runtime().await;
    assert_eq!(plain.offered(), ["container"]);
    drop(plain);
    let mut cfg = env.runtime_config();
    cfg.unikernel = true;
    let (rt, mut rx) = Runtime::connect(cfg.clone()).await.unwrap();
    assert!(rt.offered().contains(&"microvm".to_string()), "{:?}", rt.offered());

    // A one-shot workload: the image's rootfs, the SLA's command and environment, its exit code reported.
    let mut spec = env.spec("svc-mvm-once", &["/bin/sh", "-c", "echo \"in the microVM: $GREETING\"; exit 3"]);
    spec.virtualization = "microvm".into();
    spec.environment = vec!["GREETING=hello".into()];
    spec.one_shot = true;
    spec.memory_mb = 128;
    rt.deploy(spec, 0);
    let mut seen = Vec::new();
    let failed = common::wait_for(&mut rx, "svc-mvm-once", &["FAILED"], &mut seen).await;
    assert_eq!(seen, ["CREATING", "CREATED", "RUNNING", "FAILED"], "{}", failed.detail);
    assert_eq!(failed.exit_code, Some(3), "{}", failed.detail);
    assert!(failed.logs.contains("in the microVM: hello"), "logs: {}", failed.logs);
    assert!(failed.logs.contains(&format!("{EXITED}3")), "logs: {}", failed.logs);
    rt.undeploy("svc-mvm-once", 0).await.unwrap();

    // A long-running workload: RUNNING once started, its memory sampled from qemu, re-adopted by a new
    // runtime, then stopped through QMP: the workload sees SIGTERM and the VM powers off.
    let mut spec = env.spec(
        "svc-mvm-up",
        &["/bin/sh", "-c", "trap 'echo got SIGTERM; exit 0' TERM; echo trap set; while true; do sleep 1; done"],
    );
    spec.virtualization = "microvm".into();
    spec.memory_mb = 128;
    let id = instance_id(&spec.job_name, 1);
    rt.deploy(spec, 1);
    common::wait_for(&mut rx, "svc-mvm-up", &["RUNNING"], &mut Vec::new()).await;
    let pid = rt.pid_of("svc-mvm-up", 1).unwrap();
    assert!(unikernel::is_our_vm(pid, &id));
    let usage = rt.usage();
    let u = usage.iter().find(|u| u.service_id == "svc-mvm-up").expect("the running microVM is sampled");
    assert!(u.memory_bytes > 0, "{usage:?}");
    let dir = env.data_dir().join("microvms").join(&id);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mounts.contains(&dir.join("rootfs").display().to_string()), "the rootfs is mounted");

    // stopped only once the workload has set its trap (the console says so)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(rt.log_path(&id)).unwrap_or_default().contains("trap set") {
        assert!(std::time::Instant::now() < deadline, "the workload never said it set its trap");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let cfg_kvm = cfg.clone();
    let (rt2, mut rx2) = Runtime::connect(cfg).await.unwrap();
    let adopted = rt2.adopt().await.unwrap();
    let a = adopted.iter().find(|s| s.service_id == "svc-mvm-up").expect("microVM re-adopted");
    assert_eq!(a.status, "RUNNING");
    assert_eq!(rt2.pid_of("svc-mvm-up", 1), Some(pid));
    drop(rt);
    rt2.undeploy("svc-mvm-up", 1).await.unwrap();
    // the console's end goes with UNDEPLOYED (the log is removed then)
    let console = common::wait_for(&mut rx2, "svc-mvm-up", &["UNDEPLOYED"], &mut Vec::new()).await.logs;
    assert!(console.contains("got SIGTERM") && console.contains(&format!("{EXITED}0")), "console: {console}");
    assert!(!unikernel::is_our_vm(pid, &id), "qemu still running");
    assert!(!dir.exists(), "microVM files left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir.display().to_string()), "rootfs still mounted");
    let key = format!("oak-vm-{id}");
    assert!(!rt2.containerd().snapshot_exists(&key).await.unwrap(), "snapshot {key} left behind");

    // KVM required (--vm-accel kvm): where KVM cannot run guests the instance FAILS naming it, it does not
    // fall back to TCG; where it can, the microVM runs
    let mut kvm_only = cfg_kvm;
    kvm_only.vm_accel = unikernel::Accel::Kvm;
    let (rt3, mut rx3) = Runtime::connect(kvm_only).await.unwrap();
    let mut spec = env.spec("svc-mvm-kvm", &["/bin/sh", "-c", "echo under KVM; sleep 600"]);
    spec.virtualization = "microvm".into();
    rt3.deploy(spec, 0);
    let mut seen = Vec::new();
    let st = common::wait_for(&mut rx3, "svc-mvm-kvm", &["RUNNING", "FAILED"], &mut seen).await;
    eprintln!("with --vm-accel kvm: {} ({})", st.status, st.detail);
    if st.status == "FAILED" {
        assert!(st.detail.to_lowercase().contains("kvm"), "{}", st.detail);
    } else {
        assert!(oak_node_engine::metrics::kvm_usable());
    }
    rt3.undeploy("svc-mvm-kvm", 0).await.unwrap();
    common::wait_for(&mut rx3, "svc-mvm-kvm", &["UNDEPLOYED"], &mut Vec::new()).await;
    env.cleanup(&rt3).await;
}
