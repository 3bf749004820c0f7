"""User-facing errors: each carries one line that says what failed, where, and how to fix it."""


class UserError(Exception):
    """Bad input; launch.py prints the message alone and exits with code 2."""

    exit_code = 2


class ConfigError(UserError):
    """The study configuration (YAML or overrides) is invalid."""


class InputError(UserError):
    """A checkpoint, dataset or other input the study names is missing or unusable."""
