//! `vit train`: run a recipe (the default one without arguments) and print the result.
//!
//! The command line has two layers, as in ripgrep: [`RecipeFlags`] mirrors the recipe's
//! fields one flag each (all optional), and [`RecipeFlags::apply`] converts it once into a
//! [`Recipe`] by merging the given flags, as a TOML table, over the base recipe's table.
//! So a flag is spelled, typed and validated exactly like the recipe field it sets, and a
//! flag without a field fails (the recipe denies unknown fields).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use vit::train::{self, Progress, ProgressMode, Recipe};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Recipe TOML file; flags below override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this folder exactly where its last checkpoint left off.
    #[arg(long, conflicts_with_all = ["config", "init", "out"])]
    resume: Option<PathBuf>,
    #[command(flatten)]
    recipe: RecipeFlags,
    /// Fine-tune from a checkpoint on the Hugging Face Hub (owner/name[@revision]), as --init
    /// does from a file; its own model unless --preset or --config names one.
    #[arg(long, value_name = "REPO[@REVISION]", conflicts_with_all = ["init", "resume"])]
    hf: Option<String>,
    /// Print only the final result.
    #[arg(long, short)]
    quiet: bool,
}

/// One flag per [`Recipe`] field, same name (`--batch-size` for `batch_size`), same type;
/// a flag that is given overrides the field. `model` (a whole model config table) has no
/// flag: it comes from the recipe file, and `--preset` clears it.
#[derive(Debug, Default, Args, Serialize)]
pub struct RecipeFlags {
    /// fashion-mnist | mnist | cifar10 | cifar100 | folder:PATH
    #[arg(long)]
    dataset: Option<String>,
    /// Folder with the dataset files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Model preset (see `vit info`); replaces the recipe's `model` table.
    #[arg(long)]
    preset: Option<String>,
    /// Stochastic-depth rate overriding the model config's.
    #[arg(long)]
    drop_path: Option<f64>,
    /// Class count overriding the model's (default when fine-tuning with --init: the
    /// dataset's, with a fresh head).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Passes over the training set.
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per optimizer step (split into --accum-steps micro-batches).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches whose gradients are summed before each optimizer step.
    #[arg(long)]
    accum_steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the cosine decay.
    #[arg(long)]
    min_lr: Option<f64>,
    /// Epochs of linear learning-rate warmup.
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// AdamW weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW's first-moment decay.
    #[arg(long)]
    beta1: Option<f64>,
    /// AdamW's second-moment decay.
    #[arg(long)]
    beta2: Option<f64>,
    /// AdamW's denominator epsilon.
    #[arg(long)]
    eps: Option<f64>,
    /// Label smoothing of the cross-entropy loss.
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Gradient-norm clipping threshold (0 = off).
    #[arg(long)]
    clip_grad: Option<f64>,
    /// Random-crop padding in pixels (0 = off).
    #[arg(long)]
    crop_pad: Option<usize>,
    /// Random horizontal flips (default per dataset).
    #[arg(long)]
    hflip: Option<bool>,
    /// Probability of erasing a random rectangle with noise (timm's --reprob; 0 = off).
    #[arg(long, alias = "reprob")]
    random_erase: Option<f64>,
    /// Image folders: range of the random resized crop's area as a fraction of the image
    /// (default 0.08,1).
    #[arg(long, value_delimiter = ',', num_args = 1..=2, value_names = ["MIN", "MAX"])]
    scale: Option<Vec<f64>>,
    /// Image folders: range of the random resized crop's aspect ratio (default 0.75,1.333).
    #[arg(long, value_delimiter = ',', num_args = 1..=2, value_names = ["MIN", "MAX"])]
    ratio: Option<Vec<f64>>,
    /// Image folders: fraction kept by the evaluation center crop (default: the preset's).
    #[arg(long)]
    crop_pct: Option<f64>,
    /// Image folders: image decoding threads, at the lowest priority (default: one per
    /// core).
    #[arg(long)]
    workers: Option<usize>,
    /// Train on this fraction of the training images: a seeded, class-balanced subset
    /// (default 1).
    #[arg(long)]
    train_fraction: Option<f64>,
    /// Training images held out for validation (default: 10% of them, at most 5000;
    /// 0 = none).
    #[arg(long)]
    val_size: Option<usize>,
    /// Images per batch when evaluating (default: the training batch size).
    #[arg(long)]
    eval_batch_size: Option<usize>,
    /// Random seed (weights, validation split, batches, augmentation, dropout).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many optimizer steps; the warmup + cosine schedule is fitted into
    /// them. With --resume, a larger value continues a finished run (its schedule refitted
    /// to the new length from the step where it stopped).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Also write checkpoint-last every N optimizer steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Gradient checkpointing: recompute each block's activations in backward instead of
    /// keeping them (less memory, about a third more time; ViT, DeiT, hybrid ViT).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    grad_checkpoint: Option<bool>,
    /// f32, or bf16: mixed precision (products of linear layers and attention on bf16
    /// operands; weights, gradients, LayerNorm, softmax and loss in f32).
    #[arg(long)]
    precision: Option<String>,
    /// Distil from this trained model (DeiT): a checkpoint that says its architecture, with
    /// the student's classes; a distilled DeiT student learns from it with its second head.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// hard (the teacher's top class, DeiT's default) or soft (its distribution at
    /// --distill-tau).
    #[arg(long)]
    distill: Option<String>,
    /// Weight of the distillation term (default 0.5).
    #[arg(long)]
    distill_alpha: Option<f64>,
    /// Temperature of soft distillation (default 1).
    #[arg(long)]
    distill_tau: Option<f64>,
    /// Label every training image with the teacher once, un-augmented, before training,
    /// and distil from those logits (the teacher's cost once instead of at every step).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    teacher_cache: Option<bool>,
    /// Start from these weights (fine-tuning; timm or HF naming, any resolution).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Output folder (default runs/<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
}

