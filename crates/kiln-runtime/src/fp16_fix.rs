//! Making a model fp16-safe (`kiln convert --fp16-safe`): measure its activation ranges on
//! calibration prompts, rescale weights where the mathematics allows, change the graph where it
//! does not, and keep in fp32 what neither reaches.
//!
//! What is valid for the two families:
//!
//! - **The residual stream can be carried divided by a power of two `s`.** Every RMSNorm that
//!   reads it is scale-invariant once its epsilon is divided by `s²`
//!   (`(x/s) / sqrt(mean((x/s)²) + eps/s²) = x / sqrt(mean(x²) + eps)`), so dividing what writes
//!   into the stream by `s` leaves the network's function unchanged: the embedding scale, and
//!   the attention output and down projections (with their biases) in Llama, or the
//!   post-attention and post-feed-forward norm weights in Gemma 3, whose outputs are what it
//!   adds. Powers of two are exact in floating point, and [`kiln_format::ggml::scale_pow2`]
//!   scales quantized blocks through their float fields, so the rescaled weights hold the same
//!   values, divided by `s`, bit for bit. The f32 runtime computes the same logits.
//! - **RMSNorm's square and mean are not fixable by weights.** SmolLM2's residual stream fits
//!   fp16 (its largest value is about a third of the range), yet squaring it does not; and a
//!   divisor large enough for the rows carrying massive activations (the first position) drives
//!   ordinary rows' squares into subnormals (a constant divisor of 256 costs SmolLM2 a logits
//!   cosine of 0.998, 1024 gives NaN). Those norms are computed max-scaled instead (see
//!   [`GraphFix::max_scaled_norms`]): a change of the exported graph, exact in real arithmetic.
//! - Anything still beyond range after both is listed as fp32 ([`GraphFix::fp32_ops`]), with a
//!   note: a target that can compute those operations in fp32 keeps the model correct, one that
//!   cannot (the Neural Engine alone) cannot run it faithfully.
//!
//! The decisions are sized with [`HEADROOM`]: the calibration prompts are a sample, and a
//! quantized package moves the ranges a little.

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::fp16::{self, ops, GraphFix, RangeReport, Rounding, FP16_MAX};
use crate::model::Model;
use crate::pool::ThreadPool;
use crate::weights::{require, tensor_data, TensorRef, TensorSource};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Factor by which a fixed model's calibration magnitudes stay below [`FP16_MAX`] (squared for
/// RMSNorm's squares).
pub const HEADROOM: f32 = 2.0;

/// Largest residual divisor tried, as a power of two: beyond it the stream's ordinary values
/// would fall into fp16's subnormals.
pub const MAX_RESIDUAL_DIVISOR_LOG2: i32 = 12;

/// The fp16 fix applied to a model, as a package manifest records it (`conversion.fp16`) and
/// an exporter reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fp16Fix {
    /// The residual stream is carried divided by this power of two (1: not rescaled).
    pub residual_divisor: f32,
    /// The tensors divided by `residual_divisor` (the stream's writers).
    pub scaled_tensors: Vec<String>,
    /// Block scales that left fp16's normal range when divided (their blocks lost precision).
    pub inexact_scales: usize,
    /// What the exported graph computes differently.
    pub graph: GraphFix,
    /// What was done and what could not be, in words.
    pub notes: Vec<String>,
    /// The measurements the decisions rest on.
    pub calibration: Calibration,
}

/// The calibration run behind an [`Fp16Fix`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Prompts run.
    pub prompts: usize,
    /// Tokens over all prompts.
    pub tokens: usize,
    /// The [`HEADROOM`] in force.
    pub headroom: f32,
    /// Ranges of the model as it came.
    pub before: RangeSummary,
    /// Ranges of the fixed model, computed with the graph fix.
    pub after: RangeSummary,
}

/// The headline figures of a [`RangeReport`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RangeSummary {
    /// Largest |value| among operation outputs computed in fp16 (RMSNorm intermediates aside).
    pub max_activation: f32,
    /// Where: `layer 14 attn_residual`.
    pub max_activation_at: String,
    /// Largest RMSNorm intermediate (square, mean or rsqrt) computed in fp16.
    pub max_norm_statistic: f32,
    /// Where.
    pub max_norm_statistic_at: String,
    /// (layer, operation) pairs leaving the fp16 range.
    pub failures: usize,
}

/// Whether `op` is an RMSNorm intermediate (square, mean or rsqrt).
pub fn is_norm_statistic(op: &str) -> bool {
    op.ends_with(".square") || op.ends_with(".mean") || op.ends_with(".rsqrt")
}

impl RangeSummary {
    /// The headline figures of `report`.
    pub fn of(report: &RangeReport) -> RangeSummary {
        let best = |stat: bool| {
            report
                .ops
                .iter()
                .filter(|o| !o.fp32 && is_norm_statistic(&o.op) == stat)
                .max_by(|a, b| a.max_abs.total_cmp(&b.max_abs))
                .map_or((0.0, String::new()), |o| (o.max_abs, o.site()))
        };
        let (max_activation, max_activation_at) = best(false);
        let (max_norm_statistic, max_norm_statistic_at) = best(true);
        RangeSummary {
            max_activation,
            max_activation_at,
            max_norm_statistic,
            max_norm_statistic_at,
            failures: report.failures().len(),
        }
    }
}

