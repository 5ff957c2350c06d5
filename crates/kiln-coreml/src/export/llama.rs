//! The Llama family (SmolLM2, Llama 2/3, Mistral, Qwen 2 without its extras) as a stateful
//! fp16 ML Program.
//!
//! Interface (the protocol of the coremltools-made reference packages):
//! - `input_ids`: int32 `[1, q]`, `1 <= q <= max_query`;
//! - `causal_mask`: fp16 `[1, 1, q, past + q]`, added to the attention scores (0 where a
//!   query may look, `-inf` where it may not); its last dimension tells the program how many
//!   positions are already cached, so no position input is needed;
//! - states `keyCache`, `valueCache`: fp16 `[layers, 1, kv_heads, context, head_dim]`, the
//!   keys (after rotary embedding) and values of every position seen, written at
//!   `past..past + q` on each call;
//! - output `logits`: fp16 `[1, q, vocab]`.
//!
//! Weights are stored as fp16. RMSNorm's square, mean and rsqrt run in fp32 (mixed
//! precision): the residual stream of real models reaches values whose squares overflow fp16.
//! Rotary angles are computed in fp32 as well; positions times frequencies lose too much in
//! fp16 beyond a few hundred positions.

use super::mil::{InputDim, ProgramBuilder, Var};
use super::package_writer::PackageWriter;
use super::{ExportError, ExportOptions, ExportSummary};
use crate::proto::{self, DataType};
use kiln_runtime::config::{Activation, ModelConfig, RopeStyle};
use kiln_runtime::weights::WeightMatrix;
use kiln_runtime::Model;
use std::path::Path;

const F16: DataType = DataType::Float16;
const F32: DataType = DataType::Float32;
const I32: DataType = DataType::Int32;

/// Refuses configurations this exporter does not build, naming the feature.
fn check_supported(c: &ModelConfig, opts: &ExportOptions) -> Result<(), ExportError> {
    let unsupported = |what: &str| {
        Err(ExportError::Unsupported(format!(
            "{} model: {what} is not supported by the Core ML exporter yet",
            c.architecture
        )))
    };
    if c.activation != Activation::Silu {
        return unsupported("a feed-forward activation other than SiLU");
    }
    if c.qk_norm {
        return unsupported("per-head q/k RMSNorm");
    }
    if c.post_norms {
        return unsupported("post-attention / post-feed-forward norms");
    }
    if c.embedding_scale.is_some() {
        return unsupported("an embedding scale");
    }
    if c.final_logit_softcap.is_some() || c.attn_logit_softcap.is_some() {
        return unsupported("logit soft-capping");
    }
    if c.rope_dim != c.head_dim {
        return unsupported("partial rotary embedding (rope_dim != head_dim)");
    }
    if c.layers.len() != c.n_layers || c.n_layers == 0 {
        return Err(ExportError::Invalid(format!(
            "the configuration describes {} layers but lists {}",
            c.n_layers,
            c.layers.len()
        )));
    }
    if c.layers.iter().any(|l| l.sliding_window.is_some()) {
        return unsupported("sliding-window attention");
    }
    let first = &c.layers[0];
    if c.layers
        .iter()
        .any(|l| l.rope_base != first.rope_base || l.rope_freq_scale != first.rope_freq_scale)
    {
        return unsupported("per-layer rotary settings");
    }
    if c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 || c.head_dim % 2 != 0 {
        return Err(ExportError::Invalid(format!(
            "{} query heads, {} key/value heads and head size {} do not form grouped-query attention",
            c.n_heads, c.n_kv_heads, c.head_dim
        )));
    }
    if let Some(f) = &c.rope_freq_factors {
        if f.len() < c.rope_dim / 2 {
            return Err(ExportError::Invalid(format!(
                "{} rope frequency factors for {} frequencies",
                f.len(),
                c.rope_dim / 2
            )));
        }
    }
    if opts.context == 0 || opts.max_query == 0 || opts.max_query > opts.context {
        return Err(ExportError::Invalid(format!(
            "context {} and query length {} must satisfy 1 <= query <= context",
            opts.context, opts.max_query
        )));
    }
    if opts.context > c.context_length.max(1) {
        return Err(ExportError::Invalid(format!(
            "context {} exceeds the model's trained context of {} positions",
            opts.context, c.context_length
        )));
    }
    if opts.context > i32::MAX as usize / 2 {
        return Err(ExportError::Invalid(format!(
            "context {} is too large",
            opts.context
        )));
    }
    Ok(())
}

