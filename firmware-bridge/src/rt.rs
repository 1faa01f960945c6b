//! Real-time settings for the latency path (serial sample -> valve command).
//!
//! Under CPU load a normal (CFS) thread can wait tens of milliseconds for the
//! CPU, which is the difference between a reward on the press and a reward
//! after it. The link's reader thread therefore asks for `SCHED_FIFO`, which
//! needs root, `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` grant (the systemd unit
//! sets `LimitRTPRIO`). It blocks in `poll`/`read` between frames, so it cannot
//! starve the rest of the machine. Without the privilege the thread stays
//! normal and the caller is told why.
//!
//! The rest of the path is the kernel's: this module also locks the
//! process's memory ([`lock_memory`]), holds idle CPUs awake
//! ([`CpuLatencyHold`]) and raises the tty layer's kernel workers
//! ([`WorkerBoost`]); the daemon takes the last two per session.

use std::io;

/// The system refused the calling thread a real-time priority.
#[derive(Debug, thiserror::Error)]
#[error(
    "SCHED_FIFO priority {priority} refused ({error}): run as root, grant CAP_SYS_NICE, or set \
     LimitRTPRIO in the service (packaging/systemd/rigd.service)"
)]
pub struct PriorityError {
    /// The priority asked for (clamped to 1..=99).
    pub priority: i32,
    pub error: io::Error,
}

/// Put the calling thread in `SCHED_FIFO` at `priority` (1..=99) and set its
/// timer slack to 1 ns so its timed waits end when asked. Returns why not, if
/// the system refused.
pub fn make_current_thread_realtime(priority: i32) -> Result<(), PriorityError> {
    // SAFETY: a plain syscall on the calling thread; no memory is shared.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let priority = priority.clamp(1, 99);
    set_policy(0, libc::SCHED_FIFO, priority).map_err(|error| PriorityError { priority, error })
}

/// Put the calling thread back in the normal policy (`SCHED_OTHER`): for bulk
/// work started from a real-time thread, which it would otherwise inherit
/// (`rig-sim`'s microscope renderer). Returns why not, if the system refused.
pub fn make_current_thread_normal() -> io::Result<()> {
    set_policy(0, libc::SCHED_OTHER, 0)
}

// ---- memory: no page faults on the latency path ----

/// Why the process's memory was not locked.
#[derive(Debug, thiserror::Error)]
pub enum MemoryLockError {
    #[error(
        "memory not locked: RLIMIT_MEMLOCK is {limit_kb} kB and rigd lacks CAP_IPC_LOCK, so a \
         locked heap could make an allocation fail; set LimitMEMLOCK=infinity in the \
         service (packaging/systemd/rigd.service), or [realtime].lock_memory = false"
    )]
    LimitTooLow { limit_kb: u64 },
    #[error(
        "memory not locked: mlockall failed ({error}); set LimitMEMLOCK=infinity in the \
         service (packaging/systemd/rigd.service), or [realtime].lock_memory = false"
    )]
    Mlockall { error: io::Error },
}

static MEMORY_LOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `CAP_IPC_LOCK` (bit 14) in this process's effective capabilities.
fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

/// Lock the process's memory so that the kernel never pages it out: code
/// that runs once per trial (the reward path) is otherwise "cold" between
/// trials, and a kernel reclaiming cold pages (memory pressure, or proactive
/// reclaim such as DAMON's) makes the next reward wait for a page fault that
/// reads the binary back from disk (seen at 100-300 µs in a trace, the
/// thread in uninterruptible sleep between reading the crossing sample and
/// writing the valve command).
///
/// What is mapped now is locked and read in at once; later mappings (thread
/// stacks, the heap as it grows, the frame ring) are locked page by page as
/// they are first touched (`MCL_ONFAULT`), so untouched reservations cost
/// nothing. Only done when the lock cannot make a later allocation fail:
/// with `CAP_IPC_LOCK` (root) or an unlimited `RLIMIT_MEMLOCK`
/// (`LimitMEMLOCK=infinity` in the systemd unit).
pub fn lock_memory() -> Result<(), MemoryLockError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let unlimited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur == libc::RLIM_INFINITY;
    if !unlimited && !has_cap_ipc_lock() {
        return Err(MemoryLockError::LimitTooLow {
            limit_kb: limit.rlim_cur / 1024,
        });
    }
    // SAFETY: mlockall only changes how the kernel treats our mappings.
    unsafe {
        if libc::mlockall(libc::MCL_CURRENT) != 0
            || libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) != 0
        {
            let error = io::Error::last_os_error();
            libc::munlockall();
            return Err(MemoryLockError::Mlockall { error });
        }
    }
    MEMORY_LOCKED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Whether [`lock_memory`] succeeded in this process.
