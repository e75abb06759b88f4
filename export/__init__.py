"""Export of the neti-fast denoiser (U-Net + row-gathered cross-attention over per-layer K / V
tables) to ONNX (`neti_fast.export.onnx`, run by onnxruntime) and TensorRT
(`neti_fast.export.tensorrt`). Every backend has `TorchDenoiser`'s call signature, so
`Engine(model, cfg, denoiser=OnnxDenoiser(path))` works unchanged.
"""
