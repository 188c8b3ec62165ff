//! `cargo xtask dist`: release bundles, one per role (root, cluster, worker), each a `.tar.gz` holding the
//! role's binaries (and, for workers, the eBPF object), systemd units, sample configuration, an
//! `install.sh` that installs them idempotently, and `SHA256SUMS`. A worker bundle needs no Rust, LLVM or
//! compiler on the device: its binaries (stripped) link only the C library (glibc 2.36 or newer, as built
//! on Debian 12), and the NodeEngine needs containerd and runc there. Bundles are built for x86_64 and,
//! cross-compiled, for aarch64 (the eBPF object is the same for both).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args as ClapArgs;

use crate::util::{cargo, sh, step};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Roles to bundle (root, cluster, worker); all three by default.
    #[arg(long, value_delimiter = ',', default_values_t = ["root".to_string(), "cluster".to_string(), "worker".to_string()])]
    pub role: Vec<String>,
    /// Where the bundles go (default: <target-dir>/dist).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Do not build (use the binaries and the eBPF object already in the target directory).
    #[arg(long)]
    pub skip_build: bool,
    /// Which build to bundle: release (for devices), or debug (the tests check the bundling with it).
    #[arg(long, default_value = "release", value_parser = ["release", "debug"])]
    pub profile: String,
    /// Targets to bundle for: x86_64 (this machine's) and aarch64 (Raspberry Pi and other ARM boards,
    /// cross-built with Debian's gcc-aarch64-linux-gnu, which `cargo xtask setup` installs).
    #[arg(long, value_delimiter = ',', default_values_t = [HOST.to_string(), ARM.to_string()])]
    pub target: Vec<String>,
}

/// This machine's target.
pub const HOST: &str = "x86_64-unknown-linux-gnu";
/// The ARM boards' target.
pub const ARM: &str = "aarch64-unknown-linux-gnu";

/// The binaries of every role.
pub const BINS: [&str; 6] =
    ["root-orchestrator", "oak-dashboard", "cluster-orchestrator", "NodeEngine", "NetManager", "oak-image"];

/// `cargo build` of `bins` for `target` (cross-compiling with Debian's aarch64 toolchain for ARM).
pub fn build_for(target: &str, release: bool, bins: &[&str]) -> anyhow::Result<()> {
    let mut c = cargo();
    c.arg("build");
    if release {
        c.arg("--release");
    }
    c.args(["-p", "oak-orchestrators", "-p", "oak-node-engine", "-p", "oak-netmanager", "-p", "oak-dashboard"]);
    for b in bins {
        c.args(["--bin", b]);
    }
    if target != HOST {
        c.args(["--target", target])
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
            .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
            .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar");
    }
    sh(&mut c)
}

/// Where the binaries of `target` and `profile` are.
pub fn bin_dir(target: &str, profile: &str) -> PathBuf {
    let t = crate::util::target_dir();
    if target == HOST {
        t.join(profile)
    } else {
        t.join(target).join(profile)
    }
}

/// A systemd unit of a bundle: every one starts after the network, restarts on failure and reads an env
/// file (`-` before its path: optional).
struct Unit {
    description: &'static str,
    /// More units to start after, and to want, each with a leading space.
    after: &'static str,
    wants: &'static str,
    env: &'static str,
    exec: &'static str,
}

impl Unit {
    fn render(&self) -> String {
        let Unit { description, after, wants, env, exec } = self;
        format!(
            "[Unit]\nDescription=oakestra-rs {description}\nAfter=network-online.target{after}\n\
             Wants=network-online.target{wants}\n\n[Service]\nEnvironmentFile={env}\nExecStart={exec}\n\
             Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n"
        )
    }
}

struct Role {
    name: &'static str,
    bins: &'static [&'static str],
    units: &'static [(&'static str, Unit)],
    configs: &'static [(&'static str, &'static str)],
}

