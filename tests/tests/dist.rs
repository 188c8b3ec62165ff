//! The release bundles (`cargo xtask dist`), checked on the debug build the tests already have: a worker
//! bundle unpacks, its install.sh verifies the checksums, installs binaries, eBPF object, units and sample
//! configuration into a staging root, keeps a configuration the user edited when run again, and refuses a
//! bundle whose files were altered; the installed binaries run.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use testbed::{bin, bin_dir};

fn run(c: &mut Command) -> (bool, String) {
    let out = c.output().expect("runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The target directory of this build (where `cargo xtask test` put the binaries and the eBPF object).
fn target_dir() -> std::path::PathBuf {
    bin_dir().parent().unwrap().to_path_buf()
}

/// `cargo xtask dist` of the debug build, for `roles` and `target`, into `out`.
fn dist(roles: &str, target: &str, out: &Path) {
    let (ok, text) = run(Command::new(bin("xtask"))
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["dist", "--profile", "debug", "--skip-build", "--role", roles, "--target", target, "--out-dir"])
        .arg(out));
    assert!(ok, "xtask dist: {text}");
}

#[test]
fn a_worker_bundle_installs_idempotently_and_refuses_altered_files() {
    if !target_dir().join("bpf/netmanager-ebpf.o").exists() {
        assert!(std::env::var_os("CI").is_none(), "eBPF object missing: `cargo xtask build-ebpf` builds it");
        eprintln!("SKIPPED: no eBPF object (cargo xtask build-ebpf)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("dist");
    dist("worker,root", "x86_64-unknown-linux-gnu", &out);
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("oakestra-rs-worker-{version}-x86_64-unknown-linux-gnu");
    let tarball = out.join(format!("{name}.tar.gz"));
    assert!(
        tarball.exists() && out.join(format!("oakestra-rs-root-{version}-x86_64-unknown-linux-gnu.tar.gz")).exists()
    );
    let unpack = d.path().join("unpack");
    std::fs::create_dir_all(&unpack).unwrap();
    assert!(run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&unpack)).0);
    let b = unpack.join(&name);
    let stage = d.path().join("device");
    let install = |b: &Path| run(Command::new(b.join("install.sh")).env("DESTDIR", &stage).env("PREFIX", "/usr/local"));
    let (ok, text) = install(&b);
    assert!(ok, "install.sh: {text}");
    for f in ["usr/local/bin/NodeEngine", "usr/local/bin/NetManager", "usr/local/bin/oak-image"] {
        let m = std::fs::metadata(stage.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(m.permissions().mode() & 0o111 != 0, "{f} is executable");
    }
    assert!(stage.join("usr/local/lib/oakestra-rs/netmanager-ebpf.o").exists());
    for u in ["oak-netmanager.service", "oak-nodeengine.service"] {
        let unit = std::fs::read_to_string(stage.join("etc/systemd/system").join(u)).unwrap();
        assert!(unit.contains("ExecStart=") && unit.contains("EnvironmentFile=/etc/oakestra-rs/worker.env"), "{u}");
    }
    let cfg = stage.join("etc/netmanager/netcfg.json");
    assert_eq!(std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777, 0o600);
    // the installed binaries run (and explain themselves)
    for (b, word) in [("NodeEngine", "cluster"), ("NetManager", "netcfg.json")] {
        let (ok, text) = run(Command::new(stage.join("usr/local/bin").join(b)).arg("--help"));
        assert!(ok && text.contains(word), "{b} --help: {text}");
    }
    // again, after the user edited the configuration: kept
    std::fs::write(&cfg, "{\"edited\": true}").unwrap();
    let (ok, text) = install(&b);
    assert!(ok && text.contains("kept"), "second install: {text}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "{\"edited\": true}");
    // an altered file: refused before anything is installed
    let nm = b.join("bin/NetManager");
    let mut bytes = std::fs::read(&nm).unwrap();
    bytes.push(0);
    std::fs::write(&nm, bytes).unwrap();
    let before = std::fs::metadata(stage.join("usr/local/bin/NetManager")).unwrap().len();
    let (ok, text) = install(&b);
    assert!(!ok && text.contains("FAILED"), "an altered bundle must be refused: {text}");
    assert_eq!(std::fs::metadata(stage.join("usr/local/bin/NetManager")).unwrap().len(), before);
}

/// The aarch64 worker bundle (cross-built) holds ARM binaries, which run (`--help`) under qemu-user.
#[test]
fn the_aarch64_worker_bundle_holds_arm_binaries_that_run() {
    let arm = "aarch64-unknown-linux-gnu";
    let target = target_dir();
    if !target.join(arm).join("debug/NetManager").exists() || !target.join("bpf/netmanager-ebpf.o").exists() {
        assert!(std::env::var_os("CI").is_none(), "the aarch64 worker binaries are built by `cargo xtask test`");
        eprintln!("SKIPPED: no aarch64 build (cargo xtask test cross-builds it)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("dist");
    dist("worker", arm, &out);
    let name = format!("oakestra-rs-worker-{}-{arm}", env!("CARGO_PKG_VERSION"));
    assert!(run(Command::new("tar").arg("-xzf").arg(out.join(format!("{name}.tar.gz"))).arg("-C").arg(d.path())).0);
    let b = d.path().join(&name);
    for exe in ["NodeEngine", "NetManager", "oak-image"] {
        let bytes = std::fs::read(b.join("bin").join(exe)).unwrap();
        // ELF, 64-bit, e_machine 183 (EM_AARCH64)
        assert_eq!(&bytes[..5], b"\x7fELF\x02", "{exe} is a 64-bit ELF");
        assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), 183, "{exe} is built for aarch64");
    }
    let qemu = ["qemu-aarch64-static", "qemu-aarch64"]
        .into_iter()
        .find(|q| run(Command::new("sh").args(["-c", &format!("command -v {q}")])).0);
    let Some(qemu) = qemu else {
        assert!(std::env::var_os("CI").is_none(), "qemu-user-static is installed by `cargo xtask setup`");
        eprintln!("SKIPPED the run under qemu-user: not installed");
        return;
    };
    for (exe, word) in [("NodeEngine", "cluster"), ("NetManager", "netcfg.json")] {
        let (ok, text) =
            run(Command::new(qemu).args(["-L", "/usr/aarch64-linux-gnu"]).arg(b.join("bin").join(exe)).arg("--help"));
        assert!(ok && text.contains(word), "{exe} --help under {qemu}: {text}");
    }
}
