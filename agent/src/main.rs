use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use butte_api::daemon::{init_logging, shutdown_signal};
use clap::Parser;

use butte_agent::agent::{Agent, Confinement, ContainerRuntime};
use butte_agent::config::Recover;
use butte_agent::containers::Containers;
use butte_agent::launcher_client::LauncherClient;
use butte_agent::seccomp_profiles::SeccompProfiles;
use butte_agent::{AgentConfig, disk, gc, http, launcher, link, resources, telemetry};
use butte_agent_ebpf::accounting::Events;
use butte_agent_ebpf::pins::Pins;
use butte_isolators::fences::{Fence, Fences, Unenforced};
use butte_isolators::quota::ProjectQuotas;

fn main() -> anyhow::Result<()> {
    // The same binary, exec'd by the agent, runs its launcher.
    if let Some(code) = launcher::run_if_launcher() {
        std::process::exit(code);
    }
    let config = AgentConfig::parse();
    init_logging(&config.log_format)?;
    raise_open_files();
    if config.work_dir.starts_with("/tmp") {
        anyhow::bail!(
            "--work-dir {} is under /tmp, which each task gets privately; choose another directory",
            config.work_dir.display()
        );
    }
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create --work-dir {}", config.work_dir.display()))?;
    let mut total = resources::discover(config.resources.as_deref(), &config.work_dir)?;
    let gpus = gpus(&config.gpu_backend, &mut total)?;
    let isolator: Arc<dyn butte_isolators::cgroups::Isolator> = Arc::from(
        butte_isolators::cgroups::detect(&config.cgroup_root, &config.cgroup_subtree())
            .context("cannot set up task cgroups (is this run as root?)")?,
    );
    // What this kernel offers, said once (README's kernel matrix).
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    tracing::info!(
        kernel = kernel.trim(),
        cgroups = if config.cgroup_root.join("cgroup.controllers").exists() {
            "v2"
        } else {
            "v1 + v2 node"
        },
        cgroup_kill = butte_isolators::cgroups::has_cgroup_kill(),
        "kernel features"
    );
    let pins = match Pins::open(&config.cgroup_subtree().to_string_lossy()) {
        Ok(pins) => Some(pins),
        Err(error) => {
            tracing::error!(%error, "cannot pin the eBPF fences; they hold only while this agent runs");
            None
        }
    };
    let mut fences = attach_fences(&isolator.v2_subtree(), pins, &mut total);
    let events = fences.take_events();
    if !(0.1..=60.0).contains(&config.telemetry_interval) {
        anyhow::bail!(
            "--telemetry-interval {} is out of range; give 0.1 to 60 seconds",
            config.telemetry_interval
        );
    }
    if !(0.0..=1.0).contains(&config.gc_disk_headroom) {
        anyhow::bail!(
            "--gc-disk-headroom {} is out of range; give a fraction from 0 to 1 (e.g. 0.1)",
            config.gc_disk_headroom
        );
    }
    let seccomp_profiles = SeccompProfiles::load(
        config.seccomp_config_dir.as_deref(),
        config.seccomp_profile_name.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let quotas = project_quotas(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let launcher = LauncherClient::start().context("cannot start the launcher process")?;
        let (containers, mut exits) = Containers::new();
        let agent = Agent::new(
            config,
            total.clone(),
            isolator.clone(),
            ContainerRuntime {
                launcher,
                containers,
            },
            fences,
            gpus,
            Confinement {
                seccomp_profiles,
                quotas,
            },
        );
        let exits_agent = agent.clone();
        tokio::spawn(async move {
            while let Some((container_id, exit)) = exits.recv().await {
                let agent = exits_agent.clone();
                // Cleanup touches cgroupfs and may wait for processes: off the runtime threads.
                tokio::task::spawn_blocking(move || agent.container_exited(&container_id, exit));
            }
        });
        if agent.config.recover == Recover::Cleanup {
            let recovery = agent.recover();
            tracing::info!(?recovery, "--recover cleanup: killing every task a previous run left, then exiting");
            agent.drain().await;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let recovery = agent.recover();
        // Every recovered container is fenced in this agent's maps: the
        // pinned links may run this agent's programs now.
        agent.fences().commit();
        tracing::info!(
            running = recovery.running,
            ended_meanwhile = recovery.ended,
            unacknowledged = recovery.unacknowledged,
            millis = started.elapsed().as_millis() as u64,
            "recovered the tasks of the previous run"
        );
        tracing::info!(resources = %total, "butte agent starting");
        tokio::spawn(link::run(agent.clone()));
        let every = agent.config.disk_watch_interval.clamp(0.1, 3600.0);
        disk::spawn(agent.clone(), Duration::from_secs_f64(every));
        let policy = gc::Policy {
            delay: agent.config.gc_delay,
            headroom: agent.config.gc_disk_headroom,
        };
        gc::spawn(agent.clone(), policy, Duration::from_secs_f64(every));
        if let Some(events) = events {
            tokio::spawn(read_events(agent.clone(), events));
        }
        telemetry::spawn(
            agent.clone(),
            Duration::from_secs_f64(agent.config.telemetry_interval),
        )
        .context("cannot start the telemetry thread")?;
        let address = std::net::SocketAddr::new(agent.config.ip, agent.config.port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} (--ip, --port)"))?;
        let config = &agent.config;
        let authenticator = butte_web::auth::Authenticator::from_flags(
            config.credentials.as_deref(),
            &[(
                butte_web::auth::Realm::ReadOnly,
                config.authenticate_http_readonly,
                "--authenticate-http-readonly",
            )],
        )?
        .map(std::sync::Arc::new);
        let tls = butte_web::tls::Tls::from_flags(
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
            None,
        )?;
        if let Some(tls) = tls.clone() {
            tokio::spawn(butte_web::tls::reload_on_hangup(Some(tls)));
        }
        let router = http::router(agent.clone(), authenticator);
        // Serves until the process ends: the sender is never used.
        let (_serving, until) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(butte_web::serve::serve(
            listener,
            router,
            tls,
            butte_web::serve::PlainHttp::Refuse,
            until,
        ));
        match stop_signal().await {
            Stop::Leave => tracing::info!(
                "stopping; tasks keep running, fenced, and the next agent on this work dir takes them back"
            ),
            Stop::Drain => {
                tracing::info!("SIGUSR1: killing every task and removing what the agent made");
                agent.drain().await;
            }
        }
        anyhow::Ok(())
    })
}

/// How the agent was asked to stop.
enum Stop {
    /// SIGTERM or SIGINT: its tasks keep running for the next agent.
    Leave,
    /// SIGUSR1 (as Mesos): the node is given up, every task killed.
    Drain,
}

async fn stop_signal() -> Stop {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::user_defined1()) {
        Ok(mut drain) => tokio::select! {
            _ = shutdown_signal() => Stop::Leave,
            _ = drain.recv() => Stop::Drain,
        },
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGUSR1; the agent cannot be drained");
            shutdown_signal().await;
            Stop::Leave
        }
    }
}

