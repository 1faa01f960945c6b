//! Per-frame analysis on the ingest thread: rigid motion correction against a
//! reference (built from the first frames or loaded from an earlier session's
//! mean image), then ROI fluorescence and online dF/F. Writes `motion.tsv`,
//! `f.npy` and `dff.npy`, one row per row of `frames.tsv` (NaN rows for
//! dropped frames, so the files stay row-aligned).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::dff::{BaselineParams, OnlineDff};
use super::motion::{MotionCorrector, MotionParams, Reference, ReferenceBuilder, Shift};
use super::rois::{NeuropilParams, RoiSet};
use session_format::{read_npy_header, ChunkedNpy, NpyDtype};

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

enum Motion {
    Off,
    Building(Box<ReferenceBuilder>),
    /// The first frames are in; the reference (and its FFT plans) is being
    /// made on a helper thread so the frame loop never stalls for it.
    Preparing(std::thread::JoinHandle<Result<MotionCorrector, String>>),
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
}

impl std::fmt::Debug for Analysis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analysis")
            .field("rois", &self.rois.len())
            .finish_non_exhaustive()
    }
}

fn load_reference(path: &Path, w: usize, h: usize) -> Result<Reference, String> {
    let header = read_npy_header(path).map_err(|e| e.to_string())?;
    if header.descr != "<f4" || header.fortran_order {
        return Err(format!(
            "{}: reference image must be float32 C-order (a session's mean_image.npy), found {}",
            path.display(),
            header.descr
        ));
    }
    let n: u64 = header.shape.iter().product();
    if n < (w * h) as u64
        || header
            .shape
            .iter()
            .rev()
            .take(2)
            .copied()
            .collect::<Vec<_>>()
            != [w as u64, h as u64]
    {
        return Err(format!(
            "{}: reference image is {:?}, the frames are {h} x {w}",
            path.display(),
            header.shape
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let start = header.data_offset as usize;
    let data = bytes
        .get(start..start + 4 * w * h)
        .ok_or_else(|| format!("{}: truncated", path.display()))?;
    let image: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Reference::from_image(&image, w, h).map_err(|e| format!("{}: {e}", path.display()))
}

impl Analysis {
    /// Set up ROIs, dF/F and motion correction and create the files in `dir`.
    pub fn create(setup: &AnalysisSetup, dir: &Path) -> Result<Self, String> {
        let (w, h) = (setup.width, setup.height);
        let rois = match &setup.roi_labels {
            Some(labels) => RoiSet::load(
                labels,
                setup.roi_table.as_deref(),
                w,
                h,
                &NeuropilParams::default(),
            )
            .map_err(|e| e.to_string())?,
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
            Motion::Ready(Box::new(
                MotionCorrector::new(&reference, params.clone()).map_err(|e| e.to_string())?,
            ))
        } else {
            Motion::Building(Box::new(ReferenceBuilder::new(
                w,
                h,
                ReferenceBuilder::DEFAULT_FRAMES,
            )))
        };
        let n = rois.len();
        // Which ROI each column of f.npy / dff.npy is.
        let mut table = format!("column\troi\ttype\tpixels\tneuropil_pixels\tx\ty\n");
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
        std::fs::write(dir.join(ROIS_TSV), table.to_lowercase())
            .map_err(|e| format!("{ROIS_TSV}: {e}"))?;
        let f_npy =
            ChunkedNpy::create(dir, F_NPY, NpyDtype::F4, &[n]).map_err(|e| e.to_string())?;
        let dff_npy =
            ChunkedNpy::create(dir, DFF_NPY, NpyDtype::F4, &[n]).map_err(|e| e.to_string())?;
        let path = dir.join(MOTION_TSV);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let motion_file = file.try_clone().map_err(|e| e.to_string())?;
        let mut motion_tsv = std::io::BufWriter::new(file);
        writeln!(motion_tsv, "frame\tdx_px\tdy_px\tpeak\tflagged").map_err(|e| e.to_string())?;
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
    pub fn frame(&mut self, frame_number: u64, pixels: &[u16]) -> Result<Option<Shift>, String> {
        let first = &pixels[..self.w * self.h];
        let mut shift = None;
        match &mut self.motion {
            Motion::Off => {}
            Motion::Building(b) => {
                if b.push(first).map_err(|e| e.to_string())? {
                    let builder = (**b).clone();
                    let params = self.params.clone();
                    let job = std::thread::Builder::new()
                        .name("rig-motion-ref".into())
                        .spawn(move || {
                            let reference = builder.build(&params).map_err(|e| e.to_string())?;
                            MotionCorrector::new(&reference, params).map_err(|e| e.to_string())
                        })
                        .map_err(|e| format!("cannot start the motion reference thread: {e}"))?;
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
                    .map_err(|_| "the motion reference thread panicked".to_owned())??;
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
        self.f_npy.append(&self.f_row).map_err(|e| e.to_string())?;
        self.dff_npy
            .append(&self.dff_row)
            .map_err(|e| e.to_string())?;
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
        .map_err(|e| format!("{MOTION_TSV}: {e}"))?;
        Ok(shift)
    }

    /// A frame that was dropped: NaN rows keep the arrays aligned with frames.tsv.
    pub fn dropped(&mut self, frame_number: u64) -> Result<(), String> {
        self.f_npy
            .append(&self.nan_row)
            .map_err(|e| e.to_string())?;
        self.dff_npy
            .append(&self.nan_row)
            .map_err(|e| e.to_string())?;
        writeln!(self.motion_tsv, "{frame_number}\t\t\t\t")
            .map_err(|e| format!("{MOTION_TSV}: {e}"))
    }

    /// Close the open chunks of `f.npy` and `dff.npy` and start the next
    /// ones. The ingest calls this for every array at the same frame.
    pub fn roll(&mut self) -> Result<(), String> {
        self.f_npy.roll().map_err(|e| e.to_string())?;
        self.dff_npy.roll().map_err(|e| e.to_string())
    }

    pub fn sync(&mut self) -> Result<(), String> {
        self.f_npy.sync().map_err(|e| e.to_string())?;
        self.dff_npy.sync().map_err(|e| e.to_string())?;
        self.motion_tsv
            .flush()
            .map_err(|e| format!("{MOTION_TSV}: {e}"))?;
        self.motion_file
            .sync_data()
            .map_err(|e| format!("{MOTION_TSV}: {e}"))
    }
}
