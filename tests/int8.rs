//! int8 inference of whole models against f32 (`vit quantize`'s scheme, quantized in
//! memory): ViT-Ti/16 with random weights, logits' cosine similarity ≥ 0.999 and the same
//! top class for every image; ViT-B/16 the same (ignored by default: 86M parameters; run with
//! `cargo test --release --test int8 -- --ignored`; the same numbers on every kernel); an
//! architecture without int8 layers refused in one line.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use vit::models::Architecture;
use vit::{Classifier, ModelConfig};

fn cosines(preset: &str, images: usize) -> Vec<f64> {
    let dev = Device::Cpu;
    let cfg = ModelConfig::preset(preset).unwrap();
    let mut params: HashMap<String, Tensor> =
        cfg.init_params(3, &dev).unwrap().into_iter().collect();
    let f32_model: Box<dyn Classifier> = cfg
        .build(VarBuilder::from_tensors(params.clone(), DType::F32, &dev))
        .unwrap();
    let layers = vit::quant::quantize_tensors(&cfg, &mut params).unwrap();
    assert_eq!(layers.len(), 4 * cfg.as_vit().unwrap().depth + 1);
    let int8_model = cfg
        .build(VarBuilder::from_tensors(params, DType::F32, &dev))
        .unwrap();
    let n = images * 3 * 224 * 224;
    let pixels: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.0137).sin()).collect();
    let x = Tensor::from_vec(pixels, (images, 3, 224, 224), &dev).unwrap();
    let rows = |m: &dyn Classifier| m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
    let (a, b) = (rows(f32_model.as_ref()), rows(int8_model.as_ref()));
    let top = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
    a.iter()
        .zip(&b)
        .map(|(ra, rb)| {
            assert_ne!(ra, rb, "int8 changed nothing: was it used?");
            assert_eq!(top(ra), top(rb));
            let dot: f64 = ra.iter().zip(rb).map(|(x, y)| *x as f64 * *y as f64).sum();
            let norm = |r: &[f32]| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            dot / (norm(ra) * norm(rb))
        })
        .collect()
}

#[test]
fn int8_vit_tiny_follows_f32() {
    for c in cosines("vit_tiny_patch16_224", 3) {
        assert!(c >= 0.999, "cosine {c}");
    }
}

#[test]
#[ignore = "ViT-B/16: 86M parameters; run with --release -- --ignored"]
fn int8_vit_base_follows_f32() {
    let cs = cosines("vit_base_patch16_224", 2);
    let kernel = vit::ops::int8_kernel();
    eprintln!("ViT-B/16 int8 ({kernel}) against f32, logits' cosine per image: {cs:?}");
    for c in cs {
        assert!(c >= 0.999, "cosine {c}");
    }
}

#[test]
fn architectures_without_int8_layers_are_refused() {
    for preset in ["swin_tiny_patch4_window7_224", "resnet18"] {
        let cfg = ModelConfig::preset(preset).unwrap();
        let mut params = HashMap::new();
        let e = vit::quant::quantize_tensors(&cfg, &mut params)
            .unwrap_err()
            .to_string();
        assert!(e.contains("supports the ViT family"), "{preset}: {e}");
    }
}
