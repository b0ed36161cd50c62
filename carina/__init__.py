"""Carina: a DICOMweb archive and curation server for research imaging collections."""

__version__ = "0.1.0"
