//! `vit compare`: finished runs side by side, as a table and a picture.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use vit::bench::profile_model;
use vit::models::Architecture;
use vit::train::{compare_picture, compare_runs, table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned table.
    Text,
    /// A Markdown table.
    Md,
    /// One JSON array of rows.
    Json,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run folders (written by `vit train`).
    #[arg(required_unless_present = "presets", conflicts_with = "presets")]
    runs: Vec<PathBuf>,
    /// Instead of runs: these presets, untrained, measured for inference (parameters,
    /// GFLOPs, output shape, latency of one image, throughput at --batch, peak memory).
    #[arg(long, value_delimiter = ',')]
    presets: Vec<String>,
    /// Measure each preset at each of these square image sizes (--presets) instead of its
    /// own, and draw scaling.png: GFLOPs and latency against image size. At most 2048 px
    /// (a ViT's attention at 4096 px would need tens of GB).
    #[arg(long, value_delimiter = ',', requires = "presets")]
    sizes: Vec<usize>,
    /// Batch of the throughput measurement (--presets).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Timed runs of each measurement (--presets); the median is reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed runs before them (--presets).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Folder for compare.png, created if missing.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

pub fn run(a: CompareArgs) -> anyhow::Result<()> {
    if !a.presets.is_empty() {
        return presets(&a);
    }
    let rows = compare_runs(&a.runs)?;
    std::fs::create_dir_all(&a.out).map_err(|e| vit::Error::io(&a.out, e))?;
    let png = a.out.join("compare.png");
    vit::viz::save_png(&compare_picture(&rows)?, &png)?;
    match a.format {
        Format::Json => out!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Text | Format::Md => {
            out!("{}", table(&rows, a.format == Format::Md).trim_end());
            out!("wrote {}", png.display());
        }
    }
    Ok(())
}

fn presets(a: &CompareArgs) -> anyhow::Result<()> {
    if let Some(s) = a.sizes.iter().find(|&&s| !(1..=2048).contains(&s)) {
        anyhow::bail!("--sizes takes sides of 1 to 2048 px, got {s}");
    }
    let mut rows = Vec::new();
    for name in &a.presets {
        let cfg = vit::ModelConfig::preset(name)?;
        if a.sizes.is_empty() {
            rows.push(profile_model(name, &cfg, a.batch, a.iters, a.warmup)?);
        }
        for &s in &a.sizes {
            let mut c = cfg.clone();
            c.set_image_size([s, s]);
            c.validate()
                .map_err(|e| anyhow::anyhow!("{name} at {s}x{s}: {e}"))?;
            rows.push(profile_model(name, &c, a.batch, a.iters, a.warmup)?);
        }
    }
    let picture = if a.sizes.is_empty() {
        None
    } else {
        std::fs::create_dir_all(&a.out).map_err(|e| vit::Error::io(&a.out, e))?;
        let png = a.out.join("scaling.png");
        vit::viz::save_png(&vit::bench::scaling_picture(&rows)?, &png)?;
        Some(png)
    };
    if a.format == Format::Json {
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let head = [
        "preset".to_string(),
        "size".into(),
        "params".into(),
        "GFLOPs".into(),
        "output".into(),
        "ms/image (batch 1)".into(),
        format!("img/s (batch {})", a.batch),
        "peak MiB".into(),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                format!("{}x{}", r.image_size[0], r.image_size[1]),
                r.params.to_string(),
                format!("{:.3}", r.gflops),
                format!("{:?}", r.output_shape),
                format!("{:.2}", r.latency_ms.median),
                format!("{:.1}", r.images_per_second.median),
                r.peak_rss_bytes
                    .map_or_else(|| "-".into(), |b| format!("{:.0}", b as f64 / 1048576.0)),
            ]
        })
        .collect();
    if a.format == Format::Md {
        out!("| {} |", head.join(" | "));
        out!("|{}", "---|".repeat(head.len()));
        for c in &cells {
            out!("| {} |", c.join(" | "));
        }
    } else {
        print_aligned(&head, &cells)?;
        out!(
            "(untrained weights; median of {} timed runs after {} warm-up; {} threads)",
            a.iters,
            a.warmup,
            candle_core::utils::get_num_threads()
        );
    }
    if let Some(png) = picture {
        out!("wrote {}", png.display());
    }
    Ok(())
}

/// The table with columns aligned: the first to the left, the others to the right.
fn print_aligned(head: &[String], cells: &[Vec<String>]) -> anyhow::Result<()> {
    let width: Vec<usize> = (0..head.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |c: &[String]| {
        c.iter()
            .enumerate()
            .map(|(i, s)| {
                if i == 0 {
                    format!("{s:<w$}", w = width[i])
                } else {
                    format!("{s:>w$}", w = width[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    out!("{}", line(head));
    for c in cells {
        out!("{}", line(c));
    }
    Ok(())
}
