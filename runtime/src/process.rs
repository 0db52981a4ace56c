//! What every meshid binary does around its work: logs on stderr, filtered by `MESHID_LOG`
//! (`tracing` directives, default `info`) as text or JSON, and a stop on SIGTERM or SIGINT.

/// Installs the global log subscriber: stderr, `MESHID_LOG` filter, `json` or text format.
pub fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MESHID_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves at the first SIGTERM or SIGINT; an error when the handlers cannot be installed.
pub async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Exit code for a bad configuration (EX_USAGE): every binary names every bad setting, then exits
/// with it.
pub const EXIT_USAGE: u8 = 64;