/// Two pidfds per container (its first process and its supervisor) outgrow
/// the usual soft limit of 1,024 open files at a few hundred tasks: the
/// soft limit goes up to the hard one.
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit read and write one struct rlimit.
    #[allow(unsafe_code)]
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
            }
        }
        if limit.rlim_cur < 4 * 4096 {
            tracing::warn!(
                limit = limit.rlim_cur,
                "the open-file limit is low for 4,096 tasks (two pidfds each); raise LimitNOFILE"
            );
        }
    }
}

/// Hard disk limits where the work dir's filesystem enforces project
/// quotas; else sandboxes are measured (disk/du), and the log says why.
fn project_quotas(config: &AgentConfig) -> Option<ProjectQuotas> {
    if !config.enforce_container_disk_quota {
        return None;
    }
    match ProjectQuotas::probe(&config.work_dir, config.disk_project_range.clone()) {
        Ok(quotas) => {
            tracing::info!(work_dir = %config.work_dir.display(), "disk: hard limits with project quotas");
            Some(quotas)
        }
        Err(reason) => {
            tracing::info!(%reason, "disk: no project quotas here; sandboxes are measured every --disk-watch-interval (disk/du)");
            None
        }
    }
}

/// Attaches the eBPF fences at the agent's subtree. Every resource offered
/// is enforced: what a fence would hold is not offered without it.
fn attach_fences(
    subtree: &std::path::Path,
    pins: Option<Pins>,
    total: &mut butte_api::resources::Resources,
) -> Fences {
    let (fences, unenforced) = Fences::attach(subtree, pins);
    for Unenforced { fence, error } in unenforced {
        match fence {
            Fence::Ports => {
                tracing::error!(%error, "ports cannot be enforced on this host; they are not offered");
                total.remove("ports");
            }
            Fence::Network => {
                tracing::error!(%error, "network bandwidth cannot be enforced on this host; it is not offered");
                total.remove("network_bandwidth");
            }
            Fence::Devices => {
                tracing::error!(%error, "device access cannot be fenced on this host; tasks see the host's devices")
            }
            Fence::Accounting => {
                tracing::error!(%error, "per-task CPU, run-queue and event accounting is off")
            }
            Fence::Books => tracing::warn!(
                %error,
                "the kernel's per-cgroup books cannot be read in one pass here: CPU comes from the scheduler's tracepoint and a walk of every thread, memory from each task's cgroup files, and pressure (PSI) is not reported"
            ),
        }
    }
    if let Some(books) = fences.books() {
        match (books.flushes(), books.flush_missing()) {
            (Some(kfunc), _) => tracing::info!(
                kfunc,
                "telemetry: CPU, memory and pressure from the kernel's per-cgroup books, one iterator pass per sample"
            ),
            (None, reason) => tracing::warn!(
                reason = reason.unwrap_or_default(),
                "telemetry: no rstat flush here, so CPU comes from the scheduler's tracepoint and a walk of every thread; memory and pressure from the kernel's books"
            ),
        }
    }
    fences
}

