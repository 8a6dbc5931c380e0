//! Arbitrary text as `gateway.yaml`: parsing and compiling never panic, and a refused
//! policy always says why, in the file, and where when the text itself is at fault.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tollgate::events::EventLog;
use tollgate::metrics::Metrics;

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Redis sections open (lazy) connections: nothing here may reach past loopback.
    if text.contains("redis") {
        return;
    }
    let path = Path::new("fuzz.yaml");
    if let Err(error) = tollgate::config::parse(path, text) {
        assert!(
            error.line >= 1 && !error.message.is_empty(),
            "a parse error without a place: {error}"
        );
        return;
    }
    let events = Arc::new(EventLog::default());
    if let Err(errors) = tollgate::policy::compile_text(path, text, None, metrics(), &events) {
        assert!(!errors.is_empty(), "refused without a reason");
        for error in errors {
            assert_eq!(error.file, "fuzz.yaml", "{error}");
            assert!(!error.message.is_empty(), "{error}");
        }
    }
});
