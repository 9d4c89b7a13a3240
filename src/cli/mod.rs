//! Argument definitions (clap) and dispatch to one module per subcommand.

/// `println!` that hands a failed write back as an error instead of panicking: a closed pipe
/// (`vit info | head`) then ends the command quietly (see [`run`]).
macro_rules! out {
    () => {
        out!("")
    };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod attention;
mod bench;
mod compare;
mod convert;
mod eval;
mod explore;
mod export;
mod info;
mod patches;
mod pos_embed;
mod predict;
mod quantize;
mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vit::weights::{Arch, PosResample};

/// Vision Transformers: build, train, fine-tune, evaluate, explain and run ViTs.
#[derive(Debug, Parser)]
#[command(name = "vit", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the presets, or show one architecture in detail.
    Info(info::InfoArgs),
    /// Classify images with a checkpoint (timm or HuggingFace format).
    Predict(predict::PredictArgs),
    /// Rewrite a checkpoint in timm or HuggingFace naming.
    Convert(convert::ConvertArgs),
    /// Write an int8 copy of a ViT checkpoint: smaller, and faster on the CPU.
    Quantize(quantize::QuantizeArgs),
    /// Write a checkpoint's model as an ONNX file (for ONNX Runtime, TensorRT, OpenVINO, ...).
    Export(export::ExportArgs),
    /// Train a ViT (the default recipe: Fashion-MNIST with vit_fmnist).
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint on a dataset's test split.
    Eval(eval::EvalArgs),
    /// Compare finished runs: parameters, GFLOPs, speed, accuracy, time, and compare.png.
    Compare(compare::CompareArgs),
    /// Show how an image is cut into patches: the numbered patch grid and the token sheet.
    Patches(patches::PatchesArgs),
    /// Draw where a checkpoint looks in an image: CLS attention, rollout, all layers.
    Attention(attention::AttentionArgs),
    /// Draw the similarity of a checkpoint's position embeddings (ViT paper, figure 7).
    PosEmbed(pos_embed::PosEmbedArgs),
    /// Explore a checkpoint's attention in the browser: a local page for any image.
    Explore(explore::ExploreArgs),
    /// Time a fixed workload (a training step or ViT-B/16 inference); see BENCHMARKS.md.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command. Output cut short by its reader (`vit predict ... | head -1`:
/// a broken pipe on stdout) ends the command quietly, as for other Unix tools.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let r = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Export(a) => export::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Patches(a) => patches::run(a),
        Command::Attention(a) => attention::run(a),
        Command::PosEmbed(a) => pos_embed::run(a),
        Command::Explore(a) => explore::run(a),
        Command::Bench(a) => bench::run(a),
    };
    match r {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        r => r,
    }
}

/// Whether the error (or one of its causes) is a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `--format` of the commands that print one report (eval, bench).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// A table for people.
    Text,
    /// One JSON object.
    Json,
}

/// `--device cpu|cuda` and `--dtype f32|bf16` of the commands that run a checkpoint.
#[derive(Debug, Args, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N (the N-th GPU; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the layers' matrix products: f32, or bf16 (operands rounded to bfloat16,
    /// f32 sums; CPUs with AVX512_BF16).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: vit::ops::Precision,
}

fn parse_dtype(s: &str) -> Result<vit::ops::Precision, String> {
    s.parse()
        .map_err(|_: vit::Error| format!("unknown dtype '{s}' (known: f32, bf16)"))
}

impl DeviceArgs {
    /// The device, with the inference precision set for the process.
    fn device(&self) -> vit::Result<candle_core::Device> {
        vit::ops::set_inference_dtype(self.dtype)?;
        vit::train::device(&self.device)
    }
}

/// `--hf REPO[@REVISION]`: a checkpoint from the Hugging Face Hub in place of a path.
#[derive(Debug, Args, Clone)]
pub struct HubArgs {
    /// A checkpoint on the Hugging Face Hub, owner/name[@revision], in timm's or transformers'
    /// layout: fetched into the Hugging Face cache (HF_HOME; HF_ENDPOINT, HF_TOKEN,
    /// HF_HUB_OFFLINE honoured).
    #[arg(long, value_name = "REPO[@REVISION]")]
    hf: Option<String>,
}

impl HubArgs {
    /// The checkpoint to read: the Hub repo's folder, fetched, or `path`.
    fn or(&self, path: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
        use std::io::IsTerminal;
        match (&self.hf, path) {
            (Some(r), _) => {
                let r: vit::weights::hub::HubRef = r.parse()?;
                Ok(vit::weights::hub::fetch(
                    &r,
                    std::io::stderr().is_terminal(),
                )?)
            }
            (None, Some(p)) => Ok(p.to_path_buf()),
            (None, None) => anyhow::bail!("no checkpoint: give a path or --hf REPO"),
        }
    }
}

/// The checkpoint a command runs: `--weights PATH` or `--hf REPO`, and where its
/// architecture comes from.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Checkpoint: a .safetensors (timm or HuggingFace naming), a checkpoint folder or the
    /// paper's .npz.
    #[arg(long, required_unless_present = "hf")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    hub: HubArgs,
    #[command(flatten)]
    arch: ArchArgs,
}

impl ModelArgs {
    /// The checkpoint to read (a Hub repo fetched first).
    fn path(&self) -> anyhow::Result<PathBuf> {
        self.hub.or(self.weights.as_deref())
    }

    /// What the user called the checkpoint: the Hub repo or the path.
    fn name(&self) -> String {
        match (&self.hub.hf, &self.weights) {
            (Some(repo), _) => repo.clone(),
            (None, Some(p)) => p.display().to_string(),
            (None, None) => String::new(),
        }
    }
}

/// Where the architecture comes from: `--preset` or `--config`, else the checkpoint.
#[derive(Debug, Args, Clone)]
pub struct ArchArgs {
    /// Preset name (see `vit info`); the class count follows the checkpoint.
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// Architecture config file (.toml or .json).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ArchArgs {
    fn arch(&self) -> Arch {
        match (&self.preset, &self.config) {
            (Some(p), _) => Arch::Preset(p.clone()),
            (_, Some(c)) => Arch::File(c.clone()),
            _ => Arch::FromCheckpoint,
        }
    }
}

/// `--pos-resample timm|hf`.
fn parse_pos_resample(s: &str) -> Result<PosResample, String> {
    match s {
        "timm" => Ok(PosResample::Timm),
        "hf" => Ok(PosResample::Hf),
        _ => Err(format!("'{s}' is not one of timm, hf")),
    }
}
