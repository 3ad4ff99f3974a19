//! Raw mode for an interactive console, restored on every way out.
//!
//! While a guest owns the console, the host terminal must pass every key through (Ctrl-C
//! goes to the guest's shell) and print the guest's bytes unchanged. The saved settings are
//! kept in a global as well as in the guard, so the panic hook and the error paths can put the
//! terminal back even when the guard is not reachable.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin's terminal in raw mode for as long as it lives.
pub struct RawTerminal(());

impl RawTerminal {
    /// Returns `None` when stdin is not a terminal (pipes and files are passed as they are).
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data, fully written by tcgetattr before it is read.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a valid pointer to a termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            return None;
        }
        let mut raw = original;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(original);
        install_panic_restore();
        // SAFETY: valid descriptor and a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the terminal if raw mode is on; harmless otherwise.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(original) = saved {
        // SAFETY: valid descriptor and the termios saved from it.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

fn install_panic_restore() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Only the main thread's panic ends the process with the terminal still raw.
            // Elsewhere a panic is contained (a device fails, a vCPU ends the VM through
            // the usual exit path, which restores it), and the console must stay raw for
            // the guest meanwhile: cooked, Ctrl-C would stop the VM.
            if std::thread::current().name() == Some("main") {
                restore();
            }
            previous(info);
        }));
    });
}
