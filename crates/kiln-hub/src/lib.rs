//! Hugging Face hub sources: `hf:ORG/NAME[@REV]` becomes a local model folder.
//!
//! The files kiln reads (config, generation config, tokenizer, safetensors weights and their
//! index) are fetched into the standard hub cache (`models--ORG--NAME/{blobs,snapshots,refs}`,
//! shared with other Hugging Face tools) through the `hf-hub` crate, and the snapshot folder is
//! returned: it opens like any other Hugging Face folder. Nothing else of the repository is
//! downloaded.
//!
//! The environment is read as the Python `huggingface_hub` reads it: `HF_ENDPOINT` (default
//! `https://huggingface.co`), `HF_TOKEN` (else the token file under `HF_HOME`), `HF_HUB_CACHE`
//! or `HF_HOME` for the cache, and `HF_HUB_OFFLINE=1` to use the cache only.
//!
//! This is its own crate so that the runtime, which only executes, carries no HTTP or TLS code.

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use std::collections::BTreeSet;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// The prefix that marks a model argument as a hub source.
pub const SCHEME: &str = "hf:";

/// The hub used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

const CONFIG: &str = "config.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
/// Optional files: a model runs without them, but they carry its tokenizer and defaults.
const OPTIONAL: [&str; 3] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// Why a hub source could not be turned into a local folder. Every case is the user's input or
/// environment, never a bug in kiln.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The text after `hf:` is not `ORG/NAME[@REV]`.
    #[error("{0:?} is not a Hugging Face model: write hf:ORG/NAME or hf:ORG/NAME@REVISION")]
    BadSource(String),
    /// The hub could not be reached and the cache holds no complete copy.
    #[error("cannot reach {endpoint} ({reason}) and {model} is not in the cache at {}", cache.display())]
    Unreachable {
        /// The hub.
        endpoint: String,
        /// The model.
        model: HubSource,
        /// What the connection attempt reported.
        reason: String,
        /// The cache looked in.
        cache: PathBuf,
    },
    /// `HF_HUB_OFFLINE` is set and the cache holds no complete copy.
    #[error("HF_HUB_OFFLINE is set and {model} is not in the cache at {}", cache.display())]
    NotCached {
        /// The model.
        model: HubSource,
        /// The cache looked in.
        cache: PathBuf,
    },
    /// HTTP 401 or 403.
    #[error("{endpoint} refused access to {model} (HTTP {status}{detail}): {}", if *.token_set {
        "the token in HF_TOKEN cannot read it (gated models also need their terms accepted)"
    } else {
        "it is private or gated, or does not exist; set HF_TOKEN to a token that can read it"
    })]
    Unauthorized {
        /// The hub.
        endpoint: String,
        /// The model.
        model: HubSource,
        /// 401 or 403.
        status: u16,
        /// The hub's own explanation, as ": …", or empty.
        detail: String,
        /// Whether a token was sent.
        token_set: bool,
    },
    /// HTTP 404: no such repository, revision or file.
    #[error("{model}: no such model or revision on {endpoint} (HTTP 404{detail})")]
    NotFound {
        /// The hub.
        endpoint: String,
        /// The model.
        model: HubSource,
        /// The hub's own explanation, as ": …", or empty.
        detail: String,
    },
    /// The repository lacks a file kiln cannot run without.
    #[error("{model} on {endpoint} has no {missing}; kiln runs Hugging Face models from config.json and safetensors weights")]
    Incomplete {
        /// The hub.
        endpoint: String,
        /// The model.
        model: HubSource,
        /// What is missing.
        missing: &'static str,
    },
    /// Any other HTTP failure, or an answer kiln cannot use.
    #[error("{model} on {endpoint}: {message}")]
    Hub {
        /// The hub.
        endpoint: String,
        /// The model.
        model: HubSource,
        /// What went wrong.
        message: String,
    },
    /// The cache could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No cache location: none of `HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`, `HOME` is set.
    #[error("no Hugging Face cache folder: set HF_HUB_CACHE or HF_HOME")]
    NoCacheDir,
}

