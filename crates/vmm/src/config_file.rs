//! VM configuration files: one serde schema, [`VmSpec`], for everything `vmon run` can be
//! told, read from JSON or TOML and overlaid with the command line's flags.
//!
//! The flags parse into the same types ([`crate::config::parse_disk_spec`] and friends), so
//! a rule about a disk, a tap or a rate exists once, whichever way the user wrote it:
//! text -> spec -> [`VmSpec::validate`] -> [`VmSpec::to_vm_config`].
//!
//! Relative paths in a file (kernel, initrd, disk paths, the vsock socket, api_socket,
//! log_file, metrics_file) are resolved against the file's directory, so a configuration
//! can sit next to its images and be used from anywhere; paths given as flags stay relative
//! to the working directory. See docs/config.md.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmon_memory::layout::MIN_MEMORY;
use vmon_memory::{Backing, MemSize};
use vmon_virtio::net::MacAddr;
use vmon_virtio::rate_limiter::{parse_rate, Limit, Limits};
use vmon_virtio::tap;
use vmon_virtio::vsock::{VsockError, MAX_CID, MAX_SOCKET_PATH};

use crate::config::{Aio, DiskOptions, NetOptions, VmConfig, VsockOptions};
use crate::exit::exit_codes;

/// The most vCPUs a spec may ask for; the machine then checks the host's own limit.
pub const MAX_CPUS: u32 = 255;
/// What a spec that does not say gets.
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY: MemSize = MemSize::from_mib(512);
pub const DEFAULT_METRICS_INTERVAL_S: u64 = 10;
/// A day. Far beyond any useful interval, and small enough that timer arithmetic on it
/// cannot overflow.
pub const MAX_METRICS_INTERVAL_S: u64 = 86_400;
/// The values `log_level` accepts (in any case).
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// The kernel's limit on a virtio-blk serial.
pub const MAX_SERIAL_LEN: usize = 20;
/// The disk's spin before sleeping when the configuration names none, in microseconds:
/// QEMU's for its iothreads. At queue depth 1 on our 2-CPU machine it lifts a tiny guest
/// from 25k to 40k IOPS. The spin yields the CPU between looks, so where CPUs are shared it
/// does not hold up the threads waiting for them: in the lab, whose 2 CPUs also run the
/// guest's 2 vCPUs, a spin that did not yield cost 13% of random-read IOPS, the yielding
/// one gains 5% (docs/benchmarks.md). 0 never spins.
pub const DEFAULT_DISK_POLL_US: u64 = 32;
/// The longest spin a disk may ask for: a millisecond already holds a CPU through a
/// guest's pauses; longer windows only burn it.
pub const MAX_DISK_POLL_US: u64 = 1000;
/// A configuration is a few hundred bytes; anything this large is the wrong file, and
/// reading it whole (say, /dev/zero) must not exhaust memory.
const MAX_FILE_LEN: u64 = 1 << 20;

/// A whole VM as a file (or the command line) describes it. Every field may be absent: a
/// file says only what it cares about, and the flags are a `VmSpec` too, laid over the
/// file's with [`VmSpec::overlay`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// bzImage or ELF vmlinux; absent: the default guest kit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// `"512M"`, `"2G"`, or a number of MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemSize>,
    /// Back guest RAM with transparent huge pages (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nets: Option<Vec<NetSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<bool>,
    /// Run this in the default guest (the flags' trailing `-- CMD ARGS...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// One of [`LOG_LEVELS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_interval_s: Option<u64>,
    /// Where the values came from, so errors can name the file. Set by [`VmSpec::load`] and
    /// [`VmSpec::overlay`]; not part of the schema and ignored by `==`.
    #[serde(skip)]
    pub origin: Origin,
}

/// `--cpu` options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuSpec {
    /// Expose VMX/SVM to the guest.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nested: bool,
}

