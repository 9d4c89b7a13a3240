//! Recipe TOML through `Recipe::from_toml` and `validate`; a valid recipe's model config
//! is sized as `vit info` sizes it, and the recipe survives the save a training run makes
//! of it (`config.toml`, read back by `--resume`).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::train::Recipe;
use vit::Architecture;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz-recipe.toml");
    let Ok(recipe) = Recipe::from_toml(text, path) else {
        return;
    };
    if recipe.validate().is_err() {
        return;
    }
    let cfg = recipe
        .model_config()
        .expect("validate accepted the recipe's model config");
    let _ = (
        cfg.num_params(),
        cfg.flops(),
        cfg.param_groups(),
        cfg.shape_flow(),
    );
    let saved = toml::to_string(&recipe).expect("a valid recipe can be saved");
    let back = Recipe::from_toml(&saved, path).expect("a saved recipe reads back");
    back.validate().expect("a saved valid recipe is valid");
    // Compared as text: the struct may hold a NaN that an override makes harmless.
    assert_eq!(toml::to_string(&back).ok().as_deref(), Some(saved.as_str()));
});
