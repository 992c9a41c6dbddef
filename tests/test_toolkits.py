"""The adapters of mobileformer/toolkits.py inside the real toolkits: a PaddleSeg model built by
PaddleSeg's builder from a YAML that names `feature_backbone`, trained on digit canvases read by
PaddleSeg's Dataset with PaddleSeg's loss; a PaddleDetection RetinaNet created by ppdet from a YAML
that names `DetBackbone`, trained to find a digit and run through its inference (NMS). Both must learn.
Neither toolkit is a dependency: requirements-toolkits.txt installs them (docs/backbones.md).
Without them these tests are skipped, unless MOBILEFORMER_REQUIRE_TOOLKITS=1 (the toolkit stage of
.ci/run) makes a missing toolkit an error."""
import importlib
import os

import numpy as np
import paddle
import pytest
import yaml

import benchmarks.toolkit_step as toolkit_step
from conftest import CONFIGS, FIXTURES, load_example

from mobileformer import ConfigError
from mobileformer.data.sources import load_digits

REQUIRED = os.environ.get('MOBILEFORMER_REQUIRE_TOOLKITS') == '1'


def _toolkit(name):
    """The toolkit module; skips the test when it is not installed, unless the toolkits are required."""
    if REQUIRED:
        return importlib.import_module(name)
    return pytest.importorskip(name)


segment_digits = load_example('segment_digits')


def _write_segmentation_split(root, split, count, rng, size):
    """`count` digit canvases of `split` as PaddleSeg reads a dataset: grey PNG images, PNG masks
    (class per pixel: 0 background, 1..10 the digits), and a file list of 'image mask' lines."""
    cv2 = _toolkit('cv2')
    digits = load_digits(split)
    canvases, masks = segment_digits.make_canvases(digits.images, digits.labels, count, size, 2, rng)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    lines = []
    for i, (canvas, mask) in enumerate(zip(canvases, masks)):
        image, label = f'{split}/{i}.png', f'{split}/{i}_mask.png'
        cv2.imwrite(os.path.join(root, image), np.round((canvas[0] + 1.0) * 127.5).astype(np.uint8))
        cv2.imwrite(os.path.join(root, label), mask.astype(np.uint8))
        lines.append(f'{image} {label}\n')
    with open(os.path.join(root, f'{split}.txt'), 'w') as f:
        f.writelines(lines)
    return masks


