//! The one error type of the crate: every variant says what failed and what to do.

use std::io;
use std::path::PathBuf;

/// Why a GPU backend could not be opened or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The `--gpu-backend` value is not one of the accepted forms.
    #[error(
        "unknown GPU backend `{spec}`: use `nvml`, `sim:FILE` (a JSON file, see gpu/README.md) or `none`"
    )]
    BadSpec { spec: String },

    /// The sim file could not be read.
    #[error("failed to read GPU sim file {}: {source}; check the path given to --gpu-backend sim:FILE", path.display())]
    SimRead { path: PathBuf, source: io::Error },

    /// The sim file was read but one of its fields is wrong.
    #[error("GPU sim file {}: {field}: {problem}", path.display())]
    SimInvalid {
        path: PathBuf,
        field: String,
        problem: String,
    },

    /// A device node could not be examined.
    #[error("failed to stat device node {}: {source}; create it (mknod PATH c MAJOR MINOR) or fix the path", path.display())]
    DeviceNode { path: PathBuf, source: io::Error },

    /// A path that should be a device node is something else.
    #[error("{} is not a character device; point it at a device node such as /dev/nvidia0", path.display())]
    NotCharDevice { path: PathBuf },

    /// A kernel interface file (under /proc or /sys) could not be read.
    #[error("failed to read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },

    /// An NVML call failed.
    #[error("NVML call {call} failed: {source}")]
    Nvml {
        call: &'static str,
        source: nvml_wrapper::error::NvmlError,
    },
}
