"""Errors that tell the user which file, row and field is wrong and what was expected."""

from __future__ import annotations


class RecfbError(Exception):
    """Base class for errors a user can act on (the CLI prints them without a traceback)."""


class ConfigError(RecfbError):
    """A configuration file or override is invalid."""


class InputError(RecfbError):
    """An input file cannot be used as it is."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"row {row}" if row is not None else "",
                f"field '{field}'" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.row, self.field = file, row, field
