//! Regions of interest (ROIs) for online fluorescence extraction.
//!
//! ROIs come from a *label image*: a 2-D integer image the size of a frame in
//! which 0 is background and every pixel of ROI `k` holds `k` (suite2p, CaImAn
//! and Cellpose can all export one). Two formats are read:
//!
//! * baseline TIFF: one page, little- or big-endian, uncompressed, 8/16/32-bit
//!   grayscale (one sample per pixel), stored in strips. Compression, tiles,
//!   RGB/palette images, BigTIFF, floating-point samples and multi-page files are
//!   refused with an error naming the file and the unsupported feature;
//! * NPY (`.npy`, as written by the simulator's `labels.npy`): a 2-D C-order
//!   array of `uint8`, `uint16`, `uint32`, `int32` (non-negative) or `int64`
//!   (non-negative, < 2^32).
//!
//! An optional sidecar TSV table gives each ROI a cell type and a note: a header
//! line with the columns `roi` and `type` (and optionally `note`), then one line
//! per ROI; `type` is `excitatory`, `inhibitory` or empty/`unknown`.
//!
//! # Neuropil rule
//!
//! The neuropil mask of each ROI follows suite2p's idea (a disc around the cell,
//! minus all cells), with this exact rule ([`NeuropilParams`]):
//!
//! 1. *forbidden* pixels are every ROI pixel of every ROI, dilated by
//!    `inner_gap_px` pixels with a square (Chebyshev) structuring element;
//! 2. the ROI's radius `r` is the largest Euclidean distance from its centroid
//!    to any of its pixel centres;
//! 3. the outer radius `R` is the smallest radius such that the disc of radius
//!    `R` about the centroid holds at least `min_pixels` non-forbidden pixels,
//!    but never less than `r + inner_gap_px + min_ring_px` and never more than
//!    `r + max_extra_radius_px`;
//! 4. the neuropil is every non-forbidden pixel whose centre lies within `R` of
//!    the centroid.
//!
//! A neuropil mask therefore never contains a pixel of any ROI nor a pixel
//! within `inner_gap_px` of one. It may be empty (e.g. a field packed with ROIs);
//! the neuropil signal of such an ROI is then taken as 0.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use session_format::NpyData;

/// What went wrong reading ROIs.
#[derive(Debug, thiserror::Error)]
pub enum RoiError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is malformed or uses a feature this reader does not support.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong or unsupported.
        message: String,
    },
    /// The NPY file itself is unreadable (not NPY, a damaged header, an
    /// unsupported dtype, truncated data); the message names the file.
    #[error(transparent)]
    Npy(#[from] session_format::StorageError),
    /// The label image does not match the frame geometry.
    #[error(
        "{path}: label image is {label_width}x{label_height} (width x height) but frames are \
         {frame_width}x{frame_height}"
    )]
    Geometry {
        /// The label image file.
        path: PathBuf,
        /// Label image width.
        label_width: usize,
        /// Label image height.
        label_height: usize,
        /// Frame width.
        frame_width: usize,
        /// Frame height.
        frame_height: usize,
    },
}

/// A row of the sidecar table names an ROI the label image does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "ROI table names roi {0} which is not in the label image: remove that line, or give the \
     table that belongs to this label image"
)]
pub struct UnknownRoi(pub u32);

fn format_err(path: &Path, message: impl Into<String>) -> RoiError {
    RoiError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A 2-D label image: `labels[y * width + x]`, 0 = background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelImage {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Row-major labels.
    pub labels: Vec<u32>,
}

/// The cell type of an ROI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoiKind {
    /// Not given (no table, or an empty type), or a grid tile.
    #[default]
    Unknown,
    /// Excitatory neuron.
    Excitatory,
    /// Inhibitory neuron (e.g. labelled red).
    Inhibitory,
}

impl fmt::Display for RoiKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoiKind::Unknown => "unknown",
            RoiKind::Excitatory => "excitatory",
            RoiKind::Inhibitory => "inhibitory",
        })
    }
}

/// One ROI.
#[derive(Debug, Clone, PartialEq)]
pub struct Roi {
    /// The label value in the label image (grid tiles: 1-based tile number).
    pub id: u32,
    /// Flat pixel indices `y * width + x`, ascending.
    pub pixels: Vec<u32>,
    /// Flat indices of the neuropil mask, ascending (see the module docs).
    pub neuropil: Vec<u32>,
    /// Centroid `(x, y)` in pixels.
    pub centroid: (f32, f32),
    /// Cell type from the sidecar table.
    pub kind: RoiKind,
    /// Note from the sidecar table (empty if none).
    pub note: String,
    /// The ROI's contour for the preview: a closed polygon along its pixel
    /// edges, vertices at pixel corners ([`crate::preview::roi_contour`]).
    pub outline: Vec<(u16, u16)>,
}

