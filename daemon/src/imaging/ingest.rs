//! The ingest thread: reads frames from the shared-memory ring, stamps them on
//! the rig clock ([`super::timing`]), and writes `frames.tsv`, the optional raw
//! `frames.npy` and, at the end, `mean_image.npy` into the session folder
//! (`frames.npy`, `f.npy` and `dff.npy` roll into chunk files together, at
//! the same frame, see [`session_format::ChunkClock`]). It
//! runs on its own thread, apart from the serial latency path and the storage
//! thread, and never makes the producer wait.
//!
//! Structure: [`Ingest`] owns the thread; `run` drives an `IngestLoop`, whose
//! methods are the steps of one turn (attach to the ring, poll it once, handle
//! a frame or a producer state change, write the rows whose stamps are known,
//! sync) and the finish. The per-frame decisions are small types with no
//! shared memory, clock or file inside, tested on their own: `FrameNumbers`
//! (which frame numbers never arrived), `ProducerWatch` (silent / resumed),
//! `StampQueue` (which `frames.tsv` rows can be written now, and with what
//! time), `MeanImage`, and `write_row`.
//!
//! Errors are handled once: while the session runs, the thread itself logs an
//! error that ends it and records `imaging_stopped` (the lever task goes on
//! without imaging); once a stop was asked for, the error goes back to the
//! caller of [`Ingest::finish`].

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use firmware_bridge::link::host_now_ns;
use firmware_bridge::sync::ClockFit;
use frame_ring::{FrameRingMapping, ShmError};
use protocol::ring::{FrameMeta, PollOutcome, RingError, RingReader};

use super::analysis::{Analysis, AnalysisError};
use super::timing::{Decision, FrameInfo, FrameTimer, MatchEvent, MatchStats, Stamp};
use crate::session::{EventDetail, LiveView, SideStream, StorageMsg};
use session_format::{ChunkClock, ChunkedNpy, EventSource, NpyAppender, NpyDtype, StorageError};

/// Files the ingest thread writes.
pub const FRAMES_TSV: &str = "frames.tsv";
pub const FRAMES_NPY: &str = "frames.npy";
pub const MEAN_IMAGE_NPY: &str = "mean_image.npy";

/// What the ingest needs from the configuration.
#[derive(Debug, Clone)]
pub struct IngestSetup {
    pub shm_name: String,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub ttl_wired: bool,
    pub frame_rate_hz: f64,
    pub raw_frames: bool,
    /// Rig time of session time 0, µs.
    pub t0_us: u64,
    pub session_dir: PathBuf,
    pub fsync_interval: Duration,
    /// `frames.npy`, `f.npy` and `dff.npy` start new chunk files together
    /// each time the session's rig time crosses a multiple of this.
    pub chunk_len: Duration,
    /// Motion correction, ROIs and dF/F; `None` records frames only.
    pub analysis: Option<super::analysis::AnalysisSetup>,
    /// The live preview page, fed with dF/F rows, ROIs and the mean image.
    pub preview: Option<Arc<crate::preview::PreviewState>>,
}

impl IngestSetup {
    /// One frame's shape in `frames.npy` and `mean_image.npy`: C x H x W.
    fn frame_shape(&self) -> [usize; 3] {
        [
            self.channels as usize,
            self.height as usize,
            self.width as usize,
        ]
    }
}

/// Counters the daemon shows (frames, drops) and the imaging QC record:
/// how every `frames.tsv` row was stamped and what the producer got wrong.
/// Relaxed atomics, written by the ingest thread only.
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Frames read from the ring.
    pub frames: AtomicU64,
    /// `dropped = 1` rows (overruns and plausible gaps in the numbering).
    pub dropped: AtomicU64,
    /// Rows by `source`: `ttl` (of which `ttl_by_count` matched by count
    /// between two verified frames), `mapped`, `unmatched`, `none`.
    pub ttl_stamped: AtomicU64,
    pub ttl_by_count: AtomicU64,
    pub mapped_stamped: AtomicU64,
    pub unmatched: AtomicU64,
    pub unstamped: AtomicU64,
    /// Rows whose time would not have been after the previous row's (written
    /// `mapped`/`unmatched` instead); the times written always increase.
    pub stamp_order_violations: AtomicU64,
    /// `frame_offset_found` and `frame_match_lost` events.
    pub offsets_found: AtomicU64,
    pub matches_lost: AtomicU64,
    /// Frames in the ring at attach stamped before the session started
    /// (not part of the session, not recorded).
    pub before_session: AtomicU64,
    /// Producer anomalies by kind, see [`Anomaly`].
    pub anomalies: [AtomicU64; Anomaly::COUNT],
}

impl IngestCounters {
    /// A plain copy, for a QC record.
    pub fn snapshot(&self) -> IngestQc {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IngestQc {
            frames: l(&self.frames),
            dropped: l(&self.dropped),
            ttl: l(&self.ttl_stamped),
            ttl_by_count: l(&self.ttl_by_count),
            mapped: l(&self.mapped_stamped),
            unmatched: l(&self.unmatched),
            unstamped: l(&self.unstamped),
            stamp_order_violations: l(&self.stamp_order_violations),
            offsets_found: l(&self.offsets_found),
            matches_lost: l(&self.matches_lost),
            before_session: l(&self.before_session),
            anomalies: Anomaly::ALL.map(|a| (a.as_str(), l(&self.anomalies[a as usize]))),
        }
    }

    fn add_match_stats(&self, before: &MatchStats, now: &MatchStats) {
        let add = |a: &AtomicU64, x: u64, y: u64| {
            if y > x {
                a.fetch_add(y - x, Ordering::Relaxed);
            }
        };
        add(&self.ttl_stamped, before.ttl, now.ttl);
        add(&self.ttl_by_count, before.ttl_by_count, now.ttl_by_count);
        add(&self.mapped_stamped, before.mapped, now.mapped);
        add(&self.unmatched, before.unmatched, now.unmatched);
        add(&self.unstamped, before.unstamped, now.unstamped);
        add(
            &self.stamp_order_violations,
            before.order_violations,
            now.order_violations,
        );
        add(&self.offsets_found, before.offsets_found, now.offsets_found);
        add(&self.matches_lost, before.matches_lost, now.matches_lost);
    }
}

/// The imaging QC numbers of a session ([`IngestCounters::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestQc {
    pub frames: u64,
    pub dropped: u64,
    pub ttl: u64,
    pub ttl_by_count: u64,
    pub mapped: u64,
    pub unmatched: u64,
    pub unstamped: u64,
    pub stamp_order_violations: u64,
    pub offsets_found: u64,
    pub matches_lost: u64,
    pub before_session: u64,
    /// (kind, count) for every [`Anomaly`].
    pub anomalies: [(&'static str, u64); Anomaly::COUNT],
}

/// `key=value` pairs, for the `imaging_qc` event.
impl fmt::Display for IngestQc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "frames={} dropped={} ttl={} ttl_by_count={} mapped={} unmatched={} none={} \
             stamp_order_violations={} offsets_found={} matches_lost={} before_session={}",
            self.frames,
            self.dropped,
            self.ttl,
            self.ttl_by_count,
            self.mapped,
            self.unmatched,
            self.unstamped,
            self.stamp_order_violations,
            self.offsets_found,
            self.matches_lost,
            self.before_session
        )?;
        for (kind, n) in self.anomalies {
            write!(f, " {kind}={n}")?;
        }
        Ok(())
    }
}

/// Something implausible a producer wrote into the ring. Each is counted and
/// recorded as a `producer_anomaly` event (rate-limited, [`AnomalyLog`]);
/// none stops the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anomaly {
    /// A frame number lower than the previous one (same generation).
    NumberBack,
    /// The previous frame's number again.
    NumberRepeat,
    /// A jump in the numbering larger than the frames the clock allows
    /// since the previous frame: no `dropped` rows are written for it.
    NumberJumpImplausible,
    /// A heartbeat more than 1 s in the reader's future.
    HeartbeatFuture,
    /// A frame's host stamp in the future, not after the previous frame's,
    /// or far older than the ring can hold: the frame has no mapped time.
    StampImplausible,
    /// The ring's index (`write_seq`) jumped further than the clock allows:
    /// no `dropped` rows are written; reading goes on from its newest frame.
    IndexJumpImplausible,
}

impl Anomaly {
    pub const COUNT: usize = 6;
    pub const ALL: [Anomaly; Anomaly::COUNT] = [
        Self::NumberBack,
        Self::NumberRepeat,
        Self::NumberJumpImplausible,
        Self::HeartbeatFuture,
        Self::StampImplausible,
        Self::IndexJumpImplausible,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NumberBack => "number_back",
            Self::NumberRepeat => "number_repeat",
            Self::NumberJumpImplausible => "number_jump_implausible",
            Self::HeartbeatFuture => "heartbeat_future",
            Self::StampImplausible => "stamp_implausible",
            Self::IndexJumpImplausible => "index_jump_implausible",
        }
    }
}

