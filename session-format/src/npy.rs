//! Append-only `.npy` arrays that numpy can load after every sync, and the
//! workspace's one `.npy` reader ([`read_npy_header`], [`read_npy`]).
//!
//! The file is an NPY v1.0 header followed by C-order rows. The header's
//! length is fixed when the file is created, with room for a 20-digit row
//! count (numpy does the same when it grows an array in place), so the row
//! count can be rewritten in place at each sync without moving the data.
//! Sync order: the rows are written and fsynced first, then the header with
//! the new count, then fsynced again; so after a power cut the header never
//! claims rows that are not on disk, and [`repair_npy`] can count the complete
//! rows from the file size.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::StorageError;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy aligns the data to this many bytes.
const ALIGN: usize = 64;
/// Longest header this module reads (numpy's own default limit is 10 000).
const MAX_HEADER_LEN: usize = 10_000;
/// Write buffer per array.
const BUF_BYTES: usize = 256 * 1024;

/// Element types of the arrays a session writes (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f8`: float64.
    F8,
    /// `<f4`: float32.
    F4,
    /// `<u2`: uint16 (raw frames).
    U2,
}

impl NpyDtype {
    /// The numpy `descr` string.
    pub fn descr(self) -> &'static str {
        match self {
            Self::F8 => "<f8",
            Self::F4 => "<f4",
            Self::U2 => "<u2",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F8 => 8,
            Self::F4 => 4,
            Self::U2 => 2,
        }
    }
}

/// A Rust element type with an [`NpyDtype`].
pub trait NpyElement: Copy {
    const DTYPE: NpyDtype;
    /// Append the little-endian bytes of `self` to `out`.
    fn put_le(self, out: &mut Vec<u8>);
}