/// A model on the hub: `ORG/NAME` at a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    /// `ORG/NAME`.
    pub repo: String,
    /// Branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl fmt::Display for HubSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.revision == "main" {
            write!(f, "{}", self.repo)
        } else {
            write!(f, "{}@{}", self.repo, self.revision)
        }
    }
}

impl HubSource {
    /// `None` when `text` does not start with `hf:`; otherwise the parsed source, or
    /// [`HubError::BadSource`].
    pub fn parse(text: &str) -> Option<Result<HubSource, HubError>> {
        let rest = text.strip_prefix(SCHEME)?;
        let bad = || HubError::BadSource(text.to_string());
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (rest, "main"),
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let repo_ok = match repo.split_once('/') {
            Some((org, name)) => name_ok(org) && name_ok(name),
            None => false,
        };
        // Revisions may hold '/' (refs/pr/1) and become paths under refs/: keep them inside.
        let revision_ok =
            !revision.is_empty() && !revision.starts_with('/') && revision.split('/').all(name_ok);
        if !repo_ok || !revision_ok {
            return Some(Err(bad()));
        }
        Some(Ok(HubSource {
            repo: repo.to_string(),
            revision: revision.to_string(),
        }))
    }
}

/// Where and how to fetch: the hub, the cache, the token, offline or not.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The hub's base URL, without a trailing `/`.
    pub endpoint: String,
    /// The hub cache folder (holding `models--ORG--NAME`).
    pub cache: PathBuf,
    /// Sent as `Authorization: Bearer …`.
    pub token: Option<String>,
    /// Use the cache only.
    pub offline: bool,
    /// Draw download progress bars on stderr.
    pub progress: bool,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubSettings {
    /// Settings from the environment variables the Hugging Face tools share; progress bars
    /// only when stderr is a terminal.
    pub fn from_env() -> Result<HubSettings, HubError> {
        let hf_home = env_nonempty("HF_HOME").map(PathBuf::from).or_else(|| {
            env_nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env_nonempty("HOME").map(|h| Path::new(&h).join(".cache")))
                .map(|c| c.join("huggingface"))
        });
        let cache = match env_nonempty("HF_HUB_CACHE") {
            Some(c) => PathBuf::from(c),
            None => hf_home.as_ref().ok_or(HubError::NoCacheDir)?.join("hub"),
        };
        let token = env_nonempty("HF_TOKEN").or_else(|| {
            let text = std::fs::read_to_string(hf_home.as_ref()?.join("token")).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        let endpoint = env_nonempty("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        Ok(HubSettings {
            endpoint,
            cache,
            token,
            offline,
            progress: std::io::stderr().is_terminal(),
        })
    }
}

/// If `arg` is a hub source (`hf:…`) and no local file of that name exists, fetches it with
/// settings from the environment and returns the local folder; `Ok(None)` for local paths.
pub fn resolve_arg(arg: &Path) -> Result<Option<PathBuf>, HubError> {
    let Some(text) = arg.to_str() else {
        return Ok(None);
    };
    if arg.exists() {
        return Ok(None);
    }
    match HubSource::parse(text) {
        None => Ok(None),
        Some(source) => fetch(&source?, &HubSettings::from_env()?).map(Some),
    }
}

