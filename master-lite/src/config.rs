//! The master's flags; each also reads `BUTTE_<FLAG>` from the environment.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "butte-master",
    version,
    about = "Butte master: Mesos v1 scheduler and operator APIs with DRF offers"
)]
pub struct MasterConfig {
    /// Address to listen on.
    #[arg(long, env = "BUTTE_IP", default_value = "127.0.0.1")]
    pub ip: IpAddr,
    /// Port for HTTP (scheduler and operator APIs) and the agents' gRPC link.
    #[arg(long, env = "BUTTE_PORT", default_value_t = 5050)]
    pub port: u16,
    /// Directory for the registry (frameworks, agents, tasks survive restarts).
    #[arg(long, env = "BUTTE_WORK_DIR")]
    pub work_dir: PathBuf,
    /// Registry backend; only the embedded file is supported so far.
    #[arg(long, env = "BUTTE_REGISTRY")]
    pub registry: Option<String>,
    /// Serve the web UI (not built yet; accepted for forward compatibility).
    #[arg(long, env = "BUTTE_WEB_UI", default_value = "off")]
    pub web_ui: String,
    /// Log format: text or json.
    #[arg(long, env = "BUTTE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Seconds between HEARTBEAT events on scheduler streams (Mesos sends one every 15 s).
    #[arg(long, env = "BUTTE_HEARTBEAT_INTERVAL", default_value = "15", value_parser = parse_seconds)]
    pub heartbeat_interval: Duration,
    /// Seconds between allocation cycles.
    #[arg(long, env = "BUTTE_ALLOCATION_INTERVAL", default_value = "1", value_parser = parse_seconds)]
    pub allocation_interval: Duration,
    /// Seconds after which an unused offer is rescinded; 0 keeps offers until used (Mesos's default).
    #[arg(long, env = "BUTTE_OFFER_TIMEOUT", default_value = "0", value_parser = parse_seconds)]
    pub offer_timeout: Duration,
    /// Seconds without a word from an agent before the master drops its link
    /// (one missed ping, in Mesos's terms).
    #[arg(long, env = "BUTTE_AGENT_PING_TIMEOUT", default_value = "15", value_parser = parse_seconds)]
    pub agent_ping_timeout: Duration,
    /// Ping timeouts in a row after which a silent agent is unreachable: its
    /// tasks become TASK_UNREACHABLE (TASK_LOST for frameworks that are not
    /// partition-aware). As Mesos: 15 s x 5.
    #[arg(long, env = "BUTTE_MAX_AGENT_PING_TIMEOUTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_agent_ping_timeouts: u32,
    /// Seconds an agent known from the registry has, after a master restart,
    /// to re-register before it is unreachable (frameworks read back get at
    /// least as long to re-subscribe). Mesos's 10 minutes.
    #[arg(long, env = "BUTTE_AGENT_REREGISTER_TIMEOUT", default_value = "600", value_parser = parse_seconds)]
    pub agent_reregister_timeout: Duration,
    /// How long an unreachable agent is remembered (Mesos durations: `2weeks`,
    /// `36hrs`); past it the registry forgets it and its unreachable tasks.
    #[arg(long, env = "BUTTE_REGISTRY_MAX_AGENT_AGE", default_value = "2weeks", value_parser = butte_api::duration::parse_duration)]
    pub registry_max_agent_age: Duration,
    /// How many unreachable agents are remembered; past it the longest
    /// unreachable are forgotten first.
    #[arg(
        long,
        env = "BUTTE_REGISTRY_MAX_AGENT_COUNT",
        default_value_t = 102_400
    )]
    pub registry_max_agent_count: usize,
    /// Largest accepted request body, in bytes (larger ones get 413).
    #[arg(long, env = "BUTTE_MAX_REQUEST_BYTES", default_value_t = 8 << 20)]
    pub max_request_bytes: usize,
    /// Seconds before an unacknowledged status update is sent to its framework again (doubles up to 10 min).
    #[arg(long, env = "BUTTE_STATUS_UPDATE_RETRY", default_value = "10", value_parser = parse_seconds)]
    pub status_update_retry: Duration,
    /// Role weights, e.g. `web=2,batch=0.5`.
    #[arg(long, env = "BUTTE_WEIGHTS", default_value = "")]
    pub weights: String,
    /// Principals and secrets (Mesos's JSON `{"credentials": [{"principal":
    /// ..., "secret": ...}]}`, or "principal secret" lines); readable by
    /// the master's user only.
    #[arg(long, env = "BUTTE_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// The master's certificate (PEM, chain first); with --tls-key, its port
    /// speaks HTTPS only (and the agent link TLS). Reloaded on SIGHUP.
    #[arg(long, env = "BUTTE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The master's private key (PEM).
    #[arg(long, env = "BUTTE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// What plain HTTP on the TLS port gets: `refuse` (400) or `redirect`
    /// (308 to https).
    #[arg(
        long,
        env = "BUTTE_TLS_PLAIN_HTTP",
        value_enum,
        default_value = "refuse"
    )]
    pub tls_plain_http: butte_web::serve::PlainHttp,
    /// The CA (PEM) that agents' client certificates must chain to.
    #[arg(long, env = "BUTTE_AGENT_CA")]
    pub agent_ca: Option<PathBuf>,
    /// Agents must present a client certificate signed by --agent-ca (needs
    /// TLS); an agent id is bound to the identity (the certificate's DNS
    /// names) that first registered it.
    #[arg(long, env = "BUTTE_AUTHENTICATE_AGENTS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub authenticate_agents: bool,
    /// Mesos's ACL JSON: who may register in which roles, run tasks as which
    /// users, see which frameworks and tasks, tear down, mark agents gone,
    /// get guarded endpoints; `permissive` decides where no rule matches.
    #[arg(long, env = "BUTTE_ACLS")]
    pub acls: Option<PathBuf>,
    /// Frameworks must authenticate (HTTP Basic on /api/v1/scheduler); their
    /// principal is the framework's.
    #[arg(long, env = "BUTTE_AUTHENTICATE_FRAMEWORKS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub authenticate_frameworks: bool,
    /// Endpoints that change state (the operator API) need HTTP Basic credentials.
    #[arg(long, env = "BUTTE_AUTHENTICATE_HTTP_READWRITE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub authenticate_http_readwrite: bool,
    /// Endpoints that show state (/state, /frameworks, /metrics/snapshot,
    /// the telemetry endpoints...) need HTTP Basic credentials.
    #[arg(long, env = "BUTTE_AUTHENTICATE_HTTP_READONLY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub authenticate_http_readonly: bool,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("{text:?} is not a non-negative number of seconds"))
}

