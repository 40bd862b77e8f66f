"""``portres train`` and ``portres eval``: training runs with checkpoints, and their evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .app import IMAGE_SIZE, data_for, data_options, load_spec, main


def _milestones(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of epochs, e.g. 82,123") from None



@main.command()
@click.option("--arch", "name", help="A preset (input channels and classes adapt to the data set).")
@click.option("--depth", type=int, help="ResNet depth instead of --arch (CIFAR: 20/32/44/56/110/1202).")
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file; it must fit the data set as is.")
@click.option("--backend", default="mlx", show_default=True, help="numpy, tinygrad, mlx or torch.")
@click.option("--device", help="Backend device (tinygrad: CPU, CUDA; mlx: cpu, gpu; torch: cpu, cuda).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), help="Default: float32 (numpy: float64).")
@click.option("--data", default="digits", show_default=True, help="cifar10, cifar100, digits or folder.")
@click.option("--data-dir", type=click.Path(), help="Where the data set's files are (CIFAR archives, image folders).")
@click.option("--image-size", type=IMAGE_SIZE,
              help="digits/folder: square side images are resized to; --stream: the crops' side (default: the "
                   "network's input size).")
@click.option("--stream", is_flag=True,
              help="folder: read the images from disk batch by batch, the ImageNet way: random-resized-crop + flip "
                   "for training, resize + centre crop for testing, the network's preset mean/std.")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(), help="Output directory.")
@click.option("--epochs", type=click.IntRange(min=1), help="Default: the data set's recipe (digits 10, CIFAR 164).")
@click.option("--batch-size", type=click.IntRange(min=2), help="Default: digits 64, CIFAR 128.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--lr", type=float, help="Peak learning rate (default 0.1).")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum (AdamW: beta1).")
@click.option("--nesterov", is_flag=True, help="Nesterov momentum.")
@click.option("--weight-decay", type=float, help="Default: CIFAR 1e-4 (the paper), digits 5e-4.")
@click.option("--no-decay-norms-biases", is_flag=True, help="Exempt BN scales/shifts and biases from weight decay.")
@click.option("--schedule", type=click.Choice(["constant", "multistep", "cosine"]),
              help="Default: CIFAR multistep (/10 at 50% and 75%: the paper's 32k/48k of 64k), digits cosine.")
@click.option("--milestones", help="multistep: epochs to divide the rate by 10 at, e.g. 82,123.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True)
@click.option("--augment", type=click.Choice(["recipe", "pad_crop_flip", "flip", "random_resized_crop_flip", "none"]),
              default="recipe", show_default=True,
              help="recipe: CIFAR pad+crop+flip, digits none, folder flip, --stream random_resized_crop_flip.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True, help="Epochs between tests.")
@click.option("--limit-train", type=click.IntRange(min=2), help="Train on the first N images only (quick runs).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), help="Also checkpoint every N steps.")
@click.option("--stop-after", "stop_after_steps", type=click.IntRange(min=1),
              help="Stop after N steps in all (checkpointed); continue later with --resume.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.safetensors (same settings).")
@click.option("--overwrite", is_flag=True,
              help="Replace the run in OUT (its checkpoints, metrics, summary); without it a non-empty OUT is refused.")
@click.option("--distributed", is_flag=True,
              help="Be one rank of a group started by mlx.launch, mpirun or torchrun (see docs/distributed.md).")
@click.option("--processes", type=click.IntRange(min=1),
              help="Start N ranks on this machine (loopback; mlx or torch), each on its share of every batch.")
@click.option("--devices", "devices", help="tinygrad: one replica per device in this process, e.g. CPU:0,CPU:1.")
@click.option("--sync-bn", is_flag=True, help="Data parallel: BN with the global batch's statistics.")
@click.option("--port", type=click.IntRange(min=1, max=65535),
              help="--processes: the first loopback port of the ranks (default: free ones).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Data parallel: seconds a rank waits on the others before it gives up.")
@click.option("--init", "init", type=click.Path(),
              help="Start from these weights (any layout, or a checkpoint): what fits is loaded, a classifier of "
                   "another class count re-initialised, the input conv adapted to the channels.")
@click.option("--freeze", help="Hold this part and everything before it still: stem, layer1, ..., backbone "
                               "(no gradient, no weight decay, BN statistics untouched).")
@click.option("--lr-backbone", "lr_backbone", type=float,
              help="The trained backbone's learning rate as a factor of --lr (the classifier keeps --lr).")
def train(name, depth, spec_file, backend, device, dtype, data, data_dir, image_size, stream, out, epochs, batch_size,
          optimizer, lr, momentum, nesterov, weight_decay, no_decay_norms_biases, schedule, milestones, warmup_epochs,
          label_smoothing, augment, seed, eval_every, limit_train, checkpoint_every, stop_after_steps, resume,
          overwrite, distributed, processes, devices, sync_bn, port, timeout_s, init, freeze, lr_backbone):
    """Train a network on a data set: a progress bar on stderr, OUT/metrics.jsonl (one line per
    epoch), OUT/last.safetensors and OUT/best.safetensors checkpoints, OUT/curves.png, OUT/summary.json.

    \b
        portres train --arch resnet20 --data digits                    # minutes on a laptop CPU
        portres train --arch resnet20 --data cifar10 --data-dir DIR --out runs/r20
        portres train --arch resnet20 --data digits --processes 2      # 2 local ranks (MLX ring)
        mlx.launch -n 2 -- $(which python) -m portres.cli train --arch resnet20 --distributed
        portres train --arch resnet20 --data folder --data-dir DIR --init A/best.safetensors --freeze backbone
        portres train --arch resnet50 --data folder --data-dir DIR --stream --init resnet50.pth --freeze layer3

    Data parallel, --batch-size is the global batch: each replica trains on its share.
    One run at a time writes OUT; a non-empty OUT needs --resume (continue) or --overwrite (replace).
    """
    from portres import backends as registry
    from portres.training.config import TrainConfig
    from portres.training.launch import local_training
    from portres.training.loop import train as run
    from portres.training.replicas import AlreadyReported, check_batch, check_parallel_settings

    spec = load_spec(name, spec_file, depth)
    if reason := registry.unavailable_reason(backend, device):
        raise registry.BackendUnavailable(f"backend {backend!r} cannot run: {reason}")
    device_list = None if devices is None else tuple(part.strip() for part in devices.split(","))
    if port is not None and processes is None:
        raise click.UsageError("--port chooses the loopback ports of --processes N: add --processes")
    check_parallel_settings(backend, distributed=distributed, processes=processes, devices=device_list,
                            device=device, sync_bn=sync_bn)
    from_preset = spec_file is None
    config = TrainConfig(
        out=out, arch=spec.name if from_preset else None, spec=None if from_preset else spec.to_dict(), data=data,
        data_dir=data_dir, data_options=data_options(image_size), backend=backend, device=device, dtype=dtype,
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
        weight_decay=weight_decay, decay_norms_and_biases=not no_decay_norms_biases, schedule=schedule,
        milestones=_milestones(milestones), warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        augment=None if augment == "none" else augment, seed=seed, eval_every=eval_every, limit_train=limit_train,
        checkpoint_every=checkpoint_every, stop_after_steps=stop_after_steps, distributed=distributed,
        devices=device_list, sync_bn=sync_bn and (processes or 0) != 1, timeout_s=timeout_s, overwrite=overwrite,
        init=init, freeze=freeze, lr_backbone=lr_backbone, stream=stream)
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in OUT, --overwrite replaces it: give one of them")
    if processes is not None and processes > 1:
        config = config.resolved()  # bad settings fail here, once, not in every rank
        check_batch(config.batch_size, processes, sync_bn)
        try:
            summary = local_training(config, processes, resume=resume, port=port)
        except AlreadyReported:
            sys.exit(2)  # rank 0 printed its one-line error above
    else:
        summary = run(config, resume=resume)
        if summary.get("rank", 0) != 0:  # under a launcher, rank 0 speaks for all
            return
    best = summary["best_test_top1_error"]
    state = "finished" if summary["finished"] else \
        f"stopped after step {summary['steps_done']} (continue with --resume)"
    click.echo(f"{summary['network']} on {data}: {state}; best test top-1 error "
               f"{'-' if best is None else f'{best:.4f} (accuracy {1 - best:.2%})'}; outputs in {out}")


@main.command("_rank", hidden=True)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
def rank(config_file):
    """One rank of `portres train --processes N`, which starts it with the launcher's environment."""
    from portres.training.config import TrainConfig
    from portres.training.loop import train as run

    payload = json.loads(open(config_file).read())
    run(TrainConfig.from_dict(payload["config"]), resume=payload["resume"])


