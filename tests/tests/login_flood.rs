//! A login flood against the real root-orchestrator process: wrong passwords from several sources at once,
//! many in parallel from each. Each source is slowed to its login allowance (429 with Retry-After past
//! it), the password checks run one at a time on one reused memory, so the root's RSS stays where one
//! login left it, and the right password still works from a source that did not flood.

use std::time::{Duration, Instant};

use serde_json::json;
use testbed::{bin, require_root, spawn_in_netns, wait_for, Api, Net};

const PW: &str = "flood-admin-pw";
/// Per source (the root's limits: a burst of 20, then 30 a minute).
const BURST: f64 = 20.0;
const PER_MINUTE: f64 = 30.0;
const SOURCES: [&str; 3] = ["a", "b", "c"];
const THREADS_PER_SOURCE: usize = 8;
const TRIES_PER_THREAD: usize = 6;

fn rss_kb(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_login_flood_is_slowed_per_source_and_does_not_grow_the_root() {
    if !require_root("a_login_flood_is_slowed_per_source_and_does_not_grow_the_root") {
        return;
    }
    let net = Net::new(&["root", "a", "b", "c", "admin"]).unwrap();
    let dir = net.dir.path().join("root").display().to_string();
    let root = net
        .host("root")
        .spawn("root", &bin("root-orchestrator"), &["--data-dir", &dir], &[("OAK_ADMIN_PASSWORD", PW)])
        .unwrap();
    let mut api = Api::new(net.host("root").ip);
    api = net.host("admin").run(move || {
        wait_for("root API", Duration::from_secs(20), || api.login("Admin", PW).ok());
        api
    });
    // one wrong password too, so both paths of a check have run before the baseline is taken
    let a2 = api.clone();
    let (c, _) = net
        .host("admin")
        .run(move || a2.call("POST", "/api/auth/login", Some(&json!({"username":"Admin","password":"x"}))));
    assert_eq!(c, 401);
    let baseline = rss_kb(root.pid());

    let t0 = Instant::now();
    let mut threads = Vec::new();
    for s in SOURCES {
        let ns = net.host(s).ns.clone();
        for _ in 0..THREADS_PER_SOURCE {
            let base = api.base.clone();
            threads.push((
                s,
                spawn_in_netns(&ns, move || {
                    let guess = Api::at(base);
                    let mut codes = Vec::new();
                    for i in 0..TRIES_PER_THREAD {
                        let body = json!({"username": "Admin", "password": format!("guess-{i}")});
                        let (code, v) = guess.call("POST", "/api/auth/login", Some(&body));
                        codes.push((code, v["message"].as_str().unwrap_or("").to_string()));
                    }
                    codes
                })
                .unwrap(),
            ));
        }
    }
    let mut peak = baseline;
    while threads.iter().any(|(_, t)| !t.is_finished()) {
        peak = peak.max(rss_kb(root.pid()));
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // per source: wrong passwords answered, slowed as a source, refused because the checks' queue was full
    let mut answered = std::collections::HashMap::<&str, (usize, usize, usize)>::new();
    for (s, t) in threads {
        for (code, message) in t.join().unwrap().unwrap() {
            let e = answered.entry(s).or_default();
            match code {
                401 => e.0 += 1,
                429 if message.contains("too many login attempts from") => e.1 += 1,
                429 if message.contains("too many password checks") => e.2 += 1,
                other => panic!("a flooding login got {other} {message:?}: neither refused (401) nor slowed (429)"),
            }
        }
    }
    let allowance = BURST + elapsed * PER_MINUTE / 60.0 + 1.0;
    let tries = (THREADS_PER_SOURCE * TRIES_PER_THREAD) as f64;
    for (s, (wrong, slowed, queue_full)) in &answered {
        println!(
            "source {s}: {wrong} wrong passwords answered, {slowed} slowed as a source, {queue_full} refused with \
             the checks' queue full, in {elapsed:.1} s"
        );
        assert!(
            *wrong as f64 <= allowance,
            "source {s}: {wrong} guesses answered in {elapsed:.1} s (allowance {allowance:.0})"
        );
        assert!(*slowed as f64 >= tries - allowance, "source {s}: only {slowed} of {tries} tries slowed as a source");
    }
    let grown_mb = peak.saturating_sub(baseline) as f64 / 1024.0;
    println!("root RSS: {baseline} kB after one login, peak {peak} kB during the flood (+{grown_mb:.1} MiB)");
    assert!(grown_mb < 8.0, "the flood grew the root by {grown_mb:.1} MiB");

    // the admin's own source was not flooded: the right password still works
    let mut admin = api.clone();
    net.host("admin").run(move || admin.login("Admin", PW)).unwrap();
}
