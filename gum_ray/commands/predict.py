"""``gum predict INPUT OUTPUT --checkpoint CKPT``: GUM exports -> probability + class COGs."""

from __future__ import annotations

import argparse
import sys

from gum_ray.errors import InputError


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that runs the network."""
    from gum_ray.inference import DEFAULT_STRIDE

    g = p.add_argument_group("inference")
    g.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                   help=f"crop stride in px (crops are always 256; default {DEFAULT_STRIDE}, "
                        "256 = no overlap as in the seed notebook)")
    g.add_argument("--window", choices=("hann", "none"), default="hann",
                   help="weights for blending overlapping crops (default hann)")
    g.add_argument("--merge", choices=("probability", "logits"), default="probability",
                   help="blend softmax probabilities (default) or average logits as mmseg does")
    g.add_argument("--seed-settings", action="store_true",
                   help="reproduce the seed notebook (GUM 2.0: the authors' mapping notebook): stride 256, "
                        "no window, logits averaged, fp32, batch 1, the notebook's preprocessing")
    g.add_argument("--batch-size", type=int, default=None,
                   help="crops per forward pass (default per device: 1 on a CPU, 32 on a GPU; "
                        "1 with --seed-settings, as the notebook)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto = bf16 where the device has it (fp16 on older GPUs), else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory layout: auto = channels_last with BatchNorm folded into the convs "
                        "(faster), except at --seed-settings (NCHW, class-exact with mmseg)")
    g.add_argument("--winograd", choices=("auto", "on", "off"), default="auto",
                   help="fp32 on a CPU: the deep 3 x 3 convolutions by Winograd (4 x 4 or 2 x 2 output "
                        "tiles), about 1.3x faster on an AVX2 CPU; auto = on where BatchNorm is folded "
                        "(not at --seed-settings)")


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """``--model gum1|gum2``: force the model family (default: read from the checkpoint)."""
    p.add_argument("--model", choices=("gum1", "gum2"), default=None,
                   help="model family of the checkpoint: gum1 (GUM, mmseg UNet) or gum2 (GUM 2.0, "
                        "three encoders); default: read from the checkpoint itself")


def settings_from_args(args: argparse.Namespace):
    from gum_ray.inference import InferenceSettings

    tri = {"auto": None, "on": True, "off": False}
    layout = tri[args.channels_last]
    common = dict(device=args.device, compile=args.compile)
    if tri[args.winograd] is not None:
        common["winograd"] = tri[args.winograd]
    if args.batch_size is not None:
        common["batch_size"] = args.batch_size
    if args.seed_settings:
        return InferenceSettings.seed(**common, **({} if layout is None else {"channels_last": layout}))
    common["channels_last"] = layout
    return InferenceSettings(stride=args.stride, window=args.window, merge=args.merge,
                             precision=args.precision, **common)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="predict GUM export GeoTIFFs into probability/class COGs",
        description="Predict urban areas in GUM export GeoTIFFs (11 or 14 float bands). Writes a "
        "Cloud-Optimized GeoTIFF per input: band 1 = P(urban) percent 0-100, band 2 = class 0/1, "
        "255 = no data.",
    )
    p.add_argument("input", help="a GUM export GeoTIFF, or a folder of them")
    p.add_argument("output", help="output .tif (for one input) or folder (<name>_gum.tif each)")
    p.add_argument("--checkpoint", required=True,
                   help="GUM checkpoint (.pth): GUM 1 (mmseg format) or GUM 2.0 (e.g. GUM_2p0.pth)")
    add_model_argument(p)
    p.add_argument("--products", choices=("auto", "yes", "no"), default="auto",
                   help="use the 3 built-up product bands: auto follows the checkpoint (13 channels "
                        "= yes); 'yes' insists on a 13-channel checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_inference_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gum_ray.commands import flagify
    from gum_ray.errors import CheckpointError
    from gum_ray.inference import InferenceEngine
    from gum_ray.network import load_model, needs_products
    from gum_ray.predict import plan_outputs, predict_file

    pairs = plan_outputs(args.input, args.output)
    settings = settings_from_args(args)
    from gum_ray.store.checkpoints import local_checkpoint

    model = load_model(local_checkpoint(args.checkpoint), family=args.model)  # a gs:// one: fetched, cached
    if args.products == "yes" and model.family == "gum2":
        raise InputError(
            f"--products yes: checkpoint {args.checkpoint} is GUM 2.0, which has no 'with products' "
            "variant (its terrain encoder takes slope and aspect only); drop --products yes, the "
            "product bands of a 14-band export are then ignored"
        )
    if args.products == "yes" and not needs_products(model):
        raise InputError(
            f"--products yes: checkpoint {args.checkpoint} is a 10-channel model; give the "
            "13-channel 'with products' checkpoint"
        )
    if args.products == "no" and needs_products(model):
        raise InputError(
            f"--products no: checkpoint {args.checkpoint} is the 13-channel 'with products' model "
            "and needs the product bands; give the 10-channel checkpoint"
        )
    engine = InferenceEngine(model, settings)
    del model  # the engine holds what it runs (a folded copy at the defaults): the loaded weights can go
    show = not args.quiet and sys.stderr.isatty()
    done = skipped = 0
    failed: list[str] = []
    files_bar = tqdm(total=len(pairs), unit="file", disable=not show or len(pairs) < 2, position=0)
    for inp, out in pairs:
        crops_bar = None

        def on_start(total: int, _inp=inp) -> None:
            nonlocal crops_bar
            crops_bar = tqdm(total=total, unit="crop", desc=_inp.name, leave=False,
                             disable=not show, position=1 if len(pairs) > 1 else 0)

        try:
            result = predict_file(
                engine, inp, out, overwrite=args.overwrite,
                progress=lambda n: crops_bar.update(n) if crops_bar else None,
                on_start=on_start,
            )
        except (InputError, CheckpointError) as exc:
            if len(pairs) == 1:
                raise
            # one bad file in a folder: report it, keep going, fail at the end
            failed.append(str(inp))
            print(f"gum: error: {flagify(exc)}", file=sys.stderr)
            files_bar.update(1)
            continue
        finally:
            if crops_bar is not None:
                crops_bar.close()
        files_bar.update(1)
        if result.skipped:
            skipped += 1
            print(f"skipped {out} (exists; --overwrite to replace)", file=sys.stderr)
        else:
            done += 1
            rate = result.pixels / max(result.seconds, 1e-9) / 1e6
            print(f"wrote {out} ({result.pixels / 1e6:.2f} Mpx in {result.seconds:.1f} s, "
                  f"{rate:.3f} Mpx/s)", file=sys.stderr)
    files_bar.close()
    print(f"gum predict: {done} written, {skipped} skipped"
          + (f", {len(failed)} failed" if failed else ""), file=sys.stderr)
    return 2 if failed else 0
