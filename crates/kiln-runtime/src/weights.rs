//! Weight tensors as the runtime sees them: matrices left in their stored block format and
//! read in place (from a memory map or owned memory), and small vectors dequantized to f32.
//!
//! Where the bytes come from is abstracted by [`TensorSource`]: a GGUF file today, safetensors
//! folders and kiln packages through the same trait, so the forward pass never knows.

use crate::error::ModelError;
use kiln_format::ggml::{self, GgmlType};
use kiln_format::gguf::GgufFile;
use kiln_format::kiln_types::{self, KilnType, TensorFormat};
use std::path::Path;
use std::sync::Arc;

/// Bytes that weights point into, kept alive as long as any weight refers to them.
pub trait WeightStorage: Send + Sync {
    /// The whole storage (e.g. a mapped file).
    fn bytes(&self) -> &[u8];

    /// Called when `range` has been copied elsewhere and is read from there: storage that
    /// can (a mapped file) drops it from resident memory. Reading it again must stay valid.
    fn release(&self, _range: std::ops::Range<usize>) {}

    /// Whether [`WeightStorage::release`] frees the memory, so a copy of the data costs no
    /// memory once made (a mapped file).
    fn releases(&self) -> bool {
        false
    }
}

impl WeightStorage for GgufFile {
    fn bytes(&self) -> &[u8] {
        GgufFile::bytes(self)
    }

    fn release(&self, range: std::ops::Range<usize>) {
        self.release_range(range);
    }

    fn releases(&self) -> bool {
        true
    }
}

impl WeightStorage for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Where one tensor's data lies, in what format and shape.
#[derive(Clone)]
pub struct TensorRef {
    /// The storage holding the data.
    pub storage: Arc<dyn WeightStorage>,
    /// Byte offset of the data in the storage.
    pub offset: usize,
    /// Shape in ggml order (`dims[0]` is the contiguous row length).
    pub dims: Vec<u64>,
    /// Storage format: a ggml block type, or (in kiln packages) a kiln format.
    pub format: TensorFormat,
}

impl TensorRef {
    /// Elements in the tensor.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The tensor's bytes, or `None` if the shape does not fit the format or the storage.
    pub fn data(&self) -> Option<&[u8]> {
        let len = usize::try_from(self.format.data_length(&self.dims)?).ok()?;
        self.storage
            .bytes()
            .get(self.offset..self.offset.checked_add(len)?)
    }
}

/// A collection of named tensors, under the canonical (GGUF) names the architectures use:
/// `token_embd.weight`, `blk.N.attn_q.weight`, ….
pub trait TensorSource {
    /// The file or folder the tensors come from, for messages.
    fn origin(&self) -> &Path;
    /// The tensor of that canonical name, if present.
    fn tensor(&self, name: &str) -> Option<TensorRef>;
    /// Every tensor name present.
    fn names(&self) -> Vec<String>;
    /// How messages name the tensor of canonical name `name`: quoted, plus the container's
    /// own name for it where that differs.
    fn describe(&self, name: &str) -> String {
        format!("'{name}'")
    }
}

/// A GGUF file as a tensor source (names are already canonical).
pub struct GgufSource(pub Arc<GgufFile>);

impl TensorSource for GgufSource {
    fn origin(&self) -> &Path {
        self.0.path()
    }

    fn tensor(&self, name: &str) -> Option<TensorRef> {
        let info = self.0.tensor(name)?;
        Some(TensorRef {
            storage: Arc::clone(&self.0) as Arc<dyn WeightStorage>,
            offset: usize::try_from(self.0.tensor_file_offset(info)).ok()?,
            dims: info.dims.clone(),
            format: info.ty.into(),
        })
    }

    fn names(&self) -> Vec<String> {
        self.0.tensors().iter().map(|t| t.name.clone()).collect()
    }
}

/// A 2-D weight matrix of `rows` output channels, each `cols` contiguous elements in a GGUF
/// block format or a kiln format, read in place from its storage — or, for the 32-element
/// ggml formats where this CPU's kernels read it faster, rewritten at load into the planar
/// row layout ([`kiln_kernels::planar`]), which takes exactly as many bytes.
#[derive(Clone)]
pub struct WeightMatrix {
    storage: Arc<dyn WeightStorage>,
    offset: usize,
    format: TensorFormat,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    planar: bool,
    /// The lookup tables converted for the kernels, where they read those
    /// ([`kiln_kernels::kiln_formats::convert_row_tables`]).
    row_tables: Option<Arc<kiln_kernels::aligned::AlignedVec<u8>>>,
}

/// Whether matrices are rewritten into the planar layout (the others of a mapped file copied
/// as stored beside them) and lookup tables converted ahead where the kernels support it:
/// unless `KILN_REPACK=0` (to compare against the stored layout, read in place).
fn repack_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("KILN_REPACK").map_or(true, |v| v != "0"))
}

