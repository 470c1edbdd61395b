"""Adapters on disk, without torch or peft: used by the command line, the converters and the model side alike.

* :mod:`.names`: file names, checkpoint keys, the top-K index dtype and bits per index, spelled once.
* :mod:`.json_file`: JSON files read with one set of errors (missing, unreadable, too deeply nested).
* :mod:`.adapter_config`: ``adapter_config.json`` checked field by field (THE size rule, the regex guard of
  :mod:`.regex_guard`), and :class:`~.adapter_config.AdapterConfig`, its torch-free dataclass.
* :mod:`.locate`: THE adapter locator (a folder, a weights file, a packed file).
* :mod:`.topk`: THE validity rule of stored top-K rows (the Rust check every reader uses).
* :mod:`.finite`: THE rule for non-finite values.
* :mod:`.header_size`: the byte size of a safetensors header before it is written.
* :mod:`.packed_arrays`: the packed file as flat numpy arrays (read, unpack, module checks).
* :mod:`.atomic`: files and folders written whole or not at all.
"""
