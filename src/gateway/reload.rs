//! Hot reload: from a file change, SIGHUP or `POST /reload` to a new policy in force —
//! or, when the new file is invalid, to a logged and counted refusal while the old
//! policy keeps serving.
//!
//! The watcher observes the policy's *directory*, not the file: editors save by writing
//! a new file and renaming it over the old one, and Kubernetes swaps a ConfigMap by
//! re-pointing the `..data` symlink, and both replace the inode a file watch would
//! hold. Every wake-up re-reads the path and compares content hashes, so the event
//! flavour does not matter and an unchanged file is not reloaded. A slow poll backs
//! the watch up on filesystems without inotify.

use crate::config::ConfigError;
use crate::gateway::{unix_now, Gateway};
use crate::policy;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    FileChange,
    Signal,
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::FileChange => "file_change",
            Trigger::Signal => "sighup",
            Trigger::Admin => "admin_api",
        }
    }
}

#[derive(Debug)]
pub(crate) enum ReloadResult {
    Reloaded {
        generation: u64,
        changes: Vec<String>,
    },
    Unchanged {
        generation: u64,
    },
    /// The watcher saw the same bytes it last saw (valid or not): nothing attempted.
    NotAttempted,
}

/// Loads the policy file again and puts it in force if it is valid.
pub(crate) fn reload(
    gateway: &Gateway,
    trigger: Trigger,
) -> Result<ReloadResult, Vec<ConfigError>> {
    let mut last_seen = gateway
        .reload_state
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let path = &gateway.policy_path;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        // Mid-swap or removed: the next event or poll will see the new file.
        Err(_) if trigger == Trigger::FileChange => return Ok(ReloadResult::NotAttempted),
        Err(e) => {
            let error = ConfigError::at(
                path,
                &serde_saphyr::Location::UNKNOWN,
                format!("cannot read the policy: {e}"),
            );
            gateway
                .metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            return Err(vec![error]);
        }
    };
    let current = gateway.policy.load_full();
    // The files the policy in force reads count too: a new API key file is a new policy.
    let hash = crate::digest::fingerprint(&text, &current.read_files);
    if trigger == Trigger::FileChange && last_seen.as_deref() == Some(hash.as_str()) {
        return Ok(ReloadResult::NotAttempted);
    }
    *last_seen = Some(hash);
    let result = policy::compile_text(
        path,
        &text,
        Some(&current),
        &gateway.metrics,
        &gateway.events,
    );
    let metrics = &gateway.metrics;
    match result {
        Ok(new) => {
            metrics.config_reloads.with_label_values(&["success"]).inc();
            metrics.config_last_success.set(unix_now() as i64);
            if new.generation == current.generation {
                tracing::info!(
                    trigger = trigger.as_str(),
                    generation = new.generation,
                    "policy reloaded: unchanged"
                );
                return Ok(ReloadResult::Unchanged {
                    generation: new.generation,
                });
            }
            let diff = policy::PolicyDiff::between(&current, &new);
            let changes = diff.lines();
            let generation = new.generation;
            metrics.config_generation.set(generation as i64);
            metrics.set_slo_objectives(new.slo_objectives());
            gateway.cache.configure(&new.cache);
            gateway.install(new);
            metrics.forget(
                &diff.routes.removed,
                &diff.upstreams.removed,
                &diff.rules.removed,
                &diff.servers_removed,
            );
            for setting in &diff.restart_only {
                tracing::warn!(
                    trigger = trigger.as_str(),
                    "{setting} changed: takes effect only after a restart"
                );
            }
            tracing::info!(trigger = trigger.as_str(), generation, changes = ?changes, "policy reloaded");
            gateway.events.record(
                "reload",
                "policy reloaded",
                json!({ "trigger": trigger.as_str(), "generation": generation, "changes": changes, "diff": diff }),
            );
            Ok(ReloadResult::Reloaded {
                generation,
                changes,
            })
        }
        Err(errors) => {
            metrics.config_reloads.with_label_values(&["failure"]).inc();
            let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            for message in &messages {
                tracing::error!(
                    trigger = trigger.as_str(),
                    "policy rejected, the previous one keeps serving: {message}"
                );
            }
            gateway.events.record(
                "reload_failed",
                "policy rejected; the previous policy keeps serving",
                json!({ "trigger": trigger.as_str(), "generation": current.generation, "errors": messages }),
            );
            Err(errors)
        }
    }
}

/// The background service that reloads on file changes and SIGHUP, and has the access
/// log reopened on SIGUSR1.
pub(crate) struct Watcher {
    pub(crate) gateway: Arc<Gateway>,
    /// Notified on SIGHUP (`crate::signals`).
    pub(crate) reload: Arc<tokio::sync::Notify>,
    /// Notified on SIGUSR1: the access log file is reopened, for logrotate.
    pub(crate) reopen_log: Arc<tokio::sync::Notify>,
}

const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Events of one save or swap come in a burst; one reload after it settles is enough.
const SETTLE: Duration = Duration::from_millis(100);

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let _watch = watch_directory(&self.gateway.policy_path, tx);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    Trigger::FileChange
                }
                _ = poll.tick() => Trigger::FileChange,
                _ = self.reload.notified() => Trigger::Signal,
                _ = self.reopen_log.notified() => {
                    self.gateway.access_log.reopen();
                    continue;
                }
            };
            let gateway = self.gateway.clone();
            // Compiling reads files and builds regexes: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || reload(&gateway, trigger)).await;
        }
    }
}

fn watch_directory(
    path: &std::path::Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| tracing::warn!("file watching unavailable, polling every {POLL_INTERVAL:?}: {e}"))
    .ok()?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| {
            tracing::warn!(
                "cannot watch {}, polling every {POLL_INTERVAL:?}: {e}",
                dir.display()
            )
        })
        .ok()?;
    Some(watcher)
}