/// The ROIs of a field of view.
#[derive(Debug, Clone, PartialEq)]
pub struct RoiSet {
    /// Frame width, pixels.
    pub width: usize,
    /// Frame height, pixels.
    pub height: usize,
    /// ROIs in ascending `id` order.
    pub rois: Vec<Roi>,
}

/// Parameters of the neuropil rule (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NeuropilParams {
    /// Gap between any ROI and the neuropil, pixels. Default 2 (suite2p's
    /// `inner_neuropil_radius`).
    pub inner_gap_px: u32,
    /// Minimum ring width beyond the gap, pixels. Default 3.
    pub min_ring_px: f32,
    /// Target neuropil pixel count. Default 350 (suite2p's
    /// `min_neuropil_pixels`).
    pub min_pixels: usize,
    /// Cap on the outer radius beyond the ROI radius, pixels. Default 60.
    pub max_extra_radius_px: f32,
}

impl Default for NeuropilParams {
    fn default() -> Self {
        Self {
            inner_gap_px: 2,
            min_ring_px: 3.0,
            min_pixels: 350,
            max_extra_radius_px: 60.0,
        }
    }
}

/// One row of the sidecar ROI table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoiTableRow {
    /// The ROI's label value.
    pub roi: u32,
    /// Its cell type.
    pub kind: RoiKind,
    /// Free text.
    pub note: String,
}

impl RoiSet {
    /// Load ROIs: a label image (`.tif`/`.tiff` or `.npy`), an optional sidecar
    /// table, checked against the frame geometry, neuropil per `neuropil`.
    pub fn load(
        labels: &Path,
        table: Option<&Path>,
        frame_width: usize,
        frame_height: usize,
        neuropil: &NeuropilParams,
    ) -> Result<RoiSet, RoiError> {
        let img = read_label_image(labels)?;
        if img.width != frame_width || img.height != frame_height {
            return Err(RoiError::Geometry {
                path: labels.to_path_buf(),
                label_width: img.width,
                label_height: img.height,
                frame_width,
                frame_height,
            });
        }
        let mut set = RoiSet::from_labels(&img, neuropil);
        if let Some(t) = table {
            let rows = read_roi_table(t)?;
            set.apply_table(&rows)
                .map_err(|e| format_err(t, e.to_string()))?;
        }
        Ok(set)
    }

