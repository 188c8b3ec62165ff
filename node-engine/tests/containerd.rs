//! Runtime tests against a real containerd (root only; skipped with a printed reason otherwise).

mod common;

use oak_node_engine::runtime::instance_id;

fn memory_limit_bytes(cgroups_path: &str) -> Option<u64> {
    let rel = cgroups_path.trim_start_matches('/');
    for f in [format!("/sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes"), format!("/sys/fs/cgroup/{rel}/memory.max")]
    {
        if let Ok(s) = std::fs::read_to_string(&f) {
            return s.trim().parse().ok();
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpd_runs_answers_and_undeploys_cleanly() {
    require_containerd!();
    let env = common::Env::new("httpd");
    let (rt, mut rx) = env.runtime().await;
    let mut spec = env.spec("svc-httpd", &["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]);
    spec.memory_mb = 64;
    spec.vcpus = 0.5;
    spec.environment = vec!["SLA_VAR=1".into()];
    let id = instance_id(&spec.job_name, 0);
    rt.deploy(spec.clone(), 0);

    let mut seen = Vec::new();
    let running = common::wait_for(&mut rx, "svc-httpd", &["RUNNING"], &mut seen).await;
    assert_eq!(seen, ["CREATING", "CREATED", "RUNNING"]);
    assert_eq!(running.instance_number, 0);
    if memory_limit_bytes(&rt.cgroups_path(&id)).is_some() {
        let u = rt.usage();
        let mine = u.iter().find(|u| u.service_id == "svc-httpd").expect("the running instance's use sampled");
        assert!(mine.memory_bytes > 0, "instance memory use reported: {u:?}");
    }
    let pid = rt.pid_of("svc-httpd", 0).expect("pid known");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    // Limits were applied to the cgroup.
    if let Some(limit) = memory_limit_bytes(&rt.cgroups_path(&id)) {
        assert_eq!(limit, 64 * 1024 * 1024);
    } else {
        eprintln!("note: memory cgroup of {id} not found, limit not checked");
    }
    // Its own network namespace, not the host's.
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap()
    );

    // httpd answers inside the instance's netns.
    let body = common::wait_http_in_netns(pid, 8080, "/index.html").await;
    if body.is_err() {
        let logs = std::fs::read_to_string(rt.log_path(&id)).unwrap_or_default();
        let ip =
            std::process::Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "ip", "addr"]).output().unwrap();
        panic!("httpd does not answer: {body:?}; logs: {logs}; netns: {}", String::from_utf8_lossy(&ip.stdout));
    }
    assert_eq!(body.unwrap(), "hello-oak");
    // Image env and SLA env both reach the process.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("IMAGE_VAR=from-image") && environ.contains("SLA_VAR=1"), "{environ}");

    rt.undeploy("svc-httpd", 0).await.expect("undeploy");
    let st = common::wait_for(&mut rx, "svc-httpd", &["UNDEPLOYED"], &mut seen).await;
    assert_eq!(st.detail, "stopped and removed");
    common::assert_gone(&rt, &id).await;
    assert!(!rt.log_path(&id).exists(), "log file left behind");
    assert!(rt.instances().is_empty());
    env.cleanup(&rt).await;
}

/// A busy instance limited to half a core: its CPU use, as sampled from its cgroup between two samples,
/// is well above idle and not above the limit (with room for accounting slop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_cpu_use_is_sampled_from_its_cgroup() {
    require_containerd!();
    let env = common::Env::new("busy");
    let (rt, mut rx) = env.runtime().await;
    let mut spec = env.spec("svc-busy", &["/bin/sh", "-c", "while :; do :; done"]);
    spec.vcpus = 0.5;
    let id = instance_id(&spec.job_name, 0);
    rt.deploy(spec, 0);
    let mut seen = Vec::new();
    common::wait_for(&mut rx, "svc-busy", &["RUNNING"], &mut seen).await;
    let first = rt.usage();
    assert_eq!(first.len(), 1, "the running instance is sampled: {first:?}");
    assert_eq!(first[0].cpu_percent, 0.0, "no CPU figure before a second sample");
    let mut samples = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let busy = loop {
        // samples as far apart as the heartbeat, so the figure is an average over that time
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        let u = rt.usage().into_iter().find(|u| u.service_id == "svc-busy").expect("still sampled");
        samples.push(u.cpu_percent);
        if u.cpu_percent > 20.0 {
            break u;
        }
        assert!(std::time::Instant::now() < deadline, "a busy loop shows no CPU use: {samples:?}");
    };
    assert!(busy.cpu_percent < 80.0, "half a core at most (the SLA's vcpus): {samples:?}");
    assert!(busy.memory_bytes > 0);
    rt.undeploy("svc-busy", 0).await.expect("undeploy");
    common::wait_for(&mut rx, "svc-busy", &["UNDEPLOYED"], &mut seen).await;
    assert!(rt.usage().is_empty(), "an undeployed instance is no longer sampled");
    common::assert_gone(&rt, &id).await;
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_is_enforced() {
    require_containerd!();
    let env = common::Env::new("oom");
    let (rt, mut rx) = env.runtime().await;
    let mut spec = env.spec("svc-oom", &["/bin/sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"]);
    spec.memory_mb = 16;
    let id = instance_id(&spec.job_name, 0);
    rt.deploy(spec, 0);
    let mut seen = Vec::new();
    common::wait_for(&mut rx, "svc-oom", &["RUNNING"], &mut seen).await;
    let failed = common::wait_for(&mut rx, "svc-oom", &["FAILED"], &mut seen).await;
    assert!(failed.detail.contains("memory limit exceeded"), "detail: {}", failed.detail);
    assert!(failed.detail.contains("16 MB"), "detail: {}", failed.detail);
    assert_eq!(failed.exit_code, Some(137));
    rt.undeploy("svc-oom", 0).await.expect("undeploy");
    common::wait_for(&mut rx, "svc-oom", &["UNDEPLOYED"], &mut seen).await;
    common::assert_gone(&rt, &id).await;
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_fails_clearly_and_others_still_run() {
    require_containerd!();
    let env = common::Env::new("badimg");
    let (rt, mut rx) = env.runtime().await;

    let mut bad = env.spec("svc-bad", &[]);
    bad.code = "registry.invalid/oak-ne/none:1".into();
    rt.deploy(bad.clone(), 0);
    let mut seen = Vec::new();
    let f = common::wait_for(&mut rx, "svc-bad", &["FAILED"], &mut seen).await;
    assert_eq!(seen, ["CREATING", "FAILED"]);
    eprintln!("bad image detail: {}", f.detail);
    assert!(f.detail.contains("registry.invalid/oak-ne/none:1"), "detail: {}", f.detail);
    common::assert_gone(&rt, &instance_id(&bad.job_name, 0)).await;

    let mut invalid = env.spec("svc-invalid", &[]);
    invalid.code = "Not A Ref!".into();
    rt.deploy(invalid, 0);
    let f = common::wait_for(&mut rx, "svc-invalid", &["FAILED"], &mut Vec::new()).await;
    assert!(f.detail.contains("invalid image reference"), "detail: {}", f.detail);

    let mut missing = env.spec("svc-missing", &[]);
    missing.code = format!("oci-archive:{}/nope.tar", env.dir.path().display());
    rt.deploy(missing, 0);
    let f = common::wait_for(&mut rx, "svc-missing", &["FAILED"], &mut Vec::new()).await;
    assert!(f.detail.contains("nope.tar"), "detail: {}", f.detail);

    // The worker keeps serving: a one-shot instance runs to COMPLETED with its output in the logs.
    let mut ok = env.spec("svc-oneshot", &["/bin/sh", "-c", "echo done-$IMAGE_VAR"]);
    ok.one_shot = true;
    rt.deploy(ok.clone(), 0);
    let mut seen = Vec::new();
    let done = common::wait_for(&mut rx, "svc-oneshot", &["COMPLETED"], &mut seen).await;
    assert_eq!(done.exit_code, Some(0));
    assert!(done.logs.contains("done-from-image"), "logs: {:?}", done.logs);

    // A failing command is FAILED with its exit code.
    rt.deploy(env.spec("svc-exit3", &["/bin/sh", "-c", "exit 3"]), 0);
    let f = common::wait_for(&mut rx, "svc-exit3", &["FAILED"], &mut Vec::new()).await;
    assert_eq!(f.exit_code, Some(3));
    assert!(f.detail.contains("exited with code 3"), "{}", f.detail);

    // Unikernels are refused clearly without -u.
    let mut uk = env.spec("svc-uk", &[]);
    uk.virtualization = "unikernel".into();
    rt.deploy(uk, 0);
    let f = common::wait_for(&mut rx, "svc-uk", &["FAILED"], &mut Vec::new()).await;
    assert_eq!(f.detail, "unikernel support not enabled (start with -u=true)");

    for s in ["svc-bad", "svc-invalid", "svc-missing", "svc-oneshot", "svc-exit3", "svc-uk"] {
        rt.undeploy(s, 0).await.expect("undeploy");
    }
    common::assert_gone(&rt, &instance_id(&ok.job_name, 0)).await;
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_runtime_readopts_running_instances() {
    require_containerd!();
    let env = common::Env::new("adopt");
    let (rt1, mut rx1) = env.runtime().await;
    let spec = env.spec("svc-adopt", &["/bin/sleep", "600"]);
    let id = instance_id(&spec.job_name, 2);
    rt1.deploy(spec, 2);
    common::wait_for(&mut rx1, "svc-adopt", &["RUNNING"], &mut Vec::new()).await;
    let pid = rt1.pid_of("svc-adopt", 2).unwrap();

    // A new runtime (as after a NodeEngine restart) finds it.
    let (rt2, mut rx2) = env.runtime().await;
    assert!(rt2.instances().is_empty());
    let adopted = rt2.adopt().await.expect("adopt");
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0].service_id, "svc-adopt");
    assert_eq!(adopted[0].instance_number, 2);
    assert_eq!(adopted[0].status, "RUNNING");
    assert_eq!(rt2.pid_of("svc-adopt", 2), Some(pid));
    let st = common::wait_for(&mut rx2, "svc-adopt", &["RUNNING"], &mut Vec::new()).await;
    assert!(st.detail.contains("re-adopted"));

    // The new runtime watches it: an external kill is reported.
    let (rt3, mut rx3) = env.runtime().await;
    rt3.adopt().await.unwrap();
    common::wait_for(&mut rx3, "svc-adopt", &["RUNNING"], &mut Vec::new()).await;
    rt3.containerd().kill_task(&id, libc::SIGKILL as u32).await.unwrap();
    let f = common::wait_for(&mut rx3, "svc-adopt", &["FAILED"], &mut Vec::new()).await;
    assert!(f.detail.contains("signal 9"), "{}", f.detail);

    // rt2 watches it too.
    let f2 = common::wait_for(&mut rx2, "svc-adopt", &["FAILED"], &mut Vec::new()).await;
    assert_eq!(f2.exit_code, Some(137));

    rt2.undeploy("svc-adopt", 2).await.expect("undeploy");
    common::wait_for(&mut rx2, "svc-adopt", &["UNDEPLOYED"], &mut Vec::new()).await;
    common::assert_gone(&rt2, &id).await;
    env.cleanup(&rt2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_save_archive_is_imported_and_runs() {
    require_containerd!();
    let env = common::Env::new("docker");
    let (rt, mut rx) = env.runtime().await;
    let tag = format!("oak-ne-test/{}:v1", common::unique("d"));
    let archive = common::build_busybox_docker_archive(env.dir.path(), &tag);
    let spec = oak_proto::v1::ServiceSpec {
        service_id: "svc-docker".into(),
        job_name: "t.docker.svc.x".into(),
        code: format!("docker-archive:{}", archive.display()),
        // SLA args replace the image Cmd, the Entrypoint stays.
        args: vec!["echo from-$FROM".into()],
        one_shot: true,
        ..Default::default()
    };
    rt.deploy(spec.clone(), 0);
    let done = common::wait_for(&mut rx, "svc-docker", &["COMPLETED"], &mut Vec::new()).await;
    assert!(done.logs.contains("from-docker"), "logs: {:?}", done.logs);
    rt.undeploy("svc-docker", 0).await.unwrap();
    common::assert_gone(&rt, &instance_id(&spec.job_name, 0)).await;
    rt.containerd().delete_image_sync(&format!("docker.io/{tag}"), true).await.unwrap();
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeploy_right_after_deploy_leaves_nothing() {
    require_containerd!();
    let env = common::Env::new("race");
    let (rt, mut rx) = env.runtime().await;
    for round in 0..3u32 {
        let spec = env.spec("svc-race", &["/bin/sleep", "600"]);
        let id = instance_id(&spec.job_name, round);
        let deploying = rt.deploy(spec, round);
        if round == 1 {
            // Let the deploy get going first.
            common::wait_for(&mut rx, "svc-race", &["CREATING"], &mut Vec::new()).await;
        }
        rt.undeploy("svc-race", round).await.expect("undeploy");
        deploying.await.unwrap();
        common::assert_gone(&rt, &id).await;
        assert!(rt.instances().is_empty(), "round {round}: {:?}", rt.instances());
        // The last state reported for this instance is UNDEPLOYED.
        let mut last = None;
        while let Ok(st) = rx.try_recv() {
            if st.instance_number == round {
                last = Some(st.status);
            }
        }
        if round != 1 || last.is_some() {
            assert_eq!(last.as_deref(), Some("UNDEPLOYED"), "round {round}");
        }
    }
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_outside_the_image_directories_are_refused() {
    require_containerd!();
    let env = common::Env::new("imgdir");
    let (rt, mut rx) = env.runtime().await;
    // an archive that exists, but in another directory, reached through a link inside the image directory
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = common::build_busybox_image(elsewhere.path(), "import.local/oak-ne-test/outside:latest");
    let link = env.dir.path().join("link.tar");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let inside = env.dir.path().display().to_string();
    let real_outside = std::fs::canonicalize(&outside).unwrap().display().to_string();
    let cases = [
        ("svc-shadow", "oci-archive:/etc/shadow".to_string(), "/etc/shadow".to_string()),
        ("svc-dotdot", format!("oci-archive:{inside}/../../../etc/passwd"), "/etc/passwd".to_string()),
        ("svc-link", format!("docker-archive:{}", link.display()), real_outside.clone()),
        ("svc-bare", outside.display().to_string(), real_outside),
    ];
    for (svc, code, real) in &cases {
        let mut spec = env.spec(svc, &[]);
        spec.code = code.clone();
        rt.deploy(spec, 0);
        let mut seen = Vec::new();
        let f = common::wait_for(&mut rx, svc, &["FAILED"], &mut seen).await;
        assert_eq!(seen, ["CREATING", "FAILED"], "{svc}");
        assert!(f.detail.contains("outside the image directories"), "{svc}: {}", f.detail);
        assert!(f.detail.contains(real), "{svc}: the detail names the real path {real}: {}", f.detail);
    }
    // the image directory's own archives still deploy, and nothing was imported from outside it
    rt.deploy(env.spec("svc-inside", &["/bin/sh", "-c", "echo inside"]), 0);
    common::wait_for(&mut rx, "svc-inside", &["RUNNING", "COMPLETED"], &mut Vec::new()).await;
    assert!(rt.containerd().get_image("import.local/oak-ne-test/outside:latest").await.unwrap().is_none());
    for s in ["svc-shadow", "svc-dotdot", "svc-link", "svc-bare", "svc-inside"] {
        rt.undeploy(s, 0).await.expect("undeploy");
    }
    env.cleanup(&rt).await;
}

/// The cgroup file `name` of an instance (v2, else v1's `controller` hierarchy).
fn cgroup_file(cgroups_path: &str, controller: &str, name: &str) -> Option<String> {
    let rel = cgroups_path.trim_start_matches('/');
    [format!("/sys/fs/cgroup/{rel}/{name}"), format!("/sys/fs/cgroup/{controller}/{rel}/{name}")]
        .iter()
        .find_map(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_confined_unless_privileged() {
    require_containerd!();
    let env = common::Env::new("confined");
    let (rt, mut rx) = env.runtime().await;
    // what the instance sees of itself, then whether it may make a new namespace; stays up to be inspected
    let probe = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; unshare -n true && echo unshare-ok || \
                 echo unshare-refused; sleep 600";
    let mut confined = env.spec("svc-confined", &["/bin/sh", "-c", probe]);
    confined.memory_mb = 32;
    let mut privileged = env.spec("svc-privileged", &["/bin/sh", "-c", probe]);
    privileged.privileged = true;
    for s in [&confined, &privileged] {
        rt.deploy(s.clone(), 0);
        common::wait_for(&mut rx, &s.service_id, &["RUNNING"], &mut Vec::new()).await;
    }
    let logs = |s: &oak_proto::v1::ServiceSpec| {
        let path = rt.log_path(&instance_id(&s.job_name, 0));
        async move {
            for _ in 0..100 {
                let l = std::fs::read_to_string(&path).unwrap_or_default();
                if l.contains("unshare-") {
                    return l;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("{} printed nothing", path.display());
        }
    };
    let c = logs(&confined).await;
    assert!(c.contains("Seccomp:\t2"), "a seccomp filter: {c}");
    assert!(c.contains("NoNewPrivs:\t1"), "{c}");
    assert!(c.contains("unshare-refused"), "{c}");
    let p = logs(&privileged).await;
    assert!(p.contains("Seccomp:\t0") && p.contains("NoNewPrivs:\t0"), "{p}");
    assert!(p.contains("unshare-ok"), "{p}");
    for s in [&confined, &privileged] {
        let pids = cgroup_file(&rt.cgroups_path(&instance_id(&s.job_name, 0)), "pids", "pids.max");
        assert_eq!(pids.as_deref(), Some("1024"), "{}: pids limit", s.service_id);
        rt.undeploy(&s.service_id, 0).await.expect("undeploy");
    }
    env.cleanup(&rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_interrupted_twice_is_not_tried_again() {
    require_containerd!();
    let env = common::Env::new("journal");
    let (rt, mut rx) = env.runtime().await;
    let spec = env.spec("svc-journal", &["/bin/sh", "-c", "echo up; sleep 600"]);
    let id = instance_id(&spec.job_name, 0);
    // as a NodeEngine that died twice during this deploy leaves it
    let journal = env.data_dir().join("deploying").join(&id);
    std::fs::write(&journal, "2").unwrap();
    rt.deploy(spec.clone(), 0);
    let mut seen = Vec::new();
    let f = common::wait_for(&mut rx, "svc-journal", &["FAILED"], &mut seen).await;
    assert_eq!(seen, ["CREATING", "FAILED"]);
    assert!(
        f.detail.contains("not deployed again") && f.detail.contains("stopped during the last 2 deploys"),
        "{}",
        f.detail
    );
    common::assert_gone(&rt, &id).await;
    assert!(!journal.exists(), "refusing it is the end of that deploy");
    // asked again (a new deploy from the user), it is tried: once interrupted is still tried too
    std::fs::write(&journal, "1").unwrap();
    rt.deploy(spec.clone(), 0);
    common::wait_for(&mut rx, "svc-journal", &["RUNNING"], &mut Vec::new()).await;
    assert!(!journal.exists(), "a finished deploy leaves nothing in the journal");
    rt.undeploy("svc-journal", 0).await.expect("undeploy");
    env.cleanup(&rt).await;
}
