//! Bad input, table-driven: every case runs the real binary and must fail with exit code
//! 1, one `error: ...` line naming the cause (the binary may add indented causes below
//! it), and no panic. The bad inputs (recipes, checkpoints with NaN weights, broken image
//! folders) are built once in a temporary folder; every case fails before heavy work.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixture, write_idx_dataset};

/// `{T}` is the temporary folder, `{F}` the fixtures folder.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    expect: &'static str,
}

const fn case(name: &'static str, args: &'static [&'static str], expect: &'static str) -> Case {
    Case { name, args, expect }
}

const TINY: &str = "{F}/timm_tiny/model.safetensors";

#[rustfmt::skip]
const CASES: &[Case] = &[
    // train: every float of a recipe file, NaN or infinite.
    case("recipe lr nan", &["train", "--config", "{T}/r_lr_nan.toml"], "lr must be a finite number"),
    case("recipe min_lr nan", &["train", "--config", "{T}/r_min_lr_nan.toml"], "min_lr must be a finite number"),
    case("recipe warmup nan", &["train", "--config", "{T}/r_warmup_epochs_nan.toml"], "warmup_epochs must be a finite number"),
    case("recipe weight_decay nan", &["train", "--config", "{T}/r_weight_decay_nan.toml"], "weight_decay must be a finite number"),
    case("recipe beta1 nan", &["train", "--config", "{T}/r_beta1_nan.toml"], "beta1 must be a finite number"),
    case("recipe beta2 nan", &["train", "--config", "{T}/r_beta2_nan.toml"], "beta2 must be a finite number"),
    case("recipe eps nan", &["train", "--config", "{T}/r_eps_nan.toml"], "eps must be a finite number"),
    case("recipe label_smoothing nan", &["train", "--config", "{T}/r_label_smoothing_nan.toml"], "label_smoothing must be a finite number"),
    case("recipe clip_grad nan", &["train", "--config", "{T}/r_clip_grad_nan.toml"], "clip_grad must be a finite number"),
    case("recipe random_erase nan", &["train", "--config", "{T}/r_random_erase_nan.toml"], "random_erase must be a finite number"),
    case("recipe drop_path nan", &["train", "--config", "{T}/r_drop_path_nan.toml"], "drop_path must be a finite number"),
    case("recipe lr -inf", &["train", "--config", "{T}/r_lr_-inf.toml"], "lr must be a finite number"),
    case("recipe eps inf", &["train", "--config", "{T}/r_eps_inf.toml"], "eps must be a finite number"),
    case("recipe clip_grad inf", &["train", "--config", "{T}/r_clip_grad_inf.toml"], "clip_grad must be a finite number"),
    // train: the same fields as flags.
    case("flag lr nan", &["train", "--config", "{T}/r_ok.toml", "--lr", "NaN"], "lr must be a finite number"),
    case("flag lr inf", &["train", "--config", "{T}/r_ok.toml", "--lr", "inf"], "lr must be a finite number"),
    case("flag min_lr inf", &["train", "--config", "{T}/r_ok.toml", "--min-lr", "inf"], "min_lr must be a finite number"),
    case("flag warmup inf", &["train", "--config", "{T}/r_ok.toml", "--warmup-epochs", "inf"], "warmup_epochs must be a finite number"),
    case("flag weight_decay nan", &["train", "--config", "{T}/r_ok.toml", "--weight-decay", "nan"], "weight_decay must be a finite number"),
    case("flag beta1 inf", &["train", "--config", "{T}/r_ok.toml", "--beta1", "inf"], "beta1 must be a finite number"),
    case("flag beta2 nan", &["train", "--config", "{T}/r_ok.toml", "--beta2", "NaN"], "beta2 must be a finite number"),
    case("flag eps nan", &["train", "--config", "{T}/r_ok.toml", "--eps", "NaN"], "eps must be a finite number"),
    case("flag label_smoothing inf", &["train", "--config", "{T}/r_ok.toml", "--label-smoothing", "inf"], "label_smoothing must be a finite number"),
    case("flag clip_grad nan", &["train", "--config", "{T}/r_ok.toml", "--clip-grad", "NaN"], "clip_grad must be a finite number"),
    case("flag random_erase inf", &["train", "--config", "{T}/r_ok.toml", "--random-erase", "inf"], "random_erase must be a finite number"),
    case("flag drop_path nan", &["train", "--config", "{T}/r_ok.toml", "--drop-path", "NaN"], "drop_path must be a finite number"),
    // train: values out of range.
    case("eps zero", &["train", "--config", "{T}/r_ok.toml", "--eps", "0"], "eps must be > 0"),
    case("weight_decay negative", &["train", "--config", "{T}/r_weight_decay_-0.1.toml"], "weight_decay must be >= 0"),
    case("clip_grad negative", &["train", "--config", "{T}/r_clip_grad_-1.0.toml"], "clip_grad must be >= 0"),
    case("warmup negative", &["train", "--config", "{T}/r_warmup_epochs_-1.0.toml"], "warmup_epochs must be >= 0"),
    case("beta1 one", &["train", "--config", "{T}/r_ok.toml", "--beta1", "1"], "beta1 must be in [0, 1)"),
    case("beta2 negative", &["train", "--config", "{T}/r_beta2_-0.5.toml"], "beta2 must be in [0, 1)"),
    case("label_smoothing one", &["train", "--config", "{T}/r_ok.toml", "--label-smoothing", "1"], "label_smoothing must be in [0, 1)"),
    case("random_erase above one", &["train", "--config", "{T}/r_ok.toml", "--random-erase", "1.5"], "random_erase must be a probability"),
    case("drop_path one", &["train", "--config", "{T}/r_ok.toml", "--drop-path", "1"], "drop_path must be in [0, 1)"),
    case("lr zero", &["train", "--config", "{T}/r_ok.toml", "--lr", "0"], "lr > 0"),
    case("min_lr above lr", &["train", "--config", "{T}/r_ok.toml", "--min-lr", "1"], "min_lr <= lr"),
    // train: the model config's floats. NaN/inf in a model table or config file is
    // rejected while parsing (the tagged config goes through a JSON value, where they
    // become null), so the message names the file, not yet the field.
    case("model mlp_ratio nan", &["train", "--config", "{T}/m_mlp_ratio_nan.toml"], "mlp_ratio must be a finite number"),
    case("model mlp_ratio inf", &["train", "--config", "{T}/m_mlp_ratio_inf.toml"], "mlp_ratio must be a finite number"),
    case("model mlp_ratio negative", &["train", "--config", "{T}/m_mlp_ratio_-1.0.toml"], "mlp_ratio"),
    case("model layer_norm_eps nan", &["train", "--config", "{T}/m_layer_norm_eps_nan.toml"], "layer_norm_eps must be a finite number"),
    case("model layer_norm_eps inf", &["train", "--config", "{T}/m_layer_norm_eps_inf.toml"], "layer_norm_eps must be a finite number"),
    case("model layer_norm_eps zero", &["train", "--config", "{T}/m_layer_norm_eps_0.0.toml"], "layer_norm_eps must be positive"),
    case("model embed_dropout nan", &["train", "--config", "{T}/m_embed_dropout_nan.toml"], "embed_dropout must be a finite number"),
    case("model attn_dropout inf", &["train", "--config", "{T}/m_attn_dropout_inf.toml"], "attn_dropout must be a finite number"),
    case("model proj_dropout nan", &["train", "--config", "{T}/m_proj_dropout_nan.toml"], "proj_dropout must be a finite number"),
    case("model head_dropout nan", &["train", "--config", "{T}/m_head_dropout_nan.toml"], "head_dropout must be a finite number"),
    case("model drop_path inf", &["train", "--config", "{T}/m_drop_path_inf.toml"], "drop_path must be a finite number"),
    // train: degenerate counts.
    case("max_steps zero", &["train", "--config", "{T}/r_ok.toml", "--max-steps", "0"], "max_steps must be at least 1"),
    case("epochs zero", &["train", "--config", "{T}/r_ok.toml", "--epochs", "0"], "epochs must be at least 1"),
    case("batch_size zero", &["train", "--config", "{T}/r_ok.toml", "--batch-size", "0"], "batch_size"),
    case("eval_batch_size zero", &["train", "--config", "{T}/r_ok.toml", "--eval-batch-size", "0"], "eval_batch_size"),
    case("accum_steps zero", &["train", "--config", "{T}/r_ok.toml", "--accum-steps", "0"], "accum_steps"),
    case("num_classes zero", &["train", "--config", "{T}/r_ok.toml", "--num-classes", "0"], "num_classes must be at least 1"),
    // train: data.
    case("train empty test set", &["train", "--config", "{T}/r_ok.toml", "--data-dir", "{T}/idx_notest"], "no test images"),
    case("train fraction zero", &["train", "--config", "{T}/r_ok.toml", "--train-fraction", "0"], "train_fraction must be in (0, 1]"),
    case("train fraction above one", &["train", "--config", "{T}/r_ok.toml", "--train-fraction", "1.5"], "train_fraction must be in (0, 1]"),
    case("train fraction nan", &["train", "--config", "{T}/r_ok.toml", "--train-fraction", "NaN"], "train_fraction must be a finite number"),
    case("train teacher missing", &["train", "--config", "{T}/r_ok.toml", "--teacher", "{T}/missing_teacher.safetensors"], "missing_teacher.safetensors"),
    case("train teacher garbage", &["train", "--config", "{T}/r_ok.toml", "--teacher", "{T}/garbage.safetensors"], "garbage.safetensors"),
    case("train teacher cache without a teacher", &["train", "--config", "{T}/r_ok.toml", "--teacher-cache"], "teacher_cache needs a teacher"),
    case("train teacher without architecture", &["train", "--config", "{T}/r_ok.toml", "--teacher", "{F}/timm_tiny/model.safetensors"], "does not describe its architecture"),
    case("train distill alpha above one", &["train", "--config", "{T}/r_ok.toml", "--distill-alpha", "1.5"], "distill_alpha must be in [0, 1]"),
    case("train distill tau zero", &["train", "--config", "{T}/r_ok.toml", "--distill-tau", "0"], "distill_tau must be > 0"),
    case("train distill kind unknown", &["train", "--config", "{T}/r_ok.toml", "--distill", "medium"], "medium"),
    case("train resume before any checkpoint", &["train", "--resume", "{T}/run_nockpt"], "has no checkpoint-last.safetensors to resume from"),
    case("train empty class folder", &["train", "--config", "{T}/r_ok.toml", "--dataset", "folder:{T}/emptyclass"], "emptyclass/train/b"),
    case("train text file in class", &["train", "--config", "{T}/r_ok.toml", "--dataset", "folder:{T}/textfile"], "notes.txt"),
    case("train truncated png", &["train", "--config", "{T}/r_ok.toml", "--dataset", "folder:{T}/truncated", "--val-size", "0", "--batch-size", "2", "--num-classes", "1"], "bad.png"),
    case("train folder without train", &["train", "--config", "{T}/r_ok.toml", "--dataset", "folder:{T}/empty"], "no train folder"),
    case("train init nan weights", &["train", "--config", "{T}/r_init_nan.toml"], "blocks.0.attn.qkv.weight"),
    // eval.
    case("eval nan weights", &["eval", "--checkpoint", "{T}/nan.safetensors", "--config", "{F}/timm_tiny/config.json", "--dataset", "folder:{T}/imgs"], "non-finite value"),
    case("eval inf weights", &["eval", "--checkpoint", "{T}/inf.safetensors", "--config", "{F}/timm_tiny/config.json", "--dataset", "folder:{T}/imgs"], "tensor pos_embed"),
    case("eval overflowing output", &["eval", "--checkpoint", "{T}/overflow.safetensors", "--config", "{F}/timm_tiny/config.json", "--dataset", "folder:{T}/imgs"], "the model's output is not finite"),
    case("eval empty test set", &["eval", "--checkpoint", "{F}/legacy_run/checkpoint-last.safetensors", "--data-dir", "{T}/idx_notest"], "no test images"),
    case("eval batch size zero", &["eval", "--checkpoint", "{F}/legacy_run/checkpoint-last.safetensors", "--data-dir", "{T}/idx", "--batch-size", "0"], "batch size must be at least 1"),
    case("eval missing checkpoint", &["eval", "--checkpoint", "{T}/missing.safetensors", "--data-dir", "{T}/idx"], "missing.safetensors"),
    case("eval unknown dataset", &["eval", "--checkpoint", "{F}/legacy_run/checkpoint-last.safetensors", "--dataset", "imagenet-9"], "imagenet-9"),
    case("eval out under a file", &["eval", "--checkpoint", "{F}/legacy_run/checkpoint-last.safetensors", "--data-dir", "{T}/idx", "--out", "{T}/garbage.safetensors/x"], "garbage.safetensors/x"),
    case("eval empty class folder", &["eval", "--checkpoint", TINY, "--config", "{F}/timm_tiny/config.json", "--dataset", "folder:{T}/emptytest"], "emptytest/test/c3"),
    // predict.
    case("predict nan weights", &["predict", "{F}/predict/image_rgb.png", "--weights", "{T}/nan.safetensors", "--config", "{F}/timm_tiny/config.json"], "blocks.0.attn.qkv.weight"),
    case("predict overflowing output", &["predict", "{F}/predict/image_rgb.png", "--weights", "{T}/overflow.safetensors", "--config", "{F}/timm_tiny/config.json"], "the model's output is not finite"),
    case("predict mean nan", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--mean", "NaN,0.5,0.5"], "mean values must be finite"),
    case("predict mean inf", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--mean", "0.5,inf,0.5"], "mean values must be finite"),
    case("predict std nan", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--std", "0.5,0.5,NaN"], "std values must be finite and positive"),
    case("predict std inf", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--std", "inf,0.5,0.5"], "std values must be finite and positive"),
    case("predict std zero", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--std", "0,0.5,0.5"], "std values must be finite and positive"),
    case("predict std wrong count", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--std", "0.5"], "mean and std need 3 values"),
    case("predict crop_pct nan", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--crop-pct", "NaN"], "crop_pct"),
    case("predict top-k zero", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--top-k", "0"], "top-k must be at least 1"),
    case("predict batch size zero", &["predict", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--batch-size", "0"], "batch-size must be at least 1"),
    case("predict truncated png", &["predict", "{T}/truncated/train/a/bad.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json"], "bad.png"),
    case("predict 16384x1 image", &["predict", "{T}/strip.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json"], "too elongated"),
    case("predict jpeg the decoder panics on", &["predict", "{F}/bad/zune-avx2-idct-panic.jpg", "--weights", TINY, "--config", "{F}/timm_tiny/config.json"], "zune-avx2-idct-panic.jpg"),
    case("predict text file", &["predict", "{T}/textfile/train/a/notes.txt", "--weights", TINY, "--config", "{F}/timm_tiny/config.json"], "notes.txt"),
    case("predict empty folder", &["predict", "{T}/empty", "--weights", TINY, "--config", "{F}/timm_tiny/config.json"], "empty"),
    case("predict missing image", &["predict", "{T}/missing.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json"], "missing.png"),
    case("predict garbage weights", &["predict", "{F}/predict/image_rgb.png", "--weights", "{T}/garbage.safetensors", "--config", "{F}/timm_tiny/config.json"], "not a valid safetensors file"),
    // attention.
    case("attention nan weights", &["attention", "{F}/predict/image_rgb.png", "--weights", "{T}/nan.safetensors", "--config", "{F}/timm_tiny/config.json", "--out", "{T}/att"], "non-finite value"),
    case("attention alpha nan", &["attention", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--alpha", "NaN", "--out", "{T}/att"], "alpha"),
    case("attention discard nan", &["attention", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--discard-ratio", "NaN", "--method", "rollout", "--out", "{T}/att"], "discard ratio"),
    case("attention std nan", &["attention", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--std", "NaN,1,1", "--out", "{T}/att"], "std values must be finite"),
    case("attention layer out of range", &["attention", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--layer", "99", "--out", "{T}/att"], "99"),
    case("attention head out of range", &["attention", "{F}/predict/image_rgb.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--head", "99", "--out", "{T}/att"], "99"),
    case("attention truncated png", &["attention", "{T}/truncated/train/a/bad.png", "--weights", TINY, "--config", "{F}/timm_tiny/config.json", "--out", "{T}/att"], "bad.png"),
    // pos-embed.
    case("pos-embed nan weights", &["pos-embed", "--weights", "{T}/inf.safetensors", "--config", "{F}/timm_tiny/config.json", "--out", "{T}/pos"], "tensor pos_embed"),
    case("pos-embed garbage weights", &["pos-embed", "--weights", "{T}/garbage.safetensors", "--out", "{T}/pos"], "garbage.safetensors"),
    case("pos-embed missing weights", &["pos-embed", "--weights", "{T}/missing.safetensors", "--out", "{T}/pos"], "missing.safetensors"),
    // patches.
    case("patches size zero", &["patches", "{F}/predict/image_rgb.png", "--patch-size", "0", "--out", "{T}/pat"], "patch size must be positive"),
    case("patches truncated png", &["patches", "{T}/truncated/train/a/bad.png", "--patch-size", "4", "--out", "{T}/pat"], "bad.png"),
    case("patches missing image", &["patches", "{T}/missing.png", "--patch-size", "4", "--out", "{T}/pat"], "missing.png"),
    // convert.
    case("convert garbage input", &["convert", "{T}/garbage.safetensors", "{T}/conv.safetensors"], "garbage.safetensors"),
    case("convert missing input", &["convert", "{T}/missing.safetensors", "{T}/conv.safetensors"], "missing.safetensors"),
    case("convert nan weights", &["convert", "{T}/nan.safetensors", "{T}/conv.safetensors", "--config", "{F}/timm_tiny/config.json"], "non-finite value"),
    // compare.
    case("compare not a run folder", &["compare", "{T}/idx", "--out", "{T}/cmp"], "is not a run folder"),
    case("compare missing folder", &["compare", "{T}/no_such_run", "--out", "{T}/cmp"], "no_such_run"),
    case("compare unknown preset", &["compare", "--presets", "vit_fmnist,vit_fmnst"], "did you mean vit_fmnist"),
    case("compare batch zero", &["compare", "--presets", "vit_fmnist", "--batch", "0"], "batch of at least 1"),
    case("compare sizes huge", &["compare", "--presets", "vit_fmnist", "--sizes", "28,4096"], "--sizes takes sides of 1 to 2048 px, got 4096"),
    case("compare sizes zero", &["compare", "--presets", "vit_fmnist", "--sizes", "0"], "--sizes takes sides of 1 to 2048 px, got 0"),
    // info.
    case("info unknown preset", &["info", "vit_nonexistent_42"], "vit_nonexistent_42"),
    case("info config mlp_ratio nan", &["info", "--config", "{T}/cfg_mlp_nan.toml"], "mlp_ratio must be a finite number"),
    case("info config layer_norm_eps inf", &["info", "--config", "{T}/cfg_eps_inf.toml"], "layer_norm_eps must be a finite number"),
    case("info config depth huge", &["info", "--config", "{T}/cfg_depth_huge.toml"], "depth is 100000000, more than the 1024 allowed"),
    case("info config embed_dim huge", &["info", "--config", "{T}/cfg_width_huge.toml"], "embed_dim is 4000000000"),
    case("info config mlp_ratio huge", &["info", "--config", "{T}/cfg_mlp_huge.toml"], "mlp_ratio is"),
    case("info config image_size huge", &["info", "--config", "{T}/cfg_image_huge.toml"], "image_size is 1000000"),
    case("info config num_classes huge", &["info", "--config", "{T}/cfg_classes_huge.toml"], "num_classes is 4000000000"),
    case("predict config depth huge", &["predict", "--weights", "{F}/timm_tiny/model.safetensors", "--config", "{T}/cfg_depth_huge.toml", "{F}/predict/image_rgb.png"], "depth is 100000000"),
    case("info missing config", &["info", "--config", "{T}/missing.toml"], "missing.toml"),
    // bench.
    case("bench unknown workload", &["bench", "--workload", "nope"], "nope"),
    case("bench zero iterations", &["bench", "--workload", "train-fm", "--iters", "0"], "--iters"),
];

/// The model table of a tiny 28×28×1 ViT (patch 7, dim 16, one block), `extra` inside it.
fn model_table(extra: &str) -> String {
    format!(
        "[model]\nimage_size = [28, 28]\npatch_size = 7\nin_channels = 1\nnum_classes = 10\n\
         embed_dim = 16\ndepth = 1\nnum_heads = 2\nmlp_ratio = 2.0\n{extra}\n"
    )
}

/// A recipe on the IDX dataset in `data`, `top` among its top-level fields and `model`
/// inside its model table (each must not repeat a field set here).
fn recipe(data: &Path, top: &str, model: &str) -> String {
    format!(
        "dataset = \"fashion-mnist\"\ndata_dir = \"{}\"\nbatch_size = 4\neval_batch_size = 10\n\
         epochs = 1\nval_size = 4\nout = \"{}\"\n{top}\n{}",
        data.display(),
        data.with_file_name("run").display(),
        if model.contains("mlp_ratio") {
            model_table("").replace("mlp_ratio = 2.0\n", &format!("{model}\n"))
        } else {
            model_table(model)
        }
    )
}

fn png(path: &Path, size: u32, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(size, size, image::Rgb([v, 255 - v, v / 2]))
        .save(path)
        .unwrap();
}

/// timm_tiny's tensors with `edit` applied to the named ones, saved under `path`.
/// A change to a tensor's values.
type Edit<'a> = (&'a str, &'a dyn Fn(&mut Vec<f32>));

fn edited_checkpoint(path: &Path, edit: &[Edit]) {
    let mut tensors: HashMap<String, Tensor> = common::load("timm_tiny/model.safetensors");
    for (name, f) in edit {
        let t = &tensors[*name];
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        f(&mut v);
        let shape = t.dims().to_vec();
        tensors.insert(
            name.to_string(),
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

fn setup(t: &Path) {
    write_idx_dataset(&t.join("idx"), 24, 10, false);
    write_idx_dataset(&t.join("idx_notest"), 24, 0, false);
    let idx = t.join("idx");

    // Recipes: one per float field and bad value.
    let w = |name: &str, text: String| std::fs::write(t.join(name), text).unwrap();
    w("r_ok.toml", recipe(&idx, "", ""));
    std::fs::create_dir_all(t.join("run_nockpt")).unwrap();
    w("run_nockpt/config.toml", recipe(&idx, "", ""));
    for field in [
        "lr",
        "min_lr",
        "warmup_epochs",
        "weight_decay",
        "beta1",
        "beta2",
        "eps",
        "label_smoothing",
        "clip_grad",
        "random_erase",
        "drop_path",
    ] {
        w(
            &format!("r_{field}_nan.toml"),
            recipe(&idx, &format!("{field} = nan"), ""),
        );
    }
    for (field, v) in [
        ("lr", "-inf"),
        ("eps", "inf"),
        ("clip_grad", "inf"),
        ("weight_decay", "-0.1"),
        ("clip_grad", "-1.0"),
        ("warmup_epochs", "-1.0"),
        ("beta2", "-0.5"),
    ] {
        w(
            &format!("r_{field}_{v}.toml"),
            recipe(&idx, &format!("{field} = {v}"), ""),
        );
    }
    for (field, v) in [
        ("mlp_ratio", "nan"),
        ("mlp_ratio", "inf"),
        ("mlp_ratio", "-1.0"),
        ("layer_norm_eps", "nan"),
        ("layer_norm_eps", "inf"),
        ("layer_norm_eps", "0.0"),
        ("embed_dropout", "nan"),
        ("attn_dropout", "inf"),
        ("proj_dropout", "nan"),
        ("head_dropout", "nan"),
        ("drop_path", "inf"),
    ] {
        w(
            &format!("m_{field}_{v}.toml"),
            recipe(&idx, "", &format!("{field} = {v}")),
        );
    }
    let cfg = std::fs::read_to_string(fixture("timm_tiny/config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let toml_cfg = |key: &str, value: &str| {
        let mut text = format!("{key} = {value}\n");
        for (k, v) in cfg.as_object().unwrap() {
            if k != key {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        text
    };
    w("cfg_mlp_nan.toml", toml_cfg("mlp_ratio", "nan"));
    w("cfg_eps_inf.toml", toml_cfg("layer_norm_eps", "inf"));
    // Absurd sizes (a config of 200 bytes must not cost gigabytes).
    w("cfg_depth_huge.toml", toml_cfg("depth", "100000000"));
    w("cfg_width_huge.toml", toml_cfg("embed_dim", "4000000000"));
    w("cfg_mlp_huge.toml", toml_cfg("mlp_ratio", "1e30"));
    w(
        "cfg_image_huge.toml",
        toml_cfg("image_size", "[1000000, 1000000]"),
    );
    w(
        "cfg_classes_huge.toml",
        toml_cfg("num_classes", "4000000000"),
    );

    // Image folders.
    for c in 0..10 {
        png(&t.join(format!("imgs/train/c{c}/0.png")), 32, 20 * c as u8);
        png(&t.join(format!("imgs/test/c{c}/0.png")), 32, 20 * c as u8);
        png(
            &t.join(format!("emptytest/train/c{c}/0.png")),
            32,
            20 * c as u8,
        );
        if c != 3 {
            png(
                &t.join(format!("emptytest/test/c{c}/0.png")),
                32,
                20 * c as u8,
            );
        }
    }
    std::fs::create_dir_all(t.join("emptytest/test/c3")).unwrap();
    png(&t.join("emptyclass/train/a/0.png"), 28, 10);
    std::fs::create_dir_all(t.join("emptyclass/train/b")).unwrap();
    png(&t.join("emptyclass/test/a/0.png"), 28, 10);
    png(&t.join("textfile/train/a/0.png"), 28, 10);
    png(&t.join("textfile/train/b/0.png"), 28, 200);
    std::fs::write(t.join("textfile/train/a/notes.txt"), "not an image").unwrap();
    png(&t.join("textfile/test/a/0.png"), 28, 10);
    png(&t.join("truncated/train/a/0.png"), 28, 10);
    image::GrayImage::new(16384, 1)
        .save(t.join("strip.png"))
        .unwrap();
    let good = std::fs::read(t.join("truncated/train/a/0.png")).unwrap();
    std::fs::write(t.join("truncated/train/a/bad.png"), &good[..good.len() / 2]).unwrap();
    png(&t.join("truncated/test/a/0.png"), 28, 10);
    std::fs::create_dir_all(t.join("empty")).unwrap();

    // Checkpoints.
    std::fs::write(t.join("garbage.safetensors"), "this is not a checkpoint").unwrap();
    edited_checkpoint(
        &t.join("nan.safetensors"),
        &[("blocks.0.attn.qkv.weight", &|v| v[5] = f32::NAN)],
    );
    edited_checkpoint(
        &t.join("inf.safetensors"),
        &[("pos_embed", &|v| v[0] = f32::INFINITY)],
    );
    // Finite weights whose products overflow: the output is infinite.
    let huge = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = 3e38);
    edited_checkpoint(
        &t.join("overflow.safetensors"),
        &[("norm.weight", &huge), ("head.weight", &huge)],
    );
    w(
        "r_init_nan.toml",
        format!(
            "dataset = \"folder:{}\"\nbatch_size = 2\nval_size = 0\nepochs = 1\nout = \"{}\"\n\
             init = \"{}\"\n[model]\nimage_size = [32, 32]\npatch_size = 8\nnum_classes = 10\n\
             embed_dim = 64\ndepth = 2\nnum_heads = 4\n",
            t.join("imgs").display(),
            t.join("run_init").display(),
            t.join("nan.safetensors").display()
        ),
    );
}

#[test]
fn bad_input_fails_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path();
    setup(t);
    let (tp, fp) = (
        t.to_str().unwrap().to_string(),
        fixture("")
            .to_str()
            .unwrap()
            .trim_end_matches('/')
            .to_string(),
    );
    let run = |c: &Case| -> Option<String> {
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| a.replace("{T}", &tp).replace("{F}", &fp))
            .collect();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vit"))
            .args(&args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("vit runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let first = stderr.lines().next().unwrap_or("");
        let mut problems = Vec::new();
        if out.status.code() != Some(1) {
            problems.push(format!("exit status {:?}", out.status.code()));
        }
        if !first.starts_with("error: ") {
            problems.push("stderr does not start with `error: `".into());
        }
        if !first.contains(c.expect) {
            problems.push(format!("first line lacks {:?}", c.expect));
        }
        if !stderr
            .lines()
            .skip(1)
            .all(|l| l.starts_with("  caused by: ") || l.starts_with("warning: "))
        {
            problems.push("more than one error line".into());
        }
        for text in [&stdout, &stderr] {
            if text.contains("panicked") || text.contains("RUST_BACKTRACE") {
                problems.push("panic".into());
            }
            if text.contains("NaN") && !stderr.starts_with("error: ") {
                problems.push("NaN printed".into());
            }
        }
        (!problems.is_empty()).then(|| {
            format!(
                "{}: {} (vit {})\n  stdout: {stdout}\n  stderr: {stderr}",
                c.name,
                problems.join("; "),
                args.join(" ")
            )
        })
    };
    // Two workers: the cases are independent processes.
    let failures: Vec<String> = std::thread::scope(|s| {
        let halves = CASES.split_at(CASES.len() / 2);
        let handles = [halves.0, halves.1].map(|part| {
            let run = &run;
            s.spawn(move || part.iter().filter_map(run).collect::<Vec<_>>())
        });
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    // The memory ceiling: the largest peak resident size of any case's process (getrusage
    // over this test binary's children; this file holds this one test). Bad input of a
    // few hundred bytes claiming gigabytes must cost what reading a tiny model costs.
    let peak_mib = children_peak_rss_kib() / 1024;
    assert!(
        peak_mib <= MEMORY_CEILING_MIB,
        "a bad-input case peaked at {peak_mib} MiB, above {MEMORY_CEILING_MIB} MiB"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

/// The most resident memory any bad-input case may use.
const MEMORY_CEILING_MIB: i64 = 64;

/// Peak resident set size, in KiB, of the largest child process waited for so far.
fn children_peak_rss_kib() -> i64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer, which points to one.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage failed");
    // SAFETY: initialised by getrusage (zeroed before, in any case).
    unsafe { ru.assume_init() }.ru_maxrss
}
