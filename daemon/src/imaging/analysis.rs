//! Per-frame analysis on the ingest thread: rigid motion correction against a
//! reference (built from the first frames or loaded from an earlier session's
//! mean image), then ROI fluorescence and online dF/F. Writes `motion.tsv`,
//! `f.npy` and `dff.npy`, one row per row of `frames.tsv` (NaN rows for
//! dropped frames, so the files stay row-aligned).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::dff::{BaselineParams, OnlineDff};
use super::motion::{
    MotionCorrector, MotionError, MotionParams, Reference, ReferenceBuilder, Shift,
};
use super::rois::{NeuropilParams, RoiError, RoiSet};
use session_format::{read_npy, ChunkedNpy, NpyData, NpyDtype, StorageError};

pub const MOTION_TSV: &str = "motion.tsv";
pub const F_NPY: &str = "f.npy";
pub const DFF_NPY: &str = "dff.npy";
pub const ROIS_TSV: &str = "rois.tsv";
/// Tiles per side of the coarse grid used when no ROI label image is given.
pub const GRID_TILES: usize = 8;

/// What the analysis needs from the configuration.
#[derive(Debug, Clone)]
pub struct AnalysisSetup {
    pub width: usize,
    pub height: usize,
    pub roi_labels: Option<PathBuf>,
    pub roi_table: Option<PathBuf>,
    pub motion_correction: bool,
    pub reference_image: Option<PathBuf>,
    pub neuropil_coefficient: f64,
    pub baseline: BaselineParams,
}

/// Why the analysis could not start or went on no further. Every message
/// names the file (or the thread) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The ROI label image or its table (`[imaging].roi_labels`,
    /// `roi_table`).
    #[error(transparent)]
    Rois(#[from] RoiError),
    /// The reference image is not float32.
    #[error(
        "{}: the reference image must be float32 (a session's mean_image.npy), found {descr}: \
         fix [imaging].reference_image",
        path.display()
    )]
    ReferenceDtype { path: PathBuf, descr: String },
    /// The reference image's last two axes are not the frame's height x width.
    #[error(
        "{}: reference image is {shape}, the frames are {height} x {width}: give \
         [imaging].reference_image from a session with this frame size",
        path.display()
    )]
    ReferenceShape {
        path: PathBuf,
        /// As numpy prints it, e.g. `(1, 512, 512)`.
        shape: String,
        width: usize,
        height: usize,
    },
    /// The reference image cannot be used for registration.
    #[error("{}: {source}", path.display())]
    Reference { path: PathBuf, source: MotionError },
    /// Building the reference from the first frames, or the corrector.
    #[error("motion correction: {0}")]
    Motion(#[from] MotionError),
    #[error("cannot start the motion reference thread: {0}")]
    MotionThread(std::io::Error),
    #[error("the motion reference thread panicked")]
    MotionThreadPanicked,
    /// Reading the reference image, or writing `f.npy`, `dff.npy`,
    /// `motion.tsv` or `rois.tsv` (the message names the file, the OS error
    /// and, for a full or read-only disk, the fix).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A file of the analysis failed: `action` ("create", "write", "fsync") on
/// `path`, reported as the session's other files are.
fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> AnalysisError {
    AnalysisError::Storage(StorageError::Io {
        action,
        path: path.to_owned(),
        source,
    })
}

enum Motion {
    Off,
    Building(Box<ReferenceBuilder>),
    /// The first frames are in; the reference (and its FFT plans) is being
    /// made on a helper thread so the frame loop never stalls for it.
    Preparing(std::thread::JoinHandle<Result<MotionCorrector, MotionError>>),
    Ready(Box<MotionCorrector>),
}

/// The analysis state of one session.
pub struct Analysis {
    w: usize,
    h: usize,
    rois: RoiSet,
    dff: OnlineDff,
    motion: Motion,
    params: MotionParams,
    shifted: Vec<f32>,
    frame_u16: Vec<u16>,
    f_row: Vec<f32>,
    dff_row: Vec<f32>,
    nan_row: Vec<f32>,
    f_npy: ChunkedNpy,
    dff_npy: ChunkedNpy,
    motion_tsv: std::io::BufWriter<std::fs::File>,
    motion_file: std::fs::File,
    motion_path: PathBuf,
}

impl std::fmt::Debug for Analysis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analysis")
            .field("rois", &self.rois.len())
            .finish_non_exhaustive()
    }
}