pub fn memory_locked() -> bool {
    MEMORY_LOCKED.load(std::sync::atomic::Ordering::Relaxed)
}

// ---- the rest of the path: CPU idle states and the kernel's tty workers ----
//
// A byte from the rig reaches the reader in two steps that rigd's own
// priority does not cover (measured with ftrace; docs/performance.md):
//
// 1. The tty driver hands the bytes to a kernel worker (`flush_to_ldisc`, on
//    the unbound workqueue, run by a `kworker/u*` thread), which wakes the
//    reader. The same happens in the other direction for a command. Those
//    workers are ordinary (CFS) threads: a CPU hog can keep them waiting for
//    hundreds of µs to milliseconds. [`WorkerBoost`] gives them `SCHED_FIFO`
//    priority 1 (above every ordinary thread, below rigd's reader) while a
//    session runs, and gives them back their ordinary policy at the end.
// 2. An idle CPU that has gone to sleep takes tens of µs (far more in a
//    virtual machine, where sleeping means leaving the guest) to wake for the
//    worker or the reader. [`CpuLatencyHold`] asks the kernel's PM QoS for a
//    wake-up latency of 0 µs, which keeps idle CPUs polling instead.

/// Why the CPUs could not be held awake.
#[derive(Debug, thiserror::Error)]
pub enum CpuLatencyError {
    #[error(
        "cannot hold the CPUs awake ({CPU_DMA_LATENCY}: {error}): run rigd as root or give \
         its group write access to {CPU_DMA_LATENCY} (docs/operations.md), or set \
         [realtime].hold_cpus_awake = false"
    )]
    Open { error: io::Error },
    #[error(
        "cannot hold the CPUs awake: writing {max_us} µs to {CPU_DMA_LATENCY} failed \
         ({error}); set [realtime].hold_cpus_awake = false if this kernel has no PM QoS"
    )]
    Write { max_us: u32, error: io::Error },
}

/// An open request to the kernel (PM QoS, `/dev/cpu_dma_latency`) to keep
/// the CPUs' wake-up latency at most `max_us`; the request lasts as long as
/// this value (the kernel drops it when the file is closed, also when the
/// process dies).
#[derive(Debug)]
pub struct CpuLatencyHold {
    _file: std::fs::File,
    max_us: u32,
}

/// The PM QoS device file.
pub const CPU_DMA_LATENCY: &str = "/dev/cpu_dma_latency";

impl CpuLatencyHold {
    /// Open the request. Fails without write access to the device (root, or
    /// a udev rule giving rigd's group write access).
    pub fn hold(max_us: u32) -> Result<Self, CpuLatencyError> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(CPU_DMA_LATENCY)
            .map_err(|error| CpuLatencyError::Open { error })?;
        // The kernel reads a native-endian 32-bit value.
        let value = i32::try_from(max_us).unwrap_or(i32::MAX);
        file.write_all(&value.to_ne_bytes())
            .map_err(|error| CpuLatencyError::Write { max_us, error })?;
        Ok(Self {
            _file: file,
            max_us,
        })
    }

    /// The wake-up latency asked for, µs.
    pub fn max_us(&self) -> u32 {
        self.max_us
    }
}

/// A kernel thread's scheduling, from `/proc/PID/stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ThreadSched {
    comm: String,
    kernel_thread: bool,
    policy: i32,
    rt_priority: i32,
}

/// `PF_KTHREAD` in `/proc/PID/stat`'s flags.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Parse one `/proc/PID/stat` line (the command name may hold spaces and
/// parentheses, so it is cut at the last `)`).
fn parse_stat(text: &str) -> Option<ThreadSched> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    // Fields after the name, numbered from 3 (state) as in proc(5).
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied();
    let flags: u64 = field(9)?.parse().ok()?;
    let rt_priority: i32 = field(40)?.parse().ok()?;
    let policy: i32 = field(41)?.parse().ok()?;
    Some(ThreadSched {
        comm,
        kernel_thread: flags & PF_KTHREAD != 0,
        policy,
        rt_priority,
    })
}

