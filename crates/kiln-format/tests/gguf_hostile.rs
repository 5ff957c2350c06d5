//! Hostile and malformed GGUF files: each must be refused with an error that names the file
//! and the offending key or tensor — never a panic, never a huge allocation.
//!
//! Files are made with the writer, then damaged by byte surgery where the writer (rightly)
//! refuses to produce the damage itself.

use kiln_format::ggml::GgmlType;
use kiln_format::gguf::{GgufFile, GgufWriter, MetadataValue};
use kiln_format::FormatError;
use proptest::prelude::*;

const NAME: &str = "hostile.gguf";

fn base_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "test".into());
    w.add_metadata("k.str", "hello".into());
    w.add_metadata("k.arr", MetadataValue::from(vec![1u32, 2, 3]));
    w.add_metadata("k.strs", MetadataValue::from(vec!["ab", "cd"]));
    w.add_metadata("k.bool", true.into());
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
    w.add_tensor_f32("t.a", &[32, 2], GgmlType::Q8_0, &values)
        .unwrap();
    w.add_tensor_f32("t.b", &[8], GgmlType::F32, &values[..8])
        .unwrap();
    w
}

fn base() -> Vec<u8> {
    base_writer().to_bytes()
}

/// The unique position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = hay
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{:?} occurs {} times",
        String::from_utf8_lossy(needle),
        hits.len()
    );
    hits[0]
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Field positions of a metadata entry, found by its (unique) key.
struct KvAt {
    len: usize,
    key: usize,
    ty: usize,
    value: usize,
}

fn kv_at(b: &[u8], key: &str) -> KvAt {
    let mut pattern = (key.len() as u64).to_le_bytes().to_vec();
    pattern.extend_from_slice(key.as_bytes());
    let len = find(b, &pattern);
    let key_at = len + 8;
    KvAt {
        len,
        key: key_at,
        ty: key_at + key.len(),
        value: key_at + key.len() + 4,
    }
}

/// Field positions of a tensor info, found by its (unique) name.
struct TensorAt {
    name: usize,
    n_dims: usize,
    dims: usize,
    ty: usize,
    offset: usize,
}

fn tensor_at(b: &[u8], name: &str) -> TensorAt {
    let mut pattern = (name.len() as u64).to_le_bytes().to_vec();
    pattern.extend_from_slice(name.as_bytes());
    let name_at = find(b, &pattern) + 8;
    let n_dims = name_at + name.len();
    let nd = u32::from_le_bytes(b[n_dims..n_dims + 4].try_into().unwrap()) as usize;
    let ty = n_dims + 4 + 8 * nd;
    TensorAt {
        name: name_at,
        n_dims,
        dims: n_dims + 4,
        ty,
        offset: ty + 4,
    }
}

enum Kind {
    Invalid,
    Unsupported,
}

/// Opens `bytes` and checks the refusal: its kind, that it names the file, and that the
/// message contains every `needle`.
#[track_caller]
fn refuse(bytes: Vec<u8>, kind: Kind, needles: &[&str]) -> String {
    let err = match GgufFile::from_bytes(NAME, bytes) {
        Ok(_) => panic!("accepted a file that should be refused (expecting {needles:?})"),
        Err(e) => e,
    };
    match (&kind, &err) {
        (Kind::Invalid, FormatError::Invalid { .. })
        | (Kind::Unsupported, FormatError::Unsupported { .. }) => {}
        _ => panic!("wrong error kind: {err:?}"),
    }
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{NAME}: ")), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "expected {n:?} in: {msg}");
    }
    msg
}

#[test]
fn base_file_is_valid() {
    let f = GgufFile::from_bytes(NAME, base()).unwrap();
    assert_eq!(f.tensors().len(), 2);
    assert_eq!(f.metadata().len(), 5);
}

#[test]
fn every_truncation_is_refused() {
    let full = base();
    for len in 0..full.len() {
        let err = GgufFile::from_bytes(NAME, full[..len].to_vec())
            .err()
            .unwrap_or_else(|| panic!("accepted a file truncated to {len} bytes"));
        let msg = err.to_string();
        assert!(msg.starts_with("hostile.gguf: "), "{msg}");
        assert!(
            msg.contains("truncated") || msg.contains("past the end") || msg.contains("remain"),
            "truncated to {len}: {msg}"
        );
    }
    // A file with no tensors, cut anywhere, too.
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "x".into());
    let full = w.to_bytes();
    for len in 0..full.len() {
        assert!(GgufFile::from_bytes(NAME, full[..len].to_vec()).is_err());
    }
}

