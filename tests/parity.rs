//! Golden tests against timm and HuggingFace transformers: fixtures made by
//! `scripts/make_fixtures.py` (random-weight models, their inputs and outputs).

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::{assert_close, fixture, load};
use vit::weights::{resample_pos_embed, Checkpoint, PosResample};
use vit::{Architecture, Classifier, ModelConfig};

/// `cfg`'s network on the fitted `tensors`.
fn built(
    cfg: &ModelConfig,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
) -> Box<dyn Classifier> {
    cfg.build(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
        .unwrap()
}

fn model_from(dir: &str, cfg_file: &str) -> (ModelConfig, Box<dyn Classifier>) {
    let cfg = ModelConfig::from_file(&fixture(&format!("{dir}/{cfg_file}"))).unwrap();
    let ck = Checkpoint::load(&fixture(&format!("{dir}/model.safetensors"))).unwrap();
    let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    (cfg.clone(), cfg.build(vb).unwrap())
}

fn check_outputs(dir: &str, cfg_file: &str) {
    let (_, m) = model_from(dir, cfg_file);
    let want = load(&format!("{dir}/expected.safetensors"));
    let x = &want["input"];
    assert_close("logits", &m.forward(x).unwrap(), &want["logits"], 1e-4);
    assert_close(
        "features",
        &m.forward_features(x).unwrap(),
        &want["features"],
        1e-4,
    );
    let taken = m.forward_intermediates(x, &[0, 1]).unwrap();
    let (logits, attn) = (taken.logits, taken.attention);
    assert_close("logits (capture)", &logits, &want["logits"], 1e-4);
    assert_close("attn0", &attn[0], &want["attn0"], 1e-4);
    assert_close("attn1", &attn[1], &want["attn1"], 1e-4);
}

#[test]
fn timm_tiny_matches_timm() {
    check_outputs("timm_tiny", "config.json");
}

#[test]
fn distilled_deit_matches_timm() {
    check_outputs("deit_tiny", "config.json");
    // At 48 px: both prefix tokens kept, the patch grid resampled as timm does.
    let mut cfg = ModelConfig::from_file(&fixture("deit_tiny/config.json")).unwrap();
    cfg.set_image_size([48, 48]);
    let ck = Checkpoint::load(&fixture("deit_tiny/model.safetensors")).unwrap();
    let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
    assert!(warnings[0].contains("4x4 to a 6x6"), "{warnings:?}");
    let m = cfg
        .build(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
        .unwrap();
    let want = load("deit_tiny/expected.safetensors");
    let got = m.forward(&want["input_48"]).unwrap();
    assert_close("logits_48", &got, &want["logits_48"], 1e-4);
    // With a plain ViT config: a message that says what the checkpoint is.
    let plain = ModelConfig::from_file(&fixture("timm_tiny/config.json")).unwrap();
    let e = ck
        .fit(&plain, PosResample::Timm, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("distilled DeiT") && e.contains("deit_*_distilled_*"),
        "{e}"
    );
}

#[test]
fn the_documents_simple_cnn_matches_pytorch() {
    let (cfg, m) = model_from("cnn_simple", "config.json");
    assert_eq!(cfg.arch(), "cnn");
    let want = load("cnn_simple/expected.safetensors");
    let x = &want["input"];
    assert_close("logits", &m.forward(x).unwrap(), &want["logits"], 1e-4);
    let feats = m.forward_features(x).unwrap();
    assert_close("features", &feats, &want["features"], 1e-4);
}

#[test]
fn timm_mean_pool_fc_norm_no_class_token_non_square_matches_timm() {
    check_outputs("timm_meanpool", "config.json");
}

#[test]
fn hf_checkpoint_matches_transformers() {
    check_outputs("hf_tiny", "ours_config.json");
}

#[test]
fn hf_config_json_gives_the_architecture() {
    let ck = Checkpoint::load(&fixture("hf_tiny/model.safetensors")).unwrap();
    let ours = ModelConfig::from_file(&fixture("hf_tiny/ours_config.json")).unwrap();
    assert_eq!(ck.config.as_ref().unwrap(), &ours);
    assert_eq!(ck.class_names.as_ref().unwrap()[0], "airplane");
    let p = ck.preprocess.unwrap();
    assert_eq!(p.mean, vec![0.5; 3]);
}

#[test]
fn position_embedding_resampling_matches_timm_and_hf() {
    let want = load("timm_tiny/expected.safetensors");
    let pos = &want["pos_embed"];
    for (key, grid, mode) in [
        ("pos_timm_6x5", (6, 5), PosResample::Timm),
        ("pos_timm_3x2", (3, 2), PosResample::Timm),
        ("pos_hf_6x5", (6, 5), PosResample::Hf),
        ("pos_hf_3x2", (3, 2), PosResample::Hf),
    ] {
        let got = resample_pos_embed(pos, 1, (4, 4), grid, mode).unwrap();
        assert_close(key, &got, &want[key], 1e-5);
    }
}

#[test]
fn checkpoint_at_another_resolution_matches_timm() {
    // timm loads the 32-px checkpoint into a 48-px model through resample_abs_pos_embed.
    let mut cfg = ModelConfig::from_file(&fixture("timm_tiny/config.json")).unwrap();
    cfg.set_image_size([48, 48]);
    let ck = Checkpoint::load(&fixture("timm_tiny/model.safetensors")).unwrap();
    let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("4x4 to a 6x6"), "{warnings:?}");
    let m = cfg
        .build(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))
        .unwrap();
    let want = load("timm_tiny/expected.safetensors");
    assert_close(
        "logits_48",
        &m.forward(&want["input_48"]).unwrap(),
        &want["logits_48"],
        1e-4,
    );
}

