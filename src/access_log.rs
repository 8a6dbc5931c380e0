//! One JSON line per request (SPEC §3 `access_log`), field names after Envoy's JSON
//! access log, written off the request path the way nginx's buffered log is.
//!
//! A request renders its line straight into its worker thread's shard of a bounded
//! queue (no JSON value tree, no allocation per line, no lock another worker takes); it
//! never waits on the log. A writer thread takes the shards' bytes every [`TICK`] into a
//! buffer and writes it when it holds `access_log.buffer` bytes or its oldest line is
//! `access_log.flush` old, to stdout or `access_log.path` (reopened on `SIGUSR1`, for
//! logrotate); within one tick, lines of different threads may be out of order. When a
//! shard is full a line is dropped and counted (`tollgate_access_log_dropped_total`,
//! `/status`). A clean stop flushes what is queued ([`Sink::flush`]). With nothing to
//! write (an idle sidecar, the log off) the writer sleeps [`IDLE`] at a time instead of a
//! tick, and the first line queued after that wakes it. `TOLLGATE_LOG`
//! still governs the lines through the `access` target (`TOLLGATE_LOG=info,access=off`).
//!
//! This module is the queue and the writer; a line is rendered by the proxy
//! (`proxy::access_log`).

use prometheus::IntCounter;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Bytes one shard holds between two drains of the writer (every [`TICK`]): room for
/// some 70,000 lines a second from one worker thread, twice what one thread proxies.
const SHARD_BYTES: usize = 1 << 20;
/// Shards of the queue; worker threads beyond this many share them.
const SHARDS: usize = 8;
/// How often the writer drains the queue while there are lines; a request never wakes it.
const TICK: Duration = Duration::from_millis(20);
/// How long the writer sleeps with nothing queued or buffered: 50 wake-ups a second
/// are a cost of their own in a pod that is idle, or whose log is off.
const IDLE: Duration = Duration::from_secs(1);

/// Where and how the writer writes; read from the policy in force at every tick.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Output {
    pub(crate) buffer: usize,
    pub(crate) flush: Duration,
    /// `None`: standard output.
    pub(crate) path: Option<PathBuf>,
}

/// The request side of the log: cheap to clone, never blocks.
#[derive(Clone)]
pub(crate) struct Sink {
    queue: Arc<Queue>,
    dropped: IntCounter,
    /// Whether `TOLLGATE_LOG` lets the `access` target through. Its filter is set once,
    /// before the sink starts, so it is asked once rather than on every request.
    wanted: bool,
}

#[derive(Default)]
struct Queue {
    /// Rendered lines, a shard per worker thread.
    shards: [Mutex<Vec<u8>>; SHARDS],
    reopen: AtomicBool,
    /// Flush requests: each is answered once everything queued before it is written.
    flushes: Mutex<Vec<mpsc::Sender<()>>>,
    /// Set while the writer sleeps for lack of lines: the next line wakes it.
    idle: AtomicBool,
    writer: OnceLock<std::thread::Thread>,
}

