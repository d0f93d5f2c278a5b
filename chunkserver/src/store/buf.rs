//! `IoBuf`: a heap buffer aligned for O_DIRECT, with a view window.
//!
//! Written here rather than taken from a crate because the store needs three
//! things together: 4 KiB alignment, a stable address while the kernel owns it
//! (io_uring), and a cheap sub-range view so a read of 3 sectors can return the
//! middle of a whole-block read without copying. `bytes::BytesMut` gives no
//! alignment guarantee; `aligned-vec` gives no view.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Memory alignment for every I/O buffer: the largest logical block size a
/// disk under the store may have.
pub const IO_ALIGN_BYTES: usize = 4096;

pub struct IoBuf {
    ptr: NonNull<u8>,
    capacity_bytes: usize,
    view_start: usize,
    view_len: usize,
}

// SAFETY: IoBuf owns its allocation exclusively (like Vec<u8>); nothing else
// aliases it, so moving it to or sharing it across threads is sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give out `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes (capacity rounded up to the alignment).
    pub fn zeroed(len: usize) -> Self {
        let capacity_bytes = len.div_ceil(IO_ALIGN_BYTES).max(1) * IO_ALIGN_BYTES;
        let layout =
            Layout::from_size_align(capacity_bytes, IO_ALIGN_BYTES).expect("valid io layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self {
            ptr,
            capacity_bytes,
            view_start: 0,
            view_len: len,
        }
    }

    /// Copies `data` into a new aligned buffer.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// Narrows the view to `[start, start + len)` of the current view.
    pub fn set_view(&mut self, start: usize, len: usize) {
        assert!(
            start + len <= self.view_len,
            "view {start}+{len} beyond {}",
            self.view_len
        );
        self.view_start += start;
        self.view_len = len;
    }

    /// Widens the view back to the whole allocation's first `len` bytes.
    pub fn reset_view(&mut self, len: usize) {
        assert!(len <= self.capacity_bytes);
        self.view_start = 0;
        self.view_len = len;
    }

    /// Pointer to the start of the view, for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: view_start <= capacity_bytes, inside the allocation.
        unsafe { self.ptr.as_ptr().add(self.view_start) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: view_start <= capacity_bytes, inside the allocation.
        unsafe { self.ptr.as_ptr().add(self.view_start) }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the view lies inside the allocation, which is initialised
        // (alloc_zeroed) and owned by self.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.view_len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.view_len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout =
            Layout::from_size_align(self.capacity_bytes, IO_ALIGN_BYTES).expect("valid io layout");
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.view_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_viewed() {
        let mut b = IoBuf::zeroed(10_000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN_BYTES, 0);
        assert_eq!(b.capacity_bytes(), 12_288);
        assert!(b.iter().all(|&x| x == 0));
        b[5000] = 7;
        b.set_view(4096, 1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b[904], 7);
        b.reset_view(10_000);
        assert_eq!(b[5000], 7);
    }
}
