//! The notable-events ring buffer behind `GET /events`: reloads, and later breaker
//! transitions, health changes, shedding levels and purges. Written rarely, never on
//! the request path, so a mutex is fine.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

pub(crate) const CAPACITY: usize = 1_000;

#[derive(Default)]
pub struct EventLog {
    events: Mutex<VecDeque<Value>>,
}

impl EventLog {
    /// Records an event of `kind` (e.g. `reload`) with its own fields.
    pub(crate) fn record(&self, kind: &str, message: &str, details: Value) {
        let mut event = json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "kind": kind,
            "message": message,
        });
        if let (Some(event), Value::Object(details)) = (event.as_object_mut(), details) {
            event.extend(details);
        }
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == CAPACITY {
            events.pop_back();
        }
        events.push_front(event);
    }

    /// Newest first.
    pub(crate) fn snapshot(&self) -> Vec<Value> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_thousand_newest_first() {
        let log = EventLog::default();
        for n in 0..CAPACITY + 5 {
            log.record("test", "n", json!({ "n": n }));
        }
        let events = log.snapshot();
        assert_eq!(events.len(), CAPACITY);
        assert_eq!(events[0]["n"], CAPACITY + 4);
        assert_eq!(events[CAPACITY - 1]["n"], 5);
        assert_eq!(events[0]["kind"], "test");
    }
}
