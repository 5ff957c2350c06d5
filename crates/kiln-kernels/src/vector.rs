//! f32 vector kernels of the forward pass (attention scores, weighted sums of values, plain
//! sums): AVX2+FMA on x86-64 (AVX-512 for the row-batched scores and weighted sums), NEON on
//! aarch64, and scalar references they are held to.
//!
//! The references sum in eight interleaved partial sums, the order the AVX2 and NEON paths
//! use, so the results agree closely (not bit for bit: the SIMD paths fuse multiply and add).

use crate::isa::{detect, Isa};

/// Scalar reference of [`dot_f32`].
///
/// # Panics
/// If the slices differ in length.
pub fn dot_f32_reference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

/// Scalar reference of [`sum_f32`].
pub fn sum_f32_reference(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Scalar reference of [`axpy_f32`].
///
/// # Panics
/// If the slices differ in length.
pub fn axpy_f32_reference(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy_f32: lengths differ");
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `sum_i a[i] * b[i]`.
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_with(detect(), a, b)
}

/// [`dot_f32`] at a given level.
///
/// # Panics
/// If the slices differ in length or the CPU lacks `isa`.
#[inline]
pub fn dot_f32_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both x86 levels include AVX2 and FMA, which `is_available` confirms; the
        // slices have equal lengths (asserted above).
        Isa::Avx2 | Isa::Avx512Vnni if isa.is_available() => unsafe { x86::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of every aarch64 CPU; the slices have equal lengths.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::dot(a, b) },
        _ => {
            assert!(isa.is_available(), "dot_f32: this CPU cannot run {isa:?}");
            dot_f32_reference(a, b)
        }
    }
}

/// The sum of all elements.
#[inline]
pub fn sum_f32(x: &[f32]) -> f32 {
    sum_f32_with(detect(), x)
}

/// [`sum_f32`] at a given level.
///
/// # Panics
/// If the CPU lacks `isa`.
#[inline]
pub fn sum_f32_with(isa: Isa, x: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both x86 levels include AVX2, which `is_available` confirms.
        Isa::Avx2 | Isa::Avx512Vnni if isa.is_available() => unsafe { x86::sum(x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of every aarch64 CPU.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::sum(x) },
        _ => {
            assert!(isa.is_available(), "sum_f32: this CPU cannot run {isa:?}");
            sum_f32_reference(x)
        }
    }
}

/// `y += a * x`.
///
/// # Panics
/// If the slices differ in length.
#[inline]
pub fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_f32_with(detect(), a, x, y)
}

/// [`axpy_f32`] at a given level.
///
/// # Panics
/// If the slices differ in length or the CPU lacks `isa`.
#[inline]
pub fn axpy_f32_with(isa: Isa, a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy_f32: lengths differ");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both x86 levels include AVX2 and FMA, which `is_available` confirms; the
        // slices have equal lengths (asserted above).
        Isa::Avx2 | Isa::Avx512Vnni if isa.is_available() => unsafe { x86::axpy(a, x, y) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is part of every aarch64 CPU; the slices have equal lengths.
        Isa::Neon | Isa::NeonDotprod => unsafe { neon::axpy(a, x, y) },
        _ => {
            assert!(isa.is_available(), "axpy_f32: this CPU cannot run {isa:?}");
            axpy_f32_reference(a, x, y)
        }
    }
}

/// `out[j] = dot_f32(q, row j of k)` for consecutive rows of `q.len()` values in `k`: one
/// attention query against a run of keys, with one dispatch for all of them. Each is exactly
/// (bit for bit) what [`dot_f32`] computes, except on AVX-512, where whole blocks of sixteen
/// rows are summed in sixteen-lane registers and reduced together (a transpose of partial
/// sums): that takes the per-row horizontal sum out of short rows (64 and 256 values, the real
/// models' heads; prompts of 1024 tokens ran 12–14 % faster). Those sums are held to the
/// reference within `d · ε · Σ|q·k|`.
///
/// # Panics
/// If `q` is empty, `k` is not whole rows of `q.len()`, or `out` does not hold one value per
/// row.
pub fn dot_rows_f32(q: &[f32], k: &[f32], out: &mut [f32]) {
    dot_rows_f32_with(detect(), q, k, out)
}

