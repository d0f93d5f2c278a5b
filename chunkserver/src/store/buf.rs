//! `IoBuf`: a heap buffer aligned for O_DIRECT, with a view window, drawn
//! from a bounded pool.
//!
//! Without the pool every 1 MiB I/O mapped, faulted in, zeroed and unmapped a
//! fresh megabyte (glibc serves large aligned allocations with mmap): the
//! profile of the first benchmark spent more time in page faults and memset
//! than in the store. Freed buffers of power-of-two sizes from 4 KiB to 8 MiB
//! go back to a per-size free list (at most `POOL_CLASS_BUFFERS_MAX` buffers
//! and `POOL_CLASS_BYTES_MAX` bytes per size), and `for_overwrite` hands one
//! out without zeroing it when the caller will overwrite every byte.
//!
//! Written here rather than taken from a crate because the store needs three
//! things together: 4 KiB alignment, a stable address while the kernel owns it
//! (io_uring), and a cheap sub-range view so a read of 3 sectors can return the
//! middle of a whole-block read without copying. `bytes::BytesMut` gives no
//! alignment guarantee; `aligned-vec` gives no view.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

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
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::for_overwrite(len);
        b.fill(0);
        b
    }

    /// A buffer of `len` bytes whose contents are unspecified (but
    /// initialised: old bytes of an earlier buffer, or zeros), for a caller
    /// that overwrites all of it, such as the kernel filling a read.
    pub fn for_overwrite(len: usize) -> Self {
        let capacity_bytes = capacity_for(len);
        if let Some(ptr) = pool_take(capacity_bytes) {
            return Self {
                ptr,
                capacity_bytes,
                view_start: 0,
                view_len: len,
            };
        }
        let layout =
            Layout::from_size_align(capacity_bytes, IO_ALIGN_BYTES).expect("valid io layout");
        // SAFETY: layout has a non-zero size. Zeroed, so every byte is
        // initialised for the buffer's whole life, in or out of the pool.
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
        let mut b = Self::for_overwrite(data.len());
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

/// The data of a write, which the store only reads: a buffer of its own, or
/// shared bytes (say, the ones a replicated write also forwards to the other
/// replicas). Shared bytes whose start is aligned (an [`IoBuf`] turned into
/// `Bytes` with `Bytes::from_owner`, as the RPC server does) go to the kernel
/// as they are; any other start is copied into an aligned block buffer first,
/// as unaligned owned data is.
pub enum WriteData {
    Owned(IoBuf),
    Shared(bytes::Bytes),
}

impl From<IoBuf> for WriteData {
    fn from(buf: IoBuf) -> Self {
        WriteData::Owned(buf)
    }
}

impl From<bytes::Bytes> for WriteData {
    fn from(bytes: bytes::Bytes) -> Self {
        WriteData::Shared(bytes)
    }
}

impl Deref for WriteData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            WriteData::Owned(buf) => buf,
            WriteData::Shared(bytes) => bytes,
        }
    }
}

/// Lets a filled buffer become [`bytes::Bytes`] without a copy
/// (`Bytes::from_owner`), for replies and replication messages.
impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
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
        if pool_give(self.ptr, self.capacity_bytes) {
            return;
        }
        let layout =
            Layout::from_size_align(self.capacity_bytes, IO_ALIGN_BYTES).expect("valid io layout");
        // SAFETY: allocated in `for_overwrite` with this exact layout, and not
        // handed to the pool.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

const POOL_CLASS_MIN_SHIFT: u32 = 12;
const POOL_CLASS_MAX_SHIFT: u32 = 23;
const POOL_CLASSES: usize = (POOL_CLASS_MAX_SHIFT - POOL_CLASS_MIN_SHIFT + 1) as usize;
/// Idle buffers kept per size.
pub const POOL_CLASS_BUFFERS_MAX: usize = 64;
/// Idle bytes kept per size: bounds the pool to 12 x 16 MiB in the worst case,
/// and in practice to the two or three sizes a workload uses.
pub const POOL_CLASS_BYTES_MAX: usize = 16 << 20;

/// Free lists of pointers (as addresses, so the statics are Send) per size.
static POOL: [Mutex<Vec<usize>>; POOL_CLASSES] = [const { Mutex::new(Vec::new()) }; POOL_CLASSES];

/// Pooled sizes are powers of two; larger ones are multiples of the alignment.
fn capacity_for(len: usize) -> usize {
    let len = len.max(1);
    if len <= 1 << POOL_CLASS_MAX_SHIFT {
        len.next_power_of_two().max(1 << POOL_CLASS_MIN_SHIFT)
    } else {
        len.div_ceil(IO_ALIGN_BYTES) * IO_ALIGN_BYTES
    }
}

fn pool_class(capacity_bytes: usize) -> Option<usize> {
    let shift = capacity_bytes.trailing_zeros();
    (capacity_bytes.is_power_of_two()
        && (POOL_CLASS_MIN_SHIFT..=POOL_CLASS_MAX_SHIFT).contains(&shift))
    .then(|| (shift - POOL_CLASS_MIN_SHIFT) as usize)
}

fn pool_take(capacity_bytes: usize) -> Option<NonNull<u8>> {
    let class = pool_class(capacity_bytes)?;
    let addr = POOL[class]
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()?;
    NonNull::new(addr as *mut u8)
}

fn pool_give(ptr: NonNull<u8>, capacity_bytes: usize) -> bool {
    let Some(class) = pool_class(capacity_bytes) else {
        return false;
    };
    let keep = POOL_CLASS_BUFFERS_MAX
        .min(POOL_CLASS_BYTES_MAX / capacity_bytes)
        .max(1);
    let mut list = POOL[class].lock().unwrap_or_else(|e| e.into_inner());
    if list.len() >= keep {
        return false;
    }
    list.push(ptr.as_ptr() as usize);
    true
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
        assert_eq!(b.capacity_bytes(), 16_384);
        assert!(b.iter().all(|&x| x == 0));
        b[5000] = 7;
        b.set_view(4096, 1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b[904], 7);
        b.reset_view(10_000);
        assert_eq!(b[5000], 7);
    }

    #[test]
    fn pool_sizes_and_zeroing() {
        let mut a = IoBuf::for_overwrite(1 << 20);
        a.fill(0xee);
        drop(a);
        let b = IoBuf::zeroed(1 << 20);
        assert!(
            b.iter().all(|&x| x == 0),
            "zeroed means zeroed, pooled or not"
        );
        let big = IoBuf::zeroed((8 << 20) + 1);
        assert_eq!(
            big.capacity_bytes(),
            (8 << 20) + 4096,
            "beyond the pool: exact multiple"
        );
        assert_eq!(capacity_for(0), 4096);
        assert_eq!(pool_class(4096), Some(0));
        assert_eq!(pool_class(12_288), None);
    }
}
