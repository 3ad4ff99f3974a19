//! A thin wrapper around iced-x86's `CodeAssembler` with the few building
//! blocks every tiny guest needs: serial output, hex/decimal printing, the
//! exit port and a halt loop.
//!
//! Register conventions for the shared subroutines (identical in 32- and
//! 64-bit code):
//! - `putc`: character in `al`; clobbers `eax`, `ecx`, `edx`.
//! - `print_hex`: value in `edi`, digit count (1..=8) in `esi`; clobbers
//!   `eax`, `ecx`, `edx`, `esi`.
//! - `print_dec` (64-bit only): value in `edi`; clobbers `eax`, `ecx`, `edx`,
//!   `esi`.
//! - [`Asm::print`] of a long string (64-bit only) also clobbers `r8`, `r9`.
//!
//! Long-lived state in the programs therefore lives in `ebx`/`rbx`, `rbp`
//! and `r12`..`r15`.

use iced_x86::code_asm::*;
use iced_x86::{Code, Mnemonic};

pub(crate) type Result<T = ()> = std::result::Result<T, IcedError>;

/// COM1 transmit holding register.
pub const COM1: u16 = 0x3F8;
/// COM1 line status register (THRE is bit 5, 0x20).
pub const COM1_LSR: u16 = COM1 + 5;
/// Writing a byte N here makes vmon exit with status N.
pub const EXIT_PORT: u16 = 0x510;

/// Strings up to this length are printed with one `mov al, c; call putc`
/// pair per character; longer ones (64-bit only) as a data string and a loop.
const INLINE_PRINT_MAX: usize = 8;

/// Only these instructions may appear in a tiny guest: the PVM host runs
/// guest ring-0 code through KVM's instruction emulator, which only knows
/// plain integer, port-I/O, MMIO and simple system instructions.
const ALLOWED: &[Mnemonic] = &[
    Mnemonic::Add,
    Mnemonic::And,
    Mnemonic::Call,
    Mnemonic::Cli,
    Mnemonic::Cmp,
    Mnemonic::Dec,
    Mnemonic::Div,
    Mnemonic::Hlt,
    Mnemonic::In,
    Mnemonic::Inc,
    Mnemonic::Iretq,
    Mnemonic::Jae,
    Mnemonic::Jb,
    Mnemonic::Je,
    Mnemonic::Jmp,
    Mnemonic::Jne,
    Mnemonic::Lea,
    Mnemonic::Lgdt,
    Mnemonic::Lidt,
    Mnemonic::Mov,
    Mnemonic::Movzx,
    Mnemonic::Or,
    Mnemonic::Out,
    Mnemonic::Pause,
    Mnemonic::Pop,
    Mnemonic::Push,
    Mnemonic::Rdmsr,
    Mnemonic::Ret,
    Mnemonic::Shl,
    Mnemonic::Shr,
    Mnemonic::Test,
    Mnemonic::Ud2,
    Mnemonic::Wrmsr,
    Mnemonic::Xor,
];

pub(crate) struct Asm {
    pub a: CodeAssembler,
    putc: CodeLabel,
    print_hex: CodeLabel,
    print_dec: CodeLabel,
    use_putc: bool,
    use_hex: bool,
    use_dec: bool,
    /// Strings printed by [`Asm::print`] loops, emitted after the code.
    strings: Vec<(CodeLabel, Vec<u8>)>,
    /// The code after this point runs in ring 3, where `hlt` faults.
    pub user_mode: bool,
}

impl Asm {
    pub fn new(bitness: u32) -> Result<Self> {
        let mut a = CodeAssembler::new(bitness)?;
        Ok(Self {
            putc: a.create_label(),
            print_hex: a.create_label(),
            print_dec: a.create_label(),
            a,
            use_putc: false,
            use_hex: false,
            use_dec: false,
            strings: Vec::new(),
            user_mode: false,
        })
    }

    fn bitness(&self) -> u32 {
        self.a.bitness()
    }

    /// `call putc` with the character already in `al`.
    pub fn call_putc(&mut self) -> Result {
        self.use_putc = true;
        self.a.call(self.putc)
    }

    /// Prints a fixed string to COM1.
    pub fn print(&mut self, s: &[u8]) -> Result {
        if s.len() <= INLINE_PRINT_MAX || self.bitness() != 64 {
            for &c in s {
                self.a.mov(al, c as u32)?;
                self.call_putc()?;
            }
            return Ok(());
        }
        // The string itself goes after the code, see `finish_subroutines`.
        let data = self.a.create_label();
        let mut again = self.a.create_label();
        self.a.lea(r8, ptr(data))?;
        self.a.mov(r9d, s.len() as u32)?;
        self.a.set_label(&mut again)?;
        self.a.mov(al, byte_ptr(r8))?;
        self.call_putc()?;
        self.a.inc(r8)?;
        self.a.dec(r9d)?;
        self.a.jne(again)?;
        self.strings.push((data, s.to_vec()));
        Ok(())
    }

    /// Prints `edi` as `digits` lowercase hex digits (leading zeros kept).
    pub fn print_hex_edi(&mut self, digits: u32) -> Result {
        assert!((1..=8).contains(&digits));
        self.use_hex = true;
        self.use_putc = true;
        self.a.mov(esi, digits)?;
        self.a.call(self.print_hex)
    }

