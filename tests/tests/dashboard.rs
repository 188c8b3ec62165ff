//! The dashboard in a real browser: Debian's chromium, headless, driven through chromedriver (WebDriver),
//! against the 1-DOC stack of `one_doc.rs` (root, cluster, NetManager, NodeEngine on real containerd) and
//! `oak-dashboard` on port 80, all inside one host (a network namespace). Through the pages only: a wrong
//! password shows the root's error; the cluster appears with its worker and on the map; the session cookies
//! are out of script's reach; malformed SLAs show the root's field message beside the editor; an SLA pasted
//! into the editor creates the application; deploy, watch the instance reach RUNNING, scale the service to
//! two instances and back to one, undeploy and delete, each behind its confirmation; log out. The cluster's
//! page shows its worker with the datapath and subnet the API reports and a chart with samples; the network view shows the service's round-robin and
//! closest IPs, its instance's overlay address and the worker's datapath, and, while a client inside an
//! instance fetches from the service IP, the bytes that datapath carries and their rate in the throughput
//! chart; the instance's page shows its log and, following it, lines the instance writes later, and charts
//! its memory and CPU use as its worker samples them. Every page is saved as a PNG under
//! `<target-dir>/dashboard-screenshots/`.
//!
//! WebDriver client: fantoccini. It is maintained, async on tokio like the rest of the tests, and builds
//! without a TLS stack of its own (chromedriver is plain HTTP on loopback); thirtyfour would add a larger
//! dependency tree for features (element queries, component macros) this one test does not need.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use testbed::{bin, bin_dir, require_root, wait_for, Api, Net};

mod common;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the browser waits for a page to show something.
const UI_WAIT: Duration = Duration::from_secs(30);

fn containerd_ready() -> bool {
    Command::new("ctr").arg("version").output().is_ok_and(|o| o.status.success())
}