impl NpyElement for f64 {
    const DTYPE: NpyDtype = NpyDtype::F8;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for f32 {
    const DTYPE: NpyDtype = NpyDtype::F4;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElement for u16 {
    const DTYPE: NpyDtype = NpyDtype::U2;
    fn put_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// The header dictionary text, without padding.
fn dict_text(descr: &str, rows: u64, row_shape: &[u64]) -> String {
    let mut shape = format!("({rows},");
    for (i, d) in row_shape.iter().enumerate() {
        if i > 0 {
            shape.push(',');
        }
        shape.push_str(&format!(" {d}"));
    }
    shape.push(')');
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

/// Total length (magic through newline) of the fixed-size header for an
/// array of this dtype and row shape: room for any `u64` row count, rounded
/// up to a multiple of 64.
fn reserved_total_len(descr: &str, row_shape: &[u64]) -> usize {
    let longest = dict_text(descr, u64::MAX, row_shape).len();
    (10 + longest + 1).div_ceil(ALIGN) * ALIGN
}

/// A v1.0 header of exactly `total_len` bytes, or `None` if it does not fit.
fn header_bytes(descr: &str, rows: u64, row_shape: &[u64], total_len: usize) -> Option<Vec<u8>> {
    let dict = dict_text(descr, rows, row_shape);
    let header_len = total_len.checked_sub(10)?;
    if dict.len() + 1 > header_len || header_len > usize::from(u16::MAX) {
        return None;
    }
    let mut out = Vec::with_capacity(total_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total_len - 1, b' ');
    out.push(b'\n');
    Some(out)
}

/// An append-only `.npy` file of rows of a fixed shape.
///
/// Rows go through a write buffer; [`NpyAppender::sync`] makes everything
/// appended so far durable and loadable. After a write error the appender is
/// closed: its buffer is discarded (never flushed later, which could put a
/// row out of step with the rows before it) and every further call fails with
/// [`StorageError::FileClosed`].
#[derive(Debug)]
pub struct NpyAppender {
    path: PathBuf,
    dtype: NpyDtype,
    row_shape: Vec<u64>,
    /// Elements per row.
    row_len: usize,
    header_len: usize,
    writer: Option<BufWriter<File>>,
    rows: u64,
    synced_rows: u64,
    scratch: Vec<u8>,
}

impl NpyAppender {
    /// Create `path` exclusively (never overwriting) with zero rows of
    /// `row_shape` (e.g. `[3]` for a (N, 3) table, `[]` for a 1-D array,
    /// `[C, H, W]` for frames). The header is written but not yet fsynced.
    pub fn create(path: &Path, dtype: NpyDtype, row_shape: &[usize]) -> Result<Self, StorageError> {
        let row_shape: Vec<u64> = row_shape.iter().map(|&d| d as u64).collect();
        let row_len = row_shape.iter().map(|&d| d as usize).product::<usize>();
        let total = reserved_total_len(dtype.descr(), &row_shape);
        let header = header_bytes(dtype.descr(), 0, &row_shape, total).ok_or_else(|| {
            StorageError::Usage {
                path: path.to_owned(),
                reason: format!("row shape {row_shape:?} makes an NPY header over 64 KiB"),
            }
        })?;
        // Not O_APPEND: on Linux a positional write to an O_APPEND file appends.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StorageError::io("create", path, e))?;
        let mut me = Self {
            path: path.to_owned(),
            dtype,
            row_shape,
            row_len,
            header_len: total,
            writer: Some(BufWriter::with_capacity(BUF_BYTES, file)),
            rows: 0,
            synced_rows: 0,
            scratch: Vec::new(),
        };
        me.write_buffered(&header)?;
        me.flush()?;
        Ok(me)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Element type.
    pub fn dtype(&self) -> NpyDtype {
        self.dtype
    }

    /// Shape of one row (the array's shape without its first axis).
    pub fn row_shape(&self) -> &[u64] {
        &self.row_shape
    }

    /// Rows appended so far (some may still be in the buffer).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Rows that the header on disk declares (as of the last sync).
    pub fn synced_rows(&self) -> u64 {
        self.synced_rows
    }

    /// Append one or more whole rows, C order. `values.len()` must be a
    /// multiple of the row length and `T` must match the dtype.
    pub fn append<T: NpyElement>(&mut self, values: &[T]) -> Result<(), StorageError> {
        if T::DTYPE != self.dtype {
            return Err(StorageError::Usage {
                path: self.path.clone(),
                reason: format!(
                    "appending {} values to a {} array",
                    T::DTYPE.descr(),
                    self.dtype.descr()
                ),
            });
        }
        let row_len = self.row_len.max(1);
        if self.row_len == 0 || values.len() % row_len != 0 {
            return Err(StorageError::Usage {
                path: self.path.clone(),
                reason: format!(
                    "{} values is not a whole number of rows of {} (shape {:?})",
                    values.len(),
                    self.row_len,
                    self.row_shape
                ),
            });
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.reserve(values.len() * self.dtype.size());
        for &v in values {
            v.put_le(&mut scratch);
        }
        let result = self.write_buffered(&scratch);
        self.scratch = scratch;
        result?;
        self.rows += (values.len() / row_len) as u64;
        Ok(())
    }

    /// Make every appended row durable and declared: flush, fsync the rows,
    /// rewrite the row count in the header in place, fsync again.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.flush()?;
        let rows = self.rows;
        if rows == self.synced_rows {
            return Ok(());
        }
        let header = header_bytes(self.dtype.descr(), rows, &self.row_shape, self.header_len)
            .ok_or_else(|| StorageError::Usage {
                path: self.path.clone(),
                reason: "row count does not fit the reserved header".to_owned(),
            })?;
        let result = {
            let file = self.file()?;
            file.sync_data()
                .map_err(|e| StorageError::io("fsync", &self.path, e))
                .and_then(|()| {
                    file.write_all_at(&header, 0)
                        .map_err(|e| StorageError::io("rewrite header of", &self.path, e))
                })
                .and_then(|()| {
                    file.sync_data()
                        .map_err(|e| StorageError::io("fsync", &self.path, e))
                })
        };
        match result {
            Ok(()) => {
                self.synced_rows = rows;
                Ok(())
            }
            Err(e) => {
                self.close_discarding();
                Err(e)
            }
        }
    }

    /// Push the buffer to the OS and fsync it (header not updated): makes a
    /// freshly created file's header durable.
    pub(crate) fn fsync(&mut self) -> Result<(), StorageError> {
        self.flush()?;
        let result = self
            .file()?
            .sync_data()
            .map_err(|e| StorageError::io("fsync", &self.path, e));
        if result.is_err() {
            self.close_discarding();
        }
        result
    }

    /// Push the buffer to the OS and rewrite the header's row count, with no
    /// fsync: for a file whose readers want a valid header while it grows
    /// but whose durability is not session data (the simulator's ground
    /// truth). [`sync`](Self::sync) is the durable version.
    pub fn flush_declared(&mut self) -> Result<(), StorageError> {
        self.flush()?;
        let header = header_bytes(
            self.dtype.descr(),
            self.rows,
            &self.row_shape,
            self.header_len,
        )
        .ok_or_else(|| StorageError::Usage {
            path: self.path.clone(),
            reason: "row count does not fit the reserved header".to_owned(),
        })?;
        let result = self
            .file()?
            .write_all_at(&header, 0)
            .map_err(|e| StorageError::io("rewrite header of", &self.path, e));
        if result.is_err() {
            self.close_discarding();
        }
        result
    }

    /// Push the buffer to the OS (no fsync, header not updated).
    pub fn flush(&mut self) -> Result<(), StorageError> {
        let w = self.writer_mut()?;
        match w.flush() {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = StorageError::io("write", &self.path, e);
                self.close_discarding();
                Err(err)
            }
        }
    }

    fn write_buffered(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let w = self.writer_mut()?;
        match w.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = StorageError::io("write", &self.path, e);
                self.close_discarding();
                Err(err)
            }
        }
    }

    fn writer_mut(&mut self) -> Result<&mut BufWriter<File>, StorageError> {
        match self.writer.as_mut() {
            Some(w) => Ok(w),
            None => Err(StorageError::FileClosed {
                path: self.path.clone(),
            }),
        }
    }

    fn file(&self) -> Result<&File, StorageError> {
        match self.writer.as_ref() {
            Some(w) => Ok(w.get_ref()),
            None => Err(StorageError::FileClosed {
                path: self.path.clone(),
            }),
        }
    }

    /// Drop the file without flushing its buffer.
    pub(crate) fn close_discarding(&mut self) {
        if let Some(w) = self.writer.take() {
            let (file, _unwritten) = w.into_parts();
            drop(file);
        }
    }

    /// Test hook: replace the file (e.g. with `/dev/full`).
    #[cfg(test)]
    pub(crate) fn replace_file_for_test(&mut self, file: File) {
        self.writer = Some(BufWriter::with_capacity(BUF_BYTES, file));
    }
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// Format version, e.g. (1, 0).
    pub version: (u8, u8),
    /// numpy dtype string, e.g. `<f8`.
    pub descr: String,
    pub fortran_order: bool,
    /// Full shape, first axis = rows.
    pub shape: Vec<u64>,
    /// Offset of the first data byte (= total header length).
    pub data_offset: u64,
}

impl NpyHeader {
    /// Bytes per element, from the descr's digits (`<f8` -> 8).
    pub fn item_size(&self) -> Option<u64> {
        let digits = self.descr.get(2..)?;
        digits.parse().ok()
    }

    /// Bytes per row (product of all axes after the first, times item size).
    pub fn row_bytes(&self) -> Option<u64> {
        let per_row: u64 = self.shape.iter().skip(1).product();
        Some(per_row * self.item_size()?)
    }
}

/// Read and parse the header of an `.npy` file (v1.0, v2.0 or v3.0).
pub fn read_npy_header(path: &Path) -> Result<NpyHeader, StorageError> {
    let f = File::open(path).map_err(|e| StorageError::io("open", path, e))?;
    // The preamble and the longest header this module reads, at most.
    let mut prefix = Vec::new();
    f.take((12 + MAX_HEADER_LEN) as u64)
        .read_to_end(&mut prefix)
        .map_err(|e| StorageError::io("read", path, e))?;
    parse_header(&prefix).map_err(|reason| StorageError::Format {
        path: path.to_owned(),
        reason,
    })
}

/// Parse the header at the start of `bytes` (all of the file, or at least
/// its header); the error is the reason, for [`StorageError::Format`].
fn parse_header(bytes: &[u8]) -> Result<NpyHeader, String> {
    let pre = bytes
        .get(..8)
        .ok_or_else(|| "shorter than an NPY preamble".to_owned())?;
    if &pre[..6] != MAGIC {
        return Err("not an NPY file (bad magic)".to_owned());
    }
    let version = (pre[6], pre[7]);
    let truncated = || "truncated NPY header".to_owned();
    let (len_bytes, header_len) = match version.0 {
        1 => {
            let b = bytes.get(8..10).ok_or_else(truncated)?;
            (2usize, usize::from(u16::from_le_bytes([b[0], b[1]])))
        }
        2 | 3 => {
            let b = bytes.get(8..12).ok_or_else(truncated)?;
            (
                4usize,
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            )
        }
        v => return Err(format!("unsupported NPY version {v}")),
    };
    if header_len > MAX_HEADER_LEN {
        return Err(format!("NPY header of {header_len} bytes is too long"));
    }
    let start = 8 + len_bytes;
    let text = bytes.get(start..start + header_len).ok_or_else(truncated)?;
    let text = std::str::from_utf8(text).map_err(|_| "NPY header is not text".to_owned())?;
    let (descr, fortran_order, shape) = parse_dict(text)
        .ok_or_else(|| format!("cannot parse NPY header dictionary {:?}", text.trim_end()))?;
    Ok(NpyHeader {
        version,
        descr,
        fortran_order,
        shape,
        data_offset: (start + header_len) as u64,
    })
}

/// Parse `{'descr': '<f8', 'fortran_order': False, 'shape': (N, 3), }`, in any
/// key order, tolerant of spacing.
fn parse_dict(text: &str) -> Option<(String, bool, Vec<u64>)> {
    let after = |key: &str| -> Option<&str> {
        let i = text.find(key)?;
        let rest = text[i + key.len()..].trim_start();
        Some(rest.strip_prefix(':')?.trim_start())
    };
    let d = after("'descr'")?;
    let quote = d.chars().next()?;
    if quote != '\'' && quote != '"' {
        return None;
    }
    let end = d[1..].find(quote)?;
    let descr = d[1..1 + end].to_owned();
    let fo = after("'fortran_order'")?;
    let fortran_order = if fo.starts_with("True") {
        true
    } else if fo.starts_with("False") {
        false
    } else {
        return None;
    };
    let s = after("'shape'")?.strip_prefix('(')?;
    let end = s.find(')')?;
    let mut shape = Vec::new();
    for part in s[..end].split(',') {
        let part = part.trim();
        if !part.is_empty() {
            shape.push(part.parse().ok()?);
        }
    }
    Some((descr, fortran_order, shape))
}

// ---- Reading whole arrays -------------------------------------------------------

/// The elements of an array read by [`read_npy`], in the machine's byte order.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `u1`: uint8.
    U1(Vec<u8>),
    /// `u2`: uint16.
    U2(Vec<u16>),
    /// `u4`: uint32.
    U4(Vec<u32>),
    /// `u8`: uint64.
    U8(Vec<u64>),
    /// `i1`: int8.
    I1(Vec<i8>),
    /// `i2`: int16.
    I2(Vec<i16>),
    /// `i4`: int32.
    I4(Vec<i32>),
    /// `i8`: int64.
    I8(Vec<i64>),
    /// `f4`: float32.
    F4(Vec<f32>),
    /// `f8`: float64.
    F8(Vec<f64>),
}

impl NpyData {
    /// numpy's name of the element type: `uint16`, `float32`, ...
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U1(_) => "uint8",
            Self::U2(_) => "uint16",
            Self::U4(_) => "uint32",
            Self::U8(_) => "uint64",
            Self::I1(_) => "int8",
            Self::I2(_) => "int16",
            Self::I4(_) => "int32",
            Self::I8(_) => "int64",
            Self::F4(_) => "float32",
            Self::F8(_) => "float64",
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U1(v) => v.len(),
            Self::U2(v) => v.len(),
            Self::U4(v) => v.len(),
            Self::U8(v) => v.len(),
            Self::I1(v) => v.len(),
            Self::I2(v) => v.len(),
            Self::I4(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::F4(v) => v.len(),
            Self::F8(v) => v.len(),
        }
    }

