"""Domain errors of the archive; `api` maps them to HTTP and DIMSE statuses."""


class ArchiveError(Exception):
    """Base of every archive error."""


class NotFound(ArchiveError):
    """The study, series, instance or object asked for does not exist."""


class InvalidQuery(ArchiveError):
    """A QIDO query parameter cannot be understood (bad date range, unknown attribute, ...)."""


class StorageError(ArchiveError):
    """The object store refused or failed an operation."""


class OutOfResources(StorageError):
    """The object store is full or unavailable."""
