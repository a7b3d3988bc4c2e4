//! The link to the master: connect, register (with the tasks still running
//! after a reconnect), heartbeat, hand master messages to the agent, and
//! reconnect with a capped backoff when the link drops.

use std::time::Duration;

use butte_api::agent_link::v1::{
    self as link, agent_link_client::AgentLinkClient, agent_message, master_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::agent::Agent;

pub async fn run(agent: Agent) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&agent).await {
            Ok(()) => tracing::warn!("the master closed the link; reconnecting"),
            Err(error) => {
                tracing::warn!(%error, master = agent.config.master, "link to the master failed; retrying in {backoff:?}")
            }
        }
        agent.disconnected();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn session(agent: &Agent) -> anyhow::Result<()> {
    let mut client = AgentLinkClient::connect(format!("http://{}", agent.config.master)).await?;
    let (outbound, receiver) = mpsc::unbounded_channel();
    outbound.send(agent.register_message(outbound.clone()))?;
    let mut inbound = client
        .session(UnboundedReceiverStream::new(receiver))
        .await?
        .into_inner();
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the master closed the link before answering"))?;
    let Some(master_message::Kind::Registered(registered)) = first.kind else {
        anyhow::bail!("the master answered registration with {first:?}");
    };
    tracing::info!(
        agent_id = registered.agent_id.value,
        "registered with the master"
    );
    agent.registered(registered.agent_id.value);
    let interval = Duration::from_secs_f64(registered.heartbeat_interval_seconds.clamp(0.1, 60.0));
    let mut heartbeat = tokio::time::interval(interval);
    loop {
        tokio::select! {
            message = inbound.message() => {
                match message? {
                    Some(message) => {
                        if let Some(kind) = message.kind {
                            agent.handle(kind);
                        }
                    }
                    None => return Ok(()),
                }
            }
            _ = heartbeat.tick() => {
                outbound.send(link::AgentMessage { kind: Some(agent_message::Kind::Heartbeat(link::Heartbeat {})) })?;
                agent.flush_updates();
            }
        }
    }
}
