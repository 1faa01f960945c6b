//! [`RingRegion`]: the bytes of a ring, accessed only through atomics.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::any::Any;
use std::sync::Arc;

use super::RingError;

/// The memory of one ring: a shared-memory mapping (or, for tests and
/// in-process use, an owned buffer), accessed only through atomic loads and
/// stores, never through plain references, because another process writes it
/// concurrently.
///
/// Cloning is cheap and yields another handle to the same memory (a
/// [`RingWriter`](super::RingWriter) and any number of
/// [`RingReader`](super::RingReader)s each hold one).
///
/// A reader only ever loads, so a `PROT_READ` mapping is enough for
/// [`RingReader`](super::RingReader) (on targets where 8-byte atomic loads
/// are plain loads, which includes x86-64 and AArch64).
#[derive(Clone)]
pub struct RingRegion {
    ptr: NonNull<u8>,
    len: usize,
    /// Keeps the memory alive: the owned buffer, or the caller's mapping.
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: all access to the memory behind `ptr` goes through atomic
// operations (see the accessors below), so sharing the handle between threads
// cannot create a data race; the owner, if any, is itself Send + Sync.
unsafe impl Send for RingRegion {}
// SAFETY: as above.
unsafe impl Sync for RingRegion {}

impl fmt::Debug for RingRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingRegion")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("owned", &self._owner.is_some())
            .finish()
    }
}

impl RingRegion {
    /// A zeroed, 8-byte-aligned region of at least `len` bytes (rounded up
    /// to a multiple of 8) owned by the handle: for tests and for a producer
    /// and readers in one process.
    pub fn new_owned(len: usize) -> Self {
        let words: Box<[AtomicU64]> = (0..len.div_ceil(8)).map(|_| AtomicU64::new(0)).collect();
        let len = words.len() * 8;
        let words = Arc::new(words);
        // Derived from a shared reference to atomics, after the buffer has
        // reached its final owner: writing through it is fine because every
        // access is atomic (interior mutability). A zero-length slice gives a
        // dangling, aligned, non-null pointer that is never accessed.
        let ptr = NonNull::from(&**words).cast::<u8>();
        let owner: Arc<dyn Any + Send + Sync> = words;
        Self {
            ptr,
            len,
            _owner: Some(owner),
        }
    }

