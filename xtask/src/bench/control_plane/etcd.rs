//! A local, single-member etcd for the root's store on etcd: a temporary data directory, free loopback
//! ports, ready once its `/health` answers.
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// The root's keys in the bench's etcd start with this (`--etcd-prefix`).
pub const PREFIX: &str = "/oakbench";
/// etcd's `--max-txn-ops` here, and the root's `--etcd-max-txn-ops` when it has the flag.
pub const MAX_TXN_OPS: u32 = 10_000;

/// The etcd binary: Debian's `/usr/bin/etcd`, else `etcd` on PATH.
pub fn binary() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/bin/etcd");
    if debian.is_file() {
        return Some(debian);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("etcd")).find(|p| p.is_file())
}

/// Whether a `--help` text offers `flag` as an option (a line starting with it, after any short form),
/// not merely mentions it in another option's description.
pub fn offers_flag(help: &str, flag: &str) -> bool {
    help.lines().any(|l| {
        let l = l.trim_start();
        let l = match l.split_once(", ") {
            Some((short, rest)) if short.starts_with('-') && !short.starts_with("--") => rest,
            _ => l,
        };
        l.strip_prefix(flag).is_some_and(|r| r.is_empty() || r.starts_with([' ', '=', '<', '\t']))
    })
}

/// What the root binary offers for etcd: (`--etcd-endpoints`, `--etcd-max-txn-ops`).
pub fn root_support(root_bin: &Path) -> anyhow::Result<(bool, bool)> {
    let out =
        Command::new(root_bin).arg("--help").output().with_context(|| format!("{} --help", root_bin.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok((offers_flag(&help, "--etcd-endpoints"), offers_flag(&help, "--etcd-max-txn-ops")))
}

/// A free TCP port on 127.0.0.1 (the kernel's pick, released for etcd to bind).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct Etcd {
    child: Child,
    dir: PathBuf,
    /// `http://127.0.0.1:<client port>`
    pub endpoint: String,
    pub pid: u32,
}

impl Etcd {
    /// Starts etcd with its data and log under `work/etcd`, waiting (up to 30 s) until `/health` says
    /// it is healthy.
    pub fn start(bin: &Path, work: &Path) -> anyhow::Result<Etcd> {
        let dir = work.join("etcd");
        fs::create_dir_all(&dir)?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = fs::File::create(work.join("etcd.log"))?;
        let child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}"), "--initial-cluster-state", "new"])
            .args(["--max-txn-ops", &MAX_TXN_OPS.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let mut etcd = Etcd { child, dir, endpoint, pid };
        let t = Instant::now();
        loop {
            if let Some(st) = etcd.child.try_wait()? {
                bail!("etcd exited ({st}); its log: {}", work.join("etcd.log").display());
            }
            if etcd.healthy() {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("etcd at {} not healthy after 30 s; its log: {}", etcd.endpoint, work.join("etcd.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("    etcd at {} healthy: {:.1} s", etcd.endpoint, t.elapsed().as_secs_f64());
        Ok(etcd)
    }

    fn healthy(&self) -> bool {
        ureq::get(&format!("{}/health", self.endpoint))
            .timeout(Duration::from_secs(1))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok())
            .is_some_and(|v| v["health"] == "true")
    }

    /// How many keys the root has under [`PREFIX`] (through etcd's JSON gateway), to show the root
    /// really kept its store there.
    pub fn root_keys(&self) -> anyhow::Result<u64> {
        // every key starting "<prefix>/": up to "<prefix>0" ('0' follows '/')
        let (key, end) = (format!("{PREFIX}/"), format!("{PREFIX}0"));
        let body = json!({"key": base64(key.as_bytes()), "range_end": base64(end.as_bytes()), "count_only": true});
        let v: Value = ureq::post(&format!("{}/v3/kv/range", self.endpoint)).send_json(body)?.into_json()?;
        // int64 fields are strings in the gateway's JSON; absent when 0
        Ok(v["count"].as_str().and_then(|c| c.parse().ok()).or_else(|| v["count"].as_u64()).unwrap_or(0))
    }
}

/// Standard base64 with padding (etcd's JSON gateway takes keys so).
fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::offers_flag;

    #[test]
    fn flags_are_told_from_mentions() {
        let help =
            "Options:\n      --data-dir <DATA_DIR>\n          Directory ... without --etcd-endpoints, the store\n\
                    \x20 -v, --verbose\n      --etcd-endpoints <ETCD_ENDPOINTS>\n          Keep the store in etcd\n";
        assert!(offers_flag(help, "--etcd-endpoints"));
        assert!(offers_flag(help, "--verbose"), "after a short form");
        assert!(offers_flag(help, "--data-dir"));
        let old = "Options:\n      --data-dir <DATA_DIR>\n          the store; see --etcd-endpoints\n";
        assert!(!offers_flag(old, "--etcd-endpoints"), "a mention is not the option");
        assert!(!offers_flag(help, "--etcd"), "a prefix of another flag is not the flag");
        assert!(!offers_flag(help, "--etcd-max-txn-ops"));
    }

    #[test]
    fn base64_as_the_gateway_takes_it() {
        use super::base64;
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"/oakbench/"), "L29ha2JlbmNoLw==");
        assert_eq!(base64(b"/oakbench0"), "L29ha2JlbmNoMA==");
    }
}
