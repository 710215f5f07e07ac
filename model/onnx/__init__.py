"""ONNX: export with parity checks, the export twins of quantized layers, the ONNX Runtime runner and ONNX Runtime quantization."""
