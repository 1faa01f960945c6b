//! [`PreviewState`]: what the preview page shows, fed from the daemon's
//! threads. Every `push_*`/`set_*` call does its (small) computation outside
//! the lock and then holds one `Mutex` for a few microseconds; nothing here
//! blocks on I/O or on a browser.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

/// Lever points kept for the page: the last this many microseconds.
pub const LEVER_WINDOW_US: u64 = 10_000_000;
/// Lever points are averaged into bins this long (100 Hz on the page).
pub const LEVER_BIN_US: u64 = 10_000;
/// dF/F rows kept for the page: the last this many microseconds.
pub const DFF_WINDOW_US: u64 = 60_000_000;
/// dF/F frames are averaged into bins this long (10 Hz on the page).
pub const DFF_BIN_US: u64 = 100_000;
/// At most this many ROIs are sent to the page (the first ones).
pub const MAX_ROIS_SENT: usize = 512;
/// Trials kept for the raster.
pub const MAX_TRIALS_KEPT: usize = 2000;
/// The mean image is block-averaged down to at most this many pixels a side.
pub const MAX_IMAGE_SIDE: usize = 256;
/// Lick onsets kept for the page: the last this many microseconds (the
/// lever plot's and heatmap's marks, the cue-aligned lick raster).
pub const LICK_WINDOW_US: u64 = 120_000_000;
/// At most this many lick onsets are kept (a stuck lick sensor cannot make
/// the page's messages large).
pub const MAX_LICKS_KEPT: usize = 2000;
/// Motion shifts are averaged into bins this long (as the dF/F), and the
/// last [`DFF_WINDOW_US`] are kept.
pub const MOTION_BIN_US: u64 = DFF_BIN_US;

/// The rig's health, as shown in the page's health panel.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Health {
    /// Imaging frames received this session.
    pub frames: u64,
    /// Imaging frames dropped this session.
    pub drops: u64,
    /// Link state to the microcontroller, e.g. `"up"`, `"down"`.
    pub link: String,
    /// Width of the host/device clock-fit band, µs.
    pub clock_band_us: f64,
    /// Control latency, median, µs.
    pub latency_p50_us: f64,
    /// Control latency, 99th percentile, µs.
    pub latency_p99_us: f64,
    /// Trials run this session.
    pub trials: u32,
    /// Rewards given this session.
    pub rewards: u32,
    /// Water given this session, µl.
    pub water_ul: f64,
    /// Session id, if a session is running.
    pub session: Option<String>,
}

/// What the page shows about the running session's task, set at its start.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SessionView {
    /// The mouse.
    pub mouse: String,
    /// Rig time of session time 0, µs (the lever's clock).
    pub t0_us: u64,
    /// Press threshold, mm from rest (the lever plot's line).
    pub threshold_mm: f64,
    /// Response window, s (the reaction-time histogram's range).
    pub response_window_s: f64,
    /// Lever travel, mm (the lever plot's fixed range).
    pub lever_travel_mm: f64,
    /// Water cap of the session, µL.
    pub max_water_session_ul: f64,
    /// The day's water cap, µL, and what the mouse had before this session.
    pub max_water_day_ul: f64,
    pub water_before_today_ul: f64,
    /// The day's water target (`safety.daily_water_target_ul`), µL.
    pub daily_water_target_ul: Option<f64>,
    /// Session length cap, s, if any.
    pub max_duration_s: Option<f64>,
    /// Trial cap, if any.
    pub max_trials: Option<u32>,
    /// The field-of-view check at the start, if one was made.
    pub fov_check: Option<protocol::control::FovSummary>,
    /// The imaging reference the session registers against (the mouse's
    /// day-1 mean image), scaled as the mean image is: the page overlays
    /// the two.
    pub reference_image: Option<MeanImage>,
}

/// The task engine's current state (`crate::task::TaskState::as_str`:
/// `waiting`, `iti`, `quiescence`, `response`, `link_down`, `finished`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TaskStateView {
    /// The state's name.
    pub state: &'static str,
    /// Rig time it was entered, µs (the lever's clock).
    pub since_us: u64,
    /// State changes this session.
    pub changes: u64,
}

/// What the rig thread hands the page besides lever samples and trials:
/// lick onsets and the task engine's state changes (see
/// [`PreviewState::try_push_marks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RigMark {
    /// A lick onset (the lick sensor's contact), rig µs.
    Lick(u64),
    /// The task engine entered `state` at `t_us`.
    State {
        /// Rig µs.
        t_us: u64,
        /// `crate::task::TaskState::as_str`.
        state: &'static str,
    },
}

/// One motion bin: the mean rigid shift of the frames in it, as
/// `[t_us, dx_px, dy_px, min_peak, flagged_frames, frames]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MotionBin {
    /// Bin centre, rig µs.
    pub t_us: u64,
    /// Mean x shift, full-resolution pixels.
    pub dx: f32,
    /// Mean y shift, full-resolution pixels.
    pub dy: f32,
    /// Lowest correlation peak of the bin's frames (1 = perfect match).
    pub peak: f32,
    /// Frames whose shift was flagged unreliable.
    pub flagged: u32,
    /// Frames in the bin.
    pub frames: u32,
}

