//! Byte offsets inside ggml blocks (`ggml-common.h`), and unaligned little-endian reads.
//!
//! `kiln_format::ggml` owns the block sizes; the offsets of the fields the kernels read are
//! facts of the same layouts, kept here so that every kernel names them the same way.

/// Elements per block of the 32-element formats.
pub(crate) const QK: usize = 32;
/// Elements per super-block of the K-quants.
pub(crate) const QK_K: usize = 256;

pub(crate) const Q4_0_BYTES: usize = 18;
pub(crate) const Q4_1_BYTES: usize = 20;
pub(crate) const Q5_0_BYTES: usize = 22;
pub(crate) const Q5_1_BYTES: usize = 24;
pub(crate) const Q8_0_BYTES: usize = 34;

pub(crate) const Q2_K_BYTES: usize = 84;
pub(crate) const Q2_K_QS: usize = 16;
pub(crate) const Q2_K_D: usize = 80;

pub(crate) const Q3_K_BYTES: usize = 110;
pub(crate) const Q3_K_QS: usize = 32;
pub(crate) const Q3_K_SCALES: usize = 96;
pub(crate) const Q3_K_D: usize = 108;

pub(crate) const Q4_K_BYTES: usize = 144;
pub(crate) const Q4_K_SCALES: usize = 4;
pub(crate) const Q4_K_QS: usize = 16;

pub(crate) const Q5_K_BYTES: usize = 176;
pub(crate) const Q5_K_QH: usize = 16;
pub(crate) const Q5_K_QS: usize = 48;

pub(crate) const Q6_K_BYTES: usize = 210;
pub(crate) const Q6_K_QH: usize = 128;
pub(crate) const Q6_K_SCALES: usize = 192;
pub(crate) const Q6_K_D: usize = 208;

pub(crate) const IQ4_NL_BYTES: usize = 18;

pub(crate) const IQ4_XS_BYTES: usize = 136;
pub(crate) const IQ4_XS_SCALES_H: usize = 2;
pub(crate) const IQ4_XS_SCALES_L: usize = 4;
pub(crate) const IQ4_XS_QS: usize = 8;

/// Reads a little-endian `u16` at `p`.
///
/// # Safety
/// `p..p + 2` must be readable.
#[inline(always)]
#[allow(dead_code)]
pub(crate) unsafe fn rd_u16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees two readable bytes; read_unaligned has no alignment need.
    u16::from_le(unsafe { p.cast::<u16>().read_unaligned() })
}

/// Reads a little-endian `u32` at `p`.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline(always)]
#[allow(dead_code)]
pub(crate) unsafe fn rd_u32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees four readable bytes; read_unaligned has no alignment need.
    u32::from_le(unsafe { p.cast::<u32>().read_unaligned() })
}

/// Reads a little-endian `u64` at `p`.
///
/// # Safety
/// `p..p + 8` must be readable.
#[inline(always)]
#[allow(dead_code)]
pub(crate) unsafe fn rd_u64(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees eight readable bytes; read_unaligned has no alignment need.
    u64::from_le(unsafe { p.cast::<u64>().read_unaligned() })
}

/// The 6-bit scales (low byte lanes) and minimums (high) of the eight sub-blocks of a Q4_K /
/// Q5_K super-block, from its 12 packed bytes read as three little-endian words.
///
/// Sub-blocks 0..4 keep their six bits in bytes 0..4 (scales) and 4..8 (minimums); sub-blocks
/// 4..8 keep their low four bits in the nibbles of bytes 8..12 and their top two in the spare
/// top bits of bytes 0..8. Done on whole words, the eight bytes come out in sub-block order.
#[inline(always)]
pub(crate) fn k4_scales_mins(a: u32, b: u32, c: u32) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let sc_lo = a & LOW6;
    let mn_lo = b & LOW6;
    let sc_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mn_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// The eight 6-bit scales of an IQ4_XS super-block, still biased by 32, one per byte in
/// sub-block order, from `scales_h` and `scales_l` (read as a little-endian word).
///
/// Scale `ib` keeps its low four bits in nibble `ib % 2` of byte `ib / 2` of `scales_l` and its
/// top two at bit `2 * ib` of `scales_h`: both are spread to one field per byte by halving the
/// field groups three times, then joined.
#[inline(always)]
#[allow(dead_code)]
pub(crate) fn iq4xs_scales(scales_h: u16, scales_l: u32) -> u64 {
    let lo = u64::from(scales_l);
    let lo = (lo & 0xffff) | ((lo & 0xffff_0000) << 16);
    let lo = (lo & 0x0000_00ff_0000_00ff) | ((lo & 0x0000_ff00_0000_ff00) << 8);
    let lo = (lo & 0x000f_000f_000f_000f) | ((lo & 0x00f0_00f0_00f0_00f0) << 4);
    let hi = u64::from(scales_h);
    let hi = (hi & 0xff) | ((hi & 0xff00) << 24);
    let hi = (hi & 0x0000_000f_0000_000f) | ((hi & 0x0000_00f0_0000_00f0) << 12);
    let hi = (hi & 0x0003_0003_0003_0003) | ((hi & 0x000c_000c_000c_000c) << 6);
    lo | (hi << 4)
}

/// The sixteen 6-bit scales of a Q3_K super-block, still biased by 32, in sub-block order
/// (bytes of the low word, then of the high word), from its 12 packed bytes (`a` = bytes 0..8,
/// `c` = bytes 8..12). Scale `s` keeps its low nibble in byte `s % 8` (low nibble for `s < 8`,
/// high otherwise) and its top two bits in byte `8 + s % 4` at bit `2 * (s / 4)`.
#[inline(always)]
pub(crate) fn q3k_scales(a: u64, c: u32) -> (u64, u64) {
    const LOW4: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let top = |shift: u32| u64::from((c >> shift) & LOW2);
    let lo = (a & LOW4) | ((top(0) | (top(2) << 32)) << 4);
    let hi = ((a >> 4) & LOW4) | ((top(4) | (top(6) << 32)) << 4);
    (lo, hi)
}
