//! IDX files, the format of MNIST and Fashion-MNIST: a big-endian header (magic, type,
//! dimensions) followed by raw bytes. Reads raw or gzip-compressed files (detected by
//! content) and validates magic, dimensions and lengths, naming the file in every error.

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;

use super::dataset::Dataset;
use super::spec::Split;
use crate::{Error, Result};

/// IDX type code for unsigned bytes, the only one these datasets use.
const IDX_U8: u8 = 0x08;

/// Largest pre-allocation made from a header's claim before the data is seen.
const MAX_RESERVE: usize = 1 << 26;

/// An n-dimensional array of bytes read from an IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Row-major data, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// The (images, labels) file names of an IDX split, without the `.gz` suffix.
pub fn idx_file_names(split: Split) -> (&'static str, &'static str) {
    match split {
        Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
}

/// `dir/base.gz` or `dir/base`, whichever exists (compressed preferred).
pub(crate) fn find_idx_file(dir: &Path, base: &str) -> Option<PathBuf> {
    [format!("{base}.gz"), base.to_string()]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Reads an IDX file of unsigned bytes with `ndims` dimensions, gzip-compressed or not.
pub fn read_idx(path: &Path, ndims: usize) -> Result<IdxArray> {
    let (file, len) = crate::files::open_regular(path)?;
    read_idx_from(BufReader::new(file), len, path, ndims)
}

/// Reads IDX contents of `len` bytes, gzip-compressed or not (by content), as [`read_idx`]
/// reads a file; `path` only names the source in errors.
pub fn read_idx_from(
    mut reader: impl BufRead,
    len: u64,
    path: &Path,
    ndims: usize,
) -> Result<IdxArray> {
    let head = reader.fill_buf().map_err(|e| Error::io(path, e))?;
    let gzipped = head.starts_with(&[0x1f, 0x8b]);
    if gzipped {
        // Deflate expands at most 1032:1, so a header claiming more than that is a lie
        // (a gzip bomb or a corrupt file) found before anything is allocated.
        let most = len.saturating_mul(1032);
        parse_idx(MultiGzDecoder::new(reader), path, ndims, most)
    } else {
        parse_idx(reader, path, ndims, len)
    }
}

/// Describes a read error inside the file's contents.
fn content_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    if e.kind() == ErrorKind::UnexpectedEof {
        Error::format(path, format!("truncated file: {what} ends early"))
    } else {
        Error::format(path, format!("corrupt file while reading {what}: {e}"))
    }
}

/// Parses an IDX stream of at most `most` bytes; `path` only names the source in errors.
pub fn parse_idx(mut reader: impl Read, path: &Path, ndims: usize, most: u64) -> Result<IdxArray> {
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .map_err(|e| content_error(path, "the IDX header", e))?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(Error::format(
            path,
            format!(
                "not an IDX file (magic bytes {:02x} {:02x} {:02x} {:02x})",
                magic[0], magic[1], magic[2], magic[3]
            ),
        ));
    }
    if magic[2] != IDX_U8 {
        return Err(Error::format(
            path,
            format!(
                "unsupported IDX element type 0x{:02x} (expected unsigned bytes, 0x08)",
                magic[2]
            ),
        ));
    }
    if usize::from(magic[3]) != ndims {
        return Err(Error::format(
            path,
            format!("IDX array has {} dimensions, expected {ndims}", magic[3]),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    for _ in 0..ndims {
        let mut d = [0u8; 4];
        reader
            .read_exact(&mut d)
            .map_err(|e| content_error(path, "the IDX header", e))?;
        dims.push(u32::from_be_bytes(d) as usize);
    }
    let shape = dims
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x");
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n as u64 <= most)
        .ok_or_else(|| {
            Error::format(
                path,
                format!("truncated file: a {shape} array is more than the file can hold"),
            )
        })?;
    let mut data = Vec::with_capacity(expected.min(MAX_RESERVE));
    (&mut reader)
        .take(expected as u64)
        .read_to_end(&mut data)
        .map_err(|e| content_error(path, &format!("the {shape} array"), e))?;
    if data.len() != expected {
        return Err(Error::format(
            path,
            format!(
                "truncated file: the {shape} array needs {expected} bytes, found {}",
                data.len()
            ),
        ));
    }
    // Reading to the end also makes the gzip decoder verify its checksum.
    let mut extra = [0u8; 1];
    loop {
        match reader.read(&mut extra) {
            Ok(0) => break,
            Ok(_) => {
                return Err(Error::format(
                    path,
                    format!("unexpected bytes after the {shape} array"),
                ))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(content_error(path, "the end of the file", e)),
        }
    }
    Ok(IdxArray { dims, data })
}

/// Loads an images file (3 dims: N×H×W) and a labels file (1 dim: N) into a grayscale
/// dataset, checking that counts agree and labels index `class_names`.
pub fn load_idx_pair(images: &Path, labels: &Path, class_names: Vec<String>) -> Result<Dataset> {
    let img = read_idx(images, 3)?;
    let lab = read_idx(labels, 1)?;
    let (n, h, w) = (img.dims[0], img.dims[1], img.dims[2]);
    if n > 0 && (h == 0 || w == 0) {
        return Err(Error::format(
            images,
            format!("images have an empty size {h}x{w}"),
        ));
    }
    if lab.dims[0] != n {
        return Err(Error::format(
            labels,
            format!(
                "holds {} labels but {} holds {n} images",
                lab.dims[0],
                images.display()
            ),
        ));
    }
    let classes = class_names.len();
    if let Some((i, &l)) = lab
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= classes)
    {
        return Err(Error::format(
            labels,
            format!("label {l} at index {i} is out of range for {classes} classes"),
        ));
    }
    Dataset::new(
        img.data,
        lab.data.into_iter().map(u32::from).collect(),
        1,
        h.max(1),
        w.max(1),
        class_names,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{gzip, idx_bytes};

    fn names() -> Vec<String> {
        (0..10).map(|d| d.to_string()).collect()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn sample() -> (Vec<u8>, Vec<u8>) {
        // Three 2x3 images with pixel value = 10*image + position; labels 7, 0, 9.
        let pixels: Vec<u8> = (0..3u8)
            .flat_map(|i| (0..6u8).map(move |p| 10 * i + p))
            .collect();
        (idx_bytes(&[3, 2, 3], &pixels), idx_bytes(&[3], &[7, 0, 9]))
    }

    #[test]
    fn reads_raw_and_gzip_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let (img, lab) = sample();
        let raw = load_idx_pair(
            &write(dir.path(), "i", &img),
            &write(dir.path(), "l", &lab),
            names(),
        )
        .unwrap();
        let gz = load_idx_pair(
            &write(dir.path(), "i.gz", &gzip(&img)),
            &write(dir.path(), "l.gz", &gzip(&lab)),
            names(),
        )
        .unwrap();
        assert_eq!(raw, gz);
        let (path, g) = (Path::new("mem"), gzip(&img));
        let in_memory = read_idx_from(&g[..], g.len() as u64, path, 3).unwrap();
        assert_eq!(
            in_memory,
            read_idx_from(&img[..], img.len() as u64, path, 3).unwrap()
        );
        assert_eq!(in_memory.data, raw.images);
        assert_eq!(
            (raw.len(), raw.channels, raw.height, raw.width),
            (3, 1, 2, 3)
        );
        assert_eq!(raw.labels, vec![7, 0, 9]);
        assert_eq!(raw.image(2), &[20, 21, 22, 23, 24, 25]);
    }

    #[test]
    fn finds_compressed_or_raw_names() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_idx_file(dir.path(), "a"), None);
        write(dir.path(), "a", b"x");
        assert_eq!(find_idx_file(dir.path(), "a"), Some(dir.path().join("a")));
        write(dir.path(), "a.gz", b"x");
        assert_eq!(
            find_idx_file(dir.path(), "a"),
            Some(dir.path().join("a.gz"))
        );
        assert_eq!(idx_file_names(Split::Test).0, "t10k-images-idx3-ubyte");
    }

    fn format_error(bytes: &[u8], ndims: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "bad-file", bytes);
        match read_idx(&p, ndims) {
            Err(e @ Error::Format { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("bad-file"),
                    "error does not name the file: {msg}"
                );
                msg
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_and_truncated_files_give_format_errors() {
        let (img, _) = sample();
        assert!(format_error(&img[..img.len() - 1], 3).contains("truncated"));
        assert!(format_error(&img[..6], 3).contains("truncated"));
        assert!(format_error(&[], 3).contains("truncated"));
        let mut long = img.clone();
        long.push(0);
        assert!(format_error(&long, 3).contains("unexpected bytes"));
        let mut bad_magic = img.clone();
        bad_magic[0] = 1;
        assert!(format_error(&bad_magic, 3).contains("not an IDX file"));
        let mut bad_type = img.clone();
        bad_type[2] = 0x0d;
        assert!(format_error(&bad_type, 3).contains("element type 0x0d"));
        assert!(format_error(&img, 1).contains("3 dimensions, expected 1"));
        // Huge dimensions in a small file: no huge allocation, just "truncated".
        let huge = idx_bytes(&[u32::MAX as usize, u32::MAX as usize, 2], &[1, 2, 3]);
        let msg = format_error(&huge, 3);
        assert!(
            msg.contains("truncated") || msg.contains("too large"),
            "{msg}"
        );

        // The same in a gzip file (which could expand 1032-fold at most).
        let bomb = idx_bytes(&[100_000, 1000, 1000], &[1, 2, 3]); // 1e11 bytes claimed
        let msg = format_error(&gzip(&bomb), 3);
        assert!(msg.contains("more than the file can hold"), "{msg}");

        let gz = gzip(&img);
        assert!(format_error(&gz[..gz.len() / 2], 3).contains("truncated"));
        let mut flipped = gz.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        // Depending on the byte, deflate fails, ends early or yields extra data: any
        // of them must be a format error naming the file (checked by the helper).
        format_error(&flipped, 3);
        let mut bad_crc = gz.clone();
        let crc_at = bad_crc.len() - 8;
        bad_crc[crc_at] ^= 0xff;
        assert!(format_error(&bad_crc, 3).contains("corrupt"));
    }

    #[test]
    fn pair_mismatches_name_the_labels_file() {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = sample();
        let i = write(dir.path(), "imgs", &img);
        let l = write(dir.path(), "labs", &idx_bytes(&[2], &[1, 2]));
        let msg = load_idx_pair(&i, &l, names()).unwrap_err().to_string();
        assert!(msg.contains("labs") && msg.contains("2 labels"), "{msg}");
        let l = write(dir.path(), "labs2", &idx_bytes(&[3], &[1, 12, 2]));
        let msg = load_idx_pair(&i, &l, names()).unwrap_err().to_string();
        assert!(
            msg.contains("labs2") && msg.contains("label 12 at index 1"),
            "{msg}"
        );
        let missing = load_idx_pair(&dir.path().join("nope"), &l, names()).unwrap_err();
        assert!(matches!(missing, Error::Io { .. }));
    }
}