    /// Build ROIs from a label image (ids in ascending label order).
    pub fn from_labels(img: &LabelImage, np: &NeuropilParams) -> RoiSet {
        let (w, h) = (img.width, img.height);
        let mut by_id: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (i, &l) in img.labels.iter().enumerate() {
            if l != 0 {
                by_id.entry(l).or_default().push(i as u32);
            }
        }
        // Forbidden mask: all ROI pixels dilated by the gap (separable square).
        let g = np.inner_gap_px as usize;
        let mut rowdil = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                if img.labels[y * w + x] != 0 {
                    let x0 = x.saturating_sub(g);
                    let x1 = (x + g).min(w.saturating_sub(1));
                    for v in &mut rowdil[y * w + x0..=y * w + x1] {
                        *v = true;
                    }
                }
            }
        }
        let mut forbidden = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                if rowdil[y * w + x] {
                    let y0 = y.saturating_sub(g);
                    let y1 = (y + g).min(h.saturating_sub(1));
                    for yy in y0..=y1 {
                        forbidden[yy * w + x] = true;
                    }
                }
            }
        }
        let mut rois = Vec::with_capacity(by_id.len());
        let mut cand: Vec<(f32, u32)> = Vec::new();
        for (id, pixels) in by_id {
            let n = pixels.len() as f64;
            let (mut sx, mut sy) = (0.0f64, 0.0f64);
            for &p in &pixels {
                sx += (p as usize % w) as f64;
                sy += (p as usize / w) as f64;
            }
            let (cx, cy) = ((sx / n) as f32, (sy / n) as f32);
            let mut r2max = 0.0f32;
            for &p in &pixels {
                let dx = (p as usize % w) as f32 - cx;
                let dy = (p as usize / w) as f32 - cy;
                r2max = r2max.max(dx * dx + dy * dy);
            }
            let r = r2max.sqrt();
            let r_min = r + np.inner_gap_px as f32 + np.min_ring_px;
            let r_max = (r + np.max_extra_radius_px).max(r_min);
            // Candidate (non-forbidden) pixels within r_max, sorted by distance.
            cand.clear();
            let x0 = ((cx - r_max).floor().max(0.0)) as usize;
            let x1 = ((cx + r_max).ceil() as usize).min(w.saturating_sub(1));
            let y0 = ((cy - r_max).floor().max(0.0)) as usize;
            let y1 = ((cy + r_max).ceil() as usize).min(h.saturating_sub(1));
            let rmax2 = r_max * r_max;
            for y in y0..=y1 {
                for x in x0..=x1 {
                    let i = y * w + x;
                    if forbidden[i] {
                        continue;
                    }
                    let dx = x as f32 - cx;
                    let dy = y as f32 - cy;
                    let d2 = dx * dx + dy * dy;
                    if d2 <= rmax2 {
                        cand.push((d2, i as u32));
                    }
                }
            }
            cand.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut r2 = r_min * r_min;
            if cand.len() >= np.min_pixels && np.min_pixels > 0 {
                r2 = r2.max(cand[np.min_pixels - 1].0);
            } else if !cand.is_empty() {
                r2 = rmax2;
            }
            let mut neuropil: Vec<u32> = cand.iter().filter(|c| c.0 <= r2).map(|c| c.1).collect();
            neuropil.sort_unstable();
            let outline = outline_of(&img.labels, w, h, id, &pixels);
            rois.push(Roi {
                id,
                pixels,
                neuropil,
                centroid: (cx, cy),
                kind: RoiKind::Unknown,
                note: String::new(),
                outline,
            });
        }
        RoiSet {
            width: w,
            height: h,
            rois,
        }
    }

    /// "No ROIs": a `tiles` x `tiles` grid of rectangular tiles covering the
    /// frame (the last row/column of tiles absorbs the remainder), no neuropil.
    /// Tile ids are 1-based, row-major.
    pub fn grid(width: usize, height: usize, tiles: usize) -> RoiSet {
        let tiles = tiles.max(1).min(width.max(1)).min(height.max(1));
        let mut labels = vec![0u32; width * height];
        for y in 0..height {
            let ty = (y * tiles / height.max(1)).min(tiles - 1);
            for x in 0..width {
                let tx = (x * tiles / width.max(1)).min(tiles - 1);
                labels[y * width + x] = (ty * tiles + tx + 1) as u32;
            }
        }
        let img = LabelImage {
            width,
            height,
            labels,
        };
        let mut set = RoiSet::from_labels(
            &img,
            &NeuropilParams {
                min_pixels: 0,
                ..NeuropilParams::default()
            },
        );
        for r in &mut set.rois {
            r.neuropil.clear();
        }
        set
    }

    /// Apply sidecar table rows (cell type, note). Every row must name an ROI
    /// present in the label image.
    pub fn apply_table(&mut self, rows: &[RoiTableRow]) -> Result<(), UnknownRoi> {
        for row in rows {
            match self.rois.binary_search_by_key(&row.roi, |r| r.id) {
                Ok(i) => {
                    self.rois[i].kind = row.kind;
                    self.rois[i].note = row.note.clone();
                }
                Err(_) => return Err(UnknownRoi(row.roi)),
            }
        }
        Ok(())
    }

    /// Number of ROIs.
    pub fn len(&self) -> usize {
        self.rois.len()
    }

    /// True when there are no ROIs.
    pub fn is_empty(&self) -> bool {
        self.rois.is_empty()
    }
}

fn outline_of(labels: &[u32], w: usize, h: usize, id: u32, pixels: &[u32]) -> Vec<(u16, u16)> {
    crate::preview::roi_contour(labels, w, h, id, pixels)
}