@main.command("eval")
@click.option("--weights", required=True, type=click.Path(),
              help="A weights file, a training checkpoint or a run directory (its best checkpoint).")
@click.option("--arch", "name", help="The preset it was trained as (default: the checkpoint's own spec).")
@click.option("--depth", type=int, help="ResNet depth instead of --arch.")
@click.option("--spec", "spec_file", type=click.Path(), help="A spec JSON file instead of --arch.")
@click.option("--backend", default="mlx", show_default=True, help="numpy, tinygrad, mlx or torch.")
@click.option("--device", help="Backend device.")
@click.option("--data", help="cifar10, cifar100, digits, folder or imagenet (default: the checkpoint's; else digits).")
@click.option("--data-dir", type=click.Path(),
              help="Where the data set's files are (imagenet: DIR/val/<wnid>/ or DIR/<class>/).")
@click.option("--labels", "labels_file", type=click.Path(),
              help="imagenet: DIR is a flat folder of images labelled by this file (`filename label` per line).")
@click.option("--image-size", type=IMAGE_SIZE, help="digits/folder: square side images are resized to.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(weights, name, depth, spec_file, backend, device, data, data_dir, labels_file, image_size, batch_size,
             as_json):
    """Top-1 and top-5 error of trained weights on a data set's test split (eval-mode BN).

    \b
    --data imagenet streams an image folder from disk, each image prepared as the network's preset
    says (resize + centre crop, mean/std: see docs/imagenet.md), and prints top-1/top-5 accuracy:
        portres eval --data imagenet --data-dir ~/imagenet --arch resnet50 --weights resnet50-0676ba61.pth
    """
    from portres import data as datasets
    from portres.loading import checkpoint_file, load
    from portres.training.loop import check_data_options, streamed_checkpoint
    from portres.training.loop import evaluate as run

    if Path(weights).is_dir():  # a run directory: its best checkpoint (else its last), as portres.load reads it
        weights = str(checkpoint_file(weights))
    if data == "imagenet":
        _evaluate_image_folder(weights, name, depth, spec_file, backend, device, data_dir, labels_file, image_size,
                               batch_size, as_json)
        return
    if labels_file is not None:
        raise click.UsageError("--labels labels a flat image folder for --data imagenet; the other data sets "
                               "carry their own labels")
    data, options = data_for(weights, data, image_size, "digits")  # a checkpoint is read on its own data
    check_data_options(options)  # before any image is loaded
    checkpoint = name is None and spec_file is None and depth is None
    if checkpoint:
        _spec_of_checkpoint(weights)  # a plain weights file needs --arch or --spec; an altered checkpoint is refused
        if data == "folder" and streamed_checkpoint(weights):
            if image_size is not None:
                raise click.UsageError(f"{weights} was trained on a folder streamed from disk: its test images are "
                                       "prepared as its checkpoint records (resize + centre crop); leave out "
                                       "--image-size")
            spec, count, result = _evaluate_streamed_folder(weights, backend, device, data_dir, batch_size)
            _print_evaluation(spec, data, count, result, backend, as_json)
            return
    dataset = datasets.load(data, data_dir, **options)
    if checkpoint:  # its own network, class names and preprocessing (portres.load, as predict builds it)
        model = load(weights, backend, device=device, fold_batch_norm_into_conv=False)
    else:
        spec = load_spec(name, spec_file, depth)
        if spec_file is None:
            spec = datasets.fit_spec(spec, dataset)
        model = load(weights, backend, arch=spec, device=device, fold_batch_norm_into_conv=False)
    datasets.check_fits(dataset, model.spec)
    result = run(model.plan, model.backend, model.params, dataset.test_images, dataset.test_labels, dataset.mean,
                 dataset.std, batch_size=batch_size)
    _print_evaluation(model.spec, data, len(dataset.test_labels), result, backend, as_json)


