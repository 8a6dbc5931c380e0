//! Which of the `server.threads` threads serves a client connection.
//!
//! Each thread is a runtime of its own that sleeps and wakes on its own: below what one
//! thread can serve, spreading connections over two threads made each request cost
//! 1.15-1.36x the CPU, the second loop's sleeps and wake-ups (README, "More than one
//! thread"). So connections are gathered on the fewest threads the load needs and
//! spread only when those get busy, the way a pool of workers is sized by its load.
//!
//! Every [`TICK`] the balancer reads how busy each thread was (tokio's own busy time:
//! the time a thread spent running tasks, not waiting for events) and decides the plan
//! ([`plan`]): how many threads are in use, and how many connections each busy thread
//! may hand to the least busy one. New connections go to the thread in use that serves
//! the fewest; a kept-alive HTTP/1 connection moves between two requests when its
//! thread is no longer in use or may hand connections on (Pingora's keep-alive loop
//! asks, pingora-core 0022). The request path reads two atomics per request; a move
//! costs two `epoll_ctl` calls and a task spawned on the other thread.

use crate::connection::ClientStream;
use pingora::apps::Rehome;
use pingora::protocols::Stream;
use prometheus::IntCounter;
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::runtime::Handle;

/// How often the balancer reads the threads' busy time and plans.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Another thread is taken into use when the threads in use were busier than this on
/// average: a thread this busy starts to queue requests behind each other.
const SPREAD_ABOVE: f64 = 0.7;
/// A thread is let go when the others could have served all the load at this much
/// each: far enough below [`SPREAD_ABOVE`] that gathering does not spread again.
const GATHER_BELOW: f64 = 0.45;
/// A thread in use hands connections to the least busy one when it was busier by this
/// much; less is noise between ticks.
const BALANCE_ABOVE: f64 = 0.15;

/// The threads of the proxy and the connections each serves.
#[derive(Debug)]
pub(crate) struct Placement {
    /// The runtimes of the proxy's threads, by index, known from the first call made on
    /// one of them.
    runtimes: OnceLock<Box<[Handle]>>,
    threads: Box<[Thread]>,
    /// How many threads, from the first, serve connections.
    in_use: AtomicUsize,
    /// The thread in use that was the least busy at the last tick.
    spill_to: AtomicUsize,
    moved: IntCounter,
}

/// One thread's counts, on a cache line of its own: most writes to them are its own
/// (a move writes both threads' counts, an accept loop the `sent` of the thread chosen).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Thread {
    connections: AtomicUsize,
    /// Connections the accept loops sent here since the last tick: each is counted in
    /// `connections` only once its task runs, and a burst of them would otherwise all
    /// go to the one thread that served the fewest before it.
    sent: AtomicUsize,
    /// Connections this thread may still hand to `spill_to` before the next tick.
    may_hand_on: AtomicUsize,
}

/// What the balancer decided at a tick.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub(crate) in_use: usize,
    pub(crate) spill_to: usize,
    pub(crate) hand_on: Vec<usize>,
}

thread_local! {
    /// This thread's index among the proxy's threads; `None` until asked, and on a
    /// thread that is not one of them.
    static INDEX: Cell<Option<Option<usize>>> = const { Cell::new(None) };
}

impl Placement {
    pub(crate) fn new(threads: usize, moved: IntCounter) -> Placement {
        Placement {
            runtimes: OnceLock::new(),
            threads: (0..threads.max(1)).map(|_| Thread::default()).collect(),
            in_use: AtomicUsize::new(1),
            spill_to: AtomicUsize::new(0),
            moved,
        }
    }

    /// The index of the proxy thread this runs on; the first call on a proxy thread
    /// learns the runtimes of all of them.
    fn here(&self) -> Option<usize> {
        INDEX.with(|index| {
            if let Some(known) = index.get() {
                return known;
            }
            let found = pingora_runtime::current_thread_pool()
                .filter(|(_, runtimes)| runtimes.len() == self.threads.len())
                .map(|(at, runtimes)| {
                    self.runtimes.get_or_init(|| runtimes);
                    at
                });
            index.set(Some(found));
            found
        })
    }

    /// The runtimes of the proxy's threads, once a proxy thread has asked.
    pub(crate) fn runtimes(&self) -> Option<&[Handle]> {
        self.runtimes.get().map(|r| &r[..])
    }

    /// The thread in use serving the fewest connections, counting those sent to it
    /// since the last tick.
    fn fewest_connections(&self) -> usize {
        let in_use = self.in_use.load(Ordering::Relaxed);
        (0..in_use)
            .min_by_key(|&i| {
                let thread = &self.threads[i];
                thread.connections.load(Ordering::Relaxed) + thread.sent.load(Ordering::Relaxed)
            })
            .unwrap_or(0)
    }

