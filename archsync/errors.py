"""Errors that reach an operator: one line, naming the setting or object at fault."""

from __future__ import annotations


class ArchsyncError(Exception):
    """Base of every error archsync reports to a user as one clear line."""


class ConfigError(ArchsyncError):
    """A setting is missing, malformed or points at something that does not answer."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class SchemaError(ArchsyncError):
    """A table or record does not fit what archsync can capture or encode."""