/// When the planar copies' arena is advised to use transparent huge pages (`KILN_HUGEPAGES`):
/// `1` before it is filled, so decoding runs on huge pages from the first token (loading may
/// then wait for the system to find them: on this project's virtual machine a first load after
/// idle took 0.6 s instead of 0.2 s for Gemma 3); `0` never; anything else, or unset, after it
/// is filled, so loading never waits, and a thread of its own merges the pages at once
/// ([`HugePageMerge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HugePages {
    BeforeFilling,
    AfterFilling,
    Never,
}

fn huge_pages() -> HugePages {
    static SETTING: std::sync::OnceLock<HugePages> = std::sync::OnceLock::new();
    *SETTING.get_or_init(|| match std::env::var("KILN_HUGEPAGES").as_deref() {
        Ok("1") => HugePages::BeforeFilling,
        Ok("0") => HugePages::Never,
        _ => HugePages::AfterFilling,
    })
}

impl WeightMatrix {
    /// Looks up tensor `name` and checks it is a matrix of `cols` × `rows` (ggml order).
    pub fn load(
        source: &dyn TensorSource,
        name: &str,
        cols: usize,
        rows: usize,
    ) -> Result<WeightMatrix, ModelError> {
        let t = require(source, name)?;
        let shape_ok = match t.dims.as_slice() {
            [c, r] | [c, r, 1] | [c, r, 1, 1] => *c as usize == cols && *r as usize == rows,
            _ => false,
        };
        if !shape_ok {
            return Err(ModelError::bad(
                source.origin(),
                format!(
                    "tensor {} has shape {:?}, expected [{cols}, {rows}]",
                    source.describe(name),
                    t.dims
                ),
            ));
        }
        let row_bytes = match t.format {
            TensorFormat::Ggml(ty) => ty.row_bytes(cols),
            TensorFormat::Kiln(ty) => ty.row_bytes(cols),
        };
        let fits = t.format.data_length(&[cols as u64, rows as u64]).is_some();
        let row_bytes = row_bytes.filter(|_| fits).ok_or_else(|| {
            ModelError::bad(
                source.origin(),
                format!(
                    "tensor {}: a {rows}x{cols} matrix does not fit format {} (rows must be a \
                     whole number of its blocks)",
                    source.describe(name),
                    t.format
                ),
            )
        })?;
        let data = tensor_data(source, name, &t)?;
        if let TensorFormat::Kiln(ty) = t.format {
            kiln_types::check_data(ty, data, rows, cols).map_err(|e| {
                ModelError::bad(
                    source.origin(),
                    format!("tensor {}: {e}", source.describe(name)),
                )
            })?;
        }
        Ok(WeightMatrix {
            storage: t.storage,
            offset: t.offset,
            format: t.format,
            rows,
            cols,
            row_bytes,
            planar: false,
            row_tables: None,
        })
    }

    /// Whether [`make_planar_all`] would rewrite the rows.
    fn planar_candidate(&self) -> bool {
        let isa = kiln_kernels::detect();
        !self.planar
            && repack_enabled()
            && match self.format {
                TensorFormat::Ggml(ty) => kiln_kernels::planar::supported(isa, ty, self.cols),
                TensorFormat::Kiln(ty) => kiln_kernels::planar::kiln::supported(isa, ty, self.cols),
            }
    }

    /// Whether [`make_planar_all`] would copy the rows into its arena: planar, or as stored
    /// where they come from a mapped file (whose pages are then released). Rows already in an
    /// arena are neither: it releases nothing, and planar rows are not rewritten again.
    fn arena_candidate(&self) -> bool {
        repack_enabled() && (self.storage.releases() || self.planar_candidate())
    }

    /// Rewrites whole rows `src` of this matrix's format into planar rows in `dst`.
    fn pack_planar(format: TensorFormat, cols: usize, src: &[u8], dst: &mut [u8]) {
        match format {
            TensorFormat::Ggml(ty) => kiln_kernels::planar::pack_rows(ty, cols, src, dst),
            TensorFormat::Kiln(ty) => kiln_kernels::planar::kiln::pack_rows(ty, cols, src, dst),
        }
    }

