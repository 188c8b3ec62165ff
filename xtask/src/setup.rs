//! `cargo xtask setup`: everything a fresh Debian machine needs, installed idempotently.
use std::process::Command;

use crate::util::{have, sh, step, succeeds};

/// Debian packages the project needs, with why.
const PACKAGES: &[(&str, &str)] = &[
    ("protobuf-compiler", "protoc, needed by the containerd-client and etcd-client crates' builds"),
    ("libprotobuf-dev", "protoc's well-known .proto files (google/protobuf/*), imported by the etcd-client crate's"),
    ("etcd-server", "etcd, the root's store on etcd: its tests start one (/usr/bin/etcd)"),
    ("containerd", "container runtime used by the NodeEngine"),
    ("runc", "OCI runtime behind containerd"),
    ("iproute2", "ip/tc for namespaces, veth, bridges in tests and the 1-DOC setup"),
    ("iptables", "port exposure and egress NAT for instances"),
    ("nftables", "port exposure and egress NAT for instances"),
    ("iperf3", "throughput benchmarks"),
    ("curl", "HTTP client the field tests run inside instances' network namespaces"),
    ("busybox-static", "a static userland to build OCI test images offline"),
    ("qemu-system-x86", "the VM runtime: unikernels and microVMs (KVM or TCG)"),
    ("linux-image-amd64", "the kernel (and its virtio modules) of microVM guests and of the test unikernels"),
    ("llvm-22-dev", "LLVM for bpf-linker"),
    ("libpolly-22-dev", "LLVM for bpf-linker"),
    ("libzstd-dev", "LLVM for bpf-linker"),
    ("zlib1g-dev", "LLVM for bpf-linker"),
    ("python3-venv", "a venv for Oakestra's own CLI (oak-cli) in compatibility tests"),
    ("gcc-aarch64-linux-gnu", "cross linker and C compiler for the aarch64 bundles (cargo xtask dist)"),
    ("libc6-dev-arm64-cross", "aarch64 C library to link the aarch64 bundles against"),
    ("qemu-user-static", "runs the aarch64 binaries in the bundle test"),
    ("chromium", "the browser the dashboard test drives, headless"),
    ("chromium-driver", "chromedriver: the WebDriver server the dashboard test talks to"),
];

fn installed(pkg: &str) -> bool {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]).output();
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn run_setup_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(p, _)| !installed(p)).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        step("Debian packages: all present");
        return Ok(());
    }
    step(&format!("Debian packages: installing {}", missing.join(" ")));
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("    {p}: {why}");
    }
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    run_setup_packages()?;
    setup_lint_components()?;

    let tc = crate::ebpf::EBPF_TOOLCHAIN;
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", tc, "--installed"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")))
        .unwrap_or(false);
    if has_src {
        step(&format!("{tc} with rust-src: present"));
    } else {
        step(&format!("{tc} with rust-src: installing (the eBPF build's pinned nightly)"));
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            tc,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }

    if have("bpf-linker") && succeeds(Command::new("bpf-linker").arg("--version")) {
        step("bpf-linker: present");
    } else {
        step("bpf-linker: building against LLVM 22 (takes a few minutes)");
        sh(crate::util::cargo()
            .args(["install", "bpf-linker", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    setup_arm_target()?;
    setup_oak_cli()?;
    step("setup complete");
    Ok(())
}

/// The lint gate's tools: rustfmt and clippy on the toolchain that builds the workspace (the one running
/// this, `RUSTUP_TOOLCHAIN` under cargo), and rustfmt on stable, which formats netmanager-ebpf (its own
/// toolchain file pins a nightly for the build).
fn setup_lint_components() -> anyhow::Result<()> {
    let active = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    for (toolchain, components) in [(active.as_str(), &["rustfmt", "clippy"][..]), ("stable", &["rustfmt"][..])] {
        let installed = Command::new("rustup")
            .args(["component", "list", "--installed", "--toolchain", toolchain])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let missing: Vec<&str> = components
            .iter()
            .copied()
            .filter(|c| !installed.lines().any(|l| l.starts_with(&format!("{c}-"))))
            .collect();
        if missing.is_empty() {
            step(&format!("{toolchain}: {} present", components.join(", ")));
            continue;
        }
        step(&format!("{toolchain}: adding {} (the lint gate of `cargo xtask test`)", missing.join(", ")));
        sh(Command::new("rustup").args(["component", "add", "--toolchain", toolchain]).args(&missing))?;
    }
    Ok(())
}

/// The Rust standard library for aarch64 on the toolchain that builds the workspace (the bundles for ARM
/// boards are cross-built).
fn setup_arm_target() -> anyhow::Result<()> {
    let active = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    let arm = crate::dist::ARM;
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed", "--toolchain", &active])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == arm))
        .unwrap_or(false);
    if installed {
        step(&format!("{active}: {arm} present"));
        return Ok(());
    }
    step(&format!("{active}: adding {arm} (the ARM bundles of `cargo xtask dist`)"));
    sh(Command::new("rustup").args(["target", "add", "--toolchain", &active, arm]))
}

/// Where Oakestra's own CLI is installed (a venv), so compatibility tests drive the real client.
pub const OAK_CLI_VENV: &str = "/var/cache/oakestra-rs/oak-cli-venv";
/// The oak-cli release the compatibility tests pin.
pub const OAK_CLI_VERSION: &str = "0.5.5";

fn setup_oak_cli() -> anyhow::Result<()> {
    let oak = std::path::Path::new(OAK_CLI_VENV).join("bin/oak");
    let pip = std::path::Path::new(OAK_CLI_VENV).join("bin/pip");
    let pinned = Command::new(&pip)
        .args(["show", "oak-cli"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("Version: {OAK_CLI_VERSION}")))
        .unwrap_or(false);
    if oak.exists() && pinned {
        step(&format!("oak-cli {OAK_CLI_VERSION}: present in {OAK_CLI_VENV}"));
        return Ok(());
    }
    step(&format!(
        "oak-cli {OAK_CLI_VERSION}: installing into {OAK_CLI_VENV} (Oakestra's CLI, for compatibility tests)"
    ));
    sh(Command::new("python3").args(["-m", "venv", OAK_CLI_VENV]))?;
    sh(Command::new(&pip).args(["install", "-q", &format!("oak-cli=={OAK_CLI_VERSION}")]))?;
    Ok(())
}
