"""The one exception type raised for unreadable or inconsistent dataset files."""


class DatasetError(ValueError):
    """A dataset file or folder is missing, malformed, or inconsistent.

    The message always starts with the offending path and says what was expected.
    """