    /// The kernels' view of a kiln-format matrix (planar rows or as stored).
    ///
    /// # Panics
    /// If the matrix is in a ggml format.
    pub(crate) fn kiln_matrix(&self) -> kiln_kernels::kiln_formats::KilnMatrix<'_> {
        use kiln_kernels::kiln_formats::KilnMatrix;
        let ty = self.kiln_format().expect("kiln-format weights");
        let (data, rows, cols) = (self.data(), self.rows, self.cols);
        let m = if self.planar {
            KilnMatrix::new_planar(ty, data, rows, cols)
        } else {
            KilnMatrix::new(ty, data, rows, cols)
        }
        .expect("shape validated at load");
        match &self.row_tables {
            Some(t) => m.with_row_tables(t).expect("converted from this matrix"),
            None => m,
        }
    }

    /// Whether the rows are in the planar layout ([`kiln_kernels::planar`]) rather than as
    /// stored (then [`WeightMatrix::data`] returns planar rows of the format).
    pub fn is_planar(&self) -> bool {
        self.planar
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input channels (elements per row).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The ggml block type of the stored weights, if they are in one (`None` for a kiln
    /// format, see [`WeightMatrix::kiln_format`]).
    pub fn ggml_format(&self) -> Option<GgmlType> {
        match self.format {
            TensorFormat::Ggml(t) => Some(t),
            TensorFormat::Kiln(_) => None,
        }
    }

    /// The storage format: a ggml block type or a kiln format.
    pub fn tensor_format(&self) -> TensorFormat {
        self.format
    }

    /// The kiln format of the stored weights, if they are in one.
    pub fn kiln_format(&self) -> Option<KilnType> {
        self.format.kiln()
    }

    /// Bytes of the stored weights (for lookup-table formats, the tables included).
    pub fn n_bytes(&self) -> usize {
        match self.format {
            TensorFormat::Kiln(t) => t
                .data_length(self.cols, self.rows)
                .expect("shape validated at load") as usize,
            TensorFormat::Ggml(_) => self.row_bytes * self.rows,
        }
    }

    /// Bytes of one stored row (for lookup-table formats, its indices; the tables follow
    /// the last row).
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// The stored bytes of every row, row 0 first (planar rows if [`WeightMatrix::is_planar`]).
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.n_bytes()]
    }

    /// Row `r` in the layout its format defines (a GGUF block row, a kiln-format row), also
    /// when the matrix holds it planar ([`WeightMatrix::is_planar`]): for readers of the
    /// encoding itself, such as an exporter carrying it over.
    pub fn stored_row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        let row = self.row_data(r);
        if !self.planar {
            return std::borrow::Cow::Borrowed(row);
        }
        let mut out = vec![0u8; row.len()];
        match self.format {
            TensorFormat::Ggml(ty) => {
                kiln_kernels::planar::unpack_row(ty, self.cols, row, &mut out)
            }
            TensorFormat::Kiln(ty) => {
                kiln_kernels::planar::kiln::unpack_row(ty, self.cols, row, &mut out)
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// The bytes of row `r` as held (planar if [`WeightMatrix::is_planar`]).
    #[inline]
    pub fn row_data(&self, r: usize) -> &[u8] {
        let start = self.offset + r * self.row_bytes;
        &self.storage.bytes()[start..start + self.row_bytes]
    }

    /// Dequantizes the rows from `start` into `out`, whole rows of `cols` elements one after
    /// another, each exactly as [`WeightMatrix::dequantize_row`] gives it. The kernels' view of
    /// a kiln-format matrix is made once for all of them: made per row, it cost half as much
    /// as dequantizing a row of 576 columns.
    ///
    /// # Panics
    /// If `out` is not whole rows or runs past the last row.
    pub fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        assert!(
            out.len() % self.cols == 0 && start + out.len() / self.cols <= self.rows,
            "dequantize_rows: {} values from row {start} of {} by {}",
            out.len(),
            self.rows,
            self.cols
        );
        let n = out.len() / self.cols;
        if let TensorFormat::Kiln(_) = self.format {
            let m = self.kiln_matrix();
            kiln_kernels::kiln_formats::dequantize_rows(&m, start..start + n, out);
            return;
        }
        for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(start + i, row);
        }
    }

    /// Dequantizes row `r` into `out` (`cols` elements), exactly as the format defines.
    #[inline]
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self.format {
            // The row length was validated against the block size at load: cannot fail.
            TensorFormat::Ggml(t) if self.planar => {
                kiln_kernels::planar::dequantize_row(t, self.cols, self.row_data(r), out)
            }
            // The kernel crate's dequantization: the same values, AVX-512 for the K-quants.
            TensorFormat::Ggml(t) => {
                kiln_kernels::ggml_dequant::dequantize_row(t, self.row_data(r), out)
            }
            TensorFormat::Kiln(_) => {
                // The kernel crate's dequantization: the same values, SIMD where it has any.
                kiln_kernels::kiln_formats::dequantize_row(&self.kiln_matrix(), r, out)
            }
        }
    }

    /// Whether [`WeightMatrix::dequantize_rows_bf16`] has a kernel here (kiln formats on CPUs
    /// with AVX-512 BF16), which the bf16 prompt GEMM then packs from. (For the ggml rows,
    /// planar ones and K-quants alike, writing bf16 rather than f32 measured no faster on
    /// SmolLM2 and Gemma 3: their packing is cheap beside the table lookups and the per-row
    /// preparation that the kiln formats' rows save.)
    pub fn has_bf16_dequantize(&self) -> bool {
        match self.format {
            TensorFormat::Kiln(_) => {
                kiln_kernels::kiln_formats::has_bf16_dequantize(&self.kiln_matrix())
            }
            TensorFormat::Ggml(_) => false,
        }
    }

    /// The rows from `start` dequantized and rounded to bf16 into `out`, one every `stride`
    /// words (`out.len() / stride` rows, the words past `cols` zero): each value
    /// `kiln_kernels::gemm_bf16::to_bf16` of [`WeightMatrix::dequantize_row`]'s.
    pub fn dequantize_rows_bf16(&self, start: usize, out: &mut [u16], stride: usize) {
        let rows = start..start + out.len() / stride.max(1);
        match self.format {
            TensorFormat::Kiln(_) => kiln_kernels::kiln_formats::dequantize_rows_bf16(
                &self.kiln_matrix(),
                rows,
                out,
                stride,
            ),
            TensorFormat::Ggml(_) => {
                let mut values = vec![0.0f32; self.cols];
                for (r, row) in rows.zip(out.chunks_exact_mut(stride)) {
                    self.dequantize_row(r, &mut values);
                    let (words, pad) = row.split_at_mut(self.cols);
                    kiln_kernels::gemm_bf16::round_to_bf16(&values, words);
                    pad.fill(0);
                }
            }
        }
    }
}

