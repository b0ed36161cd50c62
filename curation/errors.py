"""Domain errors of curation; `api` maps them to STOW failure reasons and DIMSE statuses."""


class CurationError(Exception):
    """Base of every curation error."""


class ProfileError(CurationError):
    """A de-identification profile or recipe is invalid or missing."""


class InstanceRefused(CurationError):
    """An instance cannot be accepted; carries a DICOM failure code and a reason for humans."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class UnknownSeries(CurationError):
    """No series of that UID is held."""


class DecisionRefused(CurationError):
    """A curator's decision does not apply to the series in its present state."""


class ChangeRefused(CurationError):
    """A curator's redaction or attribute edit is invalid (outside the image, a value that does
    not fit its VR, an edit that would make the object invalid or identify the patient)."""
