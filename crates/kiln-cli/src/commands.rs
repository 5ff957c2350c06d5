//! The subcommands: each turns parsed arguments into library calls and prints the result.

use crate::{
    BenchArgs, ChatArgs, InspectArgs, LogitsArgs, PerplexityArgs, PromptSource, RunArgs,
    SamplingArgs, TokenizeArgs,
};
use kiln_format::gguf::GgufFile;
use kiln_runtime::bundle::{BundleError, ModelBundle};
use kiln_runtime::conversation::Conversation;
use kiln_runtime::generate::{generate, GenerateOptions, TokenModel};
use kiln_runtime::sampling::SamplerConfig;
use kiln_runtime::{Logits, ModelError, Precision, Session, ThreadPool};
use kiln_tokenizer::chat::Message;
use kiln_tokenizer::Tokenizer;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::Path;

/// A failed command: the message to print and the exit code (2 bad input, 1 internal).
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub(crate) fn input(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<BundleError> for Failure {
    fn from(e: BundleError) -> Failure {
        Failure::input(e.to_string())
    }
}

impl From<ModelError> for Failure {
    fn from(e: ModelError) -> Failure {
        Failure::input(e.to_string())
    }
}

impl From<kiln_format::FormatError> for Failure {
    fn from(e: kiln_format::FormatError) -> Failure {
        Failure::input(e.to_string())
    }
}

impl From<kiln_tokenizer::TokenizerError> for Failure {
    fn from(e: kiln_tokenizer::TokenizerError) -> Failure {
        Failure::input(e.to_string())
    }
}

type CmdResult = Result<(), Failure>;

/// The precision a validated `--precision` value names.
fn precision(name: &str) -> Precision {
    Precision::from_name(name).unwrap_or_default()
}

pub(crate) fn threads(requested: Option<usize>) -> Result<ThreadPool, Failure> {
    let n = match requested {
        Some(0) => return Err(Failure::input("--threads must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Ok(ThreadPool::new(n))
}

pub(crate) fn read_text_file(path: &Path, what: &str) -> Result<String, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::input(format!("{}: cannot read {what}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        Failure::input(format!(
            "{}: {what} is not valid UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

fn read_messages(path: &Path) -> Result<Vec<Message>, Failure> {
    let text = read_text_file(path, "the messages file")?;
    let messages: Vec<Message> = serde_json::from_str(&text).map_err(|e| {
        Failure::input(format!(
            "{}: expected a JSON list of {{\"role\", \"content\"}} objects: {e}",
            path.display()
        ))
    })?;
    if messages.is_empty() {
        return Err(Failure::input(format!(
            "{}: the message list is empty",
            path.display()
        )));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(Failure::input(format!(
                "{}: message {i} has role '{}', expected system, user or assistant",
                path.display(),
                m.role
            )));
        }
    }
    Ok(messages)
}

/// What turns a prompt into token ids: a model bundle, or a Core ML package's tokenizer.
pub(crate) trait PromptEncoder {
    /// A plain prompt (BOS as the model's metadata says, special-token texts recognised).
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, Failure>;
    /// A chat rendered with the model's template.
    fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, Failure>;
}

impl PromptEncoder for ModelBundle {
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, Failure> {
        Ok(ModelBundle::encode_prompt(self, text)?)
    }

    fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, Failure> {
        Ok(ModelBundle::encode_chat(self, messages)?)
    }
}

/// Token ids for a prompt given as text, a file or messages, with or without the template.
pub(crate) fn prompt_ids(
    bundle: &impl PromptEncoder,
    source: &PromptSource,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>, Failure> {
    let ids = if let Some(path) = &source.messages {
        let mut messages = read_messages(path)?;
        if let Some(s) = system {
            if messages.first().is_none_or(|m| m.role != "system") {
                messages.insert(
                    0,
                    Message {
                        role: "system".into(),
                        content: s.into(),
                    },
                );
            }
        }
        bundle.encode_chat(&messages)?
    } else {
        let text = match (&source.prompt, &source.prompt_file) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => read_text_file(p, "the prompt file")?,
            (None, None) => {
                return Err(Failure::input("give --prompt, --prompt-file or --messages"))
            }
        };
        if chat {
            bundle.encode_chat(&ModelBundle::chat_messages(&text, system))?
        } else {
            if system.is_some() {
                return Err(Failure::input("--system needs --chat (or --messages)"));
            }
            bundle.encode_prompt(&text)?
        }
    };
    if ids.is_empty() {
        return Err(Failure::input("the prompt tokenizes to nothing"));
    }
    Ok(ids)
}

/// Validates the sampling flags and builds the sampler's configuration.
pub(crate) fn sampler_config(a: &SamplingArgs) -> Result<SamplerConfig, Failure> {
    let bad = |name: &str, v: f32, range: &str| {
        Failure::input(format!("--{name} {v} is out of range (expected {range})"))
    };
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(bad("temperature", a.temperature, ">= 0"));
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        return Err(bad("top-p", a.top_p, "0 < p <= 1"));
    }
    if !(0.0..=1.0).contains(&a.min_p) {
        return Err(bad("min-p", a.min_p, "0..=1"));
    }
    if !(a.repeat_penalty.is_finite() && a.repeat_penalty > 0.0) {
        return Err(bad("repeat-penalty", a.repeat_penalty, "> 0"));
    }
    if !a.frequency_penalty.is_finite() {
        return Err(bad(
            "frequency-penalty",
            a.frequency_penalty,
            "a finite number",
        ));
    }
    if !a.presence_penalty.is_finite() {
        return Err(bad(
            "presence-penalty",
            a.presence_penalty,
            "a finite number",
        ));
    }
    Ok(SamplerConfig {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
        penalty_last_n: a.repeat_last_n,
        seed: a.seed.unwrap_or_else(random_seed),
    })
}

/// `kiln run`.
pub fn run(a: RunArgs) -> CmdResult {
    crate::mlpackage_commands::refuse_package_args(&a.model, &a.package)?;
    let sampler = sampler_config(&a.sampling)?;
    let pool = threads(a.threads)?;
    let bundle = ModelBundle::open(&a.model)?;
    let tokenizer = bundle.tokenizer()?;
    let chat = a.chat || a.source.messages.is_some();
    let prompt = prompt_ids(&bundle, &a.source, chat, a.system.as_deref())?;
    let needed = prompt.len() + a.n_predict;
    let context = bundle.model.config.context_length;
    if needed > context {
        return Err(Failure::input(format!(
            "the prompt ({} tokens) plus -n {} need {needed} positions, more than the model's context of {context}",
            prompt.len(),
            a.n_predict
        )));
    }
    let options = GenerateOptions {
        max_tokens: a.n_predict,
        sampler,
        stop_ids: tokenizer.stop_ids(),
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
    };
    let mut session = Session::new(&bundle.model, &pool, needed);
    session.set_precision(precision(&a.precision));
    let threads = format!("{} thread(s)", pool.n_threads());
    generate_and_print(
        &mut session,
        tokenizer,
        &prompt,
        &options,
        a.json,
        bundle.load_ms,
        &threads,
    )
}

/// Generates with `generate`, streaming the text to stdout (or printing one JSON object with
/// `json`), then the timings; `backend` describes what computed, for the timings line.
pub(crate) fn generate_and_print<M: TokenModel + ?Sized>(
    session: &mut M,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    json: bool,
    load_ms: f64,
    backend: &str,
) -> CmdResult {
    let seed = options.sampler.seed;
    let stdout = std::io::stdout();
    let result = if json {
        generate(session, tokenizer, prompt, options, |_| {})?
    } else {
        let mut out = stdout.lock();
        let mut write_failed = false;
        let g = generate(session, tokenizer, prompt, options, |piece| {
            if !write_failed && (out.write_all(piece.as_bytes()).is_err() || out.flush().is_err()) {
                write_failed = true;
            }
        })?;
        let _ = writeln!(out);
        g
    };
    let t = &result.timings;
    if json {
        let obj = json!({
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": result.finish_reason.as_str(),
            "seed": seed,
            "timings": {
                "load_ms": load_ms,
                "prefill_tokens": t.prefill_tokens,
                "prefill_tok_s": t.prefill_tok_s(),
                "decode_tokens": t.decode_tokens,
                "decode_tok_s": t.decode_tok_s(),
                "ttft_ms": t.ttft_ms,
            }
        });
        println!("{obj}");
    } else {
        eprintln!(
            "[kiln] load {:.0} ms | prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s | first token {:.0} ms | {} | finish: {}",
            load_ms,
            t.prefill_tokens,
            t.prefill_tok_s(),
            result.token_ids.len(),
            t.decode_tok_s(),
            t.ttft_ms,
            backend,
            result.finish_reason.as_str()
        );
    }
    Ok(())
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// `kiln chat`: a read-eval-print loop over stdin, one user turn per line.
pub fn chat(a: ChatArgs) -> CmdResult {
    let sampler = sampler_config(&a.sampling)?;
    let pool = threads(a.threads)?;
    let bundle = ModelBundle::open(&a.model)?;
    let tokenizer = bundle.tokenizer()?;
    if bundle.chat_template.is_none() {
        return Err(Failure::input(format!(
            "{}: the model carries no chat template and kiln has none built in for '{}'",
            a.model.display(),
            bundle.model.config.architecture
        )));
    }
    let n_ctx = match a.ctx {
        Some(0) => return Err(Failure::input("--ctx must be at least 1")),
        Some(n) if n > bundle.model.config.context_length => {
            return Err(Failure::input(format!(
                "--ctx {n} exceeds the model's context of {}",
                bundle.model.config.context_length
            )))
        }
        Some(n) => n,
        None => bundle.model.config.context_length.min(4096),
    };
    let options = GenerateOptions {
        max_tokens: a.n_predict,
        sampler,
        stop_ids: tokenizer.stop_ids(),
        stop_strings: Vec::new(),
        ignore_eos: false,
    };
    let mut conversation = Conversation::new(&bundle, &pool, n_ctx, a.system.as_deref());
    conversation.set_precision(precision(&a.precision));
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "[kiln] {} loaded in {:.0} ms, context {n_ctx}. Type a message; /reset starts over, /exit or Ctrl-D quits.",
            a.model.display(),
            bundle.load_ms
        );
    }
    let stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        let n = std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| Failure::input(format!("cannot read stdin: {e}")))?;
        if n == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                conversation.reset();
                eprintln!("[kiln] conversation reset");
                continue;
            }
            _ => {}
        }
        let mut out = stdout.lock();
        let result = conversation.reply(text, &options, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        });
        let _ = writeln!(out);
        drop(out);
        match result {
            Ok(g) => {
                let t = &g.timings;
                eprintln!(
                    "[kiln] prompt {} new tokens, {:.1} tok/s | reply {} tokens, {:.1} tok/s | context {}/{}",
                    t.prefill_tokens,
                    t.prefill_tok_s(),
                    g.token_ids.len(),
                    t.decode_tok_s(),
                    conversation.cached_tokens() + 1,
                    conversation.n_ctx()
                );
            }
            Err(e) => eprintln!("[kiln] {e}"),
        }
    }
    Ok(())
}