impl Queue {
    fn wake_writer(&self) {
        if let Some(writer) = self.writer.get() {
            writer.unpark();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sink {
    /// Starts the writer thread. `output` tells it, at every tick, where to write.
    pub(crate) fn start(
        dropped: IntCounter,
        output: impl Fn() -> Output + Send + 'static,
    ) -> std::io::Result<Sink> {
        Sink::start_idling(dropped, output, IDLE)
    }

    fn start_idling(
        dropped: IntCounter,
        output: impl Fn() -> Output + Send + 'static,
        idle: Duration,
    ) -> std::io::Result<Sink> {
        let queue = Arc::new(Queue::default());
        let writer = Writer {
            queue: queue.clone(),
            output,
            current: None,
            target: Target::Stdout,
            pending: Vec::new(),
            oldest: None,
            idle,
        };
        std::thread::Builder::new()
            .name("access log".into())
            .spawn(move || writer.run())?;
        Ok(Sink {
            queue,
            dropped,
            wanted: tracing::enabled!(target: "access", tracing::Level::INFO),
        })
    }

    /// Queues the line `render` appends to the thread's shard; drops (and counts) it
    /// when the shard is full.
    pub(crate) fn append(&self, render: impl FnOnce(&mut Vec<u8>)) {
        let shard = &self.queue.shards[crate::worker::index() as usize % SHARDS];
        let mut lines = lock(shard);
        if lines.len() >= SHARD_BYTES {
            drop(lines);
            self.dropped.inc();
            return;
        }
        render(&mut lines);
        drop(lines);
        // A load per line; the swap and the wake only for the first line after a sleep.
        if self.queue.idle.load(Ordering::SeqCst) && self.queue.idle.swap(false, Ordering::SeqCst) {
            self.queue.wake_writer();
        }
    }

    /// Whether lines are wanted at all (the process's log filter); when not, rendering
    /// them would be wasted.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Reopens `access_log.path` at the next tick (logrotate's `postrotate`).
    pub(crate) fn reopen(&self) {
        self.queue.reopen.store(true, Ordering::Relaxed);
        self.queue.wake_writer();
    }

    /// Writes everything queued so far; waits at most `timeout`. For a clean stop.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = mpsc::channel();
        lock(&self.queue.flushes).push(done);
        self.queue.wake_writer();
        wait.recv_timeout(timeout).is_ok()
    }
}

enum Target {
    Stdout,
    File(File),
}

struct Writer<F> {
    queue: Arc<Queue>,
    output: F,
    current: Option<Output>,
    target: Target,
    pending: Vec<u8>,
    /// When the oldest line in `pending` was taken from the queue.
    oldest: Option<Instant>,
    /// How long to sleep with nothing to write ([`IDLE`]).
    idle: Duration,
}

impl<F: Fn() -> Output> Writer<F> {
    fn run(mut self) {
        // Before any sleep, so that whoever wakes it finds it.
        let _ = self.queue.writer.set(std::thread::current());
        loop {
            let output = (self.output)();
            let reopen = self.queue.reopen.swap(false, Ordering::Relaxed);
            if reopen || self.current.as_ref().map(|o| &o.path) != Some(&output.path) {
                self.write_pending();
                self.open(&output);
            }
            let flushes = std::mem::take(&mut *lock(&self.queue.flushes));
            // Every sink gone: what is queued now is the last of it.
            let open = Arc::strong_count(&self.queue) > 1;
            let drained = self.drain(&output);
            let due = self.oldest.is_some_and(|t| t.elapsed() >= output.flush);
            if due || !flushes.is_empty() || !open {
                self.write_pending();
            }
            for done in flushes {
                let _ = done.send(());
            }
            self.current = Some(output);
            if !open {
                return;
            }
            if drained || !self.pending.is_empty() {
                std::thread::sleep(TICK);
            } else {
                self.sleep_idle();
            }
        }
    }

    /// Sleeps up to `idle`, woken by the next line, a flush or a reopen.
    fn sleep_idle(&self) {
        self.queue.idle.store(true, Ordering::SeqCst);
        // A line queued before `idle` was set saw it unset and woke no one: look again.
        // (One queued after sees it set; an unpark before the park makes it return.)
        // Flushes and reopens wake the writer whatever `idle` says.
        let waiting = self
            .queue
            .shards
            .iter()
            .any(|shard| !lock(shard).is_empty())
            || !lock(&self.queue.flushes).is_empty()
            || self.queue.reopen.load(Ordering::Relaxed);
        if waiting {
            self.queue.idle.store(false, Ordering::SeqCst);
            return;
        }
        std::thread::park_timeout(self.idle);
        self.queue.idle.store(false, Ordering::SeqCst);
    }

    /// Moves what the shards hold into the buffer, writing whenever it is full; says
    /// whether there was anything.
    fn drain(&mut self, output: &Output) -> bool {
        let mut drained = false;
        let queue = self.queue.clone();
        for shard in &queue.shards {
            let mut lines = lock(shard);
            if lines.is_empty() {
                continue;
            }
            drained = true;
            self.oldest.get_or_insert_with(Instant::now);
            if self.pending.is_empty() {
                // The shard keeps the buffer's allocation for its next lines.
                std::mem::swap(&mut *lines, &mut self.pending);
            } else {
                self.pending.extend_from_slice(&lines);
                lines.clear();
            }
            drop(lines);
            if self.pending.len() >= output.buffer {
                self.write_pending();
            }
        }
        drained
    }

    fn open(&mut self, output: &Output) {
        self.target = match &output.path {
            None => Target::Stdout,
            Some(path) => match File::options().create(true).append(true).open(path) {
                Ok(file) => Target::File(file),
                Err(e) => {
                    tracing::error!(
                        "cannot open the access log {}: {e}; writing to stdout",
                        path.display()
                    );
                    Target::Stdout
                }
            },
        };
    }

    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let written = match &mut self.target {
            Target::Stdout => std::io::stdout().lock().write_all(&self.pending),
            Target::File(file) => file.write_all(&self.pending),
        };
        if let Err(e) = written {
            tracing::error!("access log write failed: {e}");
        }
        self.pending.clear();
        self.oldest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink_to(path: PathBuf, buffer: usize, flush: Duration) -> Sink {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        Sink::start(dropped, move || Output {
            buffer,
            flush,
            path: Some(path.clone()),
        })
        .unwrap()
    }

    #[test]
    fn lines_reach_the_file_by_flush_time_and_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let sink = sink_to(path.clone(), 1 << 20, Duration::from_secs(3600));
        sink.append(|buf| buf.extend_from_slice(b"{\"n\":1}\n"));
        std::thread::sleep(TICK * 3);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap_or_default(),
            "",
            "neither full nor due"
        );
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":1}\n");

