"""Train a model (any registered family) with paddle.Model.

    python train.py                                     # digits quickstart (CPU, a few minutes)
    python train.py -cfg configs/mobileformer_26m.yaml -data_path /data/imagenet
    python -m paddle.distributed.launch --nproc_per_node 8 train.py -cfg ... -data_path ...
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import argparse
import os
import sys
from typing import List, Optional, Sequence

import paddle

from mobileformer.data import build_dataset, build_mixup
from mobileformer import ConfigError, build_model, get_config
from mobileformer import checkpoint, cli, cpu_ops, engine

QUICKSTART_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 'configs', 'digits', 'mobileformer_26m.yaml')


def build_parser() -> cli.CommandParser:
    # no -n/-log (they belong to paddle.distributed.launch)
    parser = cli.CommandParser(description=cli.summary(__doc__))
    parser.add_argument('-cfg', default=QUICKSTART_CONFIG, help='YAML config (default: digits quickstart)')
    parser.add_argument('-dataset', help='DATA.DATASET')
    parser.add_argument('-data_path', help='DATA.DATA_PATH')
    parser.add_argument('-batch_size', type=int, help='DATA.BATCH_SIZE, per card')
    parser.add_argument('-epochs', type=int, help='TRAIN.EPOCHS')
    parser.add_argument('-output', help='OUTPUT folder (default output/<MODEL.NAME>)')
    parser.add_argument('-pretrained', help='.pdparams to start from; another class count drops the classifier')
    parser.add_argument('-resume', help="checkpoint prefix (e.g. output/x/last) or 'auto'")
    parser.add_argument('-teacher', nargs='+', metavar='PATH',
                        help='distil from a teacher: an export.py folder, an .onnx classifier, or a YAML config '
                             'and its .pdparams (TRAIN.DISTILL.TEACHER / WEIGHTS; docs/distillation.md)')
    parser.add_argument('-amp', action='store_true', help='mixed precision (GPU only)')
    parser.add_argument('-opts', nargs='+', default=[], help='KEY VALUE pairs overriding the config')
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_config(args: argparse.Namespace, notices: Optional[List[str]] = None):
    """The config the flags describe (OUTPUT defaults to output/<MODEL.NAME>); notices about
    adjustments (a shortened schedule) are appended to `notices`."""
    opts = []
    for flag, key in (('dataset', 'DATA.DATASET'), ('data_path', 'DATA.DATA_PATH'),
                      ('batch_size', 'DATA.BATCH_SIZE'), ('epochs', 'TRAIN.EPOCHS'), ('output', 'OUTPUT')):
        if getattr(args, flag) is not None:
            opts += [key, getattr(args, flag)]
    if args.amp:
        opts += ['TRAIN.AMP', True]
    if args.teacher:
        if len(args.teacher) > 2:
            raise ConfigError(f'-teacher takes a folder, an .onnx file, or a YAML and its weights, got '
                              f'{len(args.teacher)} paths: {" ".join(args.teacher)}')
        opts += ['TRAIN.DISTILL.TEACHER', args.teacher[0]]
        if len(args.teacher) == 2:
            opts += ['TRAIN.DISTILL.WEIGHTS', args.teacher[1]]
    config = get_config(args.cfg, opts + list(args.opts), notices)
    if not config.OUTPUT:
        config.defrost()
        config.OUTPUT = os.path.join('output', config.MODEL.NAME)
        config.freeze()
    return config


def amp_configs(config) -> Optional[dict]:
    if not config.TRAIN.AMP:
        return None
    if not paddle.is_compiled_with_cuda():
        if engine.is_main_process():
            print('Notice: -amp has no effect on CPU; training in float32.')
        return None
    return {'level': 'O1'}


def describe_log(config, teacher: Optional[engine.Teacher]) -> str:
    """The line that names the numbers of the step and epoch lines."""
    parts = [f'label smoothing {config.AUG.LABEL_SMOOTHING:g}']
    if build_mixup(config) is not None:
        parts.append('Mixup/CutMix targets')
    if teacher is not None:
        distill = config.TRAIN.DISTILL
        parts.append(f'{distill.KIND} distillation, alpha {distill.ALPHA:g}' +
                     (f', tau {distill.TAU:g}' if distill.KIND == 'soft' else ''))
    k = engine.top_k(config.MODEL.NUM_CLASSES)
    teacher_keys = ('; teacher_loss: the teacher term alone, agreement: the share of samples whose top-1 is '
                    "the teacher's" if teacher is not None else '')
    return (f'Log: objective is the loss minimised ({", ".join(parts)}); ce the plain cross-entropy against the '
            f'labels; top1/top{k} accuracy{teacher_keys}. Step lines: objective of that step, the others means '
            f'over the epoch so far; epoch lines: train_* means over the epoch, val_* on the validation set.')


def make_logger(output: str):
    """Prints on rank 0 and appends the same line to <output>/train.log."""
    def log(line: str) -> None:
        if engine.is_main_process():
            print(line, flush=True)
            with open(os.path.join(output, 'train.log'), 'a', encoding='utf-8') as f:
                f.write(line + '\n')
    return log


def train(args: argparse.Namespace, extra_callbacks: Sequence[paddle.callbacks.Callback] = ()) -> Optional[paddle.Model]:
    """Runs the training `args` describe; returns the trained paddle.Model (None if already done).
    `extra_callbacks` run before the built-in ones at every event (e.g. an experiment's hooks)."""
    notices: List[str] = []
    config = load_config(args, notices)
    output = config.OUTPUT
    # before anything is written: a teacher that cannot teach this student is refused now
    teacher = engine.build_teacher(config, notices.append)
    if engine.is_main_process():
        checkpoint.check_writable(output)  # a read-only folder or a full disk fails now, not after an epoch
        checkpoint.recover(output)  # finishes (or drops) a checkpoint write a killed run left halfway
    log = make_logger(output)
    # notices wait until everything that can refuse the run has been checked: a run that is then
    # refused prints its one error line and nothing else
    pending = [notice if notice.startswith(('runtime:', 'notice:')) else f'Notice: {notice}.' for notice in notices]
    resume = engine.resolve_resume(args.resume, output)
    if args.resume == 'auto' and resume is None:
        pending.append(f'No checkpoint in {output} to resume from; starting from scratch.')

    engine.seed_everything(config.SEED)  # same initialization on every rank
    train_set, val_set = build_dataset(config, 'train'), build_dataset(config, 'val')
    if train_set.num_classes != config.MODEL.NUM_CLASSES:
        raise ConfigError(f'the dataset has {train_set.num_classes} classes but MODEL.NUM_CLASSES is '
                          f'{config.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES: {train_set.num_classes} in the YAML')
    network = build_model(config)
    if args.pretrained:
        checkpoint.load_weights(network, args.pretrained, drop_classifier=True, adapt_input=True, log=pending.append)
    cpu_ops.prepare(network, log)

    skip_bad = config.DATA.SKIP_BAD_IMAGES
    train_loader = engine.build_loader(train_set, config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS, train=True,
                                       skip_bad=skip_bad, log=log)
    val_loader = engine.build_loader(val_set, config.DATA.BATCH_SIZE_EVAL, config.DATA.NUM_WORKERS, train=False,
                                     skip_bad=skip_bad, log=log)
    batches_per_epoch = len(train_loader)
    sampler = train_loader.batch_sampler
    mixup = build_mixup(config)
    criterion, metrics = engine.build_criterion(config, mixup), engine.build_metrics(config.MODEL.NUM_CLASSES)
    if teacher is not None:
        criterion, teacher_metrics = engine.build_distillation(config, criterion)
        metrics += teacher_metrics
    model = engine.TrainingModel(network, criterion, mixup, config.TRAIN.ACCUM_ITER, teacher)
    schedule = engine.build_lr_schedule(config, batches_per_epoch)
    optimizer = engine.build_optimizer(config, network, schedule)
    model.prepare(optimizer, model.train_loss, metrics=metrics, amp_configs=amp_configs(config))
    ema = (engine.ExponentialMovingAverage(network, config.TRAIN.EMA_DECAY, config.TRAIN.ACCUM_ITER, batches_per_epoch,
                                           sampler) if config.TRAIN.EMA else None)

    start_epoch, history, best_top1 = 0, [], -1.0
    if resume:
        state = engine.load_checkpoint(resume, network, optimizer, ema)
        start_epoch, history, best_top1 = state['epoch'], state['history'], state['best_top1']
        sampler.skip = state.get('step', 0)  # a mid-epoch checkpoint (SIGTERM) continues its epoch
        pending.append(f'Resumed from {resume} after epoch {start_epoch}'
                       + (f' and {sampler.skip} batches of epoch {start_epoch + 1}.' if sampler.skip else '.'))
    for line in pending:
        log(line)
    if start_epoch >= config.TRAIN.EPOCHS:
        log(f'Nothing to do: {output} already holds {start_epoch} of {config.TRAIN.EPOCHS} epochs.')
        return None
    log(f'{config.MODEL.NAME}: {config.DATA.DATASET} {len(train_set)} train / {len(val_set)} val images, '
        f'{engine.world_size()} process(es) x batch {config.DATA.BATCH_SIZE} x accum {config.TRAIN.ACCUM_ITER}, '
        f'epochs {start_epoch + 1}-{config.TRAIN.EPOCHS}, output {output}' +
        (f', teacher {teacher.source}' if teacher is not None else ''))
    log(describe_log(config, teacher))

    callbacks = [*extra_callbacks, engine.EpochProgBar(start_epoch, config.TRAIN.EPOCHS, config.TRAIN.LOG_FREQ),
                 engine.StopOnNonFiniteLoss(output, start_epoch, sampler),  # before the LR and EMA step
                 engine.StepLROnUpdate(config.TRAIN.ACCUM_ITER, batches_per_epoch, sampler),
                 engine.EpochSeeder(config.SEED, start_epoch, sampler)]
    if ema is not None:
        callbacks.append(ema)
    checkpointing = engine.EvaluateAndCheckpoint(config, val_loader, output, start_epoch, history, best_top1, ema, log)
    graceful_stop = engine.GracefulStop(checkpointing, config.TRAIN.ACCUM_ITER, batches_per_epoch, sampler)
    callbacks += [checkpointing, graceful_stop]
    visualdl = engine.visualdl_callback(output)
    if visualdl is not None:
        callbacks.append(visualdl)
    try:
        model.fit(train_loader, epochs=config.TRAIN.EPOCHS - start_epoch, verbose=2,
                  accumulate_grad_batches=config.TRAIN.ACCUM_ITER, callbacks=callbacks)
    finally:
        graceful_stop.on_train_end()
        train_loader.stop_workers()
    final = history[-1]
    log(f"Done: top1={final.get('val_top1', float('nan')):.4f} (best {max(r.get('val_top1', -1) for r in history):.4f}); "
        f"weights in {output}/best.pdparams and last.pdparams")
    return model


def main(argv: Optional[List[str]] = None, extra_callbacks: Sequence[paddle.callbacks.Callback] = ()) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(lambda args: train(parse_args(args), extra_callbacks) and None, argv)


if __name__ == '__main__':
    sys.exit(main())
