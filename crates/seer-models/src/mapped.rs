//! Bytes in place in a weight file's memory map (GGUF or safetensors), shared by the
//! tensors that read them without a copy.

use std::ops::Range;
use std::sync::Arc;

use memmap2::Mmap;

/// A range of a file's map; the map stays alive as long as any of its views.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl MappedBytes {
    /// `range` of `map`; the caller has checked it lies inside.
    pub(crate) fn new(map: Arc<Mmap>, range: Range<usize>) -> Self {
        debug_assert!(range.end <= map.len());
        MappedBytes { map, start: range.start, len: range.len() }
    }

    /// Tells the system these bytes' pages are not needed for now (those wholly inside
    /// them). The map is read-only and the file unchanged, so a later read simply maps the
    /// pages again, from the page cache while they are still there.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        {
            let page = 4096;
            let start = self.start.next_multiple_of(page);
            let end = (self.start + self.len) / page * page;
            if end > start {
                // SAFETY: a read-only file map: dropping its pages loses nothing.
                let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
    }
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }
}

/// A vision weight read in place by the bf16 kernel gives its pages back after each
/// product: a tower's weights then take memory one matrix at a time, and only while
/// images are encoded (the pages stay in the page cache; the next product maps them
/// again without reading the file).
impl seer_kernels::HeldBytes for MappedBytes {
    fn bytes(&self) -> &[u8] {
        self
    }

    fn release(&self) {
        self.release_pages();
    }
}
