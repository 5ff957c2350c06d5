//! Hostile and malformed safetensors files and sharded folders: each must be refused with an
//! error that names the file and the offending tensor — never a panic, never a huge
//! allocation.

use kiln_format::safetensors::{
    Dtype, SafetensorsFile, SafetensorsWriter, ShardedSafetensors, INDEX_FILE,
};
use kiln_format::FormatError;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

const NAME: &str = "hostile.safetensors";

/// A file with a header written by hand: `header` is the JSON text, `data` the data section.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn open(bytes: Vec<u8>) -> Result<SafetensorsFile, FormatError> {
    SafetensorsFile::from_bytes(NAME, bytes)
}

/// Asserts the bytes are refused with a message naming the file and containing `needles`.
fn refused(bytes: Vec<u8>, needles: &[&str]) -> String {
    let err = open(bytes).expect_err("hostile file accepted");
    let msg = err.to_string();
    assert!(msg.contains(NAME), "error does not name the file: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error lacks {n:?}: {msg}");
    }
    msg
}

fn entry(dtype: &str, shape: &str, begin: u64, end: u64) -> String {
    format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{begin},{end}]}}"#)
}

#[test]
fn a_valid_hand_written_file_opens() {
    let header = format!(
        r#"{{"__metadata__":{{"k":"v"}},"a":{},"b":{}}}"#,
        entry("F32", "[2]", 0, 8),
        entry("U8", "[2,2]", 8, 12)
    );
    let f = open(raw(&header, &[0u8; 12])).unwrap();
    assert_eq!(f.tensors().len(), 2);
    assert_eq!(f.tensor("b").unwrap().shape, vec![2, 2]);
}

