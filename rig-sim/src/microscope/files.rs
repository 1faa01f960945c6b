//! The simulated microscope's ground truth, in a directory:
//!
//! | file | contents |
//! |---|---|
//! | `frames_truth.tsv` | one row per frame-clock TTL: `frame` (0-based row index into `dff_truth.npy`), `frame_number` (TTL count since the simulator started, 1-based; the ring's `frame_number`), `true_s`, `device_us` (device counter, unwrapped), `host_ns` (the `host_monotonic_ns` stamp published in the ring), `shift_x_px`, `shift_y_px` (scene displacement), `dropped` (1: the renderer fell behind and the frame was not published) |
//! | `dff_truth.npy` | float32 `(frames, neurons)`: each neuron's true dF/F at each row of `frames_truth.tsv` (dropped frames included) |
//! | `labels.npy`, `labels.tif` | uint16 `(height, width)` label image: 0 background, `k` = neuron `k` |
//! | `neurons.tsv` | `id`, `x`, `y`, `radius`, `type` (`excitatory` / `inhibitory`), `movement_related` (0/1), `preferred_lag_s` (empty if not movement-related) |
//!
//! `frames_truth.tsv` and `dff_truth.npy` are flushed together at least every
//! 0.5 s of host time; the `.npy` header's row count is rewritten at each
//! flush, after the rows it counts, so a killed simulator leaves files that
//! load (the last half second may be missing).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use session_format::{NpyAppender, NpyDtype};

use super::{FrameTruth, Microscope, NeuronInfo};

/// Header of `frames_truth.tsv`.
pub const FRAMES_TRUTH_HEADER: &str =
    "frame\tframe_number\ttrue_s\tdevice_us\thost_ns\tshift_x_px\tshift_y_px\tdropped";
/// Header of `neurons.tsv`.
pub const NEURONS_HEADER: &str = "id\tx\ty\tradius\ttype\tmovement_related\tpreferred_lag_s";

/// `io::Error` for the session-format crate's errors (the truth files are
/// written through its NPY writer, the workspace's one).
fn npy_error(e: session_format::StorageError) -> io::Error {
    io::Error::other(e)
}

/// Write a 16-bit grayscale image as an uncompressed baseline TIFF (little
/// endian, one strip), as suite2p / Cellpose label images are.
pub fn write_tiff_u16(path: &Path, width: u32, height: u32, data: &[u16]) -> io::Result<()> {
    assert_eq!(
        data.len(),
        width as usize * height as usize,
        "tiff data size"
    );
    let pixel_bytes = data.len() as u32 * 2;
    let entries: u16 = 10;
    let ifd_offset = 8u32;
    let ifd_len = 2 + u32::from(entries) * 12 + 4;
    let data_offset = ifd_offset + ifd_len;
    let mut b: Vec<u8> = Vec::with_capacity(data_offset as usize + pixel_bytes as usize);
    b.extend_from_slice(b"II");
    b.extend_from_slice(&42u16.to_le_bytes());
    b.extend_from_slice(&ifd_offset.to_le_bytes());
    b.extend_from_slice(&entries.to_le_bytes());
    // (tag, type (3 = SHORT, 4 = LONG), value); count is always 1.
    let tags: [(u16, u16, u32); 10] = [
        (256, 4, width),       // ImageWidth
        (257, 4, height),      // ImageLength
        (258, 3, 16),          // BitsPerSample
        (259, 3, 1),           // Compression: none
        (262, 3, 1),           // PhotometricInterpretation: BlackIsZero
        (273, 4, data_offset), // StripOffsets
        (277, 3, 1),           // SamplesPerPixel
        (278, 4, height),      // RowsPerStrip
        (279, 4, pixel_bytes), // StripByteCounts
        (339, 3, 1),           // SampleFormat: unsigned integer
    ];
    for (tag, typ, value) in tags {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&typ.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        if typ == 3 {
            b.extend_from_slice(&(value as u16).to_le_bytes());
            b.extend_from_slice(&[0, 0]);
        } else {
            b.extend_from_slice(&value.to_le_bytes());
        }
    }
    b.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    for v in data {
        b.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, b)
}

