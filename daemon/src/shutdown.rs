//! One shutdown for the whole daemon: one signal every part watches, and one
//! place that waits for all of them under one deadline.
//!
//! Each long-lived part (the control socket server, the serial link's
//! threads, the preview server) is registered with the [`Shutdown`] once,
//! when it starts: an async part as the future that completes when it has
//! drained (it watches a [`ShutdownSignal`] to know when to begin), a
//! blocking part as the call that stops it. [`Shutdown::run`] raises the
//! signal, waits for every part at once, and when the deadline passes names
//! the parts that did not finish (the process then exits anyway: nothing a
//! stuck part holds is worth a hung rigd, and the device's watchdog closes
//! the valve whatever happens here). A running session is not a part: it is
//! stopped, its files finished, before the shutdown begins.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;

type PartFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

enum Stop {
    /// Completes by itself once the signal is raised.
    Async(PartFuture),
    /// Stopped by a blocking call (run on tokio's blocking pool).
    Blocking(Box<dyn FnOnce() + Send>),
}

/// The daemon's parts and the signal that stops them.
pub struct Shutdown {
    signal: watch::Sender<bool>,
    parts: Vec<(&'static str, Stop)>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.parts.iter().map(|(n, _)| *n).collect();
        f.debug_struct("Shutdown").field("parts", &names).finish()
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

/// A part's view of the shutdown: cheap to clone, one per task.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// Wait until the shutdown begins (at once if it has).
    pub async fn wait(&mut self) {
        // An error means the `Shutdown` is gone: that is a shutdown too.
        let _ = self.0.wait_for(|raised| *raised).await;
    }

    pub fn is_raised(&self) -> bool {
        *self.0.borrow()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            signal: watch::channel(false).0,
            parts: Vec::new(),
        }
    }

    /// A signal for a part to watch.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal(self.signal.subscribe())
    }

    /// A part that stops by itself once the signal is raised; `done`
    /// completes when it has.
    pub fn register(
        &mut self,
        name: &'static str,
        done: impl Future<Output = ()> + Send + 'static,
    ) {
        self.parts.push((name, Stop::Async(Box::pin(done))));
    }

    /// A part stopped by a blocking call, made after the signal is raised.
    pub fn register_blocking(&mut self, name: &'static str, stop: impl FnOnce() + Send + 'static) {
        self.parts.push((name, Stop::Blocking(Box::new(stop))));
    }

    /// Raise the signal and wait for every part, at most `deadline` in all.
    /// Returns the names of the parts that had not finished by then (each
    /// also logged).
    pub async fn run(self, deadline: Duration) -> Vec<&'static str> {
        let _ = self.signal.send(true);
        let names: Vec<&'static str> = self.parts.iter().map(|(n, _)| *n).collect();
        let mut waiting = tokio::task::JoinSet::new();
        for (name, stop) in self.parts {
            match stop {
                Stop::Async(done) => {
                    waiting.spawn(async move {
                        done.await;
                        name
                    });
                }
                Stop::Blocking(stop) => {
                    waiting.spawn_blocking(move || {
                        stop();
                        name
                    });
                }
            }
        }
        let mut stopped: Vec<&'static str> = Vec::new();
        let all = async {
            while let Some(joined) = waiting.join_next().await {
                match joined {
                    Ok(name) => stopped.push(name),
                    // A part that panicked has stopped too (the panic was
                    // reported where it happened).
                    Err(e) => tracing::error!("shutdown: a part failed: {e}"),
                }
            }
        };
        let in_time = tokio::time::timeout(deadline, all).await.is_ok();
        if in_time {
            return Vec::new();
        }
        let pending: Vec<&'static str> =
            names.into_iter().filter(|n| !stopped.contains(n)).collect();
        tracing::error!(
            "shutdown: {} did not stop within {:.0} s; exiting anyway",
            pending.join(", "),
            deadline.as_secs_f64()
        );
        waiting.abort_all();
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn every_part_sees_the_signal_and_is_waited_for() {
        let mut s = Shutdown::new();
        let mut signal = s.signal();
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.register("async part", async move {
            signal.wait().await;
            let _ = tx.send("drained");
        });
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stopped.clone();
        s.register_blocking("blocking part", move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst)
        });
        let late = s.signal();
        assert!(!late.is_raised());
        let stuck = s.run(Duration::from_secs(30)).await;
        assert!(stuck.is_empty(), "{stuck:?}");
        assert_eq!(rx.await.ok(), Some("drained"));
        assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
        assert!(late.is_raised());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_part_that_never_stops_is_named_and_left_behind_at_the_deadline() {
        let mut s = Shutdown::new();
        s.register("stuck", std::future::pending());
        s.register("quick", async {});
        let stuck = s.run(Duration::from_secs(5)).await;
        assert_eq!(stuck, vec!["stuck"]);
    }
}
