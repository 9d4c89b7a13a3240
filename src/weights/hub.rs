//! `--hf REPO[@REVISION]`: a checkpoint from the Hugging Face Hub, fetched by the official
//! `hf-hub` client into the standard cache (`HF_HOME`, default `~/.cache/huggingface`), from
//! `HF_ENDPOINT` (default huggingface.co), with a token from `HF_TOKEN` or the cache's token
//! file, a progress bar, and a partial download resumed by the next try. `HF_HUB_OFFLINE=1`
//! reads the cache only. The weights' SHA-256 is checked against the Hub's ETag (LFS files
//! are named by it), so a cut transfer never passes as a checkpoint. The result is a folder
//! in either Hub layout, which [`super::Checkpoint::load`] reads like any local folder.

use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The files fetched: the weights, and the configs of both layouts where the repo has them.
const WEIGHTS: &str = "model.safetensors";
const SIDECARS: [&str; 2] = ["config.json", "preprocessor_config.json"];

/// A repo and revision, from `owner/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub revision: String,
}

impl std::str::FromStr for HubRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
        let ok_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) || revision.is_empty() {
            return Err(Error::Invalid(format!(
                "--hf {s}: expected a Hub repo as owner/name[@revision]"
            )));
        }
        Ok(HubRef {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// The local folder holding `r`'s checkpoint: from the cache when offline, else fetched.
pub fn fetch(r: &HubRef, progress: bool) -> Result<PathBuf> {
    let repo = Repo::with_revision(r.repo.clone(), RepoType::Model, r.revision.clone());
    let name = format!("{}@{}", r.repo, r.revision);
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let cache = Cache::from_env();
    if offline {
        let weights = cache.repo(repo).get(WEIGHTS).ok_or_else(|| {
            Error::Invalid(format!(
                "{name}: not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                cache.path().display()
            ))
        })?;
        return Ok(folder_of(&weights));
    }
    let mut builder = ApiBuilder::from_env().with_progress(progress);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = ApiBuilder::build(builder).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let handle = api.repo(repo);
    let weights = handle
        .get(WEIGHTS)
        .map_err(|e| hub_error(&name, WEIGHTS, &endpoint, e))?;
    verify(&weights, &name)?;
    for file in SIDECARS {
        match handle.get(file) {
            Ok(_) => {}
            // A layout without this file.
            Err(ApiError::RequestError(e)) if matches!(*e, ureq2::Error::Status(404, _)) => {}
            Err(e) => return Err(hub_error(&name, file, &endpoint, e)),
        }
    }
    Ok(folder_of(&weights))
}

/// The snapshot folder of a cached file.
fn folder_of(file: &Path) -> PathBuf {
    file.parent().unwrap_or(Path::new(".")).to_path_buf()
}

/// One line for what went wrong fetching `file` of `name`.
fn hub_error(name: &str, file: &str, endpoint: &str, e: ApiError) -> Error {
    let msg = match &e {
        ApiError::RequestError(r) => match r.as_ref() {
            ureq2::Error::Status(404, _) => {
                format!("{name}: no {file} there (404 from {endpoint})")
            }
            ureq2::Error::Status(code @ (401 | 403), _) => format!(
                "{name}: access refused ({code}): a gated or private repo needs a token \
                 (HF_TOKEN, or `huggingface-cli login`)"
            ),
            ureq2::Error::Status(code, _) => format!("{name}: {file}: the Hub answered {code}"),
            ureq2::Error::Transport(t) => format!("{name}: cannot reach {endpoint}: {t}"),
        },
        other => format!("{name}: {file}: {other}"),
    };
    Error::Invalid(msg)
}

/// Checks a fetched LFS file against its name in the cache (the Hub's ETag: its SHA-256);
/// a mismatch removes it, so that the next try downloads it again.
fn verify(pointer: &Path, name: &str) -> Result<()> {
    let blob = std::fs::canonicalize(pointer).map_err(|e| Error::io(pointer, e))?;
    let etag = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(()); // not an LFS file: named by its git hash, nothing to compare
    }
    let mut file = std::fs::File::open(&blob).map_err(|e| Error::io(&blob, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(&blob, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != etag.to_ascii_lowercase() {
        let _ = std::fs::remove_file(pointer);
        let _ = std::fs::remove_file(&blob);
        return Err(Error::Invalid(format!(
            "{name}: {WEIGHTS} arrived damaged or cut short ({total} bytes, SHA-256 {}…, the Hub \
             says {}…): removed from the cache; try again",
            &got[..12],
            &etag[..12]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names_parse_with_a_revision_and_bad_ones_are_refused() {
        let r: HubRef = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
            .parse()
            .unwrap();
        assert_eq!(r.revision, "main");
        let r: HubRef = "google/vit-base-patch16-224@v1.0".parse().unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str()),
            ("google/vit-base-patch16-224", "v1.0")
        );
        for bad in ["", "a/b/c", "a b/c", "owner/name@", "../x"] {
            assert!(bad.parse::<HubRef>().is_err(), "{bad}");
        }
    }
}
