//! The latency settings held while a session runs (`[realtime]` in
//! rig.toml): the CPUs kept out of sleep states and the kernel's tty workers
//! raised, both through `firmware_bridge::rt`. They are taken at the start of
//! each session and given back when it ends (the value is dropped), so
//! between sessions the machine runs as it normally does. The reader
//! thread's own `SCHED_FIFO` priority is set by the link at startup.
//!
//! What was granted is recorded in every session's `session.toml`
//! (`[realtime]`), so a session that ran without the settings can be told
//! apart afterwards. A refusal is logged as a warning at the first session
//! and at debug level after that.

use std::sync::atomic::{AtomicBool, Ordering};

use firmware_bridge::link::READER_THREAD_NAME;
use firmware_bridge::rt::{self, CpuLatencyHold, WorkerBoost};
use rig_config::RealtimeSection;

use session_format::RealtimeRecord;

/// The settings in force for one session; dropping it gives them back.
#[derive(Debug)]
pub struct SessionTuning {
    /// Held only to be dropped with the session.
    _cpus: Option<CpuLatencyHold>,
    workers: Option<WorkerBoost>,
    record: RealtimeRecord,
}

static WARNED_CPUS: AtomicBool = AtomicBool::new(false);
static WARNED_WORKERS: AtomicBool = AtomicBool::new(false);
static WARNED_READER: AtomicBool = AtomicBool::new(false);

fn warn_once(flag: &AtomicBool, msg: &str) {
    if flag.swap(true, Ordering::Relaxed) {
        tracing::debug!("{msg}");
    } else {
        tracing::warn!("{msg}");
    }
}

impl SessionTuning {
    /// Take what `cfg` asks for, as far as the system allows.
    pub fn acquire(cfg: &RealtimeSection) -> Self {
        let mut not_granted = Vec::new();
        let cpus = if cfg.hold_cpus_awake {
            match CpuLatencyHold::hold(0) {
                Ok(h) => Some(h),
                Err(e) => {
                    let e = e.to_string();
                    warn_once(&WARNED_CPUS, &e);
                    not_granted.push(e);
                    None
                }
            }
        } else {
            None
        };
        let workers = if cfg.boost_tty_workers {
            let b = WorkerBoost::start();
            if let Some(e) = b.refused() {
                let e = e.to_string();
                warn_once(&WARNED_WORKERS, &e);
                not_granted.push(e);
            }
            Some(b)
        } else {
            None
        };
        let reader = rt::thread_policy(READER_THREAD_NAME).unwrap_or_else(|| "not running".into());
        if cfg.reader_priority > 0 && !reader.starts_with("SCHED_FIFO") {
            let e = format!(
                "the serial reader runs as {reader}, not SCHED_FIFO {} (see the link's \
                 warning at startup)",
                cfg.reader_priority
            );
            warn_once(&WARNED_READER, &e);
            not_granted.push(e);
        }
        if cfg.lock_memory && !rt::memory_locked() {
            not_granted.push("memory not locked (see the warning at startup)".to_owned());
        }
        let record = RealtimeRecord {
            reader,
            memory_locked: rt::memory_locked(),
            cpus_held_awake: cpus.is_some(),
            tty_workers_raised: workers.as_ref().map_or(0, |w| w.raised() as u32),
            kernel_preemption: rt::kernel_preemption(),
            not_granted,
        };
        tracing::info!(
            reader = %record.reader,
            memory_locked = record.memory_locked,
            cpus_held_awake = record.cpus_held_awake,
            tty_workers_raised = record.tty_workers_raised,
            kernel_preemption = %record.kernel_preemption,
            "latency settings for the session"
        );
        Self {
            _cpus: cpus,
            workers,
            record,
        }
    }

    /// Once a second while the session runs: raise workers the kernel has
    /// started since.
    pub fn refresh(&mut self) {
        if let Some(w) = &mut self.workers {
            w.refresh();
        }
    }

    /// What the session runs with, for `session.toml`.
    pub fn record(&self) -> &RealtimeRecord {
        &self.record
    }
}
