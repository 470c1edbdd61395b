//! The packed single-file adapter format (see `docs/packed-format.md`): encoder and decoder.
