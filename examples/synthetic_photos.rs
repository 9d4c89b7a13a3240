//! Writes a folder of synthetic photos for trying and measuring image-folder training:
//! `OUT/{train,val}/class_K/N.jpg`, 256×256 JPEGs (size and count adjustable), ten classes
//! told apart by the hue and shape of one object on a noisy random-gradient background.
//!
//! ```sh
//! cargo run --release --example synthetic_photos -- /tmp/photos 20000 1000
//! vit train --dataset folder:/tmp/photos --preset vit_tiny_patch16_224 --num-classes 10
//! ```

use std::path::PathBuf;

use image::{Rgb, RgbImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

const CLASSES: usize = 10;

fn photo(class: usize, seed: u64, size: u32) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c0: [f32; 3] = [rng.random(), rng.random(), rng.random()];
    let c1: [f32; 3] = [rng.random(), rng.random(), rng.random()];
    let s = size as f32;
    let (cx, cy) = (
        rng.random_range(0.25..0.75) * s,
        rng.random_range(0.25..0.75) * s,
    );
    let r = rng.random_range(0.12..0.3) * s;
    // Hue of the object by class; squares for odd classes, disks for even ones.
    let hue = class as f32 / CLASSES as f32 * std::f32::consts::TAU;
    let object = [
        0.5 + 0.5 * hue.cos(),
        0.5 + 0.5 * (hue + 2.094).cos(),
        0.5 + 0.5 * (hue + 4.189).cos(),
    ];
    let square = class % 2 == 1;
    let mut img = RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32, y as f32);
        let t = (fx + fy) / (2.0 * s);
        let inside = if square {
            (fx - cx).abs() < r && (fy - cy).abs() < r
        } else {
            (fx - cx).powi(2) + (fy - cy).powi(2) < r * r
        };
        let noise: f32 = rng.random_range(-0.08..0.08);
        let v = |i: usize| {
            let base = if inside {
                object[i]
            } else {
                c0[i] * (1.0 - t) + c1[i] * t
            };
            ((base + noise).clamp(0.0, 1.0) * 255.0) as u8
        };
        *px = Rgb([v(0), v(1), v(2)]);
    }
    img
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        eprintln!("usage: synthetic_photos OUT [TRAIN_IMAGES=20000] [VAL_IMAGES=1000] [SIZE=256]");
        std::process::exit(2);
    };
    let number = |i: usize, default: usize| {
        args.get(i)
            .map_or(Ok(default), |s| s.parse::<usize>())
            .unwrap_or_else(|e| {
                eprintln!("error: argument {i}: {e}");
                std::process::exit(2)
            })
    };
    let (train, val, size) = (number(1, 20000), number(2, 1000), number(3, 256) as u32);
    for (split, n, offset) in [("train", train, 0u64), ("val", val, 1 << 40)] {
        (0..n).into_par_iter().for_each(|i| {
            let class = i % CLASSES;
            let dir = out.join(split).join(format!("class_{class}"));
            std::fs::create_dir_all(&dir).expect("create the class folder");
            photo(class, offset + i as u64, size)
                .save(dir.join(format!("{i:06}.jpg")))
                .expect("write the photo");
        });
    }
    println!(
        "wrote {train} training and {val} validation photos to {}",
        out.display()
    );
}