/// The matrix as row-major f32 `[rows, cols]` (`[out, in]`, the layout `linear` takes).
fn dense(m: &WeightMatrix) -> Vec<f32> {
    let cols = m.cols();
    let mut out = vec![0f32; m.rows() * cols];
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        m.dequantize_row(r, row);
    }
    out
}

/// Reorders the rows of each head from adjacent rotary pairs `(2i, 2i+1)` to split halves
/// `(i, i + d/2)`. Applied to both q and k it leaves every attention score unchanged, and
/// lets one rotary formulation serve GGUF llama files (whose converter permuted the rows)
/// and Hugging Face checkpoints alike.
fn deinterleave(rows: &[f32], cols: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; rows.len()];
    for h in 0..heads {
        for i in 0..half {
            for (dst, src) in [(i, 2 * i), (i + half, 2 * i + 1)] {
                let d = (h * head_dim + dst) * cols;
                let s = (h * head_dim + src) * cols;
                out[d..d + cols].copy_from_slice(&rows[s..s + cols]);
            }
        }
    }
    out
}

/// Emits the program into `b`, writing weights as it goes; returns the logits variable.
fn build(b: &mut ProgramBuilder, model: &Model, opts: &ExportOptions) -> Result<Var, ExportError> {
    let c = &model.config;
    let (hd, nh, nkv) = (c.head_dim, c.n_heads, c.n_kv_heads);
    let half = hd / 2;
    let group = nh / nkv;
    let ctx = opts.context;
    let interleaved = c.rope_style == RopeStyle::Interleaved;

    let ids = b.input(
        "input_ids",
        I32,
        &[InputDim::Fixed(1), InputDim::Range(1, opts.max_query)],
    );
    let mask = b.input(
        "causal_mask",
        F16,
        &[
            InputDim::Fixed(1),
            InputDim::Fixed(1),
            InputDim::Range(1, opts.max_query),
            InputDim::Range(1, ctx),
        ],
    );
    let cache_shape = [c.n_layers, 1, nkv, ctx, hd];
    let key_cache = b.state("keyCache", F16, &cache_shape);
    let value_cache = b.state("valueCache", F16, &cache_shape);

    // Positions past..end, from the shapes of the inputs.
    let ids_shape = b.shape_of("ids_shape", &ids);
    let one = b.int("one", 1);
    let three = b.int("three", 3);
    let q_len = b.gather("q_len", &ids_shape, &one, 0);
    let mask_shape = b.shape_of("mask_shape", &mask);
    let end = b.gather("end", &mask_shape, &three, 0);
    let past = b.sub("past", &end, &q_len);
    let positions = b.range_1d("positions", &past, &end, &one);
    let pos_f = b.cast("positions_fp32", &positions, F32);
    let pos_col = b.expand_dims("positions_column", &pos_f, 1);
    let l0 = &c.layers[0];
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let mut f = l0.rope_freq_scale / l0.rope_base.powf((2 * i) as f32 / hd as f32);
            if let Some(factors) = &c.rope_freq_factors {
                f /= factors[i];
            }
            f
        })
        .collect();
    let inv_freq = b.const_f32("inv_freq", &[half], &inv_freq);
    let freqs = b.mul("freqs", &pos_col, &inv_freq);
    let angles = b.concat("angles", &[&freqs, &freqs], -1);
    let cos32 = b.unary("cos", "cos_fp32", &angles);
    let sin32 = b.unary("sin", "sin_fp32", &angles);
    let cos = b.cast("cos", &cos32, F16);
    let sin = b.cast("sin", &sin32, F16);
    let minus_one = b.scalar("minus_one", F16, -1.0);

    // Cache write bounds shared by every layer: [l, 0, 0, past, 0] .. [l + 1, 1, nkv, end, hd].
    let past1 = b.expand_dims("past_1d", &past, 0);
    let end1 = b.expand_dims("end_1d", &end, 0);
    let zero1 = b.ints("zero_1d", &[0]);
    let hd1 = b.ints("head_dim_1d", &[hd as i32]);

    let embed = b.weight(
        "embed_tokens",
        F16,
        &[c.vocab_size, c.n_embd],
        &dense(&model.token_embd),
    );
    let mut x = b.gather("embeddings", &embed, &ids, 0);

    let rms_norm = |b: &mut ProgramBuilder, name: &str, x: &Var, w: &[f32]| -> Var {
        let xf = b.cast(&format!("{name}_x_fp32"), x, F32);
        let sq = b.mul(&format!("{name}_square"), &xf, &xf);
        let ms = b.mean_last(&format!("{name}_mean"), &sq);
        let r = b.rsqrt(&format!("{name}_rsqrt"), &ms, c.rms_eps);
        let n = b.mul(&format!("{name}_normalized"), &xf, &r);
        let wv = b.weight(&format!("{name}_weight"), F32, &[w.len()], w);
        let y = b.mul(&format!("{name}_scaled"), &n, &wv);
        b.cast(name, &y, F16)
    };
    let bias = |b: &mut ProgramBuilder, name: &str, v: &Option<Vec<f32>>| -> Option<Var> {
        v.as_ref()
            .map(|v| b.weight(&format!("{name}_bias"), F16, &[v.len()], v))
    };
    // x [1, n, q, hd] → x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1].
    let rope = |b: &mut ProgramBuilder, name: &str, x: &Var, n: usize| -> Var {
        let x1 = b.slice(
            &format!("{name}_x1"),
            x,
            &[0, 0, 0, 0],
            &[1, n as i64, 0, half as i64],
            &[true, true, true, false],
        );
        let x2 = b.slice(
            &format!("{name}_x2"),
            x,
            &[0, 0, 0, half as i64],
            &[1, n as i64, 0, hd as i64],
            &[true, true, true, false],
        );
        let neg = b.mul(&format!("{name}_neg_x2"), &x2, &minus_one);
        let rot = b.concat(&format!("{name}_rotated"), &[&neg, &x1], -1);
        let a = b.mul(&format!("{name}_cos"), x, &cos);
        let s = b.mul(&format!("{name}_sin"), &rot, &sin);
        b.add(name, &a, &s)
    };

    let scale = b.scalar("attn_scale", F16, c.attn_scale);
    for (l, lw) in model.layers.iter().enumerate() {
        let p = format!("layer{l}");
        let h = rms_norm(b, &format!("{p}_attn_norm"), &x, &lw.attn_norm);

        let (mut wq, mut wk) = (dense(&lw.wq), dense(&lw.wk));
        let (mut bq, mut bk) = (lw.bq.clone(), lw.bk.clone());
        if interleaved {
            wq = deinterleave(&wq, c.n_embd, nh, hd);
            wk = deinterleave(&wk, c.n_embd, nkv, hd);
            bq = bq.map(|v| deinterleave(&v, 1, nh, hd));
            bk = bk.map(|v| deinterleave(&v, 1, nkv, hd));
        }
        let wq = b.weight(&format!("{p}_q_proj"), F16, &[nh * hd, c.n_embd], &wq);
        let wk = b.weight(&format!("{p}_k_proj"), F16, &[nkv * hd, c.n_embd], &wk);
        let wv = b.weight(
            &format!("{p}_v_proj"),
            F16,
            &[nkv * hd, c.n_embd],
            &dense(&lw.wv),
        );
        let bq = bias(b, &format!("{p}_q_proj"), &bq);
        let bk = bias(b, &format!("{p}_k_proj"), &bk);
        let bv = bias(b, &format!("{p}_v_proj"), &lw.bv);

        let heads = |b: &mut ProgramBuilder, name: &str, w: &Var, bias: Option<&Var>, n: usize| {
            let y = b.linear(&format!("{name}_linear"), &h, w, bias);
            let y = b.reshape(&format!("{name}_heads"), &y, &[1, -1, n as i64, hd as i64]);
            b.transpose(name, &y, &[0, 2, 1, 3])
        };
        let q = heads(b, &format!("{p}_q"), &wq, bq.as_ref(), nh);
        let k = heads(b, &format!("{p}_k"), &wk, bk.as_ref(), nkv);
        let v = heads(b, &format!("{p}_v"), &wv, bv.as_ref(), nkv);
        let q = rope(b, &format!("{p}_q_rope"), &q, nh);
        let k = rope(b, &format!("{p}_k_rope"), &k, nkv);

        // Write this call's keys and values into the layer's slice of the caches.
        let lead = b.ints(&format!("{p}_cache_begin_lead"), &[l as i32, 0, 0]);
        let begin = b.concat(&format!("{p}_cache_begin"), &[&lead, &past1, &zero1], 0);
        let lead_end = b.ints(
            &format!("{p}_cache_end_lead"),
            &[l as i32 + 1, 1, nkv as i32],
        );
        let stop = b.concat(&format!("{p}_cache_end"), &[&lead_end, &end1, &hd1], 0);
        let read_from = b.ints(&format!("{p}_cache_read_begin"), &[l as i32, 0, 0, 0, 0]);
        let mut cached = Vec::with_capacity(2);
        for (name, state, new) in [("key", &key_cache, &k), ("value", &value_cache, &v)] {
            let all = b.read_state(&format!("{p}_{name}_cache"), state);
            let new5 = b.expand_dims(&format!("{p}_{name}_update"), new, 0);
            let updated = b.slice_update(
                &format!("{p}_{name}_cache_updated"),
                &all,
                &new5,
                &begin,
                &stop,
            );
            b.write_state(&format!("{p}_{name}_cache_write"), state, &updated);
            let now = b.read_state(&format!("{p}_{name}_cache_now"), state);
            let seen = b.slice_dynamic(
                &format!("{p}_{name}s_seen"),
                &now,
                &read_from,
                &stop,
                &[true, false, false, false, false],
                vec![Some(1), Some(nkv), None, Some(hd)],
            );
            // Grouped-query attention: each key/value head serves `group` query heads.
            let seen = if group > 1 {
                let e = b.expand_dims(&format!("{p}_{name}s_grouped"), &seen, 2);
                let t = b.tile(&format!("{p}_{name}s_tiled"), &e, &[1, 1, group, 1, 1]);
                b.reshape(
                    &format!("{p}_{name}s_repeated"),
                    &t,
                    &[1, nh as i64, -1, hd as i64],
                )
            } else {
                seen
            };
            cached.push(seen);
        }
        let (keys, values) = (&cached[0], &cached[1]);

        let qs = b.mul(&format!("{p}_q_scaled"), &q, &scale);
        let scores = b.matmul(&format!("{p}_scores"), &qs, keys, false, true);
        let masked = b.add(&format!("{p}_scores_masked"), &scores, &mask);
        let weights = b.softmax(&format!("{p}_attention"), &masked, -1);
        let o = b.matmul(&format!("{p}_attn_values"), &weights, values, false, false);
        let o = b.transpose(&format!("{p}_attn_tokens"), &o, &[0, 2, 1, 3]);
        let o = b.reshape(&format!("{p}_attn_merged"), &o, &[1, -1, (nh * hd) as i64]);
        let wo = b.weight(
            &format!("{p}_o_proj"),
            F16,
            &[c.n_embd, nh * hd],
            &dense(&lw.wo),
        );
        let bo = bias(b, &format!("{p}_o_proj"), &lw.bo);
        let o = b.linear(&format!("{p}_attn_out"), &o, &wo, bo.as_ref());
        x = b.add(&format!("{p}_attn_residual"), &x, &o);

        let h = rms_norm(b, &format!("{p}_ffn_norm"), &x, &lw.ffn_norm);
        let mut mlp = |name: &str, m: &WeightMatrix, bv: &Option<Vec<f32>>, input: &Var| {
            let w = b.weight(
                &format!("{p}_{name}"),
                F16,
                &[m.rows(), m.cols()],
                &dense(m),
            );
            let bb = bias(b, &format!("{p}_{name}"), bv);
            b.linear(&format!("{p}_{name}_out"), input, &w, bb.as_ref())
        };
        let gate = mlp("gate_proj", &lw.w_gate, &lw.b_gate, &h);
        let up = mlp("up_proj", &lw.w_up, &lw.b_up, &h);
        let act = b.unary("silu", &format!("{p}_gate_silu"), &gate);
        let prod = b.mul(&format!("{p}_gated"), &act, &up);
        let down = {
            let w = b.weight(
                &format!("{p}_down_proj"),
                F16,
                &[lw.w_down.rows(), lw.w_down.cols()],
                &dense(&lw.w_down),
            );
            let bb = bias(b, &format!("{p}_down_proj"), &lw.b_down);
            b.linear(&format!("{p}_down_proj_out"), &prod, &w, bb.as_ref())
        };
        x = b.add(&format!("{p}_ffn_residual"), &x, &down);
    }

    let h = rms_norm(b, "final_norm", &x, &model.output_norm);
    let head = if model.tied_embeddings {
        embed
    } else {
        b.weight(
            "lm_head",
            F16,
            &[c.vocab_size, c.n_embd],
            &dense(&model.output),
        )
    };
    Ok(b.linear("logits", &h, &head, None))
}

