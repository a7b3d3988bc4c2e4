//! The agents' gRPC link (`butte.agent.v1.AgentLink/Session`): one
//! bidirectional stream per agent, opened by the agent, Register first.

use std::pin::Pin;

use butte_api::agent_link::v1::agent_link_server::AgentLink;
use butte_api::agent_link::v1::{AgentMessage, MasterMessage, agent_message};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::master::Shared;

pub struct AgentLinkService {
    shared: Shared,
}

impl AgentLinkService {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

type MasterStream = Pin<Box<dyn Stream<Item = Result<MasterMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type SessionStream = MasterStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<MasterStream>, Status> {
        // Set by the accept loop: what the client certificate names.
        let identity = request
            .extensions()
            .get::<butte_web::tls::PeerIdentity>()
            .and_then(|identity| identity.0.clone());
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the link closed before the agent registered")
        })?;
        let Some(agent_message::Kind::Register(register)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message on the agent link must be Register",
            ));
        };
        let (sender, receiver) = mpsc::channel(crate::master::AGENT_LINK_QUEUE);
        let (agent_id, epoch) = self
            .shared
            .lock()
            .register_agent(register, sender, identity.as_deref())
            .map_err(|error| {
                let message = format!("registration refused: {error}");
                match error {
                    // For good: the agent gives up its tasks and its id.
                    crate::master::RegisterError::Gone(_) => Status::permission_denied(message),
                    crate::master::RegisterError::Unauthenticated => {
                        Status::unauthenticated(message)
                    }
                    // Not PERMISSION_DENIED, which tells an agent it is gone
                    // for good: a real agent whose certificate changed keeps
                    // its tasks and retries while the operator sorts it out.
                    crate::master::RegisterError::Impostor { .. } => {
                        tracing::warn!(%message, "an agent presented another agent's id");
                        Status::unauthenticated(message)
                    }
                    _ => Status::invalid_argument(message),
                }
            })?;

        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(agent_id, %status, "agent link failed");
                        break;
                    }
                };
                let mut master = shared.lock();
                match message.kind {
                    Some(agent_message::Kind::Heartbeat(_)) => master.agent_heartbeat(&agent_id),
                    Some(agent_message::Kind::StatusUpdate(update)) => {
                        master.agent_status_update(&agent_id, update)
                    }
                    Some(agent_message::Kind::Telemetry(batch)) => {
                        master.telemetry.record(&agent_id, batch)
                    }
                    Some(agent_message::Kind::ResourcesChanged(changed)) => {
                        master.agent_resources_changed(&agent_id, changed)
                    }
                    Some(agent_message::Kind::Register(_)) => {
                        tracing::warn!(agent_id, "Register sent twice on one link; ignored");
                    }
                    None => {}
                }
            }
            shared.lock().agent_disconnected(&agent_id, epoch);
        });
        let outbound = ReceiverStream::new(receiver).map(Ok);
        Ok(Response::new(Box::pin(outbound)))
    }
}
