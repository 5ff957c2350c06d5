//! Architecture builders: one file per model family, each turning a GGUF file's metadata or a
//! Hugging Face `config.json` into a [`ModelConfig`].

pub mod gemma3;
pub mod llama;

use crate::config::ModelConfig;
use crate::error::ModelError;
use kiln_format::gguf::GgufFile;
use serde_json::Value;
use std::path::Path;

/// Architectures this runtime runs, by their GGUF `general.architecture` name.
pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma3"];

/// Reads the model description of any supported architecture.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    let arch = file.architecture()?;
    match arch {
        "llama" | "mistral" | "qwen2" | "qwen3" => llama::config(file),
        "gemma3" => gemma3::config(file),
        other => Err(ModelError::unsupported(
            file.path(),
            format!(
                "architecture '{other}' is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        )),
    }
}

/// Hugging Face `model_type`s this runtime runs.
pub const SUPPORTED_HF: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "gemma3",
];

/// Reads the model description of any supported architecture from a Hugging Face
/// `config.json` (already parsed); `origin` is the file, for messages.
pub fn config_from_hf(json: &Value, origin: &Path) -> Result<ModelConfig, ModelError> {
    let keys = HfKeys::new(json, origin);
    match keys.str_or("model_type", "")? {
        "llama" | "mistral" | "qwen2" | "qwen3" => llama::config_from_hf(json, origin),
        "gemma3_text" | "gemma3" => gemma3::config_from_hf(json, origin),
        "" => Err(keys.bad("no 'model_type': not a transformers model configuration")),
        other => Err(ModelError::unsupported(
            origin,
            format!(
                "model_type '{other}' is not supported (supported: {})",
                SUPPORTED_HF.join(", ")
            ),
        )),
    }
}

/// The sizes every transformer file states the same way, under its architecture's prefix.
pub(crate) struct BaseSizes {
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_ff: usize,
}

impl BaseSizes {
    /// Reads the block count, widths and head counts; the key/value head size defaults to
    /// hidden / heads, and a value head size unlike the key head size is refused.
    pub fn read(file: &GgufFile, a: &str) -> Result<BaseSizes, ModelError> {
        let n_layers = count(file, a, "block_count", 4096)?;
        let n_embd = count(file, a, "embedding_length", 1 << 20)?;
        let n_heads = count(file, a, "attention.head_count", 4096)?;
        let n_kv_heads = count_or(file, a, "attention.head_count_kv", 4096, n_heads)?;
        let head_dim = count_or(file, a, "attention.key_length", 1 << 16, n_embd / n_heads)?;
        let value_dim = count_or(file, a, "attention.value_length", 1 << 16, head_dim)?;
        if value_dim != head_dim {
            return Err(ModelError::unsupported(
                file.path(),
                format!("value head size {value_dim} differs from key head size {head_dim}"),
            ));
        }
        let n_ff = count(file, a, "feed_forward_length", 1 << 24)?;
        Ok(BaseSizes {
            n_layers,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff,
        })
    }
}

/// Reads `{arch}.{suffix}` as a positive count no larger than `max`.
pub(crate) fn count(
    file: &GgufFile,
    arch: &str,
    suffix: &str,
    max: u64,
) -> Result<usize, ModelError> {
    let key = format!("{arch}.{suffix}");
    let v = file.require_u64(&key)?;
    if v == 0 || v > max {
        return Err(ModelError::bad(
            file.path(),
            format!("metadata '{key}' = {v} is out of range (expected 1..={max})"),
        ));
    }
    Ok(v as usize)
}

/// Like [`count`] but with a default when the key is absent.
pub(crate) fn count_or(
    file: &GgufFile,
    arch: &str,
    suffix: &str,
    max: u64,
    default: usize,
) -> Result<usize, ModelError> {
    if file.get(&format!("{arch}.{suffix}")).is_none() {
        return Ok(default);
    }
    count(file, arch, suffix, max)
}

/// What a format calls the sizes [`check_shapes`] relates, so its messages use the names the
/// user's file does.
pub(crate) struct SizeNames {
    pub hidden: &'static str,
    pub heads: &'static str,
    pub kv_heads: &'static str,
    pub rms_eps: &'static str,
}

/// GGUF metadata key names (after the architecture prefix).
pub(crate) const GGUF_NAMES: SizeNames = SizeNames {
    hidden: "embedding_length",
    heads: "head_count",
    kv_heads: "head_count_kv",
    rms_eps: "layer_norm_rms_epsilon",
};

/// Hugging Face `config.json` key names.
pub(crate) const HF_NAMES: SizeNames = SizeNames {
    hidden: "hidden_size",
    heads: "num_attention_heads",
    kv_heads: "num_key_value_heads",
    rms_eps: "rms_norm_eps",
};

/// Checks the relations between the basic sizes every architecture shares; `origin` is the
/// file the description came from.
pub(crate) fn check_shapes(
    origin: &Path,
    c: &ModelConfig,
    names: &SizeNames,
) -> Result<(), ModelError> {
    let SizeNames {
        hidden,
        heads,
        kv_heads,
        rms_eps,
    } = names;
    if c.head_dim == 0 {
        return Err(ModelError::bad(
            origin,
            format!(
                "head size is 0 ({hidden} {} over {heads} {})",
                c.n_embd, c.n_heads
            ),
        ));
    }
    if c.n_heads % c.n_kv_heads != 0 {
        return Err(ModelError::bad(
            origin,
            format!(
                "{heads} {} is not a multiple of {kv_heads} {}",
                c.n_heads, c.n_kv_heads
            ),
        ));
    }
    if c.rope_dim > c.head_dim || c.rope_dim % 2 != 0 {
        return Err(ModelError::bad(
            origin,
            format!(
                "rope dimension {} must be even and at most the head size {}",
                c.rope_dim, c.head_dim
            ),
        ));
    }
    if !(c.rms_eps.is_finite() && c.rms_eps >= 0.0) {
        return Err(ModelError::bad(
            origin,
            format!(
                "{rms_eps} {} is not a finite non-negative number",
                c.rms_eps
            ),
        ));
    }
    for (i, l) in c.layers.iter().enumerate() {
        if !(l.rope_base.is_finite() && l.rope_base > 0.0) {
            return Err(ModelError::bad(
                origin,
                format!("layer {i}: rope base {} must be positive", l.rope_base),
            ));
        }
        if l.sliding_window == Some(0) {
            return Err(ModelError::bad(
                origin,
                format!("layer {i}: a sliding window of 0 positions hides every key"),
            ));
        }
    }
    Ok(())
}

/// Vocabulary size: `{arch}.vocab_size` when present, else the token list's length, else the
/// embedding matrix's row count.
pub(crate) fn vocab_size(file: &GgufFile, arch: &str) -> Result<usize, ModelError> {
    if let Some(v) = file.get_u64(&format!("{arch}.vocab_size"))? {
        return Ok(v as usize);
    }
    if let Some(tokens) = file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
        return Ok(tokens.len());
    }
    let embd = file.require_tensor("token_embd.weight")?;
    Ok(embd.dims.get(1).copied().unwrap_or(0) as usize)
}

