"""The one exception the data layer raises for bad input (the CLI catches it and prints one line)."""


class DataError(ValueError):
    """A data file, task name or example that eptkit cannot use.

    The message always says *where* (file, line or row when known) and *what* is wrong, so a user can
    fix the input without reading a traceback. Subclasses ValueError so generic handlers still work.
    """


class MissingTask(DataError):
    """An adapter that does not record its task (saved from the Python API) and none was given."""