impl Serialize for MotionBin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = |v: f32, k: f64| (f64::from(v) * k).round() / k;
        let mut seq = s.serialize_seq(Some(6))?;
        seq.serialize_element(&self.t_us)?;
        seq.serialize_element(&r(self.dx, 100.0))?;
        seq.serialize_element(&r(self.dy, 100.0))?;
        seq.serialize_element(&r(self.peak, 1000.0))?;
        seq.serialize_element(&self.flagged)?;
        seq.serialize_element(&self.frames)?;
        seq.end()
    }
}

/// Lever-sample and record losses of the running session, read from the
/// rig's live counters when an update is built (nothing on the rig thread).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RigCounters {
    /// Lever samples the device sent that never arrived (index gaps).
    pub samples_lost: u64,
    /// Records the rig thread could not hand to the storage thread (its
    /// ring was full): missing from the session files.
    pub records_dropped: u64,
}

/// One trial as shown in the raster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrialEvent {
    /// Trial number.
    pub trial: u32,
    /// `"rewarded"` or `"miss"` (anything else is shown as given).
    pub outcome: &'static str,
    /// Cue onset, µs, on the same clock as the lever and dF/F timestamps.
    pub t_us: u64,
    /// Cue-to-press reaction time, s (the reward tick is drawn at
    /// `t_us + reaction_s`), if the mouse pressed.
    pub reaction_s: Option<f32>,
}

/// The mean image, scaled to 8 bits (and block-averaged to at most
/// [`MAX_IMAGE_SIDE`] a side).
#[derive(Debug, Clone, PartialEq)]
pub struct MeanImage {
    /// Width of the original image, px (ROI outlines are in these pixels).
    pub src_w: u32,
    /// Height of the original image, px.
    pub src_h: u32,
    /// Width of `pixels`.
    pub w: u32,
    /// Height of `pixels`.
    pub h: u32,
    /// Row-major 8-bit pixels, `w * h` of them.
    pub pixels: Vec<u8>,
}

impl Serialize for MeanImage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(self.pixels.len() * 2);
        for &p in &self.pixels {
            hex.push(char::from(HEX[usize::from(p >> 4)]));
            hex.push(char::from(HEX[usize::from(p & 15)]));
        }
        let mut st = s.serialize_struct("MeanImage", 5)?;
        st.serialize_field("src_w", &self.src_w)?;
        st.serialize_field("src_h", &self.src_h)?;
        st.serialize_field("w", &self.w)?;
        st.serialize_field("h", &self.h)?;
        st.serialize_field("hex", &hex)?;
        st.end()
    }
}

/// ROI outlines and kinds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rois {
    /// Number of ROIs in the session.
    pub n: usize,
    /// Outline polygons (contours, vertices at pixel corners of the original
    /// image: `x` in `0..=width`), at most [`MAX_ROIS_SENT`].
    pub outlines: Vec<Vec<(u16, u16)>>,
    /// Kinds (`"excitatory"`, `"inhibitory"`, `""`...), one per outline.
    pub kinds: Vec<String>,
}

/// A dF/F row: one time bin, one value per ROI sent (`null` if not finite).
#[derive(Debug, Clone, PartialEq)]
pub struct DffRow(pub Arc<Vec<f32>>);

impl Serialize for DffRow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for &v in self.0.iter() {
            if v.is_finite() {
                seq.serialize_element(&Some((f64::from(v) * 1000.0).round() / 1000.0))?;
            } else {
                seq.serialize_element(&None::<f64>)?;
            }
        }
        seq.end()
    }
}

/// Where a reader (one SSE connection) is in each stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    lever: u64,
    trials: u64,
    dff: u64,
    rois_version: u64,
    image_version: u64,
    qc_version: u64,
    licks: u64,
    motion: u64,
    epoch: u64,
    started: bool,
}

/// One message to the page: a full snapshot (`reset: true`) or what is new
/// since a [`Cursor`]. The page handles both the same way (a reset clears its
/// buffers first).
#[derive(Debug, Clone, Serialize)]
pub struct Update {
    /// True for a full snapshot: the page drops what it had.
    pub reset: bool,
    /// Latest timestamp seen (lever or dF/F), µs.
    pub now_us: u64,
    /// Lever points ever binned (the page's `data-lever-points`).
    pub lever_total: u64,
    /// dF/F rows ever binned (the page's `data-heatmap-rows`).
    pub dff_total: u64,
    /// Trials ever pushed (the page's `data-trials`).
    pub trial_count: u64,
    /// Rewarded trials ever pushed.
    pub rewarded_count: u64,
    /// New lever points, `[t_us, mm]`.
    pub lever: Vec<(u64, f32)>,
    /// New trials.
    pub trials: Vec<TrialEvent>,
    /// Timestamps (bin centres, µs) of the new dF/F rows.
    pub dff_t_us: Vec<u64>,
    /// New dF/F rows.
    pub dff: Vec<DffRow>,
    /// ROIs, when they changed (or on reset).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_arc")]
    pub rois: Option<Arc<Rois>>,
    /// Mean image, when it changed (or on reset, if there is one).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_arc")]
    pub mean_image: Option<Arc<MeanImage>>,
    /// Current health.
    pub health: Health,
    /// The last finished session's quality record (`summary.json`'s `qc`,
    /// as text), when it changed (or on reset, if there is one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_qc: Option<String>,
    /// Lick onsets ever pushed this session (the page's `data-licks`).
    pub lick_total: u64,
    /// Licks before this rig time may be missing from the page (older
    /// ones were let go): the cue-aligned raster only shows trials after it.
    pub lick_floor_us: u64,
    /// New lick onsets, rig µs.
    pub licks: Vec<u64>,
    /// Motion bins ever made this session.
    pub motion_total: u64,
    /// New motion bins.
    pub motion: Vec<MotionBin>,
    /// The task engine's state now (`null` before the first session).
    pub task: Option<TaskStateView>,
    /// Losses of the running session.
    pub counters: RigCounters,
    /// The running session's task (on reset; `null` between sessions).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_arc_opt"
    )]
    pub session: Option<Option<Arc<SessionView>>>,
}