const ROLES: &[Role] = &[
    Role {
        name: "root",
        bins: &["root-orchestrator", "oak-dashboard"],
        units: &[
            (
                "oak-root.service",
                Unit {
                    description: "root orchestrator (API :10000, clusters :50052, service manager :10099)",
                    after: "",
                    wants: "",
                    env: "-/etc/oakestra-rs/root.env",
                    exec: "/usr/local/bin/root-orchestrator",
                },
            ),
            (
                "oak-dashboard.service",
                Unit {
                    description: "dashboard (:80, over the root's REST API)",
                    after: " oak-root.service",
                    wants: "",
                    env: "-/etc/oakestra-rs/dashboard.env",
                    exec: "/usr/local/bin/oak-dashboard",
                },
            ),
        ],
        configs: &[("oakestra-rs/root.env", ROOT_ENV), ("oakestra-rs/dashboard.env", DASHBOARD_ENV)],
    },
    Role {
        name: "cluster",
        bins: &["cluster-orchestrator"],
        units: &[(
            "oak-cluster.service",
            Unit {
                description: "cluster orchestrator (workers :10100, network service :10110)",
                after: "",
                wants: "",
                env: "/etc/oakestra-rs/cluster.env",
                exec: "/usr/local/bin/cluster-orchestrator",
            },
        )],
        configs: &[("oakestra-rs/cluster.env", CLUSTER_ENV)],
    },
    Role {
        name: "worker",
        bins: &["NodeEngine", "NetManager", "oak-image"],
        units: &[
            (
                "oak-netmanager.service",
                Unit {
                    description: "NetManager (worker overlay, local API :6000, tunnel :50103/udp)",
                    after: "",
                    wants: "",
                    env: "/etc/oakestra-rs/worker.env",
                    exec: "/bin/sh -c 'exec /usr/local/bin/NetManager -p 6000 -c /etc/netmanager/netcfg.json $NETMANAGER_OPTS'",
                },
            ),
            (
                "oak-nodeengine.service",
                Unit {
                    description: "NodeEngine (runs the instances; needs containerd)",
                    after: " containerd.service oak-netmanager.service",
                    wants: " oak-netmanager.service",
                    env: "/etc/oakestra-rs/worker.env",
                    exec: "/bin/sh -c 'exec /usr/local/bin/NodeEngine -a \"$CLUSTER_ADDRESS\" -n 6000 $NODEENGINE_OPTS'",
                },
            ),
        ],
        configs: &[("netmanager/netcfg.json", NETCFG), ("oakestra-rs/worker.env", WORKER_ENV)],
    },
];

const ROOT_ENV: &str = "# root-orchestrator settings (see `root-orchestrator --help`)
# The Admin password at first start (otherwise one is made: /var/lib/oakestra-rs/root/admin-password)
#OAK_ADMIN_PASSWORD=
# HTTPS for the API with a certificate of the root's own CA for these names
#OAK_API_TLS_NAMES=root.example.org
# the dashboard runs here: each browser it logs in gets its own login attempts
OAK_TRUSTED_PROXIES=127.0.0.1
";

const DASHBOARD_ENV: &str = "# oak-dashboard settings (see `oak-dashboard --help`)
# where it listens, and the root's REST API it shows
#OAK_DASHBOARD_LISTEN=0.0.0.0:80
#OAK_ROOT_URL=http://127.0.0.1:10000
# the CA of an HTTPS root (its /var/lib/oakestra-rs/root/ca/ca.pem with OAK_API_TLS_NAMES)
#OAK_ROOT_CA=
";

const CLUSTER_ENV: &str = "# cluster-orchestrator settings (see `cluster-orchestrator --help`)
# The root orchestrator's address
SYSTEM_MANAGER_URL=
CLUSTER_NAME=
# free text, or lat,lon,radius_m
CLUSTER_LOCATION=
# a join token of the root: its /var/lib/oakestra-rs/root/join-token, or `root-orchestrator token create`
OAK_CLUSTER_TOKEN=
";

const WORKER_ENV: &str = "# NodeEngine and NetManager settings (see `NodeEngine --help`, `NetManager --help`)
# The cluster orchestrator's address
CLUSTER_ADDRESS=
# a worker join token of the cluster: its /var/lib/oakestra-rs/cluster/worker-join-token, or
# `cluster-orchestrator token create`
OAK_WORKER_TOKEN=
# more NodeEngine flags, e.g. -u=true to run unikernels (qemu: KVM, else TCG)
NODEENGINE_OPTS=
# more NetManager flags, e.g. --no-ebpf for the tun path only
NETMANAGER_OPTS=
";

const NETCFG: &str = r#"{
  "NodePublicAddress": "0.0.0.0",
  "NodePublicPort": "50103",
  "ClusterUrl": "cluster.example.org",
  "ClusterMqttPort": "10003",
  "ClusterNetPort": "10110"
}
"#;