impl RecipeFlags {
    /// `base` with the given flags' values in place of its fields: both become TOML
    /// tables, the flags' table is merged over the base's (the flags' keys replace the
    /// base's), and the result is read back as a [`Recipe`], so a flag is checked exactly
    /// as the same field in a recipe file. `--preset` also drops the base's `model` table.
    pub fn apply(&self, base: &Recipe) -> anyhow::Result<Recipe> {
        let mut table =
            toml::Table::try_from(base).context("cannot write the recipe as a TOML table")?;
        let flags =
            toml::Table::try_from(self).context("cannot write the flags as a TOML table")?;
        if self.preset.is_some() {
            table.remove("model");
        }
        table.extend(flags);
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                anyhow::anyhow!(
                    "the flags do not fit the recipe: {}",
                    e.to_string().lines().collect::<Vec<_>>().join(" ")
                )
            })
    }
}

impl TrainArgs {
    fn recipe(&self) -> anyhow::Result<Recipe> {
        let base = match (&self.resume, &self.config) {
            (Some(dir), _) => Recipe::of_run(dir)?,
            (_, Some(p)) => Recipe::from_file(p)?,
            _ => Recipe::default(),
        };
        let mut recipe = self.recipe.apply(&base)?;
        if self.hf.is_some() {
            let hub = super::HubArgs {
                hf: self.hf.clone(),
            };
            let dir = hub.or(None)?;
            // Unless a recipe or --preset names the model, the Hub checkpoint's own is trained.
            if self.config.is_none() && self.recipe.preset.is_none() {
                if let Some(cfg) = vit::weights::Checkpoint::load(&dir)?.config {
                    recipe.model = Some(cfg);
                }
            }
            recipe.init = Some(dir);
        }
        Ok(recipe)
    }
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let recipe = a.recipe()?;
    // One process, or the ranks of `mpirun -np N vit train …`; rank 0 reports.
    let world = vit::dist::init()?;
    let (rank, size) = (world.rank(), world.size());
    let mut progress = Progress::new(match rank {
        0 => ProgressMode::auto(a.quiet),
        _ => ProgressMode::Quiet,
    });
    let s = match train::train(&recipe, a.resume.as_deref(), &mut progress, world.as_ref()) {
        Ok(s) => s,
        // The other processes would wait for this one forever: end them all. An error every
        // process meets (a bad recipe) is told once, by rank 0: the others wait a moment
        // first, and its abort ends them before they speak.
        Err(e) if size > 1 => {
            if rank != 0 {
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            eprintln!("error: process {rank} of {size}: {e}");
            world.abort(1)
        }
        Err(e) => return Err(e.into()),
    };
    if rank != 0 {
        return Ok(());
    }
    if s.already_finished {
        let (epochs, steps) = (s.epochs.len(), s.epochs.last().map_or(0, |m| m.step));
        out!(
            "run {} is already finished ({epochs} epoch{} / {steps} steps); nothing to do",
            s.out.display(),
            if epochs == 1 { "" } else { "s" },
        );
    }
    let fit = match (s.best_val_acc, s.epochs.last()) {
        (Some(v), _) => format!("; best validation accuracy {:.2}%", 100.0 * v),
        (None, Some(m)) => format!("; final train accuracy {:.2}%", 100.0 * m.train_acc),
        (None, None) => String::new(),
    };
    out!(
        "test accuracy {:.2}% (loss {:.4}) on {} images{fit}; {:.0} s",
        100.0 * s.test.accuracy,
        s.test.loss,
        s.test.images,
        s.seconds
    );
    out!("run folder: {}", s.out.display());
    for f in &s.files {
        out!("wrote {}", f.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{Command, FromArgMatches};

    use super::*;

    /// Recipe fields that deliberately have no flag.
    const NO_FLAG: &[&str] = &[
        // A whole nested model config table; set it in a recipe file (`--preset` clears it).
        "model",
    ];

    fn recipe_fields() -> Vec<String> {
        // Serialized as JSON, None fields stay (as null), so every field is a key.
        let v = serde_json::to_value(Recipe::default()).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    }

    fn parse(args: &[&str]) -> TrainArgs {
        let cmd = TrainArgs::augment_args(Command::new("t"));
        let m = cmd
            .try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap();
        TrainArgs::from_arg_matches(&m).unwrap()
    }

    #[test]
    fn every_recipe_field_has_a_flag_of_the_same_name() {
        let cmd = TrainArgs::augment_args(Command::new("t"));
        let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
        let missing: Vec<String> = recipe_fields()
            .into_iter()
            .filter(|f| !NO_FLAG.contains(&f.as_str()))
            .filter(|f| !longs.contains(&f.replace('_', "-").as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "recipe fields without a flag: {missing:?}"
        );
    }

    #[test]
    fn every_recipe_flag_is_a_recipe_field() {
        let fields = recipe_fields();
        let cmd = RecipeFlags::augment_args(Command::new("t"));
        let strays: Vec<&str> = cmd
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| !fields.iter().any(|f| f == id))
            .collect();
        assert!(
            strays.is_empty(),
            "flags without a recipe field: {strays:?}"
        );
    }

    #[test]
    fn every_flag_sets_its_field() {
        // A recipe whose every field (but `model`) differs from the default...
        let want = Recipe {
            dataset: "cifar10".into(),
            data_dir: Some("/data".into()),
            preset: "vit_cifar_tiny".into(),
            model: None,
            drop_path: Some(0.25),
            num_classes: Some(5),
            epochs: 7,
            batch_size: 96,
            accum_steps: 3,
            lr: 0.125,
            min_lr: 0.0625,
            warmup_epochs: 1.5,
            weight_decay: 0.5,
            beta1: 0.75,
            beta2: 0.875,
            eps: 1e-6,
            label_smoothing: 0.2,
            clip_grad: 2.0,
            crop_pad: 4,
            hflip: Some(true),
            random_erase: 0.25,
            scale: [0.25, 0.75],
            ratio: [0.5, 2.0],
            crop_pct: Some(0.75),
            workers: Some(3),
            train_fraction: 0.5,
            val_size: Some(100),
            eval_batch_size: Some(50),
            seed: 9,
            max_steps: Some(11),
            checkpoint_every: 13,
            grad_checkpoint: true,
            precision: "bf16".into(),
            teacher: Some("/t.safetensors".into()),
            distill: vit::train::DistillKind::Soft,
            distill_alpha: 0.25,
            distill_tau: 3.0,
            teacher_cache: true,
            init: Some("/w.safetensors".into()),
            out: Some("/runs/x".into()),
            device: "cuda".into(),
        };
        // ...written as one flag per field, comes out of the default recipe plus flags.
        let json = serde_json::to_value(&want).unwrap();
        let mut args = Vec::new();
        let default = serde_json::to_value(Recipe::default()).unwrap();
        for (k, v) in json.as_object().unwrap() {
            if NO_FLAG.contains(&k.as_str()) {
                continue;
            }
            assert_ne!(v, &default[k], "{k} must differ from the default");
            let value = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                v => v.to_string(),
            };
            args.push(format!("--{}", k.replace('_', "-")));
            args.push(value);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(parse(&args).recipe().unwrap(), want);
        // No flag: the base recipe unchanged.
        assert_eq!(parse(&[]).recipe().unwrap(), Recipe::default());
        // A bare --grad-checkpoint means true.
        assert!(
            parse(&["--grad-checkpoint"])
                .recipe()
                .unwrap()
                .grad_checkpoint
        );
    }

    #[test]
    fn preset_clears_the_model_table_and_aliases_still_work() {
        let base = Recipe {
            model: Some(vit::ModelConfig::preset("vit_fmnist").unwrap()),
            ..Recipe::default()
        };
        let a = parse(&["--epochs", "2", "--reprob", "0.5"]);
        let r = a.recipe.apply(&base).unwrap();
        assert!(r.model.is_some());
        assert_eq!((r.epochs, r.random_erase), (2, 0.5));
        let r = parse(&["--preset", "vit_cifar_tiny"])
            .recipe
            .apply(&base)
            .unwrap();
        assert_eq!((r.model, r.preset.as_str()), (None, "vit_cifar_tiny"));
    }
}