/// One virtio-blk disk (`--disk`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// A raw image file or a block device.
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// Up to [`MAX_SERIAL_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// O_DIRECT: bypass the host page cache.
    #[serde(default, skip_serializing_if = "is_false")]
    pub direct: bool,
    /// Longest the device spins for the guest's next request before sleeping, in
    /// microseconds (adaptive below it; 0 never spins). Default [`DEFAULT_DISK_POLL_US`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_us: Option<u64>,
    /// How requests reach the file: `"io_uring"` (the default: many in flight where the
    /// host allows it) or `"sync"` (one at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aio: Option<String>,
    /// Bytes per second; a number or `"10M"`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub bps_burst: Option<u64>,
    /// Requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub iops_burst: Option<u64>,
}

/// One virtio-net device on a host tap (`--net`); the limits apply to each direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub tap: String,
    /// `02:00:00:00:00:01`; absent: a random locally administered address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub bps_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rate")]
    pub iops_burst: Option<u64>,
}

/// The virtio-vsock device (`--vsock`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// The guest's CID, 3 to 2^32 - 2.
    pub cid: u64,
    /// The Unix socket host programs connect to.
    pub socket: PathBuf,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Where a spec's values came from. Only errors use it: two specs with the same values are
/// equal wherever they were read.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    file: Option<PathBuf>,
    /// Top-level fields the flags replaced after the file was read.
    from_flags: Vec<&'static str>,
}

impl PartialEq for Origin {
    fn eq(&self, _: &Origin) -> bool {
        true
    }
}

impl Eq for Origin {}

impl Origin {
    /// Puts the file's name on an error about a field that came from the file.
    fn attribute(&self, mut e: SpecError) -> SpecError {
        let top = e.field.split(['.', '[']).next().unwrap_or("");
        if e.file.is_none() && !self.from_flags.contains(&top) {
            e.file.clone_from(&self.file);
        }
        e
    }
}

/// What kind of problem a [`SpecError`] is, for the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecErrorKind {
    /// The configuration file itself cannot be read.
    Read,
    /// The file is not JSON/TOML, or does not fit the schema (types, unknown fields).
    Parse,
    /// A value is out of range or inconsistent with another.
    Invalid,
    /// A file or directory the spec names is missing or of the wrong type.
    Missing,
}

/// One line: `<file>: <field path>: <problem>`, without the file for values from flags, and
/// with the line and column when the parser knows them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct SpecError {
    pub kind: SpecErrorKind,
    pub file: Option<PathBuf>,
    /// `disks[1].path`; empty when the problem is the document as a whole.
    pub field: String,
    pub problem: String,
    /// 1-based line and column.
    pub position: Option<(usize, usize)>,
}

impl SpecError {
    fn new(kind: SpecErrorKind, field: impl Into<String>, problem: impl Into<String>) -> Self {
        SpecError {
            kind,
            file: None,
            field: field.into(),
            problem: problem.into(),
            position: None,
        }
    }

    fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::new(SpecErrorKind::Invalid, field, problem)
    }

    fn missing(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::new(SpecErrorKind::Missing, field, problem)
    }

    /// Makes a device's error name its place in the VM: `serial` -> `disks[1].serial`.
    fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() {
            parent.to_string()
        } else {
            format!("{parent}.{}", self.field)
        };
        self
    }

    fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_path_buf());
        self
    }

    /// The exit status vmon should end with: unreadable inputs are EX_NOINPUT, the rest a
    /// usage error.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            SpecErrorKind::Read | SpecErrorKind::Missing => exit_codes::NO_INPUT,
            SpecErrorKind::Parse | SpecErrorKind::Invalid => exit_codes::USAGE,
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Some(file) = &self.file {
            push_escaped(&mut out, &file.display().to_string());
            out.push_str(": ");
        }
        if !self.field.is_empty() {
            push_escaped(&mut out, &self.field);
            out.push_str(": ");
        }
        push_escaped(&mut out, &self.problem);
        if let Some((line, column)) = self.position {
            out.push_str(&format!(" (line {line}, column {column})"));
        }
        out
    }
}

