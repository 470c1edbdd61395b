"""The torch + peft side: subclasses of ``peft.tuners.vblora``'s tuner and layers with the Rust paths."""
