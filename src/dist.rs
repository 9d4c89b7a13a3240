//! The processes of a data-parallel run and the collective operations between them: one
//! process alone ([`Single`]), or the ranks of an MPI job (`mpirun -np N vit train …`, in a
//! build with the `mpi` feature, on the system's MPI library). Knows nothing of models or
//! training: it moves numbers and bytes.
//!
//! Every collective is called by every process, in the same order, from the thread that
//! called [`init`].

#[cfg(feature = "mpi")]
mod mpi;

use crate::{Error, Result};

/// The processes of a job, and what they do together.
pub trait Collective {
    /// This process's index, `0..size()`; rank 0 writes the run's files.
    fn rank(&self) -> usize;
    /// Processes in the job.
    fn size(&self) -> usize;
    /// Element-wise sum over all processes, in place; every process gets the same sums.
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::sum_f32`] in f64.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every process's bytes (their lengths may differ), in rank order, on every process.
    fn gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Rank 0's `bytes`, on every process (the others' are ignored).
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
    /// Returns once every process has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every process of the job with exit status `code`, at once. For a process that
    /// cannot go on: the others would wait for it forever in their next collective.
    fn abort(&self, code: i32) -> !;
}

/// One process, alone: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![local.to_vec()])
    }
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The job this process belongs to: the ranks of an MPI job when an MPI launcher started
/// it (in a build with the `mpi` feature), else [`Single`]. A build without the feature
/// started as one of several processes is an error: each would train alone and all would
/// write the same files.
pub fn init() -> Result<Box<dyn Collective>> {
    let launched = launched_size();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        return Ok(Box::new(mpi::Mpi::init()?));
    }
    match launched {
        Some(n) if n > 1 => Err(Error::Invalid(format!(
            "started as one of {n} MPI processes, but this vit was built without MPI; \
             rebuild it with `cargo build --release --features mpi` (needs Open MPI and \
             libclang)"
        ))),
        _ => Ok(Box::new(Single)),
    }
}

/// Whether an MPI launcher started us, and the job's process count as it tells it in the
/// environment (Open MPI's `mpirun`, MPICH's Hydra); 0 when a PMIx launcher (`srun
/// --mpi=pmix`) names only our rank and Slurm does not say the step's size. `None` when no
/// launcher started us.
pub fn launched_size() -> Option<usize> {
    if let Some(n) = env_count(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]) {
        return Some(n);
    }
    std::env::var_os("PMIX_RANK")
        .map(|_| env_count(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]).unwrap_or(0))
}

/// How many processes of the job run on this machine, as the launcher tells it; `None`
/// when none started us. Each gets an equal share of the cores ([`crate::runtime::init`]).
pub fn local_processes() -> Option<usize> {
    env_count(&["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"])
}

fn env_count(names: &[&str]) -> Option<usize> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok()?.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// f32 values as bytes (little-endian), for [`Collective::gather`].
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The inverse of [`f32_bytes`].
pub fn bytes_f32(bytes: &[u8]) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Invalid(format!(
            "a message of {} bytes is not a list of f32",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_is_the_identity() {
        let s = Single;
        let mut v = vec![1.5f32, -2.0];
        s.sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(s.gather(b"abc").unwrap(), vec![b"abc".to_vec()]);
        assert_eq!(s.broadcast(b"x".to_vec()).unwrap(), b"x");
        assert_eq!((s.rank(), s.size()), (0, 1));
    }

    #[test]
    fn f32_bytes_round_trip_bit_for_bit() {
        let v = [0.0f32, -0.0, 1e-45, f32::MAX, f32::NAN, 3.25];
        let back = bytes_f32(&f32_bytes(&v)).unwrap();
        assert!(v.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(bytes_f32(&[0, 1, 2]).is_err());
    }
}
