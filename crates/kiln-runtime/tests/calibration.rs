//! Calibration statistics on tiny models: the mean square of every matrix product's input
//! channels, measured by the runtime's reference forward pass, against the naive f64 forward
//! pass of `tiny` recording the same inputs.

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
    let stats = calibration::collect(&model, &pool, &chunks).unwrap();
    let want = Reference::load(spec, &path).input_squares(&chunks);

    let names: Vec<&str> = stats.names().collect();
    let want_names: Vec<&str> = want.keys().map(String::as_str).collect();
    assert_eq!(names, want_names, "{name}: matrices observed");
    assert_eq!(names.len(), 7 * spec.n_layers + 1);
    for (m, (rows, sums)) in &want {
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
    }
    assert_eq!(stats.importance("blk.0.nothing.weight"), None);
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
