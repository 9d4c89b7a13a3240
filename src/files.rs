//! Reading the files a user names without trusting them: only regular files (a FIFO,
//! `/dev/zero` or a folder is refused by what it is, before anything is read), sizes known
//! and bounded before a buffer is allocated, and every error naming the path.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// The largest text file (recipe, config, JSON sidecar) we read: far above any real one.
pub const MAX_TEXT: u64 = 16 << 20;

/// Opens `path` for reading if it is a regular file (symbolic links followed); returns it
/// with its size.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    // Looked at before opening: opening a FIFO for reading would wait for a writer.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            return Ok((file, meta.len()));
        }
    }
    let what = if meta.is_dir() {
        "a folder"
    } else {
        "a device, pipe or socket"
    };
    Err(Error::format(
        path,
        format!("is {what}, not a regular file"),
    ))
}

/// The whole of a regular file of at most `max` bytes, read into a buffer reserved up
/// front (an allocation failure is an error, not an abort).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > max {
        return Err(Error::format(
            path,
            format!("is {len} bytes, more than the {max} this kind of file can be"),
        ));
    }
    read_exactly(file, len, path)
}

/// A text file of at most [`MAX_TEXT`] bytes, as UTF-8.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = read_bounded(path, MAX_TEXT)?;
    String::from_utf8(bytes).map_err(|_| Error::format(path, "is not UTF-8 text"))
}

/// `len` bytes from `file` (its size as `open_regular` saw it).
pub fn read_exactly(file: File, len: u64, path: &Path) -> Result<Vec<u8>> {
    let n = usize::try_from(len).map_err(|_| Error::format(path, "is too large to read"))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(n).map_err(|_| {
        Error::format(
            path,
            format!("needs {n} bytes of memory to read, which are not available"),
        )
    })?;
    file.take(len)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 != len {
        return Err(Error::format(path, "changed size while being read"));
    }
    Ok(buf)
}

/// Most pixels along either side of an image we decode.
pub const MAX_IMAGE_SIDE: u32 = 1 << 14;
/// Most bytes the image decoder may allocate for one image.
pub const MAX_IMAGE_BYTES: u64 = 512 << 20;

thread_local! {
    /// Whether this thread is inside an image decoder, whose panics become errors.
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs a panic hook that keeps quiet about panics inside image decoders (they are
/// caught and reported as one-line errors) and prints every other panic as before.
/// Called once by [`crate::runtime::init`].
pub fn quiet_decoder_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !DECODING.with(|d| d.get()) {
            default(info);
        }
    }));
}

/// Decodes an image file (PNG or JPEG, by its content): a regular file whose header says at
/// most [`MAX_IMAGE_SIDE`] pixels a side and whose decoding needs at most
/// [`MAX_IMAGE_BYTES`], so a small file claiming a huge image is refused by its header.
pub fn decode_image(path: &Path) -> Result<image::DynamicImage> {
    let (file, _) = open_regular(path)?;
    decode_with_limits(std::io::BufReader::new(file), path)
}

/// Decodes an image held in memory as [`decode_image`] decodes a file, with its limits;
/// `path` names the source in errors.
pub fn decode_image_bytes(bytes: &[u8], path: &Path) -> Result<image::DynamicImage> {
    decode_with_limits(std::io::Cursor::new(bytes), path)
}

/// The one decoder of [`decode_image`] and [`decode_image_bytes`]: format by content,
/// the size and memory limits, errors naming `path`.
fn decode_with_limits(
    reader: impl std::io::BufRead + std::io::Seek,
    path: &Path,
) -> Result<image::DynamicImage> {
    let mut reader = image::ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    // A decoder that panics on a malformed file (zune-jpeg 0.5.15 unwraps in its AVX2
    // IDCT on a 704-byte JPEG the fuzzer found) is an error naming the file, not a crash.
    DECODING.with(|d| d.set(true));
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode()));
    DECODING.with(|d| d.set(false));
    let Ok(decoded) = decoded else {
        return Err(Error::format(
            path,
            "cannot decode image: the decoder failed on its malformed data",
        ));
    };
    decoded.map_err(|e| {
        // On one line: some decoders end their messages with a line break.
        let msg = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        Error::format(path, format!("cannot decode image: {msg}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_and_oversized_ones_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_text(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a folder, not a regular file"), "{e}");
        let e = read_text(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("/dev/zero: is a device, pipe or socket"), "{e}");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let e = read_text(&fifo).unwrap_err().to_string(); // returns: no writer awaited
            assert!(e.contains("is a device, pipe or socket"), "{e}");
        }
        let big = dir.path().join("big.toml");
        let f = File::create(&big).unwrap();
        f.set_len(MAX_TEXT + 1).unwrap(); // sparse: costs no disk
        let e = read_text(&big).unwrap_err().to_string();
        assert!(e.contains("more than the"), "{e}");
        let ok = dir.path().join("ok.toml");
        std::fs::write(&ok, "a = 1\n").unwrap();
        assert_eq!(read_text(&ok).unwrap(), "a = 1\n");
        let e = read_text(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    /// JPEGs on which the decoder (zune-jpeg 0.5.15) panics, found by the `image` fuzz
    /// target: unwraps in its AVX2 inverse DCT (704 and 395 bytes) and an i32 overflow in
    /// its DC dequantisation (322 bytes; a panic where overflow is checked). Each is one
    /// error naming the file; no panic gets out. A CPU without AVX2 may decode the first two.
    #[test]
    fn a_decoder_panic_is_an_error_naming_the_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in [
            "tests/fixtures/bad/zune-avx2-idct-panic.jpg",
            "fuzz/seeds/image/regress-jpeg-idct-unwrap.jpg",
            "fuzz/seeds/image/regress-jpeg-dc-overflow.jpg",
        ] {
            let path = root.join(file);
            if let Err(e) = decode_image(&path) {
                let e = e.to_string();
                assert!(
                    e.starts_with(&format!("{}: cannot decode image", path.display())),
                    "{e}"
                );
            }
            let bytes = std::fs::read(&path).unwrap();
            let _ = decode_image_bytes(&bytes, &path); // no panic
        }
    }

    /// A 70-byte PNG whose header claims 100,000 × 100,000 pixels is refused by its
    /// header, not decoded into 30 GB.
    #[test]
    fn an_image_header_claiming_a_huge_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.png");
        image::RgbImage::new(4, 3).save(&small).unwrap();
        let mut bytes = std::fs::read(&small).unwrap();
        // IHDR's width and height (big-endian) at bytes 16..24, then its CRC made right.
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let bomb = dir.path().join("bomb.png");
        std::fs::write(&bomb, &bytes).unwrap();
        let e = decode_image(&bomb).unwrap_err().to_string();
        assert!(
            e.contains("bomb.png: cannot decode image") && e.contains("limit"),
            "{e}"
        );
        assert_eq!(decode_image(&small).unwrap().width(), 4);
        let e = decode_image_bytes(&bytes, Path::new("mem.png"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mem.png: cannot decode image") && e.contains("limit"),
            "{e}"
        );
        let e = decode_image(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
