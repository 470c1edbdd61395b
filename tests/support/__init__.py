"""What the tests share (importable as ``support.<module>``; tests/conftest.py puts ``tests/`` on the path):
``models`` (the MLP and the model cases), ``peft_reference`` (PEFT's own classes as the reference),
``tolerances`` (float bounds from dtype and reduction length), and the file writers and references of single
test folders (``many_modules``, ``fuzz_adapters``, ``fsdp_reference``)."""
