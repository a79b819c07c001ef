"""The one error type of the data layer."""


class DataError(ValueError):
    """Bad data or data config: the message names the file or key and what to change."""
