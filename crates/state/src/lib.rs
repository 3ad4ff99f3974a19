//! The one save/restore contract of vmon.
//!
//! Every vCPU and device keeps its *state* (a plain serialisable value) apart from its
//! *wiring* (file descriptors, eventfds, guest memory, output streams: things that cannot be
//! written to a file and must be supplied again by whoever rebuilds the machine). Snapshot,
//! restore, clone and live migration are all built from this trait, so there is exactly one
//! serialisation path per component.
//!
//! [`file`] stores such state: one value per file, in a container that names its kind and
//! format version and checksums its contents, written atomically ([`write_state`],
//! [`read_state`]). Guest memory does not go through it; it has its own file
//! (`vmon_memory::file`).

#![deny(unsafe_code)]

use serde::{de::DeserializeOwned, Serialize};

/// A component whose state can be captured and later rebuilt around new wiring.
pub trait Persist: Sized {
    /// Everything needed to recreate the component's guest-visible behaviour.
    type State: Serialize + DeserializeOwned;
    /// What the restorer must hand back in: descriptors, memory, output sinks.
    type Wiring;
    /// Why a saved state could not be applied.
    type Error: std::error::Error;

    /// Captures the current state. Callers pause the component first, so the state is
    /// consistent with guest memory and with the other components.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds a component from saved state and fresh wiring.
    fn restore(wiring: Self::Wiring, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Version stamped into every saved state so a reader can refuse what it does not understand.
/// It covers the container and the payloads alike: bump it when any `State` type changes in a
/// way an older reader would misread.
pub const STATE_FORMAT_VERSION: u32 = 1;

pub mod file;
pub mod fuzzing;

pub use file::{read_state, write_state, StateFileError, MAX_STATE_PAYLOAD};
