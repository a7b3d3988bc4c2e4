//! A stand-in master on the agent link, for tests that drive the agent
//! binary directly: serve an `AgentLink` service on a port, and start an
//! agent pointed at it.

use std::path::Path;
use std::process::{Child, Command};

use butte_api::agent_link::v1::agent_link_server::{AgentLink, AgentLinkServer};
use tokio_stream::wrappers::TcpListenerStream;

use super::cluster::binary;

/// Serves `service` as the master's agent link on 127.0.0.1:`port`.
pub fn serve<S: AgentLink>(runtime: &tokio::runtime::Runtime, port: u16, service: S) {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap();
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(AgentLinkServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
}

/// The agent binary, drained with SIGUSR1 (so it kills its tasks and
/// removes its cgroups, pins and checkpoints) and reaped on drop.
pub struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGUSR1);
        }
        let _ = self.0.wait();
    }
}

/// Starts an agent on `agent_port` linked to the master on `master_port`,
/// its work dir `base/agent`, its log `base/agent.log`; `name` makes its
/// container prefix and cgroup subtree its own.
pub fn start_agent(
    base: &Path,
    master_port: u16,
    agent_port: u16,
    name: &str,
    resources: &str,
) -> AgentProcess {
    std::fs::create_dir_all(base.join("agent")).unwrap();
    let log = std::fs::File::create(base.join("agent.log")).unwrap();
    AgentProcess(
        Command::new(binary("butte-agent"))
            .args(["--master", &format!("127.0.0.1:{master_port}")])
            .args(["--port", &agent_port.to_string()])
            .args(["--resources", resources])
            .args(["--container-prefix", &format!("{name}-")])
            .args(["--cgroup-subtree", &format!("butte/{name}")])
            .args(["--status-update-retry", "1"])
            .arg("--work-dir")
            .arg(base.join("agent"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}