/// Readies every matrix of `ms` for this CPU's kernels: rows rewritten into the planar layout
/// ([`make_planar_all`]), and lookup tables converted ahead where the kernels would convert
/// them per token ([`kiln_kernels::kiln_formats::uses_row_tables`]; per table its entries'
/// 16-bit integers and a scale, 4 bytes more than the f16 table beside it). Returns the merge
/// of the copies into huge pages, where one was started.
pub fn prepare_for_kernels(mut ms: Vec<&mut WeightMatrix>) -> Option<Arc<HugePageMerge>> {
    let isa = kiln_kernels::detect();
    for m in ms.iter_mut() {
        let Some(ty) = m.kiln_format() else { continue };
        if m.row_tables.is_none()
            && repack_enabled()
            && kiln_kernels::kiln_formats::uses_row_tables(isa, ty)
        {
            m.row_tables =
                kiln_kernels::kiln_formats::convert_row_tables(&m.kiln_matrix()).map(Arc::new);
        }
    }
    make_planar_all(ms)
}

/// Rewrites every matrix of `ms` into the planar layout ([`kiln_kernels::planar`]) where this
/// CPU's kernels read it (and `KILN_REPACK` is not `0`), and copies the other matrices of a
/// mapped file as stored: a copy per matrix, which matrices cloned before do not share. The
/// copies lie in one arena ([`kiln_format::WeightArena`]) in the order of `ms`, advised to use
/// transparent huge pages (as `KILN_HUGEPAGES` asks; by default merged into them on a thread of
/// its own, which the returned [`HugePageMerge`] follows): a decode step streams every weight.
/// SmolLM2's `Q4_0` decode ran 7 % slower with a small allocation per matrix than in an arena
/// on huge pages, 1 % slower in an arena on small pages; Gemma 3's `Q4_K_M` about 9 % slower
/// either way (`docs/quantization.md`). A mapped file's pages are small pages, so the formats
/// without planar rows (`I8_CH`, `LUT8`) are copied too, for the same streaming. The work goes in
/// slices of about 8 MiB spread over the CPU's cores (the copies' page faults are most of a
/// model's load time). Each slice's source is released once it is rewritten, and each matrix's
/// whole source at the end (the pages two slices share), so the copies and their sources are
/// never both resident.
pub fn make_planar_all(ms: Vec<&mut WeightMatrix>) -> Option<Arc<HugePageMerge>> {
    const SLICE: usize = 8 << 20;
    const ALIGN: usize = 64;
    let mut ms: Vec<(&mut WeightMatrix, bool)> = ms
        .into_iter()
        .filter(|m| m.arena_candidate())
        .map(|m| {
            let planar = m.planar_candidate();
            (m, planar)
        })
        .collect();
    if ms.is_empty() {
        return None;
    }
    // The copies lie in one arena in the order given (the forward pass's), each 64-byte aligned.
    let mut offsets = Vec::with_capacity(ms.len());
    let mut total = 0usize;
    for (m, _) in &ms {
        offsets.push(total);
        total = (total + m.n_bytes()).next_multiple_of(ALIGN);
    }
    let Ok(mut arena) = kiln_format::WeightArena::new(total) else {
        // Without the memory for copies the rows stay as stored, which every kernel reads.
        return None;
    };
    if huge_pages() == HugePages::BeforeFilling {
        arena.advise_huge_pages();
    }
    {
        let mut jobs = Vec::new();
        let mut rest = arena.bytes_mut();
        for (m, planar) in &ms {
            let (slot, tail) =
                std::mem::take(&mut rest).split_at_mut(m.n_bytes().next_multiple_of(ALIGN));
            rest = tail;
            // The rows; a lookup-table format's tables after them stay as they are.
            let body = m.rows * m.row_bytes;
            let (copy, tables) = slot[..m.n_bytes()].split_at_mut(body);
            tables.copy_from_slice(&m.data()[body..]);
            let step = m.row_bytes * SLICE.div_ceil(m.row_bytes);
            let rows = &m.data()[..body];
            for (i, (src, dst)) in rows.chunks(step).zip(copy.chunks_mut(step)).enumerate() {
                let at = m.offset + i * step;
                jobs.push(CopyJob {
                    matrix_bytes: m.n_bytes(),
                    planar: *planar,
                    format: m.format,
                    cols: m.cols,
                    src,
                    dst,
                    storage: &m.storage,
                    at,
                });
            }
        }
        // Taken from the end: the largest matrices first.
        jobs.sort_by_key(|job| job.matrix_bytes);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(jobs.len());
        let queue = std::sync::Mutex::new(jobs);
        let work = || {
            while let Some(job) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                if job.planar {
                    WeightMatrix::pack_planar(job.format, job.cols, job.src, job.dst);
                } else {
                    job.dst.copy_from_slice(job.src);
                }
                job.storage.release(job.at..job.at + job.src.len());
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(work);
            }
            work();
        });
    }
    let arena: Arc<kiln_format::WeightArena> = Arc::new(arena);
    let merge = if huge_pages() == HugePages::AfterFilling {
        arena.advise_huge_pages();
        HugePageMerge::start(arena.clone())
    } else {
        None
    };
    for ((m, planar), off) in ms.iter_mut().zip(offsets) {
        m.storage.release(m.offset..m.offset + m.n_bytes());
        m.storage = arena.clone();
        m.offset = off;
        m.planar = *planar;
    }
    merge
}