        let due = sink_to(dir.path().join("due.log"), 1 << 20, Duration::ZERO);
        due.append(|buf| buf.extend_from_slice(b"x\n"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(dir.path().join("due.log")).unwrap_or_default() != "x\n" {
            assert!(Instant::now() < deadline, "never written");
            std::thread::sleep(TICK);
        }
    }

    #[test]
    fn an_idle_writer_sleeps_until_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idle.log");
        let out = path.clone();
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        // Once idle it would sleep an hour: only the line can wake it in time.
        let output = move || Output {
            buffer: 1 << 20,
            flush: Duration::ZERO,
            path: Some(out.clone()),
        };
        let sink = Sink::start_idling(dropped, output, Duration::from_secs(3600)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sink.queue.idle.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the writer never went idle");
            std::thread::sleep(TICK);
        }
        sink.append(|buf| buf.extend_from_slice(b"woken\n"));
        while std::fs::read_to_string(&path).unwrap_or_default() != "woken\n" {
            assert!(
                Instant::now() < deadline,
                "the line waited for the idle sleep"
            );
            std::thread::sleep(TICK);
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        // The writer asks for its output at every tick: holding `gate` stalls it, so
        // the queue fills whatever the machine's speed.
        let gate = Arc::new(Mutex::new(()));
        let stalled = gate.lock().unwrap();
        let writer_gate = gate.clone();
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let sink = Sink::start(dropped, move || {
            drop(writer_gate.lock().unwrap_or_else(|e| e.into_inner()));
            Output {
                buffer: 1 << 20,
                flush: Duration::from_secs(3600),
                path: Some(path.clone()),
            }
        })
        .unwrap();
        // Lines of 2 bytes from one thread: its shard takes SHARD_BYTES / 2 of them.
        let lines = SHARD_BYTES * 2;
        for _ in 0..lines {
            sink.append(|buf| buf.extend_from_slice(b"x\n"));
        }
        assert_eq!(sink.dropped(), (lines - SHARD_BYTES / 2) as u64);
        drop(stalled);
        assert!(sink.flush(Duration::from_secs(5)));
        let written = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
        assert_eq!(
            written.lines().count() as u64 + sink.dropped(),
            lines as u64,
            "every line is written or counted"
        );
    }
}