#[test]
fn truncated_files_on_disk() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kiln-format-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let full = base();
    for len in [0, 3, 4, 8, 23, 24, 100, full.len() - 1] {
        let path = dir.join(format!("cut-{len}.gguf"));
        std::fs::write(&path, &full[..len]).unwrap();
        let msg = GgufFile::open(&path).unwrap_err().to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains("truncated") || msg.contains("past the end"),
            "{msg}"
        );
    }
    let msg = GgufFile::open(dir.join("absent.gguf")).unwrap_err();
    assert!(matches!(msg, FormatError::Io { .. }));
    assert!(msg.to_string().contains("absent.gguf"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_magic() {
    let mut b = base();
    b[..4].copy_from_slice(b"GGML");
    refuse(b, Kind::Invalid, &["not a GGUF file", "47 47 4d 4c"]);
    refuse(
        b"PK\x03\x04 a zip file".to_vec(),
        Kind::Invalid,
        &["not a GGUF file"],
    );
}

#[test]
fn unsupported_versions() {
    for (v, needles) in [
        (1u32, vec!["GGUF version 1 is not supported", "2 and 3"]),
        (0, vec!["GGUF version 0"]),
        (4, vec!["GGUF version 4"]),
        (u32::MAX, vec!["GGUF version 4294967295"]),
        (3u32.swap_bytes(), vec!["big-endian"]),
    ] {
        let mut w = base_writer();
        w.set_version(v);
        refuse(w.to_bytes(), Kind::Unsupported, &needles);
    }
    let mut w = base_writer();
    w.set_version(2);
    assert_eq!(
        GgufFile::from_bytes(NAME, w.to_bytes()).unwrap().version(),
        2
    );
}

#[test]
fn absurd_counts() {
    for (tensors, kvs) in [
        (u64::MAX, 5),
        (2, u64::MAX),
        (1_000_000, 5),
        (2, 1_000_000),
        (u64::MAX / 2, u64::MAX / 2),
    ] {
        let mut b = base();
        put_u64(&mut b, 8, tensors);
        put_u64(&mut b, 16, kvs);
        refuse(
            b,
            Kind::Invalid,
            &[
                "header claims",
                &format!("{tensors} tensors"),
                "cannot hold",
            ],
        );
    }
    // Counts that fit the bytes but are wrong still fail cleanly further on.
    let mut b = base();
    put_u64(&mut b, 8, 3);
    assert!(GgufFile::from_bytes(NAME, b).is_err());
}

#[test]
fn string_lengths_past_the_end() {
    let b0 = base();
    // A key's length.
    let kv = kv_at(&b0, "k.str");
    for len in [u64::MAX, 1 << 40, b0.len() as u64] {
        let mut b = b0.clone();
        put_u64(&mut b, kv.len, len);
        refuse(
            b,
            Kind::Invalid,
            &["metadata key #1", &format!("length {len}"), "remain"],
        );
    }
    // A string value's length.
    let mut b = b0.clone();
    put_u64(&mut b, kv.value, u64::MAX);
    refuse(b, Kind::Invalid, &["metadata key 'k.str'", "remain"]);
    // A string inside an array.
    let kv = kv_at(&b0, "k.strs");
    let mut b = b0.clone();
    put_u64(&mut b, kv.value + 12, 1 << 50);
    refuse(
        b,
        Kind::Invalid,
        &["metadata key 'k.strs' element 0", "remain"],
    );
    // A tensor name's length.
    let t = tensor_at(&b0, "t.b");
    let mut b = b0.clone();
    put_u64(&mut b, t.name - 8, u64::MAX - 3);
    refuse(b, Kind::Invalid, &["name of tensor #1", "remain"]);
}

#[test]
fn array_lengths_past_the_end_or_absurd() {
    let b0 = base();
    let kv = kv_at(&b0, "k.arr");
    let len_at = kv.value + 4;
    let mut b = b0.clone();
    put_u64(&mut b, len_at, 1_000_000);
    refuse(
        b,
        Kind::Invalid,
        &[
            "metadata key 'k.arr'",
            "array of 1000000 u32 elements",
            "needs at least 4000000 bytes",
        ],
    );
    let mut b = b0.clone();
    put_u64(&mut b, len_at, u64::MAX);
    refuse(
        b,
        Kind::Invalid,
        &["metadata key 'k.arr'", "accepts at most"],
    );
    // Unknown element type.
    let mut b = b0.clone();
    put_u32(&mut b, kv.value, 77);
    refuse(b, Kind::Invalid, &["'k.arr'", "unknown value type 77"]);
}

#[test]
fn array_nesting_is_limited() {
    fn nested(depth: usize) -> MetadataValue {
        let mut v = MetadataValue::from(vec![1u8]);
        for _ in 1..depth {
            v = MetadataValue::Array(vec![v]);
        }
        v
    }
    let mut w = GgufWriter::new();
    w.add_metadata("k.deep", nested(4));
    let f = GgufFile::from_bytes(NAME, w.to_bytes()).unwrap();
    assert_eq!(f.get("k.deep"), Some(&nested(4)));

    let mut w = GgufWriter::new();
    w.add_metadata("k.deep", nested(5));
    refuse(
        w.to_bytes(),
        Kind::Invalid,
        &["metadata key 'k.deep'", "nests arrays more than 4 deep"],
    );

    // A long chain of nested array headers must not recurse without bound.
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&6u64.to_le_bytes());
    b.extend_from_slice(b"k.deep");
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..100_000 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    refuse(b, Kind::Invalid, &["'k.deep'", "nests arrays"]);
}

#[test]
fn invalid_utf8() {
    let b0 = base();
    let mut b = b0.clone();
    let kv = kv_at(&b0, "k.str");
    b[kv.key] = 0xff;
    refuse(b, Kind::Invalid, &["metadata key #1 is not valid UTF-8"]);
    let mut b = b0.clone();
    b[kv.value + 8 + 1] = 0xc3; // a lone lead byte inside "hello"
    b[kv.value + 8 + 2] = 0x28;
    refuse(
        b,
        Kind::Invalid,
        &["value of metadata key 'k.str' is not valid UTF-8"],
    );
    let t = tensor_at(&b0, "t.a");
    let mut b = b0.clone();
    b[t.name + 1] = 0x80;
    refuse(b, Kind::Invalid, &["name of tensor #0 is not valid UTF-8"]);
}

#[test]
fn bad_value_types() {
    let b0 = base();
    let kv = kv_at(&b0, "k.str");
    for ty in [13u32, 99, u32::MAX] {
        let mut b = b0.clone();
        put_u32(&mut b, kv.ty, ty);
        refuse(
            b,
            Kind::Invalid,
            &["metadata key 'k.str'", &format!("unknown value type {ty}")],
        );
    }
    let kv = kv_at(&b0, "k.bool");
    let mut b = b0.clone();
    b[kv.value] = 2;
    refuse(
        b,
        Kind::Invalid,
        &[
            "metadata key 'k.bool'",
            "bool stored as 2",
            "expected 0 or 1",
        ],
    );
}

#[test]
fn empty_key_or_tensor_name() {
    let mut w = GgufWriter::new();
    w.add_metadata("x", 1u8.into());
    let mut b = w.to_bytes();
    let kv = kv_at(&b, "x");
    // Shrink the key to nothing: the 'x' byte then reads as the start of the value type.
    put_u64(&mut b, kv.len, 0);
    refuse(b, Kind::Invalid, &["metadata key #0", "is empty"]);

    let mut w = GgufWriter::new();
    w.add_tensor("t", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    let mut b = w.to_bytes();
    let t = tensor_at(&b, "t");
    put_u64(&mut b, t.name - 8, 0);
    refuse(b, Kind::Invalid, &["tensor #0", "empty name"]);
}

#[test]
fn long_keys() {
    let mut w = GgufWriter::new();
    w.add_metadata("k".repeat(65535), 1u8.into());
    assert!(GgufFile::from_bytes(NAME, w.to_bytes()).is_ok());
    let mut w = GgufWriter::new();
    w.add_metadata("k".repeat(65536), 1u8.into());
    refuse(
        w.to_bytes(),
        Kind::Invalid,
        &["metadata key #0", "65536 bytes long"],
    );
}

#[test]
fn unknown_ggml_types() {
    let b0 = base();
    let t = tensor_at(&b0, "t.a");
    for id in [4u32, 5, 16, 39, 99, u32::MAX] {
        let mut b = b0.clone();
        put_u32(&mut b, t.ty, id);
        refuse(
            b,
            Kind::Unsupported,
            &[
                "tensor 't.a'",
                &format!("ggml type id {id}"),
                "does not support",
                "Q4_K=12",
            ],
        );
    }
}

#[test]
fn bad_dimension_counts() {
    let b0 = base();
    let t = tensor_at(&b0, "t.b");
    for n in [0u32, 5, 1000, u32::MAX] {
        let mut b = b0.clone();
        put_u32(&mut b, t.n_dims, n);
        refuse(
            b,
            Kind::Invalid,
            &[
                "tensor 't.b'",
                &format!("{n} dimensions"),
                "expected 1 to 4",
            ],
        );
    }
}

#[test]
fn bad_dimensions() {
    let b0 = base();
    let t = tensor_at(&b0, "t.a");
    // Zero.
    let mut b = b0.clone();
    put_u64(&mut b, t.dims + 8, 0);
    refuse(b, Kind::Invalid, &["tensor 't.a' dimension 1 is 0"]);
    // Beyond ggml's int64.
    let mut b = b0.clone();
    put_u64(&mut b, t.dims, u64::MAX);
    refuse(
        b,
        Kind::Invalid,
        &["tensor 't.a' dimension 0 is 18446744073709551615"],
    );
    // Each fine, product overflows.
    let mut b = b0.clone();
    put_u64(&mut b, t.dims, 1 << 32);
    put_u64(&mut b, t.dims + 8, 1 << 32);
    refuse(
        b,
        Kind::Invalid,
        &["tensor 't.a'", "element count overflows"],
    );
    // Huge but representable: the data cannot be in the file.
    let mut b = b0.clone();
    put_u64(&mut b, t.dims + 8, 1 << 40);
    refuse(
        b,
        Kind::Invalid,
        &["tensor 't.a'", "past the end of the file"],
    );
    // Row length not a whole number of blocks.
    let mut b = b0.clone();
    put_u64(&mut b, t.dims, 16);
    put_u64(&mut b, t.dims + 8, 4);
    refuse(
        b,
        Kind::Invalid,
        &[
            "tensor 't.a'",
            "rows of 16 elements",
            "Q8_0 block length 32",
        ],
    );
}

#[test]
fn misaligned_offset() {
    let b0 = base();
    let t = tensor_at(&b0, "t.b");
    let old = u64::from_le_bytes(b0[t.offset..t.offset + 8].try_into().unwrap());
    let mut b = b0.clone();
    put_u64(&mut b, t.offset, old + 4);
    refuse(
        b,
        Kind::Invalid,
        &[
            "tensor 't.b'",
            &format!("data offset {}", old + 4),
            "alignment 32",
        ],
    );
}

#[test]
fn tensor_data_past_end_of_file() {
    let b0 = base();
    let f = GgufFile::from_bytes(NAME, b0.clone()).unwrap();
    let data_offset = f.data_offset();
    let size = b0.len();
    let t = tensor_at(&b0, "t.b");
    let mut b = b0.clone();
    put_u64(&mut b, t.offset, 1 << 20);
    let start = data_offset + (1 << 20);
    refuse(
        b,
        Kind::Invalid,
        &[
            "tensor 't.b'",
            &format!("bytes {start}..{}", start + 32),
            &format!("end of the file at {size} bytes"),
        ],
    );
    // Offset + size overflowing u64.
    let mut b = b0.clone();
    put_u64(&mut b, t.offset, u64::MAX - 31);
    refuse(b, Kind::Invalid, &["tensor 't.b'", "overflows"]);
    // The file cut one byte short of the last tensor's data.
    refuse(
        b0[..size - 1].to_vec(),
        Kind::Invalid,
        &["tensor 't.b'", "past the end"],
    );
}

#[test]
fn overlapping_tensors() {
    let b0 = base();
    let t = tensor_at(&b0, "t.b");
    let mut b = b0.clone();
    put_u64(&mut b, t.offset, 0);
    refuse(
        b,
        Kind::Invalid,
        &["tensor 't.a'", "tensor 't.b'", "overlaps"],
    );
    // Partial overlap.
    let mut b = b0.clone();
    put_u64(&mut b, t.offset, 64);
    refuse(b, Kind::Invalid, &["overlaps"]);
}

#[test]
fn duplicate_tensor_names() {
    let mut w = GgufWriter::new();
    w.add_tensor("t.aa", &[1], GgmlType::F32, vec![0; 4])
        .unwrap();
    w.add_tensor("t.bb", &[1], GgmlType::F32, vec![0; 4])
        .unwrap();
    let mut b = w.to_bytes();
    let t = tensor_at(&b, "t.bb");
    b[t.name..t.name + 4].copy_from_slice(b"t.aa");
    refuse(
        b,
        Kind::Invalid,
        &["tensor name 't.aa' appears more than once"],
    );
}

#[test]
fn duplicate_keys() {
    let mut w = GgufWriter::new();
    w.add_metadata("k.aa", 1u32.into());
    w.add_metadata("k.bb", "x".into());
    let mut b = w.to_bytes();
    let kv = kv_at(&b, "k.bb");
    b[kv.key..kv.key + 4].copy_from_slice(b"k.aa");
    refuse(
        b,
        Kind::Invalid,
        &["metadata key 'k.aa' appears more than once"],
    );
}

#[test]
fn bad_alignment() {
    for (value, needles) in [
        (MetadataValue::U32(0), vec!["u32 0", "nonzero power of two"]),
        (
            MetadataValue::U32(48),
            vec!["u32 48", "nonzero power of two"],
        ),
        (MetadataValue::U64(u64::MAX), vec!["nonzero power of two"]),
        (MetadataValue::I32(-32), vec!["i32 -32", "unsigned integer"]),
        (MetadataValue::F32(32.0), vec!["f32 32", "unsigned integer"]),
        (
            MetadataValue::String("32".into()),
            vec!["string \"32\"", "unsigned integer"],
        ),
        (
            MetadataValue::from(vec![32u32]),
            vec!["array", "unsigned integer"],
        ),
    ] {
        let mut w = base_writer();
        w.add_metadata("general.alignment", value);
        let mut all = vec!["'general.alignment'"];
        all.extend(needles);
        refuse(w.to_bytes(), Kind::Invalid, &all);
    }
    // set_alignment records a bad value as given; the reader refuses it.
    for a in [0u64, 3, 48] {
        let mut w = base_writer();
        w.set_alignment(a);
        refuse(
            w.to_bytes(),
            Kind::Invalid,
            &["'general.alignment'", "power of two"],
        );
    }
    // A valid but enormous alignment puts the data far past the end of the file.
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", MetadataValue::U64(1 << 62));
    w.add_tensor("t", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    refuse(w.to_bytes(), Kind::Invalid, &["tensor 't'", "past the end"]);
    // Any unsigned width is accepted.
    let mut w = base_writer();
    w.add_metadata("general.alignment", MetadataValue::U8(32));
    assert_eq!(
        GgufFile::from_bytes(NAME, w.to_bytes())
            .unwrap()
            .alignment(),
        32
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// Random damage never panics; whatever is accepted is fully usable.
    #[test]
    fn random_damage_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = base();
        for (at, v) in &edits {
            let i = at.index(b.len());
            b[i] = *v;
        }
        if let Some(cut) = cut {
            b.truncate(cut.index(b.len()));
        }
        match GgufFile::from_bytes(NAME, b) {
            Err(e) => prop_assert!(e.to_string().starts_with("hostile.gguf: ")),
            Ok(f) => {
                for t in f.tensors() {
                    prop_assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
                    let v = f.tensor_f32(t).unwrap();
                    prop_assert_eq!(v.len() as u64, t.n_elements);
                }
                for (k, _) in f.metadata() {
                    let _ = f.get_u64(k);
                    let _ = f.get_str_array(k);
                    let _ = f.get_f32_array(k);
                    let _ = f.get_i64_array(k);
                }
            }
        }
    }
}
