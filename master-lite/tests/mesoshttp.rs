//! A real Mesos client library (mesoshttp 0.4.2 from PyPI) drives a framework
//! against our master and an agent on the real gRPC link.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

fn python() -> PathBuf {
    let python = std::env::var_os("BUTTE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run scripts/install-deps (it makes .venv with mesoshttp) or set BUTTE_TEST_PYTHON",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesoshttp_framework_subscribes_launches_acknowledges_declines_suppresses_revives_and_tears_down()
 {
    let config = butte_master_lite::MasterConfig::for_work_dir(support::work_dir("mesoshttp"));
    run_framework(config, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesoshttp_framework_authenticates_with_its_principal_and_secret() {
    let dir = support::work_dir("mesoshttp-auth");
    let credentials = dir.join("credentials");
    std::fs::write(
        &credentials,
        "ops ops-secret
",
    )
    .unwrap();
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut config = butte_master_lite::MasterConfig::for_work_dir(dir);
    config.credentials = Some(credentials);
    config.authenticate_frameworks = true;
    config.authenticate_http_readonly = true;
    run_framework(config, Some(("ops", "ops-secret"))).await;
}

/// The framework script's whole scenario against a master with `config`,
/// as `principal` with its secret where given.
async fn run_framework(
    mut config: butte_master_lite::MasterConfig,
    principal: Option<(&str, &str)>,
) {
    // mesoshttp hands over an event only when the next one arrives: heartbeat every second.
    config.heartbeat_interval = Duration::from_secs(1);
    let master = support::master_with(config).await;
    let reader = match principal {
        Some((principal, secret)) => support::basic_client(principal, secret),
        None => reqwest::Client::new(),
    };
    let agent = support::TestAgent::connect(&master, "cpus:4;mem:4096;ports:[31000-32000]").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mesoshttp_framework.py");
    let child = tokio::process::Command::new(python())
        .arg(&script)
        .arg(format!("http://{}", master.addr))
        .arg("60")
        .args(principal.iter().flat_map(|(p, s)| [*p, *s]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python starts");
    let output = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("the mesoshttp framework finishes within 90 s")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "mesoshttp framework failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    // What the client saw is what the master did: two tasks finished, the framework is gone.
    let state = support::get_json_with(&reader, &master, "/state").await;
    assert_eq!(
        state["frameworks"].as_array().unwrap().len(),
        0,
        "torn down: {state}"
    );
    assert_eq!(state["completed_frameworks"][0]["name"], "mesoshttp-test");
    let metrics = support::get_json_with(&reader, &master, "/metrics/snapshot").await;
    assert!(
        metrics["master/tasks_launched"].as_f64().unwrap() >= 2.0,
        "{metrics}"
    );
    assert!(
        metrics["master/offers_declined"].as_f64().unwrap() >= 1.0,
        "{metrics}"
    );
    assert!(
        agent.unacked.lock().unwrap().is_empty(),
        "every update acknowledged through to the agent"
    );
    master.shutdown().await;
}
