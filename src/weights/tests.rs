use super::*;
use crate::models::vit::init_params;
use crate::models::{ModelConfig, Preprocess, ViTConfig};

/// The tagged config of a ViT, as `fit` and `save` take it.
fn vit(c: &ViTConfig) -> ModelConfig {
    ModelConfig::Vit(c.clone())
}

fn tiny() -> ViTConfig {
    ViTConfig {
        num_classes: 4,
        ..ViTConfig::timm(16, 8, 16, 2, 2)
    }
}

fn saved(dir: &Path, cfg: &ViTConfig) -> PathBuf {
    let params: HashMap<String, Tensor> = init_params(cfg, 0, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let path = dir.join("m.safetensors");
    let pre = Preprocess::vit_default(3);
    let names: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    let cfg = vit(cfg);
    let meta = SaveMeta {
        config: Some(&cfg),
        preprocess: Some(&pre),
        class_names: Some(&names),
        extra: vec![],
    };
    let state = HashMap::from([(
        "step".to_string(),
        Tensor::new(&[7i64], &Device::Cpu).unwrap(),
    )]);
    save(&path, &params, &state, &meta).unwrap();
    path
}

#[test]
fn save_load_round_trips_bit_for_bit_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let path = saved(dir.path(), &cfg);
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.naming, Naming::Timm);
    assert_eq!(ck.config.as_ref(), Some(&vit(&cfg)));
    assert_eq!(ck.class_names.as_ref().unwrap()[3], "c3");
    assert_eq!(ck.train_state["step"].to_vec1::<i64>().unwrap(), vec![7]);
    let orig = init_params(&cfg, 0, &Device::Cpu).unwrap();
    for (name, t) in orig {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = ck.tensors[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{name}");
    }
    let (fitted, warnings) = ck.fit(&vit(&cfg), PosResample::Timm, None).unwrap();
    assert!(warnings.is_empty());
    assert_eq!(fitted.len(), cfg.param_shapes().len());
}