/// Keeps the message on one line whatever names and values the file contained.
fn push_escaped(out: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// The two file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
}

impl Format {
    /// By extension; otherwise a document starting with `{` is JSON (a TOML document never
    /// does) and anything else TOML.
    pub fn detect(path: &Path, text: &str) -> Format {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext.eq_ignore_ascii_case("json") {
            Format::Json
        } else if ext.eq_ignore_ascii_case("toml") {
            Format::Toml
        } else if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Toml
        }
    }
}

impl VmSpec {
    /// Reads a configuration file (see [`Format::detect`]) and resolves its relative paths
    /// against the file's directory. It does not validate: call [`VmSpec::validate`] after
    /// laying the flags over it.
    pub fn load(path: impl AsRef<Path>) -> Result<VmSpec, SpecError> {
        let path = path.as_ref();
        let text = read_text(path)
            .map_err(|problem| SpecError::new(SpecErrorKind::Read, "", problem).in_file(path))?;
        let mut spec =
            VmSpec::from_str_as(&text, Format::detect(path, &text)).map_err(|e| e.in_file(path))?;
        if let Some(dir) = path.parent() {
            spec.resolve_paths(dir);
        }
        spec.origin = Origin {
            file: Some(path.to_path_buf()),
            from_flags: Vec::new(),
        };
        Ok(spec)
    }

    pub fn from_str_as(text: &str, format: Format) -> Result<VmSpec, SpecError> {
        match format {
            Format::Json => VmSpec::from_json_str(text),
            Format::Toml => VmSpec::from_toml_str(text),
        }
    }