/// Runs every prompt through `model` in [`Rounding::Measure`] under `graph`, merging ranges.
pub fn measure(
    model: &Model,
    pool: &ThreadPool,
    prompts: &[Vec<u32>],
    graph: &GraphFix,
) -> Result<RangeReport, ModelError> {
    let mut report = RangeReport::default();
    for p in prompts {
        fp16::forward(model, pool, p, Rounding::Measure, graph, &mut report)?;
    }
    Ok(report)
}

/// The tensors that write into the residual stream, as `config` describes the network.
fn residual_writers(config: &ModelConfig, source: &dyn TensorSource) -> Vec<String> {
    let per_layer: &[&str] = if config.post_norms {
        &["post_attention_norm.weight", "post_ffw_norm.weight"]
    } else {
        &[
            "attn_output.weight",
            "attn_output.bias",
            "ffn_down.weight",
            "ffn_down.bias",
        ]
    };
    (0..config.n_layers)
        .flat_map(|i| per_layer.iter().map(move |t| format!("blk.{i}.{t}")))
        .filter(|name| source.tensor(name).is_some())
        .collect()
}

/// A tensor source with some tensors multiplied by a power of two (held in memory), the
/// others read from the source underneath.
pub struct ScaledSource<'a> {
    inner: &'a dyn TensorSource,
    scaled: HashMap<String, TensorRef>,
}

impl<'a> ScaledSource<'a> {
    /// `inner` with each tensor of `names` multiplied by 2^`exp`; also returns how many block
    /// scales could not be scaled exactly.
    pub fn new(
        inner: &'a dyn TensorSource,
        names: &[String],
        exp: i32,
    ) -> Result<(ScaledSource<'a>, usize), ModelError> {
        let mut scaled = HashMap::new();
        let mut inexact = 0;
        for name in names {
            let t = require(inner, name)?;
            let mut data = tensor_data(inner, name, &t)?.to_vec();
            let kiln_format::kiln_types::TensorFormat::Ggml(ty) = t.format else {
                return Err(ModelError::unsupported(
                    inner.origin(),
                    format!(
                        "tensor {} is stored as {}, which the fp16 fix does not rescale",
                        inner.describe(name),
                        t.format
                    ),
                ));
            };
            inexact += kiln_format::ggml::scale_pow2(ty, &mut data, exp).map_err(|e| {
                ModelError::bad(
                    inner.origin(),
                    format!("tensor {}: {e}", inner.describe(name)),
                )
            })?;
            scaled.insert(
                name.clone(),
                TensorRef {
                    storage: Arc::new(data),
                    offset: 0,
                    dims: t.dims,
                    format: t.format,
                },
            );
        }
        Ok((ScaledSource { inner, scaled }, inexact))
    }
}

impl TensorSource for ScaledSource<'_> {
    fn origin(&self) -> &Path {
        self.inner.origin()
    }

    fn tensor(&self, name: &str) -> Option<TensorRef> {
        match self.scaled.get(name) {
            Some(t) => Some(t.clone()),
            None => self.inner.tensor(name),
        }
    }

    fn names(&self) -> Vec<String> {
        self.inner.names()
    }

    fn describe(&self, name: &str) -> String {
        self.inner.describe(name)
    }
}

/// A model made fp16-safe: the fix, the model description to store, and the weights to store.
pub struct SafeModel<'a> {
    /// What was done.
    pub fix: Fp16Fix,
    /// The description of the fixed model (embedding scale and residual epsilon changed when
    /// the residual stream is rescaled).
    pub config: ModelConfig,
    /// The fixed weights.
    pub source: ScaledSource<'a>,
}

/// The norms the graph may compute max-scaled, and whether each reads the residual stream.
const NORMS: [(&str, bool); 7] = [
    (ops::ATTN_NORM, true),
    (ops::FFN_NORM, true),
    (ops::OUTPUT_NORM, true),
    (ops::ATTN_Q_NORM, false),
    (ops::ATTN_K_NORM, false),
    (ops::POST_ATTENTION_NORM, false),
    (ops::POST_FFW_NORM, false),
];

