use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::models::vit::init_params;
use crate::models::{Architecture, Mode, Preprocess, ViTConfig};
use crate::predict::load_model;

fn tiny() -> ViTConfig {
    ViTConfig {
        num_classes: 5,
        ..ViTConfig::timm(32, 8, 48, 3, 3)
    }
}

fn saved(dir: &Path, cfg: &ViTConfig) -> PathBuf {
    let params: HashMap<String, Tensor> = init_params(cfg, 1, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let path = dir.join("f32.safetensors");
    let cfg = ModelConfig::Vit(cfg.clone());
    let pre = Preprocess::vit_default(3);
    let meta = SaveMeta {
        config: Some(&cfg),
        preprocess: Some(&pre),
        class_names: None,
        extra: vec![],
    };
    weights::save(&path, &params, &HashMap::new(), &meta).unwrap();
    path
}

fn logits(path: &Path, x: &Tensor) -> Vec<f32> {
    let (model, _) = load_model(
        path,
        &Arch::FromCheckpoint,
        FitOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    model
        .forward_t(x, &mut Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn weights_quantize_within_half_a_step_per_channel() {
    let w = Tensor::randn(0f32, 1.0, (7, 33), &Device::Cpu)
        .unwrap()
        .broadcast_mul(
            &Tensor::new(
                &[[0.01f32], [0.1], [1.0], [10.0], [0.0], [3.0], [1e-3]],
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    let q = Int8Weight::quantize(&w).unwrap();
    let values = q.to_i8().unwrap();
    assert!(values.iter().all(|v| (-127..=127).contains(v)));
    let scale = q.scale.to_vec1::<f32>().unwrap();
    assert_eq!(scale[4], 0.0, "a channel of zeros");
    let back = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
    let w = w.to_vec2::<f32>().unwrap();
    for c in 0..7 {
        let amax = w[c].iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!((scale[c] - amax / 127.0).abs() <= 1e-7 * amax);
        for j in 0..33 {
            assert!(
                (w[c][j] - back[c][j]).abs() <= 0.5 * scale[c] * (1.0 + 1e-6),
                "({c},{j})"
            );
        }
    }
    let bad = Tensor::new(&[[1.0f32, f32::NAN]], &Device::Cpu).unwrap();
    assert!(Int8Weight::quantize(&bad)
        .unwrap_err()
        .to_string()
        .contains("NaN"));
}

#[test]
fn quantized_checkpoint_round_trips_and_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let f32_path = saved(dir.path(), &cfg);
    let q_path = dir.path().join("int8.safetensors");
    let report = quantize_checkpoint(&f32_path, &q_path, &Arch::FromCheckpoint, None).unwrap();
    assert_eq!(report.layers.len(), 4 * 3 + 1);
    assert!(report.bytes_out < report.bytes_in);

    // On disk: I8 values, F32 scales, the scheme in the metadata.
    let bytes = std::fs::read(&q_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("blocks.0.attn.qkv.weight").unwrap().dtype(),
        safetensors::Dtype::I8
    );
    assert_eq!(
        st.tensor("blocks.0.attn.qkv.weight_scale").unwrap().dtype(),
        safetensors::Dtype::F32
    );
    assert_eq!(
        st.tensor("head.weight").unwrap().dtype(),
        safetensors::Dtype::F32
    );
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let scheme: Scheme =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()[META_QUANT]).unwrap();
    assert_eq!(scheme.layers, report.layers);

    // The loaded int8 model: the same values as quantizing in memory, and close to f32.
    let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let (a, b) = (logits(&f32_path, &x), logits(&q_path, &x));
    let c = cosine(&a, &b);
    assert!(c > 0.999, "cosine {c}");
    assert_ne!(a, b, "the int8 path ran");
    let (model, fitted) = load_model(
        &q_path,
        &Arch::FromCheckpoint,
        FitOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(fitted.is_int8());
    assert!(fitted
        .require_f32("training")
        .unwrap_err()
        .to_string()
        .contains("inference only"));
    // Inference only: a tracked input is refused in one line.
    let var = candle_core::Var::from_tensor(&x).unwrap();
    let e = model
        .forward_t(var.as_tensor(), &mut Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(e.contains("inference only"), "{e}");

    // Quantizing again is refused.
    let e = quantize_checkpoint(
        &q_path,
        &dir.path().join("x.safetensors"),
        &Arch::FromCheckpoint,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already int8"), "{e}");
}

#[test]
fn int8_outside_the_quantized_layers_or_without_scales_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let f32_path = saved(dir.path(), &cfg);
    let q_path = dir.path().join("int8.safetensors");
    quantize_checkpoint(&f32_path, &q_path, &Arch::FromCheckpoint, None).unwrap();
    let ck = weights::Checkpoint::load(&q_path).unwrap();
    let mcfg = ModelConfig::Vit(cfg.clone());

    let mut no_scale = weights::Checkpoint::load(&q_path).unwrap();
    no_scale.tensors.remove("blocks.1.mlp.fc2.weight_scale");
    let e = no_scale
        .fit(&mcfg, Default::default(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocks.1.mlp.fc2.weight_scale are missing"),
        "{e}"
    );

    let mut head = weights::Checkpoint::load(&q_path).unwrap();
    let h = Int8Weight::quantize(&head.tensors["head.weight"]).unwrap();
    head.tensors.insert("head.weight".into(), h.values);
    head.tensors.insert("head.weight_scale".into(), h.scale);
    let e = head
        .fit(&mcfg, Default::default(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head.weight is int8"), "{e}");

    let mut bad_scale = weights::Checkpoint::load(&q_path).unwrap();
    let s = &bad_scale.tensors["blocks.0.attn.proj.weight_scale"];
    let mut v = s.to_vec1::<f32>().unwrap();
    v[2] = f32::INFINITY;
    bad_scale.tensors.insert(
        "blocks.0.attn.proj.weight_scale".into(),
        Tensor::new(v, &Device::Cpu).unwrap(),
    );
    let e = bad_scale
        .fit(&mcfg, Default::default(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-finite"), "{e}");

    assert_eq!(ck.tensors["blocks.0.attn.qkv.weight"].dtype(), DType::U8);

    // A calibrated input range of the wrong shape, or one without 0 in it.
    let mut range = weights::Checkpoint::load(&q_path).unwrap();
    let name = "blocks.0.attn.qkv.input_range";
    range.tensors.insert(
        name.into(),
        Tensor::new(&[0f32, 1.0, 2.0], &Device::Cpu).unwrap(),
    );
    let e = range
        .fit(&mcfg, Default::default(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected f32 [2]"), "{e}");
    range.tensors.insert(
        name.into(),
        Tensor::new(&[0.5f32, 2.0], &Device::Cpu).unwrap(),
    );
    let (tensors, _) = range.fit(&mcfg, Default::default(), None).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let e = mcfg.build(vb).unwrap_err().to_string();
    assert!(e.contains("must be finite and hold 0"), "{e}");
}

/// A checkpoint without preprocessing read as a preset (timm's files): the int8 copy keeps
/// the preset's pretrained preprocessing, which `vit predict --preset` would have used.
#[test]
fn a_preset_checkpoint_keeps_the_presets_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let preset = "vit_tiny_patch16_224";
    let cfg = ModelConfig::preset(preset).unwrap();
    let params: HashMap<String, Tensor> = cfg
        .init_params(0, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let input = dir.path().join("timm.safetensors");
    weights::save(&input, &params, &HashMap::new(), &SaveMeta::default()).unwrap();
    let out = dir.path().join("int8.safetensors");
    quantize_checkpoint(&input, &out, &Arch::Preset(preset.into()), None).unwrap();
    let ck = weights::Checkpoint::load(&out).unwrap();
    let want = crate::models::preset_preprocess(preset).unwrap();
    assert_eq!(ck.preprocess.as_ref(), Some(&want));
    assert_ne!(
        want,
        cfg.default_preprocess(),
        "the test would not tell them apart"
    );
}