    pub fn from_json_str(text: &str) -> Result<VmSpec, SpecError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let spec: VmSpec = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| json_error(field_path(e.path()), e.inner()))?;
        // Trailing garbage after the object.
        de.end().map_err(|e| json_error(String::new(), &e))?;
        Ok(spec)
    }

    pub fn from_toml_str(text: &str) -> Result<VmSpec, SpecError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let inner = e.inner();
            // The parser's messages come as "what\nexpected what", sometimes empty.
            let lines: Vec<&str> = inner.message().lines().map(str::trim).collect();
            let problem = match lines.join("; ") {
                p if p.is_empty() => "not valid TOML".to_string(),
                p => p,
            };
            let mut err = SpecError::new(SpecErrorKind::Parse, field_path(e.path()), problem);
            err.position = inner.span().and_then(|span| line_column(text, span.start));
            err
        })
    }

    /// Every field `flags` sets replaces the file's. Lists (disks, nets, command) are
    /// replaced as a whole, not merged: `--disk` on the command line means "these disks".
    pub fn overlay(mut self, flags: VmSpec) -> VmSpec {
        // Destructured so that a new field cannot be forgotten here.
        let VmSpec {
            kernel,
            initrd,
            cmdline,
            cpus,
            memory,
            huge_pages,
            cpu,
            disks,
            nets,
            vsock,
            rng,
            command,
            api_socket,
            log_level,
            log_file,
            metrics_file,
            metrics_interval_s,
            origin: _,
        } = flags;
        macro_rules! take {
            ($($field:ident),*) => {$(
                if $field.is_some() {
                    self.$field = $field;
                    self.origin.from_flags.push(stringify!($field));
                }
            )*};
        }
        take!(
            kernel,
            initrd,
            cmdline,
            cpus,
            memory,
            huge_pages,
            cpu,
            disks,
            nets,
            vsock,
            rng,
            command,
            api_socket,
            log_level,
            log_file,
            metrics_file,
            metrics_interval_s
        );
        self
    }

    /// Checks every rule a spec must follow, including that the files it names exist, and
    /// reports the first violation in document order.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.check().map_err(|e| self.origin.attribute(e))
    }

    fn check(&self) -> Result<(), SpecError> {
        if let Some(kernel) = &self.kernel {
            check_input_file("kernel", kernel)?;
        }
        if let Some(initrd) = &self.initrd {
            check_input_file("initrd", initrd)?;
        }
        if self.cmdline.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err(SpecError::invalid("cmdline", "contains a NUL byte"));
        }
        match self.cpus {
            Some(0) => return Err(SpecError::invalid("cpus", "must be at least 1")),
            Some(n) if n > MAX_CPUS => {
                return Err(SpecError::invalid(
                    "cpus",
                    format!("{n} is more than {MAX_CPUS}"),
                ))
            }
            _ => {}
        }
        match self.memory {
            Some(m) if m.bytes() == 0 => {
                return Err(SpecError::invalid("memory", "must be above 0"))
            }
            Some(m) if m < MIN_MEMORY => {
                return Err(SpecError::invalid(
                    "memory",
                    format!("{m} is too small: a guest needs at least {MIN_MEMORY}"),
                ))
            }
            _ => {}
        }
        let mut seen = HashMap::new();
        for (i, disk) in self.disks.iter().flatten().enumerate() {
            let at = format!("disks[{i}]");
            disk.check().map_err(|e| e.within(&at))?;
            check_disk_file(&disk.path).map_err(|e| e.within(&at))?;
            // Two devices on one image would corrupt it, whatever the spelling of the path.
            let key = std::fs::canonicalize(&disk.path).unwrap_or_else(|_| disk.path.clone());
            if let Some(first) = seen.insert(key, i) {
                return Err(SpecError::invalid(
                    format!("{at}.path"),
                    format!("the same file as disks[{first}]"),
                ));
            }
        }
        let mut taps = HashMap::new();
        for (i, net) in self.nets.iter().flatten().enumerate() {
            let at = format!("nets[{i}]");
            net.check().map_err(|e| e.within(&at))?;
            if let Some(first) = taps.insert(net.tap.as_str(), i) {
                return Err(SpecError::invalid(
                    format!("{at}.tap"),
                    format!("'{}' is already nets[{first}]'s tap", net.tap),
                ));
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.check().map_err(|e| e.within("vsock"))?;
            check_parent_dir("vsock.socket", &vsock.socket)?;
        }
        if let Some(socket) = &self.api_socket {
            check_output_path("api_socket", socket)?;
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(SpecError::invalid(
                    "api_socket",
                    format!(
                        "{len} bytes is longer than a Unix socket path can be ({MAX_SOCKET_PATH})"
                    ),
                ));
            }
        }
        if let Some(level) = &self.log_level {
            if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
                return Err(SpecError::invalid(
                    "log_level",
                    format!("'{level}' is not one of {}", LOG_LEVELS.join(", ")),
                ));
            }
        }
        if let Some(file) = &self.log_file {
            check_output_path("log_file", file)?;
        }
        if let Some(file) = &self.metrics_file {
            check_output_path("metrics_file", file)?;
        }
        match self.metrics_interval_s {
            Some(0) => {
                return Err(SpecError::invalid(
                    "metrics_interval_s",
                    "must be at least 1",
                ))
            }
            Some(s) if s > MAX_METRICS_INTERVAL_S => {
                return Err(SpecError::invalid(
                    "metrics_interval_s",
                    format!("{s} is more than {MAX_METRICS_INTERVAL_S} (a day)"),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// The machine this spec describes, with the defaults for what it leaves out. The kernel
    /// must be set by now (the CLI fills in the default guest kit's). The kernel command line
    /// is `cmdline` as written: composing it with `command` is the CLI's business, which
    /// overwrites `VmConfig::cmdline` afterwards. `VmConfig::spec` gets this spec as JSON.
    /// Checks the device rules again but not the file system: call
    /// [`VmSpec::validate`] first for that.
    pub fn to_vm_config(&self) -> Result<VmConfig, SpecError> {
        self.build().map_err(|e| self.origin.attribute(e))
    }

    fn build(&self) -> Result<VmConfig, SpecError> {
        let kernel = self
            .kernel
            .clone()
            .ok_or_else(|| SpecError::invalid("kernel", "not given"))?;
        let disks = self
            .disks
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, d)| d.to_options().map_err(|e| e.within(&format!("disks[{i}]"))))
            .collect::<Result<_, _>>()?;
        let nets = self
            .nets
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, n)| n.to_options().map_err(|e| e.within(&format!("nets[{i}]"))))
            .collect::<Result<_, _>>()?;
        let vsock = match &self.vsock {
            Some(v) => Some(v.to_options().map_err(|e| e.within("vsock"))?),
            None => None,
        };
        Ok(VmConfig {
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone().unwrap_or_default(),
            cpus: self.cpus.unwrap_or(DEFAULT_CPUS),
            memory: self.memory.unwrap_or(DEFAULT_MEMORY),
            memory_backing: if self.huge_pages.unwrap_or(true) {
                Backing::TransparentHuge
            } else {
                Backing::SmallPages
            },
            nested: self.cpu.is_some_and(|c| c.nested),
            disks,
            rng: self.rng.unwrap_or(false),
            nets,
            vsock,
            api_socket: self.api_socket.clone(),
            metrics_file: self.metrics_file.clone(),
            metrics_interval: Duration::from_secs(
                self.metrics_interval_s
                    .unwrap_or(DEFAULT_METRICS_INTERVAL_S),
            ),
            spec: serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
            ..VmConfig::new(kernel)
        })
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        };
        let disks = self.disks.iter_mut().flatten().map(|d| &mut d.path);
        let vsock = self.vsock.iter_mut().map(|v| &mut v.socket);
        [
            &mut self.kernel,
            &mut self.initrd,
            &mut self.api_socket,
            &mut self.log_file,
            &mut self.metrics_file,
        ]
        .into_iter()
        .flatten()
        .chain(disks)
        .chain(vsock)
        .for_each(resolve);
    }
}