/// Write `neurons.tsv`.
pub fn write_neurons(path: &Path, neurons: &[NeuronInfo]) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    writeln!(out, "{NEURONS_HEADER}")?;
    for n in neurons {
        let lag = n
            .preferred_lag_s
            .map_or(String::new(), |l| format!("{l:.4}"));
        writeln!(
            out,
            "{}\t{:.3}\t{:.3}\t{:.3}\t{}\t{}\t{}",
            n.id,
            n.x,
            n.y,
            n.radius,
            if n.inhibitory {
                "inhibitory"
            } else {
                "excitatory"
            },
            u8::from(n.movement_related),
            lag
        )?;
    }
    out.flush()
}

/// One frame's row of the truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameRow {
    pub frame_number: u64,
    pub true_us: f64,
    pub device_us: u64,
    pub host_ns: u64,
    pub truth: FrameTruth,
    pub dropped: bool,
}

/// The truth directory being written.
#[derive(Debug)]
pub struct MicroscopeTruth {
    dir: PathBuf,
    frames: BufWriter<File>,
    dff: NpyAppender,
    neurons: usize,
    rows: u64,
    dropped: u64,
    last_flush: Instant,
}

impl MicroscopeTruth {
    /// Create `dir` if needed and write the static files (labels, neurons)
    /// and the headers of the growing ones.
    pub fn create(dir: &Path, m: &Microscope) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let s = m.spec();
        let mut labels =
            NpyAppender::create(&dir.join("labels.npy"), NpyDtype::U2, &[s.width as usize])
                .map_err(npy_error)?;
        labels.append(m.labels()).map_err(npy_error)?;
        labels.sync().map_err(npy_error)?;
        write_tiff_u16(&dir.join("labels.tif"), s.width, s.height, m.labels())?;
        write_neurons(&dir.join("neurons.tsv"), m.neurons())?;
        let mut frames = BufWriter::new(File::create(dir.join("frames_truth.tsv"))?);
        writeln!(frames, "{FRAMES_TRUTH_HEADER}")?;
        frames.flush()?;
        let neurons = m.neurons().len();
        let dff = NpyAppender::create(&dir.join("dff_truth.npy"), NpyDtype::F4, &[neurons])
            .map_err(npy_error)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            frames,
            dff,
            neurons,
            rows: 0,
            dropped: 0,
            last_flush: Instant::now(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Append one frame (flushing if half a second has passed).
    pub fn push(&mut self, row: &FrameRow, dff: &[f32]) -> io::Result<()> {
        assert_eq!(dff.len(), self.neurons, "one dF/F per neuron");
        writeln!(
            self.frames,
            "{}\t{}\t{:.6}\t{}\t{}\t{:.4}\t{:.4}\t{}",
            self.rows,
            row.frame_number,
            row.true_us / 1e6,
            row.device_us,
            row.host_ns,
            row.truth.shift_x_px,
            row.truth.shift_y_px,
            u8::from(row.dropped)
        )?;
        self.dff.append(dff).map_err(npy_error)?;
        self.rows += 1;
        self.dropped += u64::from(row.dropped);
        if self.last_flush.elapsed() >= Duration::from_millis(500) {
            self.flush()?;
        }
        Ok(())
    }

    /// Flush both files, then rewrite the `.npy` row count.
    pub fn flush(&mut self) -> io::Result<()> {
        self.frames.flush()?;
        self.dff.flush_declared().map_err(npy_error)?;
        self.last_flush = Instant::now();
        Ok(())
    }

    /// Flush and sync.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush()?;
        self.frames.get_ref().sync_all()?;
        self.dff.sync().map_err(npy_error)
    }
}
