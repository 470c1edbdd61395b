"""What the tests share, imported as ``support.<module>`` (tests/conftest.py puts ``tests/`` on the path):
``models`` (the MLP, the model cases most tests run on, ``randomize``; the transformers models themselves are
:mod:`vblora_rs.demo.mini_models`'s), ``peft_reference`` (PEFT's own classes as the reference, ``build_pair``),
``tolerances`` (float bounds from dtype and reduction length), ``ecosystem`` (the model families of the ecosystem and
mixed-batch tests), ``merge_inputs`` (base and adapter folders for ``vblora merge``), and the file writers and
references of single folders (``many_modules``, ``fuzz_adapters``, ``fsdp_reference``)."""