/// Measures the model `config` describes over `source` on `prompts` (token ids), and fixes it.
pub fn make_safe<'a>(
    config: &ModelConfig,
    source: &'a dyn TensorSource,
    pool: &ThreadPool,
    prompts: &[Vec<u32>],
) -> Result<SafeModel<'a>, ModelError> {
    if prompts.is_empty() {
        return Err(ModelError::Request(
            "the fp16 fix needs at least one calibration prompt".into(),
        ));
    }
    let limit = FP16_MAX / HEADROOM;
    let model = Model::from_source(config.clone(), source)?;
    let before = measure(&model, pool, prompts, &GraphFix::default())?;
    drop(model);
    let mut notes = Vec::new();

    // The residual stream: the smallest power of two that brings it under the limit.
    let residual = [ops::TOKEN_EMBD, ops::ATTN_RESIDUAL, ops::FFN_RESIDUAL]
        .iter()
        .map(|op| before.max_of(op))
        .fold(0.0f32, f32::max);
    let mut exp = 0;
    while residual / 2f32.powi(exp) > limit && exp < MAX_RESIDUAL_DIVISOR_LOG2 {
        exp += 1;
    }
    let divisor = 2f32.powi(exp);
    let writers = if exp > 0 {
        residual_writers(config, source)
    } else {
        Vec::new()
    };
    let (scaled, inexact) = ScaledSource::new(source, &writers, -exp)?;
    let mut fixed = config.clone();
    if exp > 0 {
        fixed.embedding_scale = Some(config.embedding_scale.unwrap_or(1.0) / divisor);
        fixed.residual_rms_eps = Some(config.residual_eps() / (divisor * divisor));
        notes.push(format!(
            "residual stream carried divided by {divisor} (largest value {residual:.0}, \
             {:.2}x the fp16 maximum): embedding scale and {} tensors divided by {divisor}, \
             epsilon of the norms reading it divided by {}",
            residual / FP16_MAX,
            writers.len(),
            divisor * divisor
        ));
    } else {
        notes.push(format!(
            "residual stream left as it is (largest value {residual:.0}, {:.2}x the fp16 \
             maximum)",
            residual / FP16_MAX
        ));
    }
    if inexact > 0 {
        notes.push(format!(
            "{inexact} block scales fell below fp16's normal range when divided; their blocks \
             lost precision"
        ));
    }

    // Norm statistics: max-scaled where the squares leave their limit — the headroom squared,
    // as a value twice as large squares four times as large (a 738-token prompt takes Gemma 3's
    // key-norm squares from 23 700 on the calibration prompts to 39 700) — and the residual
    // norms always when the stream is rescaled, since ordinary rows then square into
    // subnormals.
    let square_limit = FP16_MAX / (HEADROOM * HEADROOM);
    let mut graph = GraphFix::default();
    for (norm, reads_residual) in NORMS {
        let squares = before.max_of(&format!("{norm}.square"));
        let squares = if reads_residual {
            squares / (divisor * divisor)
        } else {
            squares
        };
        if squares > square_limit || (reads_residual && exp > 0 && squares > 0.0) {
            graph.max_scaled_norms.push(norm.to_string());
        }
    }
    if !graph.max_scaled_norms.is_empty() {
        notes.push(format!(
            "RMSNorm computed max-scaled (x / max|x| before squaring) in the exported graph: {}",
            graph.max_scaled_norms.join(", ")
        ));
    }

    // Whatever is still beyond the limit stays fp32.
    let fixed_model = Model::from_source(fixed.clone(), &scaled)?;
    let mut after = measure(&fixed_model, pool, prompts, &graph)?;
    let mut beyond: Vec<&fp16::OpRange> = after
        .ops
        .iter()
        .filter(|o| o.max_abs > limit || o.non_finite > 0)
        .collect();
    beyond.sort_by(|a, b| b.max_abs.total_cmp(&a.max_abs));
    for o in &beyond {
        let base = o.op.split('.').next().unwrap_or(&o.op).to_string();
        if !graph.fp32_ops.contains(&base) {
            notes.push(format!(
                "{} reaches {:.0} ({:.2}x the fp16 maximum) after rescaling: no weight rescaling \
                 of this model keeps it in range; marked fp32",
                o.site(),
                o.max_abs,
                f64::from(o.max_abs) / f64::from(FP16_MAX)
            ));
            graph.fp32_ops.push(base);
        }
    }
    if !graph.fp32_ops.is_empty() {
        after = measure(&fixed_model, pool, prompts, &graph)?;
    }

    let fix = Fp16Fix {
        residual_divisor: divisor,
        scaled_tensors: writers,
        inexact_scales: inexact,
        graph,
        notes,
        calibration: Calibration {
            prompts: prompts.len(),
            tokens: prompts.iter().map(Vec::len).sum(),
            headroom: HEADROOM,
            before: RangeSummary::of(&before),
            after: RangeSummary::of(&after),
        },
    };
    Ok(SafeModel {
        fix,
        config: fixed,
        source: scaled,
    })
}

/// The fix a package manifest records in `conversion.fp16`, if any; `origin` names the
/// manifest in messages.
pub fn from_manifest(
    value: Option<&serde_json::Value>,
    origin: &Path,
) -> Result<Option<Fp16Fix>, ModelError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| ModelError::bad(origin, format!("'conversion.fp16': {e}"))),
    }
}

/// The fix recorded by the kiln package at `path`; `None` for a package without one and for
/// anything that is not a package. Only the manifest is read (shard hashes are checked where
/// the weights are loaded).
pub fn of_model_path(path: &Path) -> Result<Option<Fp16Fix>, ModelError> {
    if !crate::package::is_package(path) {
        return Ok(None);
    }
    let package = crate::package::open(path, kiln_format::package::Verify::StructureOnly)?;
    from_manifest(
        package.manifest().conversion.fp16.as_ref(),
        &crate::package::manifest_path(path),
    )
}
