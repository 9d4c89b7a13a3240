//! `vit explore`: serves a checkpoint's attention explorer, a local web page.

use std::io::Write;
use std::net::IpAddr;

use clap::Args;
use vit::explore::{ExploreOptions, Explorer};
use vit::predict::Predictor;

use super::predict::PreprocessArgs;
use super::{DeviceArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct ExploreArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    pre: PreprocessArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Port to listen on; 0 takes a free one.
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Address to listen on. The default serves this machine only; another (0.0.0.0, a
    /// LAN address) lets other machines reach the page.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Largest image upload accepted: bytes, or with a K or M suffix (20M).
    #[arg(long, value_parser = parse_size, default_value = "20M")]
    max_upload: usize,
    /// How many classes the prediction lists.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
}

/// `1000`, `64K`, `20M` (binary multiples).
fn parse_size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        _ => (s, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{s}' is not a size such as 20M, 512K or 100000"))
}

pub fn run(a: ExploreArgs) -> anyhow::Result<()> {
    let source = a.model.path()?;
    let name = a.model.name();
    let p = Predictor::load(&source, &a.pre.load_options(&a.model.arch, &a.device)?)?;
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let opts = ExploreOptions {
        host: a.host,
        port: a.port,
        max_upload: a.max_upload,
        top_k: a.top_k,
    };
    let explorer = Explorer::bind(p, name, &opts)?;
    if !a.host.is_loopback() {
        eprintln!(
            "note: serving on {}: other machines that reach this address can use the page",
            a.host
        );
    }
    out!("{}", explorer.url());
    std::io::stdout().flush()?;
    eprintln!(
        "vit explore: open {} in a browser (Ctrl-C stops)",
        explorer.url()
    );
    explorer.run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("20m"), Ok(20 << 20));
        for bad in ["", "0", "M", "-1", "1.5M", "20G", "99999999999999999999M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
