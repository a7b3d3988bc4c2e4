//! TLS on the master's port and client certificates on the agent link,
//! with certificates made by openssl and checked by curl and a real gRPC
//! client: HTTPS verifies against the CA, plain HTTP is refused or
//! redirected, only agents with a certificate of `--agent-ca` register,
//! none takes another's id, and a certificate reloaded (SIGHUP) serves new
//! connections while open links go on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use butte_master_lite::{MasterConfig, RunningMaster};
use support::TestAgent;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/install-deps installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA named `name` in `dir`: `name.pem`, `name.key`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A certificate `name.pem`/`name.key` signed by `ca`, for `san` and `usage`.
fn issue(dir: &Path, ca: &str, name: &str, san: &str, usage: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nextendedKeyUsage={usage}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// The CA, the master's certificate (127.0.0.1), agents a and b, and an
/// agent certificate from a CA the master does not know.
fn pki(name: &str) -> PathBuf {
    let dir = support::work_dir(name);
    ca(&dir, "ca");
    ca(&dir, "rogue-ca");
    issue(
        &dir,
        "ca",
        "master",
        "IP:127.0.0.1,DNS:localhost",
        "serverAuth",
    );
    issue(&dir, "ca", "agent-a", "DNS:agent-a.test", "clientAuth");
    issue(&dir, "ca", "agent-b", "DNS:agent-b.test", "clientAuth");
    issue(&dir, "rogue-ca", "rogue", "DNS:agent-a.test", "clientAuth");
    dir
}

fn tls_config(dir: &Path) -> MasterConfig {
    let mut config = MasterConfig::for_work_dir(dir.join("work"));
    config.tls_cert = Some(dir.join("master.pem"));
    config.tls_key = Some(dir.join("master.key"));
    config
}

/// curl's answer: (exit code, "HTTP_CODE REDIRECT_URL", body).
fn curl(args: &[&str]) -> (i32, String) {
    let output = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code} %{redirect_url}",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// A gRPC channel to the master over TLS, with `identity` (name of a
/// certificate in `dir`) as its client certificate.
async fn channel(
    master: &RunningMaster,
    dir: &Path,
    ca: &str,
    identity: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let read = |file: String| std::fs::read(dir.join(file)).unwrap();
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(format!("{ca}.pem"))));
    if let Some(name) = identity {
        tls = tls.identity(Identity::from_pem(
            read(format!("{name}.pem")),
            read(format!("{name}.key")),
        ));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{}", master.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_verifies_against_the_ca_and_plain_http_is_refused_or_redirected() {
    let dir = pki("tls-http");
    let master = support::master_with(tls_config(&dir)).await;
    let port = master.addr.port();
    let https = format!("https://127.0.0.1:{port}/health");
    let ca = dir.join("ca.pem");
    let (code, out) = curl(&["--cacert", ca.to_str().unwrap(), &https]);
    assert_eq!(
        (code, out.trim()),
        (0, "200"),
        "curl verifies the master against the CA"
    );
    let (code, _) = curl(&[&https]);
    assert_eq!(code, 60, "without the CA, curl cannot verify the master");
    let (code, out) = curl(&[&format!("http://127.0.0.1:{port}/health")]);
    assert_eq!(code, 0);
    assert!(
        out.contains("HTTPS only") && out.trim_end().ends_with("400"),
        "{out}"
    );
    master.shutdown().await;

    let mut config = tls_config(&dir);
    config.work_dir = dir.join("work-redirect");
    config.tls_plain_http = butte_web::serve::PlainHttp::Redirect;
    let master = support::master_with(config).await;
    let port = master.addr.port();
    let (_, out) = curl(&[&format!("http://127.0.0.1:{port}/state?x=1")]);
    assert_eq!(
        out.trim(),
        format!("308 https://127.0.0.1:{port}/state?x=1")
    );
    master.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_agents_certified_by_the_agent_ca_register_and_none_takes_another_ones_id() {
    let dir = pki("tls-agents");
    let mut config = tls_config(&dir);
    config.agent_ca = Some(dir.join("ca.pem"));
    config.authenticate_agents = true;
    let master = support::master_with(config).await;

    let a = TestAgent::register_over(
        channel(&master, &dir, "ca", Some("agent-a")).await.unwrap(),
        "cpus:2;mem:1024",
        None,
        vec![],
    )
    .await
    .expect("agent a registers with its certificate");
    // No certificate: refused, saying what is needed.
    let anonymous = TestAgent::register_over(
        channel(&master, &dir, "ca", None).await.unwrap(),
        "cpus:2;mem:1024",
        None,
        vec![],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    assert!(
        anonymous.message().contains("--agent-ca"),
        "{}",
        anonymous.message()
    );
    // A certificate from another CA: the handshake fails.
    let rogue = match channel(&master, &dir, "ca", Some("rogue")).await {
        Err(_) => true,
        Ok(channel) => TestAgent::register_over(channel, "cpus:1;mem:64", None, vec![])
            .await
            .is_err(),
    };
    assert!(
        rogue,
        "a certificate the agent CA did not sign gets nowhere"
    );
    // Agent b's valid certificate with a's id: refused, a stays.
    let impostor = TestAgent::register_over(
        channel(&master, &dir, "ca", Some("agent-b")).await.unwrap(),
        "cpus:2;mem:1024",
        Some(a.agent_id.clone()),
        vec![],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(impostor.code(), tonic::Code::Unauthenticated);
    assert!(
        impostor.message().contains("agent-a.test"),
        "{}",
        impostor.message()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        master.shared.lock().agents[&a.agent_id].connected(),
        "the real agent's link is untouched"
    );
    // Agent a itself comes back with its id.
    let again = TestAgent::register_over(
        channel(&master, &dir, "ca", Some("agent-a")).await.unwrap(),
        "cpus:2;mem:1024",
        Some(a.agent_id.clone()),
        vec![],
    )
    .await
    .expect("agent a re-registers");
    assert_eq!(again.agent_id, a.agent_id);
    master.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_certificate_serves_new_connections_and_open_links_go_on() {
    let dir = pki("tls-reload");
    let master = support::master_with(tls_config(&dir)).await;
    let agent = TestAgent::register_over(
        channel(&master, &dir, "ca", None).await.unwrap(),
        "cpus:2;mem:1024",
        None,
        vec![],
    )
    .await
    .expect("registers over TLS");
    // The operator renews the master's certificate, from a new CA.
    ca(&dir, "ca2");
    issue(&dir, "ca2", "master2", "IP:127.0.0.1", "serverAuth");
    std::fs::copy(dir.join("master2.pem"), dir.join("master.pem")).unwrap();
    std::fs::copy(dir.join("master2.key"), dir.join("master.key")).unwrap();
    master.reload_tls().expect("the new certificate loads");
    let https = format!("https://127.0.0.1:{}/health", master.addr.port());
    let (code, out) = curl(&["--cacert", dir.join("ca2.pem").to_str().unwrap(), &https]);
    assert_eq!(
        (code, out.trim()),
        (0, "200"),
        "new connections get the new certificate"
    );
    let (code, _) = curl(&["--cacert", dir.join("ca.pem").to_str().unwrap(), &https]);
    assert_eq!(code, 60, "and no longer the old one");
    // A broken file leaves the working certificate in place.
    std::fs::write(dir.join("master.key"), "not a key").unwrap();
    assert!(master.reload_tls().is_err());
    let (code, _) = curl(&["--cacert", dir.join("ca2.pem").to_str().unwrap(), &https]);
    assert_eq!(code, 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        master.shared.lock().agents[&agent.agent_id].connected(),
        "the link opened before the reload goes on"
    );
    master.shutdown().await;
}
