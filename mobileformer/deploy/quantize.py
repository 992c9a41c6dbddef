"""Low-precision versions of an export (`export.py -precision int8|bf16`) and what they cost in accuracy.

- int8: the fp32 ONNX export -> onnxruntime's `quant_pre_process` (shape inference, graph
  optimisation) -> `quantize_static` in the QDQ format: int8 weights, one scale per output channel,
  and int8 activations whose ranges come from MinMax calibration on images with the evaluation
  preprocessing (`calibration_images`). Only the GEMM-bound ops are quantized (`QUANTIZED_OPS`),
  and not all of them (`fp32_layers`): grouped / depthwise convolutions stay fp32, as neither
  onnxruntime nor OpenVINO has fast int8 kernels for them on CPUs (measured on Mobile-Former-26M,
  whose 1x1 convolutions are grouped: 3x slower than fp32 with them quantized), and so do the
  layers at the two ends of the network, the one that reads the image and the one that writes
  the outputs, which cost the most accuracy per layer (`edge_layers`). Quantizing the element-wise
  ops only adds quantize/dequantize pairs. The result, `inference.int8.onnx`, runs in onnxruntime
  and OpenVINO.
  Paddle's own post-training quantization is not used: on Paddle 3.3 it needs the legacy program
  format, and the PIR (.json) export silently runs it in fp32.
- bf16: no new files; OpenVINO runs the fp32 ONNX with bf16 inference precision on CPUs with bf16
  instructions (`mobileformer.deploy.runtimes`).

`compare_precisions` measures a low-precision runtime against the fp32 one on held-out images: top-1
of each and how often their top-1 classes agree.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from yacs.config import CfgNode

from mobileformer.data import build_dataset, build_transforms
from mobileformer.data.images import open_image
from mobileformer.data.sources import IMAGE_EXTENSIONS, images_under
from mobileformer.deploy.export import INT8_ONNX_FILE, ONNX_FILE
from mobileformer.deploy.runtimes import Engine, Outputs, OnnxModel

QUANTIZED_OPS = ('Conv', 'MatMul', 'Gemm')
MIN_AGREEMENT = 0.99  # default of export.py -min_agreement
MIN_CALIBRATION_IMAGES = 32  # fewer leave activation ranges to chance
DEFAULT_CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 16
CHECK_BATCH = 64


def spread_indices(length: int, count: int) -> np.ndarray:
    """`count` indices spread over range(length) (all of them if fewer): folder datasets are sorted by
    class, so the first `count` would cover few classes."""
    if count >= length:
        return np.arange(length)
    return np.linspace(0, length - 1, count).round().astype(np.int64)


def calibration_images(config: CfgNode, count: int, folder: Optional[str] = None) -> np.ndarray:
    """[N, C, S, S] float32: `count` images of `folder` (any layout, labels unused) or, without it, of
    the config's training split, spread evenly over it and preprocessed as for evaluation. Fewer than
    MIN_CALIBRATION_IMAGES, or none at all, is a ValueError."""
    if count < MIN_CALIBRATION_IMAGES:
        raise ValueError(f'-calib_images {count} is too few to calibrate INT8 activation ranges; give at least '
                         f'{MIN_CALIBRATION_IMAGES} (default {DEFAULT_CALIBRATION_IMAGES})')
    transform = build_transforms(config, 'val')
    if folder is not None:
        if not os.path.isdir(folder):
            raise ValueError(f"-calib_data '{folder}' is not a folder; give a folder of images for INT8 calibration")
        paths = images_under(folder)
        where = f"-calib_data '{folder}'"
        load = lambda i: transform(open_image(paths[i]))  # noqa: E731
        available = len(paths)
    else:
        try:
            dataset = build_dataset(config, 'train')
        except ValueError as e:
            raise ValueError(f'INT8 needs calibration images and the training split cannot be read ({e}); '
                             'pass -calib_data DIR, a folder of images like those the model will see') from None
        dataset.transform = transform  # evaluation preprocessing: what the deployed model is fed
        where = f"the training split of DATA.DATASET '{config.DATA.DATASET}'"
        load = lambda i: dataset[int(i)][0]  # noqa: E731
        available = len(dataset)
    if available == 0:
        raise ValueError(f'{where} holds no images ({", ".join(IMAGE_EXTENSIONS)}) to calibrate INT8 on; give a '
                         'folder of images like those the model will see')
    if available < MIN_CALIBRATION_IMAGES:
        raise ValueError(f'{where} holds {available} images, too few to calibrate INT8 activation ranges; '
                         f'it needs at least {MIN_CALIBRATION_IMAGES}')
    # an unreadable image is refused in the sentence every command uses, which names the file
    return np.stack([np.asarray(load(i), np.float32) for i in spread_indices(available, count)])


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an array of images, logging progress."""

    def __init__(self, input_name: str, images: np.ndarray, log: Callable[[str], None]):
        self.input_name, self.images, self.log = input_name, images, log
        self.starts: Iterator[int] = iter(range(0, len(images), CALIBRATION_BATCH))

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        start = next(self.starts, None)
        if start is None:
            return None
        end = min(start + CALIBRATION_BATCH, len(self.images))
        if end == len(self.images) or end * 4 // len(self.images) > start * 4 // len(self.images):  # each quarter
            self.log(f'calibrating: {end}/{len(self.images)} images')
        return {self.input_name: self.images[start:end]}

    def rewind(self) -> None:
        self.starts = iter(range(0, len(self.images), CALIBRATION_BATCH))