#[test]
fn hf_round_trip_through_our_names() {
    let ck = Checkpoint::load(&fixture("timm_tiny/model.safetensors")).unwrap();
    let hf = vit::weights::to_hf_names(&ck.tensors).unwrap();
    assert!(hf.contains_key("vit.encoder.layer.1.attention.attention.value.weight"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&hf, &path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back.tensors.len(), ck.tensors.len());
    for (k, t) in &ck.tensors {
        let diff = (t - &back.tensors[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }
}

/// timm ResNets at small widths (`resnet_tiny/{basic,bottleneck}`: timm's stem on a
/// non-square input; bottlenecks with the small-image stem): evaluation outputs on the
/// running statistics, then one training-mode pass on batch statistics: logits, loss,
/// every parameter's gradient and the running statistics it leaves, as PyTorch's.
#[test]
fn resnets_match_timm_in_evaluation_and_training() {
    use vit::models::Mode;
    use vit::train::Trainable;
    for tag in ["basic", "bottleneck"] {
        let cfg = ModelConfig::from_file(&fixture(&format!("resnet_tiny/{tag}.json"))).unwrap();
        assert_eq!(cfg.arch(), "resnet");
        let ck = Checkpoint::load(&fixture(&format!("resnet_tiny/{tag}.safetensors"))).unwrap();
        let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        // timm's state dict also holds `num_batches_tracked` (int64): set aside.
        assert!(ck
            .ignored
            .iter()
            .all(|n| n.ends_with("num_batches_tracked")));
        let want = load(&format!("resnet_tiny/{tag}_expected.safetensors"));
        let x = &want["input"];
        let name = |n: &str| format!("{tag} {n}");
        // Within 1e-4, or 1e-5 of the tensor's largest magnitude (the perturbed networks'
        // features reach tens).
        let close = |n: &str, got: &candle_core::Tensor, want: &candle_core::Tensor| {
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_close(&name(n), got, want, (1e-5 * scale).max(1e-4));
        };

        let m = cfg
            .build(VarBuilder::from_tensors(
                tensors.clone(),
                DType::F32,
                &Device::Cpu,
            ))
            .unwrap();
        close("logits", &m.forward(x).unwrap(), &want["logits"]);
        let feats = m.forward_features(x).unwrap();
        close("features", &feats, &want["features"]);
        let levels: Vec<usize> = (0..cfg.depth()).collect();
        let first = x.narrow(0, 0, 1).unwrap();
        let taken = m.forward_intermediates(&first, &levels).unwrap();
        for (i, t) in taken.blocks.iter().enumerate() {
            close(&format!("level{i}"), t, &want[&format!("level{i}")]);
        }

        let net = Trainable::new(&cfg, &tensors, &Device::Cpu).unwrap();
        let logits = net.model.forward_t(x, &mut Mode::Train(None)).unwrap();
        close("train_logits", &logits, &want["train_logits"]);
        let labels = want["labels"].to_dtype(DType::U32).unwrap();
        let loss = vit::ops::cross_entropy(&logits, &labels, 0.0).unwrap();
        assert_close(
            &name("loss"),
            &loss.reshape(1).unwrap(),
            &want["train_loss"],
            1e-5,
        );
        let grads = loss.backward().unwrap();
        for (n, var) in &net.params {
            let g = grads.get(var.as_tensor()).unwrap();
            close(&format!("grad {n}"), g, &want[&format!("grad.{n}")]);
        }
        // The running statistics move only when the step commits the pass.
        let before = tensors["bn1.running_mean"].clone();
        let now = |n: &str| net.tensors()[n].clone();
        assert_close(&name("uncommitted"), &now("bn1.running_mean"), &before, 0.0);
        for bn in net.model.batch_norms() {
            bn.commit().unwrap();
        }
        assert_eq!(net.buffers.len(), cfg.buffer_shapes().len());
        for (n, _) in &net.buffers {
            assert_close(&name(n), &now(n), &want[&format!("after.{n}")], 1e-5);
        }
        // Evaluation on the moved statistics uses them (they differ from the file's).
        let frozen = net.frozen(&cfg).unwrap();
        let moved = frozen.forward(x).unwrap();
        let diff = (moved - &want["logits"]).unwrap().abs().unwrap();
        let diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(
            diff > 1e-4,
            "{tag}: evaluation ignored the new running statistics"
        );
    }
}

/// timm's parameter counts for the ResNets (`timm_param_counts.json`).
#[test]
fn resnet_presets_have_timms_parameter_counts() {
    let counts: std::collections::HashMap<String, usize> =
        serde_json::from_str(&std::fs::read_to_string(fixture("timm_param_counts.json")).unwrap())
            .unwrap();
    for name in ["resnet18", "resnet34", "resnet50"] {
        let cfg = ModelConfig::preset(name).unwrap();
        assert_eq!(cfg.num_params(), counts[name], "{name}");
    }
}

/// A timm model (`{dir}/{tag}`: weights, config, timm's key order, expected outputs): our
/// parameter list in timm's state-dict order, evaluation logits, features and (for the
/// hierarchical family) stage outputs, and one training-mode pass with every parameter's
/// gradient, as PyTorch's. Returns the fitted tensors and the expected outputs.
fn check_against_timm(
    dir: &str,
    tag: &str,
    arch: &str,
) -> (
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    use vit::models::Mode;
    use vit::train::Trainable;
    let cfg = ModelConfig::from_file(&fixture(&format!("{dir}/{tag}.json"))).unwrap();
    assert_eq!(cfg.arch(), arch);
    let keys: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("{dir}/{tag}_keys.json"))).unwrap(),
    )
    .unwrap();
    let ours: Vec<String> = cfg.state_shapes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(ours, keys, "{tag}: parameter order");
    let ck = Checkpoint::load(&fixture(&format!("{dir}/{tag}.safetensors"))).unwrap();
    let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
    assert!(warnings.is_empty() && ck.ignored.is_empty(), "{warnings:?}");
    let want = load(&format!("{dir}/{tag}_expected.safetensors"));
    let x = &want["input"];
    let name = |n: &str| format!("{tag} {n}");
    let m = cfg
        .build(VarBuilder::from_tensors(
            tensors.clone(),
            DType::F32,
            &Device::Cpu,
        ))
        .unwrap();
    assert_close(
        &name("logits"),
        &m.forward(x).unwrap(),
        &want["logits"],
        1e-4,
    );
    let feats = m.forward_features(x).unwrap();
    assert_close(&name("features"), &feats, &want["features"], 1e-4);
    let levels: Vec<usize> = (0..cfg.depth()).collect();
    let taken = m.forward_intermediates(x, &levels).unwrap();
    let staged = want.contains_key("level0");
    for (i, t) in taken.blocks.iter().enumerate().filter(|_| staged) {
        assert_close(
            &name(&format!("level{i}")),
            t,
            &want[&format!("level{i}")],
            1e-4,
        );
    }

    let net = Trainable::new(&cfg, &tensors, &Device::Cpu).unwrap();
    let logits = net.model.forward_t(x, &mut Mode::Train(None)).unwrap();
    assert_close(&name("train_logits"), &logits, &want["train_logits"], 1e-4);
    let labels = want["labels"].to_dtype(DType::U32).unwrap();
    let loss = vit::ops::cross_entropy(&logits, &labels, 0.0).unwrap();
    let loss_1 = loss.reshape(1).unwrap();
    assert_close(&name("loss"), &loss_1, &want["train_loss"], 1e-5);
    let grads = loss.backward().unwrap();
    assert_eq!(net.params.len(), keys.len());
    for (n, var) in &net.params {
        let g = grads.get(var.as_tensor()).unwrap();
        assert_close(
            &name(&format!("grad {n}")),
            g,
            &want[&format!("grad.{n}")],
            1e-4,
        );
    }
    (tensors, want)
}

