//! The strided matrix view shared by the matrix-multiply provider (`gemm.rs`), our own
//! kernel (`sgemm.rs`) and the kernels that call them: a pointer and two strides, no
//! ownership. Its own file so that neither multiply module has to import the other's types.

/// A read-only strided view of an f32 matrix: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a MatRef is a read-only view; the kernels that share one across threads keep
// the viewed buffer alive and unmodified for the duration of the parallel section.
unsafe impl Send for MatRef {}
// SAFETY: as for Send: nothing is written through a MatRef, and the viewed buffer outlives
// every thread that holds the view.
unsafe impl Sync for MatRef {}

impl MatRef {
    pub fn new(ptr: *const f32, rs: isize, cs: isize) -> Self {
        MatRef { ptr, rs, cs }
    }

    /// The transpose (a view, no copy).
    pub fn t(self) -> Self {
        MatRef {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The view starting at element (i, j).
    ///
    /// # Safety
    /// (i, j) must lie inside the viewed matrix.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) unsafe fn at(self, i: usize, j: usize) -> MatRef {
        // SAFETY: the caller's contract: the offset stays inside the viewed allocation.
        let ptr = unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) };
        MatRef::new(ptr, self.rs, self.cs)
    }
}
