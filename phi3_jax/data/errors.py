"""The one exception type for mistakes a user can make in the data pipeline."""


class DataError(ValueError):
    """A bad data config, a missing file, an unknown kind or a malformed record.

    The message names the thing to fix (a config field, a path, a line), so a training run stops at
    start-up with one clear line instead of a traceback from deep inside grain or a tokenizer.
    """