    /// True for an array without elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A whole C-order array read from an `.npy` file by [`read_npy`].
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The header's `descr` as written (`<u2`, `>i4`, `|u1`, ...), for
    /// messages; the element type is [`NpyData`]'s variant.
    pub descr: String,
    /// The full shape (empty for a 0-d array).
    pub shape: Vec<u64>,
    /// The elements in C order, as many as the shape's product.
    pub data: NpyData,
}

impl NpyArray {
    /// The shape as numpy prints it: `(512, 512)`, `(3,)`, `()`.
    pub fn shape_text(&self) -> String {
        match self.shape.as_slice() {
            [d] => format!("({d},)"),
            dims => {
                let dims: Vec<String> = dims.iter().map(u64::to_string).collect();
                format!("({})", dims.join(", "))
            }
        }
    }
}

/// Read a whole `.npy` file (v1.0-3.0, C order) of an integer type of 1 to 8
/// bytes or float32/float64, either byte order. Errors name the file and what
/// is wrong with it: not NPY, a damaged header, Fortran order, an
/// unsupported dtype, or less data than the shape declares (bytes after the
/// data are ignored, as numpy does).
pub fn read_npy(path: &Path) -> Result<NpyArray, StorageError> {
    let bytes = std::fs::read(path).map_err(|e| StorageError::io("read", path, e))?;
    parse_npy(&bytes, path)
}

