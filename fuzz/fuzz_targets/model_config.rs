//! A model config's text through `ModelConfig::from_text` (JSON when it starts with `{`,
//! else TOML), which validates it; a valid config is sized as `vit info` sizes it and
//! survives the saves the tool makes of it (JSON in checkpoint metadata, TOML in a run
//! folder's recipe).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::{Architecture, ModelConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let json = text.trim_start().starts_with('{');
    let path = Path::new(if json {
        "fuzz-config.json"
    } else {
        "fuzz-config.toml"
    });
    let Ok(cfg) = ModelConfig::from_text(text, path) else {
        return;
    };
    let _ = (
        cfg.num_params(),
        cfg.flops(),
        cfg.param_groups(),
        cfg.shape_flow(),
        cfg.tokens(),
        cfg.attention_heads(),
        cfg.default_preprocess(),
    );
    let as_json = serde_json::to_string(&cfg).expect("a valid config serialises to JSON");
    let back = ModelConfig::from_text(&as_json, Path::new("back.json"));
    assert_eq!(back.expect("its JSON reads back"), cfg);
    let as_toml = toml::to_string(&cfg).expect("a valid config serialises to TOML");
    let back = ModelConfig::from_text(&as_toml, Path::new("back.toml"));
    assert_eq!(back.expect("its TOML reads back"), cfg);
});
