//! Where the AVX-512 dequantization kernels put their values: f32, or (`BF16`) the same
//! rounded to bf16 for the bf16 prompt GEMM. `vcvtne2ps2bf16` rounds exactly as
//! `crate::gemm_bf16::to_bf16` does (ties to even, subnormals to zero, NaNs quiet), and a bf16
//! row is half the bytes to write and for the panel packing to read back. The conversions are
//! inline assembly: as intrinsics they would need the kernels compiled with AVX-512 BF16,
//! which the f32 kernels must not require, and a kernel cannot inline a function with
//! features it lacks.

use core::arch::asm;
use core::arch::x86_64::*;

/// Writes 32 values at element `at` of `out`, `w0`'s first: f32, or (`BF16`) rounded to bf16.
///
/// # Safety
/// AVX-512 F; elements `at..at + 32` of `out` (f32, or u16 with `BF16`) are writable; with
/// `BF16`, the CPU has AVX-512 BF16.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn put32<const BF16: bool>(out: *mut u8, at: usize, w0: __m512, w1: __m512) {
    // SAFETY: the caller's guarantees.
    unsafe {
        if BF16 {
            let v: __m512i;
            // SAFETY: the caller guarantees AVX-512 BF16; the instruction only reads and
            // writes the registers named. Intel operand order: the second source gives words
            // 0..16.
            asm!(
                "vcvtne2ps2bf16 {v}, {hi}, {lo}",
                v = lateout(zmm_reg) v,
                hi = in(zmm_reg) w1,
                lo = in(zmm_reg) w0,
                options(pure, nomem, nostack, preserves_flags),
            );
            _mm512_storeu_si512(out.cast::<u16>().add(at).cast(), v);
        } else {
            let o = out.cast::<f32>().add(at);
            _mm512_storeu_ps(o, w0);
            _mm512_storeu_ps(o.add(16), w1);
        }
    }
}

/// As [`put32`], for 16 values.
///
/// # Safety
/// As [`put32`], for elements `at..at + 16`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn put16<const BF16: bool>(out: *mut u8, at: usize, w: __m512) {
    // SAFETY: the caller's guarantees.
    unsafe {
        if BF16 {
            let v: __m256i;
            // SAFETY: as in `put32`.
            asm!(
                "vcvtneps2bf16 {v}, {w}",
                v = lateout(ymm_reg) v,
                w = in(zmm_reg) w,
                options(pure, nomem, nostack, preserves_flags),
            );
            _mm256_storeu_si256(out.cast::<u16>().add(at).cast(), v);
        } else {
            _mm512_storeu_ps(out.cast::<f32>().add(at), w);
        }
    }
}

/// As [`put32`], for the one value `v` (scalar tails).
///
/// # Safety
/// Element `at` of `out` is writable (f32, or u16 with `BF16`).
#[inline]
pub(crate) unsafe fn put1<const BF16: bool>(out: *mut u8, at: usize, v: f32) {
    // SAFETY: the caller's guarantee.
    unsafe {
        if BF16 {
            *out.cast::<u16>().add(at) = crate::gemm_bf16::to_bf16(v);
        } else {
            *out.cast::<f32>().add(at) = v;
        }
    }
}