fn read_sched(pid: i32) -> Option<ThreadSched> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether a thread is one of the kernel's unbound workqueue workers, the
/// ones that run the tty layer's `flush_to_ldisc`.
fn is_unbound_worker(t: &ThreadSched) -> bool {
    t.kernel_thread && t.comm.starts_with("kworker/u")
}

/// The priority given to the workers: above every ordinary thread, below
/// the reader (50 by default) so they never delay it.
pub const WORKER_PRIORITY: i32 = 1;

/// `sched_setscheduler` for a thread (`pid` 0 = the calling thread).
fn set_policy(pid: i32, policy: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: a plain syscall with a valid parameter struct.
    if unsafe { libc::sched_setscheduler(pid, policy, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's unbound workers raised to `SCHED_FIFO` priority
/// [`WORKER_PRIORITY`] for as long as this value lives. Workers the kernel
/// starts later are caught by [`WorkerBoost::refresh`] (rigd calls it once a
/// second); on drop every worker this boost raised, and that still has the
/// priority it was given, gets its ordinary policy back (its nice value is
/// kept by the kernel). Workers found already at exactly that priority (left
/// by a rigd that was killed mid-session) are adopted and given back too.
#[derive(Debug, Default)]
pub struct WorkerBoost {
    raised: Vec<i32>,
    refused: Option<WorkerBoostError>,
}

/// Why the kernel's tty workers could not be raised.
#[derive(Debug, thiserror::Error)]
pub enum WorkerBoostError {
    #[error(
        "cannot raise the kernel's tty workers: /proc is not readable ({error}); mount /proc, \
         or set [realtime].boost_tty_workers = false"
    )]
    ProcUnreadable { error: io::Error },
    #[error(
        "cannot raise the kernel's tty workers ({worker}: {error}): run rigd as root or \
         with CAP_SYS_NICE, or set [realtime].boost_tty_workers = false"
    )]
    Refused { worker: String, error: io::Error },
}

impl WorkerBoost {
    /// Raise every unbound worker now.
    pub fn start() -> Self {
        let mut b = Self::default();
        b.refresh();
        b
    }

    /// Raise the unbound workers that are still ordinary threads. After a
    /// refusal (no privilege) it stops trying.
    pub fn refresh(&mut self) {
        if self.refused.is_some() {
            return;
        }
        let dir = match std::fs::read_dir("/proc") {
            Ok(dir) => dir,
            Err(error) => {
                self.refused = Some(WorkerBoostError::ProcUnreadable { error });
                return;
            }
        };
        self.raised.retain(|&pid| read_sched(pid).is_some());
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Some(t) = read_sched(pid) else { continue };
            if !is_unbound_worker(&t) {
                continue;
            }
            if t.policy == libc::SCHED_FIFO && t.rt_priority == WORKER_PRIORITY {
                // Raised by a rigd that was killed before it could give it
                // back: adopt it, so this boost gives it back.
                if !self.raised.contains(&pid) {
                    self.raised.push(pid);
                }
                continue;
            }
            if t.policy != libc::SCHED_OTHER {
                continue; // set by someone else on purpose: leave it
            }
            match set_policy(pid, libc::SCHED_FIFO, WORKER_PRIORITY) {
                Ok(()) => self.raised.push(pid),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(error) => {
                    self.refused = Some(WorkerBoostError::Refused {
                        worker: t.comm,
                        error,
                    });
                    return;
                }
            }
        }
    }

    /// How many workers this boost holds raised.
    pub fn raised(&self) -> usize {
        self.raised.len()
    }

    /// Why the boost could not be applied, if it could not.
    pub fn refused(&self) -> Option<&WorkerBoostError> {
        self.refused.as_ref()
    }
}

impl Drop for WorkerBoost {
    fn drop(&mut self) {
        for &pid in &self.raised {
            // Only a worker that still has what we gave it: the pid may be
            // gone, or another program may have set it since.
            let ours = read_sched(pid).is_some_and(|t| {
                is_unbound_worker(&t)
                    && t.policy == libc::SCHED_FIFO
                    && t.rt_priority == WORKER_PRIORITY
            });
            if ours {
                let _ = set_policy(pid, libc::SCHED_OTHER, 0);
            }
        }
    }
}