/// Read a label image, by extension: `.npy` as NPY, anything else as TIFF.
pub fn read_label_image(path: &Path) -> Result<LabelImage, RoiError> {
    let bytes = std::fs::read(path).map_err(|source| RoiError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let is_npy = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if is_npy || bytes.starts_with(b"\x93NUMPY") {
        parse_npy_labels(&bytes, path)
    } else {
        parse_tiff_labels(&bytes, path)
    }
}

/// Read the sidecar ROI table (TSV with columns `roi`, `type`, optional `note`).
pub fn read_roi_table(path: &Path) -> Result<Vec<RoiTableRow>, RoiError> {
    let text = std::fs::read_to_string(path).map_err(|source| RoiError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_roi_table(&text, path)
}

/// Parse the sidecar ROI table from text; `path` only names it in errors.
pub fn parse_roi_table(text: &str, path: &Path) -> Result<Vec<RoiTableRow>, RoiError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
    let Some((_, header)) = lines.next() else {
        return Ok(Vec::new());
    };
    let cols: Vec<String> = header
        .split('\t')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let find = |name: &str| cols.iter().position(|c| c == name);
    let roi_col = find("roi").ok_or_else(|| format_err(path, "ROI table has no `roi` column"))?;
    let type_col =
        find("type").ok_or_else(|| format_err(path, "ROI table has no `type` column"))?;
    let note_col = find("note");
    let mut rows = Vec::new();
    for (ln, line) in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let get = |c: usize| f.get(c).map(|s| s.trim()).unwrap_or("");
        let roi: u32 = get(roi_col).parse().map_err(|_| {
            format_err(
                path,
                format!(
                    "line {}: roi `{}` is not a positive integer",
                    ln + 1,
                    get(roi_col)
                ),
            )
        })?;
        if roi == 0 {
            return Err(format_err(
                path,
                format!("line {}: roi 0 is background", ln + 1),
            ));
        }
        let kind = match get(type_col).to_ascii_lowercase().as_str() {
            "excitatory" => RoiKind::Excitatory,
            "inhibitory" => RoiKind::Inhibitory,
            "" | "unknown" => RoiKind::Unknown,
            other => {
                return Err(format_err(
                    path,
                    format!(
                        "line {}: type `{other}` is not excitatory, inhibitory or unknown",
                        ln + 1
                    ),
                ))
            }
        };
        let note = note_col.map(|c| get(c).to_string()).unwrap_or_default();
        rows.push(RoiTableRow { roi, kind, note });
    }
    Ok(rows)
}

// ---------------------------------------------------------------- TIFF

struct Tiff<'a> {
    b: &'a [u8],
    le: bool,
    path: &'a Path,
}

impl Tiff<'_> {
    fn err(&self, m: impl Into<String>) -> RoiError {
        format_err(self.path, m)
    }
    fn u16_at(&self, off: usize) -> Result<u16, RoiError> {
        let s = self
            .b
            .get(off..off + 2)
            .ok_or_else(|| self.err(format!("truncated TIFF (reading offset {off})")))?;
        let a = [s[0], s[1]];
        Ok(if self.le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        })
    }
    fn u32_at(&self, off: usize) -> Result<u32, RoiError> {
        let s = self
            .b
            .get(off..off + 4)
            .ok_or_else(|| self.err(format!("truncated TIFF (reading offset {off})")))?;
        let a = [s[0], s[1], s[2], s[3]];
        Ok(if self.le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    }
    /// Values of an IFD entry (BYTE, SHORT or LONG), as u32.
    fn values(&self, entry: usize) -> Result<Vec<u32>, RoiError> {
        let tag = self.u16_at(entry)?;
        let typ = self.u16_at(entry + 2)?;
        let count = self.u32_at(entry + 4)? as usize;
        let size = match typ {
            1 => 1,
            3 => 2,
            4 => 4,
            _ => {
                return Err(self.err(format!(
                    "TIFF tag {tag} has field type {typ}; only BYTE, SHORT and LONG are supported"
                )))
            }
        };
        let total = size * count;
        let base = if total <= 4 {
            entry + 8
        } else {
            self.u32_at(entry + 8)? as usize
        };
        if base.checked_add(total).map_or(true, |e| e > self.b.len()) {
            return Err(self.err(format!("truncated TIFF (tag {tag} values out of range)")));
        }
        (0..count)
            .map(|i| match size {
                1 => Ok(u32::from(self.b[base + i])),
                2 => self.u16_at(base + 2 * i).map(u32::from),
                _ => self.u32_at(base + 4 * i),
            })
            .collect()
    }
}