/// [`dot_rows_f32`] at a given level.
///
/// # Panics
/// As [`dot_rows_f32`], and if the CPU lacks `isa`.
pub fn dot_rows_f32_with(isa: Isa, q: &[f32], k: &[f32], out: &mut [f32]) {
    let d = q.len();
    assert!(
        d > 0 && k.len() == out.len() * d,
        "dot_rows_f32: {} values are not {} rows of {d}",
        k.len(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both x86 levels include AVX2 and FMA (`is_available`); `k` holds `out.len()`
        // rows of `q.len()` (asserted above).
        Isa::Avx512Vnni if isa.is_available() => unsafe { avx512::dot_rows(q, k, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if isa.is_available() => unsafe { x86::dot_rows(q, k, out) },
        _ => {
            for (o, row) in out.iter_mut().zip(k.chunks_exact(d)) {
                *o = dot_f32_with(isa, q, row);
            }
        }
    }
}

/// `y += sum_j p[j] * (row j of v)` for consecutive rows of `y.len()` values in `v`: the
/// weighted sum of an attention head's values, exactly (bit for bit) as successive
/// [`axpy_f32`] calls compute it, with `y` kept in registers across the rows.
///
/// # Panics
/// If `y` is empty, `v` is not whole rows of `y.len()`, or `p` does not hold one weight per
/// row.
pub fn axpy_rows_f32(p: &[f32], v: &[f32], y: &mut [f32]) {
    axpy_rows_f32_with(detect(), p, v, y)
}

/// [`axpy_rows_f32`] at a given level.
///
/// # Panics
/// As [`axpy_rows_f32`], and if the CPU lacks `isa`.
pub fn axpy_rows_f32_with(isa: Isa, p: &[f32], v: &[f32], y: &mut [f32]) {
    let d = y.len();
    assert!(
        d > 0 && v.len() == p.len() * d,
        "axpy_rows_f32: {} values are not {} rows of {d}",
        v.len(),
        p.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both x86 levels include AVX2 and FMA (`is_available`); `v` holds `p.len()`
        // rows of `y.len()` (asserted above).
        Isa::Avx512Vnni if isa.is_available() => unsafe { avx512::axpy_rows(p, v, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if isa.is_available() => unsafe { x86::axpy_rows(p, v, y) },
        _ => {
            for (&a, row) in p.iter().zip(v.chunks_exact(d)) {
                axpy_f32_with(isa, a, row, y);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Horizontal sum of eight lanes.
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 floats at offsets below n, within both slices.
        unsafe {
            while i + 32 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let j = i + 8 * k;
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(j)),
                        _mm256_loadu_ps(pb.add(j)),
                        *acc,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(v);
        for j in i..n {
            sum += a[j] * b[j];
        }
        sum
    }

    /// Four 8-lane accumulators: streams memory as fast as one core can.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: 8 floats at offset i + 8k < n lie within `x`.
                *a = _mm256_add_ps(*a, unsafe { _mm256_loadu_ps(p.add(i + 8 * k)) });
            }
            i += 32;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum(v) + x[i..].iter().sum::<f32>()
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `k.len() == out.len() * q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(q: &[f32], k: &[f32], out: &mut [f32]) {
        for (o, row) in out.iter_mut().zip(k.chunks_exact(q.len())) {
            // SAFETY: the rows are `q.len()` long; the features are the caller's.
            *o = unsafe { dot(q, row) };
        }
    }

    /// `axpy` row after row, eight-lane columns of `y` held in registers: the same fused
    /// multiply-add per element and row, in the same order, as separate calls.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `v.len() == p.len() * y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_rows(p: &[f32], v: &[f32], y: &mut [f32]) {
        // SAFETY: the caller's guarantees.
        unsafe { axpy_rows_columns(p, v, y, 0) }
    }

    /// [`axpy_rows`] for columns `c0..` only.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `v.len() == p.len() * y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_rows_columns(p: &[f32], v: &[f32], y: &mut [f32], c0: usize) {
        let d = y.len();
        let (pv, py) = (v.as_ptr(), y.as_mut_ptr());
        // Up to 64 columns (eight registers) per pass over the rows.
        let mut c0 = c0;
        while c0 + 8 <= d {
            let width = ((d - c0) / 8).min(8);
            // SAFETY: columns c0..c0 + 8 * width lie within `y` and within every row of `v`.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (i, a) in acc.iter_mut().enumerate().take(width) {
                    *a = _mm256_loadu_ps(py.add(c0 + 8 * i));
                }
                for (j, &a) in p.iter().enumerate() {
                    let va = _mm256_set1_ps(a);
                    let row = pv.add(j * d + c0);
                    for (i, acc) in acc.iter_mut().enumerate().take(width) {
                        *acc = _mm256_fmadd_ps(va, _mm256_loadu_ps(row.add(8 * i)), *acc);
                    }
                }
                for (i, a) in acc.iter().enumerate().take(width) {
                    _mm256_storeu_ps(py.add(c0 + 8 * i), *a);
                }
            }
            c0 += 8 * width;
        }
        if c0 < d {
            for (&a, row) in p.iter().zip(v.chunks_exact(d)) {
                for j in c0..d {
                    y[j] += a * row[j];
                }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `x.len() == y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let va = _mm256_set1_ps(a);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: 8 floats at offset i < n lie within both slices.
            unsafe {
                let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
            }
            i += 8;
        }
        for j in i..n {
            y[j] += a * x[j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Whole blocks of sixteen rows: row `j`'s products summed lane-wise in its own register
    /// (the columns past the last whole sixteen masked to zero), then the sixteen registers
    /// reduced together into sixteen scores. The rows after the last whole block go through
    /// the AVX2 kernel.
    ///
    /// # Safety
    /// AVX-512 F, AVX2 and FMA; `k.len() == out.len() * q.len()`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dot_rows(q: &[f32], k: &[f32], out: &mut [f32]) {
        let d = q.len();
        let n = out.len();
        let whole = n / 16 * 16;
        let (pq, pk) = (q.as_ptr(), k.as_ptr());
        let tail = d % 16;
        let tail_mask: __mmask16 = if tail == 0 { !0 } else { (1 << tail) - 1 };
        for r in (0..whole).step_by(16) {
            let mut acc = [_mm512_setzero_ps(); 16];
            let mut c = 0;
            while c < d {
                let mask = if c + 16 <= d { !0 } else { tail_mask };
                // SAFETY: the masked columns c.. lie within the query and within each of rows
                // r..r + 16 of `k` (n rows of d, r + 16 <= whole <= n).
                unsafe {
                    let qv = _mm512_maskz_loadu_ps(mask, pq.add(c));
                    let row = pk.add(r * d + c);
                    // A constant trip count keeps the sixteen sums in registers.
                    for (j, a) in acc.iter_mut().enumerate() {
                        let kv = _mm512_maskz_loadu_ps(mask, row.add(j * d));
                        *a = _mm512_fmadd_ps(qv, kv, *a);
                    }
                }
                c += 16;
            }
            // SAFETY: scores r..r + 16 lie within `out`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r), reduce16(acc)) };
        }
        // SAFETY: the remaining rows of `k` and their scores; the features are the caller's.
        unsafe { super::x86::dot_rows(q, &k[whole * d..], &mut out[whole..]) };
    }

    /// `axpy` row after row with `y`'s columns in registers, sixteen lanes each, in passes of
    /// a constant number of registers (so they stay registers): the same fused multiply-add
    /// per element and row, in the same order, as the AVX2 kernel, whose code does the columns
    /// after the last whole sixteen.
    ///
    /// # Safety
    /// AVX-512 F, AVX2 and FMA; `v.len() == p.len() * y.len()`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn axpy_rows(p: &[f32], v: &[f32], y: &mut [f32]) {
        let d = y.len();
        let mut c0 = 0;
        // SAFETY (each pass): columns c0..c0 + 16·W lie within `y` and every row of `v`.
        unsafe {
            while c0 + 256 <= d {
                axpy_pass::<16>(p, v, y, c0);
                c0 += 256;
            }
            for w in [8, 4, 2, 1] {
                if c0 + 16 * w <= d {
                    match w {
                        8 => axpy_pass::<8>(p, v, y, c0),
                        4 => axpy_pass::<4>(p, v, y, c0),
                        2 => axpy_pass::<2>(p, v, y, c0),
                        _ => axpy_pass::<1>(p, v, y, c0),
                    }
                    c0 += 16 * w;
                }
            }
        }
        if c0 < d {
            // The last columns as the AVX2 kernel does them (eight lanes, then unfused).
            // SAFETY: AVX2 and FMA are the caller's; the shapes are unchanged.
            unsafe { super::x86::axpy_rows_columns(p, v, y, c0) };
        }
    }

    /// Columns `c0..c0 + 16·W` of [`axpy_rows`].
    ///
    /// # Safety
    /// AVX-512 F; those columns lie within `y` and within every row of `v` (`y.len()` long).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn axpy_pass<const W: usize>(p: &[f32], v: &[f32], y: &mut [f32], c0: usize) {
        let d = y.len();
        let (pv, py) = (v.as_ptr(), y.as_mut_ptr());
        // SAFETY: the caller's columns, in `y` and in each row j < p.len() of `v`.
        unsafe {
            let mut acc: [__m512; W] =
                std::array::from_fn(|i| _mm512_loadu_ps(py.add(c0 + 16 * i)));
            for (j, &a) in p.iter().enumerate() {
                let va = _mm512_set1_ps(a);
                let row = pv.add(j * d + c0);
                for (i, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(va, _mm512_loadu_ps(row.add(16 * i)), *acc);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(py.add(c0 + 16 * i), *a);
            }
        }
    }

    /// Lane `j` of the result is the sum of the sixteen lanes of `v[j]`: pairs of registers
    /// interleaved and added, then pairs of 64-bit halves, then 128-bit lanes twice.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn reduce16(v: [__m512; 16]) -> __m512 {
        // Per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] for registers a, b.
        let t: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Per 128-bit lane: that lane's sums of four registers.
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        });
        // 128-bit lanes: [u0.0 + u0.1, u0.2 + u0.3, u1.0 + u1.1, u1.2 + u1.3], and so on.
        let w: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (u[2 * i], u[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xdd>(a, b),
            )
        });
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(w[0], w[1]),
            _mm512_shuffle_f32x4::<0xdd>(w[0], w[1]),
        )
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    /// # Safety
    /// `a.len() == b.len()` (NEON is always present on aarch64).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        // SAFETY: every load reads 4 floats at offsets below n, within both slices.
        unsafe {
            while i + 16 <= n {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let j = i + 4 * k;
                    *acc = vfmaq_f32(*acc, vld1q_f32(pa.add(j)), vld1q_f32(pb.add(j)));
                }
                i += 16;
            }
            while i + 4 <= n {
                acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
                i += 4;
            }
        }
        let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        let mut sum = vaddvq_f32(v);
        for j in i..n {
            sum += a[j] * b[j];
        }
        sum
    }

    /// # Safety
    /// None beyond NEON, which every aarch64 CPU has.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn sum(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: 4 floats at offset i + 4k < n lie within `x`.
                *a = vaddq_f32(*a, unsafe { vld1q_f32(p.add(i + 4 * k)) });
            }
            i += 16;
        }
        let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        vaddvq_f32(v) + x[i..].iter().sum::<f32>()
    }

    /// # Safety
    /// `x.len() == y.len()` (NEON is always present on aarch64).
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let va = vdupq_n_f32(a);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 4 <= n {
            // SAFETY: 4 floats at offset i < n lie within both slices.
            unsafe {
                vst1q_f32(
                    py.add(i),
                    vfmaq_f32(vld1q_f32(py.add(i)), va, vld1q_f32(px.add(i))),
                )
            };
            i += 4;
        }
        for j in i..n {
            y[j] += a * x[j];
        }
    }
}
