//! Downloading dataset files safely: stream over HTTP(S) into a uniquely named `.part`
//! file, hash while streaming, check length and checksum, fsync and atomically rename.
//! Also resolves the cache directory. A failed download never leaves a file behind.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Environment variable overriding the cache directory.
pub const CACHE_ENV: &str = "VIT_CACHE";

/// A published checksum of a file, as lowercase or uppercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// MD5 (32 hex digits): what the classic datasets publish.
    Md5(String),
    /// SHA-256 (64 hex digits).
    Sha256(String),
}

impl Checksum {
    fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "md5",
            Checksum::Sha256(_) => "sha256",
        }
    }

    /// The expected digest, lowercase, after checking it is well-formed hex.
    fn expected(&self) -> Result<String> {
        let (hex, len) = match self {
            Checksum::Md5(h) => (h, 32),
            Checksum::Sha256(h) => (h, 64),
        };
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != len || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "{} checksum '{hex}' is not {len} hex digits",
                self.algorithm()
            )));
        }
        Ok(hex)
    }

    fn hasher(&self) -> Hasher {
        match self {
            Checksum::Md5(_) => Hasher::Md5(Md5::new()),
            Checksum::Sha256(_) => Hasher::Sha256(Sha256::new()),
        }
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Checksum::Md5(h) | Checksum::Sha256(h) => write!(f, "{}:{h}", self.algorithm()),
        }
    }
}

enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
}

impl Hasher {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    fn finish_hex(self) -> String {
        let digest: Vec<u8> = match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        };
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hashes an existing file and compares with `checksum` (Error::Checksum on mismatch).
pub fn verify_file(path: &Path, checksum: &Checksum) -> Result<()> {
    let expected = checksum.expected()?;
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = checksum.hasher();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    let found = hasher.finish_hex();
    if found != expected {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            expected: format!("{}:{expected}", checksum.algorithm()),
            found: format!("{}:{found}", checksum.algorithm()),
        });
    }
    Ok(())
}

