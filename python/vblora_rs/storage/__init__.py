"""Adapters on disk, without torch or peft: used by the command line and by the model side alike.

* :mod:`.json_file`: JSON files read with one set of errors (missing, unreadable, too deeply nested).
* :mod:`.config_file`: ``adapter_config.json`` checked field by field.
* :mod:`.locate`: THE adapter locator (a folder, a weights file, a packed file).
* :mod:`.topk`: THE validity rule of stored top-K rows (the Rust check every reader uses).
* :mod:`.finite`: THE rule for non-finite values.
* :mod:`.atomic`: folders written whole or not at all.
"""
