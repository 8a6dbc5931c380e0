//! A policy the targets that need one compile once per process.

use std::path::Path;
use std::sync::Arc;
use tollgate::policy::Policy;

pub fn compiled(text: &str) -> Policy {
    let metrics = tollgate::metrics::Metrics::new();
    let events = Arc::new(tollgate::events::EventLog::default());
    tollgate::policy::compile_text(Path::new("fuzz.yaml"), text, None, &metrics, &events)
        .expect("the fuzz policy compiles")
}