/// The cache root: `$VIT_CACHE`, else `$XDG_CACHE_HOME/vit`, else `~/.cache/vit`.
pub fn cache_root() -> Result<PathBuf> {
    cache_root_from(
        std::env::var_os(CACHE_ENV),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn cache_root_from(
    vit_cache: Option<std::ffi::OsString>,
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Result<PathBuf> {
    let non_empty = |v: Option<std::ffi::OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty(vit_cache) {
        return Ok(dir);
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(dir) = non_empty(xdg).filter(|p| p.is_absolute()) {
        return Ok(dir.join("vit"));
    }
    if let Some(home) = non_empty(home) {
        return Ok(home.join(".cache").join("vit"));
    }
    Err(Error::Invalid(format!(
        "no cache directory: set {CACHE_ENV} or HOME, or pass --data-dir"
    )))
}

/// Removes the temporary file unless disarmed.
struct PartFile {
    path: Option<PathBuf>,
}

impl PartFile {
    fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Creates a new, uniquely named `.<name>.<pid>.<n>.part` file next to `dest`.
fn create_part_file(dest: &Path) -> Result<(File, PartFile)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.{}.{n}.part", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((f, PartFile { path: Some(path) })),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(path, e)),
        }
    }
}

fn progress_bar(len: Option<u64>, name: &str, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    let template = if len.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(format!("downloading {name}"));
    pb
}

fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Downloads `url` to `dest`, verifying `checksum`. The body is streamed into a unique
/// `.part` file beside `dest` while hashing; the byte count must match Content-Length
/// when one is sent; the file is fsynced and renamed into place only when everything
/// checks out. On any error the partial file is removed. The progress bar is drawn on
/// stderr unless `quiet` or stderr is not a terminal.
pub fn download(url: &str, dest: &Path, checksum: &Checksum, quiet: bool) -> Result<()> {
    let expected = checksum.expected()?;
    let dl_err = |msg: String| Error::Download {
        url: url.to_string(),
        msg,
    };
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }

    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        // Compressed archives must arrive byte for byte as published.
        .accept_encoding("identity");
    if is_loopback(url) {
        config = config.proxy(None);
    }
    let agent = ureq::Agent::new_with_config(config.build());
    let response = agent.get(url).call().map_err(|e| dl_err(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(dl_err(
            format!(
                "server answered HTTP {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            )
            .trim_end()
            .to_string(),
        ));
    }
    if let Some(enc) = response.headers().get("content-encoding") {
        let enc = enc.to_str().unwrap_or("?");
        if !enc.eq_ignore_ascii_case("identity") {
            return Err(dl_err(format!(
                "server applied Content-Encoding '{enc}', so the published checksum cannot be checked"
            )));
        }
    }
    let announced = response.body().content_length();

    let (mut file, part) = create_part_file(dest)?;
    let part_path = part.path.clone().unwrap_or_default();
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pb = progress_bar(announced, &name, quiet);
    let mut reader = response.into_body().into_reader();
    let mut hasher = checksum.hasher();
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 1 << 16];
    let of_total = |n: u64| match announced {
        Some(t) => format!("{n} of {t} bytes"),
        None => format!("{n} bytes"),
    };
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                pb.abandon();
                return Err(dl_err(format!(
                    "transfer interrupted after {}: {e}",
                    of_total(received)
                )));
            }
        };
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| Error::io(&part_path, e))?;
        received += n as u64;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    if let Some(total) = announced {
        if received != total {
            return Err(dl_err(format!(
                "truncated transfer: received {}",
                of_total(received)
            )));
        }
    }
    let found = hasher.finish_hex();
    if found != expected {
        return Err(Error::Checksum {
            path: dest.to_path_buf(),
            expected: format!("{}:{expected}", checksum.algorithm()),
            found: format!("{}:{found}", checksum.algorithm()),
        });
    }
    file.sync_all().map_err(|e| Error::io(&part_path, e))?;
    drop(file);
    fs::rename(&part_path, dest).map_err(|e| Error::io(dest, e))?;
    part.keep();
    // Make the rename itself durable; failure here does not undo a verified file.
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{Reply, Server};
    use std::collections::HashMap;

    const HELLO_MD5: &str = "5d41402abc4b2a76b9719d911017c592"; // md5("hello")
    const HELLO_SHA256: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn serve(path: &str, reply: Reply) -> Server {
        let mut routes = HashMap::new();
        routes.insert(path.to_string(), reply);
        Server::start(routes, 1)
    }

    #[test]
    fn good_file_is_verified_and_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub").join("hello.bin");
        for checksum in [
            Checksum::Md5(HELLO_MD5.to_uppercase()),
            Checksum::Sha256(HELLO_SHA256.into()),
        ] {
            let server = serve("files/hello.bin", Reply::ok(b"hello"));
            let url = format!("{}files/hello.bin", server.base_url);
            download(&url, &dest, &checksum, true).unwrap();
            assert_eq!(server.finish(), vec!["files/hello.bin".to_string()]);
            assert_eq!(fs::read(&dest).unwrap(), b"hello");
            assert_eq!(dir_entries(&dest.with_file_name("")), vec!["hello.bin"]);
            verify_file(&dest, &checksum).unwrap();
        }
    }

    #[test]
    fn body_without_content_length_is_accepted_when_checksum_matches() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("hello.bin");
        let reply = Reply {
            status: 200,
            body: b"hello".to_vec(),
            content_length: None,
        };
        let server = serve("h", reply);
        download(
            &format!("{}h", server.base_url),
            &dest,
            &Checksum::Md5(HELLO_MD5.into()),
            true,
        )
        .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello");
    }

    #[test]
    fn wrong_checksum_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("hello.bin");
        let server = serve("h", Reply::ok(b"hellO"));
        let err = download(
            &format!("{}h", server.base_url),
            &dest,
            &Checksum::Md5(HELLO_MD5.into()),
            true,
        )
        .unwrap_err();
        match &err {
            Error::Checksum {
                path,
                expected,
                found,
            } => {
                assert_eq!(path, &dest);
                assert_eq!(expected, &format!("md5:{HELLO_MD5}"));
                assert_ne!(found, expected);
            }
            other => panic!("expected a checksum error, got {other:?}"),
        }
        assert!(err.to_string().contains("hello.bin: checksum mismatch"));
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn truncated_transfer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("big.bin");
        let body = vec![7u8; 10_000];
        let server = serve("big.bin", Reply::truncated(&body, 50_000));
        let url = format!("{}big.bin", server.base_url);
        let err = download(&url, &dest, &Checksum::Md5(HELLO_MD5.into()), true).unwrap_err();
        match &err {
            Error::Download { url: u, msg } => {
                assert_eq!(u, &url);
                assert!(msg.contains("50000"), "{msg}");
            }
            other => panic!("expected a download error, got {other:?}"),
        }
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn not_found_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.bin");
        let server = serve("other", Reply::ok(b"hello"));
        let url = format!("{}missing.bin", server.base_url);
        let err = download(&url, &dest, &Checksum::Md5(HELLO_MD5.into()), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("download {url}: server answered HTTP 404 Not Found")
        );
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn unreachable_server_is_a_download_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://{addr}/x");
        let err = download(
            &url,
            &dir.path().join("x"),
            &Checksum::Md5(HELLO_MD5.into()),
            true,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Download { .. }), "{err:?}");
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn malformed_checksum_is_rejected_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let err = download(
            "http://127.0.0.1:9/never",
            &dir.path().join("x"),
            &Checksum::Sha256("abc".into()),
            true,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    }

    #[test]
    fn verify_file_detects_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"hello").unwrap();
        verify_file(&p, &Checksum::Md5(HELLO_MD5.into())).unwrap();
        let err = verify_file(&p, &Checksum::Sha256("0".repeat(64))).unwrap_err();
        assert!(matches!(err, Error::Checksum { .. }));
        assert_eq!(Checksum::Md5("ab".into()).to_string(), "md5:ab");
    }

    #[test]
    fn cache_root_precedence() {
        let s = |v: &str| Some(std::ffi::OsString::from(v));
        assert_eq!(
            cache_root_from(s("/c"), s("/x"), s("/h")).unwrap(),
            PathBuf::from("/c")
        );
        assert_eq!(
            cache_root_from(None, s("/x"), s("/h")).unwrap(),
            PathBuf::from("/x/vit")
        );
        assert_eq!(
            cache_root_from(s(""), s("relative"), s("/h")).unwrap(),
            PathBuf::from("/h/.cache/vit")
        );
        assert!(cache_root_from(None, None, None).is_err());
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("http://127.0.0.1:8080/a"));
        assert!(is_loopback("http://localhost/a"));
        assert!(is_loopback("http://[::1]:80/a"));
        assert!(!is_loopback("https://www.cs.toronto.edu/~kriz/x"));
        assert!(!is_loopback("https://127.0.0.1.evil.example/"));
    }
}
