//! vmon's management API (work in progress).
