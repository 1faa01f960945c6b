//! Chunked `.npy` streams: a long session's arrays are cut into files of at
//! most `[storage].chunk_minutes` of rig time each, so no single file grows
//! without bound and a reader can load an hour at a time.
//!
//! Naming: chunk 0 keeps the stream's plain name (`lever.npy`), later chunks
//! insert a three-digit number (`lever.001.npy`, `lever.002.npy`, ...; a
//! fourth digit only after 999). A session shorter than one chunk therefore
//! looks exactly as before chunking existed. Concatenating a stream's chunks
//! in number order gives the whole array.
//!
//! When to roll is decided by a [`ChunkClock`] fed with session time (rig
//! clock minus `t0_rig_us`, the rows' own times), never with the wall clock;
//! arrays that must stay row-aligned share one clock and roll together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::npy::{read_npy_header, NpyAppender, NpyDtype, NpyElement};
use super::{sync_dir, StorageError, TMP_SUFFIX};

/// Decides when a stream (or a group of row-aligned streams) starts its next
/// chunk: at the first row whose session time reaches the next multiple of
/// the chunk length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkClock {
    len_us: u64,
    next_us: u64,
}

impl ChunkClock {
    /// A clock for chunks of `len` of session time (at least 1 µs).
    pub fn new(len: Duration) -> Self {
        let len_us = u64::try_from(len.as_micros()).unwrap_or(u64::MAX).max(1);
        Self {
            len_us,
            next_us: len_us,
        }
    }

    /// Chunk length, µs.
    pub fn len_us(&self) -> u64 {
        self.len_us
    }

    /// Whether a row at session time `t_us` belongs in a new chunk. If it
    /// does, the next boundary moves to the first multiple of the length
    /// after `t_us` (a long gap in the data skips boundaries rather than
    /// making empty chunks). Times that go backwards never roll.
    pub fn crosses(&mut self, t_us: u64) -> bool {
        if t_us < self.next_us {
            return false;
        }
        self.next_us = (t_us / self.len_us)
            .saturating_add(1)
            .saturating_mul(self.len_us);
        true
    }
}

/// The file name of chunk `n` of the stream whose first file is `base`
/// (`"lever.npy"`, 2 -> `"lever.002.npy"`).
pub fn chunk_file_name(base: &str, n: u32) -> String {
    if n == 0 {
        return base.to_owned();
    }
    let stem = base.strip_suffix(".npy").unwrap_or(base);
    format!("{stem}.{n:03}.npy")
}

/// The stream and chunk number of an `.npy` file name: `"lever.npy"` ->
/// `("lever", 0)`, `"lever.012.npy"` -> `("lever", 12)`. `None` for names
/// that are not `.npy`.
pub fn parse_chunk_name(name: &str) -> Option<(&str, u32)> {
    let stem = name.strip_suffix(".npy")?;
    if stem.is_empty() {
        return None;
    }
    if let Some((base, digits)) = stem.rsplit_once('.') {
        if !base.is_empty() && digits.len() >= 3 && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = digits.parse::<u32>() {
                if n > 0 {
                    return Some((base, n));
                }
            }
        }
    }
    Some((stem, 0))
}

/// Every `.npy` stream in `dir` with its chunk files in order:
/// `{"lever": ["lever.npy", "lever.001.npy"], "mean_image": ["mean_image.npy"]}`.
/// This is the `[chunks]` table of `session.toml`.
pub fn list_chunks(dir: &Path) -> Result<BTreeMap<String, Vec<String>>, StorageError> {
    let mut by_stream: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list", dir, e))?;
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.ends_with(TMP_SUFFIX) {
            continue;
        }
        if let Some((stream, n)) = parse_chunk_name(&name) {
            by_stream
                .entry(stream.to_owned())
                .or_default()
                .push((n, name.clone()));
        }
    }
    Ok(by_stream
        .into_iter()
        .map(|(stream, mut files)| {
            files.sort();
            (stream, files.into_iter().map(|(_, f)| f).collect())
        })
        .collect())
}

