//! What every Butte daemon does the same way at start and stop: logging
//! through `tracing` (text or JSON lines), and waiting for Ctrl-C or SIGTERM.

use tracing_subscriber::EnvFilter;

/// A `--log-format` that is neither `text` nor `json`.
#[derive(Debug, thiserror::Error)]
#[error("--log-format {0:?} is not known; use text or json")]
pub struct UnknownLogFormat(pub String);

/// Sends logs to stderr as `format` (`text` or `json`), at the level
/// `RUST_LOG` asks for (`info` by default).
pub fn init_logging(format: &str) -> Result<(), UnknownLogFormat> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        "json" => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        // Colours for a terminal only: a log file gets plain text.
        "text" => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_env_filter(filter)
            .init(),
        other => return Err(UnknownLogFormat(other.to_owned())),
    }
    Ok(())
}

/// Returns at Ctrl-C or SIGTERM (only Ctrl-C where SIGTERM cannot be watched).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
