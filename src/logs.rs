//! Process logs through tracing (SPEC §1): `TOLLGATE_LOG` is an `EnvFilter` string
//! (default `info`), `TOLLGATE_LOG_FORMAT` is `json` or `text` (default `json` unless
//! stdout is a terminal). Pingora's own `log` records are bridged into the same output.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("TOLLGATE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = result {
        eprintln!("tollgate: logging already initialised: {e}");
    }
}