/// Parse a baseline TIFF label image from bytes; `path` only names it in errors.
pub fn parse_tiff_labels(bytes: &[u8], path: &Path) -> Result<LabelImage, RoiError> {
    let le = match bytes.get(0..2) {
        Some(b"II") => true,
        Some(b"MM") => false,
        _ => {
            return Err(format_err(
                path,
                "not a TIFF file (no II/MM byte-order mark)",
            ))
        }
    };
    let t = Tiff { b: bytes, le, path };
    match t.u16_at(2)? {
        42 => {}
        43 => return Err(t.err("BigTIFF is not supported (use a classic TIFF)")),
        m => return Err(t.err(format!("not a TIFF file (magic {m}, expected 42)"))),
    }
    let ifd = t.u32_at(4)? as usize;
    let n = t.u16_at(ifd)? as usize;
    let mut width = None;
    let mut height = None;
    let mut bits = vec![1u32];
    let mut compression = 1;
    let mut photometric = None;
    let mut spp = 1;
    let mut rows_per_strip = u32::MAX;
    let mut offsets = None;
    let mut counts = None;
    let mut sample_format = 1;
    let mut planar = 1;
    for k in 0..n {
        let e = ifd + 2 + 12 * k;
        let tag = t.u16_at(e)?;
        let first = |t: &Tiff<'_>| -> Result<u32, RoiError> {
            t.values(e)?
                .first()
                .copied()
                .ok_or_else(|| t.err(format!("TIFF tag {tag} has no value")))
        };
        match tag {
            256 => width = Some(first(&t)? as usize),
            257 => height = Some(first(&t)? as usize),
            258 => bits = t.values(e)?,
            259 => compression = first(&t)?,
            262 => photometric = Some(first(&t)?),
            273 => offsets = Some(t.values(e)?),
            277 => spp = first(&t)?,
            278 => rows_per_strip = first(&t)?,
            279 => counts = Some(t.values(e)?),
            284 => planar = first(&t)?,
            322..=325 => {
                return Err(t.err("tiled TIFF is not supported (strips only)"));
            }
            339 => sample_format = first(&t)?,
            _ => {}
        }
    }
    let next_ifd = t.u32_at(ifd + 2 + 12 * n)?;
    if compression != 1 {
        let name = match compression {
            5 => " (LZW)",
            7 => " (JPEG)",
            8 | 32946 => " (Deflate)",
            32773 => " (PackBits)",
            _ => "",
        };
        return Err(t.err(format!(
            "compressed TIFF (Compression={compression}{name}) is not supported; save the \
             label image uncompressed"
        )));
    }
    if spp != 1 || photometric == Some(2) || bits.len() > 1 {
        return Err(t.err(format!(
            "RGB / multi-sample TIFF ({spp} samples per pixel, photometric {}) is not \
             supported; a label image must be one-channel grayscale",
            photometric.map_or("absent".to_string(), |p| p.to_string())
        )));
    }
    match photometric {
        Some(0) | Some(1) | None => {}
        Some(3) => return Err(t.err("palette TIFF is not supported (grayscale only)")),
        Some(p) => {
            return Err(t.err(format!(
                "photometric interpretation {p} is not supported (grayscale only)"
            )))
        }
    }
    let _ = planar; // one sample per pixel: planar configuration is irrelevant
    let bps = bits[0];
    if !matches!(bps, 8 | 16 | 32) {
        return Err(t.err(format!(
            "{bps}-bit samples are not supported (8, 16 or 32-bit only)"
        )));
    }
    let signed = match sample_format {
        1 => false,
        2 => true,
        3 => return Err(t.err("floating-point TIFF is not supported (integer labels only)")),
        s => return Err(t.err(format!("SampleFormat {s} is not supported"))),
    };
    if next_ifd != 0 {
        return Err(t.err("multi-page TIFF is not supported (one page only)"));
    }
    let width = width.ok_or_else(|| t.err("TIFF has no ImageWidth"))?;
    let height = height.ok_or_else(|| t.err("TIFF has no ImageLength"))?;
    let offsets = offsets.ok_or_else(|| t.err("TIFF has no StripOffsets"))?;
    let bpp = (bps / 8) as usize;
    let rps = (rows_per_strip as usize).min(height).max(1);
    let nstrips = height.div_ceil(rps);
    if offsets.len() < nstrips {
        return Err(t.err(format!(
            "TIFF has {} strips, expected {nstrips} for {height} rows at {rps} rows per strip",
            offsets.len()
        )));
    }
    let mut labels = Vec::with_capacity(width * height);
    for (s, &offset) in offsets.iter().enumerate().take(nstrips) {
        let rows = rps.min(height - s * rps);
        let need = rows * width * bpp;
        if let Some(c) = counts.as_ref().and_then(|c| c.get(s)) {
            if (*c as usize) < need {
                return Err(t.err(format!("strip {s} has {c} bytes, expected {need}")));
            }
        }
        let off = offset as usize;
        let data = bytes
            .get(off..off + need)
            .ok_or_else(|| t.err(format!("truncated TIFF (strip {s} out of range)")))?;
        for px in data.chunks_exact(bpp) {
            let v = match bpp {
                1 => {
                    if signed && px[0] >= 0x80 {
                        return Err(t.err("negative label in label image"));
                    }
                    u32::from(px[0])
                }
                2 => {
                    let v = if le {
                        u16::from_le_bytes([px[0], px[1]])
                    } else {
                        u16::from_be_bytes([px[0], px[1]])
                    };
                    if signed && v >= 0x8000 {
                        return Err(t.err("negative label in label image"));
                    }
                    u32::from(v)
                }
                _ => {
                    let a = [px[0], px[1], px[2], px[3]];
                    let v = if le {
                        u32::from_le_bytes(a)
                    } else {
                        u32::from_be_bytes(a)
                    };
                    if signed && v >= 0x8000_0000 {
                        return Err(t.err("negative label in label image"));
                    }
                    v
                }
            };
            labels.push(v);
        }
    }
    Ok(LabelImage {
        width,
        height,
        labels,
    })
}

