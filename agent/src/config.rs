//! The agent's flags; each also reads `BUTTE_<FLAG>` from the environment.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

/// Docker's default capabilities, the default for both capability flags.
const DOCKER_CAPABILITIES: &str = "CHOWN,DAC_OVERRIDE,FOWNER,FSETID,KILL,SETGID,SETUID,SETPCAP,NET_BIND_SERVICE,NET_RAW,SYS_CHROOT,MKNOD,AUDIT_WRITE,SETFCAP";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "butte-agent",
    version,
    about = "Butte agent: runs tasks in isolated containers"
)]
pub struct AgentConfig {
    /// The master, HOST:PORT.
    #[arg(long, env = "BUTTE_MASTER", default_value = "127.0.0.1:5050")]
    pub master: String,
    /// Address this agent is reached at (and listens on).
    #[arg(long, env = "BUTTE_IP", default_value = "127.0.0.1")]
    pub ip: IpAddr,
    #[arg(long, env = "BUTTE_PORT", default_value_t = 5051)]
    pub port: u16,
    /// Hostname reported to the master (defaults to --ip).
    #[arg(long, env = "BUTTE_HOSTNAME")]
    pub hostname: Option<String>,
    /// Sandboxes and checkpoints go here; not under /tmp (tasks get a private /tmp).
    #[arg(long, env = "BUTTE_WORK_DIR", default_value = "/var/lib/butte/agent")]
    pub work_dir: PathBuf,
    /// Resources to offer, e.g. 'cpus:4;mem:8192;ports:[31000-32000]'; discovered when absent.
    #[arg(long, env = "BUTTE_RESOURCES")]
    pub resources: Option<String>,
    /// GPU backend: `nvml` (no NVIDIA driver means no GPUs), `sim:FILE`
    /// (GPUs described in a JSON file, see gpu/README.md) or `none`.
    #[arg(long, env = "BUTTE_GPU_BACKEND", default_value = "nvml")]
    pub gpu_backend: String,
    /// The cgroup filesystem root.
    #[arg(long, env = "BUTTE_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Prefix of this agent's container ids (cgroup names); leftovers with it
    /// are removed at start. Defaults to `a<port>-`, so agents on one host
    /// never touch each other's containers.
    #[arg(long, env = "BUTTE_CONTAINER_PREFIX")]
    pub container_prefix: Option<String>,
    /// This agent's cgroup subtree in every hierarchy (eBPF programs attach
    /// at its v2 directory). Defaults to `butte/agent-<port>`.
    #[arg(long, env = "BUTTE_CGROUP_SUBTREE")]
    pub cgroup_subtree: Option<PathBuf>,
    /// Run each task as its CommandInfo.user, else its framework's user (as
    /// Mesos's --switch_user); false runs every task as the agent's user.
    #[arg(long, env = "BUTTE_SWITCH_USER", default_value_t = true, action = clap::ArgAction::Set)]
    pub switch_user: bool,
    /// The most capabilities any task may hold (Mesos's --bounding_capabilities).
    #[arg(long, env = "BUTTE_BOUNDING_CAPABILITIES", value_parser = crate::users::parse_capabilities, default_value = DOCKER_CAPABILITIES)]
    pub bounding_capabilities: butte_isolators::container::Capabilities,
    /// What a root task holds when it asks for none (Mesos's --effective_capabilities).
    #[arg(long, env = "BUTTE_EFFECTIVE_CAPABILITIES", value_parser = crate::users::parse_capabilities, default_value = DOCKER_CAPABILITIES)]
    pub effective_capabilities: butte_isolators::container::Capabilities,
    /// Let a task ask to run without the seccomp filter (LinuxInfo.seccomp.unconfined).
    #[arg(long, env = "BUTTE_ALLOW_UNCONFINED_SECCOMP", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_unconfined_seccomp: bool,
    /// Seccomp profiles (Docker's JSON format) tasks may name in
    /// LinuxInfo.seccomp.profile_name (Mesos's --seccomp_config_dir).
    #[arg(long, env = "BUTTE_SECCOMP_CONFIG_DIR")]
    pub seccomp_config_dir: Option<PathBuf>,
    /// The profile, in --seccomp-config-dir, for tasks that name none, in
    /// place of the built-in filter (Mesos's --seccomp_profile_name).
    #[arg(long, env = "BUTTE_SECCOMP_PROFILE_NAME")]
    pub seccomp_profile_name: Option<String>,
    /// Hold each task's sandbox to its `disk`: measured every
    /// --disk-watch-interval, a task over it fails (Mesos's disk/du).
    #[arg(long, env = "BUTTE_ENFORCE_CONTAINER_DISK_QUOTA", default_value_t = true, action = clap::ArgAction::Set)]
    pub enforce_container_disk_quota: bool,
    /// Project ids the agent may give sandboxes for hard disk limits, where
    /// the work dir's filesystem enforces project quotas (Mesos's
    /// --xfs_project_range); elsewhere sandboxes are measured (disk/du).
    #[arg(long, env = "BUTTE_DISK_PROJECT_RANGE", default_value = "5000-10000", value_parser = parse_project_range)]
    pub disk_project_range: std::ops::RangeInclusive<u32>,
    /// Seconds between measurements of the sandboxes (0.1 to 3600).
    #[arg(long, env = "BUTTE_DISK_WATCH_INTERVAL", default_value_t = 15.0)]
    pub disk_watch_interval: f64,
    /// How long an ended task's sandbox is kept, at most (Mesos's
    /// --gc_delay): seconds or a duration such as `1weeks`, `2days`, `3hrs`.
    #[arg(long, env = "BUTTE_GC_DELAY", default_value = "1weeks", value_parser = butte_api::duration::parse_duration)]
    pub gc_delay: std::time::Duration,
    /// The fraction of the work dir's disk to keep free: sandboxes are kept
    /// `gc_delay × (1 − headroom − used)`, so a filling disk collects them
    /// sooner (Mesos's --gc_disk_headroom; 0 to 1).
    #[arg(long, env = "BUTTE_GC_DISK_HEADROOM", default_value_t = 0.1)]
    pub gc_disk_headroom: f64,
    /// Processes and threads a task may have at once.
    #[arg(long, env = "BUTTE_TASK_PIDS_MAX", default_value_t = 4096)]
    pub task_pids_max: u64,
    /// Seconds between resends of an unacknowledged status update.
    #[arg(long, env = "BUTTE_STATUS_UPDATE_RETRY", default_value_t = 10.0)]
    pub status_update_retry: f64,
    /// Seconds between telemetry samples (0.1 to 60).
    #[arg(long, env = "BUTTE_TELEMETRY_INTERVAL", default_value_t = 1.0)]
    pub telemetry_interval: f64,
    /// Log format: text or json.
    #[arg(long, env = "BUTTE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// What a starting agent does with the tasks a previous run left
    /// (Mesos's --recover): `reconnect` takes them back (their containers
    /// kept running and fenced while no agent ran); `cleanup` kills them,
    /// forgets them and exits (before an incompatible upgrade).
    #[arg(long, env = "BUTTE_RECOVER", value_enum, default_value_t = Recover::Reconnect)]
    pub recover: Recover,
    /// Which tasks get a run-queue latency histogram: `labelled` (those
    /// with the label `butte.telemetry.runqueue_histogram=true`), `all`, or
    /// `off`. It costs an eBPF program run on every context switch of the
    /// machine, attached only while some task has one.
    #[arg(long, env = "BUTTE_RUNQUEUE_HISTOGRAM", value_enum, default_value_t = RunqueueHistogram::Labelled)]
    pub runqueue_histogram: RunqueueHistogram,
    /// Principals and secrets (Mesos's credentials JSON or "principal
    /// secret" lines), for --authenticate-http-readonly.
    #[arg(long, env = "BUTTE_CREDENTIALS")]
    pub credentials: Option<PathBuf>,
    /// This agent's read endpoints (/metrics, /api/v1: GET_CONTAINERS...)
    /// need HTTP Basic credentials; /health stays open.
    #[arg(long, env = "BUTTE_AUTHENTICATE_HTTP_READONLY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub authenticate_http_readonly: bool,
    /// The CA (PEM) that signed the master's certificate: the link to the
    /// master goes over TLS and checks the master against it.
    #[arg(long, env = "BUTTE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This agent's certificate (PEM): presented to the master as its
    /// identity (signed by the master's --agent-ca), read at each connect;
    /// and its own HTTP port's, which then speaks HTTPS only (reloaded on
    /// SIGHUP).
    #[arg(
        long,
        env = "BUTTE_TLS_CERT",
        requires = "tls_key",
        requires = "tls_ca"
    )]
    pub tls_cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, env = "BUTTE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// `--runqueue-histogram`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunqueueHistogram {
    All,
    Labelled,
    Off,
}

/// `--recover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Recover {
    Reconnect,
    Cleanup,
}

impl AgentConfig {
    pub fn container_prefix(&self) -> String {
        self.container_prefix
            .clone()
            .unwrap_or_else(|| format!("a{}-", self.port))
    }

    pub fn cgroup_subtree(&self) -> PathBuf {
        self.cgroup_subtree
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("butte/agent-{}", self.port)))
    }

    pub fn hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| self.ip.to_string())
    }
}

/// `FIRST-LAST`, project ids above 0 (0 is every file's default project).
fn parse_project_range(text: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (first, last) = text
        .trim_matches(['[', ']'])
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not FIRST-LAST (e.g. 5000-10000)"))?;
    let number = |n: &str| {
        n.trim()
            .parse::<u32>()
            .map_err(|_| format!("{n:?} in {text:?} is not a project id (1 to 4294967295)"))
    };
    let (first, last) = (number(first)?, number(last)?);
    if first == 0 || first > last {
        return Err(format!(
            "{text:?}: give FIRST-LAST with 0 < FIRST <= LAST (e.g. 5000-10000)"
        ));
    }
    Ok(first..=last)
}
