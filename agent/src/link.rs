//! The link to the master: connect, register (with the tasks still running
//! after a reconnect), heartbeat, hand master messages to the agent, and
//! reconnect with a capped backoff when the link drops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use butte_api::agent_link::v1::{
    self as link, agent_link_client::AgentLinkClient, agent_message, master_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::agent::Agent;

/// Messages that may wait to go to the master. A master or path too slow
/// for a second of telemetry at 4,096 tasks is not kept up with forever.
pub const OUTBOUND_BOUND: usize = 1024;

/// The link's outbound queue, bounded by `OUTBOUND_BOUND`. What does not
/// fit is dropped and said in the log: status updates stay in their
/// queues and are sent again, telemetry and heartbeats are lost.
#[derive(Clone)]
pub struct Outbound {
    sender: mpsc::Sender<link::AgentMessage>,
    dropped: Arc<AtomicU64>,
}

impl Outbound {
    pub fn new(bound: usize) -> (Self, mpsc::Receiver<link::AgentMessage>) {
        let (sender, receiver) = mpsc::channel(bound);
        let dropped = Arc::default();
        (Self { sender, dropped }, receiver)
    }

    /// Queues `message`; false when the link is gone (not when it is full).
    pub fn send(&self, message: link::AgentMessage) -> bool {
        match self.sender.try_send(message) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(message)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped == 1 || dropped.is_multiple_of(1000) {
                    let kind = match message.kind {
                        Some(agent_message::Kind::StatusUpdate(_)) => {
                            "a status update (it is sent again)"
                        }
                        Some(agent_message::Kind::Telemetry(_)) => "a telemetry batch",
                        _ => "a message",
                    };
                    tracing::warn!(
                        bound = self.sender.max_capacity(),
                        dropped,
                        "the link to the master is backed up; dropping {kind}"
                    );
                }
                true
            }
        }
    }

    /// Messages dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Why a link to the master ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// the master could not be reached or the stream failed
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// the master ended the stream with an error status
    #[error(transparent)]
    Status(#[from] tonic::Status),
    /// the master closed the link before it answered registration
    #[error("the master closed the link before answering")]
    ClosedEarly,
    /// the master's first answer was not Registered
    #[error("the master answered registration with {0}")]
    Unexpected(String),
    /// the master answered nothing, not even a heartbeat, for this long
    #[error("the master sent nothing for {0:?}; taking the link for dead")]
    Silent(Duration),
    /// the link's outbound queue is gone (the session is over)
    #[error("the link's outbound queue is closed")]
    Closed,
    /// a TLS file (--tls-ca, --tls-cert, --tls-key) cannot be read
    #[error("cannot read {flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The link's TLS settings, read from the files at each connect (a renewed
/// certificate is used from the next link on); None without --tls-ca.
fn client_tls(
    config: &crate::config::AgentConfig,
) -> Result<Option<tonic::transport::ClientTlsConfig>, LinkError> {
    let Some(ca) = &config.tls_ca else {
        return Ok(None);
    };
    let read = |flag: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| LinkError::TlsFile {
            flag,
            path: path.to_owned(),
            source,
        })
    };
    let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(read("--tls-ca", ca)?),
    );
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read("--tls-cert", cert)?,
            read("--tls-key", key)?,
        ));
    }
    Ok(Some(tls))
}

/// The first wait before reconnecting; it doubles with each failed attempt
/// up to `MAX_BACKOFF`, and starts over once a link registered.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

pub async fn run(agent: Agent) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut admitted = false;
        match session(&agent, &mut admitted).await {
            Ok(()) => tracing::warn!("the master closed the link; reconnecting"),
            Err(LinkError::Status(status)) if status.code() == tonic::Code::PermissionDenied => {
                // Marked gone by the operator (as Mesos's shutdown of an agent).
                tracing::error!(
                    reason = status.message(),
                    "the master refuses this agent for good; killing its tasks and exiting"
                );
                agent.drain().await;
                if let Err(error) = agent.checkpoint().forget_agent_id() {
                    tracing::error!(%error, "cannot forget the agent id");
                }
                std::process::exit(0);
            }
            Err(error) => {
                tracing::warn!(%error, master = agent.config.master, "link to the master failed; retrying in {backoff:?}")
            }
        }
        agent.disconnected();
        if admitted {
            backoff = FIRST_BACKOFF;
        }
        // A random part of the backoff, as Mesos's agents: a restarted
        // master is not met by every agent at the same instant.
        tokio::time::sleep(backoff.mul_f64(fastrand::f64())).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How many heartbeat intervals without a word from the master before the
/// link is taken for dead (a master that hangs, or a partition that keeps
/// the TCP connection open) and a new one is opened.
const SILENT_INTERVALS: u32 = 3;

/// One link: connect, register, then carry messages until it fails;
/// `admitted` is set once the master took the registration.
async fn session(agent: &Agent, admitted: &mut bool) -> Result<(), LinkError> {
    // HTTP/2 pings find a dead peer or path even while no message flows.
    let config = &agent.config;
    let scheme = if config.tls_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", config.master))?;
    if let Some(tls) = client_tls(config)? {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect()
        .await?;
    let mut client = AgentLinkClient::new(channel);
    let (outbound, receiver) = Outbound::new(OUTBOUND_BOUND);
    if !agent.connect(outbound.clone()) {
        return Err(LinkError::Closed);
    }
    let mut inbound = client
        .session(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let first = inbound.message().await?.ok_or(LinkError::ClosedEarly)?;
    let Some(master_message::Kind::Registered(registered)) = first.kind else {
        return Err(LinkError::Unexpected(format!("{first:?}")));
    };
    tracing::info!(
        agent_id = registered.agent_id.value,
        "registered with the master"
    );
    agent.registered(registered.agent_id.value);
    *admitted = true;
    let interval = Duration::from_secs_f64(registered.heartbeat_interval_seconds.clamp(0.1, 60.0));
    let mut heartbeat = tokio::time::interval(interval);
    let silence = interval * SILENT_INTERVALS;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            message = inbound.message() => {
                match message? {
                    Some(message) => {
                        last_heard = tokio::time::Instant::now();
                        if let Some(kind) = message.kind {
                            agent.handle(kind);
                        }
                    }
                    None => return Ok(()),
                }
            }
            _ = tokio::time::sleep_until(last_heard + silence) => {
                return Err(LinkError::Silent(silence));
            }
            _ = heartbeat.tick() => {
                if !outbound.send(link::AgentMessage { kind: Some(agent_message::Kind::Heartbeat(link::Heartbeat {})) }) {
                    return Err(LinkError::Closed);
                }
                agent.flush_updates();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat() -> link::AgentMessage {
        link::AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(link::Heartbeat {})),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_a_closed_one_says_so() {
        let (outbound, mut receiver) = Outbound::new(2);
        assert!(outbound.send(heartbeat()) && outbound.send(heartbeat()));
        assert!(outbound.send(heartbeat()), "full is not closed");
        assert_eq!(outbound.dropped(), 1);
        assert!(receiver.try_recv().is_ok() && receiver.try_recv().is_ok());
        assert!(receiver.try_recv().is_err(), "the third was dropped");
        drop(receiver);
        assert!(!outbound.send(heartbeat()), "the link is gone");
    }
}
