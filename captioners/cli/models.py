"""``python -m captioners models | download | convert``: the models, their files, safe copies of .pt files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioners.cli.options import add_common
from captioners.display import display_path
from captioners.errors import CaptionerError


def cmd_models(args: argparse.Namespace) -> int:
    from captioners.paths import resolve_models_dir
    from captioners.registry import model_rows

    models_dir = resolve_models_dir(args.models_dir)
    rows = [row.to_dict() for row in model_rows(models_dir)]
    if args.json:
        print(json.dumps({"models_dir": str(models_dir), "models": rows}, indent=2))
        return 0
    print(f"models folder: {models_dir}")
    for row in rows:
        print(f"\n{row['id']}  [{row['family']}, {row['origin']}]  {'ready' if row['ready'] else 'missing files'}")
        print(f"    {row['description']}")
        for f in row["files"]:
            mark = "ok " if f["present"] else "-- "
            print(f"    {mark}{f['path']}" + ("" if f["present"] else f"\n         from {f['source']}"))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from captioners.paths import resolve_models_dir
    from captioners.registry import FAMILIES, get_spec
    from captioners.weights import ensure_assets

    models_dir = resolve_models_dir(args.models_dir)
    for model_id in args.models:
        spec = get_spec(model_id, models_dir)
        for path in ensure_assets(FAMILIES[spec.family].assets(spec), models_dir, model=model_id):
            print(f"{model_id}: {display_path(path)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from captioners.families.clipcap_modules import LEGACY_BUFFER
    from captioners.weights import deduplicate_shared, load_state_dict, save_safetensors

    for name in args.files:
        source = Path(name)
        if source.suffix == ".safetensors":
            raise CaptionerError(f"{source} is already a .safetensors file.")
        state = load_state_dict(source)
        state = {k: v for k, v in state.items() if not LEGACY_BUFFER.match(k)}
        target = source.with_suffix(".safetensors")
        save_safetensors(deduplicate_shared(state, drop=("gpt.lm_head.weight", "lm_head.weight")), target)
        print(f"{source} -> {target}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = "list model ids, where their files go and whether they are present"
    parser = sub.add_parser("models", help=text, description=text[0].upper() + text[1:] + ".")
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")
    add_common(parser)
    parser.set_defaults(func=cmd_models)

    text = "download every file of one or more models into the models folder (then they run offline)"
    parser = sub.add_parser("download", help=text, description=text[0].upper() + text[1:] + ".")
    parser.add_argument("models", nargs="+", metavar="MODEL_ID", help="model ids, as the models command lists them")
    add_common(parser)
    parser.set_defaults(func=cmd_download)

    text = "convert .pt checkpoints to .safetensors beside them (read safely; the copy is used from then on)"
    parser = sub.add_parser("convert", help=text, description=text[0].upper() + text[1:] + ".")
    parser.add_argument("files", nargs="+", metavar="FILE.pt", help="checkpoints to convert")
    add_common(parser)
    parser.set_defaults(func=cmd_convert)


