//! `kiln`: import, compile, verify and run language models on devices.
//!
//! The binary only parses arguments and prints results; the work happens in the library crates.
//! Exit codes: 0 success, 2 bad input (with a message), 1 a failed check (`kiln validate`) or
//! an internal error.

mod commands;
mod convert_commands;
mod coreml_commands;
mod export_commands;
mod hub_source;
mod mlpackage_commands;
mod validate_commands;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// kiln: put language models on devices.
#[derive(Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Open kiln packages without checking their shards' sha256 (faster; damage goes
    /// unnoticed).
    #[arg(long, global = true)]
    no_verify: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Run(RunArgs),
    /// Chat interactively: each line on stdin is a user turn (/reset, /exit).
    Chat(ChatArgs),
    /// Write the logits after the last prompt token as float32 little-endian.
    Logits(LogitsArgs),
    /// Perplexity of a text, in chunks.
    Perplexity(PerplexityArgs),
    /// Show how a text tokenizes.
    Tokenize(TokenizeArgs),
    /// Measure prompt and generation speed, time to first token, load time, memory.
    Bench(BenchArgs),
    /// Describe a model file: architecture, sizes, tensors, tokenizer.
    Inspect(InspectArgs),
    /// Run a Core ML package on the CPU: each call of a JSON calls file, states carried.
    Predict(coreml_commands::PredictArgs),
    /// Check a package without running it: a Core ML .mlpackage or a kiln package (exit 2
    /// naming the op, blob, shard or tensor at fault).
    Verify(coreml_commands::VerifyArgs),
    /// Convert a model into a kiln package (or a GGUF file, or a Hugging Face folder):
    /// `kiln convert SRC -o OUT.kiln [--quant Q] [--to kiln|gguf|safetensors]`.
    Convert(convert_commands::ConvertArgs),
    /// Convert a model for a device: `kiln export coreml SRC -o OUT.mlpackage`.
    Export(export_commands::ExportArgs),
    /// Check a converted model against its source (logits cosine, KL, top-1, perplexity), or
    /// one model's fp16 activation ranges (--fp16); exit 1 when a check fails.
    Validate(validate_commands::ValidateArgs),
    /// Where Core ML runs each op of a package (CPU, GPU, Neural Engine): Apple platforms only.
    Residency(mlpackage_commands::ResidencyArgs),
}

/// Where the prompt comes from.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct PromptSource {
    /// The prompt text.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A file whose bytes are the prompt, exactly (no trimming).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// A JSON list of {"role", "content"} messages; implies --chat.
    #[arg(long)]
    pub messages: Option<PathBuf>,
}

/// Arguments of `kiln run`.
#[derive(Args)]
pub struct RunArgs {
    /// The model: a GGUF file, a Hugging Face folder, a kiln package or a Core ML .mlpackage.
    pub model: PathBuf,
    #[command(flatten)]
    pub source: PromptSource,
    /// Render the prompt with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Threads to compute with (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Keep generating past end-of-sequence and end-of-turn tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Activation precision of the matrix products: refined (default; 8-bit plus an 8-bit
    /// residual), int8, or exact (f32 activations, weights dequantized exactly).
    #[arg(long, default_value = "refined", value_parser = ["refined", "int8", "exact"])]
    pub precision: String,
    #[command(flatten)]
    pub package: mlpackage_commands::PackageArgs,
}

/// The sampling chain's settings (llama.cpp's defaults).
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise tokens seen in the last --repeat-last-n tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Subtract F times a token's count in the window (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Subtract P from every token present in the window (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Seed of the sampler (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Arguments of `kiln chat`.
#[derive(Args)]
pub struct ChatArgs {
    /// The model: a GGUF file or a Hugging Face folder.
    pub model: PathBuf,
    /// A system message for the whole conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Positions the conversation may use (default: the model's context, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Threads to compute with (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Activation precision of the matrix products: refined (default; 8-bit plus an 8-bit
    /// residual), int8, or exact (f32 activations, weights dequantized exactly).
    #[arg(long, default_value = "refined", value_parser = ["refined", "int8", "exact"])]
    pub precision: String,
}

/// Arguments of `kiln logits`.
#[derive(Args)]
pub struct LogitsArgs {
    /// The model: a GGUF file, a Hugging Face folder, a kiln package or a Core ML .mlpackage.
    pub model: PathBuf,
    #[command(flatten)]
    pub input: LogitsInput,
    /// Render the prompt with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Where to write the logits (float32 little-endian).
    #[arg(long)]
    pub out: PathBuf,
    /// Threads to compute with (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Activation precision of the matrix products: refined (default; 8-bit plus an 8-bit
    /// residual), int8, or exact (f32 activations, weights dequantized exactly).
    #[arg(long, default_value = "refined", value_parser = ["refined", "int8", "exact"])]
    pub precision: String,
    #[command(flatten)]
    pub package: mlpackage_commands::PackageArgs,
}

/// Input of `kiln logits`: text, or token ids directly.
#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
pub struct LogitsInput {
    /// The prompt text.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A file whose bytes are the prompt, exactly.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// A JSON list of {"role", "content"} messages; implies --chat.
    #[arg(long)]
    pub messages: Option<PathBuf>,
    /// Comma-separated token ids, used as they are.
    #[arg(long, value_delimiter = ',')]
    pub token_ids: Option<Vec<u32>>,
}

