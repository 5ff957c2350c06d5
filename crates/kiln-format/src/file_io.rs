//! What the readers and writers of every container share: read-only mapping of a model file,
//! and atomic replacement of one.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::FormatError;

/// The bytes of an open file: mapped, or owned when mapping is impossible (an empty file) or
/// the caller handed over a buffer.
pub(crate) enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    /// Maps the file at `path` read-only.
    pub(crate) fn map(path: &Path) -> Result<Storage, FormatError> {
        let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
        let len = file.metadata().map_err(|e| FormatError::io(path, e))?.len();
        if len == 0 {
            // An empty file cannot be mapped; the parsers report it as truncated.
            return Ok(Storage::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only and private to this process. Mapping a file is only
        // unsound if the file changes underneath it; model files are treated as immutable
        // while open (kiln's own writers replace files by atomic rename, which leaves an
        // existing map on the old inode untouched). Every access is bounds-checked against
        // the length the map was created with.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        Ok(Storage::Mapped(map))
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }

    /// Drops the whole pages inside `range` from the process's resident memory, for bytes a
    /// reader has copied elsewhere (the runtime's load-time rewrites of weight rows), so they
    /// are not counted twice. Reading them again stays valid and gives the same bytes; owned
    /// storage, an empty or out-of-bounds range, and platforms without `madvise` keep
    /// everything.
    pub(crate) fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Storage::Mapped(m) = self {
            // 64 KiB: a multiple of every page size in use (4, 16 and 64 KiB), so the
            // interior is page-aligned wherever it runs; at most 128 KiB per range stays.
            const ALIGN: usize = 1 << 16;
            let start = range.start.next_multiple_of(ALIGN);
            let end = range.end.min(m.len()) / ALIGN * ALIGN;
            if start < end {
                // SAFETY: `MADV_DONTNEED` on a read-only shared file mapping only unmaps the
                // pages; the next access faults them in again from the page cache, with the
                // file's bytes, which do not change while the file is open (see `map`). So
                // every slice borrowed from the map keeps seeing the same bytes. The range is
                // within the map (clamped above) and page-aligned.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
                };
            }
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// Memory for weights rewritten at load (the runtime's planar copies): one anonymous mapping
/// for all of them, which can be advised to use transparent huge pages
/// ([`WeightArena::advise_huge_pages`]), so a decode step streaming every weight walks far
/// fewer page-table entries than with a separate small allocation per matrix.
pub struct WeightArena {
    map: memmap2::MmapMut,
    len: usize,
}

impl WeightArena {
    /// The size of a transparent huge page on the platforms kiln merges them on (x86-64 and
    /// aarch64 Linux with 4 KiB base pages).
    pub const HUGE_PAGE: usize = 2 << 20;

    /// `len` bytes of zeroed memory (at least one byte is mapped).
    pub fn new(len: usize) -> io::Result<WeightArena> {
        // Mapped in whole 2 MiB: Linux places an anonymous mapping of such a length on a
        // 2 MiB boundary, so all of it can lie in huge pages, its first and last bytes too.
        // The tail past `len` is never touched, so it never takes memory.
        let mapped = len.max(1).next_multiple_of(Self::HUGE_PAGE);
        let map = memmap2::MmapOptions::new().len(mapped).map_anon()?;
        Ok(WeightArena { map, len })
    }

    /// Asks the system to back the memory with transparent huge pages (Linux `madvise`;
    /// elsewhere, and where huge pages are off, nothing changes). Before the memory is first
    /// written, its pages fault in as huge pages; after, the kernel's background thread
    /// (`khugepaged`) merges them over the following minutes.
    pub fn advise_huge_pages(&self) {
        // Advice only: refusal leaves small pages, which are correct.
        #[cfg(target_os = "linux")]
        let _ = self.map.advise(memmap2::Advice::HugePage);
    }

    /// Merges the arena's memory into transparent huge pages now, 32 MiB per step from its
    /// start, where the system can (Linux 6.1 and later: `MADV_COLLAPSE`), rather than whenever
    /// `khugepaged` comes to it: that scans 16 MiB every 10 s by default, so a model of a few
    /// hundred MB would wait minutes. The bytes do not change, and readers may keep reading
    /// them meanwhile. Returns whether every step was done; the first refusal (an older kernel,
    /// huge pages set to `never`, no huge page free, another platform) ends it, leaving the
    /// remaining pages as they were, which are correct.
    pub fn collapse_huge_pages(&self) -> bool {
        #[cfg(target_os = "linux")]
        {
            const HUGE: usize = WeightArena::HUGE_PAGE;
            const STEP: usize = 16 * HUGE;
            if !huge_pages_allowed() {
                return false;
            }
            let base = self.map.as_ptr() as usize;
            // Whole huge pages of the filled bytes: collapse works on aligned 2 MiB spans.
            let (start, end) = (base.next_multiple_of(HUGE), (base + self.len) / HUGE * HUGE);
            for at in (start..end).step_by(STEP) {
                let len = STEP.min(end - at);
                // SAFETY: `[at, at + len)` lies inside this arena's mapping, which `self` keeps
                // mapped for the call. `MADV_COLLAPSE` copies the pages into huge pages and
                // swaps the page tables under the kernel's locks, so every byte reads the same
                // before, during and after; it never unmaps or changes memory a borrow may
                // point at.
                let status =
                    unsafe { libc::madvise(at as *mut libc::c_void, len, libc::MADV_COLLAPSE) };
                if status != 0 {
                    return false;
                }
            }
            start < end
        }
        #[cfg(not(target_os = "linux"))]
        false
    }

    /// The memory.
    pub fn bytes(&self) -> &[u8] {
        &self.map[..self.len]
    }

    /// The memory, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }
}

/// Whether the system's transparent huge pages are on (`always` or `madvise`). `MADV_COLLAPSE`
/// ignores that setting, so an administrator's `never` is honoured here.
#[cfg(target_os = "linux")]
fn huge_pages_allowed() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

/// Writes a file atomically: `write` fills a temporary file in the same directory, which is
/// flushed to disk and then renamed over `path`. Readers never see a partial file, and a
/// reader holding the old file mapped keeps its (unchanged) copy.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), FormatError> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| FormatError::io(&tmp, e))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, file);
        write(&mut w).map_err(|e| FormatError::io(&tmp, e))?;
        let file = w
            .into_inner()
            .map_err(|e| FormatError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| FormatError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| FormatError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Persist the rename itself; not every platform lets a directory be opened and synced,
    // and the data is already safe, so failure here is not an error.
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A fresh name next to `path`, unique within this process and across processes.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merging the arena into huge pages keeps its bytes; where the system says it merged
    /// them, the process's memory map shows huge pages in the arena.
    #[test]
    fn collapsed_arena_reads_back_unchanged() {
        let len = (6 << 20) + 1000;
        let mut arena = WeightArena::new(len).unwrap();
        assert_eq!(arena.bytes().len(), len);
        for (i, b) in arena.bytes_mut().iter_mut().enumerate() {
            *b = (i * 31 % 253) as u8;
        }
        let merged = arena.collapse_huge_pages();
        assert!(arena
            .bytes()
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i * 31 % 253) as u8));
        #[cfg(target_os = "linux")]
        if merged {
            assert!(anon_huge_kb(arena.bytes().as_ptr() as usize) >= 2048);
        }
        #[cfg(not(target_os = "linux"))]
        assert!(!merged);
        // Nothing to merge: not a whole huge page.
        assert!(!WeightArena::new(4096).unwrap().collapse_huge_pages());
    }

    /// `AnonHugePages` of the mapping holding `addr`, from `/proc/self/smaps`.
    #[cfg(target_os = "linux")]
    fn anon_huge_kb(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    return kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    /// Released pages of a mapped file read back as the file's bytes, at their edges too.
    #[test]
    fn released_map_pages_read_back_unchanged() {
        let path = std::env::temp_dir().join(format!("kiln-release-{}.bin", std::process::id()));
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let storage = Storage::map(&path).unwrap();
        assert!(matches!(storage, Storage::Mapped(_)));
        assert_eq!(storage.bytes(), &data[..]);
        storage.release(1000..500_000);
        storage.release(0..data.len() + 4096);
        storage.release(70_000..70_001);
        assert_eq!(storage.bytes(), &data[..]);
        drop(storage);
        std::fs::remove_file(&path).unwrap();
    }
}
