//! The agent's side of the launcher socket: launch requests answered in
//! order. When the launcher process ends (killed, or crashed), launches in
//! flight fail, and another launcher is started; running containers do not
//! notice, their supervisors being no children of the launcher's fate.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::launcher::{self, LaunchRequest, Reply, Request, Started};

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// the launcher process is gone; the request never reached it
    #[error("the launcher process is gone: {0}")]
    NotSent(String),
    /// the launcher process ended after it took the request (whether the
    /// container started is for its record to say)
    #[error("the launcher process ended during the launch")]
    Gone,
    /// the launcher refused or failed the launch
    #[error("{0}")]
    Failed(String),
}

/// How a container's first process ended, as its supervisor recorded it;
/// neither set: not known (it ended while nothing watched it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Clone)]
pub struct LauncherClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// None while a launcher is being started again.
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    /// Launch replies come back in request order.
    waiting: Mutex<VecDeque<oneshot::Sender<Reply>>>,
}

impl Inner {
    fn waiting(&self) -> MutexGuard<'_, VecDeque<oneshot::Sender<Reply>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Connection = (OwnedReadHalf, OwnedWriteHalf, std::process::Child);

fn connect() -> std::io::Result<Connection> {
    let (socket, child) = launcher::start()?;
    socket.set_nonblocking(true)?;
    let (reader, writer) = tokio::net::UnixStream::from_std(socket)?.into_split();
    Ok((reader, writer, child))
}

impl LauncherClient {
    /// Starts the launcher process (call inside the runtime).
    pub fn start() -> std::io::Result<Self> {
        let (reader, writer, child) = connect()?;
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(Some(writer)),
            waiting: Mutex::default(),
        });
        tokio::spawn(serve(inner.clone(), reader, child));
        Ok(Self { inner })
    }

    /// Launches a container; what it started and its clone-to-exec microseconds.
    pub async fn launch(&self, request: LaunchRequest) -> Result<(Started, u64), LauncherError> {
        let (tx, rx) = oneshot::channel();
        let body = serde_json::to_vec(&Request::Launch(Box::new(request)))
            .map_err(|e| LauncherError::NotSent(e.to_string()))?;
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        {
            // Queue and send under the writer lock so replies keep request order.
            let mut writer = self.inner.writer.lock().await;
            let Some(socket) = writer.as_mut() else {
                return Err(LauncherError::NotSent("it is being started again".into()));
            };
            self.inner.waiting().push_back(tx);
            socket
                .write_all(&framed)
                .await
                .map_err(|e| LauncherError::NotSent(e.to_string()))?;
        }
        match rx.await.map_err(|_| LauncherError::Gone)? {
            Reply::Launched {
                started, micros, ..
            } => Ok((started, micros)),
            Reply::LaunchFailed { error, .. } => Err(LauncherError::Failed(error)),
        }
    }
}

/// Hands replies to their launches; when the launcher ends, fails the
/// launches in flight and starts another.
async fn serve(inner: Arc<Inner>, mut reader: OwnedReadHalf, mut child: std::process::Child) {
    loop {
        while let Some(reply) = read_reply(&mut reader).await {
            let next = inner.waiting().pop_front();
            if let Some(next) = next {
                let _ = next.send(reply);
            }
        }
        {
            let mut writer = inner.writer.lock().await;
            *writer = None;
            // Dropped senders fail their launches.
            inner.waiting().clear();
        }
        let status = tokio::task::spawn_blocking(move || child.wait()).await;
        tracing::error!(
            ?status,
            "the launcher process ended; starting another (running containers are not affected)"
        );
        loop {
            match connect() {
                Ok((new_reader, writer, new_child)) => {
                    reader = new_reader;
                    child = new_child;
                    *inner.writer.lock().await = Some(writer);
                    tracing::info!("a new launcher process is running");
                    break;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot start a launcher process; trying again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

async fn read_reply(reader: &mut OwnedReadHalf) -> Option<Reply> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await.ok()?;
    let len = u32::from_le_bytes(len) as usize;
    if len > launcher::MAX_MESSAGE {
        tracing::error!(
            len,
            "a launcher reply over the limit; the launcher is taken for broken"
        );
        return None;
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.ok()?;
    serde_json::from_slice(&body).ok()
}