/// The merge of a model's weight arena into huge pages, which runs on a thread of its own
/// after loading ([`make_planar_all`]): decoding starts at once on small pages and gains huge
/// pages as they are made. On this project's virtual machine Gemma 3's 223 MB took 0.7 s;
/// `khugepaged` alone would take minutes. The thread runs at the usual priority, so it takes a
/// core from the model's threads while it lasts: at the lowest (`SCHED_IDLE`) it finished only
/// in the gaps of a two-thread decode, 5 s for Gemma 3, and slowed SmolLM2's decode by 6 %
/// meanwhile (a kernel without preemption holds a woken thread back until the merge yields).
pub struct HugePageMerge {
    outcome: std::sync::Mutex<Option<HugePageOutcome>>,
    done: std::sync::Condvar,
}

/// How a [`HugePageMerge`] ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HugePageOutcome {
    /// Bytes of weights in the arena.
    pub bytes: usize,
    /// Whether the system merged all of them (`false`: an older kernel, huge pages off, none
    /// free; the pages stay small until `khugepaged` comes to them).
    pub merged: bool,
    /// Time from the start of the merge to its end.
    pub took: std::time::Duration,
}

impl HugePageMerge {
    /// Starts merging `arena` on a new thread; `None` when it is smaller than a huge page or no
    /// thread can be made.
    fn start(arena: Arc<kiln_format::WeightArena>) -> Option<Arc<HugePageMerge>> {
        let bytes = arena.bytes().len();
        if bytes < kiln_format::WeightArena::HUGE_PAGE {
            return None;
        }
        let merge = Arc::new(HugePageMerge {
            outcome: std::sync::Mutex::new(None),
            done: std::sync::Condvar::new(),
        });
        let shared = merge.clone();
        let started = std::time::Instant::now();
        std::thread::Builder::new()
            .name("kiln-huge-pages".into())
            .spawn(move || {
                let merged = arena.collapse_huge_pages();
                let outcome = HugePageOutcome {
                    bytes,
                    merged,
                    took: started.elapsed(),
                };
                *shared.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                shared.done.notify_all();
            })
            .ok()?;
        Some(merge)
    }

    /// Waits for the merge to end (for measurements of the steady state).
    pub fn wait(&self) -> HugePageOutcome {
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(o) = *outcome {
                return o;
            }
            outcome = self.done.wait(outcome).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One slice of [`make_planar_all`]'s work: rows `src` of a matrix of `matrix_bytes` bytes,
/// rewritten into planar rows (or copied as stored) into `dst`, then released from `storage`
/// at `at`.
struct CopyJob<'a> {
    matrix_bytes: usize,
    planar: bool,
    format: TensorFormat,
    cols: usize,
    src: &'a [u8],
    dst: &'a mut [u8],
    storage: &'a Arc<dyn WeightStorage>,
    at: usize,
}

impl WeightStorage for kiln_format::WeightArena {
    fn bytes(&self) -> &[u8] {
        kiln_format::WeightArena::bytes(self)
    }
}

/// The tensor `name` of `source`, or an error naming it as missing.
pub(crate) fn require(source: &dyn TensorSource, name: &str) -> Result<TensorRef, ModelError> {
    source
        .tensor(name)
        .ok_or_else(|| ModelError::bad(source.origin(), format!("missing tensor '{name}'")))
}

/// The bytes of tensor `t` (named `name` in `source`), or an error when its shape and format
/// do not fit inside its storage.
pub(crate) fn tensor_data<'t>(
    source: &dyn TensorSource,
    name: &str,
    t: &'t TensorRef,
) -> Result<&'t [u8], ModelError> {
    t.data().ok_or_else(|| {
        ModelError::bad(
            source.origin(),
            format!(
                "tensor {}: data lies outside its storage",
                source.describe(name)
            ),
        )
    })
}

