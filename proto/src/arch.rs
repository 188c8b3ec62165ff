//! Architecture names. Workers report, and SLAs ask for, Go's names (GOARCH, as Oakestra uses); users also
//! write the kernel's (`uname -m`) or Rust's names. Every tier compares them through [`normalize`].

/// Go's name (GOARCH) for an architecture name in any of the usual spellings; unknown names are returned
/// lower-cased, unchanged otherwise.
pub fn normalize(arch: &str) -> String {
    let a = arch.trim().to_ascii_lowercase();
    match a.as_str() {
        "x86_64" | "x86-64" | "amd64" | "x64" => "amd64",
        "aarch64" | "arm64" | "armv8" | "armv8l" => "arm64",
        "arm" | "armv7" | "armv7l" | "armv6" | "armv6l" | "armhf" | "armel" => "arm",
        "x86" | "i386" | "i486" | "i586" | "i686" | "386" => "386",
        "riscv64" | "riscv64gc" => "riscv64",
        "powerpc64le" | "ppc64le" | "ppc64el" => "ppc64le",
        "s390x" => "s390x",
        "loongarch64" | "loong64" => "loong64",
        _ => return a,
    }
    .to_string()
}

/// Whether a worker of architecture `worker` satisfies an SLA's `arch` list (empty: any).
pub fn matches(wanted: &[String], worker: &str) -> bool {
    let w = normalize(worker);
    wanted.is_empty() || wanted.iter().any(|a| normalize(a) == w)
}

/// This machine's architecture, by Go's name.
pub fn this_machine() -> String {
    normalize(std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_meet() {
        assert_eq!(normalize("x86_64"), "amd64");
        assert_eq!(normalize("AMD64"), "amd64");
        assert_eq!(normalize("aarch64"), "arm64");
        assert_eq!(normalize("armv7l"), "arm");
        assert_eq!(normalize("mips"), "mips");
        assert!(matches(&["x86_64".into()], "amd64"));
        assert!(matches(&["arm64".into(), "amd64".into()], "x86_64"));
        assert!(!matches(&["arm64".into()], "amd64"));
        assert!(matches(&[], "anything"));
    }
}
