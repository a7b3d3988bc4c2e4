//! The agent's link to the master outlives a master that goes silent: a
//! fake master registers the agent, then answers nothing while keeping the
//! connection open (a hung master, or a partition that leaves the TCP
//! session up). The agent must take the link for dead after three heartbeat
//! intervals of silence and register again on a new one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use butte_api::agent_link::v1::agent_link_server::AgentLink;
use butte_api::agent_link::v1::{
    AgentMessage, MasterMessage, Registered, agent_message, master_message,
};
use butte_api::mesos::v1::{AgentId, MasterInfo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

mod common;
use common::fake_master;

const PORT: u16 = 15_178;
const AGENT_PORT: u16 = 15_179;

/// Registers every agent, then says nothing more, holding the stream open.
struct SilentMaster {
    sessions: Arc<AtomicUsize>,
}

type MasterStream = Pin<Box<dyn Stream<Item = Result<MasterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLink for SilentMaster {
    type SessionStream = MasterStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<MasterStream>, Status> {
        let mut inbound = request.into_inner();
        let (out, rx) = mpsc::channel(8);
        let sessions = self.sessions.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                if let Some(agent_message::Kind::Register(_)) = message.kind {
                    sessions.fetch_add(1, Ordering::SeqCst);
                    let registered = Registered {
                        agent_id: AgentId {
                            value: "silent-S0".into(),
                        },
                        heartbeat_interval_seconds: 0.5,
                        master_info: MasterInfo {
                            id: "silent".into(),
                            ip: 0x7f00_0001,
                            port: u32::from(PORT),
                            ..Default::default()
                        },
                    };
                    let kind = master_message::Kind::Registered(registered);
                    let _ = out.send(Ok(MasterMessage { kind: Some(kind) })).await;
                }
                // Heartbeats and everything else: read, never answered.
            }
            drop(out);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[test]
fn an_agent_whose_master_goes_silent_opens_a_new_link() {
    let base =
        Path::new("/var/lib/butte-kernel-tests").join(format!("link-{}", std::process::id()));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sessions = Arc::new(AtomicUsize::new(0));
    fake_master::serve(
        &runtime,
        PORT,
        SilentMaster {
            sessions: sessions.clone(),
        },
    );
    let agent = fake_master::start_agent(&base, PORT, AGENT_PORT, "ktlink", "cpus:1;mem:256");
    // 3 intervals of 0.5 s of silence, then the backoff (200 ms) and a new link.
    let deadline = Instant::now() + Duration::from_secs(15) * common::slowdown();
    while sessions.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let opened = sessions.load(Ordering::SeqCst);
    drop(agent);
    let log = std::fs::read_to_string(base.join("agent.log")).unwrap_or_default();
    assert!(
        opened >= 2,
        "the agent registered again on a new link ({opened} sessions):\n{log}"
    );
    assert!(log.contains("sent nothing for"), "the log says why:\n{log}");
    std::fs::remove_dir_all(&base).unwrap();
}