def _print_evaluation(spec, data: str, count: int, result: dict, backend: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"network": spec.name, "data": data, "images": count, **result}))
        return
    click.echo(f"{spec.name} on {data} test ({count:,} images, {backend}): top-1 error {result['top1_error']:.4f} "
               f"(accuracy {1 - result['top1_error']:.2%}), top-5 error {result['top5_error']:.4f}, "
               f"loss {result['loss']:.4f}")
    sys.stdout.flush()


def _evaluate_streamed_folder(weights, backend, device, data_dir, batch_size):
    """The test split of the folder a `portres train --stream` checkpoint trained on, read as it was read then:
    ``(spec, images, {loss, top1_error, top5_error})``."""
    from portres.data.folder import folder_root, split_folders
    from portres.data.streaming import check_headers, scan_class_folders, stream_batches
    from portres.loading import load
    from portres.training.loop import batch_sums

    _, test_dir = split_folders(folder_root(data_dir))
    test = scan_class_folders(test_dir)
    model = load(weights, backend, device=device, fold_batch_norm_into_conv=False)
    if model.class_names is not None and test.class_names != model.class_names:
        raise ValueError(f"{test_dir} has the classes {', '.join(test.class_names[:5])}"
                         f"{' ...' if len(test.class_names) > 5 else ''} but {weights} was trained on "
                         f"{', '.join(model.class_names[:5])}{' ...' if len(model.class_names) > 5 else ''}: give the "
                         "folder it was trained on (--data-dir)")
    check_headers(test.paths)
    with stream_batches(test, batch_size, model.data_config) as batches:
        loss, top1, top5, count = batch_sums(model.plan, model.backend, model.params, batches)
    return model.spec, int(count), {"loss": loss / count, "top1_error": top1 / count, "top5_error": top5 / count}