/// An append-only `.npy` stream cut into chunk files. Appends go to the open
/// (last) chunk, which syncs like any [`NpyAppender`]; [`ChunkedNpy::roll`]
/// closes it complete (rows and final header fsynced) and opens the next.
#[derive(Debug)]
pub struct ChunkedNpy {
    dir: PathBuf,
    base: String,
    dtype: NpyDtype,
    row_shape: Vec<usize>,
    /// Number of the open chunk.
    chunk: u32,
    /// Rows in the closed chunks.
    closed_rows: u64,
    open: NpyAppender,
}

impl ChunkedNpy {
    /// Create chunk 0, `dir/base` (exclusively, header written, not fsynced).
    pub fn create(
        dir: &Path,
        base: &str,
        dtype: NpyDtype,
        row_shape: &[usize],
    ) -> Result<Self, StorageError> {
        let open = NpyAppender::create(&dir.join(base), dtype, row_shape)?;
        Ok(Self {
            dir: dir.to_owned(),
            base: base.to_owned(),
            dtype,
            row_shape: row_shape.to_vec(),
            chunk: 0,
            closed_rows: 0,
            open,
        })
    }

    /// Append whole rows to the open chunk (see [`NpyAppender::append`]).
    pub fn append<T: NpyElement>(&mut self, values: &[T]) -> Result<(), StorageError> {
        self.open.append(values)
    }

    /// Make the open chunk's rows durable and declared.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.open.sync()
    }

    /// Close the open chunk complete (rows fsynced, final header fsynced)
    /// and start the next one, whose header is fsynced and whose name is
    /// fsynced into the folder before any row goes in.
    pub fn roll(&mut self) -> Result<(), StorageError> {
        self.open.sync()?;
        let next = self.chunk + 1;
        let path = self.dir.join(chunk_file_name(&self.base, next));
        let mut fresh = NpyAppender::create(&path, self.dtype, &self.row_shape)?;
        fresh.fsync()?;
        sync_dir(&self.dir)?;
        let done = std::mem::replace(&mut self.open, fresh);
        self.closed_rows += done.rows();
        self.chunk = next;
        Ok(())
    }

    /// Rows appended to all chunks so far.
    pub fn rows(&self) -> u64 {
        self.closed_rows + self.open.rows()
    }

    /// Number of chunk files (closed ones and the open one).
    pub fn chunks(&self) -> u32 {
        self.chunk + 1
    }

    /// The stream's files in order, the open chunk last.
    pub fn files(&self) -> Vec<PathBuf> {
        (0..=self.chunk)
            .map(|n| self.dir.join(chunk_file_name(&self.base, n)))
            .collect()
    }

    /// The open chunk.
    pub fn open_chunk(&mut self) -> &mut NpyAppender {
        &mut self.open
    }

    /// Drop the open chunk without flushing its buffer (a crash).
    #[cfg(test)]
    pub(crate) fn close_discarding(&mut self) {
        self.open.close_discarding();
    }
}

/// A session's lever chunks, to be read (as often as needed) without holding
/// the trace in memory: `(rig µs, mm)` per row, where rig µs is session time
/// plus `t0_rig_us`. The session time is stored as µs / 10^6 in float64,
/// which reads back to the exact integer. Only the rows each header declares (as
/// of [`LeverFiles::open`]) are read.
#[derive(Debug)]
pub struct LeverFiles {
    t0_rig_us: u64,
    /// Path, first data byte, declared rows.
    files: Vec<(PathBuf, u64, u64)>,
    error: std::cell::RefCell<Option<StorageError>>,
}

impl LeverFiles {
    /// The `lever` stream's chunks in `dir`, headers checked.
    pub fn open(dir: &Path, t0_rig_us: u64) -> Result<Self, StorageError> {
        let names = list_chunks(dir)?.remove("lever").unwrap_or_default();
        let mut files = Vec::with_capacity(names.len());
        for name in &names {
            let path = dir.join(name);
            let h = read_npy_header(&path)?;
            if h.descr != "<f8" || h.fortran_order || h.shape.len() != 2 || h.shape[1] != 3 {
                return Err(StorageError::Format {
                    path,
                    reason: format!("not a lever array: {} {:?}", h.descr, h.shape),
                });
            }
            files.push((path, h.data_offset, h.shape[0]));
        }
        Ok(Self {
            t0_rig_us,
            files,
            error: std::cell::RefCell::new(None),
        })
    }

