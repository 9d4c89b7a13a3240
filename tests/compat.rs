//! Files written before model configs were tagged with `arch` still load: a run folder made
//! by the tool at f264a6e (`tests/fixtures/legacy_run`: its saved recipe and last checkpoint,
//! a 2-block mean-pooled ViT trained 3 steps on Fashion-MNIST) and the logits that tool
//! printed for one image (`vit predict --format json --logits`).

mod common;

use common::fixture;
use vit::predict::{LoadOptions, Predictor};
use vit::train::Recipe;
use vit::weights::Checkpoint;

#[test]
fn a_recipe_written_before_the_arch_tag_loads_as_a_vit() {
    let r = Recipe::from_file(&fixture("legacy_run/config.toml")).unwrap();
    r.validate().unwrap();
    let cfg = r.model_config().unwrap();
    let vit = cfg.as_vit().unwrap();
    assert_eq!((vit.embed_dim, vit.depth, vit.num_heads), (16, 2, 2));
    assert!(vit.fc_norm && !vit.class_token);
    // The checkpoint's own config (JSON metadata, also untagged) is the same model.
    let ck = Checkpoint::load(&fixture("legacy_run/checkpoint-last.safetensors")).unwrap();
    assert_eq!(ck.config.as_ref(), Some(&cfg));
    assert_eq!(cfg.num_params(), 5_706);
}

#[test]
fn a_checkpoint_written_before_the_arch_tag_gives_the_same_logits() {
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("legacy_run/predict_image_rgb.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<f32> = want["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let p = Predictor::load(
        &fixture("legacy_run/checkpoint-last.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap();
    let got = p
        .predict(&fixture("predict/image_rgb.png"), 3)
        .unwrap()
        .logits;
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "logit {i}: got {g}, want {w}");
    }
    assert_eq!(p.class_names[7], "Sneaker");
}