/// Exports a loaded Llama-family model to a stateful fp16 `.mlpackage` at `dest` (see the
/// module documentation for its interface).
pub fn export_llama(
    model: &Model,
    dest: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    check_supported(&model.config, opts)?;
    let c = &model.config;
    let package = PackageWriter::create(dest)?;
    let mut b = ProgramBuilder::new(Some(package.weights()?));
    let logits = build(&mut b, model, opts)?;
    let source = model
        .origin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let user: Vec<(&str, String)> = vec![
        ("kiln.version", env!("CARGO_PKG_VERSION").to_string()),
        ("kiln.source", source),
        ("kiln.architecture", c.architecture.clone()),
        ("kiln.context", opts.context.to_string()),
        ("kiln.max_query", opts.max_query.to_string()),
        ("kiln.precision", "fp16 weights, fp32 RMSNorm statistics".into()),
        (
            "kiln.protocol",
            "input_ids int32 [1,q]; causal_mask fp16 [1,1,q,past+q] (0 allowed, -inf masked); states keyCache/valueCache carried across calls".into(),
        ),
    ];
    let metadata = proto::Metadata {
        short_description: format!("{} exported by kiln", c.architecture),
        version_string: String::new(),
        author: String::new(),
        license: String::new(),
        user_defined: user.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    let (model_spec, weights) = b.finish(&[&logits], metadata)?;
    let (weight_bytes, blobs) = match weights {
        Some(w) => {
            let n = w.count();
            (w.finish()?, n)
        }
        None => (0, 0),
    };
    let ops = match &model_spec.r#type {
        Some(proto::ModelType::MlProgram(p)) => p
            .functions
            .values()
            .flat_map(|f| f.block_specializations.values())
            .map(|blk| blk.operations.len())
            .sum(),
        None => 0,
    };
    let path = package.commit(&model_spec)?;
    Ok(ExportSummary {
        path,
        weight_bytes,
        blobs: blobs as usize,
        ops,
        context: opts.context,
        max_query: opts.max_query,
    })
}
