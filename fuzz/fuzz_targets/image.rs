//! Image bytes (PNG or JPEG, by content) through `decode_image_bytes`, the decoder of every
//! image file the tool reads, with its limits (16384 pixels a side, 512 MiB).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::files::{decode_image_bytes, MAX_IMAGE_SIDE};

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = decode_image_bytes(data, Path::new("fuzz-image")) {
        assert!(img.width() <= MAX_IMAGE_SIDE && img.height() <= MAX_IMAGE_SIDE);
    }
});
