//! `vit bench`: times a fixed workload and prints the report as text or one JSON object.

use clap::Args;
use vit::bench::{BenchOptions, BenchReport};

use super::info::thousands;
use super::ReportFormat as Format;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// train-fm (one AdamW step of a ViT, batch 128 of 28x28x1, width 192, depth 12),
    /// train-resnet (the same for resnet18_fmnist), infer-b16 (ViT-B/16 forward, batch 8 of
    /// 224x224x3), infer-swin-t (Swin-T forward, the same batch) or train-b16 (one AdamW
    /// step of ViT-B/16, batch 32 of 224x224x3).
    #[arg(long)]
    workload: String,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed iterations before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also show the median time of each phase (forward, backward, optimizer).
    #[arg(long)]
    profile: bool,
    /// Training workloads: gradient checkpointing (activations recomputed in backward).
    #[arg(long)]
    grad_checkpoint: bool,
    /// Inference workloads: f32, or bf16 matrix products (CPUs with AVX512_BF16).
    #[arg(long, default_value = "f32", value_parser = super::parse_dtype)]
    dtype: vit::ops::Precision,
    /// Output format (json: one object, for bench/compare.sh).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let r = vit::bench::run(&BenchOptions {
        workload: a.workload.parse()?,
        iters: a.iters,
        warmup: a.warmup,
        profile: a.profile,
        grad_checkpoint: a.grad_checkpoint,
        dtype: a.dtype,
    })?;
    match a.format {
        Format::Json => out!("{}", serde_json::to_string(&r)?),
        Format::Text => print_text(&r)?,
    }
    Ok(())
}

fn print_text(r: &BenchReport) -> anyhow::Result<()> {
    out!("{}: {}", r.workload, r.description);
    out!(
        "  {} parameters; {} timed iterations after {} warm-up",
        thousands(r.params),
        r.iters,
        r.warmup
    );
    let (ips, ms) = (r.images_per_second, r.step_ms);
    out!(
        "  images/s     {:>9.1}  (min {:.1}, max {:.1})",
        ips.median,
        ips.min,
        ips.max
    );
    out!(
        "  step         {:>9.1} ms  (min {:.1}, max {:.1})",
        ms.median,
        ms.min,
        ms.max
    );
    let rss = r.peak_rss_bytes.map_or("n/a".to_string(), |b| {
        format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
    });
    out!("  peak memory  {rss:>9}");
    out!("  threads      {:>9}", r.threads);
    out!("  matmul       {}", r.provider);
    out!("  kernels      {}", r.kernels);
    if let Some(k) = r.int8_kernel {
        out!("  int8 kernel  {k}");
    }
    if let Some(phases) = &r.phases {
        let total: f64 = phases.iter().map(|p| p.median_ms).sum();
        out!("\n  {:<26} {:>10} {:>7}", "phase", "median ms", "share");
        for p in phases {
            out!(
                "  {:<26} {:>10.1} {:>6.1}%",
                p.name,
                p.median_ms,
                100.0 * p.median_ms / total.max(1e-12)
            );
        }
    }
    Ok(())
}
