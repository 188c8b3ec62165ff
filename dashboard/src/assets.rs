//! The static files, embedded in the binary: a running dashboard reads nothing from disk and needs no Node,
//! and the build needs no npm.
//!
//! htmx: version 2.0.11 from the npm registry (package `htmx.org@2.0.11`, tarball sha256
//! `165a2655073e9e6e55e307a7c74e8ebcdb76afb7701f9c16cfd106a13add408e`), its file `dist/htmx.min.js` as is
//! (sha256 `d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717`, checked by a test below).
//! License 0BSD, in `assets/htmx-LICENSE`. The version is in its URL, so browsers may cache it for good.

pub const HTMX_PATH: &str = "/assets/htmx-2.0.11.min.js";
pub const HTMX: &str = include_str!("../assets/htmx-2.0.11.min.js");
pub const HTMX_SHA256: &str = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717";

/// The dashboard's own style and script (a changed file gets a new path with the crate version).
pub const STYLE_PATH: &str = concat!("/assets/style-", env!("CARGO_PKG_VERSION"), ".css");
pub const STYLE: &str = include_str!("../assets/style.css");
pub const SCRIPT_PATH: &str = concat!("/assets/dashboard-", env!("CARGO_PKG_VERSION"), ".js");
pub const SCRIPT: &str = include_str!("../assets/dashboard.js");

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    #[test]
    fn embedded_htmx_is_the_pinned_file() {
        let got = format!("{:x}", Sha256::digest(super::HTMX.as_bytes()));
        assert_eq!(got, super::HTMX_SHA256, "assets/htmx-2.0.11.min.js differs from the npm registry's file");
        assert!(super::HTMX.starts_with("var htmx=function()"), "the minified htmx build");
    }
}
