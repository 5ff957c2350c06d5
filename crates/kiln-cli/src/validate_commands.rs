//! `kiln validate`: parity of a candidate with its source, or the fp16 range check of one
//! model. Thin wrappers over `kiln_runtime::validate`, `kiln_runtime::fp16` and
//! `kiln_runtime::fp16_fix`.
//!
//! Exit codes: 0 when every check passes, 1 when a threshold fails or an activation leaves
//! the fp16 range (the message names the prompt or the layer and operation, with figures),
//! 2 for bad input.

use crate::commands::Failure;
use clap::Args;
use kiln_coreml::cli_support::is_mlpackage;
use kiln_coreml::CoremlSession;
use kiln_runtime::bundle::ModelBundle;
use kiln_runtime::fp16::{self, Fp16Check, GraphFix, FP16_MAX};
use kiln_runtime::fp16_fix::{self, RangeSummary};
use kiln_runtime::validate::{self, LogitsModel, PerplexityComparison, PromptResult, Thresholds};
use kiln_runtime::{Precision, Session, ThreadPool};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Arguments of `kiln validate`.
#[derive(Args)]
pub struct ValidateArgs {
    /// The model to check: a GGUF file, a Hugging Face folder, a kiln package, or a Core ML
    /// .mlpackage (run by kiln's executor, prompts tokenized by the source).
    pub candidate: PathBuf,
    /// The model it must compute like (any format kiln runs).
    #[arg(long, required_unless_present = "fp16", conflicts_with = "fp16")]
    pub against: Option<PathBuf>,
    /// Instead of comparing: run the model with fp16 activations and report the largest
    /// magnitude of every operation per layer (exit 1 when any leaves the fp16 range).
    #[arg(long)]
    pub fp16: bool,
    /// Prompts: a text file with one prompt per line, or a JSON list of strings (for prompts
    /// spanning lines). Default: a built-in list of four.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A text whose perplexity both models compute (not measured without it).
    #[arg(long, conflicts_with = "fp16")]
    pub text: Option<PathBuf>,
    /// Positions per perplexity chunk.
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// Lowest logits cosine allowed at any compared step.
    #[arg(long, default_value_t = validate::DEFAULT_MIN_COSINE)]
    pub min_cosine: f64,
    /// Largest perplexity increase allowed, in percent.
    #[arg(long, default_value_t = validate::DEFAULT_MAX_PPL_INCREASE_PCT)]
    pub max_ppl_increase: f64,
    /// Largest KL divergence allowed at any compared step (default: not checked).
    #[arg(long)]
    pub max_kl: Option<f64>,
    /// Lowest top-1 agreement rate allowed per prompt, 0 to 1 (default: not checked).
    #[arg(long)]
    pub min_top1: Option<f64>,
    /// Tokens of the source's greedy continuation fed to both models after each prompt.
    #[arg(long, default_value_t = validate::DEFAULT_CONTINUATION)]
    pub continuation: usize,
    /// Threads to compute with (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Activation precision of both models' matrix products: exact (default: f32
    /// activations, so the figures measure the weights), refined or int8.
    #[arg(long, default_value = "exact", value_parser = ["refined", "int8", "exact"])]
    pub precision: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn input(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn pool(threads: Option<usize>) -> Result<ThreadPool, Failure> {
    match threads {
        Some(0) => Err(input("--threads must be at least 1")),
        Some(n) => Ok(ThreadPool::new(n)),
        None => Ok(ThreadPool::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )),
    }
}

fn read_utf8(path: &Path, what: &str) -> Result<String, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| input(format!("{}: cannot read {what}: {e}", path.display())))?;
    String::from_utf8(bytes)
        .map_err(|_| input(format!("{}: {what} is not valid UTF-8", path.display())))
}

fn prompt_texts(path: Option<&Path>) -> Result<Vec<String>, Failure> {
    match path {
        None => Ok(validate::DEFAULT_PROMPTS
            .iter()
            .map(|s| s.to_string())
            .collect()),
        Some(p) => validate::parse_prompts(&read_utf8(p, "the prompts file")?)
            .map_err(|e| input(format!("{}: {e}", p.display()))),
    }
}

