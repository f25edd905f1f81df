"""The ``asqpost`` command line: train | eval | compare | demo | export | run.

Every command is a thin layer over the library; errors the user can fix are printed as one line
(``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .beta_report import DEFAULT_GAINS, write_beta_report
from .compare import DEFAULT_METHODS, markdown_table
from .config import recipe_names
from .data import DATA_HOME_ENV, DATASETS, SHIFTS, DataNotFoundError
from .devices import DEVICE_NAMES
from .quantizers import NotCalibratedError
from .text import MissingExtraError
from .train.engine import TrainingDivergedError
from .train.results import Accuracy, Agreement, TextMetrics
from .version import __version__

if TYPE_CHECKING:
    from .demo import Deployment
    from .export import LayerKernel
    from .runconfig import RunConfig

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotCalibratedError,
    TrainingDivergedError,
    DataNotFoundError,
    MissingExtraError,
)


def config_path(name: str | None) -> Path | None:
    """A config file path, or the name of a packaged recipe (``demo``, ``fashion-resnet20-qat``...)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{name}.yaml"
    if packaged.is_file():
        return packaged
    recipes = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
    raise FileNotFoundError(f"config {name!r} is neither a file nor a packaged recipe ({', '.join(recipes)})")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML file or packaged recipe name (see configs/)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable; dotted keys reach into quant: quant.bits=2)",
    )
    p.add_argument("--device", help=f"{DEVICE_NAMES}: the same as --set device=...")
    p.set_defaults(data_root_flag="--set data_root=DIR")  # named in the hint after a missing-dataset error