/// The rate fields disks and nets share, for the flag parser and the limits.
macro_rules! rate_fields {
    ($spec:ty) => {
        impl $spec {
            /// The token buckets these fields describe.
            pub fn limits(&self) -> Result<Limits, SpecError> {
                limits(self.bps, self.bps_burst, self.iops, self.iops_burst)
            }

            /// The slot for a rate key (`bps`, `bps_burst`, `iops`, `iops_burst`).
            pub fn rate_mut(&mut self, key: &str) -> Option<&mut Option<u64>> {
                match key {
                    "bps" => Some(&mut self.bps),
                    "bps_burst" => Some(&mut self.bps_burst),
                    "iops" => Some(&mut self.iops),
                    "iops_burst" => Some(&mut self.iops_burst),
                    _ => None,
                }
            }
        }
    };
}
rate_fields!(DiskSpec);
rate_fields!(NetSpec);

fn limits(
    bps: Option<u64>,
    bps_burst: Option<u64>,
    iops: Option<u64>,
    iops_burst: Option<u64>,
) -> Result<Limits, SpecError> {
    let bucket = |name: &str, rate: Option<u64>, burst: Option<u64>| {
        let burst_name = format!("{name}_burst");
        for (field, value) in [(name, rate), (burst_name.as_str(), burst)] {
            if value == Some(0) {
                return Err(SpecError::invalid(field, "a rate must be above 0"));
            }
        }
        match (rate, burst) {
            (Some(rate), burst) => Ok(Some(Limit {
                rate,
                burst: burst.unwrap_or(rate),
            })),
            (None, Some(_)) => Err(SpecError::invalid(burst_name, format!("needs {name}"))),
            (None, None) => Ok(None),
        }
    };
    Ok(Limits {
        bytes: bucket("bps", bps, bps_burst)?,
        ops: bucket("iops", iops, iops_burst)?,
    })
}