def grouped_convolutions(model) -> List[str]:
    """Names of the Conv nodes of an ONNX model with more than one group (depthwise included)."""
    return [node.name for node in model.graph.node if node.op_type == 'Conv'
            and any(a.name == 'group' and a.i > 1 for a in node.attribute)]


# The layers at both ends of a network are the most sensitive to INT8 (per-layer sensitivity on the
# quickstart Mobile-Former-26M, 360 held-out digits: quantized alone, its stem convolution moved the
# logits by 0.91% (relative L2), the classifier by 0.61%, any of the other 158 layers by 0.01-0.39%;
# all quantized, 1.60% and top-1 0.9639 for fp32's 0.9694; with these two in fp32, 1.25% and
# 0.9667; in OpenVINO the quantized stem alone cost 4.7 points of top-1). They hold a small share of
# the work (a patch embedding and a classifier: ~1-2% of an MLP's multiply-adds), so keeping them
# fp32 costs little speed.
_SHAPE_OPS = ('Shape', 'Size')  # their outputs carry no values of the tensor they read


def edge_layers(model) -> List[str]:
    """Names of the first QUANTIZED_OPS nodes reached from a graph input and of the last ones before
    a graph output, walking only through nodes with one non-constant input (reshapes, activations,
    normalising constants): the layer that reads the image and the one that writes each output."""
    constants = {t.name for t in model.graph.initializer} | {
        o for node in model.graph.node if node.op_type == 'Constant' for o in node.output}
    dynamic_inputs = {node.name: [i for i in node.input if i and i not in constants] for node in model.graph.node}
    readers: Dict[str, list] = {}
    writer = {}
    for node in model.graph.node:
        for tensor in dynamic_inputs[node.name]:
            readers.setdefault(tensor, []).append(node)
        for tensor in node.output:
            writer[tensor] = node
    edges = []

    def passes(node) -> bool:
        return node.op_type not in _SHAPE_OPS and len(dynamic_inputs[node.name]) == 1

    frontier = [node for t in model.graph.input for node in readers.get(t.name, [])]
    while frontier:  # forward from the inputs
        node = frontier.pop()
        if node.op_type in QUANTIZED_OPS:
            edges.append(node.name)
        elif passes(node):
            frontier.extend(n for t in node.output for n in readers.get(t, []))
    frontier = [writer[t.name] for t in model.graph.output if t.name in writer]
    while frontier:  # backward from the outputs
        node = frontier.pop()
        if node.op_type in QUANTIZED_OPS:
            edges.append(node.name)
        elif passes(node) and dynamic_inputs[node.name][0] in writer:
            frontier.append(writer[dynamic_inputs[node.name][0]])
    return list(dict.fromkeys(edges))


def fp32_layers(model) -> Dict[str, List[str]]:
    """The QUANTIZED_OPS nodes that the INT8 export keeps in fp32, by reason."""
    grouped = grouped_convolutions(model)
    return {'grouped': grouped, 'edges': [name for name in edge_layers(model) if name not in grouped]}


def left_weight_axes(graph) -> Dict[str, list]:
    """Per-channel axis 0 for the weights a MatMul takes as its first input (the token-mixing
    Linears, W^T x): their output channels are rows. onnxruntime's default axis for a MatMul weight
    is the last, which for these is the summed one (an untrained tiny Mixer's INT8 top-1 agreement
    with fp32: 96.4-96.9% with it, as against 98.9% with the Linear transposed)."""
    weights = {initializer.name for initializer in graph.graph.initializer}
    return {node.input[0]: [{'axis': 0}] for node in graph.graph.node
            if node.op_type == 'MatMul' and node.input[0] in weights}


