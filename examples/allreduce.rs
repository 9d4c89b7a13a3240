//! The gradient all-reduce of data-parallel training, timed alone:
//! `mpirun -np N target/release/examples/allreduce [PRESET...]` (a build with
//! `--features mpi`). For each preset (default: `vit_fmnist`, `resnet18_fmnist`,
//! `vit_base_patch16_224`), a buffer of its parameter count is summed over the processes
//! with the call training uses (`Collective::sum_f32`), 3 times to warm up, then 20 times;
//! rank 0 prints the median time and the bandwidth it implies.

use vit::dist;
use vit::ModelConfig;

fn main() -> anyhow::Result<()> {
    vit::runtime::init();
    let world = dist::init()?;
    let mut presets: Vec<String> = std::env::args().skip(1).collect();
    if presets.is_empty() {
        presets = ["vit_fmnist", "resnet18_fmnist", "vit_base_patch16_224"]
            .map(String::from)
            .to_vec();
    }
    let n = world.size();
    if world.rank() == 0 {
        println!("| preset | gradient | processes | median all-reduce | algorithm bandwidth | bus bandwidth |");
        println!("|---|---:|---:|---:|---:|---:|");
    }
    for preset in presets {
        let floats = ModelConfig::preset(&preset)?.num_params();
        let mut buf = vec![1.0f32; floats];
        let mut times = vec![];
        for i in 0..23 {
            world.barrier()?;
            let start = std::time::Instant::now();
            world.sum_f32(&mut buf)?;
            if i >= 3 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let bytes = 4.0 * floats as f64;
        if world.rank() == 0 {
            // A ring all-reduce moves 2(N−1)/N of the buffer through each process's link.
            let bus = bytes * 2.0 * (n - 1) as f64 / n as f64 / t;
            println!(
                "| {preset} | {:.1} MB | {n} | {:.2} ms | {:.2} GB/s | {:.2} GB/s |",
                bytes / 1e6,
                1e3 * t,
                bytes / t / 1e9,
                bus / 1e9
            );
        }
    }
    Ok(())
}