/// `kiln logits`.
pub fn logits(a: LogitsArgs) -> CmdResult {
    crate::mlpackage_commands::refuse_package_args(&a.model, &a.package)?;
    let pool = threads(a.threads)?;
    let bundle = ModelBundle::open(&a.model)?;
    let encoder = bundle.tokenizer.is_some().then_some(&bundle);
    let ids = logits_ids(&a, encoder, || {
        format!(
            "{}: this model folder has no tokenizer.json; pass --token-ids",
            a.model.display()
        )
    })?;
    if ids.len() > bundle.model.config.context_length {
        return Err(Failure::input(format!(
            "{} tokens exceed the model's context of {}",
            ids.len(),
            bundle.model.config.context_length
        )));
    }
    let mut session = Session::new(&bundle.model, &pool, ids.len());
    session.set_precision(precision(&a.precision));
    let logits = session.forward(&ids, Logits::Last)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_atomic(&a.out, &bytes)?;
    println!("{}", json!({ "prompt_token_ids": ids }));
    Ok(())
}

/// The token ids `kiln logits` runs: `--token-ids` as given, else the prompt encoded by
/// `encoder`; without one, the message `no_tokenizer` gives.
pub(crate) fn logits_ids(
    a: &LogitsArgs,
    encoder: Option<&impl PromptEncoder>,
    no_tokenizer: impl FnOnce() -> String,
) -> Result<Vec<u32>, Failure> {
    if let Some(ids) = &a.input.token_ids {
        if ids.is_empty() {
            return Err(Failure::input("--token-ids is empty"));
        }
        if a.chat {
            return Err(Failure::input("--chat does not apply to --token-ids"));
        }
        return Ok(ids.clone());
    }
    let encoder = encoder.ok_or_else(|| Failure::input(no_tokenizer()))?;
    let source = PromptSource {
        prompt: a.input.prompt.clone(),
        prompt_file: a.input.prompt_file.clone(),
        messages: a.input.messages.clone(),
    };
    let chat = a.chat || source.messages.is_some();
    prompt_ids(encoder, &source, chat, a.system.as_deref())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let file_name = path
        .file_name()
        .ok_or_else(|| Failure::input(format!("{}: not a file path", path.display())))?;
    let tmp = dir
        .unwrap_or(Path::new("."))
        .join(format!(".{}.tmp", file_name.to_string_lossy()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Failure::input(format!("{}: cannot write: {e}", path.display()))
        })
}

