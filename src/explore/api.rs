//! What the explorer's page can ask for: its own four assets, the model's description,
//! an uploaded image's prediction, and maps computed by [`crate::explain`] from the
//! image's kept attention. Plain requests in, [`Reply`]s out: no sockets here.

use std::collections::VecDeque;

use serde::Serialize;
use serde_json::json;

use crate::explain::{hottest, pos_embed_similarity, Inspection, Layout, Query};
use crate::files::decode_image_bytes;
use crate::models::Architecture;
use crate::predict::Predictor;
use crate::viz::{Colormap, HeadFusion};
use crate::{Error, Result};

const INDEX_HTML: &str = include_str!("assets/index.html");
const EXPLORE_JS: &str = include_str!("assets/explore.js");
const EXPLORE_CSS: &str = include_str!("assets/explore.css");
const FAVICON_SVG: &str = include_str!("assets/favicon.svg");

/// Uploaded images kept for their maps: at most this many, the oldest dropped first …
const MAX_KEPT: usize = 8;
/// … and together at most this many bytes of attention (the newest is always kept).
const MAX_KEPT_BYTES: usize = 1 << 30;

/// An HTTP answer: status, media type, body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    fn json(value: &impl Serialize) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply {
                status: 200,
                content_type: "application/json",
                body,
            },
            Err(e) => Reply::error(500, &format!("cannot write the answer: {e}")),
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(&json!({ "error": message })).unwrap_or_default(),
        }
    }

    fn asset(content_type: &'static str, text: &str) -> Reply {
        Reply {
            status: 200,
            content_type,
            body: text.as_bytes().to_vec(),
        }
    }

    /// A bad request (400) for a library error.
    fn bad(e: Error) -> Reply {
        Reply::error(400, &e.to_string())
    }
}

/// The explorer's state: the model and the images uploaded so far (the newest last).
#[derive(Debug)]
pub struct App {
    predictor: Predictor,
    /// What the page shows as the model's name (the checkpoint's path or Hub repo).
    name: String,
    layout: Layout,
    top_k: usize,
    max_upload: usize,
    images: VecDeque<(u64, Inspection)>,
    next_id: u64,
}

impl App {
    /// An explorer of `predictor`, which must have global attention over patch tokens.
    pub fn new(
        predictor: Predictor,
        name: String,
        top_k: usize,
        max_upload: usize,
    ) -> Result<Self> {
        let layout = Layout::of(predictor.model.as_ref())?;
        if top_k == 0 {
            return Err(Error::Invalid("top-k must be at least 1".into()));
        }
        Ok(App {
            predictor,
            name,
            layout,
            top_k,
            max_upload,
            images: VecDeque::new(),
            next_id: 1,
        })
    }

    /// The largest upload accepted, in bytes.
    pub fn max_upload(&self) -> usize {
        self.max_upload
    }

    /// Answers `method path?query` with `body` (the upload of a POST).
    pub fn handle(&mut self, method: &str, url: &str, body: &[u8]) -> Reply {
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let params = match Params::parse(query) {
            Ok(p) => p,
            Err(e) => return Reply::bad(e),
        };
        let parts: Vec<&str> = path.split('/').skip(1).collect();
        match (method, parts.as_slice()) {
            ("GET", [""] | ["index.html"]) => Reply::asset("text/html; charset=utf-8", INDEX_HTML),
            ("GET", ["explore.js"]) => Reply::asset("text/javascript; charset=utf-8", EXPLORE_JS),
            ("GET", ["explore.css"]) => Reply::asset("text/css; charset=utf-8", EXPLORE_CSS),
            ("GET", ["favicon.svg"]) => Reply::asset("image/svg+xml", FAVICON_SVG),
            ("GET", ["api", "model"]) => self.model(),
            ("GET", ["api", "pos-embed"]) => {
                match pos_embed_similarity(self.predictor.model.as_ref()) {
                    Ok(s) => Reply::json(&s),
                    Err(e) => Reply::error(404, &e.to_string()),
                }
            }
            ("POST", ["api", "images"]) => self.upload(body),
            ("GET", ["api", "images", id, what]) => match self.image(id) {
                Ok(ins) => answer(ins, what, &params),
                Err(r) => r,
            },
            (_, [""] | ["index.html" | "explore.js" | "explore.css" | "favicon.svg"])
            | (_, ["api", "model" | "pos-embed" | "images"] | ["api", "images", _, _]) => {
                Reply::error(405, &format!("{method} is not allowed on {path}"))
            }
            _ => Reply::error(404, &format!("{path} not found")),
        }
    }

