use clap::Parser;

use butte_api::daemon::{init_logging, shutdown_signal};
use butte_master_lite::{MasterConfig, start};

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
    // SIGHUP (a renewed certificate) is the server's: butte_web::tls.
    shutdown_signal().await;
    tracing::info!("stopping");
    master.shutdown().await;
    Ok(())
}