/// `kiln validate`.
pub fn validate(a: ValidateArgs) -> Result<(), Failure> {
    if a.fp16 {
        return fp16_check(&a);
    }
    let against = a
        .against
        .as_ref()
        .expect("clap requires --against without --fp16");
    if !(0.0..=1.0).contains(&a.min_cosine) {
        return Err(input("--min-cosine must be between 0 and 1"));
    }
    if a.max_ppl_increase.is_nan() {
        return Err(input("--max-ppl-increase must be a number"));
    }
    let pool = pool(a.threads)?;
    let texts = prompt_texts(a.prompts.as_deref())?;
    if is_mlpackage(against) {
        return Err(input(format!(
            "{}: a Core ML package can be the candidate, not the source: give --against the \
             model it was exported from",
            against.display()
        )));
    }
    let source = ModelBundle::open(against)?;
    let (candidate, mut package) = if is_mlpackage(&a.candidate) {
        let session = CoremlSession::open(&a.candidate).map_err(|e| Failure {
            code: 2,
            message: e.to_string(),
        })?;
        (None, Some(session))
    } else {
        (Some(ModelBundle::open(&a.candidate)?), None)
    };
    let candidate_tokenizer = candidate.as_ref().and_then(|c| c.tokenizer.as_ref());
    let sv = source.model.config.vocab_size;
    let cv = match (&candidate, &package) {
        (Some(c), _) => c.model.config.vocab_size,
        (None, Some(p)) => p.vocab_size(),
        (None, None) => unreachable!("one of the two is open"),
    };
    if sv != cv {
        return Err(input(format!(
            "{} has a vocabulary of {cv} tokens but {} has {sv}: a candidate must share its \
             source's tokenizer",
            a.candidate.display(),
            against.display()
        )));
    }
    // One tokenizer serves both; where both models carry one, they must agree on every prompt.
    let encode = |text: &str| -> Result<Vec<u32>, Failure> {
        let ids = match (&source.tokenizer, &candidate) {
            (Some(_), _) => source.encode_prompt(text)?,
            (None, Some(c)) if c.tokenizer.is_some() => c.encode_prompt(text)?,
            _ => {
                return Err(input(format!(
                    "neither {} nor {} carries a tokenizer: the prompts cannot be tokenized",
                    a.candidate.display(),
                    against.display()
                )))
            }
        };
        if let (Some(_), Some(c)) = (&source.tokenizer, &candidate) {
            if c.tokenizer.is_none() {
                return Ok(ids);
            }
            let other = c.encode_prompt(text)?;
            if other != ids {
                return Err(input(format!(
                    "the two models tokenize {text:?} differently ({} tokens from {}, {} from \
                     {}): a candidate must share its source's tokenizer",
                    ids.len(),
                    against.display(),
                    other.len(),
                    a.candidate.display()
                )));
            }
        }
        Ok(ids)
    };
    let prompts: Vec<(String, Vec<u32>)> = texts
        .iter()
        .map(|t| encode(t).map(|ids| (t.clone(), ids)))
        .collect::<Result<_, _>>()?;
    let text_tokens = match &a.text {
        None => None,
        Some(p) => {
            let text = read_utf8(p, "the text file")?;
            let tok = source
                .tokenizer
                .as_ref()
                .or(candidate_tokenizer)
                .expect("a tokenizer encoded the prompts");
            let bos = if tok.add_bos() { tok.bos_id() } else { None };
            Some((tok.encode(&text, false, false)?, bos))
        }
    };

    let longest = prompts.iter().map(|(_, ids)| ids.len()).max().unwrap_or(0);
    let n_ctx = (longest + a.continuation).max(if a.text.is_some() { a.ctx } else { 0 });
    let limits = [
        (
            source.model.origin.clone(),
            source.model.config.context_length,
        ),
        match (&candidate, &package) {
            (Some(c), _) => (c.model.origin.clone(), c.model.config.context_length),
            (None, Some(p)) => (a.candidate.clone(), p.n_ctx()),
            (None, None) => unreachable!("one of the two is open"),
        },
    ];
    for (origin, limit) in limits {
        if n_ctx > limit {
            return Err(input(format!(
                "{}: {n_ctx} positions (longest prompt {longest} + --continuation {}, or \
                 --ctx {}) exceed the model's context of {limit}",
                origin.display(),
                a.continuation,
                a.ctx
            )));
        }
    }
    let precision = Precision::from_name(&a.precision).unwrap_or(Precision::Exact);
    let mut s_session = Session::new(&source.model, &pool, n_ctx);
    s_session.set_precision(precision);
    let mut c_bundle_session = candidate.as_ref().map(|c| {
        let mut s = Session::new(&c.model, &pool, n_ctx);
        s.set_precision(precision);
        s
    });
    let c_session: &mut dyn LogitsModel = match (&mut c_bundle_session, &mut package) {
        (Some(s), _) => s,
        (None, Some(p)) => p,
        (None, None) => unreachable!("one of the two is open"),
    };
    let mut results = Vec::with_capacity(prompts.len());
    for (text, ids) in &prompts {
        results.push(validate::compare_prompt(
            &mut s_session,
            c_session,
            text,
            ids,
            a.continuation,
        )?);
    }
    let ppl = match &text_tokens {
        None => None,
        Some((tokens, bos)) => {
            let s = kiln_runtime::perplexity::perplexity_of(&mut s_session, tokens, a.ctx, *bos)?;
            let c = kiln_runtime::perplexity::perplexity_of(c_session, tokens, a.ctx, *bos)?;
            Some(PerplexityComparison {
                source: s.ppl,
                candidate: c.ppl,
                increase_pct: (c.ppl / s.ppl - 1.0) * 100.0,
                scored_tokens: s.scored_tokens,
            })
        }
    };
    let thresholds = Thresholds {
        min_cosine: a.min_cosine,
        max_ppl_increase_pct: a.max_ppl_increase,
        max_kl: a.max_kl,
        min_top1_rate: a.min_top1,
    };
    let failures = validate::judge(&results, ppl.as_ref(), &thresholds);
    if a.json {
        print_json(&a, against, &results, ppl.as_ref(), &thresholds, &failures);
    } else {
        print_table(&a, against, &results, ppl.as_ref(), &thresholds, &failures);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failed(format!(
            "validation failed: {}",
            failures.join("; ")
        )))
    }
}

