//! Where a test finds the workspace's built binaries, and whether it may run at all.

use std::path::PathBuf;

/// true when the test may run; otherwise prints why it is skipped.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces)");
    false
}

/// Directory of the built binaries (the one holding this test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut d = exe.parent().expect("deps dir").to_path_buf();
    if d.ends_with("deps") {
        d.pop();
    }
    d
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins, or cargo xtask test)",
        p.display()
    );
    p
}
