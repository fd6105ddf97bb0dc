"""One hierarchy of errors, each message written for the operator."""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error kiln raises on purpose; the CLI prints it without a traceback."""

    exit_code = 1


class SpecError(KilnError):
    """An image spec (file, flags or form) is invalid; the message names the file and field."""

    exit_code = 2


class ElementError(KilnError):
    """An element is missing, malformed or conflicts with another one."""

    exit_code = 2


class CommandError(KilnError):
    """A subprocess failed or timed out; carries the tail of its output."""

    def __init__(self, message: str, *, returncode: int | None, tail: list[str]) -> None:
        self.returncode = returncode
        self.tail = tail
        text = message
        if tail:
            text += "\n  last output:\n" + "\n".join(f"    {line}" for line in tail)
        super().__init__(text)


class HookError(KilnError):
    """An element hook exited non-zero: names the element, the phase, the hook and its output."""

    def __init__(self, *, element: str, phase: str, hook: str, returncode: int | None, tail: list[str]) -> None:
        self.element = element
        self.phase = phase
        self.hook = hook
        self.returncode = returncode
        self.tail = tail
        how = "timed out" if returncode is None else f"exited with {returncode}"
        text = f"element {element!r}: hook {phase}/{hook} {how}"
        if tail:
            text += "\n  last output:\n" + "\n".join(f"    {line}" for line in tail)
        super().__init__(text)


class MountError(KilnError):
    """Mounting or unmounting failed."""


class CacheError(KilnError):
    """The layer/artifact store is inconsistent or unusable."""


class DiskError(KilnError):
    """The disk could not be laid out or filled (e.g. the root tree does not fit)."""

    exit_code = 2


class BootTestError(KilnError):
    """The image did not boot to cloud-init's end; carries the serial console's tail."""


class ServerError(KilnError):
    """The local Prefect server could not be started or reached."""