    /// Where a connection just accepted is served.
    pub(crate) fn runtime_for_new_connection(&self) -> Option<Handle> {
        self.here()?;
        let to = self.fewest_connections();
        self.threads[to].sent.fetch_add(1, Ordering::Relaxed);
        self.runtimes().map(|r| r[to].clone())
    }

    /// A connection starts being served on this thread: the returned guard counts it
    /// there until it is dropped or moves.
    pub(crate) fn arrived(self: &Arc<Self>) -> Option<Placed> {
        let thread = self.here()?;
        self.threads[thread]
            .connections
            .fetch_add(1, Ordering::Relaxed);
        Some(Placed {
            placement: self.clone(),
            thread,
        })
    }

    /// Where a connection served on `from` goes before its next request, if anywhere.
    fn destination(&self, from: usize) -> Option<usize> {
        if from >= self.in_use.load(Ordering::Relaxed) {
            return Some(self.fewest_connections());
        }
        let thread = &self.threads[from];
        if thread.may_hand_on.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let to = self.spill_to.load(Ordering::Relaxed);
        if to == from {
            return None;
        }
        thread
            .may_hand_on
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()
            .map(|_| to)
    }

    /// The connections each thread serves now.
    pub(crate) fn connections(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.connections.load(Ordering::Relaxed))
            .collect()
    }

    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Puts the balancer's plan in force.
    pub(crate) fn apply(&self, plan: &Plan) {
        self.in_use.store(plan.in_use, Ordering::Relaxed);
        self.spill_to.store(plan.spill_to, Ordering::Relaxed);
        for (thread, hand_on) in self.threads.iter().zip(&plan.hand_on) {
            thread.may_hand_on.store(*hand_on, Ordering::Relaxed);
            thread.sent.store(0, Ordering::Relaxed);
        }
    }
}

impl Rehome for Placement {
    fn rehome(&self, stream: &mut Stream) -> io::Result<Option<Handle>> {
        let Some(client) = stream.as_any_mut().downcast_mut::<ClientStream>() else {
            return Ok(None);
        };
        let Some(from) = client.placed().map(|p| p.thread) else {
            return Ok(None);
        };
        let (Some(to), Some(runtimes)) = (self.destination(from), self.runtimes.get()) else {
            return Ok(None);
        };
        let runtime = &runtimes[to];
        if !client.move_to_runtime(runtime)? {
            return Ok(None);
        }
        if let Some(placed) = client.placed_mut() {
            placed.move_to(to);
        }
        self.moved.inc();
        Ok(Some(runtime.clone()))
    }
}

/// A connection counted on the thread that serves it.
#[derive(Debug)]
pub(crate) struct Placed {
    placement: Arc<Placement>,
    thread: usize,
}