impl DiskSpec {
    /// The rules that do not look at the file system.
    pub fn check(&self) -> Result<(), SpecError> {
        self.to_options().map(drop)
    }

    pub fn to_options(&self) -> Result<DiskOptions, SpecError> {
        if self.path.as_os_str().is_empty() {
            return Err(SpecError::invalid("path", "empty"));
        }
        if let Some(serial) = &self.serial {
            if serial.len() > MAX_SERIAL_LEN {
                return Err(SpecError::invalid(
                    "serial",
                    format!(
                        "'{serial}' is {} bytes; a serial is at most {MAX_SERIAL_LEN}",
                        serial.len()
                    ),
                ));
            }
        }
        let poll_us = self.poll_us.unwrap_or(DEFAULT_DISK_POLL_US);
        if poll_us > MAX_DISK_POLL_US {
            return Err(SpecError::invalid(
                "poll_us",
                format!("{poll_us} is more than {MAX_DISK_POLL_US}"),
            ));
        }
        let aio = match self.aio.as_deref() {
            None | Some("io_uring") => Aio::IoUring,
            Some("sync") => Aio::Sync,
            Some(other) => {
                return Err(SpecError::invalid(
                    "aio",
                    format!("'{other}' is neither io_uring nor sync"),
                ))
            }
        };
        Ok(DiskOptions {
            path: self.path.clone(),
            readonly: self.readonly,
            serial: self.serial.clone(),
            direct: self.direct,
            limits: self.limits()?,
            poll: std::time::Duration::from_micros(poll_us),
            aio,
        })
    }
}

impl NetSpec {
    pub fn check(&self) -> Result<(), SpecError> {
        self.to_options().map(drop)
    }

    /// Without a MAC the options say None and the device picks a random one.
    pub fn to_options(&self) -> Result<NetOptions, SpecError> {
        if self.tap.len() > tap::MAX_NAME_LEN {
            return Err(SpecError::invalid(
                "tap",
                format!(
                    "'{}' is {} bytes; an interface name is at most {}",
                    self.tap,
                    self.tap.len(),
                    tap::MAX_NAME_LEN
                ),
            ));
        }
        tap::check_name(&self.tap).map_err(|e| SpecError::invalid("tap", e.to_string()))?;
        let mac = match &self.mac {
            Some(text) => Some(text.parse::<MacAddr>().map_err(|e| {
                // MacAddr speaks in flag syntax ("mac=X: ..."); the field name says that here.
                let why = e.strip_prefix(&format!("mac={text}: ")).unwrap_or(&e);
                SpecError::invalid("mac", format!("'{text}': {why}"))
            })?),
            None => None,
        };
        Ok(NetOptions {
            tap: self.tap.clone(),
            mac,
            limits: self.limits()?,
        })
    }
}

impl VsockSpec {
    pub fn check(&self) -> Result<(), SpecError> {
        self.to_options().map(drop)
    }

    pub fn to_options(&self) -> Result<VsockOptions, SpecError> {
        let opts = VsockOptions {
            cid: self.cid,
            socket: self.socket.clone(),
        };
        // The device's own rules, with messages that name the field instead of a flag.
        opts.validate().map_err(|e| match e {
            VsockError::BadCid(cid) => SpecError::invalid(
                "cid",
                format!("{cid} is reserved: a guest CID is between 3 and {MAX_CID}"),
            ),
            VsockError::EmptyPath => SpecError::invalid("socket", "empty"),
            VsockError::PathTooLong { len, .. } => SpecError::invalid(
                "socket",
                format!(
                    "{len} bytes (or a NUL byte) is longer than a Unix socket path can be \
                     ({MAX_SOCKET_PATH})"
                ),
            ),
            other => SpecError::invalid("socket", other.to_string()),
        })?;
        Ok(opts)
    }
}

