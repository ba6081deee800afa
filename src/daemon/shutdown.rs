//! How the daemon is told to stop from outside: SIGTERM (systemd's stop)
//! and SIGINT (Ctrl-C in `dev`) cancel the token the daemon was started
//! with, the same token a test cancels to stop it.

use tokio_util::sync::CancellationToken;

/// SIGTERM and SIGINT cancel `shutdown`.
pub(crate) fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
}