/// [`read_npy`] of a file's bytes already in memory; `path` only names the
/// file in errors.
pub fn parse_npy(bytes: &[u8], path: &Path) -> Result<NpyArray, StorageError> {
    let bad = |reason: String| StorageError::Format {
        path: path.to_owned(),
        reason,
    };
    let header = parse_header(bytes).map_err(bad)?;
    let descr = header.descr;
    if header.fortran_order {
        return Err(bad(
            "Fortran-order array is not supported: save it in C order \
             (numpy.ascontiguousarray)"
                .to_owned(),
        ));
    }
    let element = ElementType::parse(&descr).ok_or_else(|| {
        bad(format!(
            "NPY dtype {descr:?} is not supported: save the array as an integer type, \
             float32 or float64"
        ))
    })?;
    let need = header
        .shape
        .iter()
        .try_fold(element.size as u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("NPY shape {:?} is too large", header.shape)))?;
    let start = usize::try_from(header.data_offset).unwrap_or(usize::MAX);
    let have = bytes.len().saturating_sub(start);
    let data = match usize::try_from(need) {
        Ok(need) if need <= have => &bytes[start..start + need],
        _ => {
            return Err(bad(format!(
                "truncated NPY data: shape {:?} of {descr} needs {need} bytes after the \
                 header, the file has {have}",
                header.shape
            )))
        }
    };
    Ok(NpyArray {
        descr,
        shape: header.shape,
        data: element.decode(data),
    })
}

