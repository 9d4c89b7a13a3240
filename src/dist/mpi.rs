//! [`Collective`] over MPI (the `mpi` crate on the system's library, Open MPI or MPICH).
//! MPI's default error handler ends the whole job on a failed call, with MPI's own
//! message: a collective here either completes or takes every process down, never hangs
//! on a dead peer.

use std::cell::RefCell;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::{Count, Threading};

use super::Collective;
use crate::{Error, Result};

/// Elements per all-reduce call: sums go through a scratch buffer of this size (4 MiB of
/// f32), one bucket after another, instead of a second copy of every gradient.
const BUCKET: usize = 1 << 20;

/// The ranks of `MPI_COMM_WORLD`. MPI is finalized when this is dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    scratch: RefCell<(Vec<f32>, Vec<f64>)>,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

impl Mpi {
    /// Initializes MPI (collectives from the calling thread only: `MPI_THREAD_FUNNELED`).
    pub fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::Invalid("MPI was already initialized".into()))?;
        Ok(Mpi {
            world: universe.world(),
            scratch: RefCell::default(),
            _universe: universe,
        })
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        sum_in_buckets(&self.world, buf, &mut self.scratch.borrow_mut().0);
        Ok(())
    }

    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        sum_in_buckets(&self.world, buf, &mut self.scratch.borrow_mut().1);
        Ok(())
    }

    fn gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let len = Count::try_from(local.len()).map_err(|_| {
            Error::Invalid(format!("a message of {} bytes is too long", local.len()))
        })?;
        let mut counts = vec![0 as Count; self.size()];
        self.world.all_gather_into(&len, &mut counts[..]);
        let displs: Vec<Count> = counts
            .iter()
            .scan(0 as Count, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut all = vec![0u8; total];
        {
            let mut parts = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(local, &mut parts);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn broadcast(&self, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(bytes)
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// Sums `buf` over the processes in place, [`BUCKET`] elements at a time through `scratch`.
fn sum_in_buckets<T>(world: &SimpleCommunicator, buf: &mut [T], scratch: &mut Vec<T>)
where
    T: Equivalence + Copy + Default,
{
    scratch.resize(BUCKET.min(buf.len()), T::default());
    for chunk in buf.chunks_mut(BUCKET) {
        let out = &mut scratch[..chunk.len()];
        world.all_reduce_into(&*chunk, out, SystemOperation::sum());
        chunk.copy_from_slice(out);
    }
}
