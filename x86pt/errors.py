"""One exception hierarchy. Library errors (construct's, OSError, struct's) are wrapped at the
boundary where they happen, so callers and the CLI only ever see these."""


class X86ptError(Exception):
    """Base of every error x86pt raises on purpose. The CLI prints str(e) on one line, exit 2."""


class BadInputError(X86ptError):
    """A value, probe line, spec file or argument that cannot be used as given."""


class BudgetError(BadInputError):
    """Work on an input would exceed a documented limit (entries visited, bytes held, a size
    cap); the message names the limit and the option that raises it."""


class ImageError(X86ptError):
    """A memory image that is malformed or truncated (bad ELF, bad LiME header, short file)."""


class PhysicalAddressError(X86ptError):
    """A physical read or write outside the memory source (e.g. a table pointer past the end)."""

    def __init__(self, message: str, pa: int | None = None) -> None:
        super().__init__(message)
        self.pa = pa


class StateError(X86ptError):
    """Control-register state that does not describe IA-32e paging."""


class OracleError(X86ptError):
    """An oracle (unicorn, QEMU, KVM) failed or answered something impossible."""


class OracleUnavailable(OracleError):
    """The oracle cannot run on this machine (missing binary, no /dev/kvm, ...)."""