    /// Rows in all chunks.
    pub fn rows(&self) -> u64 {
        self.files.iter().map(|f| f.2).sum()
    }

    /// Every row in order, read from the files now. A read error ends the
    /// iteration early and is kept for [`LeverFiles::take_error`].
    pub fn samples(&self) -> impl Iterator<Item = (u64, f64)> + '_ {
        use std::io::{BufReader, Read, Seek, SeekFrom};
        self.files.iter().flat_map(move |(path, offset, rows)| {
            let reader = std::fs::File::open(path)
                .map(|f| BufReader::with_capacity(1 << 20, f))
                .and_then(|mut r| r.seek(SeekFrom::Start(*offset)).map(|_| r));
            let mut reader = match reader {
                Ok(r) => Some(r),
                Err(e) => {
                    self.fail(StorageError::io("open", path, e));
                    None
                }
            };
            let mut left = if reader.is_some() { *rows } else { 0 };
            std::iter::from_fn(move || {
                if left == 0 || self.error.borrow().is_some() {
                    return None;
                }
                let r = reader.as_mut()?;
                let mut row = [0u8; 24];
                if let Err(e) = r.read_exact(&mut row) {
                    self.fail(StorageError::io("read", path, e));
                    return None;
                }
                left -= 1;
                let f = |k: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&row[k * 8..k * 8 + 8]);
                    f64::from_le_bytes(b)
                };
                // Session time is never negative; a corrupt value gives 0.
                let t_us = (f(0) * 1e6).round().max(0.0) as u64;
                Some((t_us.saturating_add(self.t0_rig_us), f(1)))
            })
        })
    }

    /// The first read error of any [`LeverFiles::samples`] pass, if any.
    pub fn take_error(&self) -> Option<StorageError> {
        self.error.borrow_mut().take()
    }

    fn fail(&self, e: StorageError) {
        self.error.borrow_mut().get_or_insert(e);
    }
}

/// The whole lever trace of a session's chunks, in memory (see
/// [`LeverFiles`] to read it without).
pub fn read_lever_trace(dir: &Path, t0_rig_us: u64) -> Result<Vec<(u64, f64)>, StorageError> {
    let files = LeverFiles::open(dir, t0_rig_us)?;
    let mut out = Vec::with_capacity(usize::try_from(files.rows()).unwrap_or(0));
    out.extend(files.samples());
    match files.take_error() {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(chunk_file_name("lever.npy", 0), "lever.npy");
        assert_eq!(chunk_file_name("lever.npy", 1), "lever.001.npy");
        assert_eq!(chunk_file_name("dff.npy", 1000), "dff.1000.npy");
        assert_eq!(parse_chunk_name("lever.npy"), Some(("lever", 0)));
        assert_eq!(parse_chunk_name("lever.001.npy"), Some(("lever", 1)));
        assert_eq!(parse_chunk_name("dff.1000.npy"), Some(("dff", 1000)));
        assert_eq!(parse_chunk_name("mean_image.npy"), Some(("mean_image", 0)));
        // Not chunk numbers: too short, zero, not digits.
        assert_eq!(parse_chunk_name("a.01.npy"), Some(("a.01", 0)));
        assert_eq!(parse_chunk_name("a.000.npy"), Some(("a.000", 0)));
        assert_eq!(parse_chunk_name("a.b12.npy"), Some(("a.b12", 0)));
        assert_eq!(parse_chunk_name(".npy"), None);
        assert_eq!(parse_chunk_name("trials.tsv"), None);
    }

    #[test]
    fn the_clock_rolls_at_each_multiple_and_skips_gaps() {
        let mut c = ChunkClock::new(Duration::from_secs(60));
        assert!(!c.crosses(0));
        assert!(!c.crosses(59_999_999));
        assert!(c.crosses(60_000_000));
        assert!(!c.crosses(60_000_001));
        assert!(!c.crosses(100));
        // A 10-minute gap: one roll, the next boundary after the gap.
        assert!(c.crosses(725_000_000));
        assert!(!c.crosses(779_999_999));
        assert!(c.crosses(780_000_000));
    }
}