/// A calling-process thread's scheduling, by thread name: `"SCHED_FIFO 50"`,
/// `"SCHED_OTHER"`, or None if no thread has that name.
pub fn thread_policy(name: &str) -> Option<String> {
    let dir = std::fs::read_dir("/proc/self/task").ok()?;
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(t) = parse_stat(&text) else { continue };
        if t.comm == name {
            return Some(match t.policy {
                libc::SCHED_FIFO => format!("SCHED_FIFO {}", t.rt_priority),
                libc::SCHED_RR => format!("SCHED_RR {}", t.rt_priority),
                _ => "SCHED_OTHER".to_owned(),
            });
        }
    }
    None
}

/// The running kernel's preemption model, as far as it can be read:
/// `"PREEMPT_RT"`, `"full"`, `"voluntary or none"`, or for a
/// `PREEMPT_DYNAMIC` kernel the mode in use (from debugfs or the `preempt=`
/// boot parameter) or `"dynamic (mode not readable)"`. Under disk load a
/// kernel that does not preempt kernel code ("none") can hold a woken
/// real-time thread off its CPU for milliseconds (docs/performance.md).
pub fn kernel_preemption() -> String {
    let version = std::fs::read_to_string("/proc/sys/kernel/version").unwrap_or_default();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let debugfs = std::fs::read_to_string("/sys/kernel/debug/sched/preempt").ok();
    preemption_from(&version, &cmdline, debugfs.as_deref())
}