/// Where the screenshots go: `<target-dir>/dashboard-screenshots` (the target directory holds `debug/`).
fn screenshot_dir() -> PathBuf {
    let d = bin_dir().parent().map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir).join("dashboard-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The password of the test's user who is not the Admin.
const VIEWER_PASSWORD: &str = "viewer-password-1";

/// The size of the file the test's httpd serves as `/big` (what the traffic for the throughput chart fetches).
const BIG_BYTES: u64 = 1 << 20;

/// What the test's httpd instance writes first to its log.
const FIRST_LINE: &str = "hello-from-instance";

/// The test's httpd microservice, with `change`'s fields replaced (a null removes the field). It writes
/// [`FIRST_LINE`], then `tick-<n>` every second (what following its log must show arriving), and serves
/// `/index.html` and `/big` ([`BIG_BYTES`] bytes).
fn microservice(name: &str, code: &str, change: Value) -> Value {
    let script = format!(
        "mkdir -p /tmp/www && cp /www/index.html /tmp/www/ && head -c {BIG_BYTES} /dev/zero > /tmp/www/big; \
         echo {FIRST_LINE}; (i=0; while :; do echo tick-$i; i=$((i+1)); sleep 1; done) & \
         exec httpd -f -p 8080 -h /tmp/www"
    );
    let mut ms = json!({"microserviceID": "", "microservice_name": name, "microservice_namespace": "doc",
        "virtualization": "container", "code": code,
        "cmd": ["sh", "-c", script], "memory": 64, "vcpus": 0.5});
    for (k, v) in change.as_object().unwrap() {
        if v.is_null() {
            ms.as_object_mut().unwrap().remove(k);
        } else {
            ms[k] = v.clone();
        }
    }
    ms
}

fn sla(microservices: Vec<Value>) -> String {
    json!({"sla_version": "v2.0", "customerID": "Admin", "applications": [{"applicationID": "",
        "application_name": "web", "application_namespace": "doc", "application_desc": "dashboard test",
        "microservices": microservices}]})
    .to_string()
}

#[test]
fn dashboard_in_a_browser() {
    if !require_root("dashboard_in_a_browser") {
        return;
    }
    if !containerd_ready() {
        assert!(std::env::var_os("CI").is_none(), "containerd is not running (cargo xtask test starts it)");
        eprintln!("SKIPPED dashboard_in_a_browser: containerd is not running");
        return;
    }
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER].into_iter().filter(|p| !Path::new(p).exists()).collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} missing: install the Debian packages chromium and chromium-driver (cargo xtask setup does)",
            missing.join(" and ")
        );
        eprintln!(
            "SKIPPED dashboard_in_a_browser: {} missing (apt install chromium chromium-driver)",
            missing.join(", ")
        );
        return;
    }

    // the 1-DOC stack
    let net = Net::new(&["doc"]).unwrap();
    let h = net.host("doc");
    let d = net.dir.path().to_path_buf();
    let ctr_ns = format!("oak-dash-{}", std::process::id());
    let image = oak_node_engine::testimage::build_busybox_image(&d, "localhost/oak/busybox:dash").unwrap();
    let stack = common::start(h, &d, &ctr_ns);

    // the dashboard, on port 80 as `cargo xtask up` runs it
    let dash = h
        .spawn(
            "dashboard",
            &bin("oak-dashboard"),
            &["--listen", "0.0.0.0:80", "--root-url", "http://127.0.0.1:10000"],
            &[],
        )
        .unwrap();
    dash.wait_log("dashboard listening on", Duration::from_secs(20)).unwrap();

    // chromedriver on a free port of the host, ready when its /status says so
    let port = h.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let _driver = h.spawn("chromedriver", Path::new(CHROMEDRIVER), &[&format!("--port={port}")], &[]).unwrap();
    let driver_url = format!("http://127.0.0.1:{port}");
    h.run({
        let url = format!("{driver_url}/status");
        move || {
            wait_for("chromedriver ready (GET /status)", Duration::from_secs(30), || {
                let v: Value = ureq::get(&url).call().ok()?.into_json().ok()?;
                (v["value"]["ready"] == true).then_some(())
            })
        }
    });

    let shots = screenshot_dir();
    let profile = d.join("chromium-profile");
    let mut api = Api::new(h.ip);
    api = h.run(move || {
        wait_for("root API", Duration::from_secs(20), || api.login("Admin", common::ADMIN_PASSWORD).ok());
        api
    });
    // the same archive outside the NodeEngine's image directory: deploying it fails, with the reason
    let outside = tempfile::tempdir().unwrap();
    let stray = outside.path().join("busybox-oci.tar");
    std::fs::copy(&image, &stray).unwrap();
    let flow = Flow {
        base: format!("http://{}", h.ip),
        shots: shots.clone(),
        image,
        stray,
        seen: Vec::new(),
        api: api.clone(),
        ctr_ns: ctr_ns.clone(),
    };
    let seen = h.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let c = browser(&driver_url, &profile).await;
            // the browser is closed whatever happens (a panic would leave chromium running)
            // as a task of its own, so a panic in it comes back as an error and the browser still closes
            let r = tokio::spawn(flow.run(c.clone())).await;
            let _ = c.close().await;
            match r {
                Ok(seen) => seen,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        })
    });
    eprintln!("instance states seen in the page: {seen:?}");
    // the wrong password counted against the browser (the dashboard named it), not against the dashboard
    stack
        .root
        .wait_log(&format!("failed login user=Admin source={}", h.ip), Duration::from_secs(5))
        .expect("the root logs the browser's address as the source of the failed login");
    eprintln!("screenshots: {}", shots.display());

    // the page told the truth: the root has no application left
    let apps = h.run(move || api.call("GET", "/api/applications", None));
    assert_eq!(apps, (200, json!([])), "the application deleted in the page is gone at the root");

    // nothing left in containerd: the containers went with the undeploy and the deletes; the imported
    // image goes with its namespace
    let containers = || {
        let out = Command::new("ctr").args(["-n", &ctr_ns, "containers", "ls", "-q"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_for("the instances' containers removed", Duration::from_secs(30), || containers().is_empty().then_some(()));
    let images = Command::new("ctr").args(["-n", &ctr_ns, "images", "ls", "-q"]).output().unwrap();
    for img in String::from_utf8_lossy(&images.stdout).lines() {
        let _ = Command::new("ctr").args(["-n", &ctr_ns, "images", "rm", "--sync", img]).output();
    }
    let rm = Command::new("ctr").args(["namespaces", "rm", &ctr_ns]).output().unwrap();
    assert!(rm.status.success(), "containerd namespace {ctr_ns} left empty: {}", String::from_utf8_lossy(&rm.stderr));
}

async fn browser(driver_url: &str, profile: &Path) -> Client {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", format!("--user-data-dir={}", profile.display())],
        },
    });
    let caps = caps.as_object().unwrap().clone();
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(driver_url)
        .await
        .unwrap_or_else(|e| panic!("chromedriver at {driver_url} did not start chromium: {e}"))
}

struct Flow {
    base: String,
    shots: PathBuf,
    image: PathBuf,
    stray: PathBuf,
    /// The instance states the page showed, in order.
    seen: Vec<String>,
    /// The root's API as the Admin, to compare the pages with.
    api: Api,
    /// The containerd namespace of the instances (to run a client inside one).
    ctr_ns: String,
}

