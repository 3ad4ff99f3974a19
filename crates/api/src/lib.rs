//! vmon's management API: a small REST interface to one running VM, HTTP/1.1 over a Unix
//! socket, so that `curl --unix-socket PATH http://localhost/v1/vm` works without any
//! vmon-specific tooling.
//!
//! The layers, from the wire up:
//!
//! - [`http`]: an incremental, bounded request parser (on top of `httparse`) and response
//!   serialisation. No I/O, so the fuzzer and the unit tests drive it directly.
//! - [`server`]: one thread of its own, non-blocking sockets and `poll(2)`. Every buffer,
//!   connection count and wait is bounded, so a slow or hostile client costs at most one
//!   connection slot for a few seconds and never blocks the VMM or other clients.
//! - [`router`]: maps requests to the [`router::VmApi`] trait the VMM implements.
//! - [`model`]: the JSON wire types and the Prometheus text rendering of the counters.
//! - [`client`]: a tiny blocking client for `vmon ctl`.
//!
//! Why not a general HTTP framework: the API must add well under 1 MiB to the VMM's memory,
//! must not bring an async runtime into a process whose threads are carefully accounted for,
//! and has eight routes.

pub mod client;
pub mod fuzzing;
pub mod http;
pub mod model;
pub mod router;
pub mod server;
mod sys;

pub use client::{ClientError, ClientResponse};
pub use http::{Request, Response};
pub use model::{
    Counters, DeviceCounters, ShutdownRequest, SnapshotRequest, VcpuCounters, VmInfo, VmState,
};
pub use router::{ApiError, Router, VmApi};
pub use server::{
    later, ApiServer, Handler, Later, Limits, Reply, ServerError, ServerHandle, ServerStats,
};
