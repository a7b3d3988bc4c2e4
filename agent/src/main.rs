use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use butte_agent::agent::Agent;
use butte_agent::launcher_client::LauncherClient;
use butte_agent::{AgentConfig, launcher, link, resources};

fn main() -> anyhow::Result<()> {
    let config = AgentConfig::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match config.log_format.as_str() {
        "json" => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        "text" => tracing_subscriber::fmt().with_env_filter(filter).init(),
        other => anyhow::bail!("--log-format {other:?} is not known; use text or json"),
    }
    if config.gpu_backend != "none" {
        anyhow::bail!(
            "--gpu-backend {:?} is not supported yet; use none",
            config.gpu_backend
        );
    }
    if config.work_dir.starts_with("/tmp") {
        anyhow::bail!(
            "--work-dir {} is under /tmp, which each task gets privately; choose another directory",
            config.work_dir.display()
        );
    }
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create --work-dir {}", config.work_dir.display()))?;
    let mut total = resources::discover(config.resources.as_deref(), &config.work_dir)?;
    let isolator: Arc<dyn butte_isolators::cgroups::Isolator> = Arc::from(
        butte_isolators::cgroups::detect(&config.cgroup_root, &config.cgroup_subtree())
            .context("cannot set up task cgroups (is this run as root?)")?,
    );
    // Every resource offered is enforced: without the port fence, no ports are offered.
    let ports = match butte_agent_ebpf::ports::PortFence::attach(&isolator.v2_subtree()) {
        Ok(fence) => Some(fence),
        Err(error) => {
            tracing::error!(%error, "ports cannot be enforced on this host; they are not offered");
            if let Some(ports) = total.ranges("ports").cloned() {
                let mut without = butte_api::resources::Resources::new();
                for &(begin, end) in ports.ranges() {
                    without.add_range("ports", begin, end)?;
                }
                total.subtract_contained(&without);
            }
            None
        }
    };
    let devices = butte_agent_ebpf::devices::DeviceFence::attach(&isolator.v2_subtree())
        .inspect_err(|error| tracing::error!(%error, "device access cannot be fenced on this host; tasks see the host's devices"))
        .ok();
    let fences = butte_agent::agent::Fences { ports, devices };
    // The launcher forks before any thread exists: nothing forks from the runtime.
    let socket = launcher::fork_launcher().context("cannot start the launcher process")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (launcher, mut exits) = LauncherClient::new(socket)?;
        let agent = Agent::new(config, total.clone(), isolator.clone(), launcher, fences);
        agent.remove_leftovers();
        tracing::info!(resources = %total, "butte agent starting");
        let exits_agent = agent.clone();
        tokio::spawn(async move {
            while let Some((container_id, exit)) = exits.recv().await {
                let agent = exits_agent.clone();
                // Cleanup touches cgroupfs and may wait for processes: off the runtime threads.
                tokio::task::spawn_blocking(move || agent.container_exited(&container_id, exit));
            }
        });
        tokio::spawn(link::run(agent.clone()));
        shutdown_signal().await;
        tracing::info!("stopping: killing tasks");
        agent.shutdown().await;
        isolator.remove_subtree();
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
