//! A real single-member etcd for tests (the root's store on etcd): Debian's `etcd` binary on free
//! loopback ports with its data in a directory the test gives, ready once its health endpoint says so,
//! killed when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd; killed (and waited for) when dropped.
pub struct Etcd {
    child: Child,
    /// Its client URL, `http://127.0.0.1:<port>`.
    pub endpoint: String,
    log: PathBuf,
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding a loopback port").port()
}

/// Whether etcd at `addr` answers its health check with `"health":"true"`.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Etcd {
    /// Starts etcd with its data and log under `dir`. None, saying why, when no etcd binary is installed
    /// (`cargo xtask setup` installs Debian's etcd-server) — except under CI (env CI set), where a missing
    /// etcd fails the test instead of skipping it.
    pub fn start(dir: &Path) -> Option<Etcd> {
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let out = std::fs::File::create(&log).expect("creating etcd's log file");
        let spawned = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("etcd's log file"))
            .stderr(out)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI: no etcd binary on PATH (cargo xtask setup installs etcd-server)"
                );
                eprintln!("skipped: no etcd binary on PATH (cargo xtask setup installs Debian's etcd-server)");
                return None;
            }
            Err(e) => panic!("starting etcd: {e}"),
        };
        let mut me = Etcd { child, endpoint, log };
        let addr: SocketAddr = ([127, 0, 0, 1], client).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !healthy(addr) {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("etcd exited ({status}) before it was ready:\n{}", me.log_tail());
            }
            assert!(Instant::now() < deadline, "etcd at {} not healthy within 10 s:\n{}", me.endpoint, me.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(me)
    }

    /// The last lines etcd logged.
    fn log_tail(&self) -> String {
        let all = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
