//! Test fixtures shared by the data module's unit tests: builders for tiny IDX, gzip and
//! tar.gz files, and a bounded HTTP/1.1 server on 127.0.0.1 that serves canned bytes.
//! Compiled only for tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;

/// An IDX file of unsigned bytes with the given dimensions.
pub fn idx_bytes(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Gzip-compresses `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(data).expect("write to memory");
    enc.finish().expect("finish gzip in memory")
}

/// A .tar.gz archive holding `(path, contents)` entries.
pub fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let enc = GzEncoder::new(Vec::new(), Compression::fast());
    let mut builder = tar::Builder::new(enc);
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, path, *data)
            .expect("append to in-memory tar");
    }
    builder
        .into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gzip")
}

/// What the test server answers for one path.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes actually sent.
    pub body: Vec<u8>,
    /// Content-Length announced (`None`: no header, body delimited by close).
    pub content_length: Option<usize>,
}

impl Reply {
    /// 200 with the right Content-Length.
    pub fn ok(body: &[u8]) -> Self {
        Reply {
            status: 200,
            body: body.to_vec(),
            content_length: Some(body.len()),
        }
    }

    /// 200 announcing more bytes than it sends, then closing the connection.
    pub fn truncated(body: &[u8], announced: usize) -> Self {
        Reply {
            status: 200,
            body: body.to_vec(),
            content_length: Some(announced),
        }
    }
}

/// A local HTTP server; `base_url` ends with `/`.
pub struct Server {
    pub base_url: String,
    handle: Option<JoinHandle<Vec<String>>>,
}

impl Server {
    /// Serves `routes` (path without leading slash → reply; others get 404) on
    /// 127.0.0.1 for at most `max_requests` connections or 20 seconds.
    pub fn start(routes: HashMap<String, Reply>, max_requests: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut served = Vec::new();
            while served.len() < max_requests && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => served.push(handle_one(stream, &routes)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
            served
        });
        Server {
            base_url: format!("http://{addr}/"),
            handle: Some(handle),
        }
    }

    /// Waits for the server thread and returns the paths it was asked for.
    pub fn finish(mut self) -> Vec<String> {
        self.handle
            .take()
            .map(|h| h.join().expect("server thread"))
            .unwrap_or_default()
    }
}

fn handle_one(stream: TcpStream, routes: &HashMap<String, Reply>) -> String {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return String::new();
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    let reply = routes.get(&path).cloned().unwrap_or(Reply {
        status: 404,
        body: b"not found".to_vec(),
        content_length: Some(9),
    });
    let reason = match reply.status {
        200 => "OK",
        404 => "Not Found",
        _ => "Status",
    };
    let mut stream = reader.into_inner();
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\nConnection: close\r\nContent-Type: application/octet-stream\r\n",
        reply.status
    );
    if let Some(len) = reply.content_length {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&reply.body);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    path
}
