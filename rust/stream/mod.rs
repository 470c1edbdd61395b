//! Streaming merge of adapters into safetensors files, tensor by tensor.
