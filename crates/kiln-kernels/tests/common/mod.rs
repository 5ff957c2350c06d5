//! Helpers shared by the kernel test files.

use proptest::prelude::*;

/// `got` holds `want`'s values bit for bit (so −0 against +0, or a NaN against one of other
/// bits, fails too); the failure names `what` and the first element that differs, with both
/// values' bits.
pub fn same_bits(
    got: &[f32],
    want: &[f32],
    what: impl Fn() -> String,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: lengths", what());
    if let Some((i, (g, e))) = got
        .iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, e))| g.to_bits() != e.to_bits())
    {
        return Err(TestCaseError::fail(format!(
            "{}: element {i}: {g:e} ({:#010x}) against {e:e} ({:#010x})",
            what(),
            g.to_bits(),
            e.to_bits()
        )));
    }
    Ok(())
}
