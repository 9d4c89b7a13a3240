"""Runs an exported ONNX file in ONNX Runtime on a raw float32 input and compares the output
with the expected values: prints the largest difference, exits 1 beyond the tolerance.

    python onnx_check.py MODEL.onnx INPUT.f32 B,C,H,W EXPECTED.f32 TOLERANCE
"""
import sys

import numpy as np
import onnxruntime as ort

model, inp, shape, expected, tol = sys.argv[1:6]
x = np.fromfile(inp, dtype="<f4").reshape([int(d) for d in shape.split(",")])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
for key in ("mean", "std", "crop_pct", "interpolation", "input_size", "config"):
    assert key in meta, f"metadata has no {key}"
out = session.run(None, {"pixel_values": x})[0]
want = np.fromfile(expected, dtype="<f4").reshape(out.shape)
diff = float(np.abs(out - want).max())
print(f"onnxruntime {ort.__version__}: output {list(out.shape)}, max |diff| {diff:.3g}")
sys.exit(0 if diff <= float(tol) else 1)