impl Placed {
    fn move_to(&mut self, to: usize) {
        let threads = &self.placement.threads;
        threads[self.thread]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        threads[to].connections.fetch_add(1, Ordering::Relaxed);
        self.thread = to;
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.placement.threads[self.thread]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The plan for the next tick, from how busy each thread was during the last one (0 to
/// 1), the connections each serves, and how many threads were in use.
pub(crate) fn plan(in_use: usize, busy: &[f64], connections: &[usize]) -> Plan {
    let threads = busy.len();
    let in_use = in_use.clamp(1, threads.max(1));
    let total: f64 = busy.iter().sum();
    let mean_in_use = busy[..in_use].iter().sum::<f64>() / in_use as f64;
    let in_use = if mean_in_use > SPREAD_ABOVE && in_use < threads {
        in_use + 1
    } else if in_use > 1 && total < GATHER_BELOW * (in_use - 1) as f64 {
        in_use - 1
    } else {
        in_use
    };
    let spill_to = (0..in_use)
        .min_by(|&a, &b| {
            busy[a]
                .total_cmp(&busy[b])
                .then(connections[a].cmp(&connections[b]))
        })
        .unwrap_or(0);
    let hand_on = (0..threads)
        .map(|i| {
            let excess = busy[i] - busy[spill_to];
            if i >= in_use || excess <= BALANCE_ABOVE {
                return 0;
            }
            // Half the connections that would even the two out: the load each carries
            // is not known, and the receiver's own busy time rises as they arrive.
            (connections[i] as f64 * excess / busy[i] / 2.0).ceil() as usize
        })
        .collect();
    Plan {
        in_use,
        spill_to,
        hand_on,
    }
}

/// How busy each of `runtimes` was since the last call, from tokio's busy time.
#[derive(Debug, Default)]
pub(crate) struct BusyMeter {
    last: Vec<Duration>,
    at: Option<std::time::Instant>,
}

impl BusyMeter {
    pub(crate) fn read(&mut self, runtimes: &[Handle]) -> Option<Vec<f64>> {
        let now = std::time::Instant::now();
        let totals: Vec<Duration> = runtimes
            .iter()
            .map(|r| r.metrics().worker_total_busy_duration(0))
            .collect();
        let busy = match self.at {
            Some(at) if self.last.len() == totals.len() => {
                let elapsed = now.duration_since(at).as_secs_f64().max(1e-6);
                Some(
                    totals
                        .iter()
                        .zip(&self.last)
                        .map(|(t, l)| (t.saturating_sub(*l).as_secs_f64() / elapsed).min(1.0))
                        .collect(),
                )
            }
            _ => None,
        };
        self.last = totals;
        self.at = Some(now);
        busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_light_load_stays_on_one_thread() {
        let p = plan(1, &[0.12, 0.0], &[64, 0]);
        assert_eq!(p.in_use, 1);
        assert_eq!(p.spill_to, 0);
        assert_eq!(p.hand_on, vec![0, 0]);
    }

    #[test]
    fn a_busy_thread_takes_the_next_into_use_and_hands_it_connections() {
        let p = plan(1, &[0.95, 0.0], &[64, 0]);
        assert_eq!(p.in_use, 2);
        assert_eq!(p.spill_to, 1);
        // Half of what would even them out: 64 × 0.95 / 0.95 / 2.
        assert_eq!(p.hand_on, vec![32, 0]);
    }

    #[test]
    fn threads_in_use_grow_one_a_tick_and_never_past_the_last() {
        assert_eq!(plan(2, &[0.9, 0.8, 0.0, 0.0], &[10, 10, 0, 0]).in_use, 3);
        assert_eq!(plan(2, &[0.9, 0.8], &[10, 10]).in_use, 2);
    }

    #[test]
    fn load_that_fewer_threads_can_carry_gives_one_back() {
        // 0.4 in all: one thread at 0.4 is under GATHER_BELOW.
        let p = plan(2, &[0.2, 0.2], &[32, 32]);
        assert_eq!(p.in_use, 1);
        assert_eq!(p.hand_on, vec![0, 0]);
        // 0.9 in all stays on two: one thread would be past SPREAD_ABOVE.
        assert_eq!(plan(2, &[0.45, 0.45], &[32, 32]).in_use, 2);
    }

    #[test]
    fn between_gathering_and_spreading_the_plan_holds() {
        // One thread at 0.6: not busy enough to spread.
        assert_eq!(plan(1, &[0.6, 0.0], &[64, 0]).in_use, 1);
        // Two threads at 0.3 each: one would carry 0.6, over GATHER_BELOW.
        assert_eq!(plan(2, &[0.3, 0.3], &[32, 32]).in_use, 2);
    }

    #[test]
    fn threads_in_use_even_out_only_past_the_margin() {
        let p = plan(2, &[0.8, 0.7], &[32, 32]);
        assert_eq!(p.spill_to, 1);
        assert_eq!(p.hand_on, vec![0, 0]);
        let p = plan(2, &[0.9, 0.5], &[40, 24]);
        assert_eq!(p.spill_to, 1);
        // 40 × 0.4 / 0.9 / 2 = 8.9, rounded up.
        assert_eq!(p.hand_on, vec![9, 0]);
    }

    #[test]
    fn a_thread_out_of_use_hands_on_everything_without_a_budget() {
        let moved = IntCounter::new("moved", "moved").unwrap();
        let placement = Placement::new(2, moved);
        placement.apply(&plan(2, &[0.1, 0.1], &[0, 5]));
        assert_eq!(placement.in_use(), 1);
        assert_eq!(placement.destination(1), Some(0));
        assert_eq!(placement.destination(1), Some(0));
        assert_eq!(placement.destination(0), None);
    }

    #[test]
    fn a_burst_of_new_connections_alternates_between_the_threads_in_use() {
        let moved = IntCounter::new("moved", "moved").unwrap();
        let placement = Placement::new(3, moved);
        placement.apply(&plan(2, &[0.8, 0.8, 0.0], &[10, 10, 0]));
        assert_eq!(placement.in_use(), 3);
        for thread in &placement.threads[..2] {
            thread.connections.store(10, Ordering::Relaxed);
        }
        let mut picked = [0; 3];
        for _ in 0..30 {
            let to = placement.fewest_connections();
            placement.threads[to].sent.fetch_add(1, Ordering::Relaxed);
            picked[to] += 1;
        }
        // The new thread first catches up with the others' ten, then all take turns.
        assert_eq!(picked, [7, 7, 16]);
    }

    #[test]
    fn a_busy_thread_hands_on_no_more_than_its_budget() {
        let moved = IntCounter::new("moved", "moved").unwrap();
        let placement = Placement::new(2, moved);
        placement.apply(&Plan {
            in_use: 2,
            spill_to: 1,
            hand_on: vec![2, 0],
        });
        assert_eq!(placement.destination(0), Some(1));
        assert_eq!(placement.destination(0), Some(1));
        assert_eq!(placement.destination(0), None);
        assert_eq!(placement.destination(1), None);
    }
}
