//! The QEMU Machine Protocol, as much as stopping a microVM needs: connect to the VM's QMP socket,
//! leave negotiation mode, run one command and read its answer (events that arrive first are skipped).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The socket's name in the VM's directory.
pub const SOCKET: &str = "qmp.sock";

/// Runs `command` (no arguments) on the QMP socket at `path`; an error names what QEMU answered.
pub async fn command(path: &Path, command: &str) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(5), run(path, command))
        .await
        .with_context(|| format!("QMP {command} on {}: no answer within 5 s", path.display()))?
}

async fn run(path: &Path, command: &str) -> anyhow::Result<()> {
    let stream = UnixStream::connect(path).await.with_context(|| format!("connecting to {}", path.display()))?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = next(&mut lines).await?;
    if greeting.get("QMP").is_none() {
        bail!("not a QMP greeting: {greeting}");
    }
    for execute in ["qmp_capabilities", command] {
        w.write_all(format!("{}\n", json!({ "execute": execute })).as_bytes()).await?;
        loop {
            let answer = next(&mut lines).await?;
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(e) = answer.get("error") {
                bail!("QMP {execute}: {}", e.get("desc").and_then(Value::as_str).unwrap_or("error"));
            }
            if answer.get("return").is_some() {
                break;
            }
        }
    }
    Ok(())
}

async fn next(lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>) -> anyhow::Result<Value> {
    let line = lines.next_line().await?.context("QMP socket closed")?;
    serde_json::from_str(&line).with_context(|| format!("QMP sent something that is not JSON: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QMP server that greets, answers both commands (an event before the second answer) and
    /// answers what it was sent.
    #[tokio::test]
    async fn runs_one_command_after_negotiation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
            let first = lines.next_line().await.unwrap().unwrap();
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            let second = lines.next_line().await.unwrap().unwrap();
            w.write_all(b"{\"event\": \"POWERDOWN\"}\n{\"return\": {}}\n").await.unwrap();
            format!("{first}\n{second}\n")
        });
        command(&path, "system_powerdown").await.unwrap();
        let sent = server.await.unwrap();
        assert_eq!(sent, "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"system_powerdown\"}\n");
        assert!(command(&dir.path().join("none"), "quit").await.unwrap_err().to_string().contains("connecting"));
    }
}