// ---------------------------------------------------------------- NPY

/// Parse an NPY label image from bytes; `path` only names it in errors. The
/// file format is read by [`session_format::parse_npy`]; this checks that
/// it is a 2-D array of non-negative integer labels.
pub fn parse_npy_labels(bytes: &[u8], path: &Path) -> Result<LabelImage, RoiError> {
    let array = session_format::parse_npy(bytes, path)?;
    let err = |m: String| format_err(path, m);
    let &[height, width] = array.shape.as_slice() else {
        return Err(err(format!(
            "NPY label image must be 2-D, got shape {}",
            array.shape_text()
        )));
    };
    let negative = || err("negative label in label image".into());
    let too_large = |v: u64| err(format!("label {v} exceeds u32"));
    let labels: Vec<u32> = match array.data {
        NpyData::U1(v) => v.into_iter().map(u32::from).collect(),
        NpyData::U2(v) => v.into_iter().map(u32::from).collect(),
        NpyData::U4(v) => v,
        NpyData::I4(v) => v
            .into_iter()
            .map(|l| u32::try_from(l).map_err(|_| negative()))
            .collect::<Result<_, _>>()?,
        NpyData::I8(v) => v
            .into_iter()
            .map(|l| {
                let l = u64::try_from(l).map_err(|_| negative())?;
                u32::try_from(l).map_err(|_| too_large(l))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(err(format!(
                "NPY dtype {} is not supported (uint8/uint16/uint32/int32/int64 labels only)",
                array.descr
            )))
        }
    };
    Ok(LabelImage {
        width: usize::try_from(width).map_err(|_| too_large(width))?,
        height: usize::try_from(height).map_err(|_| too_large(height))?,
        labels,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal baseline TIFF writer for tests: one strip per `rows_per_strip`
    /// rows, uncompressed, grayscale, `bits` = 8/16/32.
    pub(crate) fn write_tiff(
        w: usize,
        h: usize,
        vals: &[u32],
        bits: u16,
        big_endian: bool,
        rows_per_strip: usize,
        compression: u16,
    ) -> Vec<u8> {
        let p16 = |v: u16| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let p32 = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let bpp = usize::from(bits / 8);
        let mut out = Vec::new();
        out.extend_from_slice(if big_endian { b"MM" } else { b"II" });
        out.extend_from_slice(&p16(42));
        out.extend_from_slice(&p32(0)); // IFD offset, patched below
        let nstrips = h.div_ceil(rows_per_strip);
        let mut offs = Vec::new();
        let mut cnts = Vec::new();
        for s in 0..nstrips {
            offs.push(out.len() as u32);
            let rows = rows_per_strip.min(h - s * rows_per_strip);
            for &v in &vals[s * rows_per_strip * w..(s * rows_per_strip + rows) * w] {
                match bpp {
                    1 => out.push(v as u8),
                    2 => out.extend_from_slice(&p16(v as u16)),
                    _ => out.extend_from_slice(&p32(v)),
                }
            }
            cnts.push((rows * w * bpp) as u32);
        }
        if out.len() % 2 == 1 {
            out.push(0);
        }
        // Out-of-line arrays for strip offsets/counts when > 1 strip.
        let offs_pos = out.len();
        for &o in &offs {
            out.extend_from_slice(&p32(o));
        }
        let cnts_pos = out.len();
        for &c in &cnts {
            out.extend_from_slice(&p32(c));
        }
        let ifd = out.len() as u32;
        let bo = out.len();
        let _ = bo;
        out[4..8].copy_from_slice(&p32(ifd));
        let entries: Vec<(u16, u16, u32, u32)> = vec![
            (256, 4, 1, w as u32),
            (257, 4, 1, h as u32),
            (258, 3, 1, u32::from(bits)),
            (259, 3, 1, u32::from(compression)),
            (262, 3, 1, 1),
            (
                273,
                4,
                nstrips as u32,
                if nstrips == 1 {
                    offs[0]
                } else {
                    offs_pos as u32
                },
            ),
            (277, 3, 1, 1),
            (278, 4, 1, rows_per_strip as u32),
            (
                279,
                4,
                nstrips as u32,
                if nstrips == 1 {
                    cnts[0]
                } else {
                    cnts_pos as u32
                },
            ),
        ];
        out.extend_from_slice(&p16(entries.len() as u16));
        for (tag, typ, count, val) in entries {
            out.extend_from_slice(&p16(tag));
            out.extend_from_slice(&p16(typ));
            out.extend_from_slice(&p32(count));
            if typ == 3 && count == 1 {
                out.extend_from_slice(&p16(val as u16));
                out.extend_from_slice(&[0, 0]);
            } else {
                out.extend_from_slice(&p32(val));
            }
        }
        out.extend_from_slice(&p32(0));
        out
    }

    fn labels_two_discs(w: usize, h: usize) -> Vec<u32> {
        let mut v = vec![0u32; w * h];
        for y in 0..h {
            for x in 0..w {
                let d1 = (x as f32 - 10.0).powi(2) + (y as f32 - 12.0).powi(2);
                let d2 = (x as f32 - 22.0).powi(2) + (y as f32 - 14.0).powi(2);
                if d1 <= 16.0 {
                    v[y * w + x] = 3;
                } else if d2 <= 9.0 {
                    v[y * w + x] = 7;
                }
            }
        }
        v
    }

    #[test]
    fn tiff_round_trip_little_endian_all_depths() {
        let (w, h) = (33, 27);
        let vals = labels_two_discs(w, h);
        for bits in [8u16, 16, 32] {
            for rps in [1usize, 5, 27, 100] {
                let bytes = write_tiff(w, h, &vals, bits, false, rps, 1);
                let img = parse_tiff_labels(&bytes, Path::new("x.tif")).expect("parse");
                assert_eq!((img.width, img.height), (w, h));
                assert_eq!(img.labels, vals, "bits {bits} rps {rps}");
            }
        }
    }

    #[test]
    fn tiff_big_endian() {
        let (w, h) = (33, 27);
        let vals = labels_two_discs(w, h);
        for bits in [8u16, 16, 32] {
            let bytes = write_tiff(w, h, &vals, bits, true, 4, 1);
            assert_eq!(&bytes[0..2], b"MM");
            let img = parse_tiff_labels(&bytes, Path::new("be.tif")).expect("parse");
            assert_eq!(img.labels, vals);
        }
    }

    #[test]
    fn tiff_unsupported_compression_is_a_clear_error() {
        let vals = vec![1u32; 16];
        let bytes = write_tiff(4, 4, &vals, 16, false, 4, 5);
        let e = parse_tiff_labels(&bytes, Path::new("/data/labels.tif"))
            .expect_err("LZW must be refused")
            .to_string();
        assert!(e.contains("/data/labels.tif"), "{e}");
        assert!(e.contains("compress") && e.contains("LZW"), "{e}");
    }

    #[test]
    fn tiff_file_load_and_geometry_check() {
        let dir = std::env::temp_dir().join(format!("rigd-rois-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (w, h) = (33, 27);
        let vals = labels_two_discs(w, h);
        let p = dir.join("labels.tif");
        std::fs::write(&p, write_tiff(w, h, &vals, 16, false, 8, 1)).expect("write");
        let t = dir.join("rois.tsv");
        std::fs::write(&t, "roi\ttype\tnote\n3\tinhibitory\tred\n7\texcitatory\t\n").expect("w");
        let set = RoiSet::load(&p, Some(&t), w, h, &NeuropilParams::default()).expect("load");
        assert_eq!(set.rois.len(), 2);
        assert_eq!(set.rois[0].id, 3);
        assert_eq!(set.rois[0].kind, RoiKind::Inhibitory);
        assert_eq!(set.rois[0].note, "red");
        assert_eq!(set.rois[1].kind, RoiKind::Excitatory);
        let e = RoiSet::load(&p, None, 512, 512, &NeuropilParams::default())
            .expect_err("geometry")
            .to_string();
        assert!(e.contains("33x27") && e.contains("512x512"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// NPY v1.0 bytes: `descr`, `shape` (numpy's text) and the raw data.
    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn npy_labels() {
        let (w, h) = (5usize, 3usize);
        let vals: Vec<u32> = (0..15).map(|i| (i % 4) as u32).collect();
        for (descr, size) in [
            ("|u1", 1),
            ("<u2", 2usize),
            ("<u4", 4),
            ("<i4", 4),
            ("<i8", 8),
        ] {
            let data: Vec<u8> = vals
                .iter()
                .flat_map(|&v| u64::from(v).to_le_bytes()[..size].to_vec())
                .collect();
            let b = npy(descr, &format!("({h}, {w})"), &data);
            let img = parse_npy_labels(&b, Path::new("labels.npy")).expect("npy");
            assert_eq!((img.width, img.height), (w, h));
            assert_eq!(img.labels, vals);
        }
    }

    #[test]
    fn npy_label_errors_name_the_file_and_the_problem() {
        let path = Path::new("/data/labels.npy");
        let cases = [
            (
                npy("<u2", "(2, 2, 2)", &[0; 16]),
                "must be 2-D, got shape (2, 2, 2)",
            ),
            (
                npy("<f4", "(2, 2)", &[0; 16]),
                "NPY dtype <f4 is not supported (uint8/",
            ),
            (
                npy("<i4", "(1, 1)", &(-3i32).to_le_bytes()),
                "negative label",
            ),
            (
                npy("<i8", "(1, 1)", &(-3i64).to_le_bytes()),
                "negative label",
            ),
            (
                npy("<i8", "(1, 1)", &(1i64 << 40).to_le_bytes()),
                "label 1099511627776 exceeds u32",
            ),
            (npy("<u2", "(2, 2)", &[0; 6]), "truncated NPY data"),
            (
                npy("<c8", "(1, 1)", &[0; 8]),
                "NPY dtype \"<c8\" is not supported",
            ),
            (b"\x93NUMPY\x07\x00".to_vec(), "unsupported NPY version 7"),
        ];
        for (bytes, want) in cases {
            let e = parse_npy_labels(&bytes, path).expect_err(want).to_string();
            assert!(
                e.starts_with("/data/labels.npy: ") && e.contains(want),
                "{want}: {e}"
            );
        }
    }

    #[test]
    fn neuropil_excludes_roi_pixels() {
        let (w, h) = (64, 64);
        let mut vals = labels_two_discs(w, h);
        vals[40 * w + 40] = 9;
        let img = LabelImage {
            width: w,
            height: h,
            labels: vals.clone(),
        };
        let np = NeuropilParams::default();
        let set = RoiSet::from_labels(&img, &np);
        assert_eq!(set.rois.len(), 3);
        for r in &set.rois {
            assert!(!r.neuropil.is_empty());
            for &p in &r.neuropil {
                let (x, y) = ((p as usize % w) as i64, (p as usize / w) as i64);
                // no ROI pixel within the gap (Chebyshev)
                for dy in -2i64..=2 {
                    for dx in -2i64..=2 {
                        let (xx, yy) = (x + dx, y + dy);
                        if xx >= 0 && yy >= 0 && (xx as usize) < w && (yy as usize) < h {
                            assert_eq!(vals[yy as usize * w + xx as usize], 0);
                        }
                    }
                }
            }
            assert!(r.neuropil.len() >= np.min_pixels, "{}", r.neuropil.len());
            assert!(!r.outline.is_empty());
        }
    }

    #[test]
    fn grid_covers_frame() {
        let set = RoiSet::grid(512, 500, 8);
        assert_eq!(set.rois.len(), 64);
        let total: usize = set.rois.iter().map(|r| r.pixels.len()).sum();
        assert_eq!(total, 512 * 500);
        assert!(set.rois.iter().all(|r| r.neuropil.is_empty()));
    }

    #[test]
    fn roi_table_errors() {
        let e = parse_roi_table("roi\ttype\n1\tpyramidal\n", Path::new("t.tsv"))
            .expect_err("bad type")
            .to_string();
        assert!(e.contains("t.tsv") && e.contains("pyramidal"), "{e}");
        let mut set = RoiSet::grid(16, 16, 2);
        let rows =
            parse_roi_table("roi\ttype\n9\tinhibitory\n", Path::new("t.tsv")).expect("parses");
        let e = set.apply_table(&rows).expect_err("no roi 9");
        assert_eq!(e, UnknownRoi(9));
        assert!(
            e.to_string()
                .contains("roi 9 which is not in the label image"),
            "{e}"
        );
    }
}