/// Arguments of `kiln perplexity`.
#[derive(Args)]
pub struct PerplexityArgs {
    /// The model: a GGUF file, a Hugging Face folder, a kiln package or a Core ML .mlpackage.
    pub model: PathBuf,
    /// The text to score.
    #[arg(long)]
    pub text_file: PathBuf,
    /// Positions per chunk (BOS included for models that add one).
    #[arg(long, default_value_t = 256)]
    pub ctx: usize,
    /// Threads to compute with (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Activation precision of the matrix products: refined (default; 8-bit plus an 8-bit
    /// residual), int8, or exact (f32 activations, weights dequantized exactly).
    #[arg(long, default_value = "refined", value_parser = ["refined", "int8", "exact"])]
    pub precision: String,
    #[command(flatten)]
    pub package: mlpackage_commands::PackageArgs,
}

/// Arguments of `kiln tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// The model file (GGUF), or a Hugging Face tokenizer.json or folder holding one.
    pub model: PathBuf,
    /// The text to tokenize (BOS rules as for `kiln run --prompt`).
    #[arg(long)]
    pub text: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The model: a GGUF file or a Hugging Face folder.
    pub model: PathBuf,
    /// Prompt tokens of the prompt-processing test (0: skip it).
    #[arg(short = 'p', long = "prompt-tokens", default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens of the generation test (0: skip it).
    #[arg(short = 'n', long = "gen-tokens", default_value_t = 64)]
    pub gen_tokens: usize,
    /// Threads to compute with (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Measured repetitions of each test, after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Activation precision of the matrix products: refined (default; 8-bit plus an 8-bit
    /// residual), int8, or exact (f32 activations, weights dequantized exactly).
    #[arg(long, default_value = "refined", value_parser = ["refined", "int8", "exact"])]
    pub precision: String,
    /// A second model to measure in turns with the first, in the same process: every
    /// repetition runs on both back to back, and the ratios of the pairs are reported
    /// (first over second), which a shared host's slow phases move far less than runs in
    /// separate processes.
    #[arg(long, value_name = "MODEL")]
    pub against: Option<PathBuf>,
}

/// Arguments of `kiln inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// The model: a GGUF file or a Hugging Face folder.
    pub model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    quiet_on_closed_stdout();
    if let Err((code, message)) = hub_source::resolve(&mut cli.command) {
        eprintln!("kiln: {message}");
        return ExitCode::from(code);
    }
    kiln_runtime::package::set_verify_on_open(!cli.no_verify);
    // A panic is a bug: report it as an internal error (exit 1), never as a crash code.
    let outcome = std::panic::catch_unwind(|| match cli.command {
        Command::Run(a) if is_mlpackage(&a.model) => mlpackage_commands::run(a),
        Command::Run(a) => commands::run(a),
        Command::Chat(a) if is_mlpackage(&a.model) => Err(not_for_mlpackage("chat", &a.model)),
        Command::Chat(a) => commands::chat(a),
        Command::Logits(a) if is_mlpackage(&a.model) => mlpackage_commands::logits(a),
        Command::Logits(a) => commands::logits(a),
        Command::Perplexity(a) if is_mlpackage(&a.model) => mlpackage_commands::perplexity(a),
        Command::Perplexity(a) => commands::perplexity(a),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::Bench(a) if is_mlpackage(&a.model) => Err(not_for_mlpackage("bench", &a.model)),
        Command::Bench(a) => commands::bench(a),
        Command::Inspect(a) if is_mlpackage(&a.model) => {
            Err(not_for_mlpackage("inspect", &a.model))
        }
        Command::Inspect(a) => commands::inspect(a),
        Command::Predict(a) => coreml_commands::predict(a),
        Command::Verify(a) if convert_commands::is_kiln_package(&a.package) => {
            convert_commands::verify(&a.package, a.json)
        }
        Command::Verify(a) => coreml_commands::verify(a),
        Command::Convert(a) => convert_commands::convert(a),
        Command::Export(a) => export_commands::export(a),
        Command::Validate(a) => validate_commands::validate(a),
        Command::Residency(a) => mlpackage_commands::residency(a),
    });
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("kiln: {}", e.message);
            ExitCode::from(e.code)
        }
        Err(_) => {
            eprintln!("kiln: internal error (this is a bug in kiln)");
            ExitCode::from(1)
        }
    }
}

fn is_mlpackage(path: &std::path::Path) -> bool {
    kiln_coreml::cli_support::is_mlpackage(path)
}

/// The commands that do not take Core ML packages say so, pointing at those that do.
fn not_for_mlpackage(command: &str, path: &std::path::Path) -> commands::Failure {
    commands::Failure::input(format!(
        "{}: kiln {command} does not take Core ML packages; kiln run, logits, predict and verify do",
        path.display()
    ))
}

/// When the reader of stdout goes away (`kiln inspect MODEL | head`), printing fails with a
/// broken pipe; like other Unix tools, stop quietly then instead of reporting a bug.
fn quiet_on_closed_stdout() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
}