def _run_config(args: argparse.Namespace, **defaults: Any):
    from .runconfig import load_run_config

    device = getattr(args, "device", None)  # namespaces built without the flag (tests) have none
    sets = args.sets + ([f"device={device}"] if device else [])
    return load_run_config(config_path(args.config), sets, **defaults)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.run import fit

    config = _run_config(args)
    out = Path(args.out)
    result = fit(config, out, resume=args.resume)
    metrics = result.metrics
    if metrics is None:
        print(f"stopped after epoch {result.stopped_after_epoch}; continue with: asqpost train ... --resume")
    elif isinstance(metrics, TextMetrics):
        print(
            f"held-out cosine to the float model: mean {metrics.test_cos_mean:.4f}  min {metrics.test_cos_min:.4f}"
            f"  size {metrics.size_bytes / 2**20:.1f} MiB  ->  {out / 'checkpoint.pt'}"
        )
    else:
        print(
            f"test accuracy {metrics.test_acc * 100:.2f}%  shifted {metrics.shift_acc * 100:.2f}%  "
            f"size {metrics.size_bytes / 1024:.1f} KiB  ->  {out / 'checkpoint.pt'}"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.evaluation import beta_report_checkpoint, evaluate_checkpoint

    if args.gains is not None and args.beta_report is None:
        raise ValueError("--gains sets the gains of --beta-report OUT_DIR; pass both")
    report = None
    if args.beta_report is not None:  # before the accuracy: a model without ASQ layers fails fast
        gains = args.gains or DEFAULT_GAINS
        report = beta_report_checkpoint(
            args.checkpoint, args.data, args.data_root, args.split, args.shift, gains, device=args.device
        )
    result = evaluate_checkpoint(
        args.checkpoint, args.data, args.data_root, args.split, args.shift, device=args.device, subset=args.subset
    )
    extra = {}
    if report is not None:
        paths = write_beta_report(report, args.beta_report)
        extra["beta"] = report.to_dict()
    _print_accuracy(args, result, "", extra)
    if report is not None and not args.json:
        print(f"\n{report.markdown()}\n\nwritten: {', '.join(map(str, paths))}")
    return 0


def _print_accuracy(
    args: argparse.Namespace, result: Accuracy | Agreement, what: str, extra: dict[str, Any] | None = None
) -> None:
    """The result as one line, or with ``--json`` as JSON (with ``extra``: the beta report, the kernels)."""
    if args.json:
        print(json.dumps({**result.to_dict(), **(extra or {})}))
        return
    if isinstance(result, Agreement):
        print(
            f"{args.data}/{args.split}: cosine to the float model mean {result.cos_mean:.4f} "
            f"min {result.cos_min:.4f} over {result.samples} texts{what}"
        )
        return
    shifted = f" ({args.shift}-shifted)" if args.shift else ""
    print(
        f"{args.data}/{args.split}{shifted}: accuracy {result.accuracy * 100:.2f}% over {result.samples} samples{what}"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_grid

    base = _run_config(args)
    records = run_grid(
        base, args.init, args.out, tuple(args.methods), tuple(args.bits), tuple(args.seeds), beta=args.beta
    )
    print(markdown_table(records))
    print(f"\nwritten: {Path(args.out) / 'results.md'}, {Path(args.out) / 'accuracy.png'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Float training on real data, QAT (LSQ and ASQ + POST at 4 and 2 bits), the table, then the exported
    4-bit model run from its file: accuracy, file size and latency against float.

    The data is the config's ``data``: the packaged demo recipe's ``mnist5k`` (shipped with a dependency, so
    every install runs the same demo) unless ``--set data=NAME`` (and ``--set data_root=DIR``) say otherwise.
    """
    from .data import describe_dataset
    from .demo import run_demo

    base = _run_config(argparse.Namespace(config=args.config or "demo", sets=args.sets))
    out = Path(args.out)
    _check_reusable(out / "float", base)
    print(f"data: {base.data}: {describe_dataset(base.data)}")
    result = run_demo(base, out, on_step=lambda line: print(line, flush=True))
    print(f"\n{base.model} on {base.data}, test split, one seed\n")
    print(markdown_table(result.records, shifted=False))
    print(
        "\none seed on 1000 test images: accuracies move by about a point between CPUs, so smaller gaps are noise; "
        "`asqpost compare --seeds 0 1 2` compares with seeds"
    )
    print(f"results: {out / 'compare' / 'results.md'} (with the shifted accuracies, which one seed cannot back)")
    _print_deployment(result.deployment)
    return 0


def _print_deployment(d: Deployment) -> None:
    same = "equal to" if d.packed_accuracy == d.fake_quant_accuracy else "against"
    print(
        f"\nexported: {d.path}: {d.file_bytes / 1024:.1f} KiB, {d.float_bytes / d.file_bytes:.1f}x smaller than the "
        f"float model's {d.float_bytes / 1024:.1f} KiB of float32 weights"
    )
    print(
        f"run from the file: test accuracy {d.packed_accuracy * 100:.2f}%, {same} its fake-quant model's "
        f"{d.fake_quant_accuracy * 100:.2f}%; the same class on {d.agreement * 100:.2f}% of {d.samples} images"
    )
    print(f"kernels: {d.kernels}")
    print(f"latency on {d.machine}:\n")
    print("| batch | float (ms) | packed 4-bit (ms) | packed / float |\n|---|---|---|---|")
    for row in d.latency:
        print(f"| {row.batch} | {row.float_ms:.2f} | {row.packed_ms:.2f} | {row.packed_ms / row.float_ms:.2f}x |")


def _check_reusable(run_dir: Path, config: RunConfig) -> None:
    """A rerun reuses finished steps only when they were made with the same config (data, model, budget)."""
    import yaml

    saved = run_dir / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != config.to_dict():
        raise ValueError(f"{run_dir} holds a run made with another config; pass another --out or remove it")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import convert_to_packed, save_packed, to_onnx
    from .train.checkpoint import build_from_checkpoint, load_checkpoint

    fmt = _export_format(args.out, args.format)
    payload = load_checkpoint(args.checkpoint)
    if payload["qat"] is None:
        raise ValueError(f"{args.checkpoint} is a float checkpoint; export a QAT checkpoint (asqpost train with quant)")
    packed = convert_to_packed(build_from_checkpoint(payload), single_sum=args.single_sum)
    spec, normalizer = payload["model"], payload.get("normalizer")
    if fmt == "onnx":
        info = to_onnx(packed, args.out, _example_inputs(spec), model_spec=spec, normalizer=normalizer)
        size = info.size_bytes
        layers = f"{info.integer_layers} layers on integers, {info.float_layers} on float weights"
        print(f"{args.out}: ONNX, inputs {', '.join(info.inputs)}; {layers}")
    else:
        size = save_packed(packed, args.out, spec, normalizer)
    ckpt_size = Path(args.checkpoint).stat().st_size
    print(f"{args.out}: {size / 1024:.1f} KiB ({ckpt_size / size:.1f}x smaller than the checkpoint)")
    return 0


def _export_format(out: str, fmt: str | None) -> str:
    """``--format``, else the output's extension: ``.onnx`` is ONNX, anything else safetensors."""
    if fmt is not None:
        return fmt
    return "onnx" if Path(out).suffix.lower() == ".onnx" else "safetensors"


def _example_inputs(spec: dict | None) -> Any:
    """What the ONNX trace feeds the model: a padded pair of tokenized sentences for a text model, two random
    images of the dataset's shape otherwise."""
    import torch

    from .text import is_text_spec, load_tokenizer

    if is_text_spec(spec):
        texts = ["An example sentence.", "A second, longer example sentence."]
        return dict(load_tokenizer(spec)(texts, padding=True, return_tensors="pt"))
    if not spec or "input_shape" not in spec:
        raise ValueError("the checkpoint records no input shape; export it from Python with asqpost.export.to_onnx")
    return torch.randn(2, *spec["input_shape"], generator=torch.Generator().manual_seed(0))


def cmd_run(args: argparse.Namespace) -> int:
    from .export import format_kernel_report
    from .train.evaluation import evaluate_export

    onnx_file = Path(args.export).suffix.lower() == ".onnx"
    if args.kernels and onnx_file:
        raise ValueError("--kernels reports a safetensors export's packed layers; an ONNX file runs in ONNX Runtime")
    report = _kernel_report(args.export, args.device) if args.kernels else None
    if report is not None and not args.json:
        print(format_kernel_report(report) + "\n")
    result = evaluate_export(
        args.export, args.data, args.data_root, args.split, args.shift, device=args.device, subset=args.subset
    )
    extra = {} if report is None else {"kernels": [dataclasses.asdict(entry) for entry in report]}
    _print_accuracy(args, result, " (ONNX Runtime)" if onnx_file else " (packed model)", extra)
    return 0


def _kernel_report(export: str, device: str) -> list[LayerKernel]:
    """The packed model's per-layer kernel plan on ``device`` (the model is loaded once more for it)."""
    from .devices import resolve_device
    from .export import kernel_report, load_packed

    return kernel_report(load_packed(export).to(resolve_device(device)))


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=f"dataset name: {', '.join(sorted(DATASETS))}")
    p.add_argument("--data-root", help="folder with the dataset's files")
    p.set_defaults(data_root_flag="--data-root DIR")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "--shift",
        nargs="?",
        const="gain",
        choices=sorted(SHIFTS),
        help="evaluate under a per-image shift: gain (the default: a random gain 0.25x..4x plus offset) or noise "
        "(Gaussian, std 0.05..0.3 per image)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--subset", type=int, metavar="N", help="a fixed random subset of N samples (a run's test_subset: the same)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asqpost", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"asqpost {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a float model, or QAT from a float checkpoint (quant + init)",
        description="Train as the config says; a checkpoint is written atomically every epoch.",
    )
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.csv, config.yaml...)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly where it stopped")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a checkpoint on a dataset split (optionally shifted)")
    p.add_argument("checkpoint")
    _add_eval_args(p)
    p.add_argument(
        "--beta-report",
        metavar="OUT_DIR",
        help="also report each ASQ layer's beta over the data and its response to input gain "
        "(OUT_DIR/beta.json, beta.md, beta.png; the tables are printed)",
    )
    p.add_argument(
        "--gains",
        nargs="+",
        type=float,
        metavar="G",
        help=f"input gains of --beta-report (raw image times G before normalisation; default {DEFAULT_GAINS})",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compare",
        help="grid of methods x bits x seeds from one float checkpoint",
        description="Each cell gets the same QAT budget; finished cells are reused on rerun.",
    )
    _add_config_args(p)
    p.add_argument("--init", required=True, help="float checkpoint every cell starts from")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"'float' and/or <weight>-<act> recipes: {', '.join(recipe_names())}",
    )
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument(
        "--beta",
        action="store_true",
        help="also write each ASQ cell's beta report (cells/<cell>/beta.*) and add the mean over its layers of "
        "beta(4x)/beta(1x) and beta(0.25x)/beta(1x) to results.md / results.json",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the main job: float training, then QAT with LSQ and ASQ + POST, then a table")
    _add_config_args(p)
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "export", help="pack a QAT checkpoint: b-bit codes + LUT + scales (safetensors + JSON), or an ONNX graph"
    )
    p.add_argument("checkpoint")
    p.add_argument("out", help="output file: .safetensors, or .onnx (integer ONNX graph for ONNX Runtime)")
    p.add_argument(
        "--format", choices=["safetensors", "onnx"], help="the output format (default: from the file's extension)"
    )
    p.add_argument(
        "--single-sum",
        action="store_true",
        help="round POST weight levels onto an int8 grid: one integer sum per weight instead of two (faster, "
        "approximate: levels move by up to 0.4%% of the largest; other grids stay exact)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="evaluate an exported model on a dataset split (a .onnx file runs in ONNX Runtime)")
    p.add_argument("export")
    _add_eval_args(p)
    p.add_argument(
        "--kernels", action="store_true", help="also print each packed layer's kernel path and why (JSON: 'kernels')"
    )
    p.set_defaults(func=cmd_run)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch's checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, DataNotFoundError):
            print(f"hint: asqpost {args.command} takes data_root as {args.data_root_flag}", file=sys.stderr)
            print(f"hint: or put the files in ${DATA_HOME_ENV}/<dataset name>/", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
