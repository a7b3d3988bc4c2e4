//! Butte's master: frameworks subscribe over the Mesos v1 scheduler API and
//! get resource offers chosen by DRF; agents register over a gRPC link; the
//! registry keeps what a restart must not lose.

pub mod acls;
pub mod agent_link;
pub mod allocator;
pub mod config;
pub mod http;
pub mod master;
pub mod metrics;
pub mod operator_api;
pub mod registry;
pub mod scheduler_api;
pub mod telemetry;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use butte_api::agent_link::v1::agent_link_server::AgentLinkServer;
use butte_web::auth::{self, Authenticator, Realm};
use butte_web::{serve, tls};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::MasterConfig;
use master::{Master, Shared};

/// A master serving on its port, until `shutdown`.
pub struct RunningMaster {
    pub addr: SocketAddr,
    pub shared: Shared,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    ticker: JoinHandle<()>,
    /// Reloads the certificate on SIGHUP.
    hangups: JoinHandle<()>,
    tls: Option<Arc<tls::Tls>>,
}

impl RunningMaster {
    /// Reads the TLS certificate and key again (SIGHUP): new connections
    /// get them; open ones, event streams included, go on.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Stops serving: ends every event stream and agent link, then waits up
    /// to 2 s for connections to drain before closing the rest.
    pub async fn shutdown(mut self) {
        self.ticker.abort();
        self.hangups.abort();
        self.shared.lock().close_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
    }
}

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// a registry backend other than the embedded one was asked for
    #[error(
        "--registry {0:?} is not supported yet; leave it out to use the embedded registry under --work-dir"
    )]
    Registry(String),
    /// the port is taken or the address is not ours
    #[error("cannot listen on {address}: {source}; is another master running there?")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// the embedded registry could not be opened
    #[error(transparent)]
    Open(#[from] registry::RegistryError),
    /// authentication is asked for and the credentials cannot be used
    #[error(transparent)]
    Credentials(#[from] auth::CredentialsError),
    /// the ACL file cannot be used
    #[error(transparent)]
    Acls(#[from] acls::AclError),
    /// the certificates cannot be used
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// agents are to authenticate without what they need for it
    #[error(
        "--authenticate-agents needs --agent-ca (the CA agents' certificates chain to) and --tls-cert with --tls-key"
    )]
    AgentsUnauthenticatable,
}

/// Binds, opens the registry and starts serving.
pub async fn start(config: MasterConfig) -> Result<RunningMaster, StartError> {
    if let Some(registry) = &config.registry {
        return Err(StartError::Registry(registry.clone()));
    }
    let authenticator = Authenticator::from_flags(
        config.credentials.as_deref(),
        &[
            (
                Realm::Scheduler,
                config.authenticate_frameworks,
                "--authenticate-frameworks",
            ),
            (
                Realm::ReadWrite,
                config.authenticate_http_readwrite,
                "--authenticate-http-readwrite",
            ),
            (
                Realm::ReadOnly,
                config.authenticate_http_readonly,
                "--authenticate-http-readonly",
            ),
        ],
    )?
    .map(Arc::new);
    let tls = tls::Tls::from_flags(
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        config.agent_ca.as_deref(),
    )?;
    if config.authenticate_agents && (tls.is_none() || config.agent_ca.is_none()) {
        return Err(StartError::AgentsUnauthenticatable);
    }
    let plain_http = config.tls_plain_http;
    let acls = match &config.acls {
        Some(path) => acls::Acls::load(path)?,
        None => acls::Acls::default(),
    };
    let address = SocketAddr::new(config.ip, config.port);
    let listen_failed = |source| StartError::Listen { address, source };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(listen_failed)?;
    let addr = listener.local_addr().map_err(listen_failed)?;
    let mut master = Master::open(config, addr)?;
    master.acls = acls;
    let shared = Shared::new(master);

    let ticker = tokio::spawn(allocation_loop(shared.clone()));
    let grpc = tonic::service::Routes::new(AgentLinkServer::new(
        agent_link::AgentLinkService::new(shared.clone()),
    ))
    .into_axum_router();
    let dispatch_state = shared.clone();
    let app = grpc.fallback(
        move |ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request<Body>| {
            dispatch(dispatch_state.clone(), authenticator.clone(), peer, request)
        },
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve(
        listener,
        app,
        tls.clone(),
        plain_http,
        stopped,
    ));
    let hangups = tokio::spawn(tls::reload_on_hangup(tls.clone()));
    tracing::info!(%addr, tls = tls.is_some(), "butte master serving");
    Ok(RunningMaster {
        addr,
        shared,
        stop: Some(stop),
        server,
        ticker,
        hangups,
        tls,
    })
}

/// Runs timers and allocation: every allocation interval, and at once when
/// something made resources or demand appear.
async fn allocation_loop(shared: Shared) {
    let interval = shared
        .lock()
        .config
        .allocation_interval
        .max(std::time::Duration::from_millis(10));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.allocation_wanted.notified() => {}
        }
        let mut master = shared.lock();
        master.tick();
        master.allocate();
    }
}

/// Which authentication realm guards a route (None: open to all, as in Mesos).
fn realm(route: &str) -> Option<Realm> {
    match route {
        "/health" | "/version" | "/redirect" => None,
        "/api/v1/scheduler" => Some(Realm::Scheduler),
        "/api/v1" => Some(Realm::ReadWrite),
        _ => Some(Realm::ReadOnly),
    }
}

async fn dispatch(
    shared: Shared,
    authenticator: Option<Arc<Authenticator>>,
    peer: SocketAddr,
    request: Request<Body>,
) -> Response {
    let path = request.uri().path().to_owned();
    let route = http::route(&path);
    let principal = match (&authenticator, route.and_then(realm)) {
        (Some(authenticator), Some(realm)) => {
            match authenticator.authenticate(realm, request.headers(), peer.ip()) {
                Ok(principal) => principal,
                Err(refused) => return *refused,
            }
        }
        _ => None,
    };
    match route {
        Some("/api/v1/scheduler") => scheduler_api::handle(shared, principal, request)
            .await
            .into_response(),
        Some("/api/v1") => operator_api::handle_api(shared, principal, request)
            .await
            .into_response(),
        Some("/version") => http::json_response(&serde_json::json!({
            "version": butte_api::MESOS_VERSION,
            "build_user": "butte",
            "butte_version": env!("CARGO_PKG_VERSION"),
        })),
        Some("/health") => StatusCode::OK.into_response(),
        Some("/api/v1/telemetry") => operator_api::telemetry_stream(&shared.lock()),
        Some("/telemetry") => {
            operator_api::telemetry_history(&shared.lock(), request.uri().query())
        }
        Some("/redirect") => {
            // A single master is always the leader: point at ourselves.
            let location = {
                let master = shared.lock();
                let address = master.info.address.clone().unwrap_or_default();
                format!("//{}:{}", address.ip.unwrap_or_default(), address.port)
            };
            let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
        Some(route) => views::view(&shared.lock(), route, principal.as_deref()),
        None => http::HttpError::new(StatusCode::NOT_FOUND, format!("no endpoint at {path}"))
            .into_response(),
    }
}
