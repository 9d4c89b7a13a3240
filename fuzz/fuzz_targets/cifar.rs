//! CIFAR binary records (`parse_records`) and the published `.tar.gz` archive
//! (`read_cifar_archive`). The first byte picks CIFAR-10 or -100 (bit 0), records or
//! archive (bit 1) and the split (bit 2); the rest is the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::data::cifar::{parse_records, read_cifar_archive, CifarKind};
use vit::data::Split;

fuzz_target!(|data: &[u8]| {
    let Some((&select, file)) = data.split_first() else {
        return;
    };
    let kind = if select & 1 == 0 {
        CifarKind::Cifar10
    } else {
        CifarKind::Cifar100
    };
    let path = Path::new("fuzz-cifar");
    if select & 2 == 0 {
        if let Ok((images, labels)) = parse_records(file, path, kind) {
            assert_eq!(images.len(), labels.len() * 3 * 32 * 32);
            assert!(labels.iter().all(|&l| (l as usize) < kind.num_classes()));
        }
    } else {
        let split = if select & 4 == 0 {
            Split::Train
        } else {
            Split::Test
        };
        if let Ok(ds) = read_cifar_archive(file, file.len() as u64, path, kind, split) {
            assert_eq!((ds.channels, ds.height, ds.width), (3, 32, 32));
            assert_eq!(ds.num_classes(), kind.num_classes());
        }
    }
});
