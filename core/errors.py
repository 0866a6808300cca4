"""User-facing errors. Each one is a single line that names what was wrong and what was expected;
the command line prints it without a traceback."""

from __future__ import annotations


class LftError(Exception):
    """Base class of every error that lft reports to the user as one line."""


class ConfigError(LftError):
    """The configuration is invalid. ``problems`` holds every problem found, one line each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the config: " + "; ".join(self.problems)
        super().__init__(message)


class PluginError(LftError):
    """A plugin could not be found, loaded or selected."""


class DataError(LftError):
    """A data file or one of its rows cannot be used."""


class ModelError(LftError):
    """A model, tokenizer or adapter cannot be loaded or does not fit the run."""
