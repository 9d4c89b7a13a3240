//! `vit explore`: a checkpoint's attention in the browser. A small HTTP server on
//! 127.0.0.1 (unless told otherwise) serves one page and its script and style, compiled
//! into the binary, and a JSON API ([`api`]) whose numbers come from [`crate::explain`].
//! The page only draws; it loads nothing from the internet (its Content-Security-Policy
//! forbids it).
//!
//! This module knows HTTP: binding, the Host check that keeps other web sites from
//! reaching a loopback server (DNS rebinding), the upload limit, headers. It does not
//! know models or maps.

mod api;

use std::io::Read;
use std::net::{IpAddr, SocketAddr};

pub use api::{App, Reply};

use crate::predict::Predictor;
use crate::{Error, Result};

/// Where and how the explorer serves.
#[derive(Debug, Clone)]
pub struct ExploreOptions {
    /// Address to listen on: 127.0.0.1 unless the user asks for another.
    pub host: IpAddr,
    /// Port; 0 takes a free one.
    pub port: u16,
    /// Largest accepted upload, in bytes.
    pub max_upload: usize,
    /// Classes listed with the prediction.
    pub top_k: usize,
}

impl Default for ExploreOptions {
    fn default() -> Self {
        ExploreOptions {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 7860,
            max_upload: 20 << 20,
            top_k: 5,
        }
    }
}

/// Headers on every answer: no sniffing, nothing loaded from elsewhere, no framing.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    ("X-Content-Type-Options", "nosniff"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
         connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
];

/// A bound explorer, ready to [`Explorer::run`].
pub struct Explorer {
    server: tiny_http::Server,
    app: App,
    addr: SocketAddr,
    /// Only loopback: the Host header must name the loopback address or localhost.
    loopback: bool,
}

impl Explorer {
    /// Binds the server for `predictor`; `name` is what the page calls the model.
    pub fn bind(predictor: Predictor, name: String, opts: &ExploreOptions) -> Result<Self> {
        let app = App::new(predictor, name, opts.top_k, opts.max_upload)?;
        let server =
            tiny_http::Server::http(SocketAddr::new(opts.host, opts.port)).map_err(|e| {
                Error::Invalid(format!("cannot listen on {}:{}: {e}", opts.host, opts.port))
            })?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| Error::Invalid("the server has no IP address".into()))?;
        Ok(Explorer {
            server,
            app,
            addr,
            loopback: opts.host.is_loopback(),
        })
    }

    /// The address listened on (with the port chosen when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's address.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Answers requests one at a time until the process ends.
    pub fn run(mut self) -> Result<()> {
        loop {
            let rq = self
                .server
                .recv()
                .map_err(|e| Error::Invalid(format!("the server stopped: {e}")))?;
            self.answer(rq);
        }
    }

    fn answer(&mut self, mut rq: tiny_http::Request) {
        let reply = if !self.host_allowed(&rq) {
            Reply::error(
                403,
                "the Host header does not name this server (only localhost is served)",
            )
        } else {
            let max = self.app.max_upload();
            match rq.body_length() {
                Some(n) if n > max => api::too_large(n, max),
                _ => {
                    let mut body = Vec::new();
                    let read = rq.as_reader().take(max as u64 + 1).read_to_end(&mut body);
                    match read {
                        Err(e) => Reply::error(400, &format!("cannot read the request: {e}")),
                        Ok(n) if n > max => api::too_large(n, max),
                        Ok(_) => {
                            // HEAD is GET without the body (tiny_http leaves it out).
                            let method = match rq.method() {
                                tiny_http::Method::Head => "GET".to_string(),
                                m => m.as_str().to_string(),
                            };
                            let url = rq.url().to_string();
                            self.app.handle(&method, &url, &body)
                        }
                    }
                }
            }
        };
        let mut response = tiny_http::Response::from_data(reply.body)
            .with_status_code(reply.status)
            .with_header(header("Content-Type", reply.content_type));
        for (k, v) in SECURITY_HEADERS {
            response.add_header(header(k, v));
        }
        // A client that went away is not the server's problem.
        let _ = rq.respond(response);
    }

    /// Whether the request names this server: on loopback, only `localhost`, `127.0.0.1`
    /// or `[::1]` with the right port pass (a page from another site that re-resolves its
    /// own name to 127.0.0.1 sends its own name); when serving another address, any.
    fn host_allowed(&self, rq: &tiny_http::Request) -> bool {
        if !self.loopback {
            return true;
        }
        let Some(host) = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Host"))
            .map(|h| h.value.as_str().to_ascii_lowercase())
        else {
            return false;
        };
        let port = self.addr.port();
        ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .any(|name| host == format!("{name}:{port}") || (port == 80 && host == *name))
    }
}

fn header(k: &str, v: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("valid header")
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;

    use super::*;
    use crate::explain::testutil::{image, predictor};

    /// A raw HTTP exchange: the status code and the body.
    fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        (status, body.unwrap_or_default())
    }

    #[test]
    fn serves_loopback_with_host_check_limits_and_headers() {
        let opts = ExploreOptions {
            port: 0,
            max_upload: 4096,
            ..Default::default()
        };
        let ex = Explorer::bind(predictor("timm_tiny"), "tiny".into(), &opts).unwrap();
        let addr = ex.addr();
        assert!(addr.ip().is_loopback());
        std::thread::spawn(move || ex.run());
        let port = addr.port();

        let get = |host: &str, path: &str| {
            exchange(
                addr,
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
        };
        let (status, body) = get(&format!("127.0.0.1:{port}"), "/");
        assert_eq!(status, 200);
        assert!(body.contains("<canvas"), "{body}");
        assert_eq!(get(&format!("localhost:{port}"), "/api/model").0, 200);
        let (status, body) = get(&format!("evil.example:{port}"), "/api/model");
        assert_eq!(status, 403);
        assert!(body.contains("Host"), "{body}");
        assert_eq!(get(&format!("127.0.0.1:{port}"), "/../Cargo.toml").0, 404);
        let head =
            format!("HEAD / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        let (status, body) = exchange(addr, head.as_bytes());
        assert_eq!((status, body.as_str()), (200, ""));

        // An upload over the limit is refused by its length, before it is read.
        let big = format!(
            "POST /api/images HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 5000\r\n\
             Connection: close\r\n\r\n"
        );
        let (status, body) = exchange(addr, big.as_bytes());
        assert_eq!(status, 413);
        assert!(body.contains("too large"), "{body}");

        // The server still answers, and an image within the limit is predicted.
        let png = std::fs::read(image()).unwrap();
        assert!(png.len() <= 4096);
        let mut rq = format!(
            "POST /api/images HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            png.len()
        )
        .into_bytes();
        rq.extend_from_slice(&png);
        let (status, body) = exchange(addr, &rq);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"top_k\""), "{body}");
    }

    #[test]
    fn headers_forbid_outside_content() {
        let csp = SECURITY_HEADERS
            .iter()
            .find(|(k, _)| *k == "Content-Security-Policy")
            .unwrap()
            .1;
        assert!(csp.starts_with("default-src 'none'"));
        assert!(!csp.contains("http"));
    }
}