/// Hands ring-buffer events to the agent as they arrive.
async fn read_events(agent: Agent, events: Events) {
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;
    // SAFETY: `Events` owns the ring buffer's map fd; it stays open, and
    // as_raw_fd returns that same fd, for as long as the AsyncFd owns it.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) };
    let mut events = match registered {
        Ok(fd) => fd,
        Err(error) => {
            tracing::error!(%error, "cannot watch the event ring buffer; OOM kills are found at exit");
            return;
        }
    };
    loop {
        let Ok(mut ready) = events.readable_mut().await else {
            return;
        };
        let drained = ready.get_inner_mut().drain();
        ready.clear_ready();
        if !drained.is_empty() {
            agent.handle_events(drained);
        }
    }
}

/// Opens the GPU backend and offers what it found in place of any `gpus` or
/// `mig-*` given in `--resources` (only GPUs the agent can fence are offered).
fn gpus(
    spec: &str,
    total: &mut butte_api::resources::Resources,
) -> anyhow::Result<Option<butte_agent::gpus::Gpus>> {
    let asked = total.remove_gpus();
    let Some(backend) = butte_gpu::open(spec).context("cannot open the GPU backend")? else {
        if !asked.is_empty() {
            tracing::error!(
                resources = ?asked,
                "--resources names GPUs but --gpu-backend found none; they are not offered"
            );
        }
        return Ok(None);
    };
    let backend: Arc<dyn butte_gpu::GpuBackend> = Arc::from(backend);
    let inventory = backend
        .inventory()
        .with_context(|| format!("cannot read the GPUs from --gpu-backend {spec}"))?;
    let books = butte_agent::gpus::GpuBooks::new(inventory);
    let offered = books.resources()?;
    tracing::info!(backend = backend.name(), gpus = %offered, "GPUs found");
    total.add(&offered);
    Ok(Some(butte_agent::gpus::Gpus { backend, books }))
}