/// Figures over every prompt: lowest cosine, mean KL, top-1 agreements and steps.
fn totals(results: &[PromptResult]) -> (f64, f64, usize, usize) {
    let steps: usize = results.iter().map(|r| r.steps.len()).sum();
    let agree: usize = results.iter().map(|r| r.top1_agreements).sum();
    let min_cos = results
        .iter()
        .map(|r| r.min_cosine)
        .fold(
            f64::INFINITY,
            |a, b| if b.is_nan() || b < a { b } else { a },
        );
    let kl = results
        .iter()
        .flat_map(|r| r.steps.iter().map(|s| s.kl))
        .sum::<f64>()
        / steps.max(1) as f64;
    (min_cos, kl, agree, steps)
}

fn print_json(
    a: &ValidateArgs,
    against: &Path,
    results: &[PromptResult],
    ppl: Option<&PerplexityComparison>,
    thresholds: &Thresholds,
    failures: &[String],
) {
    let (min_cos, mean_kl, agree, steps) = totals(results);
    let prompts: Vec<_> = results
        .iter()
        .map(|r| {
            json!({
                "text": r.text,
                "tokens": r.n_tokens,
                "last": r.last,
                "continuation": r.continuation,
                "steps": r.steps.len(),
                "min_cosine": r.min_cosine,
                "min_cosine_step": r.min_cosine_step,
                "mean_kl": r.mean_kl,
                "max_kl": r.max_kl,
                "top1_agreements": r.top1_agreements,
                "top1_rate": r.top1_rate(),
            })
        })
        .collect();
    let j = json!({
        "candidate": a.candidate,
        "source": against,
        "precision": a.precision,
        "continuation": a.continuation,
        "prompts": prompts,
        "summary": {
            "min_cosine": min_cos,
            "mean_kl": mean_kl,
            "top1_agreements": agree,
            "steps": steps,
            "top1_rate": agree as f64 / steps.max(1) as f64,
        },
        "perplexity": ppl.map(|p| json!({
            "text": a.text,
            "ctx": a.ctx,
            "source": p.source,
            "candidate": p.candidate,
            "increase_pct": p.increase_pct,
            "scored_tokens": p.scored_tokens,
        })),
        "thresholds": thresholds,
        "failures": failures,
        "pass": failures.is_empty(),
    });
    println!("{j}");
}

