//! Kernel tests live in `tests/`; they need root and a real kernel (no mocks).