def quantize_int8(model_dir: str, images: np.ndarray, log: Callable[[str], None] = print) -> str:
    """Writes `inference.int8.onnx` next to the fp32 `inference.onnx` of `model_dir`, calibrated on
    `images`, and returns its path. It is written only once it loads and gives finite outputs; any
    failure is a ValueError and leaves the folder's fp32 files as they were."""
    try:
        import onnxruntime
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
    except ImportError as e:  # its optional dependencies (sympy, ml_dtypes) are missing
        raise ValueError(f'INT8 quantization needs onnxruntime.quantization, which cannot be imported ({e}); '
                         'pip install -r requirements.txt') from None
    source, target = os.path.join(model_dir, ONNX_FILE), os.path.join(model_dir, INT8_ONNX_FILE)
    if not os.path.isfile(source):
        raise ValueError(f"INT8 quantization starts from the fp32 {ONNX_FILE}, which '{model_dir}' lacks; "
                         'export without -no_onnx')
    temporary = target + f'.{os.getpid()}.tmp'
    # errors only: the sessions it opens warn about each unused initialiser paddle2onnx leaves
    onnxruntime.set_default_logger_severity(3)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            prepared = os.path.join(workdir, 'prepared.onnx')
            # the symbolic shape inference fails on paddle2onnx's graphs; ONNX's own suffices here
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            graph = onnx.load(prepared)
            input_name = graph.graph.input[0].name
            kept = fp32_layers(graph)
            log(f"INT8 keeps {len(kept['grouped']) + len(kept['edges'])} layers in fp32: "
                f"{len(kept['grouped'])} grouped or depthwise convolutions, and the first and last "
                f"({', '.join(kept['edges'])})")
            quantize_static(prepared, temporary, _Batches(input_name, images, log), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS),
                            nodes_to_exclude=kept['grouped'] + kept['edges'],
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            extra_options={'TensorQuantOverrides': left_weight_axes(graph)},
                            # the calibration graph reduces each tensor to its min and max per batch,
                            # so memory does not grow with the number of images
                            calibrate_method=CalibrationMethod.MinMax)
        outputs = OnnxModel(temporary)(images[:2])
        if not all(np.isfinite(o).all() for o in (outputs if isinstance(outputs, list) else [outputs])):
            raise ValueError('it gives non-finite outputs')
    except Exception as e:  # onnx, onnxruntime and their checkers each raise their own types
        if os.path.exists(temporary):
            os.remove(temporary)
        message = ' '.join(str(e).split())[:300]
        raise ValueError(f"INT8 quantization of '{source}' failed ({type(e).__name__}: {message}); the fp32 "
                         f"export in '{model_dir}' is complete and unchanged") from None
    os.replace(temporary, target)
    return target


def _logits(outputs: Outputs) -> np.ndarray:
    if isinstance(outputs, list):
        raise ValueError('a feature extractor (MODEL.OUT_INDICES) has no classes to compare; export a classifier')
    return outputs


def compare_precisions(reference: Engine, candidate: Engine, images: Sequence[np.ndarray],
                       labels: np.ndarray) -> Dict[str, float]:
    """Top-1 of `reference` (fp32) and of `candidate` (a low precision) on `images` with `labels`, and
    the fraction of images on which their top-1 classes agree."""
    first, second = [], []
    for start in range(0, len(labels), CHECK_BATCH):
        batch = np.stack(images[start:start + CHECK_BATCH])
        first.append(_logits(reference(batch)).argmax(axis=1))
        second.append(_logits(candidate(batch)).argmax(axis=1))
    first, second = np.concatenate(first), np.concatenate(second)
    return {'top1_fp32': float((first == labels).mean()), 'top1': float((second == labels).mean()),
            'agreement': float((first == second).mean()), 'samples': int(len(labels))}


def held_out_images(config: CfgNode, count: int) -> Tuple[List[np.ndarray], np.ndarray]:
    """(images, labels): `count` images of the config's validation split, spread evenly over it, with
    the evaluation preprocessing; a ValueError says why the split cannot be read."""
    dataset = build_dataset(config, 'val')
    picked = spread_indices(len(dataset), count)
    samples = [dataset[int(i)] for i in picked]
    return [np.asarray(s[0], np.float32) for s in samples], np.array([int(s[1]) for s in samples])