/// The motion reference from an earlier session's `mean_image.npy` (float32,
/// `(..., H, W)`; the first H x W plane is used).
pub(crate) fn load_reference(path: &Path, w: usize, h: usize) -> Result<Reference, AnalysisError> {
    let array = read_npy(path)?;
    let NpyData::F4(values) = &array.data else {
        return Err(AnalysisError::ReferenceDtype {
            path: path.to_owned(),
            descr: array.descr,
        });
    };
    if !array.shape.ends_with(&[h as u64, w as u64]) || values.len() < w * h {
        return Err(AnalysisError::ReferenceShape {
            path: path.to_owned(),
            shape: array.shape_text(),
            width: w,
            height: h,
        });
    }
    Reference::from_image(&values[..w * h], w, h).map_err(|source| AnalysisError::Reference {
        path: path.to_owned(),
        source,
    })
}

/// Copy `src` into `dir` as `<stem>.<its extension>` (fsynced); `None`:
/// nothing. The copy keeps the extension, which tells readers the format
/// (a `.tif` label image stays a TIFF).
fn keep_copy(src: Option<&Path>, dir: &Path, stem: &str) -> Result<(), AnalysisError> {
    let Some(src) = src else {
        return Ok(());
    };
    let name = match src.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}.{}", ext.to_ascii_lowercase()),
        None => stem.to_owned(),
    };
    let dst = dir.join(name);
    std::fs::copy(src, &dst).map_err(|e| io_error("copy into the session folder", src, e))?;
    std::fs::File::open(&dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error("fsync", &dst, e))?;
    Ok(())
}

/// `rois.tsv`: which ROI each column of `f.npy` / `dff.npy` is.
fn roi_table(rois: &RoiSet) -> String {
    let mut table = String::from("column\troi\ttype\tpixels\tneuropil_pixels\tx\ty\n");
    for (i, r) in rois.rois.iter().enumerate() {
        table += &format!(
            "{i}\t{}\t{:?}\t{}\t{}\t{:.1}\t{:.1}\n",
            r.id,
            r.kind,
            r.pixels.len(),
            r.neuropil.len(),
            r.centroid.0,
            r.centroid.1
        );
    }
    table.to_lowercase()
}

/// Create `motion.tsv` (never over an existing one) with its header: the
/// buffered writer and the file to fsync.
fn create_motion_tsv(
    path: &Path,
) -> Result<(std::io::BufWriter<std::fs::File>, std::fs::File), AnalysisError> {
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(path)
        .map_err(|e| io_error("create", path, e))?;
    let sync_file = file.try_clone().map_err(|e| io_error("open", path, e))?;
    let mut tsv = std::io::BufWriter::new(file);
    writeln!(tsv, "frame\tdx_px\tdy_px\tpeak\tflagged").map_err(|e| io_error("write", path, e))?;
    Ok((tsv, sync_file))
}