#[test]
fn truncated_and_empty_files() {
    refused(Vec::new(), &["truncated", "0 bytes"]);
    refused(vec![1, 2, 3], &["truncated"]);
    // A header length far past the end of the file.
    let mut b = raw(r#"{"a":{}}"#, &[]);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(b, &["header length", "past the end"]);
    let mut b = raw(r#"{}"#, &[]);
    b[..8].copy_from_slice(&3u64.to_le_bytes());
    refused(b, &["header length 3"]);
}

#[test]
fn headers_that_are_not_json_objects() {
    refused(raw("not json at all", &[]), &["not start with '{'"]);
    refused(raw("{\"a\": ", &[]), &["malformed JSON"]);
    refused(raw("[1, 2]", &[]), &["not start with '{'"]);
    refused(raw("{\"a\": 5}", &[]), &["tensor 'a'"]);
    refused(raw("{} trailing", &[]), &["malformed JSON"]);
    let mut bad_utf8 = raw(r#"{"ab":1}"#, &[]);
    bad_utf8[10] = 0xff;
    refused(bad_utf8, &["malformed JSON"]);
    // Deep nesting never overflows the stack: an unknown field is skipped (without recursion),
    // a nested value where a string or number belongs is refused at its first bracket.
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let skipped = format!(
        r#"{{"a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":{}}}}}"#,
        nest(200_000)
    );
    assert_eq!(open(raw(&skipped, &[0])).unwrap().tensors().len(), 1);
    let deep = format!(r#"{{"__metadata__":{{"k":{}}}}}"#, nest(200_000));
    refused(raw(&deep, &[]), &["malformed JSON", "__metadata__"]);
}

#[test]
fn entries_with_missing_or_wrong_fields() {
    refused(
        raw(r#"{"w":{"dtype":"F32","shape":[1]}}"#, &[0; 4]),
        &["tensor 'w'", "data_offsets"],
    );
    refused(
        raw(
            &format!(r#"{{"w":{}}}"#, entry("F32", "[-1]", 0, 4)),
            &[0; 4],
        ),
        &["tensor 'w'"],
    );
    refused(
        raw(
            &format!(r#"{{"w":{}}}"#, entry("F32", "[1.5]", 0, 4)),
            &[0; 4],
        ),
        &["tensor 'w'"],
    );
    refused(
        raw(r#"{"__metadata__":{"k":1}}"#, &[]),
        &["__metadata__", "strings"],
    );
    refused(
        raw(&format!(r#"{{"":{}}}"#, entry("F32", "[1]", 0, 4)), &[0; 4]),
        &["empty name"],
    );
}

#[test]
fn unknown_dtype_is_unsupported_and_named() {
    let b = raw(&format!(r#"{{"w":{}}}"#, entry("F4", "[2]", 0, 1)), &[0; 1]);
    let err = open(b).unwrap_err();
    assert!(matches!(err, FormatError::Unsupported { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("'F4'") && msg.contains("tensor 'w'"), "{msg}");
}

#[test]
fn offsets_outside_reversed_or_mis_sized() {
    refused(
        raw(
            &format!(r#"{{"w":{}}}"#, entry("F32", "[2]", 0, 8)),
            &[0; 4],
        ),
        &["tensor 'w'", "past its end"],
    );
    refused(
        raw(
            &format!(r#"{{"w":{}}}"#, entry("F32", "[2]", 8, 0)),
            &[0; 8],
        ),
        &["tensor 'w'", "before the start"],
    );
    refused(
        raw(
            &format!(r#"{{"w":{}}}"#, entry("F32", "[3]", 0, 8)),
            &[0; 8],
        ),
        &["tensor 'w'", "needs 12 bytes", "span 8"],
    );
    refused(
        raw(
            &format!(
                r#"{{"w":{}}}"#,
                entry("F32", "[4294967296,4294967296]", 0, 8)
            ),
            &[0; 8],
        ),
        &["tensor 'w'", "overflows"],
    );
    refused(
        raw(
            &format!(
                r#"{{"w":{}}}"#,
                entry("F64", "[1152921504606846976,8]", 0, 8)
            ),
            &[0; 8],
        ),
        &["tensor 'w'", "overflowing"],
    );
    refused(
        raw(
            &format!(r#"{{"w":{}}}"#, entry("U8", "[1]", u64::MAX - 1, u64::MAX)),
            &[0; 8],
        ),
        &["tensor 'w'", "past its end"],
    );
}

#[test]
fn overlapping_tensors() {
    let header = format!(
        r#"{{"a":{},"b":{}}}"#,
        entry("F32", "[2]", 0, 8),
        entry("F32", "[2]", 4, 12)
    );
    refused(raw(&header, &[0; 12]), &["'a'", "overlaps", "'b'"]);
    // Empty tensors take no bytes, so they overlap nothing.
    let header = format!(
        r#"{{"a":{},"e":{}}}"#,
        entry("F32", "[2]", 0, 8),
        entry("F32", "[0]", 4, 4)
    );
    open(raw(&header, &[0; 8])).unwrap();
}

#[test]
fn duplicate_names_in_one_header() {
    let header = format!(
        r#"{{"a":{},"a":{}}}"#,
        entry("F32", "[1]", 0, 4),
        entry("F32", "[1]", 4, 8)
    );
    refused(raw(&header, &[0; 8]), &["'a'", "more than once"]);
}

fn shard_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("safetensors-hostile-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn two_shards(dir: &Path) {
    let mut w = SafetensorsWriter::new();
    w.add_tensor_f32("a", Dtype::F32, &[2], &[1.0, 2.0])
        .unwrap();
    w.add_tensor_f32("b", Dtype::F32, &[2], &[3.0, 4.0])
        .unwrap();
    w.write_sharded(dir, 8).unwrap();
}

fn write_index(dir: &Path, json: &str) {
    std::fs::write(dir.join(INDEX_FILE), json).unwrap();
}

fn index_refused(dir: &Path, needles: &[&str]) {
    let err = ShardedSafetensors::open_dir(dir).expect_err("bad folder accepted");
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "error lacks {n:?}: {msg}");
    }
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = shard_dir("missing");
    two_shards(&dir);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    index_refused(
        &dir,
        &[
            INDEX_FILE,
            "tensor 'b'",
            "model-00002-of-00002.safetensors",
            "missing",
        ],
    );
}

#[test]
fn index_naming_a_tensor_absent_from_its_shard() {
    let dir = shard_dir("absent");
    two_shards(&dir);
    write_index(
        &dir,
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors"}}"#,
    );
    index_refused(
        &dir,
        &[
            INDEX_FILE,
            "tensor 'c'",
            "model-00001-of-00002",
            "does not hold it",
        ],
    );
}

#[test]
fn duplicate_names_across_shards() {
    let dir = shard_dir("duplicate");
    two_shards(&dir);
    // A third shard that also holds "a", with an index that is otherwise consistent.
    let mut w = SafetensorsWriter::new();
    w.add_tensor_f32("a", Dtype::F32, &[1], &[9.0]).unwrap();
    w.add_tensor_f32("z", Dtype::F32, &[1], &[9.0]).unwrap();
    w.write(dir.join("extra.safetensors")).unwrap();
    write_index(
        &dir,
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "z": "extra.safetensors"}}"#,
    );
    index_refused(
        &dir,
        &[
            INDEX_FILE,
            "tensor 'a'",
            "two shards",
            "extra.safetensors",
            "model-00001-of-00002",
        ],
    );
}

#[test]
fn malformed_index_files() {
    let dir = shard_dir("index");
    two_shards(&dir);
    write_index(&dir, "{ nope");
    index_refused(&dir, &[INDEX_FILE, "malformed JSON"]);
    write_index(&dir, r#"{"metadata": {}}"#);
    index_refused(&dir, &[INDEX_FILE, "weight_map"]);
    write_index(&dir, r#"{"weight_map": []}"#);
    index_refused(&dir, &["not an object"]);
    write_index(&dir, r#"{"weight_map": {"a": 3}}"#);
    index_refused(&dir, &["tensor 'a'", "expected a file name"]);
    for escape in [
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "",
        ".",
    ] {
        write_index(&dir, &format!(r#"{{"weight_map": {{"a": "{escape}"}}}}"#));
        index_refused(&dir, &["tensor 'a'", "not a file name"]);
    }
    let empty = shard_dir("no-weights");
    index_refused(&empty, &["neither", "model.safetensors"]);
}

#[test]
fn a_broken_shard_is_named() {
    let dir = shard_dir("broken");
    two_shards(&dir);
    let shard = dir.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    index_refused(&dir, &["model-00002-of-00002.safetensors", "tensor 'b'"]);
}

fn valid_file() -> Vec<u8> {
    let mut w = SafetensorsWriter::new();
    w.add_metadata("format", "pt");
    w.add_tensor_f32("x.weight", Dtype::F32, &[3, 4], &[0.5; 12])
        .unwrap();
    w.add_tensor_f32("y.weight", Dtype::BF16, &[5], &[1.5; 5])
        .unwrap();
    w.add_tensor("z", Dtype::I64, &[2], vec![7; 16]).unwrap();
    w.to_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any corruption of a valid file is either accepted with every tensor in bounds, or
    /// refused with an error naming the file; never a panic.
    #[test]
    fn corrupted_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut b = valid_file();
        for (at, v) in edits {
            let i = at.index(b.len());
            b[i] = v;
        }
        if truncate {
            let n = cut.index(b.len());
            b.truncate(n);
        }
        let len = b.len() as u64;
        match open(b) {
            Ok(f) => {
                for t in f.tensors() {
                    prop_assert!(f.tensor_file_offset(t) + t.n_bytes() <= len);
                    prop_assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains(NAME)),
        }
    }

    /// Random header text never panics the parser.
    #[test]
    fn random_headers_never_panic(header in "\\{[ -~]{0,200}", data in prop::collection::vec(any::<u8>(), 0..64)) {
        match open(raw(&header, &data)) {
            Ok(f) => {
                for t in f.tensors() {
                    prop_assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains(NAME)),
        }
    }
}
