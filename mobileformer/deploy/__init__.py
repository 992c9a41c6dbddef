"""Deployment: `export` (a model ready for inference, its Paddle and ONNX exports), `runtimes` (the
runtimes that run those files) and `choice` (the fastest of them on this CPU, behind
`InferenceModel`)."""
from mobileformer.deploy.choice import InferenceModel, choose_runtimes, runtime_cache_file, time_runtimes
from mobileformer.deploy.export import (INFERENCE_PREFIX, ONNX_FILE, build_for_inference, dygraph_outputs,
                                        export_inference, export_onnx, input_spec)
from mobileformer.deploy.runtimes import (AUTO, RUNTIMES, OnnxModel, Outputs, OpenVinoModel, PaddleModel, default_threads,
                                          installed_runtimes, load_runtime, runtime_files, runtime_versions)