impl Analysis {
    /// Set up ROIs, dF/F and motion correction and create the files in `dir`.
    /// The label image, its table and the reference image, once read and
    /// checked, are copied into `dir`, so the session folder holds what its
    /// ROIs and shifts were computed from.
    pub fn create(setup: &AnalysisSetup, dir: &Path) -> Result<Self, AnalysisError> {
        let (w, h) = (setup.width, setup.height);
        let rois = match &setup.roi_labels {
            Some(labels) => RoiSet::load(
                labels,
                setup.roi_table.as_deref(),
                w,
                h,
                &NeuropilParams::default(),
            )?,
            None => RoiSet::grid(w, h, GRID_TILES),
        };
        // The grid has no neuropil: no subtraction then.
        let coefficient = if setup.roi_labels.is_some() {
            setup.neuropil_coefficient
        } else {
            0.0
        };
        let dff = OnlineDff::new(&rois, &setup.baseline, coefficient);
        let params = MotionParams::default();
        let motion = if !setup.motion_correction {
            Motion::Off
        } else if let Some(path) = &setup.reference_image {
            let reference = load_reference(path, w, h)?;
            Motion::Ready(Box::new(MotionCorrector::new(&reference, params.clone())?))
        } else {
            Motion::Building(Box::new(ReferenceBuilder::new(
                w,
                h,
                ReferenceBuilder::DEFAULT_FRAMES,
            )))
        };
        keep_copy(setup.roi_labels.as_deref(), dir, "roi_labels")?;
        keep_copy(setup.roi_table.as_deref(), dir, "roi_table")?;
        if setup.motion_correction {
            keep_copy(setup.reference_image.as_deref(), dir, "reference_image")?;
        }
        let n = rois.len();
        let rois_path = dir.join(ROIS_TSV);
        std::fs::write(&rois_path, roi_table(&rois))
            .map_err(|e| io_error("write", &rois_path, e))?;
        let f_npy = ChunkedNpy::create(dir, F_NPY, NpyDtype::F4, &[n])?;
        let dff_npy = ChunkedNpy::create(dir, DFF_NPY, NpyDtype::F4, &[n])?;
        let motion_path = dir.join(MOTION_TSV);
        let (motion_tsv, motion_file) = create_motion_tsv(&motion_path)?;
        Ok(Self {
            w,
            h,
            dff,
            motion,
            params,
            shifted: vec![0.0; w * h],
            frame_u16: vec![0; w * h],
            f_row: vec![0.0; n],
            dff_row: vec![0.0; n],
            nan_row: vec![f32::NAN; n],
            f_npy,
            dff_npy,
            motion_tsv,
            motion_file,
            motion_path,
            rois,
        })
    }

    /// ROI outlines and kinds, for the preview.
    pub fn rois(&self) -> &RoiSet {
        &self.rois
    }

    /// The latest dF/F row.
    pub fn dff_row(&self) -> &[f32] {
        &self.dff_row
    }

    /// Analyse one frame (the first channel, H x W).
    pub fn frame(
        &mut self,
        frame_number: u64,
        pixels: &[u16],
    ) -> Result<Option<Shift>, AnalysisError> {
        let first = &pixels[..self.w * self.h];
        let mut shift = None;
        match &mut self.motion {
            Motion::Off => {}
            Motion::Building(b) => {
                if b.push(first)? {
                    let builder = (**b).clone();
                    let params = self.params.clone();
                    let job = std::thread::Builder::new()
                        .name("rig-motion-ref".into())
                        .spawn(move || {
                            let reference = builder.build(&params)?;
                            MotionCorrector::new(&reference, params)
                        })
                        .map_err(AnalysisError::MotionThread)?;
                    self.motion = Motion::Preparing(job);
                }
            }
            Motion::Preparing(job) if job.is_finished() => {
                let Motion::Preparing(job) = std::mem::replace(&mut self.motion, Motion::Off)
                else {
                    unreachable!("matched above")
                };
                let corrector = job
                    .join()
                    .map_err(|_| AnalysisError::MotionThreadPanicked)??;
                self.motion = Motion::Ready(Box::new(corrector));
            }
            Motion::Preparing(_) => {}
            Motion::Ready(m) => {
                let s = m.register(first);
                m.apply(first, s, &mut self.shifted);
                for (o, &v) in self.frame_u16.iter_mut().zip(&self.shifted) {
                    *o = v.round().clamp(0.0, 65535.0) as u16;
                }
                shift = Some(s);
            }
        }
        let input: &[u16] = if shift.is_some() {
            &self.frame_u16
        } else {
            first
        };
        self.dff.push(input, &mut self.f_row, &mut self.dff_row);
        self.f_npy.append(&self.f_row)?;
        self.dff_npy.append(&self.dff_row)?;
        match shift {
            Some(s) => writeln!(
                self.motion_tsv,
                "{frame_number}\t{:.3}\t{:.3}\t{:.3}\t{}",
                s.dx,
                s.dy,
                s.peak,
                u8::from(s.flagged)
            ),
            // Building the reference (or correction off): no shift measured.
            None => writeln!(self.motion_tsv, "{frame_number}\t\t\t\t"),
        }
        .map_err(|e| io_error("write", &self.motion_path, e))?;
        Ok(shift)
    }