/// Rate limit of the `producer_anomaly` events: the first of each kind at
/// once, then at most one summary per kind every [`ANOMALY_SUMMARY_EVERY`]
/// (value = occurrences since the last event of that kind), and the rest
/// at the finish.
#[derive(Debug, Default, Clone)]
struct AnomalyLog {
    /// Per kind: occurrences not yet in an event, and when the last event was.
    unreported: [u64; Anomaly::COUNT],
    last_event: [Option<Instant>; Anomaly::COUNT],
}

/// Summaries of one anomaly kind at most this often.
const ANOMALY_SUMMARY_EVERY: Duration = Duration::from_secs(10);

impl AnomalyLog {
    /// One occurrence at `now`: Some(count to report) if an event is due.
    fn occurred(&mut self, a: Anomaly, now: Instant) -> Option<u64> {
        let i = a as usize;
        self.unreported[i] += 1;
        self.due(i, now)
    }

    fn due(&mut self, i: usize, now: Instant) -> Option<u64> {
        let due = self.last_event[i].map_or(true, |t| {
            now.saturating_duration_since(t) >= ANOMALY_SUMMARY_EVERY
        });
        if due && self.unreported[i] > 0 {
            self.last_event[i] = Some(now);
            Some(std::mem::take(&mut self.unreported[i]))
        } else {
            None
        }
    }

    /// Everything not yet reported (at the finish, or periodically).
    fn flush(&mut self, now: Instant, force: bool) -> Vec<(Anomaly, u64)> {
        let mut out = Vec::new();
        for a in Anomaly::ALL {
            let i = a as usize;
            if force {
                if self.unreported[i] > 0 {
                    out.push((a, std::mem::take(&mut self.unreported[i])));
                }
            } else if let Some(n) = self.due(i, now) {
                out.push((a, n));
            }
        }
        out
    }
}

/// Why the ingest stopped. The messages name the file (or thread) and the
/// OS error, with the fix for a full or read-only disk.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// `frames.tsv`, `frames.npy` or `mean_image.npy` could not be created,
    /// written or synced.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The online analysis failed mid-session (its files, or the motion
    /// reference thread).
    #[error(transparent)]
    Analysis(#[from] AnalysisError),
    /// A bug: the thread panicked (its message went to stderr).
    #[error("the imaging thread panicked")]
    Panicked,
}

/// The disk under the data root cannot take the raw frames.
#[derive(Debug, thiserror::Error)]
pub enum DiskRateError {
    #[error("cannot write a test file in {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the disk under {} wrote {:.1} MB/s, but [storage].raw_frames needs {:.1} MB/s (with a \
         2x margin {:.1} MB/s): use a faster disk or set raw_frames = false",
        dir.display(),
        measured_bytes_per_s / 1e6,
        needed_bytes_per_s / 1e6,
        2.0 * needed_bytes_per_s / 1e6
    )]
    TooSlow {
        dir: PathBuf,
        measured_bytes_per_s: f64,
        needed_bytes_per_s: f64,
    },
}

/// For the control reply, which carries a message.
impl From<DiskRateError> for String {
    fn from(e: DiskRateError) -> Self {
        e.to_string()
    }
}

/// A running ingest; [`Ingest::finish`] stops it and closes its files.
#[derive(Debug)]
pub struct Ingest {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), IngestError>>>,
    pub counters: Arc<IngestCounters>,
}

impl Ingest {
    /// Start ingesting into `setup.session_dir`. `edges` brings the device's
    /// frame-clock edges `(count, rig µs)`; events for `events.tsv` go to the
    /// session's storage queue.
    pub fn start(
        setup: IngestSetup,
        edges: Receiver<(u64, u64)>,
        live: LiveView,
        notices: crossbeam_channel::Sender<StorageMsg>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(IngestCounters::default());
        let (s, c) = (stop.clone(), counters.clone());
        let handle = std::thread::Builder::new()
            .name("rig-imaging".into())
            .spawn(move || {
                let session = SessionTap {
                    live: &live,
                    notices: &notices,
                };
                match run(&setup, &edges, &session, &s, &c) {
                    // Nobody waits for the thread yet: say so now, in the
                    // log and the session, not only when the session ends;
                    // the lever task goes on without imaging.
                    Err(e) if !s.load(Ordering::SeqCst) => {
                        tracing::error!("imaging stopped: {e}");
                        session.notice("imaging_stopped", 0.0, e.to_string());
                        Ok(())
                    }
                    // Stopping: the caller of `finish` reports it.
                    result => result,
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
            counters,
        })
    }

    /// Stop, stamp what is pending, close the files. An error that ended
    /// the thread earlier was reported then and is not returned again.
    pub fn finish(mut self) -> Result<(), IngestError> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    fn join(&mut self) -> Result<(), IngestError> {
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(IngestError::Panicked),
            None => Ok(()),
        }
    }
}

impl SideStream for Ingest {
    fn error_event_kind(&self) -> &'static str {
        "imaging_error"
    }

    fn finish(self: Box<Self>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ingest::finish(*self).map_err(Into::into)
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Dropped without `finish`: nobody else will report the error.
        if let Err(e) = self.join() {
            tracing::error!("imaging: {e}");
        }
    }
}

/// Frames held for their stamp at most (minutes at imaging rates; a frame
/// waits at most a fraction of a second for its edge). Past this the oldest
/// is written without a time, so a session with no clock fit cannot grow
/// memory without bound.
const MAX_PENDING_FRAMES: usize = 4096;

/// Rows written for one gap in the frame numbers at most, so a producer
/// whose numbering jumps by billions cannot stall the ingest.
const MAX_DROPPED_ROWS: usize = 100_000;

/// No frame and no heartbeat for this long: the producer is silent.
const PRODUCER_SILENT: Duration = Duration::from_secs(2);

/// The live preview gets the mean image on the first frame and every this
/// many frames after it.
const PREVIEW_MEAN_EVERY: u64 = 150;
/// `mean_image.npy` is rewritten (atomically) after this much imaging, s,
/// so a session that crashes keeps a mean image of all but its last minute.
const MEAN_IMAGE_WRITE_EVERY_S: f64 = 60.0;

/// Wait before trying to attach again after the ring could not be opened.
const REOPEN_AFTER_FAILURE: Duration = Duration::from_millis(500);

/// Wait before attaching again after a reader error (a re-created ring).
const REOPEN_AFTER_ERROR: Duration = Duration::from_millis(200);

/// Sleep of a turn in which the ring had nothing.
const IDLE_SLEEP: Duration = Duration::from_millis(1);

// ---- Per-frame decisions: no shared memory, clock or file inside ---------------

/// The producer's frame numbers as the ingest saw them: which never arrived,
/// and which were implausible.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FrameNumbers {
    /// The last frame number read (or counted as lost), if any since the
    /// producer (re)started.
    last: Option<u64>,
    /// The last number, if it was implausible (back or a jump): numbering
    /// goes on from it only if the next frame follows it.
    stray: Option<u64>,
}

/// What a frame's number says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NumberCheck {
    /// The next number (or the first).
    Next,
    /// Numbers skipped before it (the producer fell behind, or a copy was
    /// torn): `dropped` rows.
    Gap(Range<u64>),
    /// Lower than the last.
    Back,
    /// The last number again.
    Repeat,
    /// More numbers skipped than the clock allows: no rows for them.
    Jump { skipped: u64 },
}

impl FrameNumbers {
    /// Frame `number` was read; `max_gap`: the most frames that can have
    /// been skipped since the last one (what the frame clock allows). An
    /// implausible number (back, or a jump) does not move the numbering,
    /// unless the next frame follows it (the producer renumbered).
    fn frame(&mut self, number: u64, max_gap: u64) -> NumberCheck {
        let Some(last) = self.last else {
            self.last = Some(number);
            return NumberCheck::Next;
        };
        if let Some(s) = self.stray.take() {
            if s.checked_add(1) == Some(number) {
                self.last = Some(number);
                return NumberCheck::Next;
            }
        }
        if number == last {
            return NumberCheck::Repeat;
        }
        if number < last {
            self.stray = Some(number);
            return NumberCheck::Back;
        }
        // number > last, so neither can overflow.
        let skipped = number - last - 1;
        if skipped > max_gap {
            self.stray = Some(number);
            return NumberCheck::Jump { skipped };
        }
        self.last = Some(number);
        if skipped == 0 {
            NumberCheck::Next
        } else {
            NumberCheck::Gap(last + 1..number)
        }
    }

    /// The reader was lapped and lost `skipped` frames after the last one
    /// read: their numbers.
    fn overrun(&mut self, skipped: u64) -> Range<u64> {
        let first = self.last.map_or(0, |n| n.saturating_add(1));
        if let Some(n) = self.last.as_mut() {
            *n = n.saturating_add(skipped);
        }
        self.stray = None;
        first..first.saturating_add(skipped)
    }

    /// A new generation numbers its frames afresh.
    fn restart(&mut self) {
        *self = Self::default();
    }
}

