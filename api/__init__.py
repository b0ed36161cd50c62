"""Every way in: DICOMweb, curator/admin routes, the DIMSE listener, authentication."""