    /// A frame that was dropped: NaN rows keep the arrays aligned with frames.tsv.
    pub fn dropped(&mut self, frame_number: u64) -> Result<(), AnalysisError> {
        self.dff.skip(1);
        self.f_npy.append(&self.nan_row)?;
        self.dff_npy.append(&self.nan_row)?;
        writeln!(self.motion_tsv, "{frame_number}\t\t\t\t")
            .map_err(|e| io_error("write", &self.motion_path, e))
    }

    /// Close the open chunks of `f.npy` and `dff.npy` and start the next
    /// ones. The ingest calls this for every array at the same frame.
    pub fn roll(&mut self) -> Result<(), AnalysisError> {
        self.f_npy.roll()?;
        self.dff_npy.roll()?;
        Ok(())
    }

    /// Make every row so far durable: `f.npy`, `dff.npy`, `motion.tsv`.
    pub fn sync(&mut self) -> Result<(), AnalysisError> {
        self.f_npy.sync()?;
        self.dff_npy.sync()?;
        self.motion_tsv
            .flush()
            .map_err(|e| io_error("write", &self.motion_path, e))?;
        self.motion_file
            .sync_data()
            .map_err(|e| io_error("fsync", &self.motion_path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use session_format::NpyAppender;

    #[test]
    fn a_reference_image_is_read_from_a_mean_image_and_checked() {
        let dir = std::env::temp_dir().join(format!("rigd-analysis-ref-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (w, h) = (40, 32);
        let image: Vec<f32> = (0..2 * w * h).map(|i| ((i * 7919) % 997) as f32).collect();
        let write = |name: &str, shape: &[usize], values: &[f32]| {
            let path = dir.join(name);
            let mut npy = NpyAppender::create(&path, NpyDtype::F4, &shape[1..]).expect("create");
            npy.append(values).expect("append");
            npy.sync().expect("sync");
            path
        };
        // A session's mean_image.npy: (C, H, W), the first channel is used.
        let good = write("mean_image.npy", &[2, h, w], &image);
        assert!(load_reference(&good, w, h).is_ok());

        let small = write("small.npy", &[1, h - 1, w], &image[..(h - 1) * w]);
        let e = load_reference(&small, w, h)
            .expect_err("too small")
            .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: reference image is (1, 31, 40)",
                small.display()
            )) && e.contains("the frames are 32 x 40")
                && e.contains("[imaging].reference_image"),
            "{e}"
        );

        let labels = dir.join("labels.npy");
        let mut npy = NpyAppender::create(&labels, NpyDtype::U2, &[w]).expect("create");
        npy.append(&vec![1u16; w * h]).expect("append");
        npy.sync().expect("sync");
        let e = load_reference(&labels, w, h)
            .expect_err("uint16")
            .to_string();
        assert!(
            e.contains("must be float32") && e.contains("found <u2"),
            "{e}"
        );

        let e = load_reference(&dir.join("none.npy"), w, h)
            .expect_err("missing")
            .to_string();
        assert!(
            e.starts_with("cannot read ") && e.contains("none.npy"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
