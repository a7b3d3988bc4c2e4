//! The real master and agent with authentication and TLS on: the agent's
//! link goes over TLS with its client certificate, an agent without one is
//! refused, and the example framework runs a task through HTTPS as an
//! authenticated principal (the README's worked example, end to end).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

mod common;
use common::cluster::{Cluster, Https, Ports, binary, python, wait_for};

/// The CA, the master's certificate (127.0.0.1), the agent's
/// (agent-1.test) and the credentials, made by scripts/make-test-pki.
fn pki(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-test-pki");
    let output = Command::new(script)
        .arg(dir)
        .output()
        .expect("scripts/make-test-pki runs (scripts/install-deps installs openssl)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The HTTP status curl gets with `args`.
fn http_code(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn an_agent_links_over_tls_with_its_certificate_and_a_principal_runs_a_task_over_https() {
    let pki_dir =
        Path::new("/var/lib/butte-kernel-tests").join(format!("tls-pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pki_dir);
    std::fs::create_dir_all(&pki_dir).unwrap();
    pki(&pki_dir);
    let file = |name: &str| pki_dir.join(name).to_str().unwrap().to_owned();
    let master_args = [
        "--tls-cert",
        &file("master.pem"),
        "--tls-key",
        &file("master.key"),
        "--agent-ca",
        &file("ca.pem"),
        "--authenticate-agents",
        "--credentials",
        &file("credentials"),
        "--authenticate-frameworks",
        "--authenticate-http-readwrite",
        "--authenticate-http-readonly",
    ];
    let agent_args = [
        "--tls-ca",
        &file("ca.pem"),
        "--tls-cert",
        &file("agent.pem"),
        "--tls-key",
        &file("agent.key"),
        "--credentials",
        &file("credentials"),
        "--authenticate-http-readonly",
    ];
    let cluster = Cluster::start_secure(
        "agent-tls",
        Ports {
            master: 15234,
            agent: 15235,
            agent_to_master: 15234,
        },
        "cpus:2;mem:1024",
        &agent_args,
        &master_args,
        Https {
            ca: pki_dir.join("ca.pem"),
            credentials: "ops:ops-secret".into(),
        },
    );

    // An agent that trusts the master but has no certificate is refused,
    // and says why in its log.
    let uncertified_dir = cluster.dir.join("uncertified");
    let log = std::fs::File::create(cluster.dir.join("uncertified.log")).unwrap();
    let mut uncertified = Command::new(binary("butte-agent"))
        .args(["--master", "127.0.0.1:15234", "--port", "15236"])
        .args(["--tls-ca", &file("ca.pem")])
        .args([
            "--resources",
            "cpus:1;mem:256",
            "--container-prefix",
            "kt15236-",
        ])
        .args(["--cgroup-subtree", "butte/kt15236", "--gpu-backend", "none"])
        .arg("--work-dir")
        .arg(&uncertified_dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for("the uncertified agent to be refused", || {
        std::fs::read_to_string(cluster.dir.join("uncertified.log"))
            .is_ok_and(|log| log.contains("--agent-ca"))
    });
    let _ = uncertified.kill();
    let _ = uncertified.wait();
    common::isolator_at("butte/kt15236").remove_subtree();
    let snapshot = cluster.master_get("/metrics/snapshot").unwrap();
    assert!(
        snapshot.contains("\"master/slaves_active\":1.0"),
        "only the certified agent: {snapshot}"
    );
    // Without credentials, the views answer 401.
    assert_eq!(
        http_code(&["--cacert", &file("ca.pem"), "https://127.0.0.1:15234/state"]),
        "401"
    );

    // The agent's own port: HTTPS with its certificate (agent-1.test),
    // its read endpoints behind the same credentials, /health open.
    let agent_get = |path: &str, credentials: Option<&str>| {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-w", "\n%{http_code}", "--cacert", &file("ca.pem")])
            .args(["--resolve", "agent-1.test:15235:127.0.0.1"]);
        if let Some(credentials) = credentials {
            curl.args(["-u", credentials]);
        }
        let output = curl
            .arg(format!("https://agent-1.test:15235{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(agent_get("/metrics", None).ends_with("401"));
    let metrics = agent_get("/metrics", Some("ops:ops-secret"));
    assert!(
        metrics.ends_with("200") && metrics.contains("butte_"),
        "{metrics}"
    );
    assert!(agent_get("/health", None).ends_with("200"));
    assert_eq!(
        http_code(&["http://127.0.0.1:15235/health"]),
        "400",
        "plain HTTP on the agent's TLS port"
    );

    // The example framework, over HTTPS, as principal ops.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/run_task.py");
    let mut run = Command::new(python());
    run.arg(&script)
        .args([
            "--master",
            "https://127.0.0.1:15234",
            "--ca",
            &file("ca.pem"),
        ])
        .args([
            "--principal",
            "ops",
            "--secret",
            "ops-secret",
            "--cpus",
            "0.5",
            "--mem",
            "64",
        ])
        .args(["--", "echo", "hello over tls"]);
    // The script gives up by itself after 60 s without an event.
    let output = run.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("TASK_FINISHED"),
        "run_task.py: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // SIGHUP: both read their certificates again and go on serving.
    for pid in [cluster.master_pid(), cluster.agent_pid().unwrap()] {
        // SAFETY: kill(2) of a child this test started.
        #[allow(unsafe_code)]
        let sent = unsafe { libc::kill(pid, libc::SIGHUP) };
        assert_eq!(sent, 0);
    }
    wait_for("both to reload", || {
        ["master.log", "agent.log"].iter().all(|log| {
            std::fs::read_to_string(cluster.dir.join(log))
                .is_ok_and(|text| text.contains("SIGHUP: TLS certificate and key read again"))
        })
    });
    assert!(
        agent_get("/health", None).ends_with("200"),
        "the agent serves on"
    );
    let frameworks = cluster.master_get("/frameworks").unwrap();
    assert!(
        frameworks.contains("\"principal\":\"ops\""),
        "the framework's principal is the one it authenticated as: {frameworks}"
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(&pki_dir);
    let _ = std::fs::remove_dir_all(&uncertified_dir);
}
