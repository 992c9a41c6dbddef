"""Deployment: `export` (a model ready for inference, its Paddle and ONNX exports), `folder` (the
config, preprocessing and class names an export folder holds), `runtimes` (the runtimes that run
those files), `quantize` (its INT8 version and the accuracy cost of a low
precision) and `choice` (the fastest runtime on this CPU, behind `InferenceModel`)."""
from mobileformer.deploy.choice import Choice, InferenceModel, choose_runtimes, runtime_cache_file, time_runtimes
from mobileformer.deploy.export import (INFERENCE_PREFIX, INT8_ONNX_FILE, ONNX_FILE, PRECISION_FILE, PRECISIONS,
                                        build_for_inference, dygraph_outputs, export_inference, export_onnx,
                                        input_spec, read_precision, write_precision)
from mobileformer.deploy.folder import (CONFIG_FILE, DESCRIPTION_FILE, Prediction, dataset_class_names,
                                        read_class_names, read_config, top_classes, write_description)
from mobileformer.deploy.runtimes import (AUTO, LOW_PRECISION_RUNTIMES, RUNTIMES, OnnxModel, Outputs, OpenVinoModel,
                                          PaddleModel, default_threads, installed_runtimes, load_runtime,
                                          precision_problem, runtime_files, runtime_versions)
