"""The triage inference service: loads a model bundle with ONNX Runtime and serves it over HTTP."""