impl Flow {
    async fn run(mut self, c: Client) -> Vec<String> {
        self.login(&c).await;
        self.clusters(&c).await;
        self.cluster_page(&c).await;
        self.malformed_slas(&c).await;
        self.create_deploy_undeploy_delete(&c).await;
        self.logout(&c).await;
        self.not_admin(&c).await;
        self.seen
    }

    async fn login(&self, c: &Client) {
        c.goto(&format!("{}/", self.base)).await.unwrap();
        wait_path(c, "/login").await;
        type_into(c, "#username", "Admin").await;
        type_into(c, "#password", "not-the-password").await;
        click(c, "#login").await;
        let e = wait_text(c, "#login-error", |t| !t.is_empty()).await;
        assert_eq!(e, "invalid username or password", "the root's own words for a wrong password");
        self.shot(c, "01-login-wrong-password").await;

        type_into(c, "#password", common::ADMIN_PASSWORD).await;
        click(c, "#login").await;
        wait_path(c, "/clusters").await;
        assert_eq!(text(c, "#user").await.as_deref(), Some("Admin"), "the page names who is logged in");
        // the tokens are in cookies script cannot read, sent to this site only
        let cookies = c.get_all_cookies().await.unwrap();
        for name in ["oak_access", "oak_refresh"] {
            let k =
                cookies.iter().find(|k| k.name() == name).unwrap_or_else(|| panic!("no {name} cookie: {cookies:?}"));
            assert_eq!(k.http_only(), Some(true), "{name} is HttpOnly");
            assert_eq!(format!("{:?}", k.same_site()), "Some(Strict)", "{name} is SameSite=Strict");
        }
        let visible = c.execute("return document.cookie", vec![]).await.unwrap();
        assert_eq!(visible, json!(""), "no cookie is readable by script");

        // an access token the root refuses, though it reads as unexpired (a bad signature, as a revoked or
        // foreign one): the dashboard renews the session with the refresh token and the page loads as before
        let cookie = |name: &str| cookies.iter().find(|k| k.name() == name).unwrap().clone();
        let (mut access, refresh) = (cookie("oak_access"), cookie("oak_refresh"));
        let (payload_part, _signature) = access.value().rsplit_once('.').unwrap();
        let forged = format!("{payload_part}.{}", "A".repeat(43));
        access.set_value(forged.clone());
        c.delete_cookie("oak_access").await.unwrap();
        c.add_cookie(access).await.unwrap();
        c.goto(&format!("{}/clusters", self.base)).await.unwrap();
        wait_path(c, "/clusters").await;
        assert_eq!(text(c, "#user").await.as_deref(), Some("Admin"), "still logged in after the refresh");
        let renewed = c.get_all_cookies().await.unwrap();
        let value = |name: &str| renewed.iter().find(|k| k.name() == name).map(|k| k.value().to_string());
        let new_access = value("oak_access").expect("an access cookie");
        assert!(new_access != forged && new_access.split('.').count() == 3, "a new access token: {new_access:?}");
        assert_ne!(
            value("oak_refresh").as_deref(),
            Some(refresh.value()),
            "the refresh token was used once and replaced"
        );
    }