#[test]
fn corrupt_and_truncated_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(dir.path(), &tiny());
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = Checkpoint::load(&cut).unwrap_err().to_string();
    assert!(
        e.contains("cut.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    // The same checks on bytes in memory, errors naming the given path.
    let e = Checkpoint::from_bytes(&bytes[..bytes.len() - 100], Path::new("mem.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mem.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let e = Checkpoint::from_bytes(&bytes[..5], &cut)
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 bytes, no header"), "{e}");
    let ck = Checkpoint::from_bytes(&bytes, &path).unwrap();
    assert_eq!(ck.config.as_ref(), Some(&vit(&tiny())));
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello world, not a checkpoint").unwrap();
    let e = Checkpoint::load(&junk).unwrap_err().to_string();
    assert!(e.contains("not a valid safetensors"), "{e}");
    let e = Checkpoint::load(&dir.path().join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("absent.safetensors") && e.contains("No such file"),
        "{e}"
    );
}

/// A checkpoint path that is a device or a pipe, or whose header claims more than the file
/// holds, is refused before anything is read or allocated.
#[test]
fn special_files_and_lying_headers_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = Checkpoint::load(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let zeros = dir.path().join("zeros.safetensors");
    let f = std::fs::File::create(&zeros).unwrap();
    f.set_len(1 << 40).unwrap(); // a sparse terabyte of zeros
    let e = Checkpoint::load(&zeros).unwrap_err().to_string();
    assert!(e.contains("header length 0"), "{e}");
    let huge = dir.path().join("huge.safetensors");
    std::fs::write(&huge, u64::MAX.to_le_bytes()).unwrap();
    let e = Checkpoint::load(&huge).unwrap_err().to_string();
    assert!(e.contains("header length"), "{e}");
    // A valid header whose tensor claims a terabyte the 100-byte file does not have.
    let header =
        br#"{"w":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    let lie = dir.path().join("lie.safetensors");
    std::fs::write(&lie, &bytes).unwrap();
    let e = Checkpoint::load(&lie).unwrap_err().to_string();
    assert!(e.contains("lays out 1099511627"), "{e}");
    // An end offset near u64::MAX overflowed the layout sum: a panic in debug builds, a
    // wrap-around (possibly to the file's length) in release. Seen while writing the fuzz
    // targets; fuzz/seeds/safetensors/regress-offset-overflow.safetensors keeps it.
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 4]);
    let wrap = dir.path().join("wrap.safetensors");
    std::fs::write(&wrap, &bytes).unwrap();
    let e = Checkpoint::load(&wrap).unwrap_err().to_string();
    assert!(
        e.contains("wrap.safetensors") && e.contains("more than 2^64"),
        "{e}"
    );
    let e = Checkpoint::from_bytes(&bytes, &wrap)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than 2^64"), "{e}");
}

/// The position embedding is resampled only once everything else fits: a small file naming
/// a large model got the large embedding allocated before it was refused (2.3 KB, 128 MiB:
/// fuzz/seeds/safetensors/regress-resample-first.safetensors). And one with no patch
/// positions is refused (its patch count underflowed: a panic in debug builds).
#[test]
fn fit_checks_the_other_tensors_before_resampling_the_position_embedding() {
    let cfg = tiny(); // 2x2 grid, class token, width 16
    let checkpoint = |pos: Tensor| Checkpoint {
        path: PathBuf::from("small.safetensors"),
        naming: Naming::Timm,
        tensors: HashMap::from([("pos_embed".to_string(), pos)]),
        train_state: HashMap::new(),
        ignored: Vec::new(),
        config: None,
        preprocess: None,
        class_names: None,
        metadata: HashMap::new(),
    };
    // 3 patch positions are no square grid: resampling first failed on that.
    let ck = checkpoint(Tensor::zeros((1, 4, 16), DType::F32, &Device::Cpu).unwrap());
    let e = ck
        .fit(&vit(&cfg), PosResample::Timm, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not fit the architecture (missing tensors"),
        "{e}"
    );
    let ck = checkpoint(Tensor::zeros((1, 0, 16), DType::F32, &Device::Cpu).unwrap());
    let e = ck
        .fit(&vit(&cfg), PosResample::Timm, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor pos_embed: expected [1, 5, 16], found [1, 0, 16]"),
        "{e}"
    );
}

#[test]
fn fit_names_the_mismatching_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let ck = Checkpoint::load(&saved(dir.path(), &cfg)).unwrap();
    let wider = ViTConfig {
        mlp_ratio: 2.0,
        ..cfg.clone()
    };
    let e = ck
        .fit(&vit(&wider), PosResample::Timm, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor blocks.0.mlp.fc1.weight: expected [32, 16], found [64, 16]"),
        "{e}"
    );
    let deeper = ViTConfig {
        depth: 3,
        ..cfg.clone()
    };
    let e = ck
        .fit(&vit(&deeper), PosResample::Timm, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing tensors: blocks.2."), "{e}");
    let shallower = ViTConfig {
        depth: 1,
        ..cfg.clone()
    };
    let e = ck
        .fit(&vit(&shallower), PosResample::Timm, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpected tensors: blocks.1."), "{e}");
}

#[test]
fn head_of_another_size_is_replaced_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ck = Checkpoint::load(&saved(dir.path(), &tiny())).unwrap();
    let ten = ViTConfig {
        num_classes: 10,
        ..tiny()
    };
    let e = ck
        .fit(&vit(&ten), PosResample::Timm, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head has 4 classes but the config asks for 10"),
        "{e}"
    );
    let fresh = |dist: bool| {
        let mut m = std::collections::HashMap::new();
        for h in if dist {
            vec!["head", "head_dist"]
        } else {
            vec!["head"]
        } {
            let w = Tensor::zeros((10, 16), DType::F32, &Device::Cpu).unwrap();
            m.insert(format!("{h}.weight"), w);
            let b = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
            m.insert(format!("{h}.bias"), b);
        }
        m
    };
    let (t, w) = ck
        .fit(&vit(&ten), PosResample::Timm, Some(fresh(false)))
        .unwrap();
    assert_eq!(t["head.weight"].dims(), &[10, 16]);
    assert!(w[0].contains("head dropped"), "{w:?}");
    // A distilled DeiT fine-tuned to another class count: both heads replaced.
    let deit4 = ViTConfig {
        distilled: true,
        ..tiny()
    };
    let ck = Checkpoint::load(&saved(dir.path(), &deit4)).unwrap();
    let deit10 = ViTConfig {
        num_classes: 10,
        ..deit4.clone()
    };
    let (t, w) = ck
        .fit(&vit(&deit10), PosResample::Timm, Some(fresh(true)))
        .unwrap();
    assert_eq!(t["head_dist.weight"].dims(), &[10, 16]);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[1].contains("head_dist dropped"), "{w:?}");
    let e = ck.fit(&vit(&deit10), PosResample::Timm, None).unwrap_err();
    assert!(e.to_string().contains("head has 4 classes"), "{e}");
    let ck = Checkpoint::load(&saved(dir.path(), &tiny())).unwrap();
    let features = ViTConfig {
        num_classes: 0,
        ..tiny()
    };
    let (t, _) = ck.fit(&vit(&features), PosResample::Timm, None).unwrap();
    assert!(!t.contains_key("head.weight"));
}

#[test]
fn hf_names_with_and_without_the_vit_prefix_map_to_timm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let timm: HashMap<String, Tensor> = init_params(&cfg, 1, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let hf = to_hf_names(&timm).unwrap();
    // HF's bare ViTModel has no "vit." prefix and no classifier, but a pooler.
    let mut bare: HashMap<String, Tensor> = hf
        .iter()
        .filter(|(k, _)| k.starts_with("vit."))
        .map(|(k, t)| (k.trim_start_matches("vit.").to_string(), t.clone()))
        .collect();
    bare.insert(
        "pooler.dense.weight".into(),
        Tensor::zeros((16, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.path().join("bare.safetensors");
    candle_core::safetensors::save(&bare, &path).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(ck.naming, Naming::Hf);
    assert_eq!(ck.ignored, vec!["pooler.dense.weight".to_string()]);
    let features = ViTConfig {
        num_classes: 0,
        ..cfg
    };
    let (t, _) = ck.fit(&vit(&features), PosResample::Timm, None).unwrap();
    let a = t["blocks.1.attn.qkv.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = timm["blocks.1.attn.qkv.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

/// Older timm Swin checkpoints also hold the buffers timm now computes (the relative
/// position index, the shifted-window mask): set aside, and the rest fits.
#[test]
fn swin_buffers_in_a_checkpoint_are_set_aside() {
    let cfg = ModelConfig::preset("swin_fmnist").unwrap();
    let mut params: HashMap<String, Tensor> = cfg
        .init_params(0, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let dev = &Device::Cpu;
    params.insert(
        "layers.0.blocks.1.attn_mask".into(),
        Tensor::zeros((4, 49, 49), DType::F32, dev).unwrap(),
    );
    params.insert(
        "layers.0.blocks.0.attn.relative_position_index".into(),
        Tensor::zeros((49, 49), DType::I64, dev).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swin.safetensors");
    save(&path, &params, &HashMap::new(), &SaveMeta::default()).unwrap();
    let ck = Checkpoint::load(&path).unwrap();
    assert_eq!(
        ck.ignored,
        [
            "layers.0.blocks.0.attn.relative_position_index",
            "layers.0.blocks.1.attn_mask"
        ]
    );
    let (tensors, warnings) = ck.fit(&cfg, PosResample::Timm, None).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(tensors.len(), cfg.param_shapes().len());
}

/// Microsoft's original Swin layout (patch merging at the end of a stage, `head`) loads as
/// timm's (merging at the start of the next stage, `head.fc`), tensor for tensor.
#[test]
fn original_swin_names_load_as_timms() {
    let cfg = ModelConfig::preset("swin_fmnist").unwrap();
    let timm: HashMap<String, Tensor> = cfg
        .init_params(1, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let original: HashMap<String, Tensor> = timm
        .iter()
        .map(|(k, t)| {
            let k = if let Some(rest) = k.strip_prefix("head.fc.") {
                format!("head.{rest}")
            } else if let Some(tail) = k.strip_prefix("layers.1.downsample.") {
                format!("layers.0.downsample.{tail}")
            } else if let Some(tail) = k.strip_prefix("layers.2.downsample.") {
                format!("layers.1.downsample.{tail}")
            } else {
                k.clone()
            };
            (k, t.clone())
        })
        .collect();
    assert!(original.contains_key("layers.0.downsample.reduction.weight"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("original.safetensors");
    save(&path, &original, &HashMap::new(), &SaveMeta::default()).unwrap();
    let (tensors, _) = Checkpoint::load(&path)
        .unwrap()
        .fit(&cfg, PosResample::Timm, None)
        .unwrap();
    assert_eq!(tensors.len(), timm.len());
    for (k, t) in &timm {
        let diff = (&tensors[k] - t).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }
}
