//! The ingest thread: reads frames from the shared-memory ring, stamps them on
//! the rig clock ([`super::timing`]), and writes `frames.tsv`, the optional raw
//! `frames.npy` and, at the end, `mean_image.npy` into the session folder
//! (`frames.npy`, `f.npy` and `dff.npy` roll into chunk files together, at
//! the same frame, see [`session_format::ChunkClock`]). It
//! runs on its own thread, apart from the serial latency path and the storage
//! thread, and never makes the producer wait.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use firmware_bridge::link::host_now_ns;
use frame_ring::FrameRingMapping;
use protocol::ring::PollOutcome;

use super::timing::{Decision, FrameInfo, FrameTimer, StampSource};
use crate::session::{LiveView, SideStream, StorageMsg};
use session_format::{ChunkClock, ChunkedNpy, EventSource, NpyAppender, NpyDtype};

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

/// Counters the daemon shows (frames, drops).
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub frames: AtomicU64,
    pub dropped: AtomicU64,
    pub ttl_stamped: AtomicU64,
    pub mapped_stamped: AtomicU64,
}

/// A running ingest; [`Ingest::finish`] stops it and closes its files.
#[derive(Debug)]
pub struct Ingest {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), String>>>,
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
                let r = run(&setup, &edges, &live, &notices, &s, &c);
                if let Err(e) = &r {
                    // Say so now, in the session and the log, not only when
                    // the session ends: the lever task goes on without imaging.
                    tracing::error!("imaging stopped: {e}");
                    let t_us = live.status.rig_now_us();
                    let _ = notices.try_send(StorageMsg::Event {
                        t_us,
                        source: EventSource::Daemon,
                        kind: "imaging_stopped",
                        value: 0.0,
                        detail: e.clone(),
                    });
                }
                r
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
            counters,
        })
    }

    /// Stop, stamp what is pending, close the files.
    pub fn finish(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the imaging thread panicked".into()),
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
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Frames held for their stamp at most (minutes at imaging rates; a frame
/// waits at most a fraction of a second for its edge). Past this the oldest
/// is written without a time, so a session with no clock fit cannot grow
/// memory without bound.
const MAX_PENDING_FRAMES: usize = 4096;

/// One frame waiting for its stamp (or a dropped one waiting for its row).
#[derive(Debug, Clone, Copy)]
struct Pending {
    index: u64,
    frame_number: u64,
    mapped_us: Option<f64>,
    dropped: bool,
}

struct Files {
    analysis: Option<super::analysis::Analysis>,
    tsv: std::io::BufWriter<std::fs::File>,
    tsv_file: std::fs::File,
    raw: Option<ChunkedNpy>,
    /// One roll decision for every imaging array, so they change chunk on
    /// the same frame.
    chunks: ChunkClock,
    mean: Vec<f64>,
    mean_n: u64,
    last_sync: Instant,
}

impl Files {
    fn create(setup: &IngestSetup, pixels: usize) -> Result<Self, String> {
        let path = setup.session_dir.join(FRAMES_TSV);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let tsv_file = file.try_clone().map_err(|e| e.to_string())?;
        let mut tsv = std::io::BufWriter::new(file);
        writeln!(tsv, "index\tframe\tt_s\tsource\tdropped").map_err(|e| e.to_string())?;
        let raw = if setup.raw_frames {
            let shape = [
                setup.channels as usize,
                setup.height as usize,
                setup.width as usize,
            ];
            Some(
                ChunkedNpy::create(&setup.session_dir, FRAMES_NPY, NpyDtype::U2, &shape)
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        Ok(Self {
            analysis: None,
            tsv,
            tsv_file,
            raw,
            chunks: ChunkClock::new(setup.chunk_len),
            mean: vec![0.0; pixels],
            mean_n: 0,
            last_sync: Instant::now(),
        })
    }

    fn row(&mut self, p: &Pending, t_us: Option<f64>, source: &str, t0: u64) -> Result<(), String> {
        let t = t_us.map_or(String::new(), |t| format!("{:.6}", (t - t0 as f64) / 1e6));
        writeln!(
            self.tsv,
            "{}\t{}\t{}\t{}\t{}",
            p.index,
            p.frame_number,
            t,
            source,
            u8::from(p.dropped)
        )
        .map_err(|e| format!("{FRAMES_TSV}: {e}"))
    }

    /// The next frame's rows (pixels, F, dF/F) are at session time `t_us`:
    /// roll every imaging array here if that crosses a chunk boundary.
    fn at_frame(&mut self, t_us: u64) -> Result<(), String> {
        if !self.chunks.crosses(t_us) {
            return Ok(());
        }
        if let Some(r) = self.raw.as_mut() {
            r.roll().map_err(|e| e.to_string())?;
        }
        if let Some(a) = self.analysis.as_mut() {
            a.roll()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), String> {
        self.tsv.flush().map_err(|e| format!("{FRAMES_TSV}: {e}"))?;
        self.tsv_file
            .sync_data()
            .map_err(|e| format!("{FRAMES_TSV}: {e}"))?;
        if let Some(r) = self.raw.as_mut() {
            r.sync().map_err(|e| e.to_string())?;
        }
        if let Some(a) = self.analysis.as_mut() {
            a.sync()?;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    fn write_mean(&self, setup: &IngestSetup) -> Result<(), String> {
        if self.mean_n == 0 {
            return Ok(());
        }
        let shape = [
            setup.channels as usize,
            setup.height as usize,
            setup.width as usize,
        ];
        let mut npy = NpyAppender::create(
            &setup.session_dir.join(MEAN_IMAGE_NPY),
            NpyDtype::F4,
            &shape,
        )
        .map_err(|e| e.to_string())?;
        let mean: Vec<f32> = self
            .mean
            .iter()
            .map(|s| (s / self.mean_n as f64) as f32)
            .collect();
        npy.append(&mean).map_err(|e| e.to_string())?;
        npy.sync().map_err(|e| e.to_string())
    }
}

fn open_ring(setup: &IngestSetup) -> Result<FrameRingMapping, String> {
    let m = FrameRingMapping::open(&setup.shm_name).map_err(|e| e.to_string())?;
    m.check_geometry(setup.width, setup.height, setup.channels)
        .map_err(|e| e.to_string())?;
    Ok(m)
}

fn run(
    setup: &IngestSetup,
    edges: &Receiver<(u64, u64)>,
    live: &LiveView,
    notices: &crossbeam_channel::Sender<StorageMsg>,
    stop: &AtomicBool,
    counters: &IngestCounters,
) -> Result<(), String> {
    let pixels = (setup.width * setup.height * setup.channels) as usize;
    let mut files = Files::create(setup, pixels)?;
    let live_now = || (live.clock.get(), live.status.rig_now_us());
    let notice = |kind: &'static str, value: f64, detail: String| {
        let t_us = live.status.rig_now_us();
        let sent = notices.try_send(StorageMsg::Event {
            t_us,
            source: EventSource::Daemon,
            kind,
            value,
            detail,
        });
        if let Err(crossbeam_channel::TrySendError::Full(_)) = sent {
            crate::metrics::global().storage_dropped.inc();
        }
    };
    if let Some(a) = &setup.analysis {
        match super::analysis::Analysis::create(a, &setup.session_dir) {
            Ok(an) => {
                if let Some(p) = &setup.preview {
                    let outlines = an.rois().rois.iter().map(|r| r.outline.clone()).collect();
                    let kinds = an
                        .rois()
                        .rois
                        .iter()
                        .map(|r| format!("{:?}", r.kind).to_lowercase())
                        .collect();
                    p.set_rois(outlines, kinds);
                }
                files.analysis = Some(an);
            }
            Err(e) => {
                // Frames are still recorded; only the online analysis is off.
                tracing::error!("imaging analysis off: {e}");
                notice("analysis_unavailable", 0.0, e);
            }
        }
    }
    let mut timer = FrameTimer::new(setup.ttl_wired, setup.frame_rate_hz);
    let mut buf = vec![0u16; pixels];
    let mut pending: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    let mut mapping: Option<FrameRingMapping> = None;
    let mut reader = None;
    let mut last_open_error = String::new();
    let mut next_open = Instant::now();
    // When the producer went silent (reported), for its `producer_resumed`.
    let mut stale_since: Option<Instant> = None;
    let mut last_frame_number: Option<u64> = None;
    // Rig time of the last frame read (for the chunk of dropped frames).
    let mut last_frame_t_rig = 0u64;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while let Ok((count, t_us)) = edges.try_recv() {
            timer.add_edge(count, t_us);
        }
        // Attach (and re-attach) to the ring.
        if reader.is_none() && !stopping && Instant::now() >= next_open {
            match open_ring(setup) {
                Ok(m) => {
                    match m.reader() {
                        Ok(r) => {
                            notice("imaging_attached", 0.0, format!("ring {}", setup.shm_name));
                            tracing::info!("imaging: reading frames from {}", setup.shm_name);
                            reader = Some(r);
                            mapping = Some(m);
                        }
                        Err(e) => last_open_error = e.to_string(),
                    }
                    last_open_error.clear();
                }
                Err(e) => {
                    if e != last_open_error {
                        tracing::warn!("imaging: {e}");
                        notice("imaging_unavailable", 0.0, e.clone());
                        last_open_error = e;
                    }
                    next_open = Instant::now() + Duration::from_millis(500);
                }
            }
        }
        let mut got = false;
        if let Some(r) = reader.as_mut() {
            match r.poll(&mut buf) {
                Ok(PollOutcome::Frame(meta)) => {
                    got = true;
                    if let Some(since) = stale_since.take() {
                        let s = since.elapsed().as_secs_f64() + 2.0;
                        notice(
                            "producer_resumed",
                            s,
                            format!("frames again after about {s:.1} s without any"),
                        );
                        tracing::info!("imaging: frames again after about {s:.1} s");
                    }
                    // Frame numbers the producer skipped (it fell behind, or
                    // a copy was torn): rows marked dropped, so frames.tsv
                    // stays one row per frame of the acquisition.
                    if let Some(last) = last_frame_number {
                        if meta.frame_number > last + 1 {
                            let missing = meta.frame_number - last - 1;
                            counters.dropped.fetch_add(missing, Ordering::Relaxed);
                            crate::metrics::global().frames_dropped.add(missing);
                            // They stay in the last frame's chunk, as an
                            // overrun's do.
                            files.at_frame(last_frame_t_rig.saturating_sub(setup.t0_us))?;
                            notice(
                                "frames_missing",
                                missing as f64,
                                format!(
                                    "frame numbers {}..={} never arrived",
                                    last + 1,
                                    meta.frame_number - 1
                                ),
                            );
                            for k in (last + 1..meta.frame_number).take(100_000) {
                                pending.push_back(Pending {
                                    index: 0,
                                    frame_number: k,
                                    mapped_us: None,
                                    dropped: true,
                                });
                                if let Some(a) = files.analysis.as_mut() {
                                    a.dropped(k)?;
                                }
                            }
                        }
                    }
                    counters.frames.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::global().frames.inc();
                    let (fit, now_rig) = live_now();
                    let mapped_us = fit.map(|f| f.host_to_rig_us(meta.host_monotonic_ns));
                    // The frame's rig time (mapped, or the rig's latest
                    // sample before a clock fit exists) picks its chunk.
                    let t_rig = mapped_us.map_or(now_rig, |m| m.max(0.0) as u64);
                    files.at_frame(t_rig.saturating_sub(setup.t0_us))?;
                    last_frame_t_rig = t_rig;
                    pending.push_back(Pending {
                        index: meta.index,
                        frame_number: meta.frame_number,
                        mapped_us,
                        dropped: false,
                    });
                    last_frame_number = Some(meta.frame_number);
                    for (m, &p) in files.mean.iter_mut().zip(buf.iter()) {
                        *m += f64::from(p);
                    }
                    files.mean_n += 1;
                    if let Some(raw) = files.raw.as_mut() {
                        raw.append(&buf).map_err(|e| e.to_string())?;
                    }
                    if let Some(a) = files.analysis.as_mut() {
                        a.frame(meta.frame_number, &buf)?;
                        if let Some(p) = &setup.preview {
                            let t = mapped_us.map_or(live_now().1, |m| m.max(0.0) as u64);
                            p.push_dff(t, a.dff_row());
                            if files.mean_n % 150 == 1 {
                                let n = files.mean_n as f64;
                                let mean: Vec<f32> = files.mean
                                    [..(setup.width * setup.height) as usize]
                                    .iter()
                                    .map(|s| (s / n) as f32)
                                    .collect();
                                p.set_mean_image(setup.width, setup.height, &mean);
                            }
                        }
                    }
                }
                Ok(PollOutcome::Overrun { skipped }) => {
                    got = true;
                    counters.dropped.fetch_add(skipped, Ordering::Relaxed);
                    crate::metrics::global().frames_dropped.add(skipped);
                    // The lost frames came after the last one read: they
                    // stay in its chunk (the next frame read decides).
                    files.at_frame(last_frame_t_rig.saturating_sub(setup.t0_us))?;
                    notice("frames_dropped", skipped as f64, "reader overrun".into());
                    let first = last_frame_number.map_or(0, |n| n + 1);
                    for k in 0..skipped.min(100_000) {
                        pending.push_back(Pending {
                            index: 0,
                            frame_number: first + k,
                            mapped_us: None,
                            dropped: true,
                        });
                        if let Some(a) = files.analysis.as_mut() {
                            a.dropped(first + k)?;
                        }
                    }
                    if let Some(n) = last_frame_number.as_mut() {
                        *n += skipped;
                    }
                }
                Ok(PollOutcome::Torn) => got = true,
                Ok(PollOutcome::ProducerRestarted { old_gen, new_gen }) => {
                    got = true;
                    last_frame_number = None;
                    notice(
                        "producer_restarted",
                        0.0,
                        format!("generation {old_gen} -> {new_gen}"),
                    );
                    tracing::warn!("imaging: the frame producer restarted");
                }
                Ok(PollOutcome::NothingNew) => {
                    if r.is_stale(host_now_ns(), 2_000_000_000) && stale_since.is_none() {
                        stale_since = Some(Instant::now());
                        notice(
                            "producer_stale",
                            0.0,
                            "no frame or heartbeat for 2 s".into(),
                        );
                        tracing::warn!("imaging: the frame producer is silent");
                    }
                }
                Err(e) => {
                    // The producer re-created the ring with another layout:
                    // map it again (a wrong geometry is reported there).
                    notice("imaging_error", 0.0, e.to_string());
                    if let Some(m) = mapping.as_mut() {
                        let _ = m.reopen_if_needed();
                    }
                    reader = None;
                    mapping = None;
                    next_open = Instant::now() + Duration::from_millis(200);
                }
            }
        }
        // Stamp what can be stamped, in order.
        let (_, now_rig) = live_now();
        let now = if stopping {
            f64::INFINITY
        } else {
            now_rig as f64
        };
        while let Some(p) = pending.front().copied() {
            if p.dropped {
                files.row(&p, None, "", setup.t0_us)?;
                pending.pop_front();
                continue;
            }
            match timer.stamp(
                FrameInfo {
                    frame_number: p.frame_number,
                    mapped_us: p.mapped_us,
                },
                now,
            ) {
                Decision::Stamped(s) => {
                    match s.source {
                        StampSource::Ttl => counters.ttl_stamped.fetch_add(1, Ordering::Relaxed),
                        StampSource::Mapped => {
                            counters.mapped_stamped.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    files.row(&p, Some(s.t_us), s.source.as_str(), setup.t0_us)?;
                    pending.pop_front();
                }
                Decision::Wait if stopping || pending.len() > MAX_PENDING_FRAMES => {
                    // No clock fit at all (or none for minutes): keep the
                    // row, without a time, rather than hold frames forever.
                    files.row(&p, None, "none", setup.t0_us)?;
                    pending.pop_front();
                }
                Decision::Wait => break,
            }
        }
        if files.last_sync.elapsed() >= setup.fsync_interval {
            files.sync()?;
        }
        if stopping && pending.is_empty() {
            break;
        }
        if !got {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    files.sync()?;
    files.write_mean(setup)?;
    Ok(())
}

/// Check that the disk under `dir` can take `bytes_per_s` with room to spare:
/// write and fsync a few MB and time it. Returns the measured rate.
pub fn check_disk_rate(dir: &Path, bytes_per_s: f64) -> Result<f64, String> {
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
    result.map_err(|e| format!("cannot write a test file in {}: {e}", dir.display()))?;
    let rate = (total << 20) as f64 / elapsed;
    if rate < 2.0 * bytes_per_s {
        return Err(format!(
            "the disk under {} wrote {:.1} MB/s, but [storage].raw_frames needs {:.1} MB/s (with a 2x margin {:.1} MB/s): use a faster disk or set raw_frames = false",
            dir.display(),
            rate / 1e6,
            bytes_per_s / 1e6,
            2.0 * bytes_per_s / 1e6
        ));
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
        let e = check_disk_rate(&dir, 1e15).expect_err("no disk writes a petabyte a second");
        assert!(e.contains("raw_frames") && e.contains("MB/s"), "{e}");
        assert!(
            !dir.join(".disk-check.tmp").exists(),
            "the test file is removed"
        );
    }
}