/// Loads a 1-D f32 vector (norm weights, biases) of length `len`, dequantizing if needed.
pub fn load_vector(
    source: &dyn TensorSource,
    name: &str,
    len: usize,
) -> Result<Vec<f32>, ModelError> {
    let t = require(source, name)?;
    if t.n_elements() != len as u64 || t.dims.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(ModelError::bad(
            source.origin(),
            format!(
                "tensor {} has shape {:?}, expected [{len}]",
                source.describe(name),
                t.dims
            ),
        ));
    }
    let data = tensor_data(source, name, &t)?;
    let mut out = vec![0.0f32; len];
    let TensorFormat::Ggml(ty) = t.format else {
        return Err(ModelError::bad(
            source.origin(),
            format!(
                "tensor {} is a vector stored as {}; vectors are stored in ggml types",
                source.describe(name),
                t.format
            ),
        ));
    };
    ggml::dequantize(ty, data, &mut out).map_err(|e| {
        ModelError::bad(
            source.origin(),
            format!("tensor {}: {e}", source.describe(name)),
        )
    })?;
    Ok(out)
}

/// Like [`load_vector`] but `Ok(None)` when the tensor is absent.
pub fn load_optional_vector(
    source: &dyn TensorSource,
    name: &str,
    len: usize,
) -> Result<Option<Vec<f32>>, ModelError> {
    if source.tensor(name).is_none() {
        return Ok(None);
    }
    load_vector(source, name, len).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_kernels::kiln_formats;

    /// A `rows` × `cols` `LUT4_B32` matrix in memory: varied units, parameter codes and
    /// indices, one table of ascending entries.
    fn lut4_b32_matrix(rows: usize, cols: usize) -> WeightMatrix {
        let ty = KilnType::Lut4B32 { group: None };
        let mut data = Vec::new();
        let mut seed = 12345u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) as u8
        };
        for r in 0..rows {
            data.extend_from_slice(&(0.01 + r as f32 * 1e-3).to_le_bytes());
            data.extend_from_slice(&(-0.003f32).to_le_bytes());
            for _ in 0..cols / 32 * 18 {
                data.push(next());
            }
        }
        data.extend((0..16u8).map(|k| k * 8));
        in_memory(ty, data, rows, cols)
    }

    /// A matrix of `ty` held in memory, its data checked.
    fn in_memory(ty: KilnType, data: Vec<u8>, rows: usize, cols: usize) -> WeightMatrix {
        kiln_types::check_data(ty, &data, rows, cols).expect("a valid tensor");
        WeightMatrix {
            row_bytes: ty.row_bytes(cols).unwrap(),
            storage: Arc::new(data),
            offset: 0,
            format: TensorFormat::Kiln(ty),
            rows,
            cols,
            planar: false,
            row_tables: None,
        }
    }

    /// Tables of 4-bit lookup-table rows are converted ahead and the rows rewritten into the
    /// planar layout where the kernels read them so, and the products, the rows' values and
    /// their stored bytes are the same bit for bit (every chunk count past the last group of
    /// four: 0 to 3).
    #[test]
    fn prepared_lut4_rows_compute_what_stored_rows_do() {
        let ty = KilnType::Lut {
            bits: 4,
            group: Some(1),
        };
        let rows = 9;
        for cols in [96, 128, 160, 576] {
            let mut data: Vec<u8> = (0..rows * cols / 2).map(|i| (i * 29 % 256) as u8).collect();
            for r in 0..rows {
                for k in 0..16 {
                    let v = (k as f32 - 7.5) * 0.01 * (r + 1) as f32;
                    data.extend_from_slice(&kiln_format::ggml::f32_to_f16(v).to_le_bytes());
                }
            }
            let stored = in_memory(ty, data, rows, cols);
            let mut prepared = stored.clone();
            prepare_for_kernels(vec![&mut prepared]);
            let isa = kiln_kernels::detect();
            assert_eq!(
                prepared.row_tables.is_some(),
                repack_enabled() && kiln_kernels::kiln_formats::uses_row_tables(isa, ty)
            );
            assert_eq!(
                prepared.is_planar(),
                repack_enabled() && kiln_kernels::planar::kiln::supported(isa, ty, cols)
            );
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.3)
                .collect();
            let mut xq = kiln_kernels::QuantizedRow::new();
            kiln_kernels::quantize_row(&x, kiln_formats::activation_format(ty), &mut xq);
            let (mut a, mut b) = (vec![0.0f32; rows], vec![0.0f32; rows]);
            let one = std::slice::from_ref(&xq);
            kiln_formats::dot_block(&stored.kiln_matrix(), 0..rows, one, &mut a, rows);
            kiln_formats::dot_block(&prepared.kiln_matrix(), 0..rows, one, &mut b, rows);
            assert_eq!(a, b, "{cols} columns");
            assert!(a.iter().all(|&v| v != 0.0));
            let (mut ra, mut rb) = (vec![0.0f32; cols], vec![0.0f32; cols]);
            for r in 0..rows {
                stored.dequantize_row(r, &mut ra);
                prepared.dequantize_row(r, &mut rb);
                assert_eq!(ra, rb, "row {r} of {cols} columns");
                assert_eq!(stored.stored_row(r), prepared.stored_row(r));
            }
        }
    }

    /// Matrices readied together share one arena, each copy 64-byte aligned and in the order
    /// given, and read exactly as each one readied alone.
    #[test]
    fn matrices_readied_together_share_one_arena() {
        let made = || {
            vec![
                ggml_matrix(GgmlType::Q4_0, 5, 96),
                lut4_b32_matrix(7, 256),
                ggml_matrix(GgmlType::Q6_K, 3, 256),
                ggml_matrix(GgmlType::Q8_0, 9, 64),
            ]
        };
        let mut together = made();
        make_planar_all(together.iter_mut().collect());
        let mut alone = made();
        for m in alone.iter_mut() {
            make_planar_all(vec![m]);
        }
        let stored = made();
        let planar: Vec<&WeightMatrix> = together.iter().filter(|m| m.is_planar()).collect();
        assert_eq!(planar.len(), if repack_enabled() { 3 } else { 0 });
        for pair in planar.windows(2) {
            assert!(Arc::ptr_eq(&pair[0].storage, &pair[1].storage));
            assert!(pair[0].offset + pair[0].n_bytes() <= pair[1].offset);
        }
        for (i, ((t, a), s)) in together.iter().zip(&alone).zip(&stored).enumerate() {
            assert_eq!(t.is_planar(), a.is_planar(), "matrix {i}");
            assert_eq!(t.offset % 64, 0, "matrix {i}");
            assert_eq!(t.data(), a.data(), "matrix {i}");
            let (mut rt, mut rs) = (vec![0.0f32; t.cols], vec![0.0f32; t.cols]);
            for r in 0..t.rows {
                t.dequantize_row(r, &mut rt);
                s.dequantize_row(r, &mut rs);
                assert_eq!(rt, rs, "matrix {i} row {r}");
            }
        }
    }

    /// Copies of more than a huge page are merged into huge pages on a thread of their own,
    /// whose end can be waited for, and read the same after; smaller ones are not.
    #[test]
    fn large_copies_merge_into_huge_pages_unchanged() {
        let (rows, cols) = (9000, 512);
        let stored = ggml_matrix(GgmlType::Q4_0, rows, cols);
        let mut copied = stored.clone();
        let merge = make_planar_all(vec![&mut copied]);
        let expected = repack_enabled() && huge_pages() == HugePages::AfterFilling;
        assert_eq!(merge.is_some(), expected);
        if let Some(merge) = merge {
            let outcome = merge.wait();
            assert_eq!(outcome.bytes, stored.n_bytes().next_multiple_of(64));
            assert_eq!(merge.wait(), outcome, "a second wait reads the same end");
        }
        let (mut a, mut b) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        for r in (0..rows).step_by(97) {
            stored.dequantize_row(r, &mut a);
            copied.dequantize_row(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
        let mut small = ggml_matrix(GgmlType::Q4_0, 8, cols);
        assert!(make_planar_all(vec![&mut small]).is_none());
    }

    /// Storage that says it frees what it releases, as a mapped file does (and counts the
    /// bytes released).
    struct MappedLike(Vec<u8>, std::sync::atomic::AtomicUsize);

    impl WeightStorage for MappedLike {
        fn bytes(&self) -> &[u8] {
            &self.0
        }

        fn release(&self, range: std::ops::Range<usize>) {
            self.1
                .fetch_add(range.len(), std::sync::atomic::Ordering::Relaxed);
        }

        fn releases(&self) -> bool {
            true
        }
    }

    /// Matrices of a mapped file without planar rows (`I8_CH`, an 8-bit lookup table) are
    /// copied into the arena as stored, and their pages released; the same matrices in
    /// memory stay where they are. Products, rows and stored bytes are the same bit for bit.
    #[test]
    fn mapped_matrices_without_planar_rows_are_copied_as_stored() {
        let (rows, cols) = (6, 128);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3)
            .collect();
        let i8ch = kiln_types::encode_i8_channel(&values, rows, cols).unwrap();
        let lut8_ty = KilnType::Lut {
            bits: 8,
            group: None,
        };
        let options = kiln_types::LutOptions::default();
        let lut8 = kiln_types::encode_lut(lut8_ty, &values, rows, cols, options).unwrap();
        for (ty, data) in [(KilnType::I8Ch, i8ch), (lut8_ty, lut8)] {
            let stored = in_memory(ty, data.clone(), rows, cols);
            let mapped = Arc::new(MappedLike(data, Default::default()));
            let mut copied = WeightMatrix {
                storage: mapped.clone(),
                ..stored.clone()
            };
            let mut kept = stored.clone();
            make_planar_all(vec![&mut copied, &mut kept]);
            assert!(Arc::ptr_eq(&kept.storage, &stored.storage));
            assert!(!copied.is_planar(), "{ty:?} has no planar rows");
            let moved = !std::ptr::addr_eq(Arc::as_ptr(&copied.storage), Arc::as_ptr(&mapped));
            assert_eq!(moved, repack_enabled(), "{ty:?}");
            if repack_enabled() {
                // Readied again, it stays where it is.
                let arena = Arc::clone(&copied.storage);
                make_planar_all(vec![&mut copied]);
                assert!(Arc::ptr_eq(&copied.storage, &arena), "{ty:?} copied twice");
                assert!(mapped.1.load(std::sync::atomic::Ordering::Relaxed) >= stored.n_bytes());
                assert_eq!(copied.data().as_ptr() as usize % 64, 0, "{ty:?}");
            }
            assert_eq!(copied.data(), stored.data(), "{ty:?}");
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let (mut a, mut b) = (vec![0.0f32; rows], vec![0.0f32; rows]);
            let pool = crate::pool::ThreadPool::new(2);
            let p = crate::kernels::Precision::Refined;
            crate::kernels::matmul(&pool, &copied, &x, 1, &mut a, p);
            crate::kernels::matmul(&pool, &stored, &x, 1, &mut b, p);
            assert_eq!(a, b, "{ty:?}");
        }
    }

    /// A `rows` × `cols` matrix of ggml type `ty` in memory, quantized from varied values.
    fn ggml_matrix(ty: GgmlType, rows: usize, cols: usize) -> WeightMatrix {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-3)
            .collect();
        let data = kiln_format::ggml::quantize(ty, &values).expect("quantizable");
        WeightMatrix {
            row_bytes: ty.row_bytes(cols).unwrap(),
            storage: Arc::new(data),
            offset: 0,
            format: TensorFormat::Ggml(ty),
            rows,
            cols,
            planar: false,
            row_tables: None,
        }
    }

    /// The bf16 rows the prompt GEMM packs are the f32 rows rounded, padded with zeros: for
    /// stored and planar `LUT4_B32` rows alike (the kernels make them wherever the CPU has
    /// AVX-512 BF16), and for ggml rows, planar (`Q5_0`) or not (`Q6_K`), which round the f32
    /// values.
    #[test]
    fn bf16_rows_are_the_f32_rows_rounded() {
        let cols = 256;
        let stored = lut4_b32_matrix(9, cols);
        let mut planar = stored.clone();
        make_planar_all(vec![&mut planar]);
        let q5 = ggml_matrix(GgmlType::Q5_0, 9, cols);
        let mut q5_planar = q5.clone();
        make_planar_all(vec![&mut q5_planar]);
        assert_eq!(q5_planar.is_planar(), repack_enabled());
        let q6k = ggml_matrix(GgmlType::Q6_K, 9, cols);
        for w in [&stored, &planar, &q5_planar, &q6k] {
            let kiln = w.kiln_format().is_some();
            assert_eq!(
                w.has_bf16_dequantize(),
                kiln_kernels::gemm_bf16::bf16_available() && kiln
            );
            let stride = cols + 2;
            let mut words = vec![0xffffu16; 7 * stride];
            w.dequantize_rows_bf16(2, &mut words, stride);
            let mut values = vec![0.0f32; cols];
            for (r, row) in (2..9).zip(words.chunks_exact(stride)) {
                w.dequantize_row(r, &mut values);
                let want: Vec<u16> = values
                    .iter()
                    .map(|&v| kiln_kernels::gemm_bf16::to_bf16(v))
                    .chain([0, 0])
                    .collect();
                assert_eq!(
                    row,
                    &want[..],
                    "{} row {r}, planar {}",
                    w.format,
                    w.is_planar()
                );
                assert!(row.iter().any(|&v| v != 0));
            }
        }
    }

    /// `LUT4_B32` matrices are rewritten into planar rows where the CPU's kernels read them,
    /// and dequantize and multiply exactly as before (every block count past the last group
    /// of four: 0 to 3).
    #[test]
    fn lut4_b32_planar_rows_compute_what_stored_rows_do() {
        for cols in [128, 160, 192, 224] {
            let stored = lut4_b32_matrix(9, cols);
            let mut planar = stored.clone();
            make_planar_all(vec![&mut planar]);
            let ty = stored.kiln_format().unwrap();
            let isa = kiln_kernels::detect();
            assert_eq!(
                planar.is_planar(),
                repack_enabled() && kiln_kernels::planar::kiln::supported(isa, ty, cols)
            );
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1)
                .collect();
            let mut xq = kiln_kernels::QuantizedRow::new();
            kiln_kernels::quantize_row_refined(&x, &mut xq);
            let (mut a, mut b) = (vec![0.0f32; 9], vec![0.0f32; 9]);
            kiln_formats::dot_block(
                &stored.kiln_matrix(),
                0..9,
                std::slice::from_ref(&xq),
                &mut a,
                9,
            );
            kiln_formats::dot_block(
                &planar.kiln_matrix(),
                0..9,
                std::slice::from_ref(&xq),
                &mut b,
                9,
            );
            assert_eq!(a, b, "{cols} columns");
            assert!(a.iter().any(|&v| v != 0.0));
            let (mut ra, mut rb) = (vec![0.0f32; cols], vec![0.0f32; cols]);
            for r in 0..9 {
                stored.dequantize_row(r, &mut ra);
                planar.dequantize_row(r, &mut rb);
                assert_eq!(ra, rb, "row {r} of {cols} columns");
            }
        }
    }
}