/// Whether the producer went silent, for `producer_stale` and
/// `producer_resumed`, judged by the reader's own clock: no frame and no
/// change of the heartbeat for [`PRODUCER_SILENT`] (so a heartbeat stamped
/// in the future cannot keep a dead producer alive).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ProducerWatch {
    /// The last activity before a reported silence (while it lasts).
    silent_since: Option<Instant>,
    /// The last frame or heartbeat change seen.
    last_activity: Option<Instant>,
    last_heartbeat_ns: u64,
}

impl ProducerWatch {
    /// Attached to a ring: it counts as activity.
    fn attached(&mut self, heartbeat_ns: u64, now: Instant) {
        self.last_heartbeat_ns = heartbeat_ns;
        self.last_activity = Some(now);
    }

    /// The ring had nothing new; its heartbeat reads `heartbeat_ns`. True
    /// when this starts a silence (report it once).
    fn nothing_new(&mut self, heartbeat_ns: u64, now: Instant) -> bool {
        if heartbeat_ns != self.last_heartbeat_ns {
            self.last_heartbeat_ns = heartbeat_ns;
            self.last_activity = Some(now);
        }
        let Some(last) = self.last_activity else {
            self.last_activity = Some(now);
            return false;
        };
        if self.silent_since.is_some() || now.saturating_duration_since(last) <= PRODUCER_SILENT {
            return false;
        }
        // The silence began at the last activity before it.
        self.silent_since = Some(last);
        true
    }

    /// A frame arrived. After a reported silence: about how many seconds
    /// passed without frames (from the last activity before the silence; a
    /// heartbeat that came back before the frames does not shorten it).
    fn frame(&mut self, now: Instant) -> Option<f64> {
        self.last_activity = Some(now);
        let began = self.silent_since.take()?;
        Some(now.saturating_duration_since(began).as_secs_f64())
    }
}

/// Whether a producer's host stamp can be true: not more than
/// [`STAMP_FUTURE_NS`] in the reader's future, after the previous frame's
/// stamp, and not older than `max_age_ns`.
fn stamp_plausible(host_ns: u64, prev_ns: Option<u64>, now_ns: u64, max_age_ns: u64) -> bool {
    host_ns <= now_ns.saturating_add(STAMP_FUTURE_NS)
        && prev_ns.map_or(true, |p| host_ns > p)
        && now_ns.saturating_sub(host_ns) <= max_age_ns
}

/// A stamp (or heartbeat) this far in the reader's future is implausible.
const STAMP_FUTURE_NS: u64 = 1_000_000_000;

/// Frames the clock allows to be skipped between two frames read
/// `elapsed_us` apart (of rig or host time, whichever is longer), with a
/// margin and the frames a ring of `slots` may have held.
fn max_gap(elapsed_us: f64, period_us: f64, slots: u64) -> u64 {
    let frames = (elapsed_us.max(0.0) / period_us.max(1.0) * 1.5).ceil();
    let frames = if frames.is_finite() && frames < 1e15 {
        frames as u64
    } else {
        u64::MAX / 4
    };
    frames.saturating_add(slots).saturating_add(16)
}

/// The rig time of a frame, µs, which picks its chunk: its mapped host
/// stamp, or the rig's latest sample time before a clock fit exists.
fn frame_rig_us(mapped_us: Option<f64>, rig_now_us: u64) -> u64 {
    mapped_us.map_or(rig_now_us, |m| m.max(0.0) as u64)
}

/// One `frames.tsv` row waiting for its stamp (or a dropped frame waiting
/// for its turn, to keep the rows in order).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    /// The frame's index in the ring's generation (0 for a dropped frame).
    index: u64,
    frame_number: u64,
    dropped: bool,
}

/// The time a `frames.tsv` row gets.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowTime {
    /// A dropped frame: no time, no source.
    Dropped,
    Stamped(Stamp),
    /// The TTL is wired but the frame could not be matched to its edge, and
    /// it has no mapped time after the previous row's (or none plausible):
    /// no time, source `unmatched`.
    Unmatched,
    /// No clock fit in time (or the session stopped first): no time,
    /// source `none`.
    Unstamped,
}

/// The `frames.tsv` rows not yet written, in frame order; the frames among
/// them wait in the [`FrameTimer`] too, in the same order.
#[derive(Debug, Default)]
struct StampQueue {
    pending: VecDeque<Pending>,
}

impl StampQueue {
    fn push_frame(&mut self, timer: &mut FrameTimer, meta: &FrameMeta, info: FrameInfo) {
        self.pending.push_back(Pending {
            index: meta.index,
            frame_number: meta.frame_number,
            dropped: false,
        });
        timer.push(info);
    }

    fn push_dropped(&mut self, frame_number: u64) {
        self.pending.push_back(Pending {
            index: 0,
            frame_number,
            dropped: true,
        });
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The oldest row, if it can be written now (rig time `now_us`): a
    /// dropped frame, a decided one, or, when `stopping` or past
    /// [`MAX_PENDING_FRAMES`], one forced out of the timer.
    /// `None`: the oldest frame waits, and so do the rows after it.
    fn next_ready(
        &mut self,
        timer: &mut FrameTimer,
        fit: Option<&ClockFit>,
        now_us: f64,
        stopping: bool,
    ) -> Option<(Pending, RowTime)> {
        let p = *self.pending.front()?;
        let time = if p.dropped {
            RowTime::Dropped
        } else {
            let force = stopping || self.pending.len() > MAX_PENDING_FRAMES;
            match timer.next(fit, now_us, force) {
                Decision::Stamped(s) => RowTime::Stamped(s),
                Decision::Unmatched => RowTime::Unmatched,
                Decision::Unstamped => RowTime::Unstamped,
                Decision::Wait => return None,
            }
        };
        self.pending.pop_front();
        Some((p, time))
    }
}

/// Session time in seconds with 6 decimals, or nothing.
struct SessionSeconds(Option<f64>);

impl fmt::Display for SessionSeconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(t_s) => write!(f, "{t_s:.6}"),
            None => Ok(()),
        }
    }
}

/// One `frames.tsv` row: `index frame t_s source dropped`, the time in
/// session seconds (session time 0 is rig time `t0_us`).
fn write_row(out: &mut impl Write, p: &Pending, time: RowTime, t0_us: u64) -> std::io::Result<()> {
    let (t_us, source) = match time {
        RowTime::Dropped => (None, ""),
        RowTime::Stamped(s) => (Some(s.t_us), s.source.as_str()),
        RowTime::Unmatched => (None, "unmatched"),
        RowTime::Unstamped => (None, "none"),
    };
    let t_s = SessionSeconds(t_us.map(|t| (t - t0_us as f64) / 1e6));
    writeln!(
        out,
        "{}\t{}\t{t_s}\t{source}\t{}",
        p.index,
        p.frame_number,
        u8::from(p.dropped)
    )
}

/// The running sum of every frame, for `mean_image.npy` and the preview.
#[derive(Debug, Clone, PartialEq)]
struct MeanImage {
    sum: Vec<f64>,
    frames: u64,
}

impl MeanImage {
    fn new(pixels: usize) -> Self {
        Self {
            sum: vec![0.0; pixels],
            frames: 0,
        }
    }

    fn add(&mut self, frame: &[u16]) {
        for (s, &p) in self.sum.iter_mut().zip(frame) {
            *s += f64::from(p);
        }
        self.frames += 1;
    }

    /// Time to rewrite `mean_image.npy`: every `every` frames.
    fn write_due(&self, every: u64) -> bool {
        self.frames % every.max(1) == 0
    }

    /// Time to show the preview the mean image: the first frame, then
    /// every [`PREVIEW_MEAN_EVERY`].
    fn preview_due(&self) -> bool {
        self.frames % PREVIEW_MEAN_EVERY == 1
    }

    /// The mean of the first `pixels` pixels (one channel's plane, or all);
    /// `None` before the first frame.
    fn mean(&self, pixels: usize) -> Option<Vec<f32>> {
        if self.frames == 0 {
            return None;
        }
        let n = self.frames as f64;
        Some(self.sum[..pixels].iter().map(|s| (s / n) as f32).collect())
    }
}

// ---- The ingest thread ----------------------------------------------------------

/// The running session as the ingest sees it: the rig's live status and the
/// storage queue that takes the ingest's events for `events.tsv`.
struct SessionTap<'a> {
    live: &'a LiveView,
    notices: &'a crossbeam_channel::Sender<StorageMsg>,
}

impl SessionTap<'_> {
    /// The clock fit (host to rig) and the rig's latest sample time, µs.
    fn live(&self) -> (Option<ClockFit>, u64) {
        (self.live.clock.get(), self.live.status.rig_now_us())
    }

    /// An event (source `daemon`) for `events.tsv`; never blocks: when the
    /// storage queue is full it is dropped and counted.
    fn notice(&self, kind: &'static str, value: f64, detail: String) {
        let t_us = self.live.status.rig_now_us();
        let sent = self.notices.try_send(StorageMsg::Event {
            t_us,
            source: EventSource::Daemon,
            kind,
            value,
            detail: EventDetail::Text(detail),
        });
        if let Err(crossbeam_channel::TrySendError::Full(_)) = sent {
            crate::metrics::global().storage_dropped.inc();
        }
    }
}

