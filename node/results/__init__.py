"""Results back to the PACS: a DICOM SEG and a TID 1500 SR per job, with deterministic UIDs."""