    async fn clusters(&self, c: &Client) {
        // the aggregate arrives with the cluster's reports; the page polls until it shows it
        let row = r#"tr.cluster[data-cluster="doc"]"#;
        wait_text(c, &format!("{row} td.workers"), |t| t == "1").await;
        let state = text(c, &format!("{row} .state")).await.unwrap_or_default();
        assert_eq!(state, "active");
        let cpu = text(c, &format!("{row} td.cpu")).await.unwrap_or_default();
        assert!(cpu.contains("cores") && !cpu.starts_with("0 cores"), "CPU of the real worker: {cpu:?}");
        let memory = text(c, &format!("{row} td.memory")).await.unwrap_or_default();
        assert!(memory.ends_with("MiB used") && !memory.ends_with(" 0 MiB used"), "memory of the worker: {memory:?}");
        // on the map, where 48.26 N 11.67 E projects (x = lon + 180, y = 90 - lat)
        let circle =
            c.find(Locator::Css(r#"g.marker.active[data-cluster="doc"] circle"#)).await.expect("doc on the map");
        assert_eq!(circle.attr("cx").await.unwrap().as_deref(), Some("191.67"));
        assert_eq!(circle.attr("cy").await.unwrap().as_deref(), Some("41.74"));
        self.shot(c, "02-clusters").await;
    }

    /// The cluster's own page: its worker as the API reports it (datapath, overlay subnet, address) and the
    /// cluster's CPU and memory chart with a line.
    async fn cluster_page(&self, c: &Client) {
        click(c, r#"tr.cluster[data-cluster="doc"] a.cluster-link"#).await;
        wait_text(c, "h1", |t| t == "Cluster doc").await;
        let row = r#"tr.worker[data-worker="doc-worker"]"#;
        // the overlay arrives with the worker's first NetManager report
        let subnet = wait_text(c, &format!("{row} td.subnet"), |t| t.contains('/')).await;
        let (code, workers) = self.api.call("GET", "/api/cluster/doc/workers", None);
        assert_eq!(code, 200, "the Admin reads the workers: {workers}");
        let w = workers.as_array().and_then(|a| a.iter().find(|w| w["node_name"] == "doc-worker")).cloned();
        let w = w.unwrap_or_else(|| panic!("doc-worker in the API's workers: {workers}"));
        assert_eq!(subnet, w["network"]["subnet"].as_str().unwrap(), "the page's subnet is the API's");
        let datapath = attr(c, &format!("{row} .datapath"), "data-datapath").await;
        assert_eq!(datapath.as_str(), w["network"]["datapath"].as_str().unwrap(), "the page's datapath is the API's");
        assert!(["ebpf", "tun"].contains(&datapath.as_str()), "a datapath that carries traffic: {datapath}");
        let address = text(c, &format!("{row} td.address")).await.unwrap_or_default();
        assert_eq!(address, w["address"].as_str().unwrap(), "the worker's address");
        let cpu = text(c, &format!("{row} td.cpu")).await.unwrap_or_default();
        assert!(cpu.contains("cores") && cpu.contains("% used") && !cpu.starts_with("0 cores"), "{cpu:?}");
        assert_eq!(text(c, &format!("{row} td.arch")).await.as_deref(), w["arch"].as_str());
        // the chart draws the samples the page took; its line is a path through the plot
        let d = wait_attr(c, "#usage svg path.line", "d", |d| d.starts_with('M') && d.contains(" L")).await;
        eprintln!("cluster CPU line: {d}");
        c.find(Locator::Css("#throughput svg")).await.expect("a throughput chart for the workers");
        self.shot(c, "02b-cluster").await;
    }

    async fn malformed_slas(&self, c: &Client) {
        let cases = [
            (json!({"memory": "lots"}), "applications[0].microservices[0].memory", "lots", "03-sla-memory-lots"),
            (
                json!({"microservice_name": null}),
                "applications[0].microservices[0]",
                "microservice_name",
                "04-sla-no-name",
            ),
        ];
        for (change, field, words, shot) in cases {
            c.goto(&format!("{}/applications/new", self.base)).await.unwrap();
            let bad = sla(vec![microservice("httpd", &self.code(), change)]);
            type_into(c, "#sla", &bad).await;
            click(c, "#create").await;
            let shown = wait_text(c, "#sla-error code.field", |t| !t.is_empty()).await;
            assert!(shown.starts_with(field), "the field the root names ({shown:?}) is {field}");
            let message = text(c, "#sla-error mark.message").await.unwrap_or_default();
            assert!(
                message.contains(field) && message.contains(words),
                "the root's message as it wrote it: {message:?}"
            );
            let kept = c.find(Locator::Css("#sla")).await.unwrap().prop("value").await.unwrap();
            assert_eq!(kept.as_deref(), Some(bad.as_str()), "the editor keeps the text to fix");
            self.shot(c, shot).await;
        }
    }

    async fn create_deploy_undeploy_delete(&mut self, c: &Client) {
        c.goto(&format!("{}/applications/new", self.base)).await.unwrap();
        // httpd runs; stray's archive is outside the NodeEngine's image directories, so it fails with a reason
        let stray = microservice("stray", &format!("oci-archive:{}", self.stray.display()), json!({}));
        type_into(c, "#sla", &sla(vec![microservice("httpd", &self.code(), json!({})), stray])).await;
        click(c, "#create").await;
        wait_text(c, "h1", |t| t == "Application web").await;
        let service = r#"div.service[data-service="httpd"]"#;
        wait_text(c, &format!("{service} p.no-instances"), |t| t == "No instances.").await;
        self.shot(c, "05-application").await;

        click_confirm(c, &format!("{service} button.deploy"), "Deploy one more instance of httpd?").await;
        let note = wait_text(c, "#note", |t| !t.is_empty()).await;
        assert_eq!(note, "instance 0 deployed", "the deploy was placed");
        self.seen = wait_state(c, "httpd", "RUNNING").await;
        let worker = text(c, &format!(r#"{service} tr.instance[data-instance="0"] td:nth-child(4)"#)).await;
        assert_eq!(worker.as_deref(), Some("doc-worker"));
        self.shot(c, "06-running").await;

        // the instance's own page
        click(c, &format!(r#"{service} tr.instance[data-instance="0"] a"#)).await;
        wait_text(c, "h1", |t| t == "httpd instance 0").await;
        let table = text(c, "#instance").await.unwrap_or_default();
        assert!(table.contains("RUNNING") && table.contains("doc-worker"), "{table}");
        self.instance_log(c).await;
        self.instance_usage(c).await;
        self.shot(c, "07-instance").await;
        c.back().await.unwrap();

        // scaled to two, each asking first; the second instance runs beside the first
        wait_text(c, "h1", |t| t == "Application web").await;
        self.scale(c, 2, "Scale httpd to 2 instance(s)?").await;
        let note = wait_text(c, "#note", |t| t.contains("scal")).await;
        assert_eq!(note, "httpd scaled to 2: instance 1 deployed", "the scale was placed");
        wait_instance_state(c, "httpd", 1, "RUNNING").await;
        self.shot(c, "06b-scaled").await;

        // traffic through the service IP from inside instance 0, while the network view is watched
        let load = self.load();
        self.network(c).await;
        let (fetched, failed, last_error) = load.finish();
        assert!(fetched > 0, "the client inside instance 0 fetched /big through the service IP");
        // round-robin takes every other fetch to instance 0 itself: those work as well as the others
        assert_eq!(failed, 0, "every fetch through the service IP completed; the last error: {last_error}");
        c.back().await.unwrap();

        // back to one: the newest instance goes
        wait_text(c, "h1", |t| t == "Application web").await;
        self.scale(c, 1, "Scale httpd to 1 instance(s)?").await;
        let note = wait_text(c, "#note", |t| t.contains("to 1")).await;
        assert_eq!(note, "httpd scaled to 1: instance 1 undeployed");
        wait_gone(c, &format!(r#"{service} tr.instance[data-instance="1"]"#)).await;
        assert_eq!(
            text(c, &format!(r#"{service} tr.instance[data-instance="0"] .state"#)).await.as_deref(),
            Some("RUNNING")
        );

        // a failure, with the reason in words, then the service deleted
        let stray = r#"div.service[data-service="stray"]"#;
        click_confirm(c, &format!("{stray} button.deploy"), "Deploy one more instance of stray?").await;
        let states = wait_state(c, "stray", "FAILED").await;
        eprintln!("stray's states seen in the page: {states:?}");
        let reason = text(c, &format!(r#"{stray} tr.instance[data-instance="0"] td.reason"#)).await.unwrap_or_default();
        assert!(
            reason.contains("is outside the image directories"),
            "the NodeEngine's reason, as the API gives it: {reason:?}"
        );
        self.shot(c, "08-failed-with-reason").await;
        click_confirm(
            c,
            &format!("{stray} button.delete-service"),
            "Delete service stray and undeploy all its instances?",
        )
        .await;
        let note = wait_text(c, "#note", |t| t.contains("deleted")).await;
        assert!(note.starts_with("service "), "the root's answer: {note:?}");
        wait_gone(c, stray).await;

        click_confirm(
            c,
            &format!(r#"{service} tr.instance[data-instance="0"] button.undeploy"#),
            "Undeploy instance 0 of httpd?",
        )
        .await;
        wait_text(c, &format!("{service} p.no-instances"), |t| t == "No instances.").await;
        self.shot(c, "09-undeployed").await;

        click_confirm(c, "#delete-application", "Delete application web, its services and all their instances?").await;
        wait_path(c, "/applications").await;
        wait_text(c, "#no-applications", |t| t.starts_with("No applications yet.")).await;
        self.shot(c, "10-deleted").await;
    }

    /// The log on load holds the instance's first line; following it appends the ticks the instance writes
    /// later, after what was there.
    async fn instance_log(&self, c: &Client) {
        let page = c.current_url().await.unwrap();
        let deadline = Instant::now() + UI_WAIT;
        let loaded = loop {
            let log = text(c, "#log").await.unwrap_or_default();
            if log.contains(FIRST_LINE) {
                break log;
            }
            let why = text(c, "#log-unavailable").await;
            assert!(
                Instant::now() < deadline,
                "no {FIRST_LINE} in the instance's log within {UI_WAIT:?}: {log:?} {why:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.goto(page.as_str()).await.unwrap();
        };
        let last_tick = |log: &str| log.lines().filter_map(|l| l.strip_prefix("tick-")?.parse::<u64>().ok()).max();
        let wanted = last_tick(&loaded).map_or(0, |n| n + 1);
        assert!(c.find(Locator::Css("#log-following")).await.is_err(), "not following before Follow is pressed");
        click(c, "#log-follow").await;
        wait_text(c, "#log-following", |t| t.starts_with("following")).await;
        let line = format!("tick-{wanted}");
        let followed = wait_text(c, "#log", |t| t.lines().any(|l| l == line)).await;
        assert!(followed.starts_with(loaded.trim_end()), "new lines are appended after the loaded ones:\n{followed}");
        assert_eq!(followed.matches(FIRST_LINE).count(), 1, "nothing is appended twice:\n{followed}");
        click(c, "#log-stop").await;
        wait_text(c, "#log-follow", |t| t == "Follow").await;
    }

    /// Types `n` into httpd's scale field and submits it, accepting the confirmation, which must say
    /// `question`.
    async fn scale(&self, c: &Client, n: u32, question: &str) {
        let form = r#"div.service[data-service="httpd"] form.scale"#;
        type_into(c, &format!(r#"{form} input[name="instances"]"#), &n.to_string()).await;
        click_confirm(c, &format!("{form} button.scale"), question).await;
    }

    /// The instance's page charts what its worker samples of it: memory in use (more than nothing) and a
    /// CPU line. Samples arrive with the worker's reports; the page's live part brings them in its polls.
    async fn instance_usage(&self, c: &Client) {
        let deadline = Instant::now() + UI_WAIT;
        let peak = |v: Option<String>| v.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        loop {
            let memory = match c.find(Locator::Css("#instance-memory svg path.line")).await {
                Ok(e) => peak(e.attr("data-peak").await.ok().flatten()),
                Err(_) => 0.0,
            };
            if memory > 0.0 {
                c.find(Locator::Css("#instance-cpu svg path.line")).await.expect("a CPU line beside the memory line");
                eprintln!("instance memory peak: {memory} bytes");
                return;
            }
            if Instant::now() > deadline {
                let why = text(c, "#no-usage").await;
                let (_, services) = self.api.call("GET", "/api/services", None);
                let (_, workers) = self.api.call("GET", "/api/cluster/doc/workers", None);
                panic!("no memory use charted within {UI_WAIT:?}: {why:?}\nservices: {services}\nworkers: {workers}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts fetching `/big` from httpd's round-robin service IP in instance 0's network namespace (so
    /// through the worker's datapath), until [`Load::finish`]. The client is the machine's curl: the static
    /// busybox `wget` of the test image crashes resolving even a literal address.
    fn load(&self) -> Load {
        let (_, services) = self.api.call("GET", "/api/services", None);
        let svc = services.as_array().and_then(|a| a.iter().find(|s| s["microservice_name"] == "httpd")).cloned();
        let rr = svc.as_ref().and_then(|s| s["addresses"]["rr_ip"].as_str()).unwrap_or_default().to_string();
        assert!(!rr.is_empty(), "httpd has a round-robin IP: {services}");
        let pid = common::task_pid(&self.ctr_ns, "httpd");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let running = std::thread::spawn({
            let stop = stop.clone();
            let url = format!("http://{rr}:8080/big");
            move || {
                let (mut fetched, mut failed, mut last_error) = (0u64, 0u64, String::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = Command::new("nsenter")
                        .args(["-t", &pid, "-n", "curl", "-sS", "-o", "/dev/null", "--max-time", "5"])
                        .args(["-w", "%{size_download}", &url])
                        .output()
                        .unwrap();
                    let size = String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap_or(0);
                    if out.status.success() && size == BIG_BYTES {
                        fetched += 1;
                    } else {
                        failed += 1;
                        last_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    }
                }
                (fetched, failed, last_error)
            }
        });
        Load { running, stop }
    }

    /// The network view: the service's IPs as the API gives them, its instance's overlay address and
    /// worker, and the worker's datapath; with traffic running, the worker's datapath carries bytes and
    /// the throughput chart draws them.
    async fn network(&self, c: &Client) {
        click(c, r#"header a[href="/network"]"#).await;
        wait_text(c, "h1", |t| t == "Network").await;
        let (code, services) = self.api.call("GET", "/api/services", None);
        assert_eq!(code, 200);
        let svc = services.as_array().and_then(|a| a.iter().find(|s| s["microservice_name"] == "httpd")).cloned();
        let svc = svc.unwrap_or_else(|| panic!("httpd among the services: {services}"));
        let (rr, closest) =
            (svc["addresses"]["rr_ip"].as_str().unwrap(), svc["addresses"]["closest_ip"].as_str().unwrap());
        assert!(!rr.is_empty() && !closest.is_empty(), "the root gave the service its IPs: {svc}");
        let row = r#"tr.service-ip[data-service="httpd"]"#;
        wait_text(c, &format!("{row} td.rr-ip"), |t| t == rr).await;
        assert_eq!(text(c, &format!("{row} td.closest-ip")).await.as_deref(), Some(closest));
        let inst = format!(r#"{row} div.instance[data-instance="0"]"#);
        let ns = svc["instance_list"][0]["ns_address"].as_str().unwrap_or_default();
        assert!(!ns.is_empty(), "the running instance has an overlay address: {svc}");
        assert_eq!(text(c, &format!("{inst} code.ns-address")).await.as_deref(), Some(ns));
        assert_eq!(text(c, &format!("{inst} span.node")).await.as_deref(), Some("doc-worker"));
        let (_, workers) = self.api.call("GET", "/api/cluster/doc/workers", None);
        let datapath = workers[0]["network"]["datapath"].as_str().unwrap_or_default().to_string();
        assert_eq!(attr(c, &format!("{inst} .datapath"), "data-datapath").await, datapath, "the instance's path");
        let card = r#"div.worker-net[data-worker="doc-worker"]"#;
        assert_eq!(attr(c, &format!("{card} .datapath"), "data-datapath").await, datapath, "the worker's path");
        let carried = text(c, &format!("{card} p.carried")).await.unwrap_or_default();
        assert!(carried.contains("eBPF fast path") && carried.contains("tun path"), "{carried:?}");
        // the path the worker runs carries the traffic: its byte rate rises above zero in the chart
        let path = if datapath == "ebpf" { "eBPF" } else { "tun" };
        let line = format!(r#"#throughput svg path.line[data-label="doc-worker {path}"]"#);
        let deadline = Instant::now() + UI_WAIT;
        let peak = loop {
            let v = match c.find(Locator::Css(&line)).await {
                Ok(e) => e.attr("data-peak").await.ok().flatten(),
                Err(_) => None,
            };
            if let Some(p) = v.and_then(|v| v.parse::<f64>().ok()).filter(|p| *p > 0.0) {
                break p;
            }
            if Instant::now() > deadline {
                let (_, workers) = self.api.call("GET", "/api/cluster/doc/workers", None);
                panic!("{line}: no bytes per second above 0 within {UI_WAIT:?}; the workers: {workers}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!("doc-worker {path} throughput peak: {peak} B/s");
        let carried = text(c, &format!("{card} strong.{}-bytes", if path == "eBPF" { "ebpf" } else { "tun" })).await;
        assert!(carried.as_deref().is_some_and(|t| t != "0 B"), "bytes carried by the {path} path: {carried:?}");
        self.shot(c, "07b-network").await;
    }

    async fn logout(&self, c: &Client) {
        click(c, "#logout").await;
        wait_path(c, "/login").await;
        assert!(c.get_all_cookies().await.unwrap().iter().all(|k| !k.name().starts_with("oak_")), "cookies deleted");
        c.goto(&format!("{}/clusters", self.base)).await.unwrap();
        wait_path(c, "/login").await;
        self.shot(c, "11-logged-out").await;
    }

    /// A user who is not the Admin sees the clusters but, in place of the workers, a note that they are for
    /// the Admin (the root answers them 403).
    async fn not_admin(&self, c: &Client) {
        let (code, v) = self.api.call(
            "POST",
            "/api/auth/register",
            Some(&json!({"name": "viewer", "password": VIEWER_PASSWORD, "roles": ["Application_Provider"]})),
        );
        assert_eq!(code, 200, "the Admin registers a user: {v}");
        c.goto(&format!("{}/login", self.base)).await.unwrap();
        type_into(c, "#username", "viewer").await;
        type_into(c, "#password", VIEWER_PASSWORD).await;
        click(c, "#login").await;
        wait_path(c, "/clusters").await;
        click(c, r#"tr.cluster[data-cluster="doc"] a.cluster-link"#).await;
        let note = wait_text(c, "#workers-admin-only", |t| !t.is_empty()).await;
        assert!(note.starts_with("Worker details") && note.contains("for the Admin"), "{note:?}");
        assert!(c.find(Locator::Css("#workers")).await.is_err(), "no worker table for a non-Admin");
        self.shot(c, "12-cluster-not-admin").await;
        c.goto(&format!("{}/network", self.base)).await.unwrap();
        wait_text(c, "#workers-admin-only", |t| t.contains("for the Admin")).await;
        click(c, "#logout").await;
        wait_path(c, "/login").await;
    }

    fn code(&self) -> String {
        format!("oci-archive:{}", self.image.display())
    }

    async fn shot(&self, c: &Client, name: &str) {
        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}

/// A client running inside an instance's network namespace.
struct Load {
    running: std::thread::JoinHandle<(u64, u64, String)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Load {
    /// Stops the client; answers how many fetches completed whole and how many did not, with the last
    /// error.
    fn finish(self) -> (u64, u64, String) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = self.running.join().unwrap();
        eprintln!("client in instance 0: {} fetches of /big, {} failed; last error: {:?}", r.0, r.1, r.2);
        r
    }
}

/// Waits until instance 0 of `service` shows `target` in the page; another end state fails the test with
/// the reason the page shows. Answers the states seen, in order.
async fn wait_state(c: &Client, service: &str, target: &str) -> Vec<String> {
    wait_instance_state(c, service, 0, target).await
}

/// [`wait_state`] for instance `n`.
async fn wait_instance_state(c: &Client, service: &str, n: u32, target: &str) -> Vec<String> {
    let row = format!(r#"div.service[data-service="{service}"] tr.instance[data-instance="{n}"]"#);
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = text(c, &format!("{row} .state")).await.unwrap_or_default();
        if !s.is_empty() && seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == target {
            return seen;
        }
        if ["RUNNING", "FAILED", "DEAD", "COMPLETED"].contains(&s.as_str()) {
            let reason = text(c, &format!("{row} td.reason")).await;
            panic!("{service} instance {n} ended {s}, not {target}: {reason:?}");
        }
        assert!(
            Instant::now() < deadline,
            "no {target} for {service} instance {n} in the page within 90 s; states seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_gone(c: &Client, css: &str) {
    let deadline = Instant::now() + UI_WAIT;
    while c.find(Locator::Css(css)).await.is_ok() {
        assert!(Instant::now() < deadline, "{css} still in the page after {UI_WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the first element matching `css`; None while there is none (or it was just swapped out).
async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Polls until the element's text satisfies `ok` (htmx swaps the live parts every 2 s).
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let t = text(c, css).await;
        if let Some(t) = t.as_deref().filter(|t| ok(t)) {
            return t.to_string();
        }
        if Instant::now() > deadline {
            let body = text(c, "main").await.unwrap_or_default();
            panic!("{css}: text {t:?} not as expected within {UI_WAIT:?}; the page shows:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The attribute `name` of the first element matching `css`, or "" (asserted by the caller).
async fn attr(c: &Client, css: &str, name: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.attr(name).await.ok().flatten().unwrap_or_default(),
        Err(e) => panic!("no {css} in the page: {e}"),
    }
}

/// Polls until the attribute of the first element matching `css` satisfies `ok`.
async fn wait_attr(c: &Client, css: &str, name: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let v = match c.find(Locator::Css(css)).await {
            Ok(e) => e.attr(name).await.ok().flatten(),
            Err(_) => None,
        };
        if let Some(v) = v.as_deref().filter(|v| ok(v)) {
            return v.to_string();
        }
        assert!(Instant::now() < deadline, "{css} [{name}] = {v:?} not as expected within {UI_WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_path(c: &Client, path: &str) {
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let url = c.current_url().await.unwrap();
        if url.path() == path {
            return;
        }
        assert!(Instant::now() < deadline, "not on {path} within {UI_WAIT:?}: at {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn type_into(c: &Client, css: &str, s: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no {css}: {e}"));
    e.clear().await.unwrap();
    e.send_keys(s).await.unwrap();
}

/// Clicks the element, retrying while a poll swaps it out between finding and clicking.
async fn click(c: &Client, css: &str) {
    let deadline = Instant::now() + UI_WAIT;
    loop {
        let r = match c.find(Locator::Css(css)).await {
            Ok(e) => e.click().await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("cannot click {css}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Clicks an action and accepts the confirmation it asks, which must say `question`.
async fn click_confirm(c: &Client, css: &str, question: &str) {
    click(c, css).await;
    let deadline = Instant::now() + UI_WAIT;
    let asked = loop {
        match c.get_alert_text().await {
            Ok(t) => break t,
            Err(e) => assert!(Instant::now() < deadline, "{css} asked no confirmation: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(asked, question);
    c.accept_alert().await.unwrap();
}
