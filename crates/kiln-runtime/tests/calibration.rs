//! Calibration statistics on tiny models: the mean square of every matrix product's input
//! channels and their second moments, measured by the runtime's reference forward pass, against
//! the naive f64 forward pass of `tiny` recording the same inputs.

#[allow(dead_code)]
mod tiny;

use kiln_runtime::calibration;
use kiln_runtime::{Model, ThreadPool};
use tiny::{random_tokens, Reference, Spec, TinyFile};

fn check(spec: &Spec, name: &str) {
    let path = TinyFile::generate(spec, 31).write(name);
    let model = Model::load(&path).unwrap();
    let pool = ThreadPool::new(2);
    let chunks = vec![
        random_tokens(1, 9, spec.vocab),
        random_tokens(2, 5, spec.vocab),
        random_tokens(3, 1, spec.vocab),
    ];
    let mut stats = calibration::InputStats::with_second_moments();
    calibration::collect_into(&model, &pool, &chunks, &mut stats).unwrap();
    let plain = calibration::collect(&model, &pool, &chunks).unwrap();
    let want = Reference::load(spec, &path).input_squares(&chunks);

    let names: Vec<&str> = stats.names().collect();
    let want_names: Vec<&str> = want.keys().map(String::as_str).collect();
    assert_eq!(names, want_names, "{name}: matrices observed");
    assert_eq!(names.len(), 7 * spec.n_layers + 1);
    for (m, (rows, sums, outer)) in &want {
        assert_eq!(stats.rows(m), *rows, "{name} {m}: rows");
        assert_eq!(*rows, 15);
        let got = stats.importance(m).unwrap();
        assert_eq!(got.len(), sums.len(), "{name} {m}: channels");
        for (j, (&g, &s)) in got.iter().zip(sums).enumerate() {
            let w = s / *rows as f64;
            assert!(
                (f64::from(g) - w).abs() <= 1e-4 * w + 1e-9,
                "{name} {m} channel {j}: {g} against {w}"
            );
        }
        assert_eq!(plain.importance(m), stats.importance(m), "{name} {m}");
        assert_eq!(plain.second_moment(m), None, "{name} {m}: not gathered");
        let got = stats.second_moment(m).unwrap();
        assert_eq!(got.len(), outer.len(), "{name} {m}: second moment size");
        let n = sums.len();
        for (k, (&g, &s)) in got.iter().zip(outer).enumerate() {
            let w = s / *rows as f64;
            // Relative to the diagonal: an off-diagonal entry may cancel to near zero.
            let (i, j) = (k / n, k % n);
            let scale = (sums[i] * sums[j]).sqrt() / *rows as f64;
            assert!(
                (f64::from(g) - w).abs() <= 1e-4 * scale + 1e-9,
                "{name} {m} ({i}, {j}): {g} against {w}"
            );
        }
    }
    // Query, key and value read one input, as do gate and up: they share its second moment.
    for il in 0..spec.n_layers {
        let index = |op: &str| stats.input_index(&format!("blk.{il}.{op}.weight")).unwrap();
        assert_eq!(index("attn_q"), index("attn_k"));
        assert_eq!(index("attn_q"), index("attn_v"));
        assert_eq!(index("ffn_gate"), index("ffn_up"));
        assert_ne!(index("attn_q"), index("attn_output"));
        assert_ne!(index("ffn_gate"), index("ffn_down"));
        assert_ne!(index("attn_q"), index("ffn_gate"));
    }
    assert_eq!(stats.importance("blk.0.nothing.weight"), None);
    assert_eq!(stats.second_moment("blk.0.nothing.weight"), None);
}

#[test]
fn input_statistics_match_the_naive_forward_pass_llama() {
    check(&Spec::llama(), "calibration_llama");
}

#[test]
fn input_statistics_match_the_naive_forward_pass_gemma3() {
    let spec = Spec {
        untied_output: true,
        ..Spec::gemma3()
    };
    check(&spec, "calibration_gemma3");
}