def test_feature_backbone_takes_paddleseg_in_channels():
    """PaddleSeg's builder passes a dataset's img_channels as the backbone's in_channels (no toolkit needed)."""
    from mobileformer.toolkits import feature_backbone
    rgb = os.path.join(FIXTURES, 'official_mobile_former_tiny_g1.yaml')
    grey = feature_backbone(rgb, out_indices=[0, 1], in_channels=1)
    assert [o.shape for o in grey(paddle.randn([2, 1, 64, 64]))] == [[2, 24, 16, 16], [2, 32, 8, 8]]
    back = feature_backbone(os.path.join(CONFIGS, 'digits', 'mobileformer_26m.yaml'), in_channels=3)
    assert [o.shape[1] for o in back(paddle.randn([1, 3, 32, 32]))] == [12, 24, 64, 96]
    with pytest.raises(ConfigError, match='DATA.IN_CHANNELS must be 1 \\(grey\\) or 3 \\(RGB\\), got 4'):
        feature_backbone(rgb, in_channels=4)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_paddleseg_builds_trains_and_evaluates_feature_backbone(tmp_path):
    _toolkit('paddleseg')
    from paddleseg.core.train import loss_computation
    from paddleseg.cvlibs import Config, SegBuilder

    from mobileformer.toolkits import register_paddleseg
    register_paddleseg()

    steps, batch_size, size = 200, 8, 40
    rng = np.random.default_rng(0)
    _write_segmentation_split(str(tmp_path), 'train', 512, rng, size)
    val_masks = _write_segmentation_split(str(tmp_path), 'val', 64, rng, size)
    classes = segment_digits.NUM_CLASSES
    # grey images: PaddleSeg passes the dataset's img_channels to the backbone as in_channels
    dataset = {'type': 'Dataset', 'dataset_root': str(tmp_path), 'num_classes': classes, 'img_channels': 1,
               'transforms': [{'type': 'Normalize', 'mean': [0.5], 'std': [0.5]}]}
    config = {
        'batch_size': batch_size,
        'iters': steps,
        'train_dataset': dict(dataset, mode='train', train_path=str(tmp_path / 'train.txt')),
        'val_dataset': dict(dataset, mode='val', val_path=str(tmp_path / 'val.txt')),
        # Lite R-ASPP (the head PaddleSeg pairs with mobile backbones) on the reduced reference
        # Mobile-Former (a 3-channel config: the grey dataset makes it 1-channel)
        'model': {'type': 'LRASPP', 'num_classes': classes, 'backbone_indices': [0, 1], 'lraspp_head_inter_chs': [32],
                  'backbone': {'type': 'feature_backbone', 'out_indices': [0, 1],
                               'config': os.path.join(FIXTURES, 'official_mobile_former_tiny_g1.yaml')}},
        # PaddleSeg 2.8's CrossEntropyLoss multiplies a float32 mask by an int64 tensor, which Paddle 3
        # refuses; its OhemCrossEntropyLoss keeping at least a batch's pixels is the plain cross-entropy
        'loss': {'types': [{'type': 'OhemCrossEntropyLoss', 'min_kept': batch_size * size * size}], 'coef': [1]},
        'optimizer': {'type': 'AdamW', 'weight_decay': 1.0e-4},
        'lr_scheduler': {'type': 'PolynomialDecay', 'learning_rate': 6.0e-3, 'end_lr': 6.0e-4},
    }
    path = tmp_path / 'lraspp_mobile_former_tiny.yml'
    path.write_text(yaml.safe_dump(config))
    builder = SegBuilder(Config(str(path)))
    model = builder.model
    assert model.backbone.feat_channels == [24, 32]

    optimizer, losses = builder.optimizer, builder.loss
    loader = paddle.io.DataLoader(builder.train_dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                  return_list=True)
    history = []
    model.train()
    while len(history) < steps:
        for data in loader:
            logits = model(data['img'])
            loss = sum(loss_computation(logits, data['label'].astype('int64'), None, losses))
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            builder.lr_scheduler.step()
            history.append(float(loss))
            if len(history) == steps:
                break
    tenth = steps // 10
    first, last = np.mean(history[:tenth]), np.mean(history[-tenth:])

    # held-out canvases through PaddleSeg's Dataset; scored as in examples/segment_digits.py (PaddleSeg
    # 2.8's own metrics concatenate 0-d sums, which Paddle 3 refuses)
    model.eval()
    with paddle.no_grad():
        prediction = np.concatenate([model(data['img'])[0].argmax(axis=1).numpy() for data in paddle.io.DataLoader(
            builder.val_dataset, batch_size=16, return_list=True)])
    miou = segment_digits.mean_iou(prediction, val_masks, classes)
    guess = np.where(val_masks > 0, rng.integers(1, classes, val_masks.shape), 0)
    chance = segment_digits.mean_iou(guess, val_masks, classes)
    print(f'loss {first:.3f} -> {last:.3f}; held-out mIoU {miou:.3f} (the ink with random digits: {chance:.3f})')
    assert last < 0.5 * first
    assert miou > 2 * chance


def _detection_batch(digits, count, rng, size=64, scale=4):
    """`count` canvases [count, 3, size, size] holding one digit each (grey, repeated to 3 channels)
    and the box around its ink [count, 1, 4] (x1, y1, x2, y2 in pixels)."""
    canvases, masks = segment_digits.make_canvases(digits.images, digits.labels, count, size, scale, rng)
    boxes = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]])
    return np.repeat(canvases, 3, axis=1), np.array(boxes, np.float32)