const INSTALL: &str = r#"#!/bin/sh
# Installs this bundle idempotently: binaries into $PREFIX/bin (default /usr/local), the eBPF object into
# $PREFIX/lib/oakestra-rs, systemd units into /etc/systemd/system, sample configuration into /etc only
# where none exists. DESTDIR installs into a staging root. Checks SHA256SUMS first.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
cd "$here"
sha256sum -c --quiet SHA256SUMS
for f in bin/*; do
    install -D -m 0755 "$f" "$DESTDIR$PREFIX/$f"
done
if [ -d lib ]; then
    for f in lib/oakestra-rs/*; do
        install -D -m 0644 "$f" "$DESTDIR$PREFIX/$f"
    done
fi
for f in systemd/*; do
    install -D -m 0644 "$f" "$DESTDIR/etc/systemd/system/$(basename "$f")"
done
for f in $(cd etc && find . -type f); do
    dest="$DESTDIR/etc/$f"
    if [ -e "$dest" ]; then
        echo "kept $dest (exists)"
    else
        install -D -m 0600 "etc/$f" "$dest"
        echo "installed $dest: edit it before starting"
    fi
done
if [ -z "$DESTDIR" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
echo "installed the ROLE bundle into ${DESTDIR:-/}"
"#;

pub fn run(a: Args) -> anyhow::Result<()> {
    let roles: Vec<&Role> = a
        .role
        .iter()
        .map(|r| {
            ROLES.iter().find(|x| x.name == r).with_context(|| format!("--role {r}: one of root, cluster, worker"))
        })
        .collect::<anyhow::Result<_>>()?;
    for t in &a.target {
        if t != HOST && t != ARM {
            bail!("--target {t}: one of {HOST}, {ARM}");
        }
    }
    let object = crate::util::target_dir().join("bpf/netmanager-ebpf.o");
    if !a.skip_build {
        for t in &a.target {
            step(&format!("building the {} binaries for {t}", a.profile));
            build_for(t, a.profile == "release", &BINS)?;
        }
        step("building the eBPF object (the same for every target)");
        crate::ebpf::build()?;
    }
    let out = a.out_dir.clone().unwrap_or_else(|| crate::util::target_dir().join("dist"));
    fs::create_dir_all(&out)?;
    for t in &a.target {
        bundle(&roles, t, &bin_dir(t, &a.profile), &object, &out)?;
    }
    Ok(())
}

fn bundle(roles: &[&Role], target: &str, release: &Path, object: &Path, out: &Path) -> anyhow::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let strip = if target == HOST { "strip" } else { "aarch64-linux-gnu-strip" };
    for r in roles {
        let name = format!("oakestra-rs-{}-{version}-{target}", r.name);
        let stage = out.join(&name);
        let _ = fs::remove_dir_all(&stage);
        for b in r.bins {
            let to = stage.join("bin").join(b);
            copy(&release.join(b), &to)?;
            // the build keeps line tables for profiles; a device needs none (94 MB -> 12 MB for NetManager)
            if crate::util::have(strip) {
                sh(Command::new(strip).arg(&to))?;
            }
        }
        if r.name == "worker" {
            copy(object, &stage.join("lib/oakestra-rs/netmanager-ebpf.o"))?;
        }
        for (file, unit) in r.units {
            write(&stage.join("systemd").join(file), &unit.render())?;
        }
        for (file, text) in r.configs {
            write(&stage.join("etc").join(file), text)?;
        }
        write(&stage.join("install.sh"), &INSTALL.replace("ROLE", r.name))?;
        sh(Command::new("chmod").args(["0755"]).arg(stage.join("install.sh")))?;
        // checksums of every file but the list itself
        let mut files = Vec::new();
        list(&stage, &stage, &mut files)?;
        files.sort();
        let out_sum = Command::new("sha256sum").args(&files).current_dir(&stage).output()?;
        if !out_sum.status.success() {
            bail!("sha256sum: {}", String::from_utf8_lossy(&out_sum.stderr));
        }
        fs::write(stage.join("SHA256SUMS"), &out_sum.stdout)?;
        let tarball = out.join(format!("{name}.tar.gz"));
        sh(Command::new("tar").arg("-czf").arg(&tarball).arg("-C").arg(out).arg(&name))?;
        let size = fs::metadata(&tarball)?.len();
        fs::remove_dir_all(&stage)?;
        step(&format!("{} ({:.1} MiB)", tarball.display(), size as f64 / (1 << 20) as f64));
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if !from.exists() {
        bail!("{} is missing (run without --skip-build)", from.display());
    }
    fs::create_dir_all(to.parent().expect("a parent"))?;
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write(to: &Path, text: &str) -> anyhow::Result<()> {
    fs::create_dir_all(to.parent().expect("a parent"))?;
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))
}

/// Every file below `dir`, relative to `root`.
fn list(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            list(root, &p, out)?;
        } else {
            out.push(p.strip_prefix(root)?.display().to_string());
        }
    }
    Ok(())
}