impl MasterConfig {
    /// Parses `--weights`.
    pub fn role_weights(&self) -> Result<Vec<(String, f64)>, String> {
        self.weights
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(|pair| {
                let (role, weight) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("weight {pair:?} is not ROLE=WEIGHT"))?;
                let weight: f64 = weight
                    .parse()
                    .ok()
                    .filter(|w: &f64| w.is_finite() && *w > 0.0)
                    .ok_or_else(|| {
                        format!("weight {weight:?} of role {role:?} must be a number > 0")
                    })?;
                Ok((role.to_owned(), weight))
            })
            .collect()
    }

    /// A configuration for tests and embedding: loopback, any free port.
    pub fn for_work_dir(work_dir: PathBuf) -> Self {
        Self {
            ip: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            work_dir,
            registry: None,
            web_ui: "off".into(),
            log_format: "text".into(),
            heartbeat_interval: Duration::from_secs(15),
            allocation_interval: Duration::from_secs(1),
            offer_timeout: Duration::ZERO,
            agent_ping_timeout: Duration::from_secs(15),
            max_agent_ping_timeouts: 5,
            agent_reregister_timeout: Duration::from_secs(600),
            registry_max_agent_age: Duration::from_secs(14 * 24 * 3600),
            registry_max_agent_count: 102_400,
            max_request_bytes: 8 << 20,
            status_update_retry: Duration::from_secs(10),
            weights: String::new(),
            credentials: None,
            tls_cert: None,
            tls_key: None,
            tls_plain_http: butte_web::serve::PlainHttp::Refuse,
            agent_ca: None,
            authenticate_agents: false,
            acls: None,
            authenticate_frameworks: false,
            authenticate_http_readwrite: false,
            authenticate_http_readonly: false,
        }
    }
}
