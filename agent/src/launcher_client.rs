//! The agent's side of the launcher socket: launch requests answered in
//! order, and a stream of container exits.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use crate::launcher::{LaunchRequest, Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// the launcher process is gone
    #[error("the launcher process is gone: {0}")]
    Gone(String),
    /// the launcher refused or failed the launch
    #[error("{0}")]
    Failed(String),
}

/// How a container's first process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Clone)]
pub struct LauncherClient {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// Launch replies come back in request order.
    waiting: Arc<Mutex<VecDeque<oneshot::Sender<Reply>>>>,
}

impl LauncherClient {
    /// Wraps the agent's end of the socket; exits arrive on the returned channel.
    pub fn new(
        socket: std::os::unix::net::UnixStream,
    ) -> std::io::Result<(Self, mpsc::UnboundedReceiver<(String, ContainerExit)>)> {
        socket.set_nonblocking(true)?;
        let (mut reader, writer) = tokio::net::UnixStream::from_std(socket)?.into_split();
        let waiting: Arc<Mutex<VecDeque<oneshot::Sender<Reply>>>> = Arc::default();
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let queue = waiting.clone();
        tokio::spawn(async move {
            loop {
                let mut len = [0u8; 4];
                if reader.read_exact(&mut len).await.is_err() {
                    break;
                }
                let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
                if reader.read_exact(&mut body).await.is_err() {
                    break;
                }
                let Ok(reply) = serde_json::from_slice::<Reply>(&body) else {
                    break;
                };
                match reply {
                    Reply::Exited {
                        container_id,
                        code,
                        signal,
                    } => {
                        let _ = exits_tx.send((container_id, ContainerExit { code, signal }));
                    }
                    other => {
                        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                        if let Some(next) = next {
                            let _ = next.send(other);
                        }
                    }
                }
            }
            tracing::error!("the launcher closed its socket; no container can be launched");
        });
        Ok((
            Self {
                writer: Arc::new(tokio::sync::Mutex::new(writer)),
                waiting,
            },
            exits,
        ))
    }

    async fn send(&self, request: &Request) -> Result<(), LauncherError> {
        let body = serde_json::to_vec(request).map_err(|e| LauncherError::Gone(e.to_string()))?;
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        self.writer
            .lock()
            .await
            .write_all(&framed)
            .await
            .map_err(|e| LauncherError::Gone(e.to_string()))
    }

    /// Launches a container; returns (pid, clone-to-exec microseconds).
    pub async fn launch(&self, request: LaunchRequest) -> Result<(i32, u64), LauncherError> {
        let (tx, rx) = oneshot::channel();
        // Queue and send under the writer lock so replies keep request order.
        let mut writer = self.writer.lock().await;
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(tx);
        let body = serde_json::to_vec(&Request::Launch(Box::new(request)))
            .map_err(|e| LauncherError::Gone(e.to_string()))?;
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        writer
            .write_all(&framed)
            .await
            .map_err(|e| LauncherError::Gone(e.to_string()))?;
        drop(writer);
        match rx
            .await
            .map_err(|_| LauncherError::Gone("no reply".into()))?
        {
            Reply::Launched { pid, micros, .. } => Ok((pid, micros)),
            Reply::LaunchFailed { error, .. } => Err(LauncherError::Failed(error)),
            Reply::Exited { .. } => Err(LauncherError::Gone("unexpected reply".into())),
        }
    }

    pub async fn signal(&self, container_id: &str, signal: i32) -> Result<(), LauncherError> {
        self.send(&Request::Signal {
            container_id: container_id.to_owned(),
            signal,
        })
        .await
    }
}
