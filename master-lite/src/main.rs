use clap::Parser;
use tracing_subscriber::EnvFilter;

use butte_master_lite::{MasterConfig, start};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = MasterConfig::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match config.log_format.as_str() {
        "json" => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        "text" => tracing_subscriber::fmt().with_env_filter(filter).init(),
        other => anyhow::bail!("--log-format {other:?} is not known; use text or json"),
    }
    let master = start(config).await?;
    println!("butte-master listening on http://{}", master.addr);
    shutdown_signal().await;
    tracing::info!("stopping");
    master.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the master");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