/// Typed access to the keys of a Hugging Face configuration object (`config.json`, or its
/// `text_config`). A key set to `null` counts as absent, as transformers treats it; every
/// error names the file and the key.
pub(crate) struct HfKeys<'a> {
    json: &'a Value,
    origin: &'a Path,
}

impl<'a> HfKeys<'a> {
    pub fn new(json: &'a Value, origin: &'a Path) -> HfKeys<'a> {
        HfKeys { json, origin }
    }

    /// The file the keys come from.
    pub fn origin(&self) -> &'a Path {
        self.origin
    }

    /// Whether `key` is written at all, even as `null` (which some keys use to switch a
    /// feature off that is on by default).
    pub fn has(&self, key: &str) -> bool {
        self.json.get(key).is_some()
    }

    /// A malformed-configuration error for this file.
    pub fn bad(&self, message: impl Into<String>) -> ModelError {
        ModelError::bad(self.origin, message)
    }

    /// The value of `key`, unless absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, v: &Value, expected: &str) -> ModelError {
        self.bad(format!("'{key}' is {v}, expected {expected}"))
    }

    /// `key` as a positive integer no larger than `max`; required.
    pub fn count(&self, key: &str, max: u64) -> Result<usize, ModelError> {
        let v = self
            .get(key)
            .ok_or_else(|| self.bad(format!("missing required key '{key}'")))?;
        // Integral floats (e.g. 4096.0) are accepted: Python writes them for computed values.
        let n = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        });
        match n {
            Some(n) if n >= 1 && n <= max => Ok(n as usize),
            _ => Err(self.wrong(key, v, &format!("an integer in 1..={max}"))),
        }
    }

    /// Like [`HfKeys::count`] but `default` when absent.
    pub fn count_or(&self, key: &str, max: u64, default: usize) -> Result<usize, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.count(key, max),
        }
    }

    /// `key` as a finite number, if present.
    pub fn f32_opt(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64().filter(|f| f.is_finite()) {
                Some(f) => Ok(Some(f as f32)),
                None => Err(self.wrong(key, v, "a finite number")),
            },
        }
    }

    /// `key` as a finite number, `default` when absent.
    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32, ModelError> {
        Ok(self.f32_opt(key)?.unwrap_or(default))
    }

    /// `key` as a bool, `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.wrong(key, v, "true or false")),
        }
    }

    /// `key` as a string, `default` when absent.
    pub fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.wrong(key, v, "a string")),
        }
    }

    /// The object under `key` as keys of its own (rope parameters, `text_config`), if present.
    pub fn object(&self, key: &str) -> Result<Option<HfKeys<'a>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.is_object() => Ok(Some(HfKeys::new(v, self.origin))),
            Some(v) => Err(self.wrong(key, v, "an object")),
        }
    }

    /// `key` as a list of strings, if present.
    /// `layer_types` as one flag per layer (true: sliding-window attention), when present.
    pub fn sliding_layer_types(&self, n_layers: usize) -> Result<Option<Vec<bool>>, ModelError> {
        let Some(types) = self.strings("layer_types")? else {
            return Ok(None);
        };
        if types.len() != n_layers {
            return Err(self.bad(format!(
                "'layer_types' lists {} layers, but num_hidden_layers is {n_layers}",
                types.len()
            )));
        }
        types
            .iter()
            .map(|t| match *t {
                "full_attention" => Ok(false),
                "sliding_attention" => Ok(true),
                other => Err(ModelError::unsupported(
                    self.origin(),
                    format!(
                        "layer type '{other}' is not supported (supported: full_attention, \
                         sliding_attention)"
                    ),
                )),
            })
            .collect::<Result<Vec<bool>, _>>()
            .map(Some)
    }

    pub fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        v.as_array()
            .and_then(|items| items.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .map(Some)
            .ok_or_else(|| self.wrong(key, v, "a list of strings"))
    }
}

