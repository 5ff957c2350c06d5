//! `kiln run`, `kiln logits` and `kiln residency` on Core ML packages: thin wrappers over
//! `kiln_coreml::CoremlSession`, computed by kiln's reference executor (any platform) or by
//! Core ML itself through `kiln_coreml_apple` (Apple platforms; elsewhere it says so).

use crate::commands::{self, Failure, PromptEncoder};
use crate::{LogitsArgs, PerplexityArgs, RunArgs};
use clap::{Args, ValueEnum};
use kiln_coreml::{CoreMlError, CoremlSession};
use kiln_coreml_apple::AppleError;
use kiln_format::gguf::GgufFile;
use kiln_runtime::generate::GenerateOptions;
use kiln_tokenizer::chat::{ChatTemplate, Message};
use kiln_tokenizer::Tokenizer;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What computes a Core ML package.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// kiln's reference executor: the package's program on the CPU, on any platform.
    Reference,
    /// Apple's Core ML framework (macOS 15 / iOS 18 and later).
    Coreml,
}

/// The devices Core ML may use (`MLComputeUnits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ComputeUnits {
    /// CPU, GPU and Neural Engine.
    All,
    /// CPU and GPU.
    CpuGpu,
    /// CPU and Neural Engine.
    CpuNe,
    /// CPU only.
    Cpu,
}

/// Options for models given as Core ML packages (`.mlpackage` folders).
#[derive(Args, Clone)]
pub struct PackageArgs {
    /// For a Core ML package without a tokenizer of its own: the tokenizer to use, from the
    /// source model (a GGUF file, a tokenizer.json or a folder holding one).
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,
    /// What runs a Core ML package: kiln's reference executor (any platform) or Core ML
    /// (Apple platforms only).
    #[arg(long, value_enum, default_value = "reference")]
    pub backend: Backend,
    /// The devices Core ML may use (with --backend coreml).
    #[arg(long, value_enum, default_value = "all")]
    pub compute_units: ComputeUnits,
}

/// Arguments of `kiln residency`.
#[derive(Args)]
pub struct ResidencyArgs {
    /// The Core ML package.
    pub package: PathBuf,
    /// The devices Core ML may use.
    #[arg(long, value_enum, default_value = "all")]
    pub compute_units: ComputeUnits,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn coreml_failure(e: CoreMlError) -> Failure {
    Failure::input(e.to_string())
}

/// Refuses options that only apply to Core ML packages when the model is something else.
pub fn refuse_package_args(model: &Path, p: &PackageArgs) -> Result<(), Failure> {
    let given = if p.tokenizer.is_some() {
        Some("--tokenizer")
    } else if p.backend != Backend::Reference {
        Some("--backend")
    } else if p.compute_units != ComputeUnits::All {
        Some("--compute-units")
    } else {
        None
    };
    match given {
        Some(flag) => Err(Failure::input(format!(
            "{flag} applies to Core ML packages (.mlpackage folders); {} is not one",
            model.display()
        ))),
        None => Ok(()),
    }
}

/// A Core ML failure; off Apple platforms, with what works here instead.
fn apple_failure(e: AppleError, instead: &str) -> Failure {
    match e {
        AppleError::Unavailable { .. } => Failure::input(format!("{e}. {instead}")),
        AppleError::CoreMl(e) => coreml_failure(e),
    }
}

/// A tokenizer with the chat template that goes with it.
struct PackageText {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    architecture: String,
}

impl PromptEncoder for PackageText {
    fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, Failure> {
        Ok(self.tokenizer.encode(text, true, true)?)
    }