def _iou(a, b):
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def _found(model, images, boxes):
    """Inference of a ppdet detector (NMS output, boxes in pixels); checks the output's form and returns
    the fraction of images whose top-scoring box overlaps the true box with IoU > 0.5."""
    count, _, height, width = images.shape
    model.eval()
    with paddle.no_grad():
        out = model({'image': paddle.to_tensor(images), 'im_shape': paddle.full([count, 2], float(height)),
                     'scale_factor': paddle.ones([count, 2])})
    model.train()
    bbox, bbox_num = out['bbox'].numpy(), out['bbox_num'].numpy()
    # rows of (class, score, x1, y1, x2, y2), image after image, best first; bbox_num rows per image
    assert bbox.ndim == 2 and bbox.shape[1] == 6 and bbox_num.shape == (count,) and bbox_num.sum() == len(bbox)
    assert (bbox[:, 0] == 0).all() and (bbox[:, 2:4] < bbox[:, 4:6]).all()
    starts = np.concatenate([[0], np.cumsum(bbox_num)[:-1]])
    return float(np.mean([n > 0 and _iou(bbox[i, 2:], box[0]) > 0.5 for i, n, box in zip(starts, bbox_num, boxes)]))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_paddledetection_creates_trains_and_runs_retinanet_on_det_backbone(tmp_path):
    _toolkit('ppdet')
    from ppdet.core.workspace import create, load_config

    from mobileformer.toolkits import DetBackbone, register_paddledet
    register_paddledet()

    # the benchmark's RetinaNet, narrower still, for one class: the digit on a 64 px canvas; a score
    # threshold below the prior probability (0.01): the untrained detector outputs boxes too
    config = toolkit_step.retinanet_yaml(os.path.join(CONFIGS, 'mobileformer_26m.yaml'), 1, width=32, head_convs=1,
                                         keep_top_k=10, score_threshold=0.005)
    path = tmp_path / 'retinanet_mobileformer_26m.yml'
    path.write_text(yaml.safe_dump(config))
    cfg = load_config(str(path))
    model = create(cfg.architecture)
    assert isinstance(model.backbone, DetBackbone)
    # the FPN took its inputs from DetBackbone.out_shape (ppdet's FPN.from_config), then added 2 levels
    assert [conv.weight.shape[1] for conv in model.neck.lateral_convs] == [24, 64, 96]
    assert model.neck.spatial_scales == [1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128]

    rng = np.random.default_rng(0)
    train, val = load_digits('train'), load_digits('val')
    val_images, val_boxes = _detection_batch(val, 32, rng)
    found_before = _found(model, val_images, val_boxes)
    optimizer = paddle.optimizer.Adam(learning_rate=1e-3, parameters=model.parameters())
    steps, batch_size = 80, 8
    history = []
    model.train()
    for _ in range(steps):
        images, boxes = _detection_batch(train, batch_size, rng)
        out = model({'image': paddle.to_tensor(images), 'gt_bbox': paddle.to_tensor(boxes),
                     'gt_class': paddle.zeros([batch_size, 1, 1], 'int32'),
                     'im_shape': paddle.full([batch_size, 2], 64.0), 'scale_factor': paddle.ones([batch_size, 2])})
        out['loss'].backward()
        optimizer.step()
        optimizer.clear_grad()
        history.append([float(out[key]) for key in ('loss', 'loss_cls', 'loss_reg')])
    tenth = steps // 10
    first, last = np.mean(history[:tenth], axis=0), np.mean(history[-tenth:], axis=0)
    found_after = _found(model, val_images, val_boxes)
    print(f'loss (total, class, box) {np.round(first, 3)} -> {np.round(last, 3)}; the top box finds the digit '
          f'(IoU > 0.5) on {found_before:.2f} -> {found_after:.2f} of held-out canvases')
    assert np.isfinite(history).all()
    assert last[0] < 0.4 * first[0] and last[1] < first[1] and last[2] < first[2]
    assert found_after >= 0.75 and found_after > found_before + 0.5


@pytest.mark.timeout(120)
def test_toolkit_step_benchmark_times_plain_seg_and_det_steps(capsys):
    """benchmarks/toolkit_step.py for one tiny block: a record per variant, the CPU named; timings never asserted."""
    _toolkit('paddleseg'), _toolkit('ppdet')
    machine, *results = toolkit_step.main(['-cfg', os.path.join(CONFIGS, 'mobileformer_26m.yaml'), '-batch', '2',
                                           '-image_size', '64', '-classes', '3', '-blocks', '1', '-steps', '1',
                                           '-threads', '1'])
    assert machine['cpu'].endswith(')') and machine['threads'] == 1 and machine['batch'] == 2
    assert [r['variant'] for r in results] == ['plain', 'features', 'seg', 'det']
    for result in results:
        assert len(result['seconds_per_block']) == 1 and result['seconds_per_step'] > 0
    plain, det = results[0], results[3]
    assert plain['ratio'] == 1.0 and det['ratio'] == det['seconds_per_step'] / plain['seconds_per_step']
    table = capsys.readouterr().out
    assert f'CPU: {machine["cpu"]}, 1 threads' in table and '| det |' in table


def test_toolkit_step_benchmark_rejects_an_image_size_off_the_stride(capsys):
    with pytest.raises(SystemExit):
        toolkit_step.main(['-image_size', '100'])
    assert '-image_size must be a multiple of 32 (the backbone\'s deepest stride), got 100' in capsys.readouterr().err
