//! Unikernels on qemu, with tiny hand-assembled multiboot kernels (no guest OS needed).

mod common;

use std::io::Write;

use oak_node_engine::runtime::{instance_id, unikernel, Runtime};
use oak_proto::v1::ServiceSpec;

/// A 32-bit multiboot (a.out kludge) kernel loaded at 1 MiB that writes `msg` to COM1, then either
/// halts forever or triple-faults (qemu with -no-reboot then exits with 0, like a poweroff).
fn multiboot_kernel(msg: &[u8], halt_forever: bool) -> Vec<u8> {
    const BASE: u32 = 0x0010_0000;
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 0x0001_0000;
    let mut code = vec![0x66, 0xBA, 0xF8, 0x03]; // mov dx, 0x3f8
    for &b in msg {
        code.extend([0xB0, b, 0xEE]); // mov al, b; out dx, al
    }
    let idt_off = 32 + code.len() as u32 + 7 + 1 + 4;
    if !halt_forever {
        code.extend([0x0F, 0x01, 0x1D]); // lidt [abs32]: an empty IDT
        code.extend((BASE + idt_off).to_le_bytes());
        code.push(0xCC); // int3 -> #GP -> #DF -> triple fault
    } else {
        code.extend([0x90; 8]);
    }
    code.extend([0xFA, 0xF4, 0xEB, 0xFC]); // cli; hlt; jmp back
    let mut k = Vec::new();
    for v in [MAGIC, FLAGS, 0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)), BASE, BASE, 0, 0, BASE + 32] {
        k.extend(v.to_le_bytes());
    }
    k.extend(code);
    k.extend([0u8; 6]); // IDT descriptor: limit 0, base 0
    k
}

fn tar_gz(dir: &std::path::Path, kernel: &[u8]) -> std::path::PathBuf {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(kernel.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "kernel", kernel).unwrap();
    let gz = b.into_inner().unwrap().finish().unwrap();
    let p = dir.join(format!("uk-{}.tar.gz", common::unique("k")));
    std::fs::File::create(&p).unwrap().write_all(&gz).unwrap();
    p
}

fn skip() -> Option<String> {
    if let Some(r) = common::skip_reason() {
        return Some(r);
    }
    if oak_node_engine::metrics::find_qemu().is_none() {
        return Some("no qemu-system-* in PATH".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unikernel_runs_completes_and_is_readopted() {
    if let Some(r) = skip() {
        eprintln!("SKIPPED: {r}");
        return;
    }
    // Nested KVM on CI hosts can abort qemu at random (MSR errors): test with TCG, deterministic.
    // (This test binary holds this single test, so changing the environment is safe.)
    std::env::set_var("OAK_NODE_ENGINE_NO_KVM", "1");
    let env = common::Env::new("uk");
    let mut cfg = env.runtime_config();
    cfg.unikernel = true;
    let (rt, mut rx) = Runtime::connect(cfg.clone()).await.unwrap();

    // An image path outside the image directories is refused before qemu sees it.
    let spec = ServiceSpec {
        service_id: "svc-uk-outside".into(),
        job_name: "t.uk.outside.x".into(),
        virtualization: "unikernel".into(),
        code: "file:///etc/passwd".into(),
        ..Default::default()
    };
    rt.deploy(spec, 0);
    let f = common::wait_for(&mut rx, "svc-uk-outside", &["FAILED"], &mut Vec::new()).await;
    assert!(f.detail.contains("outside the image directories"), "{}", f.detail);
    rt.undeploy("svc-uk-outside", 0).await.unwrap();

    // One-shot VM: prints, then "powers off" → COMPLETED, serial output in the logs.
    let spec = ServiceSpec {
        service_id: "svc-uk-once".into(),
        job_name: "t.uk.once.x".into(),
        virtualization: "unikernel".into(),
        code: tar_gz(env.dir.path(), &multiboot_kernel(b"UNIKERNEL-OK\n", false)).display().to_string(),
        one_shot: true,
        memory_mb: 32,
        ..Default::default()
    };
    rt.deploy(spec, 0);
    let mut seen = Vec::new();
    let done = common::wait_for(&mut rx, "svc-uk-once", &["COMPLETED"], &mut seen).await;
    assert_eq!(seen, ["CREATING", "CREATED", "RUNNING", "COMPLETED"]);
    assert_eq!(done.exit_code, Some(0));
    assert!(done.logs.contains("UNIKERNEL-OK"), "logs: {:?}", done.logs);
    rt.undeploy("svc-uk-once", 0).await.unwrap();

    // Long-running VM, re-adopted by a new runtime (which finds it even without its pid recorded), then
    // undeployed by it.
    let spec = ServiceSpec {
        service_id: "svc-uk-up".into(),
        job_name: "t.uk.up.x".into(),
        virtualization: "unikernel".into(),
        code: tar_gz(env.dir.path(), &multiboot_kernel(b"UP\n", true)).display().to_string(),
        ..Default::default()
    };
    let id = instance_id(&spec.job_name, 3);
    rt.deploy(spec, 3);
    common::wait_for(&mut rx, "svc-uk-up", &["RUNNING"], &mut Vec::new()).await;
    let pid = rt.pid_of("svc-uk-up", 3).unwrap();
    // its use is sampled from qemu's process: the guest's memory and the CPU time spent running it
    let usage = rt.usage();
    let u = usage.iter().find(|u| u.service_id == "svc-uk-up").expect("the running VM is sampled");
    assert!(u.memory_bytes > 0, "{usage:?}");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("qemu process exists");
    assert!(
        !stat.contains(") Z "),
        "qemu {pid} exited; log: {}",
        std::fs::read_to_string(rt.log_path(&id)).unwrap_or_default()
    );

    // as if the NodeEngine had been killed between recording the VM and learning qemu's pid: the record
    // says pid 0, and the next runtime finds qemu by its command line
    let record = unikernel::vm_dir(&env.data_dir(), &id).join("instance.json");
    let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["pid"], pid, "the record holds qemu's pid once known");
    rec["pid"] = 0.into();
    std::fs::write(&record, rec.to_string()).unwrap();
    let (rt2, mut rx2) = Runtime::connect(cfg).await.unwrap();
    let adopted = rt2.adopt().await.unwrap();
    let a = adopted.iter().find(|s| s.service_id == "svc-uk-up").expect("VM re-adopted");
    assert_eq!(a.status, "RUNNING");
    assert_eq!(rt2.pid_of("svc-uk-up", 3), Some(pid));
    rt2.undeploy("svc-uk-up", 3).await.unwrap();
    common::wait_for(&mut rx2, "svc-uk-up", &["UNDEPLOYED"], &mut Vec::new()).await;
    assert!(!unikernel::is_our_vm(pid, &id), "qemu still running");
    assert!(!unikernel::vm_dir(&env.data_dir(), &id).exists(), "VM files left behind");
    env.cleanup(&rt).await;
}