/// Makes sure the files kiln needs of `source` are in the cache and returns the snapshot
/// folder holding them. Online, the revision is resolved on the hub and only missing files
/// are downloaded; when the hub cannot be reached, or offline, a complete cached snapshot is
/// used.
pub fn fetch(source: &HubSource, settings: &HubSettings) -> Result<PathBuf, HubError> {
    let repo_dir = settings
        .cache
        .join(format!("models--{}", source.repo.replace('/', "--")));
    if settings.offline {
        return cached_snapshot(&repo_dir, &source.revision).ok_or_else(|| HubError::NotCached {
            model: source.clone(),
            cache: settings.cache.clone(),
        });
    }
    let api = ApiBuilder::new()
        .with_endpoint(settings.endpoint.clone())
        .with_cache_dir(settings.cache.clone())
        .with_token(settings.token.clone())
        .with_progress(settings.progress)
        .build()
        .map_err(|e| classify(e, source, settings))?;
    let info = match api
        .repo(Repo::with_revision(
            source.repo.clone(),
            RepoType::Model,
            source.revision.clone(),
        ))
        .info()
    {
        Ok(info) => info,
        Err(e) => {
            return match classify(e, source, settings) {
                e @ HubError::Unreachable { .. } => {
                    cached_snapshot(&repo_dir, &source.revision).ok_or(e)
                }
                e => Err(e),
            }
        }
    };
    let commit = info.sha;
    if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(hub_error(
            source,
            settings,
            format!("odd commit id {commit:?}"),
        ));
    }
    let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let incomplete = |missing| HubError::Incomplete {
        endpoint: settings.endpoint.clone(),
        model: source.clone(),
        missing,
    };
    if !listed.contains(CONFIG) {
        return Err(incomplete("config.json"));
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    // Pinned to the commit just listed, so that a branch moving mid-download cannot mix files
    // of two commits in one folder.
    let at_commit = api.repo(Repo::with_revision(
        source.repo.clone(),
        RepoType::Model,
        commit.clone(),
    ));
    let get = |file: &str| -> Result<PathBuf, HubError> {
        let local = snapshot.join(file);
        if local.is_file() {
            return Ok(local);
        }
        at_commit
            .download(file)
            .map_err(|e| classify(e, source, settings))
    };
    let mut files: Vec<String> = std::iter::once(CONFIG)
        .chain(OPTIONAL.iter().copied().filter(|f| listed.contains(f)))
        .map(str::to_string)
        .collect();
    if listed.contains(SINGLE_WEIGHTS) {
        files.push(SINGLE_WEIGHTS.to_string());
    } else if listed.contains(WEIGHTS_INDEX) {
        let index = get(WEIGHTS_INDEX)?;
        files.extend(shards_of(&index).map_err(|m| hub_error(source, settings, m))?);
    } else {
        return Err(incomplete(
            "safetensors weights (model.safetensors or model.safetensors.index.json)",
        ));
    }
    for file in &files {
        get(file)?;
    }
    // hf-hub records the commit as a ref of itself; the standard layout names branches only.
    let _ = std::fs::remove_file(repo_dir.join("refs").join(&commit));
    if source.revision != commit {
        write_ref(&repo_dir, &source.revision, &commit)?;
    }
    Ok(snapshot)
}

fn hub_error(source: &HubSource, settings: &HubSettings, message: String) -> HubError {
    HubError::Hub {
        endpoint: settings.endpoint.clone(),
        model: source.clone(),
        message,
    }
}

/// Turns an hf-hub failure into the error a user can act on.
fn classify(e: ApiError, source: &HubSource, settings: &HubSettings) -> HubError {
    let endpoint = settings.endpoint.clone();
    let model = source.clone();
    match e {
        ApiError::TooManyRetries(inner) => classify(*inner, source, settings),
        ApiError::IoError(e) => HubError::Io {
            path: settings.cache.clone(),
            source: e,
        },
        ApiError::RequestError(e) => match *e {
            ureq::Error::Status(status, response) => {
                let detail = response
                    .header("x-error-message")
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                match status {
                    401 | 403 => HubError::Unauthorized {
                        endpoint,
                        model,
                        status,
                        detail,
                        token_set: settings.token.is_some(),
                    },
                    404 => HubError::NotFound {
                        endpoint,
                        model,
                        detail,
                    },
                    _ => HubError::Hub {
                        endpoint,
                        model,
                        message: format!("{}: HTTP {status}{detail}", response.get_url()),
                    },
                }
            }
            ureq::Error::Transport(t) => HubError::Unreachable {
                endpoint,
                model,
                reason: t.to_string(),
                cache: settings.cache.clone(),
            },
        },
        other => HubError::Hub {
            endpoint,
            model,
            message: other.to_string(),
        },
    }
}