#[allow(clippy::ref_option)] // serde's `serialize_with` passes `&Option<_>`
fn ser_arc_opt<T: Serialize, S: Serializer>(
    v: &Option<Option<Arc<T>>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    v.as_ref().and_then(|o| o.as_deref()).serialize(s)
}

#[allow(clippy::ref_option)] // serde's `serialize_with` passes `&Option<_>`
fn ser_arc<T: Serialize, S: Serializer>(v: &Option<Arc<T>>, s: S) -> Result<S::Ok, S::Error> {
    v.as_deref().serialize(s)
}

#[derive(Debug, Default)]
struct Bin {
    index: u64,
    sum: Vec<f64>,
    n: u32,
}

#[derive(Debug, Default)]
struct MotionAcc {
    index: u64,
    dx: f64,
    dy: f64,
    peak: f32,
    flagged: u32,
    n: u32,
}

#[derive(Debug, Default)]
struct Inner {
    now_us: u64,
    lever_bin: Option<(u64, f64, u32)>,
    lever: VecDeque<(u64, f32)>,
    lever_total: u64,
    trials: VecDeque<TrialEvent>,
    trial_count: u64,
    rewarded_count: u64,
    dff_bin: Option<Bin>,
    dff: VecDeque<(u64, DffRow)>,
    dff_total: u64,
    rois: Arc<Rois>,
    rois_version: u64,
    image: Option<Arc<MeanImage>>,
    image_version: u64,
    health: Health,
    last_qc: Option<String>,
    qc_version: u64,
    session: Option<Arc<SessionView>>,
    licks: VecDeque<u64>,
    lick_total: u64,
    lick_floor_us: u64,
    motion_bin: Option<MotionAcc>,
    motion: VecDeque<MotionBin>,
    motion_total: u64,
    task: Option<TaskStateView>,
    live: Option<Arc<crate::session::LiveStatus>>,
    /// Bumped at every session start: readers get a full snapshot.
    epoch: u64,
}

/// The data the preview page shows. Share it as `Arc<PreviewState>`.
#[derive(Debug, Default)]
pub struct PreviewState {
    inner: Mutex<Inner>,
}

