//! Reconstruction quality measures.

/// Signal-to-noise ratio of `reconstructed` against `original`, in dB:
/// `10 log10(Σ original² / Σ (original − reconstructed)²)`.
///
/// An exact reconstruction gives `+inf`; a zero original with any error gives `-inf`.
///
/// # Panics
/// If the lengths differ.
pub fn snr_db(original: &[f32], reconstructed: &[f32]) -> f64 {
    assert_eq!(original.len(), reconstructed.len(), "length mismatch");
    let (mut signal, mut noise) = (0.0f64, 0.0f64);
    for (&a, &b) in original.iter().zip(reconstructed) {
        let (a, b) = (a as f64, b as f64);
        signal += a * a;
        noise += (a - b) * (a - b);
    }
    if noise == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (signal / noise).log10()
}

/// Cosine similarity of `original` and `reconstructed`, accumulated in f64.
///
/// Two zero vectors are identical (1); a zero vector against a non-zero one shares no
/// direction (0).
///
/// # Panics
/// If the lengths differ.
pub fn cosine(original: &[f32], reconstructed: &[f32]) -> f64 {
    assert_eq!(original.len(), reconstructed.len(), "length mismatch");
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in original.iter().zip(reconstructed) {
        let (a, b) = (a as f64, b as f64);
        ab += a * b;
        aa += a * a;
        bb += b * b;
    }
    match (aa == 0.0, bb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => ab / (aa.sqrt() * bb.sqrt()),
    }
}