fn preemption_from(version: &str, cmdline: &str, debugfs: Option<&str>) -> String {
    if version.contains("PREEMPT_RT") {
        return "PREEMPT_RT".to_owned();
    }
    if version.contains("PREEMPT_DYNAMIC") {
        // debugfs shows the modes with the current one in parentheses.
        if let Some(mode) = debugfs.and_then(|d| {
            let open = d.find('(')?;
            let close = d[open..].find(')')? + open;
            Some(d[open + 1..close].to_owned())
        }) {
            return format!("dynamic: {mode}");
        }
        if let Some(mode) = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("preempt="))
        {
            return format!("dynamic: {mode} (boot parameter)");
        }
        return "dynamic (mode not readable)".to_owned();
    }
    if version.split_whitespace().any(|w| w == "PREEMPT") {
        return "full".to_owned();
    }
    "voluntary or none".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_setting_the_value_and_the_fix() {
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(
            PriorityError {
                priority: 50,
                error: eperm()
            }
            .to_string(),
            "SCHED_FIFO priority 50 refused (Operation not permitted (os error 1)): run as \
             root, grant CAP_SYS_NICE, or set LimitRTPRIO in the service \
             (packaging/systemd/rigd.service)"
        );
        assert_eq!(
            MemoryLockError::LimitTooLow { limit_kb: 8192 }.to_string(),
            "memory not locked: RLIMIT_MEMLOCK is 8192 kB and rigd lacks CAP_IPC_LOCK, so a \
             locked heap could make an allocation fail; set LimitMEMLOCK=infinity in the \
             service (packaging/systemd/rigd.service), or [realtime].lock_memory = false"
        );
        assert_eq!(
            CpuLatencyError::Open {
                error: io::Error::from_raw_os_error(libc::EACCES)
            }
            .to_string(),
            "cannot hold the CPUs awake (/dev/cpu_dma_latency: Permission denied (os error \
             13)): run rigd as root or give its group write access to /dev/cpu_dma_latency \
             (docs/operations.md), or set [realtime].hold_cpus_awake = false"
        );
        assert_eq!(
            WorkerBoostError::Refused {
                worker: "kworker/u8:3".into(),
                error: eperm()
            }
            .to_string(),
            "cannot raise the kernel's tty workers (kworker/u8:3: Operation not permitted (os \
             error 1)): run rigd as root or with CAP_SYS_NICE, or set \
             [realtime].boost_tty_workers = false"
        );
    }

    #[test]
    fn stat_lines_parse_with_odd_names() {
        // A kernel worker (flags include PF_KTHREAD), fields as in proc(5).
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "I".into(); // state
        fields[9 - 3] = (PF_KTHREAD | 0x40).to_string(); // flags
        fields[40 - 3] = "1".into(); // rt_priority
        fields[41 - 3] = "1".into(); // policy: SCHED_FIFO
        let line = format!("123 (kworker/u8:3-events_unbound) {}", fields.join(" "));
        let t = parse_stat(&line).expect("parses");
        assert_eq!(t.comm, "kworker/u8:3-events_unbound");
        assert!(t.kernel_thread && is_unbound_worker(&t));
        assert_eq!((t.policy, t.rt_priority), (libc::SCHED_FIFO, 1));

        // A user thread whose name holds ") (" is cut at the last ')'.
        fields[9 - 3] = "4194560".into(); // no PF_KTHREAD
        fields[41 - 3] = "0".into();
        let line = format!("9 (a) (kworker/u1) {}", fields.join(" "));
        let t = parse_stat(&line).expect("parses");
        assert_eq!(t.comm, "a) (kworker/u1");
        assert!(!t.kernel_thread && !is_unbound_worker(&t));
        assert!(parse_stat("7 (short) S 1").is_none());
    }

    #[test]
    fn this_process_threads_are_found_by_name() {
        let me = std::fs::read_to_string("/proc/thread-self/comm").expect("comm");
        let policy = thread_policy(me.trim()).expect("this thread is listed");
        assert!(policy.starts_with("SCHED_"), "{policy}");
        assert!(thread_policy("no-such-thread-name").is_none());
    }

    #[test]
    fn preemption_model_is_read_from_version_debugfs_or_cmdline() {
        let dynamic = "#1 SMP PREEMPT_DYNAMIC Thu Jan 1";
        assert_eq!(
            preemption_from("#1 SMP PREEMPT_RT x", "", None),
            "PREEMPT_RT"
        );
        assert_eq!(
            preemption_from(dynamic, "", Some("none voluntary (full) lazy\n")),
            "dynamic: full"
        );
        assert_eq!(
            preemption_from(dynamic, "quiet preempt=none", None),
            "dynamic: none (boot parameter)"
        );
        assert_eq!(
            preemption_from(dynamic, "quiet", None),
            "dynamic (mode not readable)"
        );
        assert_eq!(preemption_from("#1 SMP PREEMPT Thu", "", None), "full");
        assert_eq!(preemption_from("#1 SMP Thu", "", None), "voluntary or none");
    }

    /// Root (or the privileges) present, else skip unless CI demands them.
    fn privileged(what: &str) -> bool {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            assert!(
                std::env::var_os("RIG_REQUIRE_ROOT").is_none(),
                "{what} needs root and RIG_REQUIRE_ROOT is set"
            );
            eprintln!("skipped: {what} needs root");
        }
        root
    }

    fn read_cpu_latency() -> i32 {
        let bytes = std::fs::read(CPU_DMA_LATENCY).expect("read the PM QoS value");
        i32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes"))
    }

    #[test]
    fn the_cpu_latency_request_lasts_as_long_as_the_hold() {
        if !privileged("holding /dev/cpu_dma_latency") {
            return;
        }
        let hold = CpuLatencyHold::hold(0).expect("hold");
        assert_eq!(hold.max_us(), 0);
        assert_eq!(read_cpu_latency(), 0, "the kernel's aggregate is our 0 µs");
        drop(hold);
        // Another program may hold its own request; ours at least is gone
        // unless someone else asks for 0 too.
        let after = read_cpu_latency();
        eprintln!("PM QoS CPU latency after the hold: {after} µs");
    }

    #[test]
    fn unbound_workers_are_raised_and_given_back() {
        if !privileged("raising kernel workers") {
            return;
        }
        let fifo_workers = || -> Vec<i32> {
            std::fs::read_dir("/proc")
                .expect("/proc")
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| {
                    read_sched(pid).is_some_and(|t| {
                        is_unbound_worker(&t)
                            && t.policy == libc::SCHED_FIFO
                            && t.rt_priority == WORKER_PRIORITY
                    })
                })
                .collect()
        };
        let before = fifo_workers();
        let boost = WorkerBoost::start();
        assert!(boost.refused().is_none(), "{:?}", boost.refused());
        assert!(boost.raised() > 0, "a Linux system has unbound workers");
        let during = fifo_workers();
        for pid in &boost.raised {
            assert!(during.contains(pid), "worker {pid} raised");
        }
        let raised = boost.raised.clone();
        drop(boost);
        let after = fifo_workers();
        for pid in raised {
            assert!(!after.contains(&pid), "worker {pid} given back");
        }
        eprintln!("workers at FIFO 1: before {before:?}, after {after:?}");
    }
}