fn io_problem(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// A kernel or initrd: a readable regular file.
fn check_input_file(field: &str, path: &Path) -> Result<(), SpecError> {
    if path.as_os_str().is_empty() {
        return Err(SpecError::invalid(field, "empty"));
    }
    let meta = std::fs::metadata(path).map_err(|e| SpecError::missing(field, io_problem(&e)))?;
    if meta.is_dir() {
        return Err(SpecError::missing(field, "is a directory, not a file"));
    }
    if !meta.is_file() {
        return Err(SpecError::missing(field, "not a regular file"));
    }
    Ok(())
}

/// A disk image: a regular file or a block device.
fn check_disk_file(path: &Path) -> Result<(), SpecError> {
    let meta = std::fs::metadata(path).map_err(|e| SpecError::missing("path", io_problem(&e)))?;
    if meta.is_dir() {
        return Err(SpecError::missing(
            "path",
            "is a directory, not a disk image",
        ));
    }
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(SpecError::missing(
            "path",
            "not a regular file or block device",
        ));
    }
    Ok(())
}

/// A file vmon creates or appends to: its directory must exist and the path must not be one.
fn check_output_path(field: &str, path: &Path) -> Result<(), SpecError> {
    if path.as_os_str().is_empty() {
        return Err(SpecError::invalid(field, "empty"));
    }
    if path.is_dir() {
        return Err(SpecError::missing(field, "is a directory"));
    }
    check_parent_dir(field, path)
}

fn check_parent_dir(field: &str, path: &Path) -> Result<(), SpecError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if !parent.is_dir() {
        return Err(SpecError::missing(
            field,
            format!("directory {} does not exist", parent.display()),
        ));
    }
    Ok(())
}

fn read_text(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| io_problem(&e))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err("is a directory, not a configuration file".into());
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_problem(&e))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(format!(
            "larger than {}; not a VM configuration",
            MemSize::from_bytes(MAX_FILE_LEN)
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("not UTF-8 text ({e})"))
}

/// `disks[1].path`. The path ends where the deserializer lost track (a syntax error
/// between keys), so the message names the last field it knew.
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => break,
        }
    }
    out
}

fn json_error(field: String, e: &serde_json::Error) -> SpecError {
    let mut message = e.to_string();
    let mut err = SpecError::new(SpecErrorKind::Parse, field, "");
    if e.line() > 0 {
        // serde_json appends the position in prose; it goes to `position` instead.
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
        err.position = Some((e.line(), e.column()));
    }
    err.problem = message;
    err
}

fn line_column(text: &str, offset: usize) -> Option<(usize, usize)> {
    let before = text.get(..offset.min(text.len()))?;
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, column))
}

/// Rates are a number or a string with a K/M/G suffix; written back as numbers.
mod rate {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(value: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_u64(*v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_option(OptionalRate)
    }

    struct OptionalRate;

    impl<'de> Visitor<'de> for OptionalRate {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            RateVisitor.expecting(f)
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            d.deserialize_any(RateVisitor).map(Some)
        }
    }

    struct RateVisitor;

    impl Visitor<'_> for RateVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a rate: a whole number above 0, or a string like \"64K\" or \"10M\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            if v == 0 {
                return Err(E::custom("a rate must be above 0"));
            }
            Ok(v)
        }

        // TOML integers are signed.
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
            }
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_rate(v).map_err(E::custom)
        }
    }
}

/// Entry points for fuzzing (the `config_file` target in `fuzz/`) and, with pseudo-random
/// inputs, for the unit test below, so the target keeps compiling and passing on stable.
pub mod fuzzing {
    use super::*;

