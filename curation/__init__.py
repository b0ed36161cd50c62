"""Curation: intake, de-identification, pseudonyms, quarantine rules, audit."""