    fn model(&self) -> Reply {
        let cfg = &self.predictor.config;
        let colormaps: serde_json::Map<String, serde_json::Value> = Colormap::ALL
            .iter()
            .map(|c| {
                let lut: Vec<[u8; 3]> = (0..256).map(|i| c.color(i as f32 / 255.0).0).collect();
                (c.name().to_string(), json!(lut))
            })
            .collect();
        Reply::json(&json!({
            "name": self.name,
            "arch": cfg.arch().to_string(),
            "classes": cfg.num_classes(),
            "channels": cfg.in_channels(),
            "layout": self.layout,
            "has_pos_embed": self.predictor.model.pos_embed().is_some(),
            "max_upload_bytes": self.max_upload,
            "colormaps": colormaps,
        }))
    }

    fn upload(&mut self, body: &[u8]) -> Reply {
        if body.is_empty() {
            return Reply::error(400, "the upload is empty: send an image file");
        }
        if body.len() > self.max_upload {
            return too_large(body.len(), self.max_upload);
        }
        let source = std::path::Path::new("the upload");
        let ins = decode_image_bytes(body, source)
            .and_then(|img| Inspection::run(&self.predictor, &img, self.top_k));
        let ins = match ins {
            Ok(i) => i,
            Err(e) => return Reply::bad(e),
        };
        let id = self.next_id;
        self.next_id += 1;
        let reply = Reply::json(&json!({ "id": id, "top_k": ins.top_k, "notes": ins.notes }));
        self.images.push_back((id, ins));
        while self.images.len() > MAX_KEPT
            || (self.images.len() > 1
                && self
                    .images
                    .iter()
                    .map(|(_, i)| i.attention_bytes())
                    .sum::<usize>()
                    > MAX_KEPT_BYTES)
        {
            self.images.pop_front();
        }
        reply
    }

    fn image(&self, id: &str) -> std::result::Result<&Inspection, Reply> {
        let id: u64 = id
            .parse()
            .map_err(|_| Reply::error(400, &format!("'{id}' is not an image id")))?;
        self.images
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, ins)| ins)
            .ok_or_else(|| {
                Reply::error(
                    404,
                    &format!("image {id} is no longer kept (at most {MAX_KEPT}): upload it again"),
                )
            })
    }
}

/// 413 with the sizes.
pub fn too_large(len: usize, max: usize) -> Reply {
    Reply::error(
        413,
        &format!("the upload is too large: {len} bytes, the limit is {max} bytes (--max-upload)"),
    )
}

/// The answers about one uploaded image.
fn answer(ins: &Inspection, what: &str, p: &Params) -> Reply {
    let r = match what {
        "input.png" => {
            let mut png = Vec::new();
            return match ins
                .input
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            {
                Ok(()) => Reply {
                    status: 200,
                    content_type: "image/png",
                    body: png,
                },
                Err(e) => Reply::error(500, &format!("cannot encode the input: {e}")),
            };
        }
        "attention" => (|| {
            let map = ins.attention_map(p.layer(ins)?, p.head()?, p.query(ins)?)?;
            Ok(map_reply(map))
        })(),
        "rollout" => (|| {
            let fusion: HeadFusion = p.get("fusion").unwrap_or("mean").parse()?;
            let discard = p.number("discard", 0.0)?;
            let map = ins.rollout_map(p.layer(ins)?, fusion, discard, p.query(ins)?)?;
            Ok(map_reply(map))
        })(),
        "overview" => (|| {
            Ok(Reply::json(
                &json!({ "maps": ins.overview(p.query(ins)?)? }),
            ))
        })(),
        _ => return Reply::error(404, &format!("no '{what}' for an image")),
    };
    r.unwrap_or_else(Reply::bad)
}

