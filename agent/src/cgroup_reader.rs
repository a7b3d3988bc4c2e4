//! Reads many small cgroupfs files in one go: one io_uring submission for
//! all of them (a syscall per batch, not one per file), with plain pread
//! where io_uring is unavailable (`kernel.io_uring_disabled`, seccomp).
//! cgroupfs files are regenerated on every read from offset 0, so the
//! sampler keeps them open and reads them again each round.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use io_uring::{IoUring, opcode, types};

/// Entries per submission; larger sets go in several batches.
const RING_ENTRIES: u32 = 256;
/// Bytes read of a stat file: memory.stat is ~1.5 KiB on v1 and v2.
pub const STAT_READ_SIZE: usize = 8192;
/// Bytes read of a single-number file (a u64 and its newline).
pub const NUMBER_READ_SIZE: usize = 32;

pub struct CgroupReader {
    ring: Option<IoUring>,
    /// The last read's buffers, one slot per file back to back (a few pages
    /// for hundreds of number files, not a page each); the kernel writes them.
    arena: Vec<u8>,
}

impl CgroupReader {
    /// A reader on io_uring if the kernel lets us, else on pread.
    pub fn new() -> Self {
        let ring = IoUring::new(RING_ENTRIES)
            .inspect_err(|error| {
                tracing::info!(%error, "io_uring is unavailable; cgroup files are read with pread")
            })
            .ok();
        Self {
            ring,
            arena: Vec::new(),
        }
    }

    /// A reader that never uses io_uring (the fallback, and its benchmark peer).
    pub fn plain() -> Self {
        Self {
            ring: None,
            arena: Vec::new(),
        }
    }

    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Reads each file from offset 0, up to `size` bytes of each; the bytes
    /// or the error, per file, valid until the next read.
    pub fn read_all(&mut self, files: &[&File], size: usize) -> Vec<io::Result<&[u8]>> {
        let size = size.max(1);
        // Reads overwrite their slots and only the bytes read are handed
        // out, so a grown arena is reused as it is, not zeroed each round.
        let need = files.len() * size;
        if self.arena.len() < need {
            self.arena.resize(need, 0);
        }
        let mut lengths: Vec<io::Result<usize>> = Vec::with_capacity(files.len());
        for start in (0..files.len()).step_by(RING_ENTRIES as usize) {
            let end = (start + RING_ENTRIES as usize).min(files.len());
            let slots = &mut self.arena[start * size..end * size];
            if let Some(ring) = self.ring.as_mut() {
                match read_batch(ring, &files[start..end], slots, size) {
                    Ok(batch) => {
                        lengths.extend(batch);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "io_uring read failed; using pread from now on");
                        // Reads may still be in flight into the arena: never
                        // free it, nor the ring they were queued on.
                        std::mem::forget(self.ring.take());
                        std::mem::forget(std::mem::take(&mut self.arena));
                        return self.read_all(files, size);
                    }
                }
            }
            for (file, slot) in files[start..end].iter().zip(slots.chunks_mut(size)) {
                lengths.push(file.read_at(slot, 0));
            }
        }
        lengths
            .into_iter()
            .zip(self.arena.chunks(size))
            .map(|(length, slot)| length.map(|n| &slot[..n.min(slot.len())]))
            .collect()
    }
}

impl Default for CgroupReader {
    fn default() -> Self {
        Self::new()
    }
}

/// Queues one read per file and waits for every completion.
fn read_batch(
    ring: &mut IoUring,
    files: &[&File],
    slots: &mut [u8],
    size: usize,
) -> io::Result<Vec<io::Result<usize>>> {
    {
        let mut queue = ring.submission();
        for (index, (file, slot)) in files.iter().zip(slots.chunks_mut(size)).enumerate() {
            let read = opcode::Read::new(
                types::Fd(file.as_raw_fd()),
                slot.as_mut_ptr(),
                u32::try_from(slot.len()).unwrap_or(u32::MAX),
            )
            .offset(0)
            .build()
            .user_data(index as u64);
            // SAFETY: the arena and files outlive the reads: we wait for
            // every completion below, and on an error the caller leaks the
            // arena and the ring rather than free them. A batch never
            // exceeds the ring, so push does not fail.
            #[allow(unsafe_code)]
            unsafe { queue.push(&read) }.map_err(|_| io::Error::other("io_uring queue full"))?;
        }
    }
    let mut lengths: Vec<io::Result<usize>> = files
        .iter()
        .map(|_| Err(io::Error::other("no completion")))
        .collect();
    let mut done = 0;
    while done < files.len() {
        match ring.submit_and_wait(files.len() - done) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
        for completion in ring.completion() {
            let result = completion.result();
            if let Some(slot) = lengths.get_mut(completion.user_data() as usize) {
                *slot = usize::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result));
                done += 1;
            }
        }
    }
    Ok(lengths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_uring_and_pread_read_the_same_bytes_again_from_offset_zero() {
        let dir = std::env::temp_dir().join(format!("butte-reader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // More files than one ring holds: several batches.
        let paths: Vec<_> = (0..300).map(|i| dir.join(format!("f{i}"))).collect();
        for (i, path) in paths.iter().enumerate() {
            std::fs::write(path, format!("value {i}\n")).unwrap();
        }
        let files: Vec<File> = paths.iter().map(|p| File::open(p).unwrap()).collect();
        let refs: Vec<&File> = files.iter().collect();
        let mut uring = CgroupReader::new();
        assert!(
            uring.uses_io_uring(),
            "io_uring works on this kernel (KERNEL.md)"
        );
        for reader in [&mut uring, &mut CgroupReader::plain()] {
            for _round in 0..2 {
                for (i, result) in reader.read_all(&refs, 32).into_iter().enumerate() {
                    assert_eq!(result.unwrap(), format!("value {i}\n").as_bytes());
                }
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