/// `kiln perplexity`.
pub fn perplexity(a: PerplexityArgs) -> CmdResult {
    crate::mlpackage_commands::refuse_package_args(&a.model, &a.package)?;
    let pool = threads(a.threads)?;
    let bundle = ModelBundle::open(&a.model)?;
    let text = read_text_file(&a.text_file, "the text file")?;
    let tokenizer = bundle.tokenizer()?;
    let tokens = tokenizer.encode(&text, false, false)?;
    let bos = if tokenizer.add_bos() {
        tokenizer.bos_id()
    } else {
        None
    };
    let started = std::time::Instant::now();
    let p = kiln_runtime::perplexity::perplexity(
        &bundle.model,
        &pool,
        &tokens,
        a.ctx,
        bos,
        precision(&a.precision),
    )?;
    print_perplexity(&p, a.ctx, bos, started.elapsed().as_secs_f64(), a.json);
    Ok(())
}

/// Prints a perplexity result, as a line or as JSON.
pub fn print_perplexity(
    p: &kiln_runtime::perplexity::Perplexity,
    ctx: usize,
    bos: Option<u32>,
    seconds: f64,
    json: bool,
) {
    if json {
        println!(
            "{}",
            json!({
                "ppl": p.ppl,
                "n_tokens": p.n_tokens,
                "scored_tokens": p.scored_tokens,
                "chunks": p.n_chunks,
                "ctx": ctx,
                "bos": bos,
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "perplexity {:.4} over {} scored tokens ({} tokens, {} chunks of ctx {}, {:.1} s)",
            p.ppl, p.scored_tokens, p.n_tokens, p.n_chunks, ctx, seconds
        );
    }
}

/// `kiln tokenize`: from a GGUF model, or a Hugging Face `tokenizer.json` (or its folder).
pub fn tokenize(a: TokenizeArgs) -> CmdResult {
    let in_file =
        |e: kiln_tokenizer::TokenizerError| Failure::input(format!("{}: {e}", a.model.display()));
    let is_hf = a.model.is_dir() || a.model.extension().is_some_and(|e| e == "json");
    let tokenizer = if is_hf {
        kiln_tokenizer::Tokenizer::from_hf(&a.model).map_err(in_file)?
    } else {
        let file = GgufFile::open(&a.model)?;
        kiln_tokenizer::Tokenizer::from_gguf(&file).map_err(in_file)?
    };
    let ids = tokenizer.encode(&a.text, true, true)?;
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tokenizer.token_text(id).unwrap_or("").to_string())
        .collect();
    if a.json {
        println!("{}", json!({ "token_ids": ids, "tokens": pieces }));
    } else {
        for (id, piece) in ids.iter().zip(&pieces) {
            println!("{id:>8} {piece:?}");
        }
    }
    Ok(())
}

/// A model loaded for `kiln bench`, in its steady state.
struct BenchModel {
    path: std::path::PathBuf,
    model: kiln_runtime::Model,
    load_ms: f64,
    huge_pages: Option<kiln_runtime::weights::HugePageOutcome>,
}

impl BenchModel {
    fn load(path: &Path, a: &BenchArgs) -> Result<BenchModel, Failure> {
        let started = std::time::Instant::now();
        let model = kiln_runtime::Model::load(path)?;
        let load_ms = started.elapsed().as_secs_f64() * 1000.0;
        // The steady state: the weights' merge into huge pages, which follows loading on a
        // thread of its own, would otherwise take a core from the first repetitions.
        let huge_pages = model.wait_for_huge_pages();
        let limit = model.config.context_length;
        if a.prompt_tokens.max(a.gen_tokens) > limit {
            return Err(Failure::input(format!(
                "{}: -p {} / -n {} exceed the model's context of {limit}",
                path.display(),
                a.prompt_tokens,
                a.gen_tokens
            )));
        }
        Ok(BenchModel {
            path: path.to_path_buf(),
            model,
            load_ms,
            huge_pages,
        })
    }

    /// The figures of one model in `kiln bench --json`.
    fn json(&self, r: &kiln_runtime::bench::BenchResult) -> serde_json::Value {
        json!({
            "model": self.path.display().to_string(),
            "pp_tok_s": r.pp_tok_s,
            "tg_tok_s": r.tg_tok_s,
            "ttft_ms": r.ttft_ms,
            "load_ms": self.load_ms,
            "huge_pages": self.huge_pages.map(|h| json!({
                "mb": h.bytes as f64 / 1e6,
                "merged": h.merged,
                "ms_after_load": h.took.as_secs_f64() * 1000.0,
            })),
            "peak_rss_mb": r.peak_rss_bytes.map(|b| b as f64 / 1e6),
            "pp_runs": r.pp_runs,
            "tg_runs": r.tg_runs,
            "bytes_per_token": r.bytes_per_token,
            "bandwidth_gb_s": r.bandwidth_bytes_s / 1e9,
            "roofline_tok_s": r.roofline_tok_s(),
            "roofline_pct": r.roofline_pct(),
        })
    }

    fn print_loading(&self, label: &str) {
        println!("{label:<11} {}", self.path.display());
        println!("load        {:.0} ms", self.load_ms);
        if let Some(h) = self.huge_pages {
            let mb = h.bytes as f64 / 1e6;
            let ms = h.took.as_secs_f64() * 1000.0;
            if h.merged {
                println!("huge pages  {mb:.0} MB merged {ms:.0} ms after loading (measured after)");
            } else {
                println!(
                    "huge pages  {mb:.0} MB not all merged: the system refused (an older kernel, \
                     huge pages off, or none free)"
                );
            }
        }
    }
}

/// `a / b` as `1.03x (0.98-1.07 over 5 pairs)`: the median of the pairs' ratios and their range.
fn ratio_text(ratios: &[f64]) -> String {
    let (lo, hi) = ratios.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| {
        (lo.min(r), hi.max(r))
    });
    format!(
        "{:.3}x ({lo:.3}-{hi:.3} over {} pairs)",
        kiln_runtime::bench::median(ratios),
        ratios.len()
    )
}