    /// Arbitrary bytes as a JSON and as a TOML document and as each flag's syntax: nothing
    /// may panic, every error is one line, and whatever parses survives a JSON round trip.
    pub fn config_file(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        for parsed in [VmSpec::from_json_str(text), VmSpec::from_toml_str(text)] {
            let spec = match parsed {
                Ok(spec) => spec,
                Err(e) => {
                    assert_one_line(&e);
                    continue;
                }
            };
            if let Err(e) = spec.validate() {
                assert_one_line(&e);
            }
            let mut with_kernel = spec.clone();
            with_kernel
                .kernel
                .get_or_insert_with(|| "/vmon-fuzz/vmlinux".into());
            if let Err(e) = with_kernel.to_vm_config() {
                assert_one_line(&e);
            }
            let json = serde_json::to_string(&spec).expect("a parsed spec serializes");
            let again = VmSpec::from_json_str(&json).expect("a serialized spec parses");
            assert_eq!(again, spec, "round trip through {json}");
            assert_eq!(VmSpec::default().overlay(spec.clone()), spec);
        }
        let flag_errors = [
            crate::config::parse_disk(text).err(),
            crate::config::parse_net(text).err(),
            crate::config::parse_vsock(text).err(),
            crate::config::parse_cpu_spec(text).err(),
        ];
        for e in flag_errors.into_iter().flatten() {
            // clap prints these after its own prefix; they must not need a second line.
            assert!(!e.contains('\n') || text.contains('\n'), "{e}");
        }
    }

    fn assert_one_line(e: &SpecError) {
        let line = e.to_string();
        assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fast, seedable generator: the inputs must be the same on every run.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const SEEDS: [&str; 4] = [
        r#"{"kernel": "vmlinux", "cpus": 2, "memory": "1G", "cpu": {"nested": true},
            "disks": [{"path": "/dev/null", "readonly": true, "bps": "10M", "iops_burst": 5}],
            "nets": [{"tap": "tap0", "mac": "02:00:00:00:00:01", "iops": 100}],
            "vsock": {"cid": 3, "socket": "v.sock"}, "rng": true, "command": ["uname", "-a"],
            "log_level": "info", "metrics_interval_s": 5}"#,
        "kernel = \"k\"\nmemory = 512\n[[disks]]\npath = \"a.img\"\nbps = 1048576\n\
         [[nets]]\ntap = \"t\"\n[vsock]\ncid = 4\nsocket = \"/tmp/s\"\n",
        "path=/tmp/a.img,readonly=on,serial=x,bps=1M,bps_burst=2M",
        "tap=tap0,mac=02:00:00:00:00:01,iops=5",
    ];

    const TOKENS: [&str; 16] = [
        "{",
        "}",
        "[",
        "]",
        "\"",
        ",",
        "=",
        "\n",
        ":",
        "null",
        "-1",
        "1e999",
        "\"10M\"",
        "[[disks]]",
        "\"path\"",
        "0",
    ];

    /// A smoke run of the fuzz target: random bytes and mutations of valid documents.
    #[test]
    fn fuzz_entry_point_survives_random_inputs() {
        let mut rng = XorShift(0x5eed_c0ff_ee00_1234);
        for round in 0..2000 {
            let mut input: Vec<u8> = if round % 5 == 0 {
                (0..rng.below(200)).map(|_| rng.next() as u8).collect()
            } else {
                SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec()
            };
            for _ in 0..rng.below(4) {
                let at = rng.below(input.len() + 1);
                match rng.below(4) {
                    0 => input.truncate(at),
                    1 => {
                        let token = TOKENS[rng.below(TOKENS.len())];
                        input.splice(at..at, token.bytes());
                    }
                    2 if at < input.len() => input[at] = rng.next() as u8,
                    _ => {
                        let end = (at + rng.below(20)).min(input.len());
                        input.drain(at..end);
                    }
                }
            }
            fuzzing::config_file(&input);
        }
        for seed in SEEDS {
            fuzzing::config_file(seed.as_bytes());
        }
    }

    #[test]
    fn positions_come_from_byte_offsets() {
        assert_eq!(line_column("ab\ncd", 4), Some((2, 2)));
        assert_eq!(line_column("ab", 0), Some((1, 1)));
        assert_eq!(line_column("ab", 99), Some((1, 3)));
        assert_eq!(line_column("é", 1), None);
    }
}
