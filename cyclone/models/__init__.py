"""Model files: the `model.yaml` schema, the repository layout, scikit-learn → ONNX."""