/// `kiln bench`: medians after a warm-up, and the decode roofline; with `--against`, two
/// models measured in turns in one process, and the ratios of their pairs.
pub fn bench(a: BenchArgs) -> CmdResult {
    if a.reps == 0 {
        return Err(Failure::input("--reps must be at least 1"));
    }
    if a.prompt_tokens == 0 && a.gen_tokens == 0 {
        return Err(Failure::input("nothing to measure: -p and -n are both 0"));
    }
    let pool = threads(a.threads)?;
    let first = BenchModel::load(&a.model, &a)?;
    let cfg = kiln_runtime::bench::BenchConfig {
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        reps: a.reps,
        seed: 42,
        precision: precision(&a.precision),
    };
    // What was measured, beside the figures in `--json`.
    let settings = |out: &mut serde_json::Value| {
        out["threads"] = json!(pool.n_threads());
        out["precision"] = json!(cfg.precision.name());
        out["prompt_tokens"] = json!(a.prompt_tokens);
        out["gen_tokens"] = json!(a.gen_tokens);
        out["reps"] = json!(a.reps);
    };
    if let Some(path) = &a.against {
        let second = BenchModel::load(path, &a)?;
        let c = kiln_runtime::bench::compare(&first.model, &second.model, &pool, &cfg)?;
        let (pp, tg) = (c.pp_ratios(), c.tg_ratios());
        if a.json {
            let mut out = first.json(&c.a);
            settings(&mut out);
            out["against"] = second.json(&c.b);
            out["pp_ratio"] = json!(kiln_runtime::bench::median(&pp));
            out["pp_ratios"] = json!(pp);
            out["tg_ratio"] = json!(kiln_runtime::bench::median(&tg));
            out["tg_ratios"] = json!(tg);
            println!("{out}");
            return Ok(());
        }
        first.print_loading("model");
        second.print_loading("against");
        println!("threads     {}", pool.n_threads());
        if a.prompt_tokens > 0 {
            println!(
                "pp{:<8} {:.1} tok/s against {:.1}: {}",
                a.prompt_tokens,
                c.a.pp_tok_s,
                c.b.pp_tok_s,
                ratio_text(&pp)
            );
        }
        if a.gen_tokens > 0 {
            println!(
                "tg{:<8} {:.1} tok/s against {:.1}: {}",
                a.gen_tokens,
                c.a.tg_tok_s,
                c.b.tg_tok_s,
                ratio_text(&tg)
            );
        }
        return Ok(());
    }
    let r = kiln_runtime::bench::run(&first.model, &pool, &cfg)?;
    if a.json {
        let mut out = first.json(&r);
        settings(&mut out);
        println!("{out}");
        return Ok(());
    }
    first.print_loading("model");
    println!("threads     {}", pool.n_threads());
    if a.prompt_tokens > 0 {
        println!(
            "pp{:<8} {:.1} tok/s (median of {})",
            a.prompt_tokens, r.pp_tok_s, a.reps
        );
        println!("ttft        {:.1} ms", r.ttft_ms);
    }
    if a.gen_tokens > 0 {
        println!(
            "tg{:<8} {:.1} tok/s (median of {})",
            a.gen_tokens, r.tg_tok_s, a.reps
        );
        println!(
            "roofline    {:.1} MB read per token at {:.1} GB/s = {:.1} tok/s; reached {:.1} %",
            r.bytes_per_token as f64 / 1e6,
            r.bandwidth_bytes_s / 1e9,
            r.roofline_tok_s(),
            r.roofline_pct()
        );
    }
    if let Some(mb) = r.peak_rss_bytes.map(|b| b as f64 / 1e6) {
        println!("peak RSS    {mb:.0} MB");
    }
    Ok(())
}