/// timm Swin Transformers at small widths (`swin_tiny/{pad,fmnist}`: padded maps, shifts
/// in one direction, odd sizes merged; the swin_fmnist geometry).
#[test]
fn swins_match_timm_in_evaluation_and_training() {
    for tag in ["pad", "fmnist"] {
        check_against_timm("swin_tiny", tag, "swin");
    }
}

/// A timm PVT v2 at small widths (`pvt_tiny/pvt`: spatial reduction, depth-wise
/// convolutions, a non-square input whose sides the strided embeddings round up).
#[test]
fn pvt_matches_timm_in_evaluation_and_training() {
    check_against_timm("pvt_tiny", "pvt", "pvt");
}

/// timm hybrid ViTs at small widths (`hybrid_tiny/{r,deep}`: ResNetV2 stages on the 7×7
/// stem with uneven SAME padding, and the small-image presets' deep stem cut into 2×2
/// cells), and the backbone's feature map itself.
#[test]
fn hybrid_vits_match_timm_in_evaluation_and_training() {
    use vit::models::vit::Embed;
    for tag in ["r", "deep"] {
        let (tensors, want) = check_against_timm("hybrid_tiny", tag, "vit");
        let cfg = ModelConfig::from_file(&fixture(&format!("hybrid_tiny/{tag}.json"))).unwrap();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let m = vit::VisionTransformer::new(cfg.as_vit().unwrap(), vb).unwrap();
        let Embed::Hybrid(embed) = &m.patch_embed else {
            panic!("{tag}: a backbone in the config makes a hybrid")
        };
        let x = want["input"].permute((0, 2, 3, 1)).unwrap();
        let map = embed.backbone.forward(&x).unwrap(); // (B, h, w, F)
        let map = map.permute((0, 3, 1, 2)).unwrap();
        assert_close(
            &format!("{tag} feature map"),
            &map,
            &want["feature_map"],
            1e-4,
        );
    }
}