/// The shard files a `model.safetensors.index.json` names, each a plain file name.
fn shards_of(index: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{}: {e}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{}: no weight_map", index.display()))?;
    let mut shards = BTreeSet::new();
    for value in map.values() {
        let name = value
            .as_str()
            .filter(|n| is_plain_file_name(n))
            .ok_or_else(|| format!("{}: bad shard name {value}", index.display()))?;
        shards.insert(name.to_string());
    }
    Ok(shards.into_iter().collect())
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// The snapshot a cached revision points at, if it holds everything needed to run.
fn cached_snapshot(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let direct = repo_dir.join("snapshots").join(revision);
    let dir = if !revision.contains('/') && direct.is_dir() {
        direct
    } else {
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
        let commit = commit.trim();
        if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        repo_dir.join("snapshots").join(commit)
    };
    is_complete(&dir).then_some(dir)
}

/// Whether `dir` has a config and all its weights (the optional files may be absent).
fn is_complete(dir: &Path) -> bool {
    if !dir.join(CONFIG).is_file() {
        return false;
    }
    if dir.join(SINGLE_WEIGHTS).is_file() {
        return true;
    }
    let index = dir.join(WEIGHTS_INDEX);
    index.is_file()
        && shards_of(&index).is_ok_and(|shards| shards.iter().all(|s| dir.join(s).is_file()))
}

/// Points `refs/REVISION` at `commit`, atomically, so a reader never sees a half-written ref.
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<(), HubError> {
    let path = repo_dir.join("refs").join(revision);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HubError::Io { path, source }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, commit).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        let p = |t: &str| HubSource::parse(t).map(|r| r.map_err(|e| e.to_string()));
        assert_eq!(p("model.gguf"), None);
        assert_eq!(p("/tmp/hf:x"), None);
        assert_eq!(
            p("hf:HuggingFaceTB/SmolLM2-135M"),
            Some(Ok(HubSource {
                repo: "HuggingFaceTB/SmolLM2-135M".into(),
                revision: "main".into()
            }))
        );
        assert_eq!(
            p("hf:a/b@refs/pr/1").unwrap().unwrap().revision,
            "refs/pr/1"
        );
        assert_eq!(p("hf:a/b@v1.0").unwrap().unwrap().to_string(), "a/b@v1.0");
        for bad in [
            "hf:",
            "hf:a",
            "hf:a/",
            "hf:/b",
            "hf:a/b/c",
            "hf:a/b@",
            "hf:a/b@../x",
            "hf:a b/c",
            "hf:../b",
            "hf:a/b@/x",
        ] {
            let e = p(bad).unwrap().unwrap_err();
            assert!(e.contains("hf:ORG/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_cached_snapshot_must_be_complete() {
        let dir = std::env::temp_dir().join(format!("kiln-hub-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let snap = dir.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        write_ref(&dir, "main", "abc123").unwrap();
        assert_eq!(cached_snapshot(&dir, "main"), None);
        std::fs::write(snap.join(CONFIG), "{}").unwrap();
        std::fs::write(
            snap.join(WEIGHTS_INDEX),
            r#"{"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(snap.join("m-1.safetensors"), "").unwrap();
        assert_eq!(cached_snapshot(&dir, "main"), None);
        std::fs::write(snap.join("m-2.safetensors"), "").unwrap();
        assert_eq!(cached_snapshot(&dir, "main"), Some(snap.clone()));
        assert_eq!(cached_snapshot(&dir, "abc123"), Some(snap));
        assert_eq!(cached_snapshot(&dir, "other"), None);
        std::fs::write(
            dir.join("snapshots/abc123").join(WEIGHTS_INDEX),
            r#"{"weight_map": {"a": "../escape.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(cached_snapshot(&dir, "main"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
