//! bf16 inference of a whole ViT against f32, in a process of its own (the precision is a
//! process-wide setting): ViT-Ti/16 with random weights, logits' cosine similarity ≥ 0.999
//! and the same top class for every image.

use candle_core::{Device, Tensor};
use vit::ops::{set_inference_dtype, Precision};
use vit::{Classifier, ModelConfig};

#[test]
fn bf16_logits_follow_f32() {
    #[cfg(target_arch = "x86_64")]
    let supported = std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    let supported = false;
    if !supported {
        let e = set_inference_dtype(Precision::Bf16).unwrap_err();
        assert!(e.to_string().contains("AVX512_BF16"), "{e}");
        eprintln!("no avx512bf16 on this CPU: only the refusal checked");
        return;
    }
    let dev = Device::Cpu;
    let cfg = ModelConfig::preset("vit_tiny_patch16_224").unwrap();
    let model: Box<dyn Classifier> = cfg.init_model(3, &dev).unwrap();
    let n = 4 * 3 * 224 * 224;
    let pixels: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.0137).sin()).collect();
    let x = Tensor::from_vec(pixels, (4, 3, 224, 224), &dev).unwrap();
    let f32_logits = model.forward(&x).unwrap();
    set_inference_dtype(Precision::Bf16).unwrap();
    let bf16_logits = model.forward(&x).unwrap();
    set_inference_dtype(Precision::F32).unwrap();
    let again = model.forward(&x).unwrap();
    let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
    let (a, b, c) = (rows(&f32_logits), rows(&bf16_logits), rows(&again));
    assert_eq!(a, c, "back to f32, the same logits as before");
    for (ra, rb) in a.iter().zip(&b) {
        let dot: f64 = ra.iter().zip(rb).map(|(x, y)| *x as f64 * *y as f64).sum();
        let norm = |r: &[f32]| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (norm(ra) * norm(rb));
        assert!(cos >= 0.999, "cosine {cos}");
        assert_ne!(ra, rb, "bf16 changed nothing: was it used?");
        let top = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
        assert_eq!(top(ra), top(rb));
    }
}
