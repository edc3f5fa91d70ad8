//! Benchmarks: criterion micro benchmarks and the end-to-end throughput harness that measures the
//! overlay and the mesh beside plain networking and peers in the same run. (They land with the
//! data plane and mesh issues.)
#![forbid(unsafe_code)]
