//! What every section's compiler gets: where errors go (each pointing at the value's
//! line and column), the policy file's place (relative paths), the files read (their
//! content is part of the policy's hash), and the process's metrics and events.
//! A concern compiles its own section through `fn compile(cx: &mut Compile, …)`;
//! `policy` calls them in order and checks what spans sections.

use crate::config::ConfigError;
use crate::events::EventLog;
use crate::metrics::Metrics;
use serde_saphyr::{Location, Spanned};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) struct Compile<'a> {
    pub(crate) path: &'a Path,
    pub(crate) errors: Vec<ConfigError>,
    pub(crate) metrics: &'a Metrics,
    pub(crate) events: &'a Arc<EventLog>,
    pub(crate) read_files: Vec<PathBuf>,
}

impl<'a> Compile<'a> {
    pub(crate) fn new(
        path: &'a Path,
        metrics: &'a Metrics,
        events: &'a Arc<EventLog>,
    ) -> Compile<'a> {
        Compile {
            path,
            errors: Vec::new(),
            metrics,
            events,
            read_files: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, at: &Location, message: impl Into<String>) {
        self.errors.push(ConfigError::at(self.path, at, message));
    }

    /// `host:port`, resolved once now; an error at the value otherwise.
    pub(crate) fn socket_addr(&mut self, text: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match text.value.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => match text.value.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(addr)) => Some(addr),
                _ => {
                    self.error(
                        &text.referenced,
                        format!("{what} `{}` is not a valid host:port address", text.value),
                    );
                    None
                }
            },
        }
    }

    /// A path written in the policy, relative to the policy file's directory.
    pub(crate) fn relative_path(&self, file: &str) -> PathBuf {
        let base = self.path.parent().unwrap_or(Path::new("."));
        base.join(file)
    }
}
