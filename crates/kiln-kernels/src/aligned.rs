//! Growable buffers whose first element sits on a cache-line boundary.
//!
//! The kernels read and write their scratch buffers (packed panels, dequantized rows, quantized
//! activations) with 64-byte vector loads and stores. The global allocator only promises the
//! element type's alignment (16 bytes in practice), so a `Vec` starts at an address that
//! changes with whatever was allocated before it: in one process every 64-byte access to it
//! is one cache line, in another every one straddles two. On SmolLM2's 64-token prompts that
//! alone moved the f32 GEMM path by 12 % (480 against 428 tok/s on one core), from one run of
//! the same binary to the next with its arguments in another order. [`AlignedVec`] keeps its
//! elements from a 64-byte boundary wherever the allocation lands.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// The boundary [`AlignedVec`] starts its elements on: one cache line, one AVX-512 register.
pub const ALIGN: usize = 64;

/// A `Vec`-like buffer of plain values whose slice starts on an [`ALIGN`]-byte boundary.
///
/// It dereferences to `[T]` and offers the growing operations the kernels use (`resize`,
/// `push`, `extend_from_slice`, `clear`), with `Vec`'s meaning. It holds a few more elements
/// than it shows, so that it can start its slice where the boundary falls.
#[derive(Default)]
pub struct AlignedVec<T> {
    /// The allocation; the slice is `buf[start..start + len]`.
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> AlignedVec<T> {
    /// An empty buffer; nothing is allocated until it grows.
    pub const fn new() -> AlignedVec<T> {
        AlignedVec {
            buf: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    /// A buffer of `len` copies of `value`.
    pub fn filled(len: usize, value: T) -> AlignedVec<T> {
        let mut v = AlignedVec::new();
        v.resize(len, value);
        v
    }

    /// Makes room for `total` elements from the aligned start, keeping the current ones.
    fn reserve_total(&mut self, total: usize) {
        if self.start + total <= self.buf.len() {
            return;
        }
        // Elements of slack that cover any misalignment of a `T`-aligned allocation (the
        // element sizes used here divide the boundary).
        let slack = ALIGN / std::mem::size_of::<T>().max(1);
        let want = total.max(2 * self.len);
        let mut buf = vec![T::default(); want + slack];
        // `align_offset` may decline (usize::MAX); the buffer is then correct, only unaligned.
        let start = match buf.as_ptr().align_offset(ALIGN) {
            s if s < slack => s,
            _ => 0,
        };
        buf[start..start + self.len].copy_from_slice(&self.buf[self.start..self.start + self.len]);
        self.buf = buf;
        self.start = start;
    }

    /// Sets the length to `len`: new elements are `value`, elements past `len` are dropped.
    pub fn resize(&mut self, len: usize, value: T) {
        self.reserve_total(len);
        if len > self.len {
            self.buf[self.start + self.len..self.start + len].fill(value);
        }
        self.len = len;
    }

    /// Appends one element.
    pub fn push(&mut self, value: T) {
        self.reserve_total(self.len + 1);
        self.buf[self.start + self.len] = value;
        self.len += 1;
    }

    /// Appends the elements of `values`.
    pub fn extend_from_slice(&mut self, values: &[T]) {
        let end = self.len + values.len();
        self.reserve_total(end);
        self.buf[self.start + self.len..self.start + end].copy_from_slice(values);
        self.len = end;
    }

    /// Empties the buffer, keeping its allocation.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl<T> Deref for AlignedVec<T> {
    type Target = [T];

    #[inline(always)]
    fn deref(&self) -> &[T] {
        // SAFETY: every method keeps `start + len <= buf.len()` (`reserve_total` before any
        // growth), so the range lies within the allocation. Unchecked because the kernels
        // reach the activations through this on every step of their inner loops.
        unsafe { self.buf.get_unchecked(self.start..self.start + self.len) }
    }
}

impl<T> DerefMut for AlignedVec<T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`.
        unsafe {
            self.buf
                .get_unchecked_mut(self.start..self.start + self.len)
        }
    }
}

impl<T: Copy + Default> Clone for AlignedVec<T> {
    /// A copy of the elements in a buffer of its own, which starts on the boundary too (a
    /// derived clone would keep the original's offset into an allocation that lands elsewhere).
    fn clone(&self) -> AlignedVec<T> {
        AlignedVec::from(&self[..])
    }
}

impl<T: Copy + Default> Extend<T> for AlignedVec<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, values: I) {
        let values = values.into_iter();
        self.reserve_total(self.len + values.size_hint().0);
        for v in values {
            self.push(v);
        }
    }
}

impl<'a, T> IntoIterator for &'a AlignedVec<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a, T> IntoIterator for &'a mut AlignedVec<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl<T: fmt::Debug> fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: PartialEq> PartialEq for AlignedVec<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Copy + Default> From<&[T]> for AlignedVec<T> {
    fn from(values: &[T]) -> AlignedVec<T> {
        let mut v = AlignedVec::new();
        v.extend_from_slice(values);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One operation on a buffer.
    #[derive(Clone, Debug)]
    enum Op {
        Resize(usize, u16),
        Push(u16),
        Extend(Vec<u16>),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..300, any::<u16>()).prop_map(|(n, v)| Op::Resize(n, v)),
            any::<u16>().prop_map(Op::Push),
            proptest::collection::vec(any::<u16>(), 0..100).prop_map(Op::Extend),
            Just(Op::Clear),
        ]
    }

    proptest! {
        /// Any sequence of operations leaves the same elements as a `Vec` given the same ones,
        /// and the elements start on the boundary whenever there are any.
        #[test]
        fn behaves_as_a_vec_and_stays_aligned(ops in proptest::collection::vec(op(), 0..40)) {
            let mut want: Vec<u16> = Vec::new();
            let mut got: AlignedVec<u16> = AlignedVec::new();
            for op in ops {
                match op {
                    Op::Resize(n, v) => {
                        want.resize(n, v);
                        got.resize(n, v);
                    }
                    Op::Push(v) => {
                        want.push(v);
                        got.push(v);
                    }
                    Op::Extend(vs) => {
                        want.extend_from_slice(&vs);
                        got.extend_from_slice(&vs);
                    }
                    Op::Clear => {
                        want.clear();
                        got.clear();
                    }
                }
                prop_assert_eq!(&got[..], &want[..]);
                let copy = got.clone();
                prop_assert_eq!(&copy[..], &want[..]);
                for v in [&got, &copy] {
                    if !v.is_empty() {
                        prop_assert!((v.as_ptr() as usize).is_multiple_of(ALIGN));
                    }
                }
            }
        }
    }

    #[test]
    fn every_element_size_starts_on_the_boundary() {
        // Allocations of every size in turn land at varying addresses; each buffer must still
        // start on a line.
        let mut keep = Vec::new();
        for n in 1..64 {
            let a: AlignedVec<f32> = AlignedVec::filled(n, 1.5);
            let b: AlignedVec<i8> = AlignedVec::filled(n, -3);
            let c: AlignedVec<u16> = AlignedVec::from(&[7u16; 5][..]);
            for p in [
                a.as_ptr().cast::<u8>(),
                b.as_ptr().cast(),
                c.as_ptr().cast(),
            ] {
                assert!((p as usize).is_multiple_of(ALIGN));
            }
            assert!(a.iter().all(|&v| v == 1.5) && a.len() == n);
            assert!(b.iter().all(|&v| v == -3) && b.len() == n);
            assert_eq!(&c[..], &[7u16; 5]);
            keep.push((a, b, c, vec![0u8; n * 3]));
        }
    }
}