impl PreviewState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind: keep going.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One lever sample (`mm` of travel at `t_us`). Samples are averaged
    /// into [`LEVER_BIN_US`] bins; the last [`LEVER_WINDOW_US`] are kept.
    pub fn push_lever(&self, t_us: u64, mm: f32) {
        add_lever(&mut self.lock(), t_us, mm);
    }

    /// Lever samples from the serial reader, which must never wait for this
    /// lock (a preview or imaging thread holding it may be preempted): if
    /// the lock is free they are added and `pending` is emptied, else they
    /// stay in `pending` for the next call. Returns whether they went in.
    pub fn try_push_levers(&self, pending: &mut Vec<(u64, f32)>) -> bool {
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        for (t_us, mm) in pending.drain(..) {
            add_lever(&mut g, t_us, mm);
        }
        true
    }

    /// A finished trial: `outcome` is `"rewarded"` or `"miss"`, `t_us` the cue
    /// onset, `reaction_s` the cue-to-press time if the mouse pressed.
    pub fn push_trial(
        &self,
        trial: u32,
        outcome: &'static str,
        t_us: u64,
        reaction_s: Option<f32>,
    ) {
        let mut g = self.lock();
        add_trial(
            &mut g,
            TrialEvent {
                trial,
                outcome,
                t_us,
                reaction_s,
            },
        );
    }

    /// [`push_trial`](Self::push_trial) for the rig thread, which must never
    /// wait: the trials in `pending` are added (and `pending` emptied) unless
    /// the state is busy this instant; then they stay for the next call.
    pub fn try_push_trials(&self, pending: &mut Vec<TrialEvent>) -> bool {
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        for ev in pending.drain(..) {
            add_trial(&mut g, ev);
        }
        true
    }

    /// A lick onset at `t_us` (rig µs).
    pub fn push_lick(&self, t_us: u64) {
        add_mark(&mut self.lock(), RigMark::Lick(t_us));
    }

    /// The task engine entered `state` at `t_us` (rig µs).
    pub fn set_task_state(&self, t_us: u64, state: &'static str) {
        add_mark(&mut self.lock(), RigMark::State { t_us, state });
    }

    /// Licks and task states from the rig thread, which must never wait:
    /// they are added (and `pending` emptied) unless the state is busy this
    /// instant; then they stay for the next call.
    pub fn try_push_marks(&self, pending: &mut Vec<RigMark>) -> bool {
        let mut g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        for m in pending.drain(..) {
            add_mark(&mut g, m);
        }
        true
    }

    /// The rig's live counters, read (relaxed atomics) whenever an update
    /// is built: the page's lost-sample and dropped-record counts.
    pub fn set_live_status(&self, live: Arc<crate::session::LiveStatus>) {
        self.lock().live = Some(live);
    }

    /// One imaging frame's rigid shift (`dx`, `dy` in pixels, the
    /// correlation `peak`, whether it was `flagged` unreliable), from the
    /// ingest thread that computed it. Averaged into [`MOTION_BIN_US`] bins;
    /// the last [`DFF_WINDOW_US`] are kept.
    pub fn push_motion(&self, t_us: u64, dx: f32, dy: f32, peak: f32, flagged: bool) {
        let idx = t_us / MOTION_BIN_US;
        let mut g = self.lock();
        g.now_us = g.now_us.max(t_us);
        if g.motion_bin.as_ref().is_some_and(|b| b.index != idx) {
            if let Some(b) = g.motion_bin.take() {
                let n = f64::from(b.n.max(1));
                #[allow(clippy::cast_possible_truncation)]
                let bin = MotionBin {
                    t_us: b.index * MOTION_BIN_US + MOTION_BIN_US / 2,
                    dx: (b.dx / n) as f32,
                    dy: (b.dy / n) as f32,
                    peak: b.peak,
                    flagged: b.flagged,
                    frames: b.n,
                };
                g.motion.push_back(bin);
                g.motion_total += 1;
            }
        }
        let b = g.motion_bin.get_or_insert_with(|| MotionAcc {
            index: idx,
            peak: f32::INFINITY,
            ..MotionAcc::default()
        });
        b.dx += f64::from(dx);
        b.dy += f64::from(dy);
        b.peak = b.peak.min(peak);
        b.flagged += u32::from(flagged);
        b.n += 1;
        let cut = t_us.saturating_sub(DFF_WINDOW_US);
        while g.motion.front().is_some_and(|m| m.t_us < cut) {
            g.motion.pop_front();
        }
    }

    /// The session's ROIs: one outline polygon (original image pixels) and
    /// one kind per ROI. Only the first [`MAX_ROIS_SENT`] are sent.
    pub fn set_rois(&self, mut outlines: Vec<Vec<(u16, u16)>>, mut kinds: Vec<String>) {
        let n = outlines.len();
        outlines.truncate(MAX_ROIS_SENT);
        kinds.resize(outlines.len(), String::new());
        let rois = Arc::new(Rois { n, outlines, kinds });
        let mut g = self.lock();
        g.rois = rois;
        g.rois_version += 1;
    }

    /// One imaging frame's dF/F, one value per ROI. Frames are averaged into
    /// [`DFF_BIN_US`] bins; the last [`DFF_WINDOW_US`] are kept; only the
    /// first [`MAX_ROIS_SENT`] ROIs are kept.
    pub fn push_dff(&self, t_us: u64, dff: &[f32]) {
        let vals = &dff[..dff.len().min(MAX_ROIS_SENT)];
        let idx = t_us / DFF_BIN_US;
        let mut g = self.lock();
        g.now_us = g.now_us.max(t_us);
        let flush = match &g.dff_bin {
            Some(b) => b.index != idx,
            None => false,
        };
        if flush {
            if let Some(b) = g.dff_bin.take() {
                let n = f64::from(b.n.max(1));
                #[allow(clippy::cast_possible_truncation)]
                let row: Vec<f32> = b.sum.iter().map(|s| (s / n) as f32).collect();
                g.dff
                    .push_back((b.index * DFF_BIN_US + DFF_BIN_US / 2, DffRow(Arc::new(row))));
                g.dff_total += 1;
            }
        }
        let bin = g.dff_bin.get_or_insert_with(|| Bin {
            index: idx,
            sum: Vec::new(),
            n: 0,
        });
        if bin.sum.len() != vals.len() {
            // ROI count changed: restart the bin.
            bin.sum = vec![0.0; vals.len()];
            bin.n = 0;
        }
        for (s, &v) in bin.sum.iter_mut().zip(vals) {
            *s += f64::from(v);
        }
        bin.n += 1;
        // The last minute of imaging, however far it runs behind the lever.
        let cut = t_us.saturating_sub(DFF_WINDOW_US);
        while g.dff.front().is_some_and(|&(t, _)| t < cut) {
            g.dff.pop_front();
        }
    }

    /// The mean image (`w * h` row-major pixels). Scaled to 8 bits between
    /// its 0.5th and 99.5th percentiles and block-averaged to at most
    /// [`MAX_IMAGE_SIDE`] a side. Call it rarely (every few seconds at most).
    pub fn set_mean_image(&self, w: u32, h: u32, pixels: &[f32]) {
        let Some(img) = scale_image(w, h, pixels) else {
            return;
        };
        let img = Arc::new(img);
        let mut g = self.lock();
        g.image = Some(img);
        g.image_version += 1;
    }

    /// A session starts: the page's plots and counters start afresh (a
    /// full snapshot to every reader), with the session's task settings.
    /// Call it before the session's first trial, lever sample or frame.
    pub fn begin_session(&self, view: SessionView) {
        let mut g = self.lock();
        let g = &mut *g;
        g.lever_bin = None;
        g.lever.clear();
        g.lever_total = 0;
        g.trials.clear();
        g.trial_count = 0;
        g.rewarded_count = 0;
        g.dff_bin = None;
        g.dff.clear();
        g.dff_total = 0;
        g.rois = Arc::new(Rois::default());
        g.rois_version += 1;
        g.image = None;
        g.image_version += 1;
        g.now_us = view.t0_us;
        g.licks.clear();
        g.lick_total = 0;
        g.lick_floor_us = view.t0_us;
        g.motion_bin = None;
        g.motion.clear();
        g.motion_total = 0;
        // The engine starts waiting for a still lever (it reports changes).
        g.task = Some(TaskStateView {
            state: "waiting",
            since_us: view.t0_us,
            changes: 0,
        });
        g.session = Some(Arc::new(view));
        g.epoch += 1;
    }

    /// The session ended (its plots stay on the page until the next one).
    pub fn end_session(&self) {
        let mut g = self.lock();
        g.session = None;
        let now = g.now_us;
        if let Some(t) = g.task.as_mut().filter(|t| t.state != "finished") {
            // The engine's own `finished` may not have reached the page.
            *t = TaskStateView {
                state: "finished",
                since_us: now,
                changes: t.changes + 1,
            };
        }
        g.epoch += 1;
    }

    /// The current health.
    pub fn set_health(&self, health: Health) {
        self.lock().health = health;
    }

    /// The last finished session's quality record, as text.
    pub fn set_last_qc(&self, text: String) {
        let mut g = self.lock();
        g.last_qc = Some(text);
        g.qc_version += 1;
    }

    /// A full snapshot (what `GET /api/state` returns).
    pub fn snapshot(&self) -> Update {
        self.update_since(&mut Cursor::default())
    }

    /// What is new since `cursor` (a full snapshot for a fresh cursor), and
    /// move the cursor on.
    pub fn update_since(&self, cursor: &mut Cursor) -> Update {
        let g = self.lock();
        let reset = !cursor.started || cursor.epoch != g.epoch;
        if reset {
            *cursor = Cursor::default();
        }
        let lever = tail(&g.lever, g.lever_total, cursor.lever);
        let trials = tail(&g.trials, g.trial_count, cursor.trials);
        let dff = tail(&g.dff, g.dff_total, cursor.dff);
        let licks = tail(&g.licks, g.lick_total, cursor.licks);
        let motion = tail(&g.motion, g.motion_total, cursor.motion);
        let counters = g
            .live
            .as_ref()
            .map_or_else(RigCounters::default, |l| RigCounters {
                samples_lost: l.samples_lost(),
                records_dropped: l.storage_drops(),
            });
        let rois = (reset || cursor.rois_version != g.rois_version).then(|| Arc::clone(&g.rois));
        let mean_image = if reset || cursor.image_version != g.image_version {
            g.image.clone()
        } else {
            None
        };
        let last_qc = if reset || cursor.qc_version != g.qc_version {
            g.last_qc.clone()
        } else {
            None
        };
        let up = Update {
            reset,
            now_us: g.now_us,
            lever_total: g.lever_total,
            dff_total: g.dff_total,
            trial_count: g.trial_count,
            rewarded_count: g.rewarded_count,
            lever,
            trials,
            dff_t_us: dff.iter().map(|(t, _)| *t).collect(),
            dff: dff.into_iter().map(|(_, r)| r).collect(),
            rois,
            mean_image,
            health: g.health.clone(),
            last_qc,
            lick_total: g.lick_total,
            lick_floor_us: g.lick_floor_us,
            licks,
            motion_total: g.motion_total,
            motion,
            task: g.task,
            counters,
            session: reset.then(|| g.session.clone()),
        };
        *cursor = Cursor {
            lever: g.lever_total,
            trials: g.trial_count,
            dff: g.dff_total,
            rois_version: g.rois_version,
            image_version: g.image_version,
            qc_version: g.qc_version,
            licks: g.lick_total,
            motion: g.motion_total,
            epoch: g.epoch,
            started: true,
        };
        up
    }
}

