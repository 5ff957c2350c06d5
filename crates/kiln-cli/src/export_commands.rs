//! `kiln export coreml`: a thin wrapper over `kiln_coreml::export`.

use crate::commands::Failure;
use clap::{Args, Subcommand, ValueEnum};
use kiln_coreml::export::{
    self, ExportError, ExportOptions, HeadSplit, OutputKind, Precision, WeightFormat,
};
use std::path::PathBuf;

/// Arguments of `kiln export`.
#[derive(Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub target: ExportTarget,
}

/// What `kiln export` writes.
#[derive(Subcommand)]
pub enum ExportTarget {
    /// A stateful Core ML ML Program package (KV caches as states), with kiln.json beside it.
    Coreml(CoremlArgs),
}

/// `--precision`.
#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    /// RMSNorm statistics in fp32, the rest fp16.
    Mixed,
    /// Everything fp16.
    Fp16,
}

/// `--output`.
#[derive(Clone, Copy, ValueEnum)]
pub enum OutputArg {
    /// logits: fp16 [1, q, vocab].
    Logits,
    /// next_token: int32 [1, q].
    Argmax,
}

/// Arguments of `kiln export coreml`.
#[derive(Args)]
pub struct CoremlArgs {
    /// The model: a GGUF file, a Hugging Face folder or a kiln package.
    pub source: PathBuf,
    /// The package to write (an .mlpackage folder; an existing package is replaced).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Weight format: fp16, int8-channel, int4-block32, lut4, lut6, or lut4-block32 (a 4-bit
    /// table with a scale and an offset per block of 32; a kiln package's LUT4_B32 and
    /// LUT4_B32_G{n} tensors are carried over as they are, tables per group included).
    #[arg(long, default_value = "fp16")]
    pub quant: String,
    /// Output channels sharing one lookup table (lut4/lut6); default one table per tensor.
    #[arg(long)]
    pub lut_group_channels: Option<usize>,
    /// Positions the key/value caches hold.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Tokens per call: a range MIN-MAX (input_ids is [1, MIN..=MAX]) or a fixed N.
    #[arg(long, default_value = "1-64", conflicts_with = "max_query")]
    pub query_len: String,
    /// Same as --query-len 1-N.
    #[arg(long)]
    pub max_query: Option<usize>,
    /// Where RMSNorm's statistics are computed.
    #[arg(long, value_enum, default_value = "mixed")]
    pub precision: PrecisionArg,
    /// Split the LM head into N pieces, or `auto`: pieces of at most 16384 rows.
    #[arg(long, default_value = "auto")]
    pub lm_head_split: String,
    /// What the model returns.
    #[arg(long, value_enum, default_value = "logits")]
    pub output: OutputArg,
    /// The largest weight file of one package, in MB (10^6 bytes); larger models are cut into
    /// several packages over layer ranges.
    #[arg(long, default_value_t = 950.0)]
    pub max_chunk_mb: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kiln export`.
pub fn export(a: ExportArgs) -> Result<(), Failure> {
    match a.target {
        ExportTarget::Coreml(c) => coreml(c),
    }
}

fn bad(message: String) -> Failure {
    Failure { code: 2, message }
}

fn parse_query(s: &str) -> Result<(usize, usize), Failure> {
    let num = |t: &str| {
        t.trim().parse::<usize>().map_err(|_| {
            bad(format!(
                "--query-len {s}: expected N or MIN-MAX (e.g. 1-64)"
            ))
        })
    };
    match s.split_once('-') {
        Some((lo, hi)) => Ok((num(lo)?, num(hi)?)),
        None => {
            let n = num(s)?;
            Ok((n, n))
        }
    }
}

fn options(a: &CoremlArgs) -> Result<ExportOptions, Failure> {
    let mut weights: WeightFormat = a.quant.parse().map_err(bad)?;
    if let Some(g) = a.lut_group_channels {
        match &mut weights {
            WeightFormat::Lut { group_channels, .. } => *group_channels = Some(g),
            _ => {
                return Err(bad(format!(
                    "--lut-group-channels applies to lut4 and lut6, not {}",
                    a.quant
                )))
            }
        }
    }
    let query = match a.max_query {
        Some(n) => (1, n),
        None => parse_query(&a.query_len)?,
    };
    let lm_head_split = match a.lm_head_split.as_str() {
        "auto" => HeadSplit::Auto,
        n => match n.parse::<usize>() {
            Ok(p) if p > 0 => HeadSplit::Pieces(p),
            _ => {
                return Err(bad(format!(
                    "--lm-head-split {n}: expected auto or a positive number of pieces"
                )))
            }
        },
    };
    if !(a.max_chunk_mb.is_finite() && a.max_chunk_mb > 0.0) {
        return Err(bad(format!(
            "--max-chunk-mb {}: expected a positive size",
            a.max_chunk_mb
        )));
    }
    Ok(ExportOptions {
        context: a.context,
        query,
        weights,
        precision: match a.precision {
            PrecisionArg::Mixed => Precision::Mixed,
            PrecisionArg::Fp16 => Precision::Fp16,
        },
        output: match a.output {
            OutputArg::Logits => OutputKind::Logits,
            OutputArg::Argmax => OutputKind::Argmax,
        },
        lm_head_split,
        max_chunk_bytes: (a.max_chunk_mb * 1e6) as u64,
        // Read from the source by the exporter.
        fp16_graph: Default::default(),
    })
}

fn coreml(a: CoremlArgs) -> Result<(), Failure> {
    let opts = options(&a)?;
    let start = std::time::Instant::now();
    let summary = export::export_path(&a.source, &a.out, &opts).map_err(|e| Failure {
        // A defect of the exporter or an unwritable destination is not the user's input.
        code: match e {
            ExportError::Io { .. } | ExportError::Build(_) => 1,
            _ => 2,
        },
        message: e.to_string(),
    })?;
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let packages: Vec<serde_json::Value> = summary
            .packages
            .iter()
            .map(|p| {
                serde_json::json!({
                    "package": p.path.display().to_string(),
                    "layers": [p.layers.start, p.layers.end],
                    "weight_bytes": p.weight_bytes,
                    "weight_sha256": p.weight_sha256,
                    "blobs": p.blobs,
                    "ops": p.ops,
                })
            })
            .collect();
        let j = serde_json::json!({
            "package": summary.path().display().to_string(),
            "packages": packages,
            "sidecar": summary.sidecar.display().to_string(),
            "weight_bytes": summary.weight_bytes(),
            "weights": opts.weights.to_string(),
            "context": summary.context,
            "query_length": [summary.query.0, summary.query.1],
            "lm_head_pieces": summary.head_pieces,
            "seconds": secs,
        });
        println!("{j}");
    } else {
        for p in &summary.packages {
            println!(
                "{}: layers {}..{}, {} ops, {} weight blobs ({:.1} MB)",
                p.path.display(),
                p.layers.start,
                p.layers.end,
                p.ops,
                p.blobs,
                p.weight_bytes as f64 / 1e6,
            );
        }
        println!(
            "{}: {} weights, context {}, {}-{} tokens per call, LM head in {} piece(s) ({secs:.1} s)",
            summary.sidecar.display(),
            opts.weights,
            summary.context,
            summary.query.0,
            summary.query.1,
            summary.head_pieces
        );
    }
    Ok(())
}
