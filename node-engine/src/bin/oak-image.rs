//! `oak-image`: writes a minimal OCI image archive (a static busybox, its applets, /www/index.html) for
//! sites without a registry, and for the tests and benchmarks. Deploy it with an SLA whose `code` is
//! `oci-archive:<path>`.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Write a minimal OCI image archive built from a static busybox (offline: no registry \
needed). Deploy it with an SLA whose code is oci-archive:<path>."
)]
struct Args {
    /// Directory to write busybox-oci.tar into.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Image name recorded in the archive.
    #[arg(long, default_value = "localhost/oak/busybox:latest")]
    name: String,
    /// Also write linux-guest.tar.gz: a Linux guest in the unikernel format (the newest kernel in /boot and
    /// a busybox initramfs that configures eth0 from the oak.* kernel parameters and serves a page on port
    /// 8080); its path is printed on a second line.
    #[arg(long)]
    linux_guest: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out_dir)?;
    let p = oak_node_engine::testimage::build_busybox_image(&a.out_dir, &a.name)?;
    println!("{}", p.display());
    if a.linux_guest {
        let g = oak_node_engine::testguest::build_linux_guest(&a.out_dir, "linux-guest", "hello from the guest")?;
        println!("{}", g.display());
    }
    Ok(())
}