fn print_table(
    a: &ValidateArgs,
    against: &Path,
    results: &[PromptResult],
    ppl: Option<&PerplexityComparison>,
    thresholds: &Thresholds,
    failures: &[String],
) {
    println!(
        "{} against {} ({} prompts, continuation {}, precision {})",
        a.candidate.display(),
        against.display(),
        results.len(),
        a.continuation,
        a.precision
    );
    println!(
        "{:<4} {:<34} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "#", "prompt", "tokens", "last cos", "last KL", "min cos", "mean KL", "top-1"
    );
    for (i, r) in results.iter().enumerate() {
        let mut text: String = r.text.chars().take(32).collect();
        if text.len() < r.text.len() {
            text.push('…');
        }
        println!(
            "{:<4} {:<34} {:>6} {:>10.6} {:>10.6} {:>10.6} {:>10.6} {:>9}",
            i + 1,
            format!("{text:?}"),
            r.n_tokens,
            r.last.cosine,
            r.last.kl,
            r.min_cosine,
            r.mean_kl,
            format!("{}/{}", r.top1_agreements, r.steps.len())
        );
    }
    let (min_cos, mean_kl, agree, steps) = totals(results);
    println!(
        "all prompts: min cosine {min_cos:.6}, mean KL {mean_kl:.6}, top-1 agreement {agree}/{steps} ({:.1} %)",
        100.0 * agree as f64 / steps.max(1) as f64
    );
    match ppl {
        Some(p) => println!(
            "perplexity (ctx {}, {} tokens scored): source {:.4}, candidate {:.4} ({:+.2} %)",
            a.ctx, p.scored_tokens, p.source, p.candidate, p.increase_pct
        ),
        None => println!("perplexity: not measured (no --text)"),
    }
    if failures.is_empty() {
        println!(
            "PASS (min cosine >= {}, perplexity increase <= {} %)",
            thresholds.min_cosine, thresholds.max_ppl_increase_pct
        );
    } else {
        println!("FAIL");
    }
}

/// `kiln validate MODEL --fp16`.
fn fp16_check(a: &ValidateArgs) -> Result<(), Failure> {
    let pool = pool(a.threads)?;
    let texts = prompt_texts(a.prompts.as_deref())?;
    let bundle = ModelBundle::open(&a.candidate)?;
    let fix = fp16_fix::of_model_path(&a.candidate)?;
    let graph = fix.as_ref().map(|f| f.graph.clone()).unwrap_or_default();
    let prompts: Vec<(String, Vec<u32>)> = texts
        .iter()
        .map(|t| bundle.encode_prompt(t).map(|ids| (t.clone(), ids)))
        .collect::<Result<_, _>>()?;
    let check = fp16::check(&bundle.model, &pool, &prompts, &graph)?;
    let failures = check.report.failures();
    if a.json {
        print_fp16_json(a, &check, fix.as_ref());
    } else {
        print_fp16_table(a, &check, fix.as_ref(), &graph);
    }
    if failures.is_empty() {
        return Ok(());
    }
    let listed: Vec<String> = failures
        .iter()
        .take(5)
        .map(|o| {
            format!(
                "{} max {:.4e} ({:.2}x {FP16_MAX}){}",
                o.site(),
                o.max_abs,
                o.ratio(),
                if o.non_finite > 0 { ", inf/nan" } else { "" }
            )
        })
        .collect();
    Err(failed(format!(
        "fp16 range check failed: {} (layer, op) pairs leave the fp16 range; worst: {}{}",
        failures.len(),
        listed.join("; "),
        if failures.len() > listed.len() {
            "; …"
        } else {
            ""
        }
    )))
}

