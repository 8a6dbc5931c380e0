//! Process signals, caught before any socket opens.
//!
//! Pingora asks tokio for SIGTERM, SIGINT and SIGQUIT only once every service runs, and
//! the policy watcher asked for SIGHUP and SIGUSR1 only once it was scheduled. Until then
//! each signal had its default action: a `kill -TERM` from an orchestrator, a
//! `kill -HUP` from an operator or logrotate's `kill -USR1` in the moment after the
//! listeners opened killed the process instead of draining, reloading or reopening. Here
//! all five are caught first thing, by one thread, and one that comes early waits for
//! whoever acts on it.

use async_trait::async_trait;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use std::sync::Arc;
use tokio::sync::{mpsc, Mutex, Notify};

/// What the caught signals ask for.
pub(crate) struct Signals {
    /// SIGHUP: read the policy again.
    pub(crate) reload: Arc<Notify>,
    /// SIGUSR1: reopen the access log file (logrotate's postrotate), as nginx does.
    pub(crate) reopen_log: Arc<Notify>,
    /// SIGTERM, SIGINT, SIGQUIT: for Pingora's main loop.
    pub(crate) shutdown: RunArgs,
}

/// Catches the signals from now on.
pub(crate) fn catch() -> std::io::Result<Signals> {
    let mut caught =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1])?;
    let reload = Arc::new(Notify::new());
    let reopen_log = Arc::new(Notify::new());
    let (shutdown_tx, shutdown_rx) = mpsc::unbounded_channel();
    let (on_reload, on_reopen) = (reload.clone(), reopen_log.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in caught.forever() {
                // Pingora acts on the first shutdown signal only, as it did on its own.
                let shutdown = match signal {
                    SIGHUP => {
                        on_reload.notify_one();
                        continue;
                    }
                    SIGUSR1 => {
                        on_reopen.notify_one();
                        continue;
                    }
                    SIGTERM => ShutdownSignal::GracefulTerminate,
                    SIGINT => ShutdownSignal::FastShutdown,
                    SIGQUIT => ShutdownSignal::GracefulUpgrade,
                    _ => continue,
                };
                let _ = shutdown_tx.send(shutdown);
            }
        })?;
    Ok(Signals {
        reload,
        reopen_log,
        shutdown: RunArgs {
            shutdown_signal: Box::new(Shutdown(Mutex::new(shutdown_rx))),
        },
    })
}

struct Shutdown(Mutex<mpsc::UnboundedReceiver<ShutdownSignal>>);

#[async_trait]
impl ShutdownSignalWatch for Shutdown {
    async fn recv(&self) -> ShutdownSignal {
        match self.0.lock().await.recv().await {
            Some(signal) => signal,
            // The signal thread never ends while the process runs.
            None => std::future::pending().await,
        }
    }
}