/// Rotary settings of one Hugging Face rope parameter object (`rope_parameters`, or the
/// older `rope_scaling`): its base, if it states one, a linear position scale, and Llama 3
/// frequency divisors.
pub(crate) struct HfRope {
    /// `rope_theta`, when the object carries it (transformers 5 puts it there).
    pub theta: Option<f32>,
    /// 1 / the linear scaling factor (1 without linear scaling).
    pub freq_scale: f32,
    /// Llama 3 scaling parameters, turned into divisors once base and dimension are known.
    pub llama3: Option<Llama3Rope>,
}

/// The parameters of transformers' `llama3` rope type.
pub(crate) struct Llama3Rope {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_context: f64,
}

impl HfRope {
    /// Reads a rope parameter object; `None` means default rotary embedding. Types beyond
    /// default, linear and llama3 are refused rather than ignored.
    pub fn read(params: Option<&HfKeys<'_>>, what: &str) -> Result<HfRope, ModelError> {
        let mut rope = HfRope {
            theta: None,
            freq_scale: 1.0,
            llama3: None,
        };
        let Some(p) = params else {
            return Ok(rope);
        };
        rope.theta = p.f32_opt("rope_theta")?;
        // transformers 4 wrote `type`, later versions `rope_type`.
        let kind = match p.get("rope_type") {
            Some(_) => p.str_or("rope_type", "default")?,
            None => p.str_or("type", "default")?,
        };
        let factor = |p: &HfKeys<'_>| -> Result<f64, ModelError> {
            match p.f32_opt("factor")? {
                Some(f) if f > 0.0 => Ok(f64::from(f)),
                Some(f) => Err(p.bad(format!("{what}: 'factor' {f} must be positive"))),
                None => Err(p.bad(format!("{what}: rope type '{kind}' needs a 'factor'"))),
            }
        };
        match kind {
            "default" => {}
            "linear" => rope.freq_scale = (1.0 / factor(p)?) as f32,
            "llama3" => {
                let need = |key: &str| -> Result<f64, ModelError> {
                    match p.f32_opt(key)? {
                        Some(v) if v > 0.0 => Ok(f64::from(v)),
                        _ => Err(p.bad(format!(
                            "{what}: llama3 rope scaling needs a positive '{key}'"
                        ))),
                    }
                };
                let l3 = Llama3Rope {
                    factor: factor(p)?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_context: need("original_max_position_embeddings")?,
                };
                if l3.high_freq_factor <= l3.low_freq_factor {
                    return Err(p.bad(format!(
                        "{what}: llama3 'high_freq_factor' {} must exceed 'low_freq_factor' {}",
                        l3.high_freq_factor, l3.low_freq_factor
                    )));
                }
                rope.llama3 = Some(l3);
            }
            other => {
                return Err(ModelError::unsupported(
                    p.origin,
                    format!(
                        "{what}: rope type '{other}' is not supported (supported: default, \
                         linear, llama3)"
                    ),
                ))
            }
        }
        Ok(rope)
    }
}

impl Llama3Rope {
    /// Per-frequency divisors of the inverse frequencies, as transformers' llama3 rope
    /// initialisation scales them: frequencies whose wavelength is shorter than
    /// `original_context / high_freq_factor` are kept, those longer than
    /// `original_context / low_freq_factor` divided by `factor`, and those between
    /// interpolated smoothly in the inverse frequency.
    pub fn divisors(&self, base: f32, rope_dim: usize) -> Vec<f32> {
        let low_wavelen = self.original_context / self.low_freq_factor;
        let high_wavelen = self.original_context / self.high_freq_factor;
        (0..rope_dim / 2)
            .map(|i| {
                let inv_freq = 1.0 / f64::from(base).powf((2 * i) as f64 / rope_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                let divisor = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_context / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                };
                divisor as f32
            })
            .collect()
    }
}