    /// A region over memory the caller maps, typically an `mmap` of a POSIX
    /// shared-memory object.
    ///
    /// Returns an error if `ptr` is null or not 8-byte aligned (map it
    /// page-aligned, as `mmap` does).
    ///
    /// # Safety
    ///
    /// - `ptr..ptr + len` must be mapped, readable (and writable, if a
    ///   [`RingWriter`](super::RingWriter) uses this region) for as long as
    ///   this handle or any clone of it exists;
    /// - within this process the memory must be accessed only atomically
    ///   (through `RingRegion` handles, or other atomics) for that time; other
    ///   processes must follow the ring protocol (they write with atomic
    ///   stores of the field's own width).
    ///
    /// Prefer [`from_raw_with_owner`](Self::from_raw_with_owner), which ties
    /// the mapping's lifetime to the handle.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Result<Self, RingError> {
        let ptr = Self::check_ptr(ptr)?;
        Ok(Self {
            ptr,
            len,
            _owner: None,
        })
    }

    /// Like [`from_raw`](Self::from_raw), but the handle (and its clones)
    /// keep `owner` alive — pass the object that unmaps the memory when
    /// dropped, and the mapping lives exactly as long as the last handle.
    ///
    /// # Safety
    ///
    /// As for [`from_raw`](Self::from_raw), except that the memory must stay
    /// mapped for as long as `owner` is alive (rather than as long as the
    /// handles exist).
    pub unsafe fn from_raw_with_owner<O: Send + Sync + 'static>(
        ptr: *mut u8,
        len: usize,
        owner: O,
    ) -> Result<Self, RingError> {
        let ptr = Self::check_ptr(ptr)?;
        Ok(Self {
            ptr,
            len,
            _owner: Some(Arc::new(owner)),
        })
    }

    fn check_ptr(ptr: *mut u8) -> Result<NonNull<u8>, RingError> {
        let ptr = NonNull::new(ptr).ok_or(RingError::NullRegion)?;
        let addr = ptr.as_ptr() as usize;
        if addr % 8 != 0 {
            return Err(RingError::MisalignedRegion { addr });
        }
        Ok(ptr)
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the region (for diagnostics; do not read through it).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Copy the start of the region into `out` with relaxed 8-byte atomic
    /// loads, for diagnostics and tests of a quiescent region (while a
    /// producer runs, the copy may be inconsistent). Copies
    /// `min(out.len(), len())` rounded down to a multiple of 8 bytes and
    /// returns that count.
    pub fn snapshot_into(&self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len) / 8 * 8;
        for (i, chunk) in out[..n].chunks_exact_mut(8).enumerate() {
            let word = self.u64_at(i * 8).load(Ordering::Relaxed);
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        n
    }

    /// The 8-byte atomic at byte offset `off`. Panics (a bug in this crate)
    /// if the offset is misaligned or out of range; callers check offsets
    /// against a validated layout first.
    #[inline]
    pub(crate) fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(
            off % 8 == 0 && off + 8 <= self.len,
            "u64 access at {off} of {}",
            self.len
        );
        // SAFETY: in range and aligned (checked above; `ptr` is 8-aligned);
        // the memory is valid for the lifetime of `self` (constructor
        // contract) and only ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast()) }
    }

    /// The 4-byte atomic at byte offset `off` (see [`Self::u64_at`]).
    #[inline]
    pub(crate) fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off % 4 == 0 && off + 4 <= self.len,
            "u32 access at {off} of {}",
            self.len
        );
        // SAFETY: as in `u64_at`.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast()) }
    }

    /// The 2-byte atomic at byte offset `off` (see [`Self::u64_at`]).
    #[inline]
    pub(crate) fn u16_at(&self, off: usize) -> &AtomicU16 {
        assert!(
            off % 2 == 0 && off + 2 <= self.len,
            "u16 access at {off} of {}",
            self.len
        );
        // SAFETY: as in `u64_at`.
        unsafe { AtomicU16::from_ptr(self.ptr.as_ptr().add(off).cast()) }
    }

    /// Store `src` at `base + rel` with relaxed atomic stores. The frame's
    /// bytes `0..body_end` (`body_end` = frame_bytes rounded down to a
    /// multiple of 8) are accessed as aligned 8-byte words, the rest as 2-byte
    /// words, by both writer and reader, so every location is always accessed
    /// with the same width. `base` must be 8-aligned, `rel` and `src.len()`
    /// must keep body words whole (checked by the caller).
    pub(crate) fn store_frame_bytes(&self, base: usize, rel: usize, src: &[u8], body_end: usize) {
        let body_len = body_end.saturating_sub(rel).min(src.len());
        let (body, tail) = src.split_at(body_len);
        debug_assert!(rel % 8 == 0 || body.is_empty());
        debug_assert!(body.len() % 8 == 0);
        let mut at = base + rel;
        for chunk in body.chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.u64_at(at)
                .store(u64::from_ne_bytes(word), Ordering::Relaxed);
            at += 8;
        }
        for chunk in tail.chunks_exact(2) {
            let half = u16::from_ne_bytes([chunk[0], chunk[1]]);
            self.u16_at(at).store(half, Ordering::Relaxed);
            at += 2;
        }
    }

    /// Load a whole frame of `out.len()` bytes from `base` (8-aligned) with
    /// relaxed atomic loads, with the same word structure as
    /// [`Self::store_frame_bytes`].
    pub(crate) fn load_frame_bytes(&self, base: usize, out: &mut [u8]) {
        let body_end = out.len() - out.len() % 8;
        let (body, tail) = out.split_at_mut(body_end);
        let mut at = base;
        for chunk in body.chunks_exact_mut(8) {
            let word = self.u64_at(at).load(Ordering::Relaxed);
            chunk.copy_from_slice(&word.to_ne_bytes());
            at += 8;
        }
        for chunk in tail.chunks_exact_mut(2) {
            let half = self.u16_at(at).load(Ordering::Relaxed);
            chunk.copy_from_slice(&half.to_ne_bytes());
            at += 2;
        }
    }

    /// Zero `len` bytes at `off` with relaxed 8-byte stores (`off` and `len`
    /// multiples of 8). Only for reserved areas that nobody reads with another
    /// width.
    pub(crate) fn zero_words(&self, off: usize, len: usize) {
        for at in (off..off + len).step_by(8) {
            self.u64_at(at).store(0, Ordering::Relaxed);
        }
    }
}
