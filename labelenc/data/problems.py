"""Data problems: the :class:`Problem` record every reader and check reports, and the errors that list them.

This module imports no other module of :mod:`labelenc.data`, so that the readers (:mod:`~labelenc.data.formats`),
the checks (:mod:`~labelenc.data.validate`) and the dataset (:mod:`~labelenc.data.coco`) can all use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from labelenc.errors import UserError

__all__ = ["DataError", "DataValidationError", "Problem", "plural", "raise_or_log", "summarize"]

logger = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A dataset file, annotation or data argument that cannot be used; the message names it."""


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: where it is (file, image id, annotation id, line) and what it is."""

    severity: Literal["error", "warning"]
    file: str
    image_id: int | None
    annotation_id: int | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        ids = [f"image {self.image_id}" if self.image_id is not None else "",
               f"annotation {self.annotation_id}" if self.annotation_id is not None else ""]
        ids_text = ", ".join(i for i in ids if i)
        return f"{self.severity}: {where}: " + (f"{ids_text}: " if ids_text else "") + self.message


def _count(problems: list[Problem]) -> tuple[int, int]:
    errors = sum(p.severity == "error" for p in problems)
    return errors, len(problems) - errors


def plural(n: int, word: str) -> str:
    """``1 error``, ``2 errors``: counts in messages."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def summarize(problems: dict[str, list[Problem]]) -> str:
    """``N errors, M warnings (train: ...; val: ...)``."""
    errors, warnings = _count([p for found in problems.values() for p in found])
    parts = []
    for name, found in problems.items():
        e, w = _count(found)
        parts.append(f"{name}: " + (", ".join(x for x in (e and plural(e, "error"), w and plural(w, "warning")) if x)
                                    or "no problems"))
    return f"{plural(errors, 'error')}, {plural(warnings, 'warning')} ({'; '.join(parts)})"


class DataValidationError(DataError):
    """The data has errors (or warnings, when strict): the message lists every problem, one per line."""

    def __init__(self, problems: dict[str, list[Problem]], strict: bool = False) -> None:
        self.problems = problems
        self.strict = strict
        lines = [f"data check failed: {summarize(problems)}"
                 + (" - strict: warnings are fatal" if strict else "")]
        lines += [f"  {p}" for found in problems.values() for p in found]
        super().__init__("\n".join(lines))


def raise_or_log(problems: dict[str, list[Problem]], strict: bool = False, log: bool = True) -> None:
    """Raise :class:`DataValidationError` on errors (or warnings, if ``strict``), else log the warnings and a sum."""
    errors, warnings = _count([p for found in problems.values() for p in found])
    if errors or (strict and warnings):
        raise DataValidationError(problems, strict)
    if log and warnings:
        for found in problems.values():
            for problem in found:
                logger.warning("%s", problem)
        logger.warning("data check: %s", summarize(problems))
