//! Image bytes (PNG or JPEG, by content) through `decode_image_bytes`, the decoder of every
//! image file the tool reads, with its limits (16384 pixels a side, 512 MiB).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::files::{decode_image_bytes, MAX_IMAGE_SIDE};

fuzz_target!(
    // libfuzzer-sys's panic hook aborts on every panic, even one that is then caught. The
    // binary's own hook (`quiet_decoder_panics`, installed by `runtime::init`) wraps it:
    // a panic inside a decoder, which `decode_image_bytes` catches and turns into an error
    // naming the file, is silent and goes on; any other panic reaches libfuzzer-sys's hook
    // and aborts the run with its stack.
    init: vit::files::quiet_decoder_panics(),
    |data: &[u8]| {
        if let Ok(img) = decode_image_bytes(data, Path::new("fuzz-image")) {
            assert!(img.width() <= MAX_IMAGE_SIDE && img.height() <= MAX_IMAGE_SIDE);
        }
    }
);
