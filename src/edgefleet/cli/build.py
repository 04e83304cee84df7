"""``edgefleet build``: compress a model under an accuracy gate, measure it, check device profiles, sign it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.errors import ConfigError, EdgefleetError


def build(
    model: Annotated[str | None, typer.Argument(help="ONNX file, or module:function returning (torch model, data)")]
    = None,
    *,
    key: Annotated[Path, typer.Option(help="signing.key")],
    out: Annotated[Path, typer.Option(help="bundle file to write")],
    name: Annotated[str | None, typer.Option(help="model name in the bundle (default: the model file's stem)")]
    = None,
    version: Annotated[str, typer.Option(help="semantic version")] = "1.0.0",
    data: Annotated[Path | None, typer.Option(help=".npz with calib_x, test_x, test_y [, sample_rate_hz, labels] "
                                              "(for an ONNX file): raw readings in the model's layout")] = None,
    dataset: Annotated[str | None, typer.Option(help="train a default model on a bundled dataset instead: "
                                                "BasicMotions, ItalyPowerDemand, GunPoint, ACSF1, digits")] = None,
    pipeline: Annotated[Path | None, typer.Option(help="pipeline YAML: input, output, labels, thresholds")] = None,
    labels: Annotated[str | None, typer.Option(help="class names in class order: a,b,c")] = None,
    threshold: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for the manifest (repeatable)")] = None,
    sample_rate: Annotated[float | None, typer.Option(help="time series: samples per second")] = None,
    window: Annotated[int | None, typer.Option(help="time series: samples per window")] = None,
    hop: Annotated[int | None, typer.Option(help="time series: samples between windows")] = None,
    recipe: Annotated[Path | None, typer.Option(help="recipe YAML (default: the built-in recipe)")] = None,
    profile: Annotated[list[str] | None, typer.Option(help="device profile to check (repeatable; default: all)")]
    = None,
    profiles_file: Annotated[Path | None, typer.Option(help="YAML with user device profiles")] = None,
    server: Annotated[str, typer.Option("--server", envvar="EDGEFLEET_SERVER", help="control plane whose devices' "
                                        "measured latency scales the profiles' latency (edgefleet device profiles)")]
    = "",
    token: Annotated[str, typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="operator token for --server")] = "",
    max_accuracy_drop: Annotated[float | None, typer.Option(help="percentage points (default 1.0)")] = None,
    report: Annotated[Path | None, typer.Option(help="write REPORT.json here (and a .png plot beside it)")] = None,
    plot: Annotated[Path | None, typer.Option(help="write the Pareto plot here (default: REPORT.png)")] = None,
    release: Annotated[int, typer.Option(help="monotonic release counter")] = 1,
    epochs: Annotated[int, typer.Option(min=1, help="training epochs with --dataset")] = 60,
    runtime: Annotated[str, typer.Option(help="runtime the bundle names: onnxruntime, openvino, litert (ships the "
                                               "TFLite export, int8 within the gate), or auto (the fastest "
                                               "measured one of every target profile)")] = "onnxruntime",
    factory: Annotated[str | None, typer.Option(help="module:function returning MODEL as a torch.nn.Module, for "
                                                "pruning, distillation and QAT on --data's train_x/train_y "
                                                "(default: MODEL converted from ONNX)")] = None,
) -> None:
    """Compress MODEL under an accuracy gate, report every candidate, and sign the chosen one as a bundle.

    When the data holds train_x/train_y, the search also prunes channels, distills and trains with quantization
    (the recipe's training section). The bundle's input pipeline and output interpretation are inferred from the
    model and the data file, then
    set by --pipeline and the flags; golden samples are the first calibration rows with the chosen model's
    outputs. Exits non-zero, writing no bundle, when no candidate keeps the accuracy drop within the gate.
    """
    from rich.console import Console

    from edgefleet.build.inputs import from_dataset, from_factory, from_onnx
    from edgefleet.build.io_pipeline import options_from_flags
    from edgefleet.build.pipeline import BuildOutcome
    from edgefleet.build.product import build_bundle
    from edgefleet.build.recipe import load_recipe
    from edgefleet.build.report import plot as draw
    from edgefleet.build.report import print_table, report_json, write_json
    from edgefleet.bundle.pack import write_bundle
    from edgefleet.bundle.signing import load_signing_key
    from edgefleet.core.profiles import BUILTIN_PROFILES, parse_profiles, resolve

    console = Console(stderr=True)
    check_name_version(name, version)
    signing_key = load_signing_key(key)  # fail on a bad key before minutes of work
    the_recipe = load_recipe(_read_text(recipe) if recipe else None)
    if max_accuracy_drop is not None:
        if max_accuracy_drop < 0:
            raise ConfigError("--max-accuracy-drop must be >= 0")
        the_recipe = the_recipe.model_copy(update={"max_accuracy_drop": max_accuracy_drop})
    user = parse_profiles(_read_text(profiles_file)) if profiles_file else {}
    profiles = resolve(profile or [*BUILTIN_PROFILES, *(n for n in user if n not in BUILTIN_PROFILES)], user)
    options = options_from_flags(pipeline, labels, threshold, sample_rate, window, hop)
    scaling = measured_scaling(server, token, [p.name for p in profiles], console.print) if server else {}

    if dataset is not None:
        if model is not None or data is not None:
            raise ConfigError("give either --dataset or MODEL (with --data), not both")
        inputs = from_dataset(dataset, options, epochs=epochs, seed=the_recipe.seed)
    elif model is None:
        raise ConfigError("give MODEL (an ONNX file with --data, or module:function) or --dataset NAME")
    elif not model.endswith(".onnx") and ":" in model and not Path(model).exists():
        if factory is not None:
            raise ConfigError("--factory goes with an ONNX MODEL; a module:function MODEL is the torch model already")
        inputs = from_factory(model, options)
    else:
        if data is None:
            raise ConfigError("an ONNX model needs --data DATA.npz with calib_x, test_x and test_y")
        inputs = from_onnx(Path(model), data, options, factory=factory)

    drawing = plot or (report.with_suffix(".png") if report is not None else None)

    def reported(outcome: BuildOutcome) -> None:  # also when nothing passes the gate
        print_table(outcome)
        if report is not None:
            write_json(report, report_json(outcome, name=name or inputs.name, version=version))
        if drawing is not None:
            draw(outcome, drawing)

    built = build_bundle(inputs, the_recipe, profiles, signing_key, name=name, version=version, release=release,
                         runtime=runtime, measured_scaling=scaling,
                         progress=lambda msg: console.print(f"[dim]{msg}[/dim]", highlight=False),
                         on_outcome=reported)
    write_bundle(out, built.bundle)
    typer.echo(f"{built.ref} ({built.chosen.label}) -> {out} ({len(built.bundle)} bytes); "
               f"fits: {', '.join(built.profiles) or 'none'}; runtime {built.runtime} ({built.runtime_reason})")


def measured_scaling(server: str, token: str, names: list[str], say: Callable[[str], object]) -> dict[str, float]:
    """Each profile's measured scaling (device latency / build-host latency) from the control plane, saying for
    each profile whether its latency will be measured or estimated; a server that cannot answer leaves every
    profile estimated (one line, the build goes on)."""
    from edgefleet.client import ControlPlane

    if not token:
        raise ConfigError("--server needs the operator token: --token or EDGEFLEET_TOKEN")
    found: dict[str, float] = {}
    client = ControlPlane(server, token)
    try:
        for name in names:
            answer = client.measured_profiles(name)
            if answer.get("scaling"):
                found[name] = float(answer["scaling"])
                say(f"profile {name}: latency measured on {answer['devices']} device(s): "
                    f"{found[name]:.3g}x the build host")
            else:
                say(f"profile {name}: no device measured it; latency estimated from MACs")
    except EdgefleetError as exc:
        say(f"measured profiles unavailable from {server} ({exc}); latency estimated from MACs")
        return {}
    finally:
        client.close()
    return found


def check_name_version(name: str | None, version: str) -> None:
    """Refuse a bundle name or version the manifest would refuse, before any work."""
    from edgefleet.bundle.manifest import NAME, SEMVER

    if name is not None and not NAME.match(name):
        raise ConfigError(f"--name {name!r}: lowercase letters, digits, '.', '_' or '-', at most 64, starting with "
                          "a letter or digit")
    if not SEMVER.match(version):
        raise ConfigError(f"--version {version!r} is not a semantic version such as 1.2.3")


def register(app: typer.Typer) -> None:
    """Add ``build`` to the edgefleet command."""
    app.command("build")(build)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
