//! The kiln package writer and reader: layout, atomic replacement, and every kind of damage
//! reported by name.

use kiln_format::ggml::{self, GgmlType};
use kiln_format::package::{
    Conversion, Manifest, Package, PackageWriter, SourceInfo, Verify, ALIGNMENT, MANIFEST_FILE,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn scratch(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("package-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn manifest() -> Manifest {
    Manifest {
        format: String::new(),
        format_version: 0,
        kiln_version: "test".into(),
        architecture: "llama".into(),
        config: serde_json::json!({"n_layers": 1}),
        tokenizer: Value::Null,
        chat_template: None,
        source: SourceInfo {
            path: "memory".into(),
            format: "gguf".into(),
            sha256: Vec::new(),
        },
        conversion: Conversion {
            quant: "keep".into(),
            keep: Vec::new(),
            max_shard_bytes: 0,
            fp16: None,
            calibration: None,
        },
        alignment: 0,
        shards: Vec::new(),
        files: Vec::new(),
        tensors: Vec::new(),
    }
}

/// Tensors of odd sizes, so alignment padding is exercised: (name, shape, format, bytes).
fn tensors() -> Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> {
    let values = |n: usize, seed: f32| -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
    };
    vec![
        (
            "a.weight".into(),
            vec![7],
            GgmlType::F32,
            ggml::quantize(GgmlType::F32, &values(7, 1.0)).unwrap(),
        ),
        (
            "b.weight".into(),
            vec![64, 3],
            GgmlType::Q4_0,
            ggml::quantize(GgmlType::Q4_0, &values(192, 2.0)).unwrap(),
        ),
        (
            "c.weight".into(),
            vec![5, 3],
            GgmlType::F16,
            ggml::quantize(GgmlType::F16, &values(15, 3.0)).unwrap(),
        ),
        (
            "d.weight".into(),
            vec![256, 2],
            GgmlType::Q4_K,
            ggml::quantize(GgmlType::Q4_K, &values(512, 4.0)).unwrap(),
        ),
    ]
}

fn write(out: &Path, max_shard: u64) -> Manifest {
    let mut w = PackageWriter::create(out, max_shard).unwrap();
    for (name, shape, format, data) in tensors() {
        w.add_tensor(&name, &shape, format, &data, None).unwrap();
    }
    w.add_file("tokenizer.json", b"{}").unwrap();
    w.finish(manifest()).unwrap()
}

fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn open_err(dir: &Path, verify: Verify) -> String {
    Package::open(dir, verify).unwrap_err().to_string()
}

#[test]
fn round_trip_keeps_bytes_and_aligns_every_tensor() {
    let out = scratch("round-trip").join("m.kiln");
    let written = write(&out, 1 << 20);
    assert_eq!(written.shards.len(), 1);
    let pkg = Package::open(&out, Verify::Full).unwrap();
    for (name, shape, format, data) in tensors() {
        let t = pkg.tensor(&name).unwrap();
        assert_eq!(t.data(), &data[..], "{name}");
        assert_eq!(t.shape, shape);
        assert_eq!(t.format, format.into());
        assert_eq!(t.offset as u64 % ALIGNMENT, 0, "{name}");
        assert_eq!(t.data().as_ptr() as usize % ALIGNMENT as usize, 0, "{name}");
    }
    assert_eq!(pkg.manifest().files[0].file, "tokenizer.json");
    assert_eq!(pkg.manifest().tensors.len(), 4);
}

#[test]
fn shards_respect_the_cap() {
    let out = scratch("cap").join("m.kiln");
    // a (28 bytes), b (108), c (30) and d (288) each need their own 150-byte shard.
    let m = write(&out, 150);
    assert_eq!(m.shards.len(), 4, "{:?}", m.shards);
    for s in &m.shards {
        assert!(s.size <= 150 || m.tensors.iter().filter(|t| t.shard == s.file).count() == 1);
    }
    let pkg = Package::open(&out, Verify::Full).unwrap();
    for (name, _, _, data) in tensors() {
        assert_eq!(pkg.tensor(&name).unwrap().data(), &data[..]);
    }
}

#[test]
fn flipped_byte_fails_the_hash_naming_the_shard() {
    let out = scratch("tamper").join("m.kiln");
    write(&out, 1 << 20);
    let shard = out.join("shard-00001.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[70] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();
    let e = open_err(&out, Verify::Full);
    assert!(e.contains("shard-00001.bin") && e.contains("sha256"), "{e}");
    // Without hashes the structure is still sound.
    Package::open(&out, Verify::StructureOnly).unwrap();
}

#[test]
fn truncated_and_missing_shards_are_named() {
    let out = scratch("truncated").join("m.kiln");
    write(&out, 1 << 20);
    let shard = out.join("shard-00001.bin");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let e = open_err(&out, Verify::StructureOnly);
    assert!(
        e.contains("shard-00001.bin") && e.contains("truncated"),
        "{e}"
    );
    std::fs::remove_file(&shard).unwrap();
    let e = open_err(&out, Verify::StructureOnly);
    assert!(
        e.contains("shard-00001.bin") && e.contains("missing"),
        "{e}"
    );
}

/// A change to a manifest's JSON.
type Edit = dyn Fn(&mut Value);

#[test]
fn bad_tensor_entries_are_named() {
    let cases: Vec<(&str, Box<Edit>, &str)> = vec![
        (
            "past-end",
            Box::new(|v| v["tensors"][3]["offset"] = Value::from(1u64 << 20)),
            "past the end",
        ),
        (
            "misaligned",
            Box::new(|v| {
                let off = v["tensors"][1]["offset"].as_u64().unwrap();
                v["tensors"][1]["offset"] = Value::from(off + 4);
            }),
            "not a multiple of 64",
        ),
        (
            "length",
            Box::new(|v| v["tensors"][1]["length"] = Value::from(100)),
            "takes 108",
        ),
        (
            "format",
            Box::new(|v| v["tensors"][1]["format"] = Value::from("Q9_9")),
            "unknown format",
        ),
        (
            "shape",
            Box::new(|v| v["tensors"][1]["shape"] = serde_json::json!([63, 3])),
            "whole number",
        ),
        (
            "shard",
            Box::new(|v| v["tensors"][1]["shard"] = Value::from("shard-00009.bin")),
            "does not list",
        ),
        (
            "overlap",
            Box::new(|v| {
                let off = v["tensors"][2]["offset"].clone();
                v["tensors"][1]["offset"] = off;
            }),
            "overlap",
        ),
        (
            "escape",
            Box::new(|v| v["shards"][0]["file"] = Value::from("../x.bin")),
            "plain file name",
        ),
        (
            "version",
            Box::new(|v| v["format_version"] = Value::from(99)),
            "version 99",
        ),
    ];
    for (tag, edit, needle) in cases {
        let out = scratch(&format!("entry-{tag}")).join("m.kiln");
        write(&out, 1 << 20);
        rewrite_manifest(&out, |v| edit(v));
        let e = open_err(&out, Verify::Full);
        assert!(e.contains(needle), "{tag}: {e}");
        if !matches!(tag, "escape" | "version") {
            assert!(
                e.contains("b.weight") || e.contains("d.weight"),
                "{tag}: {e}"
            );
        }
    }
}

#[test]
fn unfinished_writes_leave_nothing_and_stale_temps_are_removed() {
    let dir = scratch("atomic");
    let out = dir.join("m.kiln");
    {
        let mut w = PackageWriter::create(&out, 1 << 20).unwrap();
        let (name, shape, format, data) = &tensors()[0];
        w.add_tensor(name, shape, *format, data, None).unwrap();
        assert!(w.temp_dir().exists());
        // Dropped unfinished: an error part-way through a conversion.
    }
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // A killed writer's temp (a pid that cannot be running) is removed by the next writer.
    let stale = dir.join("m.kiln.tmp-4294967295");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("shard-00001.bin"), b"partial").unwrap();
    assert!(!out.exists());
    write(&out, 1 << 20);
    assert!(!stale.exists());
    Package::open(&out, Verify::Full).unwrap();

    // Writing again replaces the package; anything not a package is never replaced.
    write(&out, 150);
    assert!(
        Package::open(&out, Verify::Full)
            .unwrap()
            .manifest()
            .shards
            .len()
            >= 3
    );
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let other = dir.join("notes");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("a.txt"), b"keep me").unwrap();
    let e = PackageWriter::create(&other, 1 << 20)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a kiln package"), "{e}");
}

#[test]
fn wrong_sized_tensor_data_is_refused() {
    let out = scratch("wrong-size").join("m.kiln");
    let mut w = PackageWriter::create(&out, 1 << 20).unwrap();
    let e = w
        .add_tensor("x", &[64, 2], GgmlType::Q4_0, &[0u8; 10], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("'x'") && e.contains("72"), "{e}");
}
