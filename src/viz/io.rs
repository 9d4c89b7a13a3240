//! Writing results to disk atomically: pictures as PNG and arrays as NumPy `.npy` (v1.0,
//! little-endian float32). A reader never sees a half-written file: each file is written to
//! a temporary name in the same directory, flushed to disk and renamed into place.

use std::path::Path;

use image::RgbImage;

use crate::{Error, Result};

/// Encodes `img` as PNG and writes it to `path` atomically.
pub fn save_png(img: &RgbImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Invalid(format!("{}: PNG encoding failed: {e}", path.display())))?;
    crate::atomic::write_atomic(path, &bytes)
}

/// The `.npy` v1.0 header for a C-order little-endian float32 array of `shape`: magic,
/// version, header length and the dict, space-padded and newline-terminated so that data
/// starts at a multiple of 64 bytes.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // 6 magic + 2 version + 2 length bytes, then the dict and its final newline.
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut h = Vec::with_capacity(10 + dict.len());
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

/// Writes `data` (row-major, `shape`'s product elements) as a NumPy `.npy` file (format
/// version 1.0, dtype `<f4`, C order) to `path` atomically; `numpy.load` reads it back.
pub fn write_npy(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    let path = path.as_ref();
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(Error::Shape {
            name: format!("array for {}", path.display()),
            expected: shape.to_vec(),
            found: vec![data.len()],
        });
    }
    let mut bytes = npy_header(shape);
    if bytes.len() > 10 + u16::MAX as usize {
        return Err(Error::Invalid(format!(
            "{}: shape {shape:?} has too many dimensions for .npy v1.0",
            path.display()
        )));
    }
    bytes.reserve(4 * data.len());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    crate::atomic::write_atomic(path, &bytes)
}

/// Test helper shared by the crate's tests.
#[cfg(test)]
/// A minimal `.npy` v1.0 reader for `<f4` C-order arrays, checking every header rule.
pub(crate) fn read_npy(bytes: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "magic");
    assert_eq!(&bytes[6..8], &[1, 0], "version 1.0");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let total = 10 + hlen;
    assert_eq!(total % 64, 0, "header is padded to a multiple of 64");
    let dict = std::str::from_utf8(&bytes[10..total]).unwrap();
    assert!(dict.ends_with('\n'));
    let dict = dict.trim_end();
    assert!(dict.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': ("));
    assert!(dict.ends_with("), }"));
    let inner = &dict[dict.find("'shape': (").unwrap() + 10..dict.rfind(')').unwrap()];
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[total..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(bytes[total..].len() % 4, 0);
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(Vec<usize>, Vec<f32>); 4] = [
            (vec![2, 3], vec![0.0, 1.5, -2.0, 3.25, f32::MAX, -0.0]),
            (vec![4], vec![1.0, 2.0, 3.0, 4.0]),
            (vec![2, 1, 2], vec![9.0, 8.0, 7.0, 6.0]),
            (vec![], vec![42.0]),
        ];
        for (i, (shape, data)) in cases.iter().enumerate() {
            let p = dir.path().join(format!("a{i}.npy"));
            write_npy(&p, shape, data).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let (s, d) = read_npy(&bytes);
            assert_eq!(&s, shape);
            assert_eq!(
                d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        // The exact header numpy writes for shape (2, 3).
        let h = npy_header(&[2, 3]);
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        assert_eq!(h.len(), 128);
        assert_eq!(&h[8..10], &[118, 0]); // 128 − 10
        assert_eq!(
            &h[10..],
            format!("{dict}{}\n", " ".repeat(128 - 10 - dict.len() - 1)).as_bytes()
        );
        assert!(npy_header(&[4]).windows(6).any(|w| w == b"(4,), "));
        // Wrong length: refused, nothing written, no temporary left behind.
        let p = dir.path().join("bad.npy");
        assert!(matches!(
            write_npy(&p, &[2, 2], &[1.0]),
            Err(Error::Shape { .. })
        ));
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), cases.len());
    }

    #[test]
    fn png_is_written_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        let mut img = RgbImage::new(3, 2);
        img.put_pixel(2, 1, image::Rgb([10, 200, 30]));
        save_png(&img, &p).unwrap();
        save_png(&img, &p).unwrap(); // overwriting is fine
        let back = image::open(&p).unwrap().to_rgb8();
        assert_eq!(back, img);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.png")]);
        // A missing directory is an I/O error naming the path.
        let e = save_png(&img, dir.path().join("no/such/dir.png")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }
}
