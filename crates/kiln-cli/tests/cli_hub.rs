//! `hf:ORG/NAME[@REV]` sources against a hub served from this process on 127.0.0.1: the
//! transformers-written tiny Llama downloaded into an empty cache gives the local folder's
//! logits bit for bit, runs again offline from the cache, and the failures a user meets
//! (unknown repo or revision, a private repo without or with a wrong token, no weights, an
//! unreachable hub, offline with nothing cached) exit 2 with a message that says what to do.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token";
const IDS: &str = "1,2,3,4,5,77,200";

fn tiny_llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/coreml/tiny_llama_hf")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-hub-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One repository of the test hub.
struct Repo {
    files: BTreeMap<String, Vec<u8>>,
    private: bool,
}

/// A minimal hub: the model-info and resolve endpoints over HTTP/1.1, one request per
/// connection. It serves until dropped, and stops by itself after a minute in any case.
struct TestHub {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl TestHub {
    fn start() -> TestHub {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(tiny_llama()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            files.insert(name, std::fs::read(&path).unwrap());
        }
        // Listed but not needed: must never be fetched.
        files.insert("README.md".into(), b"# tiny llama\n".to_vec());
        files.insert("pytorch_model.bin".into(), vec![0; 64]);
        let mut repos = BTreeMap::new();
        repos.insert(
            "test/tiny-llama".to_string(),
            Repo {
                files: files.clone(),
                private: false,
            },
        );
        repos.insert(
            "test/private-llama".to_string(),
            Repo {
                files: files.clone(),
                private: true,
            },
        );
        let no_weights = files
            .iter()
            .filter(|(n, _)| !n.ends_with(".safetensors"))
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect();
        repos.insert(
            "test/no-weights".to_string(),
            Repo {
                files: no_weights,
                private: false,
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, requests) = (Arc::clone(&stop), Arc::clone(&requests));
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Some(line) = serve(stream, &repos) {
                                requests.lock().unwrap().push(line);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        TestHub {
            addr,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Answers one request; returns its request line.
fn serve(stream: TcpStream, repos: &BTreeMap<String, Repo>) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut headers = BTreeMap::new();
    for _ in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let request_line = request_line.trim().to_string();
    let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
    let (status, extra, body) = respond(&path, &headers, repos);
    let mut out = stream;
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes()).ok()?;
    out.write_all(&body).ok()?;
    out.flush().ok()?;
    Some(request_line)
}

type Response = (u16, Vec<(String, String)>, Vec<u8>);

fn error(status: u16, message: &str) -> Response {
    (
        status,
        vec![("X-Error-Message".into(), message.into())],
        format!("{{\"error\": \"{message}\"}}").into_bytes(),
    )
}

fn respond(
    path: &str,
    headers: &BTreeMap<String, String>,
    repos: &BTreeMap<String, Repo>,
) -> Response {
    let (api, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => (true, rest),
        None => (false, path.trim_start_matches('/')),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    let (verb, n_parts) = if api { ("revision", 4) } else { ("resolve", 5) };
    if parts.len() < n_parts || parts[2] != verb {
        return error(404, "Not Found");
    }
    let name = format!("{}/{}", parts[0], parts[1]);
    let Some(repo) = repos.get(&name) else {
        return error(404, "Repository not found");
    };
    if repo.private {
        match headers.get("authorization").map(String::as_str) {
            None => return error(401, "Access to this model is restricted"),
            Some(a) if a != format!("Bearer {TOKEN}") => {
                return error(403, "This token cannot read this repository")
            }
            Some(_) => {}
        }
    }
    if parts[3] != "main" && parts[3] != COMMIT {
        return error(404, "Invalid rev id");
    }
    if api {
        let siblings: Vec<_> = repo
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": name, "sha": COMMIT, "siblings": siblings });
        return (200, vec![], body.to_string().into_bytes());
    }
    let Some(bytes) = repo.files.get(parts[4]) else {
        return error(404, "Entry not found");
    };
    let mut extra = vec![
        ("ETag".to_string(), format!("\"{:016x}\"", fnv1a(bytes))),
        ("X-Repo-Commit".to_string(), COMMIT.to_string()),
    ];
    let range = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'));
    match range {
        Some((start, end)) => {
            let start: usize = start.parse().unwrap_or(0).min(bytes.len());
            let end: usize = end
                .parse::<usize>()
                .map_or(bytes.len(), |e| (e + 1).min(bytes.len()));
            extra.push((
                "Content-Range".into(),
                format!("bytes {start}-{}/{}", end.max(1) - 1, bytes.len()),
            ));
            (206, extra, bytes[start..end.max(start)].to_vec())
        }
        None => (200, extra, bytes.clone()),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `kiln` with a clean hub environment: this endpoint and cache, no token, no proxy.
fn kiln(args: &[&str], endpoint: &str, cache: &Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.join("home"));
    for var in [
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kiln")
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn bad_input(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn logits(model: &str, out: &Path, endpoint: &str, cache: &Path, env: &[(&str, &str)]) -> Output {
    let args = [
        "logits",
        model,
        "--token-ids",
        IDS,
        "--out",
        out.to_str().unwrap(),
    ];
    kiln(&args, endpoint, cache, env)
}

/// An endpoint nothing listens on: a port bound and released.
fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[test]
fn a_hub_model_downloads_once_and_runs_offline_from_the_cache() {
    let dir = scratch("download");
    let cache = dir.join("cache");
    let local_out = dir.join("local.f32");
    let folder = tiny_llama();
    ok(&logits(
        folder.to_str().unwrap(),
        &local_out,
        "http://unused",
        &cache,
        &[],
    ));
    let want = std::fs::read(&local_out).unwrap();

    let hub = TestHub::start();
    let endpoint = hub.endpoint();
    let hub_out = dir.join("hub.f32");
    ok(&logits(
        "hf:test/tiny-llama",
        &hub_out,
        &endpoint,
        &cache,
        &[],
    ));
    assert_eq!(std::fs::read(&hub_out).unwrap(), want, "logits differ");

    let repo = cache.join("models--test--tiny-llama");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let snapshot = repo.join("snapshots").join(COMMIT);
    let mut got: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    got.sort();
    assert_eq!(
        got,
        ["config.json", "generation_config.json", "model.safetensors"]
    );
    for file in &got {
        assert_eq!(
            std::fs::read(snapshot.join(file)).unwrap(),
            std::fs::read(folder.join(file)).unwrap(),
            "{file}"
        );
    }
    let requests = hub.requests();
    assert!(
        requests
            .iter()
            .all(|r| !r.contains("README") && !r.contains("pytorch_model")),
        "{requests:?}"
    );

    // A second run online finds everything cached: one listing, no file transfers.
    let before = hub.requests().len();
    ok(&logits(
        "hf:test/tiny-llama",
        &hub_out,
        &endpoint,
        &cache,
        &[],
    ));
    let after = hub.requests();
    assert_eq!(after.len(), before + 1, "{:?}", &after[before..]);
    assert!(after[before].contains("/api/models/test/tiny-llama/revision/main"));
    drop(hub);

    // Hub gone: offline from the cache, and online falling back to it.
    let offline_out = dir.join("offline.f32");
    let offline = [("HF_HUB_OFFLINE", "1")];
    ok(&logits(
        "hf:test/tiny-llama",
        &offline_out,
        &endpoint,
        &cache,
        &offline,
    ));
    assert_eq!(std::fs::read(&offline_out).unwrap(), want);
    let dead = dead_endpoint();
    ok(&logits(
        "hf:test/tiny-llama",
        &offline_out,
        &dead,
        &cache,
        &[],
    ));
    assert_eq!(std::fs::read(&offline_out).unwrap(), want);
    let pinned = format!("hf:test/tiny-llama@{COMMIT}");
    ok(&logits(&pinned, &offline_out, &endpoint, &cache, &offline));
    assert_eq!(std::fs::read(&offline_out).unwrap(), want);

    // Other commands take hub sources the same way.
    let v: serde_json::Value = serde_json::from_str(&ok(&kiln(
        &["inspect", "hf:test/tiny-llama", "--json"],
        &endpoint,
        &cache,
        &offline,
    )))
    .unwrap();
    assert_eq!(v["architecture"], "llama");
}

#[test]
fn hub_failures_exit_2_with_what_to_do() {
    let dir = scratch("failures");
    let cache = dir.join("cache");
    let out = dir.join("x.f32");
    let hub = TestHub::start();
    let endpoint = hub.endpoint();

    let r = logits("hf:test/missing", &out, &endpoint, &cache, &[]);
    bad_input(&r, &["test/missing", "no such model or revision", "404"]);
    let r = logits("hf:test/tiny-llama@v9", &out, &endpoint, &cache, &[]);
    bad_input(&r, &["test/tiny-llama@v9", "no such model or revision"]);

    let r = logits("hf:test/private-llama", &out, &endpoint, &cache, &[]);
    bad_input(&r, &["test/private-llama", "HTTP 401", "set HF_TOKEN"]);
    let wrong = [("HF_TOKEN", "hf_wrong")];
    let r = logits("hf:test/private-llama", &out, &endpoint, &cache, &wrong);
    bad_input(&r, &["HTTP 403", "the token in HF_TOKEN cannot read it"]);
    let right = [("HF_TOKEN", TOKEN)];
    ok(&logits(
        "hf:test/private-llama",
        &out,
        &endpoint,
        &cache,
        &right,
    ));
    // The token also comes from HF_HOME/token, as the Hugging Face tools store it.
    let home = cache.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("token"), format!("{TOKEN}\n")).unwrap();
    ok(&logits(
        "hf:test/private-llama",
        &out,
        &endpoint,
        &cache,
        &[],
    ));
    std::fs::remove_file(home.join("token")).unwrap();

    let r = logits("hf:test/no-weights", &out, &endpoint, &cache, &[]);
    bad_input(&r, &["test/no-weights", "no safetensors weights"]);

    let r = logits("hf:test", &out, &endpoint, &cache, &[]);
    bad_input(&r, &["hf:ORG/NAME"]);
    drop(hub);

    let empty = dir.join("empty-cache");
    let dead = dead_endpoint();
    let r = logits("hf:test/tiny-llama", &out, &dead, &empty, &[]);
    let msg = format!("cannot reach {dead}");
    bad_input(
        &r,
        &[
            &msg,
            "test/tiny-llama is not in the cache at",
            "empty-cache",
        ],
    );
    let r = logits(
        "hf:test/tiny-llama",
        &out,
        &dead,
        &empty,
        &[("HF_HUB_OFFLINE", "1")],
    );
    bad_input(&r, &["HF_HUB_OFFLINE is set", "not in the cache at"]);
}
