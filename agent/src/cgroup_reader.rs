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
/// Bytes read per file: memory.stat is ~1.5 KiB on v1 and v2.
pub const READ_SIZE: usize = 8192;

pub struct CgroupReader {
    ring: Option<IoUring>,
    /// One buffer per file of the last read; the kernel writes them.
    buffers: Vec<Box<[u8]>>,
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
            buffers: Vec::new(),
        }
    }

    /// A reader that never uses io_uring (the fallback, and its benchmark peer).
    pub fn plain() -> Self {
        Self {
            ring: None,
            buffers: Vec::new(),
        }
    }

    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Reads each file from offset 0 (up to READ_SIZE bytes); the bytes or
    /// the error, per file, valid until the next read.
    pub fn read_all(&mut self, files: &[&File]) -> Vec<io::Result<&[u8]>> {
        while self.buffers.len() < files.len() {
            self.buffers.push(vec![0u8; READ_SIZE].into_boxed_slice());
        }
        let mut lengths: Vec<io::Result<usize>> = Vec::with_capacity(files.len());
        for start in (0..files.len()).step_by(RING_ENTRIES as usize) {
            let end = (start + RING_ENTRIES as usize).min(files.len());
            if let Some(ring) = self.ring.as_mut() {
                match read_batch(ring, &files[start..end], &mut self.buffers[start..end]) {
                    Ok(batch) => {
                        lengths.extend(batch);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "io_uring read failed; using pread from now on");
                        // Reads may still be in flight into these buffers:
                        // never free them, nor the ring they were queued on.
                        std::mem::forget(self.ring.take());
                        std::mem::forget(std::mem::take(&mut self.buffers));
                        return self.read_all(files);
                    }
                }
            }
            for (file, buffer) in files[start..end]
                .iter()
                .zip(self.buffers[start..end].iter_mut())
            {
                lengths.push(file.read_at(buffer, 0));
            }
        }
        lengths
            .into_iter()
            .zip(&self.buffers)
            .map(|(length, buffer)| length.map(|n| &buffer[..n.min(buffer.len())]))
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
    buffers: &mut [Box<[u8]>],
) -> io::Result<Vec<io::Result<usize>>> {
    {
        let mut queue = ring.submission();
        for (index, (file, buffer)) in files.iter().zip(buffers.iter_mut()).enumerate() {
            let read = opcode::Read::new(
                types::Fd(file.as_raw_fd()),
                buffer.as_mut_ptr(),
                u32::try_from(buffer.len()).unwrap_or(u32::MAX),
            )
            .offset(0)
            .build()
            .user_data(index as u64);
            // SAFETY: the buffers and files outlive the reads: we wait for
            // every completion below, and on an error the caller leaks the
            // buffers and the ring rather than free them. A batch never
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
                for (i, result) in reader.read_all(&refs).into_iter().enumerate() {
                    assert_eq!(result.unwrap(), format!("value {i}\n").as_bytes());
                }
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