/// timm's parameter counts for Swin-T, -S, -B, PVT v2 b0, b1, b2 and the hybrid ViTs
/// (`timm_param_counts.json`).
#[test]
fn swin_pvt_and_hybrid_presets_have_timms_parameter_counts() {
    let counts: std::collections::HashMap<String, usize> =
        serde_json::from_str(&std::fs::read_to_string(fixture("timm_param_counts.json")).unwrap())
            .unwrap();
    for name in [
        "swin_tiny_patch4_window7_224",
        "swin_small_patch4_window7_224",
        "swin_base_patch4_window7_224",
        "pvt_v2_b0",
        "pvt_v2_b1",
        "pvt_v2_b2",
        "vit_tiny_r_s16_p8_224",
        "vit_small_r26_s32_224",
        "vit_base_r50_s16_384",
    ] {
        let cfg = ModelConfig::preset(name).unwrap();
        assert_eq!(cfg.num_params(), counts[name], "{name}");
    }
}

/// The paper's own `.npz` checkpoints (`jax_tiny/`: small random ViTs written in the layout of
/// google-research/vision_transformer and read back by timm's `_load_weights`): every array
/// used, the config read off the archive (given for the staged hybrid, whose GroupNorm group
/// count the archive does not hold), and timm's logits.
#[test]
fn jax_npz_checkpoints_load_as_timm_loads_them() {
    for tag in ["vit", "stem", "r"] {
        let ck = Checkpoint::load(&fixture(&format!("jax_tiny/{tag}.npz"))).unwrap();
        assert!(ck.ignored.is_empty(), "{tag}: {:?}", ck.ignored);
        if tag == "r" {
            // 8-channel GroupNorms cannot have the 32 groups a config read off an archive
            // assumes: no config, so a preset or config must say.
            assert!(ck.config.is_none());
        }
        let cfg = match &ck.config {
            Some(c) => c.clone(),
            None => ModelConfig::from_file(&fixture("jax_tiny/r.json")).unwrap(),
        };
        let v = cfg.as_vit().unwrap();
        match tag {
            "vit" => assert_eq!(
                (
                    v.image_size,
                    v.patch_size,
                    v.embed_dim,
                    v.depth,
                    v.num_heads,
                    v.num_classes
                ),
                ([16, 16], 4, 16, 2, 2, 5)
            ),
            "stem" => {
                let bb = v.backbone.as_ref().unwrap();
                assert_eq!((bb.layers.len(), bb.stem_channels), (0, 32));
                assert_eq!(
                    (v.image_size, v.patch_size, v.num_classes),
                    ([16, 16], 2, 4)
                );
            }
            _ => assert_eq!(v.backbone.as_ref().unwrap().layers, [1, 2]),
        }
        assert!((v.mlp_ratio - if tag == "vit" { 2.0 } else { 4.0 }).abs() < 1e-12);
        let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let m = built(&cfg, tensors);
        let want = load(&format!("jax_tiny/{tag}_expected.safetensors"));
        let got = m.forward(&want["input"]).unwrap();
        assert_close(&format!("{tag} logits"), &got, &want["logits"], 1e-4);
    }
}

/// A folder as timm's `save_for_hf` and the Hub's timm/* repos lay it out (`timm_hub/`:
/// model.safetensors, config.json with architecture, model_args, pretrained_cfg and
/// label_names): no preset needed; the model timm builds from it, its preprocessing and
/// class names.
#[test]
fn a_timm_hub_folder_describes_its_model() {
    let dir = fixture("timm_hub");
    let ck = Checkpoint::load(&dir).unwrap();
    let cfg = ck.config.clone().unwrap();
    let v = cfg.as_vit().unwrap();
    assert_eq!(
        (
            v.image_size,
            v.patch_size,
            v.embed_dim,
            v.depth,
            v.num_heads,
            v.num_classes
        ),
        ([32, 32], 8, 16, 1, 2, 3)
    );
    let pre = ck.preprocess.clone().unwrap();
    assert_eq!((pre.crop_pct, pre.interpolation.as_str()), (0.9, "bicubic"));
    assert_eq!(ck.class_names.clone().unwrap(), ["cat", "dog", "fish"]);
    let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let m = built(&cfg, tensors);
    let want = load("timm_hub/expected.safetensors");
    assert_close(
        "logits",
        &m.forward(&want["input"]).unwrap(),
        &want["logits"],
        1e-4,
    );
}
