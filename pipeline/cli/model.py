"""``studios model init|info|list``: create and inspect model bundles."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli.main import command
from pipeline.core.errors import ConfigError


@command("model")
def _model_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("model", help="create or inspect model bundles")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="{init,info,list}")
    i = msub.add_parser("init", help="create a bundle with seeded random weights")
    i.add_argument("output", type=Path, help="bundle folder to create")
    i.add_argument("--classes", nargs="+", default=["background", "foreground"],
                   help="class names for labels 1..K (at least two), or a count N >= 2 for class_1..class_N")
    i.add_argument("--arch", default=None, help="architecture (see 'studios model list')")
    i.add_argument("--params", default="{}", help='architecture parameters as JSON, e.g. \'{"channels": 8}\'')
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(handler=_model_init)
    info = msub.add_parser("info", help="print a bundle's architecture, halo, classes and provenance")
    info.add_argument("bundle", type=Path)
    info.set_defaults(handler=_model_info)
    lst = msub.add_parser("list", help="list the registered architectures")
    lst.set_defaults(handler=_model_list)


def _model_init(args: argparse.Namespace) -> int:
    from pipeline.io.bundle import init_bundle, save_bundle
    from pipeline.models import DEFAULT_ARCH

    try:
        params = json.loads(args.params)
    except ValueError as exc:
        raise ConfigError(f"--params is not valid JSON ({exc}); e.g. '{{\"channels\": 8}}'") from None
    bundle = init_bundle(classes=class_names(args.classes), arch=args.arch or DEFAULT_ARCH, params=params,
                         seed=args.seed)
    save_bundle(bundle, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {bundle.arch}, halo {bundle.halo}, classes {', '.join(bundle.classes)}")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from pipeline.io.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    model = bundle.build()
    info = {**bundle.to_json(), "parameters": model.n_parameters(), "flops_per_voxel": model.flops_per_voxel(),
            "fingerprint": bundle.fingerprint}
    print(json.dumps(info, indent=2))
    return 0


def _model_list(args: argparse.Namespace) -> int:
    from pipeline.models import ARCHITECTURES

    for name, cls in sorted(ARCHITECTURES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:20s} {doc}")
    return 0


def class_names(given: Sequence[str]) -> tuple[str, ...]:
    """``--classes``: names (two or more), or one count N >= 2 meaning class_1..class_N."""
    if len(given) == 1 and given[0].strip().isdigit():
        n = int(given[0])
        if n < 2:
            raise ConfigError(f"--classes {n}: a segmentation model needs at least two classes; e.g. --classes 2")
        return tuple(f"class_{k}" for k in range(1, n + 1))
    if len(given) < 2:
        raise ConfigError(
            f"--classes {' '.join(given)}: one class given; --classes takes two or more names (label 1..K), "
            "e.g. --classes background fibre, or a count, e.g. --classes 3"
        )
    return tuple(given)