fn map_reply(map: Vec<f32>) -> Reply {
    Reply::json(&json!({ "hottest": hottest(&map), "map": map }))
}

/// The `key=value&…` pairs of a query string. Values are plain words and numbers: no
/// percent-encoding is needed or accepted.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Result<Self> {
        let mut pairs = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let plain = |s: &str| {
                s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
            };
            if !plain(k) || !plain(v) {
                return Err(Error::Invalid(format!("unexpected query parameter '{kv}'")));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(Params(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| Error::Invalid(format!("{key} must be a number, got '{v}'"))),
        }
    }

    fn index(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| Error::Invalid(format!("{key} must be a whole number, got '{v}'")))
            })
            .transpose()
    }

    /// `layer=L`, default the last.
    fn layer(&self, ins: &Inspection) -> Result<usize> {
        Ok(self.index("layer")?.unwrap_or(ins.layout.depth - 1))
    }

    /// `head=H` or `head=mean` (the default).
    fn head(&self) -> Result<Option<usize>> {
        match self.get("head") {
            None | Some("mean") => Ok(None),
            Some(_) => self.index("head"),
        }
    }

    /// `query=cls|mean|patch:I`; the default is the class token's row where there is one.
    fn query(&self, ins: &Inspection) -> Result<Query> {
        match self.get("query") {
            None if ins.layout.class_token => Ok(Query::Cls),
            None | Some("mean") => Ok(Query::MeanQuery),
            Some("cls") if ins.layout.class_token => Ok(Query::Cls),
            Some("cls") => Err(Error::Invalid(
                "the model has no class token: ask for query=mean or query=patch:I".into(),
            )),
            Some(q) => match q.strip_prefix("patch:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Query::Patch(i)),
                _ => Err(Error::Invalid(format!(
                    "query must be cls, mean or patch:I, got '{q}'"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::testutil::{image, predictor};

    fn app() -> App {
        App::new(predictor("timm_tiny"), "timm_tiny".into(), 3, 1 << 20).unwrap()
    }

    fn body(r: &Reply) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    fn upload(app: &mut App) -> u64 {
        let r = app.handle("POST", "/api/images", &std::fs::read(image()).unwrap());
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        body(&r)["id"].as_u64().unwrap()
    }

    #[test]
    fn serves_its_assets_and_nothing_else() {
        let mut app = app();
        for (path, kind) in [
            ("/", "text/html"),
            ("/index.html", "text/html"),
            ("/explore.js", "text/javascript"),
            ("/explore.css", "text/css"),
            ("/favicon.svg", "image/svg+xml"),
        ] {
            let r = app.handle("GET", path, b"");
            assert_eq!(r.status, 200, "{path}");
            assert!(r.content_type.starts_with(kind), "{path}");
        }
        for path in [
            "/../Cargo.toml",
            "/src/explore/assets/index.html",
            "/etc/passwd",
            "//etc/passwd",
            "/api/images/1/../../../Cargo.toml",
            "/favicon.ico",
        ] {
            let r = app.handle("GET", path, b"");
            assert!(r.status == 404 || r.status == 400, "{path}: {}", r.status);
        }
        assert_eq!(app.handle("DELETE", "/", b"").status, 405);
        assert_eq!(app.handle("GET", "/api/images", b"").status, 405);
    }

    #[test]
    fn an_upload_gives_the_prediction_and_the_maps_of_the_library() {
        let mut app = app();
        let id = upload(&mut app);
        let r = body(&app.handle("GET", "/api/model", b""));
        assert_eq!(r["layout"]["grid_w"], 4);
        assert_eq!(r["colormaps"]["inferno"].as_array().unwrap().len(), 256);

        let p = predictor("timm_tiny");
        let img = crate::predict::load_image(&image()).unwrap();
        let ins = Inspection::run(&p, &img, 3).unwrap();
        let r = body(&app.handle(
            "GET",
            &format!("/api/images/{id}/attention?layer=1&head=2&query=patch:5"),
            b"",
        ));
        let want = ins.attention_map(1, Some(2), Query::Patch(5)).unwrap();
        let got: Vec<f32> = serde_json::from_value(r["map"].clone()).unwrap();
        assert_eq!(got, want);
        assert_eq!(r["hottest"], hottest(&want));

        let r = app.handle(
            "GET",
            &format!("/api/images/{id}/rollout?layer=0&fusion=max&discard=0.25"),
            b"",
        );
        let got: Vec<f32> = serde_json::from_value(body(&r)["map"].clone()).unwrap();
        assert_eq!(
            got,
            ins.rollout_map(0, HeadFusion::Max, 0.25, Query::Cls)
                .unwrap()
        );

        let r = body(&app.handle("GET", &format!("/api/images/{id}/overview?query=mean"), b""));
        assert_eq!(
            r["maps"].as_array().unwrap().len(),
            ins.layout.depth * ins.layout.heads
        );
        let png = app.handle("GET", &format!("/api/images/{id}/input.png"), b"");
        assert_eq!(png.content_type, "image/png");
        assert!(png.body.starts_with(b"\x89PNG"));
        let r = body(&app.handle("GET", "/api/pos-embed", b""));
        assert_eq!(r["n"], 16);
    }

    #[test]
    fn bad_requests_are_one_clear_message() {
        let mut app = app();
        let id = upload(&mut app);
        let cases = [
            (
                "POST",
                "/api/images".to_string(),
                b"not an image".to_vec(),
                400,
                "cannot decode image",
            ),
            ("POST", "/api/images".into(), Vec::new(), 400, "empty"),
            (
                "POST",
                "/api/images".into(),
                vec![0; (1 << 20) + 1],
                413,
                "too large",
            ),
            (
                "GET",
                format!("/api/images/{id}/attention?layer=9"),
                vec![],
                400,
                "layer 9",
            ),
            (
                "GET",
                format!("/api/images/{id}/attention?head=x"),
                vec![],
                400,
                "head",
            ),
            (
                "GET",
                format!("/api/images/{id}/attention?query=patch:99"),
                vec![],
                400,
                "patch 99",
            ),
            (
                "GET",
                format!("/api/images/{id}/rollout?discard=nan"),
                vec![],
                400,
                "discard",
            ),
            (
                "GET",
                format!("/api/images/{id}/rollout?discard=1"),
                vec![],
                400,
                "discard",
            ),
            (
                "GET",
                format!("/api/images/{id}/rollout?fusion=sum"),
                vec![],
                400,
                "fusion",
            ),
            (
                "GET",
                format!("/api/images/{id}/attention?q=%2e%2e"),
                vec![],
                400,
                "parameter",
            ),
            (
                "GET",
                "/api/images/77/attention".into(),
                vec![],
                404,
                "upload it again",
            ),
            (
                "GET",
                "/api/images/x/attention".into(),
                vec![],
                400,
                "not an image id",
            ),
        ];
        for (method, url, upload, status, message) in cases {
            let r = app.handle(method, &url, &upload);
            assert_eq!(r.status, status, "{url}");
            let e = body(&r)["error"].as_str().unwrap().to_string();
            assert!(e.contains(message), "{url}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn old_images_are_dropped() {
        let mut app = app();
        let first = upload(&mut app);
        for _ in 0..MAX_KEPT {
            upload(&mut app);
        }
        let r = app.handle("GET", &format!("/api/images/{first}/attention"), b"");
        assert_eq!(r.status, 404);
        assert_eq!(app.images.len(), MAX_KEPT);
    }

    #[test]
    fn a_model_without_global_attention_is_refused() {
        let cfg = crate::models::ModelConfig::preset("resnet18_fmnist").unwrap();
        let model = cfg.init_model(0, &candle_core::Device::Cpu).unwrap();
        let e = Layout::of(model.as_ref()).unwrap_err().to_string();
        assert!(e.contains("no global attention"), "{e}");
    }
}
