//! Commands run to completion, their stderr in the error when they fail.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `args[0]` with the rest as arguments; a non-zero exit is an error with the command line and its
/// stderr.
pub fn run(args: &[&str]) -> Result<()> {
    let (program, rest) = args.split_first().context("an empty command")?;
    let out = Command::new(program).args(rest).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `ip` (iproute2) with `args`.
pub fn ip(args: &[&str]) -> Result<()> {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    run(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_says_what_and_why() {
        let e = run(&["sh", "-c", "echo nope >&2; exit 3"]).unwrap_err();
        assert_eq!(format!("{e:#}"), "sh -c echo nope >&2; exit 3: nope");
        assert!(run(&["true"]).is_ok());
        assert!(run(&[]).is_err());
    }
}