/// An element type [`read_npy`] reads: kind (`u`, `i`, `f`), size, order.
#[derive(Debug, Clone, Copy)]
struct ElementType {
    kind: u8,
    size: usize,
    little_endian: bool,
}

impl ElementType {
    /// From a `descr` such as `<u2`, `>f8`, `|u1`, `=i4`.
    fn parse(descr: &str) -> Option<Self> {
        let b = descr.as_bytes();
        let little_endian = match b.first()? {
            b'<' | b'|' => true,
            b'>' => false,
            b'=' => cfg!(target_endian = "little"),
            _ => return None,
        };
        let kind = *b.get(1)?;
        let size: usize = descr.get(2..)?.parse().ok()?;
        match (kind, size) {
            (b'u' | b'i', 1 | 2 | 4 | 8) | (b'f', 4 | 8) => Some(Self {
                kind,
                size,
                little_endian,
            }),
            _ => None,
        }
    }

    /// The elements of `bytes` (a whole number of them).
    fn decode(self, bytes: &[u8]) -> NpyData {
        let le = self.little_endian;
        match (self.kind, self.size) {
            (b'u', 1) => NpyData::U1(bytes.to_vec()),
            (b'i', 1) => NpyData::I1(bytes.iter().map(|&b| b as i8).collect()),
            (b'u', 2) => NpyData::U2(decode(bytes, le, u16::from_le_bytes, u16::from_be_bytes)),
            (b'i', 2) => NpyData::I2(decode(bytes, le, i16::from_le_bytes, i16::from_be_bytes)),
            (b'u', 4) => NpyData::U4(decode(bytes, le, u32::from_le_bytes, u32::from_be_bytes)),
            (b'i', 4) => NpyData::I4(decode(bytes, le, i32::from_le_bytes, i32::from_be_bytes)),
            (b'u', 8) => NpyData::U8(decode(bytes, le, u64::from_le_bytes, u64::from_be_bytes)),
            (b'i', 8) => NpyData::I8(decode(bytes, le, i64::from_le_bytes, i64::from_be_bytes)),
            (b'f', 4) => NpyData::F4(decode(bytes, le, f32::from_le_bytes, f32::from_be_bytes)),
            _ => NpyData::F8(decode(bytes, le, f64::from_le_bytes, f64::from_be_bytes)),
        }
    }
}

