//! Image bytes (PNG or JPEG, by content) through `decode_image_bytes`, the decoder of every
//! image file the tool reads, with its limits (16384 pixels a side, 512 MiB).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::files::{decode_image_bytes, MAX_IMAGE_SIDE};

fuzz_target!(
    // libfuzzer-sys's panic hook aborts on every panic, even one that is caught; the
    // decoders' panics are caught by `decode_image_bytes` (an error naming the file), so
    // this hook only prints the message (no backtrace). A panic that gets out of
    // `decode_image_bytes` still aborts: libfuzzer-sys catches it and aborts.
    init: std::panic::set_hook(Box::new(|info| eprintln!("{info}"))),
    |data: &[u8]| {
        if let Ok(img) = decode_image_bytes(data, Path::new("fuzz-image")) {
            assert!(img.width() <= MAX_IMAGE_SIDE && img.height() <= MAX_IMAGE_SIDE);
        }
    }
);
