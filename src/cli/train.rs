//! `vit train`: run a recipe (the default one without arguments) and print the result.

use std::path::PathBuf;

use clap::Args;
use vit::train::{self, Progress, ProgressMode, Recipe};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Recipe TOML file; flags below override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this folder exactly where its last checkpoint left off.
    #[arg(long, conflicts_with_all = ["config", "init", "out"])]
    resume: Option<PathBuf>,
    /// fashion-mnist | mnist | cifar10 | cifar100 | folder:PATH
    #[arg(long)]
    dataset: Option<String>,
    /// Folder with the dataset files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Model preset (see `vit info`).
    #[arg(long)]
    preset: Option<String>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    accum_steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    warmup_epochs: Option<f64>,
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Gradient-norm clipping threshold (0 = off).
    #[arg(long)]
    clip_grad: Option<f64>,
    #[arg(long)]
    drop_path: Option<f64>,
    /// Random-crop padding in pixels (0 = off).
    #[arg(long)]
    crop_pad: Option<usize>,
    /// Random horizontal flips (default per dataset).
    #[arg(long)]
    hflip: Option<bool>,
    /// Probability of erasing a random rectangle with noise (timm's --reprob; 0 = off).
    #[arg(long, alias = "reprob")]
    random_erase: Option<f64>,
    /// Training images held out for validation.
    #[arg(long)]
    val_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Also write checkpoint-last every N optimizer steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Start from these weights (fine-tuning; timm or HF naming, any resolution).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Output folder (default runs/<timestamp>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu or cuda.
    #[arg(long)]
    device: Option<String>,
    /// Print only the final result.
    #[arg(long, short)]
    quiet: bool,
}

impl TrainArgs {
    fn recipe(&self) -> anyhow::Result<Recipe> {
        let mut r = match (&self.resume, &self.config) {
            (Some(dir), _) => Recipe::of_run(dir)?,
            (_, Some(p)) => Recipe::from_file(p)?,
            _ => Recipe::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { r.$f = v.clone(); } )* };
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { r.$f = Some(v.clone()); } )* };
        }
        set!(
            dataset,
            preset,
            epochs,
            batch_size,
            accum_steps,
            lr,
            min_lr,
            weight_decay
        );
        set!(
            warmup_epochs,
            label_smoothing,
            clip_grad,
            crop_pad,
            random_erase,
            val_size,
            seed
        );
        set!(checkpoint_every, device);
        set_opt!(data_dir, drop_path, hflip, max_steps, init, out);
        if self.preset.is_some() {
            r.model = None;
        }
        Ok(r)
    }
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let recipe = a.recipe()?;
    let mut progress = Progress::new(ProgressMode::auto(a.quiet));
    let s = train::train(&recipe, a.resume.as_deref(), &mut progress)?;
    println!(
        "test accuracy {:.2}% (loss {:.4}) on {} images; best validation accuracy {:.2}%; {:.0} s",
        100.0 * s.test.accuracy,
        s.test.loss,
        s.test.images,
        100.0 * s.best_val_acc,
        s.seconds
    );
    println!("run folder: {}", s.out.display());
    for f in &s.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