/// The items of `q` (whose last item is number `total`) after item number
/// `seen`.
fn tail<T: Clone>(q: &VecDeque<T>, total: u64, seen: u64) -> Vec<T> {
    let new = usize::try_from(total.saturating_sub(seen)).unwrap_or(usize::MAX);
    let skip = q.len().saturating_sub(new);
    q.iter().skip(skip).cloned().collect()
}

/// An image (`w * h` row-major pixels) as the page shows it: 8 bits
/// between its 0.5th and 99.5th percentiles, block-averaged to at most
/// [`MAX_IMAGE_SIDE`] a side. None for an empty or non-finite image.
pub fn page_image(w: u32, h: u32, pixels: &[f32]) -> Option<MeanImage> {
    scale_image(w, h, pixels)
}

fn scale_image(w: u32, h: u32, pixels: &[f32]) -> Option<MeanImage> {
    let (wu, hu) = (usize::try_from(w).ok()?, usize::try_from(h).ok()?);
    if wu == 0 || hu == 0 || pixels.len() != wu.checked_mul(hu)? {
        return None;
    }
    // Percentiles from a strided sample of finite values.
    let step = (pixels.len() / 65_536).max(1);
    let mut sample: Vec<f32> = pixels
        .iter()
        .step_by(step)
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    if sample.is_empty() {
        return None;
    }
    sample.sort_by(f32::total_cmp);
    let lo = sample[sample.len() * 5 / 1000];
    let hi = sample[(sample.len() * 995 / 1000).min(sample.len() - 1)];
    let span = if hi > lo { hi - lo } else { 1.0 };
    let block = wu.max(hu).div_ceil(MAX_IMAGE_SIDE).max(1);
    let (ow, oh) = (wu.div_ceil(block), hu.div_ceil(block));
    let mut out = Vec::with_capacity(ow * oh);
    for by in 0..oh {
        for bx in 0..ow {
            let (mut sum, mut n) = (0.0f32, 0u32);
            for y in by * block..((by + 1) * block).min(hu) {
                for x in bx * block..((bx + 1) * block).min(wu) {
                    let v = pixels[y * wu + x];
                    if v.is_finite() {
                        sum += v;
                        n += 1;
                    }
                }
            }
            let v = if n == 0 { lo } else { sum / n as f32 };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let b = (((v - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8;
            out.push(b);
        }
    }
    Some(MeanImage {
        src_w: w,
        src_h: h,
        w: u32::try_from(ow).ok()?,
        h: u32::try_from(oh).ok()?,
        pixels: out,
    })
}

fn add_trial(g: &mut Inner, ev: TrialEvent) {
    if ev.outcome == "rewarded" {
        g.rewarded_count += 1;
    }
    g.trial_count += 1;
    g.trials.push_back(ev);
    while g.trials.len() > MAX_TRIALS_KEPT {
        g.trials.pop_front();
    }
}

fn add_mark(g: &mut Inner, m: RigMark) {
    match m {
        RigMark::Lick(t_us) => {
            g.now_us = g.now_us.max(t_us);
            g.licks.push_back(t_us);
            g.lick_total += 1;
            let cut = g.now_us.saturating_sub(LICK_WINDOW_US);
            while let Some(&t) = g.licks.front() {
                if t >= cut && g.licks.len() <= MAX_LICKS_KEPT {
                    break;
                }
                g.licks.pop_front();
                g.lick_floor_us = g.lick_floor_us.max(t + 1);
            }
        }
        RigMark::State { t_us, state } => {
            let changes = g.task.map_or(0, |t| t.changes) + 1;
            g.task = Some(TaskStateView {
                state,
                since_us: t_us,
                changes,
            });
        }
    }
}

/// Add one lever sample to the binned trace (see [`PreviewState::push_lever`]).
fn add_lever(g: &mut Inner, t_us: u64, mm: f32) {
    g.now_us = g.now_us.max(t_us);
    let idx = t_us / LEVER_BIN_US;
    match g.lever_bin {
        Some((i, sum, n)) if i == idx => g.lever_bin = Some((i, sum + f64::from(mm), n + 1)),
        Some((i, sum, n)) => {
            // Narrowing to f32 is the point: the page draws f32.
            #[allow(clippy::cast_possible_truncation)]
            let mean = (sum / f64::from(n)) as f32;
            g.lever
                .push_back((i * LEVER_BIN_US + LEVER_BIN_US / 2, mean));
            g.lever_total += 1;
            g.lever_bin = Some((idx, f64::from(mm), 1));
        }
        None => g.lever_bin = Some((idx, f64::from(mm), 1)),
    }
    let cut = g.now_us.saturating_sub(LEVER_WINDOW_US);
    while g.lever.front().is_some_and(|&(t, _)| t < cut) {
        g.lever.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lever_is_binned_and_windowed() {
        let s = PreviewState::new();
        // 1 kHz for 12 s.
        for i in 0..12_000u64 {
            s.push_lever(i * 1000, 1.0);
        }
        let up = s.snapshot();
        assert_eq!(up.lever_total, 1199);
        assert!(
            up.lever.len() <= 1001 && up.lever.len() >= 999,
            "{}",
            up.lever.len()
        );
        assert!(up.lever.iter().all(|&(_, mm)| (mm - 1.0).abs() < 1e-6));
    }

    #[test]
    fn the_reader_never_waits_for_the_preview_lock() {
        let s = PreviewState::new();
        let mut pending: Vec<(u64, f32)> = (0..1000u64).map(|i| (i * 1000, 2.0)).collect();
        {
            let _held = s.lock(); // a preview or imaging thread has it
            assert!(!s.try_push_levers(&mut pending), "busy lock: nothing waits");
            assert_eq!(pending.len(), 1000, "samples kept for the next try");
        }
        pending.extend((1000..2000u64).map(|i| (i * 1000, 2.0)));
        assert!(s.try_push_levers(&mut pending));
        assert!(pending.is_empty());
        let up = s.snapshot();
        assert_eq!(
            up.lever_total, 199,
            "2 s of 1 kHz in 10 ms bins, the last open"
        );
        assert!(up.lever.iter().all(|&(_, mm)| (mm - 2.0).abs() < 1e-6));
    }

    #[test]
    fn a_new_session_starts_the_page_afresh() {
        let s = PreviewState::new();
        let mut c = Cursor::default();
        for k in 0..54 {
            s.push_trial(k, "rewarded", u64::from(k) * 1_000_000, Some(0.3));
        }
        s.push_lever(1_000, 0.5);
        s.push_dff(1_000, &[0.1, 0.2]);
        s.push_dff(200_000, &[0.1, 0.2]);
        let up = s.update_since(&mut c);
        assert_eq!(up.trial_count, 54);
        assert!(up.session.is_some_and(|v| v.is_none()), "no session yet");
        // Session B starts: every reader gets a full snapshot with nothing
        // of session A in it, and B's task settings.
        s.begin_session(SessionView {
            mouse: "B".into(),
            t0_us: 90_000_000,
            threshold_mm: 1.5,
            ..SessionView::default()
        });
        let up = s.update_since(&mut c);
        assert!(up.reset);
        assert_eq!((up.trial_count, up.rewarded_count), (0, 0));
        assert!(up.trials.is_empty() && up.lever.is_empty() && up.dff.is_empty());
        assert_eq!((up.lever_total, up.dff_total), (0, 0));
        let view = up.session.flatten().expect("B's view");
        assert_eq!((view.mouse.as_str(), view.threshold_mm), ("B", 1.5));
        s.push_trial(1, "miss", 91_000_000, None);
        let up = s.update_since(&mut c);
        assert!(!up.reset && up.session.is_none(), "sent once");
        assert_eq!((up.trial_count, up.trials.len()), (1, 1));
        // The end: one more snapshot, the plots kept, no session.
        s.end_session();
        let up = s.update_since(&mut c);
        assert!(up.reset);
        assert_eq!(up.trials.len(), 1);
        assert!(up.session.as_ref().is_some_and(Option::is_none));
        let json = serde_json::to_string(&up).expect("json");
        assert!(json.contains("\"session\":null"), "{json}");
    }

    #[test]
    fn licks_task_state_and_motion_reach_the_page_and_start_afresh() {
        let s = PreviewState::new();
        let mut c = Cursor::default();
        s.begin_session(SessionView {
            mouse: "A".into(),
            t0_us: 1_000_000,
            ..SessionView::default()
        });
        let up = s.update_since(&mut c);
        let task = up.task.expect("a session's task state");
        assert_eq!(
            (task.state, task.since_us, task.changes),
            ("waiting", 1_000_000, 0)
        );
        // The rig thread's marks, held back while the lock is busy.
        let mut pending = vec![
            RigMark::State {
                t_us: 2_000_000,
                state: "iti",
            },
            RigMark::Lick(2_100_000),
            RigMark::Lick(2_200_000),
            RigMark::State {
                t_us: 3_000_000,
                state: "quiescence",
            },
        ];
        {
            let _held = s.lock();
            assert!(!s.try_push_marks(&mut pending));
            assert_eq!(pending.len(), 4, "kept for the next try");
        }
        assert!(s.try_push_marks(&mut pending) && pending.is_empty());
        // 30 Hz shifts for 2 s, every tenth flagged.
        for i in 0..60u64 {
            s.push_motion(3_000_000 + i * 33_333, 1.0, -2.0, 0.5, i % 10 == 0);
        }
        let up = s.update_since(&mut c);
        assert!(!up.reset);
        assert_eq!(
            (up.lick_total, up.licks.clone()),
            (2, vec![2_100_000, 2_200_000])
        );
        let task = up.task.expect("task");
        assert_eq!(
            (task.state, task.since_us, task.changes),
            ("quiescence", 3_000_000, 2)
        );
        assert_eq!(up.motion_total, 19, "2 s in 100 ms bins, the last open");
        let frames: u32 = up.motion.iter().map(|m| m.frames).sum();
        let flagged: u32 = up.motion.iter().map(|m| m.flagged).sum();
        assert!(
            frames >= 55 && flagged >= 5,
            "{frames} frames, {flagged} flagged"
        );
        let m = up.motion[3];
        assert!((m.dx - 1.0).abs() < 1e-6 && (m.dy + 2.0).abs() < 1e-6 && m.peak == 0.5);
        let json = serde_json::to_value(&up).expect("json");
        assert_eq!(json["motion"][3][1], 1.0);
        assert_eq!(json["task"]["state"], "quiescence");
        // Only what is new goes out next time.
        s.push_lick(4_000_000);
        let up = s.update_since(&mut c);
        assert_eq!((up.licks.len(), up.motion.len(), up.lick_total), (1, 0, 3));
        // The session ends: the task is over, the plots stay.
        s.end_session();
        let up = s.update_since(&mut c);
        assert_eq!(up.task.map(|t| t.state), Some("finished"));
        assert_eq!(up.licks.len(), 3);
        // Session B: nothing of A's licks, motion or task state.
        s.begin_session(SessionView {
            mouse: "B".into(),
            t0_us: 90_000_000,
            ..SessionView::default()
        });
        let up = s.update_since(&mut c);
        assert!(up.reset);
        assert!(up.licks.is_empty() && up.motion.is_empty());
        assert_eq!(
            (up.lick_total, up.motion_total, up.lick_floor_us),
            (0, 0, 90_000_000)
        );
        let task = up.task.expect("task");
        assert_eq!(
            (task.state, task.since_us, task.changes),
            ("waiting", 90_000_000, 0)
        );
    }

    #[test]
    fn licks_are_windowed_and_capped_with_a_floor() {
        let s = PreviewState::new();
        // 10 Hz for 150 s: the last 120 s are kept.
        for i in 0..1500u64 {
            s.push_lick(i * 100_000);
        }
        let up = s.snapshot();
        assert_eq!(up.lick_total, 1500);
        assert_eq!(up.licks.len(), 1201, "120 s, both ends");
        assert_eq!(up.lick_floor_us, up.licks[0] - 100_000 + 1);
        // A stuck sensor: 1 kHz for 10 s is capped.
        for i in 0..10_000u64 {
            s.push_lick(150_000_000 + i * 1000);
        }
        let up = s.snapshot();
        assert_eq!(up.licks.len(), MAX_LICKS_KEPT);
        assert!(up.lick_floor_us > up.licks[0] - 1000 && up.lick_floor_us <= up.licks[0]);
    }

    #[test]
    fn live_counters_are_read_when_an_update_is_built() {
        let s = PreviewState::new();
        assert_eq!(s.snapshot().counters, RigCounters::default());
        let live = Arc::new(crate::session::LiveStatus::default());
        s.set_live_status(Arc::clone(&live));
        live.add_samples_lost(7);
        live.add_storage_drop();
        let c = s.snapshot().counters;
        assert_eq!((c.samples_lost, c.records_dropped), (7, 1));
    }

    #[test]
    fn cursor_gives_only_new_items() {
        let s = PreviewState::new();
        let mut c = Cursor::default();
        s.push_trial(1, "rewarded", 0, Some(0.4));
        let up = s.update_since(&mut c);
        assert!(up.reset);
        assert_eq!(up.trials.len(), 1);
        assert!(up.rois.is_some());
        s.push_trial(2, "miss", 1_000_000, None);
        let up = s.update_since(&mut c);
        assert!(!up.reset);
        assert_eq!(up.trials.len(), 1);
        assert_eq!(up.trials[0].trial, 2);
        assert_eq!((up.trial_count, up.rewarded_count), (2, 1));
        assert!(up.rois.is_none());
        let up = s.update_since(&mut c);
        assert!(up.trials.is_empty());
    }

    #[test]
    fn dff_is_binned_to_10_hz_and_capped() {
        let s = PreviewState::new();
        let row = vec![0.5f32; MAX_ROIS_SENT + 10];
        // 30 Hz for 70 s.
        for i in 0..2100u64 {
            s.push_dff(i * 33_333, &row);
        }
        let up = s.snapshot();
        assert!(
            up.dff.len() >= 595 && up.dff.len() <= 601,
            "{}",
            up.dff.len()
        );
        assert_eq!(up.dff[0].0.len(), MAX_ROIS_SENT);
        assert!((up.dff[0].0[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn the_last_minute_of_imaging_is_kept_when_it_runs_behind_the_lever() {
        let s = PreviewState::new();
        // The lever is 5 minutes ahead of the imaging (a busy machine).
        s.push_lever(400_000_000, 0.0);
        for i in 0..300u64 {
            s.push_dff(i * 100_000, &[0.5]);
            s.push_motion(i * 100_000, 0.5, 0.5, 0.9, false);
        }
        let up = s.snapshot();
        assert!(up.dff.len() >= 290, "{}", up.dff.len());
        assert!(up.motion.len() >= 290, "{}", up.motion.len());
    }

    #[test]
    fn mean_image_is_scaled_and_shrunk() {
        let s = PreviewState::new();
        let px: Vec<f32> = (0..512 * 512).map(|i| (i % 512) as f32).collect();
        s.set_mean_image(512, 512, &px);
        let img = s.snapshot().mean_image.expect("image");
        assert_eq!((img.w, img.h, img.src_w), (256, 256, 512));
        assert!(img.pixels[0] < 5 && img.pixels[255] > 250);
        let json = serde_json::to_value(&*img).expect("json");
        assert_eq!(json["hex"].as_str().map(str::len), Some(256 * 256 * 2));
    }
}
