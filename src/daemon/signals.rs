//! What the daemon hears from and tells the operating system: SIGTERM and SIGINT (the first
//! asks for a graceful stop, a second exits at once) and systemd's notify protocol (READY=1
//! once, STATUS= when it changes).

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::DaemonError;

/// What systemd hears (nothing when not run under it): READY=1 once, STATUS= when it changes.
#[derive(Default)]
pub(super) struct Systemd {
    ready: bool,
    status: String,
}

impl Systemd {
    pub(super) fn status(&mut self, text: String) {
        if text != self.status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
            self.status = text;
        }
    }

    pub(super) fn ready(&mut self) {
        if !self.ready {
            self.ready = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            tracing::debug!("started (READY=1)");
        }
    }
}

/// First SIGTERM/SIGINT: request a graceful stop. Second: kill the command in flight (a check
/// or reload command, with its children) and exit at once.
pub(super) fn spawn_signal_handler(tx: watch::Sender<bool>) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
        signal: "SIGINT",
        source,
    })?;
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            count += 1;
            if count == 1 {
                tracing::info!(
                    signal = name,
                    "shutting down after the pass in flight (send again to exit at once)"
                );
                let _ = tx.send(true);
            } else {
                tracing::warn!(signal = name, "exiting at once");
                crate::command::kill_running();
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
