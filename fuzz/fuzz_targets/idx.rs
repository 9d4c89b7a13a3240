//! IDX contents (raw or gzip, by content) through `read_idx_from`. The first byte picks
//! the dimension count asked for; the rest is the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vit::data::idx::read_idx_from;

fuzz_target!(|data: &[u8]| {
    let Some((&select, file)) = data.split_first() else {
        return;
    };
    let ndims = [1, 3, 2, 0][usize::from(select & 3)];
    let path = Path::new("fuzz-idx");
    if let Ok(a) = read_idx_from(file, file.len() as u64, path, ndims) {
        assert_eq!(a.dims.len(), ndims);
        assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
    }
});