def _spec_of_checkpoint(weights):
    from portres.training.checkpoint import CheckpointError, DescriptionError
    from portres.training.loop import spec_of_checkpoint

    try:
        return spec_of_checkpoint(weights)
    except DescriptionError:  # an altered checkpoint: --arch would not make it right
        raise
    except CheckpointError as error:
        raise click.UsageError(f"{error}: give --arch or --spec") from None


def _evaluate_image_folder(weights, name, depth, spec_file, backend, device, data_dir, labels_file, image_size,
                           batch_size, as_json):
    """`portres eval --data imagenet`: top-1/top-5 on an image folder streamed from disk."""
    from portres.data.streaming import check_labels_fit, evaluate_stream, scan_image_folder, stream_batches
    from portres.loading import load
    from portres.training.loop import Progress

    if data_dir is None:
        raise click.UsageError("--data imagenet needs --data-dir DIR: DIR/val/<wnid>/*.JPEG, DIR/<class>/*.JPEG, "
                               "or a flat folder of images with --labels FILE")
    if image_size is not None:
        raise click.UsageError("--image-size squashes digits/folder images; --data imagenet prepares each image as "
                               "the network's preset says (resize + centre crop)")
    folder = scan_image_folder(data_dir, labels_file=labels_file)  # a bad folder fails before the network loads
    # the network a checkpoint records or a weights file's preset (recognised from its tensors), or the one named
    arch = None if name is None and spec_file is None and depth is None else load_spec(name, spec_file, depth)
    model = load(weights, backend, arch=arch, device=device)
    spec = model.spec
    check_labels_fit(folder, spec.num_classes, spec.name)
    if folder.class_names is not None and len(folder.class_names) != spec.num_classes:
        click.echo(f"note: {folder.root} has {len(folder.class_names):,} class folders and {spec.name} "
                   f"{spec.num_classes:,} classes; folder i (in sorted order) is read as class i", err=True)
    config = model.data_config
    progress, total = Progress(), len(folder)

    def report(done: int) -> None:
        filled = 30 * done // total
        progress.update(f"eval [{'#' * filled}{'.' * (30 - filled)}] {done:,}/{total:,} images", final=done == total)

    with stream_batches(folder, batch_size, config) as batches:
        result = evaluate_stream(model, batches, progress=report)
    result = {**result, "top1_error": 1 - result["top1_accuracy"], "top5_error": 1 - result["top5_accuracy"]}
    if as_json:
        click.echo(json.dumps({"network": spec.name, "data": "imagenet", "data_dir": str(folder.root), **result}))
        return
    count = result["images"]
    click.echo(f"{spec.name} on {folder.root} ({count:,} images, {backend}): "
               f"top-1 {result['top1_hits']:,}/{count:,} = {result['top1_accuracy']:.3%}, "
               f"top-5 {result['top5_hits']:,}/{count:,} = {result['top5_accuracy']:.3%}")
    sys.stdout.flush()