fn print_fp16_json(a: &ValidateArgs, check: &Fp16Check, fix: Option<&fp16_fix::Fp16Fix>) {
    let summary = RangeSummary::of(&check.report);
    let overflows: Vec<_> = check
        .report
        .failures()
        .iter()
        .map(|o| {
            json!({
                "layer": o.layer, "op": o.op, "max_abs": o.max_abs, "ratio": o.ratio(),
                "overflows": o.overflows, "non_finite": o.non_finite,
            })
        })
        .collect();
    let j = json!({
        "model": a.candidate,
        "fp16_max": FP16_MAX,
        "fix": fix,
        "prompts": check.prompts,
        "max_activation": {
            "value": summary.max_activation,
            "ratio": f64::from(summary.max_activation) / f64::from(FP16_MAX),
            "at": summary.max_activation_at,
        },
        "max_norm_statistic": {
            "value": summary.max_norm_statistic,
            "ratio": f64::from(summary.max_norm_statistic) / f64::from(FP16_MAX),
            "at": summary.max_norm_statistic_at,
        },
        "ops": check.report.ops,
        "overflows": overflows,
        "pass": check.passed(),
    });
    println!("{j}");
}

/// Layer numbers as ranges: `3-10,12,14-17`.
fn layer_list(layers: &[Option<usize>]) -> String {
    let mut nums: Vec<usize> = layers.iter().flatten().copied().collect();
    nums.sort_unstable();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < nums.len() {
        let mut j = i;
        while j + 1 < nums.len() && nums[j + 1] == nums[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            nums[i].to_string()
        } else {
            format!("{}-{}", nums[i], nums[j])
        });
        i = j + 1;
    }
    if layers.iter().any(Option::is_none) {
        parts.push("output".into());
    }
    parts.join(",")
}

fn print_fp16_table(
    a: &ValidateArgs,
    check: &Fp16Check,
    fix: Option<&fp16_fix::Fp16Fix>,
    graph: &GraphFix,
) {
    let tokens: usize = check.prompts.iter().map(|p| p.n_tokens).sum();
    println!(
        "fp16 range check of {} ({} prompts, {tokens} tokens; fix: {})",
        a.candidate.display(),
        check.prompts.len(),
        match fix {
            None => "none".to_string(),
            Some(f) => format!(
                "residual / {}, max-scaled norms [{}], fp32 [{}]",
                f.residual_divisor,
                graph.max_scaled_norms.join(", "),
                graph.fp32_ops.join(", ")
            ),
        }
    );
    println!(
        "{:<28} {:>12} {:>11} {:>7}  beyond fp16 in layers",
        "op", "max |x|", "x 65504", "layer"
    );
    for name in check.report.op_names() {
        let entries: Vec<_> = check.report.ops.iter().filter(|o| o.op == name).collect();
        let worst = entries
            .iter()
            .max_by(|a, b| a.max_abs.total_cmp(&b.max_abs))
            .expect("a named op has entries");
        let bad: Vec<Option<usize>> = entries
            .iter()
            .filter(|o| o.overflows > 0 || o.non_finite > 0)
            .map(|o| o.layer)
            .collect();
        let layer = worst.layer.map_or("out".to_string(), |l| l.to_string());
        let fp32 = if worst.fp32 { " (fp32)" } else { "" };
        println!(
            "{:<28} {:>12.4e} {:>11.4} {:>7}  {}{fp32}",
            name,
            worst.max_abs,
            worst.ratio(),
            layer,
            layer_list(&bad)
        );
    }
    let s = RangeSummary::of(&check.report);
    println!(
        "largest activation: {:.1} ({:.3}x fp16 max) at {}",
        s.max_activation,
        f64::from(s.max_activation) / f64::from(FP16_MAX),
        s.max_activation_at
    );
    println!(
        "largest RMSNorm statistic: {:.4e} ({:.1}x fp16 max) at {}",
        s.max_norm_statistic,
        f64::from(s.max_norm_statistic) / f64::from(FP16_MAX),
        s.max_norm_statistic_at
    );
    for (i, p) in check.prompts.iter().enumerate() {
        println!(
            "prompt {} ({} tokens): strict fp16 logits vs f32: cosine {:.6}, top-1 {}{}",
            i + 1,
            p.n_tokens,
            p.cosine,
            if p.top1_agrees { "agrees" } else { "differs" },
            if p.non_finite_logits > 0 {
                format!(", {} logits inf/nan", p.non_finite_logits)
            } else {
                String::new()
            }
        );
    }
    println!("{}", if check.passed() { "PASS" } else { "FAIL" });
}
