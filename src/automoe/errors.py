"""The one exception type a person sees: a one-line message naming the bad input."""


class AutomoeError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits with status 2."""


class ConfigError(AutomoeError, ValueError):
    """A params file, override, space or arch file that does not validate."""


class DataError(AutomoeError):
    """A corpus, prepared-data folder or remote object that cannot be used."""