/// A tensor as `kiln inspect` lists it: name, shape and type as the container states them.
struct ListedTensor {
    name: String,
    shape: Vec<u64>,
    ty: String,
    bytes: u64,
}

/// What `kiln inspect` shows of a kiln package, in the form [`inspect`] prints.
fn inspect_package(path: &Path) -> Result<Inspected, Failure> {
    let package = kiln_runtime::package::open(path, kiln_runtime::package::verify_on_open())?;
    let m = package.manifest();
    let tokenizer = match kiln_runtime::package::tokenizer(&package) {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err("the package carries no tokenizer".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let listed: Vec<ListedTensor> = m
        .tensors
        .iter()
        .map(|t| ListedTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.format.clone(),
            bytes: t.length,
        })
        .collect();
    let format = format!(
        "kiln package version {}, {} shard(s), quant {} from {}",
        m.format_version,
        m.shards.len(),
        m.conversion.quant,
        m.source.format
    );
    let config = kiln_runtime::package::config(&package);
    Ok((
        format,
        None,
        m.architecture.clone(),
        None,
        config,
        tokenizer,
        listed,
    ))
}

/// Format, GGUF version, architecture, name, description, tokenizer and tensors of a model.
type Inspected = (
    String,
    Option<u32>,
    String,
    Option<String>,
    Result<kiln_runtime::ModelConfig, ModelError>,
    Result<kiln_tokenizer::Tokenizer, String>,
    Vec<ListedTensor>,
);

/// `kiln inspect`: a GGUF file, a kiln package, or a Hugging Face folder (whose tensors are
/// listed under their checkpoint names, shapes outermost first).
pub fn inspect(a: InspectArgs) -> CmdResult {
    let package = kiln_runtime::package::is_package(&a.model);
    let (format, gguf_version, arch, name, config, tokenizer, listed) = if package {
        inspect_package(&a.model)?
    } else if a.model.is_dir() {
        let (json, config_path) = kiln_runtime::hf::read_config(&a.model)?;
        let config = kiln_runtime::hf::config_from_json(&json, &config_path);
        // The runtime's family name (gemma3 for gemma3_text), which picks built-in templates.
        let arch = match &config {
            Ok(c) => c.architecture.clone(),
            Err(_) => json
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .to_string(),
        };
        let weights = kiln_format::safetensors::ShardedSafetensors::open_dir(&a.model)?;
        let tokenizer = if a.model.join(kiln_runtime::hf::TOKENIZER_FILE).is_file() {
            kiln_tokenizer::Tokenizer::from_hf(&a.model).map_err(|e| e.to_string())
        } else {
            Err("the folder has no tokenizer.json".to_string())
        };
        let listed: Vec<ListedTensor> = weights
            .tensors()
            .map(|(_, t)| ListedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                ty: t.dtype.name().to_string(),
                bytes: t.n_bytes(),
            })
            .collect();
        let format = format!(
            "Hugging Face folder, {} safetensors file(s)",
            weights.files().len()
        );
        let name = json
            .get("_name_or_path")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        (format, None, arch, name, config, tokenizer, listed)
    } else {
        kiln_runtime::hf::refuse_weights_file(&a.model)?;
        let file = GgufFile::open(&a.model)?;
        let arch = file.architecture()?.to_string();
        let config = kiln_runtime::arch::config_from_gguf(&file);
        let tokenizer = kiln_tokenizer::Tokenizer::from_gguf(&file).map_err(|e| e.to_string());
        let listed: Vec<ListedTensor> = file
            .tensors()
            .iter()
            .map(|t| ListedTensor {
                name: t.name.clone(),
                shape: t.dims.clone(),
                ty: t.ty.name().to_string(),
                bytes: t.n_bytes,
            })
            .collect();
        let name = file
            .get_str("general.name")
            .ok()
            .flatten()
            .map(str::to_string);
        let version = file.version();
        (
            format!("GGUF version {version}"),
            Some(version),
            arch,
            name,
            config,
            tokenizer,
            listed,
        )
    };
    let n_params: u64 = listed.iter().map(|t| t.shape.iter().product::<u64>()).sum();
    let tensor_bytes: u64 = listed.iter().map(|t| t.bytes).sum();
    let tensors: Vec<_> = listed
        .iter()
        .map(|t| json!({"name": t.name, "shape": t.shape, "type": t.ty, "bytes": t.bytes}))
        .collect();
    let hyper = match &config {
        Ok(c) => json!({
            "n_layers": c.n_layers, "n_embd": c.n_embd, "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "n_ff": c.n_ff,
            "vocab_size": c.vocab_size, "context_length": c.context_length,
            "rms_eps": c.rms_eps, "rope_dim": c.rope_dim,
            "rope_style": format!("{:?}", c.rope_style),
            "rope_base": c.layers.iter().map(|l| l.rope_base).collect::<Vec<_>>(),
            "sliding_window": c.layers.iter().map(|l| l.sliding_window).collect::<Vec<_>>(),
            "activation": format!("{:?}", c.activation),
            "qk_norm": c.qk_norm, "post_norms": c.post_norms, "qkv_bias": c.qkv_bias,
            "embedding_scale": c.embedding_scale,
        }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    let tok = match &tokenizer {
        Ok(t) => {
            let special = |id: Option<u32>| id.map(|i| json!({"id": i, "text": t.token_text(i)}));
            json!({
                "kind": t.kind(),
                "vocab_size": t.vocab_size(),
                "bos": special(t.bos_id()),
                "eos": special(t.eos_id()),
                "add_bos": t.add_bos(),
                "stop_tokens": t.stop_ids().iter().map(|&i| json!({"id": i, "text": t.token_text(i)})).collect::<Vec<_>>(),
                "chat_template": t.chat_template().is_some(),
                "builtin_chat_template": t.chat_template().is_none()
                    && kiln_tokenizer::chat::ChatTemplate::builtin(&arch, "", "").is_some(),
            })
        }
        Err(e) => json!({ "error": e.to_string() }),
    };
    if a.json {
        let obj = json!({
            "file": a.model.display().to_string(),
            "format": format,
            "gguf_version": gguf_version,
            "architecture": arch,
            "name": name,
            "parameters": n_params,
            "tensor_bytes": tensor_bytes,
            "hyperparameters": hyper,
            "tokenizer": tok,
            "tensors": tensors,
        });
        println!("{obj}");
        return Ok(());
    }
    println!("file          {}", a.model.display());
    match gguf_version {
        Some(v) => println!("gguf version  {v}"),
        None => println!("format        {format}"),
    }
    println!("architecture  {arch}");
    if let Some(name) = &name {
        println!("name          {name}");
    }
    println!(
        "parameters    {} ({:.1} M), {:.1} MB of tensors",
        n_params,
        n_params as f64 / 1e6,
        tensor_bytes as f64 / 1e6
    );
    match &config {
        Ok(c) => {
            println!(
                "layers {} | hidden {} | heads {} (kv {}) x {} | ffn {} | vocab {} | context {}",
                c.n_layers,
                c.n_embd,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.n_ff,
                c.vocab_size,
                c.context_length
            );
            let windows: Vec<String> = c
                .layers
                .iter()
                .map(|l| match l.sliding_window {
                    Some(w) => format!("local{w}"),
                    None => "global".into(),
                })
                .collect();
            println!(
                "rope {:?} dim {} | activation {:?} | qk-norm {} | post-norms {} | layers: {}",
                c.rope_style,
                c.rope_dim,
                c.activation,
                c.qk_norm,
                c.post_norms,
                summarize_runs(&windows)
            );
        }
        Err(e) => println!("model         not runnable here: {e}"),
    }
    match &tokenizer {
        Ok(t) => {
            let show = |id: Option<u32>| match id {
                Some(i) => format!("{i} {:?}", t.token_text(i).unwrap_or("")),
                None => "none".into(),
            };
            println!(
                "tokenizer     {} | {} tokens | bos {} | eos {} | add_bos {} | chat template: {}",
                t.kind(),
                t.vocab_size(),
                show(t.bos_id()),
                show(t.eos_id()),
                t.add_bos(),
                match (
                    t.chat_template().is_some(),
                    kiln_tokenizer::chat::ChatTemplate::builtin(&arch, "", "").is_some(),
                ) {
                    (true, _) => "in file",
                    (false, true) => "none in file, kiln's built-in one for the family is used",
                    (false, false) => "none",
                }
            );
            let stops: Vec<String> = t.stop_ids().iter().map(|&i| show(Some(i))).collect();
            println!("stop tokens   {}", stops.join(", "));
        }
        Err(e) => println!("tokenizer     unavailable: {e}"),
    }
    println!();
    println!(
        "{:<40} {:>24} {:>6} {:>12}",
        "tensor", "shape", "type", "bytes"
    );
    for t in &listed {
        let shape = format!("{:?}", t.shape);
        println!("{:<40} {:>24} {:>6} {:>12}", t.name, shape, t.ty, t.bytes);
    }
    Ok(())
}

/// "a, a, b" → "2×a, b".
fn summarize_runs(items: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let mut j = i;
        while j < items.len() && items[j] == items[i] {
            j += 1;
        }
        out.push(if j - i > 1 {
            format!("{}×{}", j - i, items[i])
        } else {
            items[i].clone()
        });
        i = j;
    }
    out.join(", ")
}