fn decode<T, const N: usize>(
    bytes: &[u8],
    little_endian: bool,
    from_le: fn([u8; N]) -> T,
    from_be: fn([u8; N]) -> T,
) -> Vec<T> {
    let from = if little_endian { from_le } else { from_be };
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from(a)
        })
        .collect()
}

/// Make an `.npy` file consistent after a crash: cut a partial last row (and
/// unsynced all-zero rows at the end) and set the header's row count to the
/// number of complete rows in the file.
/// Returns a description of what changed, or `None` if it was consistent.
pub(crate) fn repair_npy(path: &Path) -> Result<Option<String>, StorageError> {
    let h = read_npy_header(path)?;
    let bad = |reason: String| StorageError::Format {
        path: path.to_owned(),
        reason,
    };
    if h.fortran_order {
        return Err(bad(
            "Fortran-order array: not written by rigd, left alone".to_owned()
        ));
    }
    if h.shape.is_empty() {
        return Err(bad("0-d array: not an appendable array".to_owned()));
    }
    let row_bytes = h
        .row_bytes()
        .ok_or_else(|| bad(format!("unknown dtype {:?}", h.descr)))?;
    let size = std::fs::metadata(path)
        .map_err(|e| StorageError::io("stat", path, e))?
        .len();
    let data = size.saturating_sub(h.data_offset);
    let whole_rows = data.checked_div(row_bytes).unwrap_or(0);
    let declared = h.shape[0];
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StorageError::io("open for repair", path, e))?;
    // Rows past the last sync that are all zero bytes are what some file
    // systems (XFS, ext4 without data=ordered) show for data that never
    // reached the disk: drop them. Synced rows are never judged.
    let mut rows = whole_rows;
    let mut row = vec![0u8; usize::try_from(row_bytes).unwrap_or(0)];
    while rows > declared && !row.is_empty() {
        f.read_exact_at(&mut row, h.data_offset + (rows - 1) * row_bytes)
            .map_err(|e| StorageError::io("read", path, e))?;
        if row.iter().any(|&b| b != 0) {
            break;
        }
        rows -= 1;
    }
    let keep = h.data_offset + rows * row_bytes;
    if keep == size && rows == declared {
        return Ok(None);
    }
    let mut changes = Vec::new();
    if keep < size {
        f.set_len(keep)
            .map_err(|e| StorageError::io("truncate", path, e))?;
        let partial = size - (h.data_offset + whole_rows * row_bytes);
        if partial > 0 {
            changes.push(format!("dropped a partial last row ({partial} bytes)"));
        }
        if whole_rows > rows {
            changes.push(format!(
                "dropped {} unsynced all-zero rows",
                whole_rows - rows
            ));
        }
    }
    if rows != declared {
        let total = usize::try_from(h.data_offset).unwrap_or(usize::MAX);
        let header = header_bytes(&h.descr, rows, &h.shape[1..], total).ok_or_else(|| {
            bad("the header has no room for the new row count; not written by rigd".to_owned())
        })?;
        f.write_all_at(&header, 0)
            .map_err(|e| StorageError::io("rewrite header of", path, e))?;
        changes.push(format!(
            "row count {declared} -> {rows} (from the file size)"
        ));
    }
    f.sync_all()
        .map_err(|e| StorageError::io("fsync", path, e))?;
    Ok(Some(changes.join("; ")))
}

/// Test helper: does the reserved header hold `rows`?
#[cfg(test)]
pub(crate) fn header_fits(descr: &str, row_shape: &[u64], rows: u64) -> bool {
    let total = reserved_total_len(descr, row_shape);
    header_bytes(descr, rows, row_shape, total)
        .is_some_and(|h| h.len() == total && total % ALIGN == 0)
}

/// Test helper: read a whole `<f8` array (header + data).
#[cfg(test)]
pub(crate) fn read_f8(path: &Path) -> (NpyHeader, Vec<f64>) {
    let h = read_npy_header(path).expect("header");
    match read_npy(path).expect("data as declared").data {
        NpyData::F8(values) => (h, values),
        other => panic!(
            "{}: {} array, not float64",
            path.display(),
            other.type_name()
        ),
    }
}