    /// As `ModelBundle::encode_chat`: special tokens parsed, BOS added when the model asks
    /// for it and the template did not write it, no EOS after the assistant's turn opener.
    fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, Failure> {
        let template = self.template.as_ref().ok_or_else(|| {
            Failure::input(format!(
                "the tokenizer carries no chat template and kiln has none built in for '{}'",
                self.architecture
            ))
        })?;
        let text = template.render(messages, true)?;
        let mut ids = self.tokenizer.encode(&text, false, true)?;
        if self.tokenizer.add_bos() {
            if let Some(bos) = self.tokenizer.bos_id() {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }
}

/// The tokenizer for a package: `--tokenizer` when given, else the package's own; `None`
/// when there is neither.
fn package_text(
    package: &Path,
    info: &kiln_coreml::PackageInfo,
    borrowed: Option<&Path>,
) -> Result<Option<PackageText>, Failure> {
    let in_file = |p: &Path, e: kiln_tokenizer::TokenizerError| {
        Failure::input(format!("{}: {e}", p.display()))
    };
    let (tokenizer, architecture) = match borrowed {
        Some(p) => {
            let is_hf = p.is_dir() || p.extension().is_some_and(|e| e == "json");
            if is_hf {
                (Tokenizer::from_hf(p).map_err(|e| in_file(p, e))?, None)
            } else {
                let file = GgufFile::open(p)?;
                let arch = file.architecture().ok().map(str::to_string);
                (
                    Tokenizer::from_gguf(&file).map_err(|e| in_file(p, e))?,
                    arch,
                )
            }
        }
        None => match info
            .tokenizer(&package.display().to_string())
            .map_err(coreml_failure)?
        {
            Some(t) => (t, None),
            None => return Ok(None),
        },
    };
    let architecture = info
        .architecture
        .clone()
        .or(architecture)
        .unwrap_or_default();
    let template = tokenizer
        .chat_renderer(&architecture)
        .map_err(|e| Failure::input(format!("{}: chat template: {e}", package.display())))?;
    Ok(Some(PackageText {
        tokenizer,
        template,
        architecture,
    }))
}

fn no_tokenizer(package: &Path) -> String {
    format!(
        "{}: the package carries no tokenizer; pass --tokenizer PATH (the source model's GGUF file or tokenizer.json) or, for kiln logits, --token-ids",
        package.display()
    )
}

/// `kiln run PKG.mlpackage`.
pub fn run(a: RunArgs) -> Result<(), Failure> {
    let sampler = commands::sampler_config(&a.sampling)?;
    let started = Instant::now();
    let mut session = open_session(&a.model, &a.package)?;
    let text = package_text(&a.model, session.info(), a.package.tokenizer.as_deref())?
        .ok_or_else(|| Failure::input(no_tokenizer(&a.model)))?;
    let chat = a.chat || a.source.messages.is_some();
    let prompt = commands::prompt_ids(&text, &a.source, chat, a.system.as_deref())?;
    let needed = prompt.len() + a.n_predict;
    let context = session.n_ctx();
    if needed > context {
        return Err(Failure::input(format!(
            "{}: the prompt ({} tokens) plus -n {} need {needed} positions, more than the package's context of {context}",
            a.model.display(),
            prompt.len(),
            a.n_predict
        )));
    }
    if !session.has_logits() && !sampler.is_greedy() {
        return Err(Failure::input(format!(
            "{}: the package returns only the most likely token (next_token), so it can only decode greedily: pass --temperature 0",
            a.model.display()
        )));
    }
    // The tokenizer's own stop tokens and those the package names.
    let mut stop_ids = text.tokenizer.stop_ids();
    stop_ids.extend(&session.info().stop_ids);
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let options = GenerateOptions {
        max_tokens: a.n_predict,
        sampler,
        stop_ids,
        stop_strings: a.stop.clone(),
        ignore_eos: a.ignore_eos,
    };
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    let backend = session.backend();
    commands::generate_and_print(
        &mut session,
        &text.tokenizer,
        &prompt,
        &options,
        a.json,
        load_ms,
        &backend,
    )
}

/// `kiln logits PKG.mlpackage`: the logits after the last token, float32 little-endian.
pub fn logits(a: LogitsArgs) -> Result<(), Failure> {
    if a.input.token_ids.is_some() && a.package.tokenizer.is_some() {
        return Err(Failure::input(
            "--tokenizer does not apply to --token-ids (the ids are used as they are)",
        ));
    }
    let mut session = open_session(&a.model, &a.package)?;
    let text = match a.input.token_ids {
        Some(_) => None,
        None => package_text(&a.model, session.info(), a.package.tokenizer.as_deref())?,
    };
    let ids = commands::logits_ids(&a, text.as_ref(), || no_tokenizer(&a.model))?;
    let logits = session.forward_last(&ids).map_err(coreml_failure)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    commands::write_atomic(&a.out, &bytes)?;
    println!("{}", json!({ "prompt_token_ids": ids }));
    Ok(())
}

/// `kiln perplexity PKG.mlpackage`: the package's own logits scored on a text, chunk by
/// chunk as for any model (`--ctx` at most the package's context).
pub fn perplexity(a: PerplexityArgs) -> Result<(), Failure> {
    let text = commands::read_text_file(&a.text_file, "the text file")?;
    let mut session = open_session(&a.model, &a.package)?;
    if !session.has_logits() {
        return Err(Failure::input(format!(
            "{}: the package returns only the most likely token (next_token), not the logits perplexity needs",
            a.model.display()
        )));
    }
    let encoder = package_text(&a.model, session.info(), a.package.tokenizer.as_deref())?
        .ok_or_else(|| Failure::input(no_tokenizer(&a.model)))?;
    let tokenizer = &encoder.tokenizer;
    let tokens = tokenizer.encode(&text, false, false)?;
    let bos = tokenizer.add_bos().then(|| tokenizer.bos_id()).flatten();
    let started = Instant::now();
    let p = kiln_runtime::perplexity::perplexity_of(&mut session, &tokens, a.ctx, bos)
        .map_err(|e| Failure::input(format!("{}: {e}", a.model.display())))?;
    commands::print_perplexity(&p, a.ctx, bos, started.elapsed().as_secs_f64(), a.json);
    Ok(())
}

/// `kiln residency PKG.mlpackage`: where Core ML places each op.
pub fn residency(a: ResidencyArgs) -> Result<(), Failure> {
    require_package(&a.package)?;
    let report = kiln_coreml_apple::residency(&a.package, apple_units(a.compute_units))
        .map_err(|e| {
            apple_failure(
                e,
                "kiln verify checks a package here, and kiln run and kiln logits run it with kiln's reference executor",
            )
        })?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(())
}

fn require_package(path: &Path) -> Result<(), Failure> {
    if kiln_coreml::cli_support::is_mlpackage(path) {
        Ok(())
    } else {
        Err(Failure::input(format!(
            "{}: not a Core ML package (an .mlpackage folder with Manifest.json)",
            path.display()
        )))
    }
}

fn apple_units(u: ComputeUnits) -> kiln_coreml_apple::ComputeUnits {
    match u {
        ComputeUnits::All => kiln_coreml_apple::ComputeUnits::All,
        ComputeUnits::CpuGpu => kiln_coreml_apple::ComputeUnits::CpuAndGpu,
        ComputeUnits::CpuNe => kiln_coreml_apple::ComputeUnits::CpuAndNeuralEngine,
        ComputeUnits::Cpu => kiln_coreml_apple::ComputeUnits::CpuOnly,
    }
}

/// Opens a package for `run` and `logits` with the chosen backend.
fn open_session(path: &Path, p: &PackageArgs) -> Result<CoremlSession, Failure> {
    match p.backend {
        Backend::Reference => CoremlSession::open(path).map_err(coreml_failure),
        Backend::Coreml => kiln_coreml_apple::open_session(path, apple_units(p.compute_units))
            .map_err(|e| {
                apple_failure(
                    e,
                    "kiln's reference executor runs packages anywhere: use --backend reference (the default)",
                )
            }),
    }
}