/// The files of the frames: `frames.tsv`, the optional raw `frames.npy`,
/// the analysis's arrays, and the one chunk clock that rolls them together.
struct FrameFiles {
    tsv: std::io::BufWriter<std::fs::File>,
    tsv_file: std::fs::File,
    tsv_path: PathBuf,
    raw: Option<ChunkedNpy>,
    analysis: Option<Analysis>,
    /// One roll decision for every imaging array, so they change chunk on
    /// the same frame.
    chunks: ChunkClock,
    last_sync: Instant,
}

impl FrameFiles {
    fn create(setup: &IngestSetup) -> Result<Self, IngestError> {
        let tsv_path = setup.session_dir.join(FRAMES_TSV);
        let io = |action, e| StorageError::Io {
            action,
            path: tsv_path.clone(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&tsv_path)
            .map_err(|e| io("create", e))?;
        let tsv_file = file.try_clone().map_err(|e| io("open", e))?;
        let mut tsv = std::io::BufWriter::new(file);
        writeln!(tsv, "index\tframe\tt_s\tsource\tdropped").map_err(|e| io("write", e))?;
        let raw = if setup.raw_frames {
            let shape = setup.frame_shape();
            Some(ChunkedNpy::create(
                &setup.session_dir,
                FRAMES_NPY,
                NpyDtype::U2,
                &shape,
            )?)
        } else {
            None
        };
        Ok(Self {
            tsv,
            tsv_file,
            tsv_path,
            raw,
            analysis: None,
            chunks: ChunkClock::new(setup.chunk_len),
            last_sync: Instant::now(),
        })
    }

    fn tsv_error(&self, action: &'static str, source: std::io::Error) -> IngestError {
        IngestError::Storage(StorageError::Io {
            action,
            path: self.tsv_path.clone(),
            source,
        })
    }

    fn row(&mut self, p: &Pending, time: RowTime, t0_us: u64) -> Result<(), IngestError> {
        write_row(&mut self.tsv, p, time, t0_us).map_err(|e| self.tsv_error("write", e))
    }

    /// The next frame's rows (pixels, F, dF/F) are at session time `t_us`:
    /// roll every imaging array here if that crosses a chunk boundary.
    fn at_frame(&mut self, t_us: u64) -> Result<(), IngestError> {
        if !self.chunks.crosses(t_us) {
            return Ok(());
        }
        if let Some(r) = self.raw.as_mut() {
            r.roll()?;
        }
        if let Some(a) = self.analysis.as_mut() {
            a.roll()?;
        }
        Ok(())
    }

    /// [`Self::sync`] once `interval` has passed since the last one.
    fn sync_if_due(&mut self, interval: Duration) -> Result<(), IngestError> {
        if self.last_sync.elapsed() >= interval {
            self.sync()?;
        }
        Ok(())
    }

    /// Make every row so far durable (and loadable, for the arrays).
    fn sync(&mut self) -> Result<(), IngestError> {
        self.tsv.flush().map_err(|e| self.tsv_error("write", e))?;
        self.tsv_file
            .sync_data()
            .map_err(|e| self.tsv_error("fsync", e))?;
        if let Some(r) = self.raw.as_mut() {
            r.sync()?;
        }
        if let Some(a) = self.analysis.as_mut() {
            a.sync()?;
        }
        self.last_sync = Instant::now();
        Ok(())
    }
}

/// The shared-memory ring, once attached, and when to try again when not.
struct RingAttachment {
    mapping: Option<FrameRingMapping>,
    reader: Option<RingReader>,
    /// The last reason the ring could not be opened, so that a producer that
    /// stays away is reported once, not every half second.
    last_error: String,
    next_try: Instant,
}

fn open_ring(setup: &IngestSetup) -> Result<FrameRingMapping, ShmError> {
    let m = FrameRingMapping::open(&setup.shm_name)?;
    m.check_geometry(setup.width, setup.height, setup.channels)?;
    Ok(m)
}

/// Start the online analysis; if it cannot start, frames are still
/// recorded and the reason is reported here.
fn start_analysis(setup: &IngestSetup, session: &SessionTap<'_>) -> Option<Analysis> {
    let analysis_setup = setup.analysis.as_ref()?;
    match Analysis::create(analysis_setup, &setup.session_dir) {
        Ok(analysis) => {
            if let Some(p) = &setup.preview {
                let rois = &analysis.rois().rois;
                let outlines = rois.iter().map(|r| r.outline.clone()).collect();
                let kinds = rois
                    .iter()
                    .map(|r| format!("{:?}", r.kind).to_lowercase())
                    .collect();
                p.set_rois(outlines, kinds);
            }
            Some(analysis)
        }
        Err(e) => {
            tracing::error!("imaging analysis off: {e}");
            session.notice("analysis_unavailable", 0.0, e.to_string());
            None
        }
    }
}

fn run(
    setup: &IngestSetup,
    edges: &Receiver<(u64, u64)>,
    session: &SessionTap<'_>,
    stop: &AtomicBool,
    counters: &IngestCounters,
) -> Result<(), IngestError> {
    let mut ingest = IngestLoop::new(setup, session, counters)?;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while let Ok((count, t_us)) = edges.try_recv() {
            ingest.timer.add_edge(count, t_us);
        }
        if !stopping {
            ingest.attach_if_due();
        }
        let busy = ingest.poll_ring()?;
        ingest.write_ready_rows(stopping)?;
        ingest.files.sync_if_due(setup.fsync_interval)?;
        if stopping && ingest.rows.is_empty() {
            return ingest.finish();
        }
        if !busy {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

/// The ingest thread's state from one turn of its loop to the next.
struct IngestLoop<'a> {
    setup: &'a IngestSetup,
    session: &'a SessionTap<'a>,
    counters: &'a IngestCounters,
    ring: RingAttachment,
    timer: FrameTimer,
    numbers: FrameNumbers,
    producer: ProducerWatch,
    rows: StampQueue,
    files: FrameFiles,
    mean: MeanImage,
    /// Rig time of the last frame read, µs (the chunk of dropped frames).
    last_frame_t_rig: u64,
    /// The rig's latest sample time and the host clock when the first frame
    /// of this producer run was read, and the frames accounted for since
    /// (read, or dropped rows): how many more the clock allows.
    run_start: Option<(u64, Instant)>,
    run_frames: u64,
    /// The frame period the clock bound uses, µs: the configured rate's, or
    /// the ring's nominal rate's if faster (at most 1 kHz).
    budget_period_us: f64,
    /// The last plausible host stamp of this generation, ns.
    last_stamp_ns: Option<u64>,
    /// Host `CLOCK_MONOTONIC` when the ingest started (the session's
    /// start): frames found in the ring at attach stamped before it are not
    /// the session's.
    start_host_ns: u64,
    /// Frames of the ring read at attach (index below this) are checked
    /// against `start_host_ns`.
    backlog_until: u64,
    anomalies: AnomalyLog,
    /// The heartbeat value last reported as in the future.
    future_heartbeat_seen: u64,
    /// The frame just read, C x H x W.
    pixels: Vec<u16>,
}

impl<'a> IngestLoop<'a> {
    fn new(
        setup: &'a IngestSetup,
        session: &'a SessionTap<'a>,
        counters: &'a IngestCounters,
    ) -> Result<Self, IngestError> {
        let pixels = setup.frame_shape().iter().product();
        let mut files = FrameFiles::create(setup)?;
        files.analysis = start_analysis(setup, session);
        Ok(Self {
            setup,
            session,
            counters,
            ring: RingAttachment {
                mapping: None,
                reader: None,
                last_error: String::new(),
                next_try: Instant::now(),
            },
            timer: FrameTimer::new(setup.ttl_wired, setup.frame_rate_hz),
            numbers: FrameNumbers::default(),
            producer: ProducerWatch::default(),
            rows: StampQueue::default(),
            files,
            mean: MeanImage::new(pixels),
            last_frame_t_rig: 0,
            run_start: None,
            run_frames: 0,
            budget_period_us: 1e6 / setup.frame_rate_hz.clamp(1e-3, 1000.0),
            last_stamp_ns: None,
            start_host_ns: host_now_ns(),
            backlog_until: 0,
            anomalies: AnomalyLog::default(),
            future_heartbeat_seen: 0,
            pixels: vec![0; pixels],
        })
    }

    /// How many frames the clock allows to have been skipped now: what it
    /// allows since the first frame of this producer run, less the frames
    /// accounted for since (so a producer catching up in a burst after a
    /// stall is plausible, a jump by billions is not).
    fn allowed_gap(&self, rig_now_us: u64, now: Instant) -> u64 {
        let slots = self
            .ring
            .reader
            .as_ref()
            .map_or(0, |r| u64::from(r.layout().slot_count()));
        match self.run_start {
            Some((rig_us, at)) => {
                let rig_elapsed = rig_now_us.saturating_sub(rig_us) as f64;
                let host_elapsed = now.saturating_duration_since(at).as_secs_f64() * 1e6;
                max_gap(rig_elapsed.max(host_elapsed), self.budget_period_us, slots)
                    .saturating_sub(self.run_frames)
            }
            // Before the first frame: what the ring can hold.
            None => slots.saturating_add(16),
        }
    }

    /// Count an anomaly and record it (rate-limited).
    fn anomaly(&mut self, a: Anomaly, detail: impl FnOnce() -> String) {
        self.counters.anomalies[a as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.anomalies.occurred(a, Instant::now()) {
            let total = self.counters.anomalies[a as usize].load(Ordering::Relaxed);
            let detail = format!("{}: {} ({total} so far)", a.as_str(), detail());
            tracing::warn!("imaging: producer anomaly {detail}");
            self.session.notice("producer_anomaly", n as f64, detail);
        }
    }

    /// The anomalies counted but not yet recorded: their summaries, when due
    /// (or all of them at the finish).
    fn flush_anomalies(&mut self, force: bool) {
        for (a, n) in self.anomalies.flush(Instant::now(), force) {
            let total = self.counters.anomalies[a as usize].load(Ordering::Relaxed);
            self.session.notice(
                "producer_anomaly",
                n as f64,
                format!(
                    "{}: {n} more since the last report ({total} so far)",
                    a.as_str()
                ),
            );
        }
    }

    /// The matcher's events, for `events.tsv`.
    fn report_match_events(&mut self) {
        for ev in self.timer.take_events() {
            match ev {
                MatchEvent::OffsetFound {
                    offset,
                    frame,
                    mapped_before,
                } => {
                    tracing::info!("imaging: frames matched to frame-clock edges (edge count - frame number = {offset})");
                    self.session.notice(
                        "frame_offset_found",
                        offset as f64,
                        format!(
                            "edge count - frame number = {offset}, verified from frame {frame}; \
                             {mapped_before} earlier rows of this producer run were written \
                             without it (mapped/unmatched) and stay so"
                        ),
                    );
                }
                MatchEvent::MatchLost {
                    offset,
                    found,
                    frame,
                } => {
                    tracing::warn!(
                        "imaging: frame {frame} does not match its frame-clock edge any more"
                    );
                    self.session.notice(
                        "frame_match_lost",
                        found as f64,
                        format!(
                            "frame {frame} is at the edge of offset {found}, not {offset}: \
                             an edge or a frame was lost or added; frames are mapped until \
                             a new offset is verified"
                        ),
                    );
                }
            }
        }
    }

    /// Attach (and re-attach) to the ring when not attached and it is time.
    fn attach_if_due(&mut self) {
        let ring = &mut self.ring;
        if ring.reader.is_some() || Instant::now() < ring.next_try {
            return;
        }
        // A ring that cannot be mapped, or mapped but not read (a header
        // still being written, a layout this reader does not know), is
        // reported once per distinct error and tried again after a pause.
        let opened = open_ring(self.setup).and_then(|mapping| {
            let reader = mapping.reader()?;
            Ok((mapping, reader))
        });
        match opened {
            Ok((mapping, reader)) => {
                let name = &self.setup.shm_name;
                self.session
                    .notice("imaging_attached", 0.0, format!("ring {name}"));
                tracing::info!("imaging: reading frames from {name}");
                // Anyone who can write the ring can forge the microscope's
                // frames: recorded in the session, not refused (the
                // acquisition program's setup is the lab's).
                if let Ok(mode) = mapping.mode() {
                    if mode & 0o002 != 0 {
                        let detail = format!(
                            "ring {name} has mode {mode:04o}: any local user can write frames \
                             into it; create it with mode 0640 or 0660 and a group shared \
                             with rigd (docs/operations.md)"
                        );
                        tracing::warn!("imaging: {detail}");
                        self.session.notice(
                            "imaging_ring_writable_by_others",
                            f64::from(mode),
                            detail,
                        );
                    }
                }
                // Read the frames still in the ring, not only the ones to
                // come: those stamped before the session are skipped by
                // `on_frame`, the rest are the session's.
                let mut reader = reader;
                let published = reader.published();
                reader.seek(published.saturating_sub(u64::from(reader.layout().slot_count())));
                self.backlog_until = published;
                self.producer
                    .attached(reader.heartbeat_ns(), Instant::now());
                ring.reader = Some(reader);
                ring.mapping = Some(mapping);
                ring.last_error.clear();
                self.restart_numbering();
            }
            Err(e) => {
                let e = e.to_string();
                if e != ring.last_error {
                    tracing::warn!("imaging: {e}");
                    self.session.notice("imaging_unavailable", 0.0, e.clone());
                    ring.last_error = e;
                }
                ring.next_try = Instant::now() + REOPEN_AFTER_FAILURE;
            }
        }
    }

    /// Poll the ring once and act on what it had. Returns whether it had
    /// anything (then poll again at once).
    fn poll_ring(&mut self) -> Result<bool, IngestError> {
        let Some(reader) = self.ring.reader.as_mut() else {
            return Ok(false);
        };
        match reader.poll(&mut self.pixels) {
            Ok(PollOutcome::Frame(meta)) => self.on_frame(&meta)?,
            Ok(PollOutcome::Overrun { skipped }) => self.on_overrun(skipped)?,
            Ok(PollOutcome::Torn) => {}
            Ok(PollOutcome::ProducerRestarted { old_gen, new_gen }) => {
                self.on_producer_restarted(old_gen, new_gen);
            }
            Ok(PollOutcome::NothingNew) => {
                self.on_nothing_new();
                return Ok(false);
            }
            Err(e) => {
                self.on_ring_error(&e);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A frame is in `self.pixels`: its rows, files, analysis and preview.
    fn on_frame(&mut self, meta: &FrameMeta) -> Result<(), IngestError> {
        let now_ns = host_now_ns();
        let slots = self
            .ring
            .reader
            .as_ref()
            .map_or(0, |r| u64::from(r.layout().slot_count()));
        // A frame found in the ring at attach from before the session is
        // not the session's (a plausible stamp before the ingest started).
        if meta.index < self.backlog_until
            && meta.host_monotonic_ns < self.start_host_ns
            && self.numbers.last.is_none()
        {
            self.counters.before_session.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Some(silent_s) = self.producer.frame(Instant::now()) {
            self.session.notice(
                "producer_resumed",
                silent_s,
                format!("frames again after about {silent_s:.1} s without any"),
            );
            tracing::info!("imaging: frames again after about {silent_s:.1} s");
        }
        let (fit, rig_now_us) = self.session.live();
        // The host stamp, if it can be true.
        let period_ns = 1e9 / self.setup.frame_rate_hz.max(1e-3);
        let max_age_ns =
            60_000_000_000u64.saturating_add((slots as f64 * period_ns).min(1e15) as u64);
        let host_ns = if stamp_plausible(
            meta.host_monotonic_ns,
            self.last_stamp_ns,
            now_ns,
            max_age_ns,
        ) {
            self.last_stamp_ns = Some(meta.host_monotonic_ns);
            Some(meta.host_monotonic_ns)
        } else {
            let (h, prev) = (meta.host_monotonic_ns, self.last_stamp_ns);
            self.anomaly(Anomaly::StampImplausible, || {
                format!(
                    "frame {} stamped {h} ns (previous frame {prev:?} ns, now {now_ns} ns)",
                    meta.frame_number
                )
            });
            None
        };
        // The frame number, against what the clock allows.
        let now = Instant::now();
        let allowed = self.allowed_gap(rig_now_us, now);
        if self.run_start.is_none() {
            self.run_start = Some((rig_now_us, now));
        }
        self.run_frames = self.run_frames.saturating_add(1);
        let last = self.numbers.last;
        match self.numbers.frame(meta.frame_number, allowed) {
            NumberCheck::Next => {}
            NumberCheck::Gap(missing) => {
                self.run_frames = self.run_frames.saturating_add(missing.end - missing.start);
                self.on_missing(missing)?;
            }
            NumberCheck::Back => self.anomaly(Anomaly::NumberBack, || {
                format!("frame number {} after {last:?}", meta.frame_number)
            }),
            NumberCheck::Repeat => self.anomaly(Anomaly::NumberRepeat, || {
                format!("frame number {} twice", meta.frame_number)
            }),
            NumberCheck::Jump { skipped } => self.anomaly(Anomaly::NumberJumpImplausible, || {
                format!(
                    "frame number {} after {last:?}: {skipped} frames skipped, but the \
                     clock allows at most {allowed}; no dropped rows written for them",
                    meta.frame_number
                )
            }),
        }
        self.counters.frames.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().frames.inc();
        let mapped_us = fit
            .zip(host_ns)
            .map(|(f, h)| f.host_to_rig_us(h))
            .filter(|m| m.is_finite());
        let t_rig = frame_rig_us(mapped_us, rig_now_us);
        self.files
            .at_frame(t_rig.saturating_sub(self.setup.t0_us))?;
        self.last_frame_t_rig = t_rig;
        let info = FrameInfo {
            frame_number: meta.frame_number,
            host_ns,
            arrival_rig_us: rig_now_us,
            stamp_at_arrival: meta.host_stamp_at_arrival,
        };
        self.rows.push_frame(&mut self.timer, meta, info);
        self.mean.add(&self.pixels);
        let every = (MEAN_IMAGE_WRITE_EVERY_S * self.setup.frame_rate_hz).round() as u64;
        if self.mean.write_due(every) {
            self.write_mean_now();
        }
        if let Some(raw) = self.files.raw.as_mut() {
            raw.append(&self.pixels)?;
        }
        self.analyse(meta.frame_number, t_rig)
    }

    /// Motion, ROIs and dF/F of the frame just read, and the preview's share.
    fn analyse(&mut self, frame_number: u64, t_rig: u64) -> Result<(), IngestError> {
        let Some(a) = self.files.analysis.as_mut() else {
            return Ok(());
        };
        let shift = a.frame(frame_number, &self.pixels)?;
        if let Some(p) = &self.setup.preview {
            p.push_dff(t_rig, a.dff_row());
            if let Some(m) = shift {
                p.push_motion(t_rig, m.dx, m.dy, m.peak, m.flagged);
            }
            if self.mean.preview_due() {
                let (w, h) = (self.setup.width, self.setup.height);
                if let Some(mean) = self.mean.mean((w * h) as usize) {
                    p.set_mean_image(w, h, &mean);
                }
            }
        }
        Ok(())
    }

    /// Frame numbers the producer skipped (it fell behind, or a copy was
    /// torn): rows marked dropped, so frames.tsv stays one row per frame of
    /// the acquisition.
    fn on_missing(&mut self, numbers: Range<u64>) -> Result<(), IngestError> {
        let n = numbers.end - numbers.start;
        self.count_dropped(n);
        // They stay in the last frame's chunk, as an overrun's do.
        self.at_last_frame()?;
        self.session.notice(
            "frames_missing",
            n as f64,
            format!(
                "frame numbers {}..={} never arrived",
                numbers.start,
                numbers.end - 1
            ),
        );
        self.push_dropped(numbers)
    }

    /// The reader was lapped: `skipped` frames are lost.
    fn on_overrun(&mut self, skipped: u64) -> Result<(), IngestError> {
        let (_, rig_now_us) = self.session.live();
        let allowed = self.allowed_gap(rig_now_us, Instant::now());
        if skipped > allowed {
            // The producer's write_seq jumped further than the clock allows:
            // not frames lost, a broken index. Read on from its newest frame.
            if let Some(r) = self.ring.reader.as_mut() {
                let published = r.published();
                r.seek(published.saturating_sub(1));
            }
            self.anomaly(Anomaly::IndexJumpImplausible, || {
                format!(
                    "the ring's index jumped by {skipped} frames, but the clock allows at \
                     most {allowed}; no dropped rows written for them"
                )
            });
            return Ok(());
        }
        self.run_frames = self.run_frames.saturating_add(skipped);
        self.count_dropped(skipped);
        // The lost frames came after the last one read: they stay in its
        // chunk (the next frame read decides).
        self.at_last_frame()?;
        self.session
            .notice("frames_dropped", skipped as f64, "reader overrun".into());
        let lost = self.numbers.overrun(skipped);
        self.push_dropped(lost)
    }

    fn count_dropped(&self, n: u64) {
        self.counters.dropped.fetch_add(n, Ordering::Relaxed);
        crate::metrics::global().frames_dropped.add(n);
    }

    fn at_last_frame(&mut self) -> Result<(), IngestError> {
        let t = self.last_frame_t_rig.saturating_sub(self.setup.t0_us);
        self.files.at_frame(t)
    }

    /// A row for each lost frame (NaN rows in the analysis's arrays).
    fn push_dropped(&mut self, numbers: Range<u64>) -> Result<(), IngestError> {
        for k in numbers.take(MAX_DROPPED_ROWS) {
            self.rows.push_dropped(k);
            if let Some(a) = self.files.analysis.as_mut() {
                a.dropped(k)?;
            }
        }
        Ok(())
    }

    fn on_producer_restarted(&mut self, old_gen: u64, new_gen: u64) {
        self.restart_numbering();
        // A restarted producer's frames from index 0 are all the session's.
        self.backlog_until = 0;
        self.session.notice(
            "producer_restarted",
            0.0,
            format!("generation {old_gen} -> {new_gen}"),
        );
        tracing::warn!("imaging: the frame producer restarted");
    }

    /// A new producer run: numbering, stamps and the edge match start afresh.
    fn restart_numbering(&mut self) {
        self.numbers.restart();
        self.last_stamp_ns = None;
        self.run_start = None;
        self.run_frames = 0;
        let nominal_hz = self
            .ring
            .reader
            .as_ref()
            .and_then(|r| r.header().ok())
            .map_or(0.0, |h| f64::from(h.nominal_frame_rate_mhz) / 1e3);
        let rate_hz = self.setup.frame_rate_hz.max(nominal_hz).clamp(1e-3, 1000.0);
        self.budget_period_us = 1e6 / rate_hz;
        self.timer.restart();
    }

    fn on_nothing_new(&mut self) {
        let Some(heartbeat_ns) = self.ring.reader.as_ref().map(RingReader::heartbeat_ns) else {
            return;
        };
        let now_ns = host_now_ns();
        if heartbeat_ns > now_ns.saturating_add(STAMP_FUTURE_NS)
            && heartbeat_ns != self.future_heartbeat_seen
        {
            self.future_heartbeat_seen = heartbeat_ns;
            self.anomaly(Anomaly::HeartbeatFuture, || {
                format!("heartbeat {heartbeat_ns} ns, now {now_ns} ns")
            });
        }
        if self.producer.nothing_new(heartbeat_ns, Instant::now()) {
            self.session.notice(
                "producer_stale",
                0.0,
                "no frame and no heartbeat for 2 s".into(),
            );
            tracing::warn!("imaging: the frame producer is silent");
        }
    }

    /// The producer re-created the ring with another layout: map it again
    /// (a wrong geometry is reported there).
    fn on_ring_error(&mut self, e: &RingError) {
        self.session.notice("imaging_error", 0.0, e.to_string());
        if let Some(m) = self.ring.mapping.as_mut() {
            let _ = m.reopen_if_needed();
        }
        self.ring.reader = None;
        self.ring.mapping = None;
        self.ring.next_try = Instant::now() + REOPEN_AFTER_ERROR;
    }

    /// Write the `frames.tsv` rows that can be written now, in order.
    fn write_ready_rows(&mut self, stopping: bool) -> Result<(), IngestError> {
        let (fit, rig_now_us) = self.session.live();
        let now_us = if stopping {
            f64::INFINITY
        } else {
            rig_now_us as f64
        };
        let before = self.timer.stats;
        while let Some((row, time)) =
            self.rows
                .next_ready(&mut self.timer, fit.as_ref(), now_us, stopping)
        {
            self.files.row(&row, time, self.setup.t0_us)?;
        }
        self.counters.add_match_stats(&before, &self.timer.stats);
        self.report_match_events();
        self.flush_anomalies(stopping);
        Ok(())
    }

    /// The periodic `mean_image.npy`: a failure is an event and the session
    /// goes on (the stop writes it again).
    fn write_mean_now(&mut self) {
        let Some(mean) = self.mean.mean(self.mean.sum.len()) else {
            return;
        };
        if let Err(e) = write_mean_image(&self.setup.session_dir, &self.setup.frame_shape(), &mean)
        {
            self.session.notice(
                "mean_image_not_written",
                self.mean.frames as f64,
                format!("{e}; it is written again at the stop"),
            );
        }
    }

    /// Every row is written: sync the files and write `mean_image.npy`.
    fn finish(mut self) -> Result<(), IngestError> {
        let qc = self.counters.snapshot();
        self.session
            .notice("imaging_qc", qc.frames as f64, qc.to_string());
        self.files.sync()?;
        let Some(mean) = self.mean.mean(self.mean.sum.len()) else {
            return Ok(());
        };
        write_mean_image(&self.setup.session_dir, &self.setup.frame_shape(), &mean)?;
        Ok(())
    }
}

/// Replace `dir/mean_image.npy` with `mean` atomically: written to
/// `mean_image.npy.tmp`, fsynced, renamed, the folder fsynced. A crash
/// leaves the previous one (and a `.tmp` that recovery removes).
fn write_mean_image(dir: &Path, shape: &[usize], mean: &[f32]) -> Result<(), IngestError> {
    let path = dir.join(MEAN_IMAGE_NPY);
    let tmp = dir.join(format!("{MEAN_IMAGE_NPY}.tmp"));
    let mut npy = NpyAppender::create(&tmp, NpyDtype::F4, shape)?;
    npy.append(mean)?;
    npy.sync()?;
    drop(npy);
    let io = |action: &'static str, p: &Path, source: std::io::Error| {
        IngestError::Storage(StorageError::Io {
            action,
            path: p.to_owned(),
            source,
        })
    };
    std::fs::rename(&tmp, &path).map_err(|e| io("rename into place", &path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync directory", dir, e))?;
    Ok(())
}

/// Check that the disk under `dir` can take `bytes_per_s` with room to spare:
/// write and fsync a few MB and time it. Returns the measured rate.
pub fn check_disk_rate(dir: &Path, bytes_per_s: f64) -> Result<f64, DiskRateError> {
    let path = dir.join(".disk-check.tmp");
    let chunk = vec![0x5Au8; 1 << 20];
    let total = 16usize;
    let start = Instant::now();
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..total {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    })();
    let elapsed = start.elapsed().as_secs_f64().max(1e-6);
    let _ = std::fs::remove_file(&path);
    result.map_err(|source| DiskRateError::Io {
        dir: dir.to_owned(),
        source,
    })?;
    let rate = (total << 20) as f64 / elapsed;
    if rate < 2.0 * bytes_per_s {
        return Err(DiskRateError::TooSlow {
            dir: dir.to_owned(),
            measured_bytes_per_s: rate,
            needed_bytes_per_s: bytes_per_s,
        });
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_too_slow_for_the_stream_is_refused_with_the_numbers() {
        let dir = std::env::temp_dir();
        let rate = check_disk_rate(&dir, 1.0).expect("any disk writes 2 bytes/s");
        assert!(rate > 0.0);
        let e = check_disk_rate(&dir, 1e15)
            .expect_err("no disk writes a petabyte a second")
            .to_string();
        assert!(e.contains("raw_frames") && e.contains("MB/s"), "{e}");
        assert!(
            !dir.join(".disk-check.tmp").exists(),
            "the test file is removed"
        );
        let e = check_disk_rate(Path::new("/nonexistent/rigd"), 1.0).expect_err("no folder");
        assert!(e
            .to_string()
            .starts_with("cannot write a test file in /nonexistent/rigd: "));
    }

    #[test]
    fn frame_numbers_name_the_frames_that_never_arrived_and_the_implausible_ones() {
        let mut n = FrameNumbers::default();
        assert_eq!(
            n.frame(1, 0),
            NumberCheck::Next,
            "the first frame follows nothing"
        );
        assert_eq!(n.frame(2, 0), NumberCheck::Next);
        assert_eq!(n.frame(5, 10), NumberCheck::Gap(3..5));
        // An overrun loses the frames after the last one read.
        assert_eq!(n.overrun(3), 6..9);
        assert_eq!(
            n.frame(9, 10),
            NumberCheck::Next,
            "counted by the overrun already"
        );
        assert_eq!(n.frame(12, 10), NumberCheck::Gap(10..12));
        // A number going back or repeating is no gap, and is named; a
        // stray number does not move the numbering.
        assert_eq!(n.frame(4, 10), NumberCheck::Back);
        assert_eq!(n.frame(13, 10), NumberCheck::Next);
        assert_eq!(n.frame(13, 10), NumberCheck::Repeat);
        // A jump the clock cannot allow writes no rows.
        assert_eq!(
            n.frame(1 << 40, 100),
            NumberCheck::Jump {
                skipped: (1 << 40) - 14
            }
        );
        assert_eq!(n.frame(14, 100), NumberCheck::Next);
        // ... unless the producer goes on from it: it renumbered.
        assert_eq!(n.frame(2, 100), NumberCheck::Back);
        assert_eq!(n.frame(3, 100), NumberCheck::Next);
        assert_eq!(n.frame(4, 100), NumberCheck::Next);
        // A new generation numbers afresh.
        n.restart();
        assert_eq!(n.frame(0, 0), NumberCheck::Next);
        // An overrun before any frame: numbered from 0, nothing to follow.
        let mut n = FrameNumbers::default();
        assert_eq!(n.overrun(4), 0..4);
        assert_eq!(n, FrameNumbers::default());
        // No overflow at the end of the numbering.
        let mut n = FrameNumbers::default();
        assert_eq!(n.frame(u64::MAX, u64::MAX), NumberCheck::Next);
        assert_eq!(n.frame(u64::MAX, u64::MAX), NumberCheck::Repeat);
        assert_eq!(n.frame(0, u64::MAX), NumberCheck::Back);
        assert_eq!(n.frame(u64::MAX, u64::MAX), NumberCheck::Repeat);
        assert_eq!(n.overrun(5), u64::MAX..u64::MAX);
    }

    #[test]
    fn the_frames_a_gap_may_hold_are_bounded_by_the_clock() {
        // 1 s at 28.7 Hz: 43 frames with the margin, plus the ring and 16.
        assert_eq!(max_gap(1e6, 1e6 / 28.7, 57), 44 + 57 + 16);
        assert_eq!(max_gap(0.0, 34_843.0, 0), 16);
        assert_eq!(max_gap(-5.0, 34_843.0, 0), 16);
        assert!(max_gap(f64::INFINITY, 1.0, u64::MAX) == u64::MAX);
    }

    #[test]
    fn the_qc_record_names_every_count() {
        let c = IngestCounters::default();
        c.frames.store(7, Ordering::Relaxed);
        c.anomalies[Anomaly::NumberJumpImplausible as usize].store(2, Ordering::Relaxed);
        let qc = c.snapshot();
        assert_eq!(qc.frames, 7);
        assert_eq!(qc.anomalies[2], ("number_jump_implausible", 2));
        assert_eq!(
            qc.to_string(),
            "frames=7 dropped=0 ttl=0 ttl_by_count=0 mapped=0 unmatched=0 none=0 \
             stamp_order_violations=0 offsets_found=0 matches_lost=0 before_session=0 \
             number_back=0 number_repeat=0 number_jump_implausible=2 heartbeat_future=0 \
             stamp_implausible=0 index_jump_implausible=0"
        );
    }

    #[test]
    fn a_stamp_is_plausible_only_between_the_last_one_and_now() {
        let now = 100_000_000_000;
        assert!(stamp_plausible(
            now - 1_000,
            Some(now - 2_000),
            now,
            60_000_000_000
        ));
        assert!(
            stamp_plausible(now + 999_999_999, None, now, 1),
            "within 1 s of now"
        );
        assert!(
            !stamp_plausible(now + 2_000_000_000, None, now, 1),
            "in the future"
        );
        assert!(!stamp_plausible(u64::MAX, None, now, u64::MAX));
        assert!(
            !stamp_plausible(now - 2_000, Some(now - 2_000), now, u64::MAX),
            "not after"
        );
        assert!(
            !stamp_plausible(now - 3_000, Some(now - 2_000), now, u64::MAX),
            "backwards"
        );
        assert!(
            !stamp_plausible(0, None, now, 60_000_000_000),
            "absurdly old"
        );
    }

    #[test]
    fn anomalies_are_reported_first_then_summarised_not_flooded() {
        let t0 = Instant::now();
        let mut log = AnomalyLog::default();
        assert_eq!(
            log.occurred(Anomaly::NumberBack, t0),
            Some(1),
            "the first at once"
        );
        for i in 0..1000 {
            let t = t0 + Duration::from_millis(i);
            assert_eq!(log.occurred(Anomaly::NumberBack, t), None);
        }
        assert_eq!(
            log.occurred(Anomaly::NumberRepeat, t0),
            Some(1),
            "kinds are limited apart"
        );
        assert_eq!(log.flush(t0 + Duration::from_secs(5), false), vec![]);
        assert_eq!(
            log.flush(t0 + Duration::from_secs(10), false),
            vec![(Anomaly::NumberBack, 1000)]
        );
        log.occurred(Anomaly::StampImplausible, t0 + Duration::from_secs(10));
        log.occurred(Anomaly::StampImplausible, t0 + Duration::from_secs(11));
        assert_eq!(
            log.flush(t0 + Duration::from_secs(12), true),
            vec![(Anomaly::StampImplausible, 1)],
            "the rest at the finish"
        );
    }

    #[test]
    fn a_silence_is_judged_by_the_readers_clock_not_the_heartbeats_value() {
        let t0 = Instant::now();
        let s = |x: u64| t0 + Duration::from_millis(x);
        let mut w = ProducerWatch::default();
        w.attached(5, t0);
        assert_eq!(w.frame(s(10)), None);
        assert!(!w.nothing_new(5, s(1000)));
        // A heartbeat that changes is life; one stuck (even far in the
        // future) is not.
        assert!(!w.nothing_new(u64::MAX, s(1900)));
        assert!(!w.nothing_new(u64::MAX, s(3800)));
        assert!(w.nothing_new(u64::MAX, s(3901)), "2 s without change");
        assert!(!w.nothing_new(u64::MAX, s(5000)), "reported once");
        let silent = w.frame(s(6900)).expect("resumed");
        assert!((silent - 5.0).abs() < 1e-9, "{silent}");
        assert_eq!(w.frame(s(7000)), None);
        // A producer woken from a stall beats before its first frame: the
        // silence still counts from its last activity before the stall.
        assert!(w.nothing_new(u64::MAX, s(9100)), "silent again");
        assert!(!w.nothing_new(7, s(11_000)), "a heartbeat again");
        let silent = w.frame(s(11_010)).expect("resumed");
        assert!((silent - 4.01).abs() < 1e-9, "{silent}");
    }

    #[test]
    fn a_frame_is_chunked_by_its_mapped_time_or_the_rig_time() {
        assert_eq!(frame_rig_us(Some(1234.9), 99), 1234);
        assert_eq!(frame_rig_us(Some(-5.0), 99), 0);
        assert_eq!(frame_rig_us(None, 99), 99);
    }

    fn meta(index: u64, frame_number: u64) -> FrameMeta {
        FrameMeta {
            index,
            frame_number,
            host_monotonic_ns: 0,
            hw_timestamp_ns: None,
            host_stamp_at_arrival: false,
        }
    }

    fn fit() -> ClockFit {
        // Host µs = rig µs.
        ClockFit {
            host_ref_us: 0.0,
            rig_ref_us: 0.0,
            drift_ppm: 0.0,
            half_band_us: 50.0,
            exchanges: 100,
            min_rtt_us: 100.0,
        }
    }

    fn push(
        q: &mut StampQueue,
        timer: &mut FrameTimer,
        index: u64,
        number: u64,
        host_us: Option<u64>,
    ) {
        let info = FrameInfo {
            frame_number: number,
            host_ns: host_us.map(|h| h * 1000),
            arrival_rig_us: 0,
            stamp_at_arrival: false,
        };
        q.push_frame(timer, &meta(index, number), info);
    }

    fn drain(
        q: &mut StampQueue,
        timer: &mut FrameTimer,
        fit: Option<&ClockFit>,
        now_us: f64,
        stop: bool,
    ) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((p, time)) = q.next_ready(timer, fit, now_us, stop) {
            write_row(&mut out, &p, time, 1_000_000).expect("to memory");
        }
        String::from_utf8(out)
            .expect("text")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn rows_are_written_in_frame_order_once_their_stamp_is_known() {
        let mut timer = FrameTimer::new(false, 30.0);
        let mut q = StampQueue::default();
        push(&mut q, &mut timer, 0, 10, Some(1_500_000));
        q.push_dropped(11);
        push(&mut q, &mut timer, 1, 12, Some(1_600_000));
        q.push_dropped(13);
        assert_eq!(
            drain(&mut q, &mut timer, None, 2e6, false),
            Vec::<String>::new(),
            "no clock fit yet: the rows wait"
        );
        assert_eq!(
            drain(&mut q, &mut timer, Some(&fit()), 2e6, false),
            [
                "0\t10\t0.500000\tmapped\t0",
                "0\t11\t\t\t1",
                "1\t12\t0.600000\tmapped\t0",
                "0\t13\t\t\t1"
            ],
        );
        // At the stop nothing waits any more; without a fit: `none`.
        push(&mut q, &mut timer, 2, 14, Some(1_700_000));
        assert_eq!(
            drain(&mut q, &mut timer, None, f64::INFINITY, true),
            ["2\t14\t\tnone\t0"]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn rows_take_the_frame_clock_edge_when_the_ttl_is_wired() {
        let p = 1_000u64;
        let mut timer = FrameTimer::new(true, 1000.0);
        let mut q = StampQueue::default();
        for c in 0..12u64 {
            timer.add_edge(c + 100, 1_000_000 + c * p);
        }
        // Frames 7.. stamped at their edges (100 + k - 7), 40 µs late.
        for k in 0..8u64 {
            push(
                &mut q,
                &mut timer,
                k,
                7 + k,
                Some(1_000_000 + (k + 1) * p + 40),
            );
        }
        let rows = drain(&mut q, &mut timer, Some(&fit()), 1_011_000.0, false);
        assert_eq!(rows.len(), 8, "{rows:?}");
        for (k, r) in rows.iter().enumerate() {
            assert_eq!(
                r,
                &format!("{k}\t{}\t0.00{}000\tttl\t0", 7 + k, k + 1),
                "frame {k}"
            );
        }
    }

    #[test]
    fn frames_without_a_clock_fit_are_not_held_without_bound() {
        let mut timer = FrameTimer::new(false, 30.0);
        let mut q = StampQueue::default();
        for k in 0..MAX_PENDING_FRAMES as u64 + 3 {
            push(&mut q, &mut timer, k, k, Some(k));
        }
        let rows = drain(&mut q, &mut timer, None, 0.0, false);
        assert_eq!(
            rows,
            ["0\t0\t\tnone\t0", "1\t1\t\tnone\t0", "2\t2\t\tnone\t0"]
        );
        assert_eq!(q.pending.len(), MAX_PENDING_FRAMES);
    }

    #[test]
    fn a_row_before_session_time_zero_has_a_negative_time() {
        let p = Pending {
            index: 3,
            frame_number: 4,
            dropped: false,
        };
        let stamp = Stamp {
            t_us: 999_500.0,
            source: super::super::timing::StampSource::Mapped,
        };
        let mut out = Vec::new();
        write_row(&mut out, &p, RowTime::Stamped(stamp), 1_000_000).expect("to memory");
        assert_eq!(out, b"3\t4\t-0.000500\tmapped\t0\n");
        let mut out = Vec::new();
        write_row(&mut out, &p, RowTime::Unmatched, 1_000_000).expect("to memory");
        assert_eq!(out, b"3\t4\t\tunmatched\t0\n");
    }

    #[test]
    fn the_mean_image_averages_every_frame_and_goes_to_the_preview_now_and_then() {
        let mut m = MeanImage::new(4);
        assert_eq!(m.mean(4), None, "no frame, no mean image");
        m.add(&[0, 10, 20, 30]);
        assert!(m.preview_due(), "the first frame");
        m.add(&[2, 10, 21, 65535]);
        assert!(!m.preview_due());
        assert_eq!(m.mean(4), Some(vec![1.0, 10.0, 20.5, 32782.5]));
        assert_eq!(m.mean(2), Some(vec![1.0, 10.0]), "the first channel");
        let due: Vec<u64> = (3..=301)
            .filter(|_| {
                m.add(&[0; 4]);
                m.preview_due()
            })
            .collect();
        assert_eq!(due, [151, 301]);
    }

    #[test]
    fn the_mean_image_is_rewritten_whole_every_minute_of_frames() {
        // 28.7 Hz: every 1722 frames (60 s); the file is replaced atomically
        // and holds the mean of every frame so far.
        let every = (MEAN_IMAGE_WRITE_EVERY_S * 28.7).round() as u64;
        assert_eq!(every, 1722);
        let mut m = MeanImage::new(2);
        let due: Vec<u64> = (1..=3500)
            .filter(|_| {
                m.add(&[4, 8]);
                m.write_due(every)
            })
            .collect();
        assert_eq!(due, [1722, 3444]);
        let dir = std::env::temp_dir().join(format!("rigd-mean-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        write_mean_image(&dir, &[1, 1, 2], &[1.0, 2.0]).expect("first");
        write_mean_image(&dir, &[1, 1, 2], &[3.0, 4.5]).expect("again");
        let path = dir.join(MEAN_IMAGE_NPY);
        let a = session_format::parse_npy(&std::fs::read(&path).expect("read"), &path)
            .expect("a whole NPY file");
        assert_eq!(a.shape, vec![1, 1, 1, 2], "(1, C, H, W)");
        assert!(matches!(a.data, session_format::NpyData::F4(ref v) if v == &[3.0, 4.5]));
        assert!(!dir.join(format!("{MEAN_IMAGE_NPY}.tmp")).exists());
        // A folder that is gone: an error naming the file, nothing written.
        let gone = dir.join("gone");
        let e = write_mean_image(&gone, &[1, 1, 2], &[1.0, 2.0])
            .expect_err("no folder")
            .to_string();
        assert!(e.contains("mean_image.npy"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn frames_tsv_is_never_overwritten_and_the_error_names_it() {
        let dir = std::env::temp_dir().join(format!("rigd-ingest-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(FRAMES_TSV), "earlier\n").expect("write");
        let setup = IngestSetup {
            shm_name: "/rigd-test".into(),
            width: 4,
            height: 2,
            channels: 1,
            ttl_wired: false,
            frame_rate_hz: 30.0,
            raw_frames: false,
            t0_us: 0,
            session_dir: dir.clone(),
            fsync_interval: Duration::from_secs(1),
            chunk_len: Duration::from_secs(3600),
            analysis: None,
            preview: None,
        };
        let e = FrameFiles::create(&setup)
            .err()
            .expect("exists")
            .to_string();
        assert!(
            e.starts_with(&format!(
                "cannot create {}: ",
                dir.join(FRAMES_TSV).display()
            )),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(FRAMES_TSV)).expect("read"),
            "earlier\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
