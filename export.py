"""Exports a model for deployment: Paddle inference files and ONNX (dynamic batch), and optionally
an INT8 or bf16 version of it.

    python export.py -cfg configs/mobileformer_26m.yaml -pretrained mobileformer_26m.pdparams -output export/mf26m [-no_onnx]
    python export.py -cfg configs/digits/mobileformer_26m.yaml -pretrained best.pdparams -output export/digits -precision int8

Re-parameterisable blocks (RepMLP) are folded first. The folder also holds the config the model was
built from (`config.yaml`) and `model.json` (input, preprocessing, class names where the data has
them), so `predict.py -model DIR` and `InferenceModel(DIR).predict` need nothing else. The export is checked against the dygraph
model on a random batch in every installed runtime (the largest absolute difference of the logits
is printed for each), and the fastest runtime for it on this CPU is measured and cached, so
`InferenceModel` / `predict.py -model` use it from then on.

`-precision int8` then calibrates on `-calib_images` images of `-calib_data` (a folder of images) or
of the config's training split, writes `inference.int8.onnx` beside the fp32 files, and prints, on
the validation split, the top-1 of fp32 and of INT8 in each runtime that runs INT8, and how often
their top-1 classes agree. `-precision bf16` prints the same for the runtimes with a bf16 mode on
this CPU. The folder's `precision.json` records the precision its runtimes run (written last: when
a low-precision step fails, the fp32 export in the folder is complete and is what runs).
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import argparse
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import paddle
from yacs.config import CfgNode

from mobileformer import cli, folder_lock, get_config
from mobileformer.deploy import (CONFIG_FILE, DESCRIPTION_FILE, INT8_ONNX_FILE, LOW_PRECISION_RUNTIMES, ONNX_FILE,
                                 PRECISION_FILE, PRECISIONS, InferenceModel, Outputs, build_for_inference,
                                 dataset_class_names, dygraph_outputs, export_inference, export_onnx,
                                 installed_runtimes, load_runtime, precision_problem, write_description,
                                 write_precision)
from mobileformer.deploy import choice, quantize
from mobileformer.deploy.runtimes import install_command


CHECK_BATCH = 4
CHECK_IMAGES = 1000  # of the validation split, for the accuracy of a low precision


def max_difference(outputs: Outputs, reference: Outputs) -> float:
    """The largest absolute difference over every output (a feature extractor has several)."""
    if isinstance(reference, np.ndarray):
        outputs, reference = [outputs], [reference]
    if not isinstance(outputs, list) or len(outputs) != len(reference):
        return float('inf')
    return max(float(np.abs(a - b).max()) for a, b in zip(outputs, reference))


def low_precision_runtimes(precision: str, onnx: bool) -> List[str]:
    """The installed runtimes that run `precision` here; a ValueError says why there are none."""
    if precision == 'int8' and not onnx:
        raise ValueError('-precision int8 quantizes the ONNX export, which -no_onnx skips; drop -no_onnx')
    installed = installed_runtimes()
    able = [r for r in installed if precision_problem(r, precision) is None]
    if not able:
        reasons = '; '.join([precision_problem(r, precision) for r in LOW_PRECISION_RUNTIMES[precision] if r in installed]
                            + [f'{r} runs it and is not installed: {install_command(r)}'
                               for r in LOW_PRECISION_RUNTIMES[precision] if r not in installed])
        raise ValueError(f"no installed runtime runs {precision} on this CPU (installed: {', '.join(installed)}"
                         + (f'; {reasons}' if reasons else '') + '); export with -precision fp32'
                         + (' or int8' if precision == 'bf16' else ''))
    return able


def check_low_precision(config: CfgNode, model_dir: str, precision: str, runtimes: List[str],
                        count: int) -> Dict[str, dict]:
    """Prints top-1 of fp32 and of `precision` in each of `runtimes`, and their agreement, on `count`
    validation images; returns them per runtime (empty when the split cannot be read)."""
    try:
        images, labels = quantize.held_out_images(config, count)
    except ValueError as e:
        print(f'notice: the accuracy of {precision} is not checked: the validation split cannot be read ({e})')
        return {}
    reference = load_runtime('onnxruntime' if os.path.isfile(os.path.join(model_dir, ONNX_FILE)) else 'paddle',
                             model_dir, precision='fp32')
    results = {}
    for runtime in runtimes:
        result = quantize.compare_precisions(reference, load_runtime(runtime, model_dir, precision=precision),
                                             images, labels)
        print(f"{precision} in {runtime} on {result['samples']} validation images: top-1 {result['top1']:.4f} "
              f"(fp32 {result['top1_fp32']:.4f}), top-1 agreement with fp32 {result['agreement']:.2%}")
        results[runtime] = result
    return results


def keep_close_runtimes(check: Dict[str, dict], runtimes: List[str], min_agreement: float) -> List[str]:
    """The `runtimes` whose checked agreement with fp32 reaches `min_agreement` (all of them when
    nothing could be checked); prints why each other one is left out."""
    if not check:
        return list(runtimes)
    kept = []
    for runtime in runtimes:
        if check[runtime]['agreement'] >= min_agreement:
            kept.append(runtime)
        else:
            print(f"{runtime} is left out: its top-1 agreement with fp32 ({check[runtime]['agreement']:.2%}) is below "
                  f'-min_agreement {min_agreement:.2%}')
    return kept


SPEED_UP = 1.05  # paired best-of-rounds timings differ by a few percent between runs: less is no gain


def speed_comparison(precision: str, low: Dict[str, float], fp32: Dict[str, float], batch: int,
                     sizes: Dict[str, int]) -> str:
    """One line: how fast the fastest runtime of `precision` runs batches of `batch` against the fastest
    fp32 one (seconds per image by runtime), and, when it is not faster, what it saves on disk
    (`sizes`: bytes of the fp32 and low-precision model files)."""
    low_runtime, fp32_runtime = min(low, key=low.get), min(fp32, key=fp32.get)
    ratio = fp32[fp32_runtime] / low[low_runtime]
    timing = (f'{ratio:.2f}x the speed of fp32 at batch {batch} ({low_runtime} {precision} '
              f'{1000 * low[low_runtime]:.3g} ms per image, {fp32_runtime} fp32 {1000 * fp32[fp32_runtime]:.3g} ms)')
    saving = (f"{sizes['int8'] / 2 ** 20:.1f} MB of model file instead of {sizes['fp32'] / 2 ** 20:.1f} MB"
              if 'int8' in sizes else 'no file size (it runs the fp32 files)')
    if ratio >= SPEED_UP:
        return f'{precision} runs at {timing}' + (f'; it also saves {saving}' if 'int8' in sizes else '')
    return (f'notice: {precision} is not faster than fp32 here: {timing}; what it saves is {saving}; '
            'export with -precision fp32 for speed')


def measure_speed(model_dir: str, precision: str, runtimes: List[str], shape: Sequence[int]) -> str:
    """`speed_comparison` of `precision` in `runtimes` against fp32 in every installed runtime, timed
    in alternating rounds at the batch the runtime choice times throughput at."""
    engines = {f'{r} fp32': load_runtime(r, model_dir, precision='fp32') for r in installed_runtimes()}
    engines.update({f'{r} {precision}': load_runtime(r, model_dir, precision=precision) for r in runtimes})
    rng = np.random.default_rng(0)
    one = choice.best_of_rounds(engines, rng.standard_normal((1, *shape), dtype=np.float32))
    batch = choice.throughput_batch(min(one.values()))
    seconds = choice.best_of_rounds(engines, rng.standard_normal((batch, *shape), dtype=np.float32))
    sizes = {name: os.path.getsize(os.path.join(model_dir, file)) for name, file in
             (('fp32', ONNX_FILE), ('int8', INT8_ONNX_FILE)) if precision == 'int8'}
    split = lambda wanted: {k.split()[0]: v for k, v in seconds.items() if k.endswith(wanted)}  # noqa: E731
    return speed_comparison(precision, split(precision), split('fp32'), batch, sizes)


def build_parser() -> cli.CommandParser:
    parser = cli.CommandParser(description=cli.summary(__doc__))
    parser.add_argument('-cfg', required=True, help='model config YAML')
    parser.add_argument('-pretrained', required=True, help='weights (.pdparams)')
    parser.add_argument('-output', '-o', required=True, help='output folder')
    parser.add_argument('-no_onnx', action='store_true',
                        help=f'skip {ONNX_FILE} (then only the paddle runtime can run the export)')
    parser.add_argument('-precision', default='fp32', choices=PRECISIONS,
                        help='what the runtimes run: fp32 (default), int8 (calibrated, onnxruntime/OpenVINO) '
                             'or bf16 (OpenVINO on CPUs with bf16 instructions)')
    parser.add_argument('-calib_data', default=None,
                        help='folder of images to calibrate INT8 on (default: the config\'s training split)')
    parser.add_argument('-calib_images', type=int,
                        default=quantize.DEFAULT_CALIBRATION_IMAGES, help='images to calibrate INT8 on')
    parser.add_argument('-check_images', type=int, default=CHECK_IMAGES,
                        help='validation images on which a low precision is compared with fp32')
    parser.add_argument('-min_agreement', type=float,
                        default=quantize.MIN_AGREEMENT,
                        help='a runtime whose low-precision top-1 agrees with fp32 on a smaller fraction of the '
                             'checked images is not used for it (0 keeps every runtime)')
    parser.add_argument('-opts', nargs='+', default=[], help='config overrides: KEY VALUE ...')
    return parser


def run(argv: Sequence[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_images < 1:
        parser.error(f'-check_images must be at least 1, got {args.check_images}')
    if not 0 <= args.min_agreement <= 1:
        parser.error(f'-min_agreement is a fraction from 0 to 1, got {args.min_agreement}')
    config = get_config(args.cfg, args.opts)
    # refused before anything is written: an earlier export in the folder stays as it was
    low_runtimes = low_precision_runtimes(args.precision, not args.no_onnx) if args.precision != 'fp32' else []
    images = (quantize.calibration_images(config, args.calib_images, args.calib_data)
              if args.precision == 'int8' else None)
    model = build_for_inference(config, args.pretrained)
    with folder_lock.hold(args.output):  # another export or training run into the folder is refused here
        write_export(args, config, model, low_runtimes, images)


def write_export(args: argparse.Namespace, config: CfgNode, model: paddle.nn.Layer, low_runtimes: List[str],
                 images: Optional[np.ndarray]) -> None:
    """Writes, checks and times the export `run` prepared, into the folder it holds."""
    # an earlier export's files would describe or run the old model where this one does not rewrite them
    # (the ONNX too: -no_onnx, or a model paddle2onnx cannot convert)
    for stale in (PRECISION_FILE, INT8_ONNX_FILE, ONNX_FILE, CONFIG_FILE, DESCRIPTION_FILE):
        if os.path.exists(os.path.join(args.output, stale)):
            os.remove(os.path.join(args.output, stale))
    prefix = export_inference(model, config, args.output)
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    batch = np.random.default_rng(0).standard_normal((CHECK_BATCH, channels, size, size), dtype=np.float32)
    reference = dygraph_outputs(model, batch)
    written, onnx_file = f'{prefix}.*', os.path.join(args.output, ONNX_FILE)
    if not args.no_onnx:
        written += ' and ' + export_onnx(model, config, onnx_file)
    print(f'exported {config.MODEL.NAME} to {written} (input [N, {channels}, {size}, {size}])')
    names = dataset_class_names(config, log=lambda notice: None)  # their absence is said below
    write_description(args.output, config, names)
    print(f'wrote what predicting needs beside it: {CONFIG_FILE} (the config, with its preprocessing) and '
          f'{DESCRIPTION_FILE} (' + (f'{len(names)} class names)' if names else
                                     'no class names, as the dataset could not be read: predictions name class '
                                     'indices; -opts DATA.DATA_PATH DIR records them)'))
    for runtime in installed_runtimes():
        if runtime != 'paddle' and args.no_onnx:
            continue
        difference = max_difference(load_runtime(runtime, args.output)(batch), reference)
        print(f'max |{runtime} - dygraph| on a batch of {CHECK_BATCH}: {difference:.3g}')
    if args.precision != 'fp32':
        details = {}
        if args.precision == 'int8':
            print(f'INT8: calibrating on {len(images)} images of '
                  + (f"'{args.calib_data}'" if args.calib_data else f'the {config.DATA.DATASET} training split'))
            print(f'wrote {quantize.quantize_int8(args.output, images)}')
            details['calibration_images'] = len(images)
        details['check'] = check_low_precision(config, args.output, args.precision, low_runtimes, args.check_images)
        kept = keep_close_runtimes(details['check'], low_runtimes, args.min_agreement)
        if not kept:
            if os.path.exists(os.path.join(args.output, INT8_ONNX_FILE)):
                os.remove(os.path.join(args.output, INT8_ONNX_FILE))
            agreements = ', '.join(f"{r} {c['agreement']:.2%}" for r, c in details['check'].items())
            raise ValueError(f'{args.precision} changes the top-1 class of too many validation images in every runtime '
                             f'that runs it (agreement with fp32: {agreements}; -min_agreement {args.min_agreement:.2%}); '
                             f"the fp32 export in '{args.output}' is complete and is what runs")
        print(measure_speed(args.output, args.precision, kept, (channels, size, size)))
        write_precision(args.output, args.precision, kept, details)
        print(f"{args.output} runs {args.precision} in {', '.join(kept)} (recorded in {PRECISION_FILE})")
    InferenceModel(args.output)  # measures the runtimes once and prints the fastest


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()