    /// Prints `edi` in decimal, without leading zeros (64-bit code only).
    pub fn print_dec_edi(&mut self) -> Result {
        assert_eq!(self.bitness(), 64, "print_dec needs a 64-bit stack");
        self.use_dec = true;
        self.use_putc = true;
        self.a.call(self.print_dec)
    }

    /// Writes `status` to the exit port, then halts forever as a guard.
    pub fn exit(&mut self, status: u8) -> Result {
        self.a.mov(al, status as u32)?;
        self.a.mov(edx, EXIT_PORT as u32)?;
        self.a.out(dx, al)?;
        self.halt_forever()
    }

    /// `1: cli; hlt; jmp 1b`, or `1: jmp 1b` in ring 3 (where `hlt` would fault).
    pub fn halt_forever(&mut self) -> Result {
        let mut l = self.a.create_label();
        self.a.set_label(&mut l)?;
        if !self.user_mode {
            self.a.cli()?;
            self.a.hlt()?;
        }
        self.a.jmp(l)
    }

    /// Busy-waits for `iterations` reads of the COM1 LSR. Each read is a
    /// trip to the VMM, so this takes roughly the same wall-clock time with
    /// or without instruction emulation. Clobbers `eax`, `ecx`, `edx`.
    pub fn io_delay(&mut self, iterations: u32) -> Result {
        let mut l = self.a.create_label();
        self.a.mov(ecx, iterations)?;
        self.a.mov(edx, COM1_LSR as u32)?;
        self.a.set_label(&mut l)?;
        self.a.in_(al, dx)?;
        self.a.dec(ecx)?;
        self.a.jne(l)
    }

    /// Appends the subroutines that were used and assembles everything for
    /// a first instruction at `ip`.
    ///
    /// Panics if an instruction outside the allow-list was emitted (a bug
    /// in this crate, caught by its unit tests).
    pub fn finish(mut self, ip: u64) -> Result<Vec<u8>> {
        self.finish_subroutines()?;
        for i in self.a.instructions() {
            let data = matches!(
                i.code(),
                Code::DeclareByte | Code::DeclareWord | Code::DeclareDword | Code::DeclareQword
            );
            assert!(
                data || ALLOWED.contains(&i.mnemonic()),
                "instruction not allowed in a tiny guest: {:?}",
                i.code()
            );
        }
        self.a.assemble(ip)
    }

    /// Emits the subroutines used so far (at most once each) and the
    /// pending strings, so that more data can follow them. [`Asm::finish`] calls this too.
    pub fn finish_subroutines(&mut self) -> Result {
        if std::mem::take(&mut self.use_dec) {
            self.emit_print_dec()?;
        }
        if std::mem::take(&mut self.use_hex) {
            self.emit_print_hex()?;
        }
        if std::mem::take(&mut self.use_putc) {
            self.emit_putc()?;
        }
        for (mut label, s) in std::mem::take(&mut self.strings) {
            self.a.set_label(&mut label)?;
            self.a.db(&s)?;
        }
        Ok(())
    }

    fn emit_putc(&mut self) -> Result {
        let mut poll = self.a.create_label();
        let mut ready = self.a.create_label();
        let a = &mut self.a;
        a.set_label(&mut self.putc)?;
        a.mov(ah, al)?;
        a.mov(edx, COM1_LSR as u32)?;
        // Bounded poll for THRE: a missing or stuck UART must not hang us.
        a.mov(ecx, 0x1000u32)?;
        a.set_label(&mut poll)?;
        a.in_(al, dx)?;
        a.test(al, 0x20u32)?;
        a.jne(ready)?;
        a.dec(ecx)?;
        a.jne(poll)?;
        a.set_label(&mut ready)?;
        a.mov(al, ah)?;
        a.mov(edx, COM1 as u32)?;
        a.out(dx, al)?;
        a.ret()
    }

    fn emit_print_hex(&mut self) -> Result {
        let mut digit = self.a.create_label();
        let putc = self.putc;
        let a = &mut self.a;
        a.set_label(&mut self.print_hex)?;
        let again = self.print_hex;
        a.mov(ecx, esi)?;
        a.dec(ecx)?;
        a.shl(ecx, 2u32)?;
        a.mov(eax, edi)?;
        a.shr(eax, cl)?;
        a.and(eax, 0xFu32)?;
        a.cmp(eax, 10u32)?;
        a.jb(digit)?;
        a.add(eax, (b'a' - b'0' - 10) as u32)?;
        a.set_label(&mut digit)?;
        a.add(eax, b'0' as u32)?;
        a.call(putc)?;
        a.dec(esi)?;
        a.jne(again)?;
        a.ret()
    }

    fn emit_print_dec(&mut self) -> Result {
        let mut split = self.a.create_label();
        let mut emit = self.a.create_label();
        let putc = self.putc;
        let a = &mut self.a;
        a.set_label(&mut self.print_dec)?;
        a.mov(eax, edi)?;
        a.xor(esi, esi)?;
        a.mov(ecx, 10u32)?;
        // Push the digits least significant first...
        a.set_label(&mut split)?;
        a.xor(edx, edx)?;
        a.div(ecx)?;
        a.push(rdx)?;
        a.inc(esi)?;
        a.test(eax, eax)?;
        a.jne(split)?;
        // ...and pop them most significant first.
        a.set_label(&mut emit)?;
        a.pop(rax)?;
        a.add(eax, b'0' as u32)?;
        a.call(putc)?;
        a.dec(esi)?;
        a.jne(emit)?;
        a.ret()
    }
}
