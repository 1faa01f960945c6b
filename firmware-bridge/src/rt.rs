//! Real-time scheduling for the threads on the latency path.
//!
//! Under CPU load a normal (CFS) thread can wait tens of milliseconds for the
//! CPU, which is the difference between a reward on the press and a reward
//! after it. The link's reader thread therefore asks for `SCHED_FIFO`, which
//! needs root, `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` grant (the systemd unit
//! sets `LimitRTPRIO`). It blocks in `poll`/`read` between frames, so it cannot
//! starve the rest of the machine. Without the privilege the thread stays
//! normal and the caller is told why.

/// Put the calling thread in `SCHED_FIFO` at `priority` (1..=99) and set its
/// timer slack to 1 ns so its timed waits end when asked. Returns why not, if
/// the system refused.
pub fn make_current_thread_realtime(priority: i32) -> Result<(), String> {
    let param = libc::sched_param {
        sched_priority: priority.clamp(1, 99),
    };
    // SAFETY: plain syscalls on the calling thread with a valid parameter
    // struct; no memory is shared with the kernel beyond the call.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
            return Err(format!(
                "SCHED_FIFO priority {priority} refused ({}): run as root, grant CAP_SYS_NICE, or set LimitRTPRIO in the service",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
