use clap::Parser;

use butte_api::daemon::{init_logging, shutdown_signal};
use butte_master_lite::{MasterConfig, start};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = MasterConfig::parse();
    init_logging(&config.log_format)?;
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let master = start(config).await?;
    println!("butte-master listening on {scheme}://{}", master.addr);
    // SIGHUP: the operator renewed the certificate.
    let mut hangups = signal(SignalKind::hangup())?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangups.recv() => match master.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and key read again"),
                Err(error) => tracing::error!(%error, "SIGHUP: the new certificate cannot be used; the old one stays"),
            },
        }
    }
    tracing::info!("stopping");
    master.shutdown().await;
    Ok(())
}
