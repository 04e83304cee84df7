"""``edgefleet device ...``, ``edgefleet model ...`` and ``edgefleet rollout ...``: the operator CLI over the
REST API. The server and the operator token come from ``--server``/``--token`` or ``EDGEFLEET_SERVER`` /
``EDGEFLEET_TOKEN``; ``--json`` prints the API's answer as JSON. Over https the server is verified against
``--ca FILE`` (device commands) or ``EDGEFLEET_CA`` (every command): a ``--tls`` server's DATA_DIR/pki/ca.pem."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.errors import ConfigError

device_app = typer.Typer(no_args_is_help=True, help="Provision, list, show and revoke devices.")
model_app = typer.Typer(no_args_is_help=True, help="Push signed bundles and list model versions.")
rollout_app = typer.Typer(no_args_is_help=True, help="Staged rollouts gated on model behaviour.")

Server = Annotated[str, typer.Option("--server", envvar="EDGEFLEET_SERVER", help="control plane URL")]
Token = Annotated[str, typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="operator token")]
Json = Annotated[bool, typer.Option("--json", help="print the API's JSON answer")]
Ca = Annotated[Path | None, typer.Option("--ca", envvar="EDGEFLEET_CA", show_default=False,
                                         help="CA file to verify an https server with (its DATA_DIR/pki/ca.pem)")]


@contextmanager
def _api(server: str, token: str, ca: Path | None = None) -> Iterator[Any]:
    from edgefleet.client import ControlPlane

    if not server or not token:
        raise ConfigError("give the server and operator token: --server/--token or EDGEFLEET_SERVER/EDGEFLEET_TOKEN")
    client = ControlPlane(server, token, ca=ca)
    try:
        yield client
    finally:
        client.close()


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for value in values or []:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} must be KEY=VALUE, not {value!r}")
        out[key] = val
    return out


def _emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


# -- devices -------------------------------------------------------------------------------------------------
@device_app.command("add")
def device_add(device_id: Annotated[str, typer.Argument(help="device id")],
               out: Annotated[Path, typer.Option(help="credentials JSON to write (for edgefleet agent)")],
               server: Server = "", token: Token = "",
               tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE (repeatable)")] = None,
               profile: Annotated[str | None, typer.Option(help="device profile name")] = None,
               hardware: Annotated[str | None, typer.Option(
                   help="hardware id (default generic): bundles packed for other hardware skip it")] = None,
               as_json: Json = False, ca: Ca = None) -> None:
    """Provision a device and write its credentials file (mode 0600); from a --tls server it holds the device's
    certificate and key and the fleet CA."""
    from edgefleet.storage import atomic_write

    with _api(server, token, ca) as api:
        creds = api.add_device(device_id, _pairs(tag, "--tag"), profile, hardware)
    atomic_write(out, json.dumps(creds, indent=2).encode(), mode=0o600)
    public = {k: v for k, v in creds.items() if k not in _SECRETS}
    _emit({**public, "credentials_file": str(out)}, as_json, f"device {device_id} provisioned: {out}")


_SECRETS = ("mqtt_password", "token", "client_key", "client_cert", "ca_cert")


@device_app.command("renew")
def device_renew(device_id: Annotated[str, typer.Argument(help="device id")],
                 credentials: Annotated[Path, typer.Option(help="the device's credentials file, updated in place")],
                 revoke_previous: Annotated[bool, typer.Option(
                     help="revoke the certificates issued before (a leaked key); else they stay valid until they "
                          "expire")] = False,
                 server: Server = "", token: Token = "", as_json: Json = False, ca: Ca = None) -> None:
    """Issue the device a new certificate (--tls servers) and write it into its credentials file."""
    from edgefleet.storage import atomic_write

    try:
        creds = json.loads(credentials.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the credentials {credentials}: {exc}") from exc
    if not isinstance(creds, dict) or creds.get("device_id") != device_id:
        raise ConfigError(f"{credentials} are not the credentials of device {device_id}")
    with _api(server, token, ca) as api:
        renewed = api.renew_certificate(device_id, revoke_previous=revoke_previous)
    creds.update({k: v for k, v in renewed.items() if k != "device_id"})
    atomic_write(credentials, json.dumps(creds, indent=2).encode(), mode=0o600)
    public = {k: v for k, v in renewed.items() if k not in _SECRETS}
    _emit({**public, "credentials_file": str(credentials)}, as_json,
          f"device {device_id}: new certificate {renewed['cert_serial']} written to {credentials}")


@device_app.command("list")
def device_list(server: Server = "", token: Token = "", as_json: Json = False, ca: Ca = None,
                twins: Annotated[bool, typer.Option("--twins", help="also list digital twins (tag twin)")] = False
                ) -> None:
    """Every device, its tags, what it should run and what it reported (digital twins only with --twins)."""
    with _api(server, token, ca) as api:
        devices = [d for d in api.devices() if twins or "twin" not in d["tags"]]
    lines = [f"{d['id']:<24} {'REVOKED' if d['revoked'] else (d.get('desired') or '-'):<20} "
             f"{((d.get('reported') or {}).get('active') or '-'):<20} "
             f"{','.join(f'{k}={v}' for k, v in sorted(d['tags'].items()))}" for d in devices]
    _emit(devices, as_json, "\n".join([f"{'DEVICE':<24} {'DESIRED':<20} {'ACTIVE':<20} TAGS", *lines]))


@device_app.command("show")
def device_show(device_id: str, server: Server = "", token: Token = "", as_json: Json = False,
                ca: Ca = None) -> None:
    """One device in detail."""
    with _api(server, token, ca) as api:
        device = api.device(device_id)
    _emit(device, as_json, json.dumps(device, indent=2, sort_keys=True))


@device_app.command("profiles")
def device_profiles(profile: Annotated[str | None, typer.Option(help="one device profile (default: every one)")]
                    = None, server: Server = "", token: Token = "", as_json: Json = False, ca: Ca = None) -> None:
    """Measured device profiles: what the devices of each profile reported (CPU, cores, memory, runtimes) and
    each model's latency on them against the build host's (the scaling `edgefleet build --profile` uses)."""
    with _api(server, token, ca) as api:
        answer = api.measured_profiles(profile)
    profiles = [answer] if profile else answer
    lines = []
    for p in profiles:
        scaling = "-" if p["scaling"] is None else f"{p['scaling']:.3g}x the build host"
        lines.append(f"{p['profile']}: {p['devices']} device(s), measured scaling {scaling}")
        lines += [f"  {f.get('cpu', '?')} ({f.get('machine', '?')}, {f.get('cores', '?')} cores, "
                  f"{f.get('memory_mb', '?')} MB; {', '.join(f'{k} {v}' for k, v in f.get('runtimes', {}).items())})"
                  f" x{f['devices']}" for f in p["facts"]]
        lines += [f"  {m['model']}: device p50 {m['device_p50_ms'] or '-'} ms, host {m['host_b1_ms'] or '-'} ms "
                  f"({m['windows']} windows on {m['devices']} device(s))" for m in p["models"]]
    _emit(answer, as_json, "\n".join(lines) or "no devices")


@device_app.command("revoke")
def device_revoke(device_id: str, server: Server = "", token: Token = "", as_json: Json = False,
                  ca: Ca = None) -> None:
    """Revoke a device: its token, broker login and certificates stop working (open connections too)."""
    with _api(server, token, ca) as api:
        device = api.revoke_device(device_id)
    _emit(device, as_json, f"device {device_id} revoked")


@device_app.command("telemetry")
def device_telemetry(device_id: Annotated[str, typer.Argument(help="device id")], server: Server = "",
                     token: Token = "", as_json: Json = False) -> None:
    """The device's stored telemetry summed per model version: windows, labelled, correct, accuracy, latency."""
    with _api(server, token) as api:
        answer = api.telemetry(device_id)
    summary = telemetry_summary(answer)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"telemetry of {summary['device']}: {answer['batches']} batch(es), "
                        f"{answer['gaps']} sequence gap(s)")
    for column in ("model", "windows", "labelled", "correct", "accuracy", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for ref, m in summary["models"].items():
        table.add_row(ref, str(m["windows"]), str(m["labelled"]), str(m["correct"]),
                      "-" if m["accuracy"] is None else f"{m['accuracy']:.1%}",
                      *("-" if v is None else f"{v:.3g}" for v in (m["latency_ms"]["p50"], m["latency_ms"]["p99"])))
    Console(soft_wrap=True).print(table if summary["models"] else f"no telemetry from {summary['device']} yet")


def telemetry_summary(answer: dict[str, Any]) -> dict[str, Any]:
    """``GET /api/v1/devices/{id}/telemetry`` keyed by NAME@VERSION, with only what ``device telemetry`` shows:
    windows, labelled, correct, accuracy (null when nothing was labelled) and latency p50/p99 in ms."""
    return {"device": answer["device"], "models": {m["model"]: {
        "windows": m["windows"], "labelled": m["labelled"], "correct": m["correct"], "accuracy": m["accuracy"],
        "latency_ms": {"p50": m["latency_ms"]["p50"], "p99": m["latency_ms"]["p99"]}} for m in answer["models"]}}


# -- models --------------------------------------------------------------------------------------------------
@model_app.command("push")
def model_push(bundle: Annotated[Path, typer.Argument(help="signed bundle file")], server: Server = "",
               token: Token = "", as_json: Json = False,
               model_key: Annotated[Path | None, typer.Option(
                   "--model-key", help="an encrypted bundle's model key file (keys model-key): the server checks it, "
                   "keeps it sealed and sends it to each device wrapped for that device")] = None) -> None:
    """Upload a signed bundle; the server verifies it before registering it."""
    from edgefleet.cli.bundle import read_file

    key = None
    if model_key is not None:
        from edgefleet.bundle.encrypt import load_model_key

        key = load_model_key(model_key).to_text()
    with _api(server, token) as api:
        model = api.push_model(read_file(bundle), key)
    _emit(model, as_json, f"{model['name']}@{model['version']} release {model['release']} ({model['sha256'][:12]})")


@model_app.command("list")
def model_list(server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Registered model versions."""
    with _api(server, token) as api:
        models = api.models()
    lines = [f"{m['name']}@{m['version']:<12} release {m['release']:<4} {m['sha256'][:12]} {m['size']} B"
             for m in models]
    _emit(models, as_json, "\n".join(lines) or "no models")


@model_app.command("report")
def model_report(model: Annotated[str, typer.Argument(help="NAME@VERSION")],
                 report: Annotated[Path, typer.Argument(help="REPORT.json written by edgefleet build --report")],
                 server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Attach a build report to a model version: the dashboard shows its candidates and Pareto plot."""
    if "@" not in model:
        raise ConfigError(f"{model!r}: give the model as NAME@VERSION")
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the build report {report}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{report} is not a build report (a JSON object)")
    with _api(server, token) as api:
        stored = api.put_report(model, data)
    _emit(stored, as_json, f"{stored['model']}: build report with {stored['candidates']} candidates "
                           f"(chosen: {stored['chosen'] or 'none'})")


# -- rollouts ------------------------------------------------------------------------------------------------
ROLLOUT_MODES = ("canary", "shadow", "ab")
Window = Annotated[float, typer.Option(help="observation window per wave, seconds")]
InstallTimeout = Annotated[float, typer.Option(help="seconds to install a wave")]
UnknownTimeout = Annotated[float, typer.Option(help="seconds a gate may lack data after the window, then pause")]
InconclusiveTimeout = Annotated[float, typer.Option(
    help="seconds a gate may stay inconclusive after the window, then --on-inconclusive")]
OnInconclusive = Annotated[str, typer.Option(help="pause, abort or proceed when still inconclusive")]
Baseline = Annotated[float, typer.Option(help="canary: seconds of the targets' history in the baseline")]
MinWindows = Annotated[int, typer.Option(help="windows each cohort needs before a gate may decide")]
Confidence = Annotated[float, typer.Option(help="two-sided confidence a gate decision needs (0.5 to 1)")]
Gates = Annotated[list[str] | None, typer.Option("--gate", help="abort when true (repeatable)")]
PauseGates = Annotated[list[str] | None, typer.Option("--pause-gate", help="pause when true (repeatable)")]


def _gates(gate: list[str] | None, pause_gate: list[str] | None) -> list[Any]:
    return [{"expr": g, "action": "abort"} for g in gate or []] + [{"expr": g, "action": "pause"}
                                                                  for g in pause_gate or []]


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _rollback_order(path: Path) -> str:
    """A rollback order file's bytes in base64, as the API takes them (the server verifies them)."""
    import base64

    from edgefleet.cli.bundle import read_file

    return base64.b64encode(read_file(path)).decode()


@rollout_app.command("create")
def rollout_create(model: Annotated[str, typer.Argument(help="candidate NAME@VERSION")],
                   select: Annotated[list[str] | None, typer.Option(help="KEY=VALUE tag (repeatable)")] = None,
                   waves: Annotated[str, typer.Option(help="cumulative waves: 10%,50%,100% or 1,10,100%")] = "100%",
                   gate: Gates = None, pause_gate: PauseGates = None,
                   mode: Annotated[str, typer.Option(help="canary, shadow or ab")] = "canary",
                   window: Window = 60.0, install_timeout: InstallTimeout = 300.0,
                   unknown_timeout: UnknownTimeout = 600.0, inconclusive_timeout: InconclusiveTimeout = 600.0,
                   on_inconclusive: OnInconclusive = "pause", baseline: Baseline = 3600.0,
                   min_windows: MinWindows = 10, confidence: Confidence = 0.95,
                   profile: Annotated[str | None, typer.Option(help="only devices of this profile")] = None,
                   rollback: Annotated[Path | None, typer.Option(
                       help="a signed rollback order (bundle rollback-order): send the fleet back to this older "
                            "release")] = None,
                   rehearse: Annotated[int, typer.Option(
                       min=0, help="first run the same rollout on N twins of the selected devices (their profiles "
                                   "and recent inputs); a rehearsal that trips a gate stops here")] = 0,
                   rehearse_scenario: Annotated[Path | None, typer.Option(
                       help="the twins' data, rate and telemetry period (a twin scenario; default: synthetic rows)")
                   ] = None,
                   rehearse_warmup: Annotated[float, typer.Option(
                       help="seconds the twins run their device's model before the rehearsal (its baseline)")] = 10.0,
                   rehearse_timeout: Annotated[float, typer.Option(help="seconds the rehearsal may take")] = 600.0,
                   force: Annotated[bool, typer.Option(
                       "--force", help="create the rollout even when its rehearsal trips")] = False,
                   server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Start a staged rollout; each wave must pass its gates before the next one. A release older than the one
    its devices run needs --rollback ORDER_FILE. With --rehearse N it first runs on N twins (edgefleet twin)."""
    _choice(mode, ROLLOUT_MODES, "--mode")
    _choice(on_inconclusive, ("pause", "abort", "proceed"), "--on-inconclusive")
    order = _rollback_order(rollback) if rollback is not None else None
    options: dict[str, Any] = dict(
        waves=[w.strip() for w in waves.split(",")], gates=_gates(gate, pause_gate),
        select=_pairs(select, "--select"), mode=mode, window_s=window, install_timeout_s=install_timeout,
        unknown_timeout_s=unknown_timeout, inconclusive_timeout_s=inconclusive_timeout,
        on_inconclusive=on_inconclusive, baseline_s=baseline, min_windows=min_windows, confidence=confidence,
        profile=profile, rollback_order=order)
    with _api(server, token) as api:
        rehearsal = _rehearse(api, model, options, rehearse, rehearse_scenario, rehearse_warmup, rehearse_timeout,
                              force, as_json) if rehearse else None
        rollout = api.create_rollout(model, **options)
    skipped = "".join(f"\n  skipped {s['device']}: {s['reason']}" for s in rollout.get("skipped", []))
    if rehearsal is not None:
        rollout = {**rollout, "rehearsal": rehearsal}
    _emit(rollout, as_json,
          f"{rollout['id']}: {model} to {rollout['targets']} device(s), {rollout['phase']}{skipped}")


def _rehearse(api: Any, model: str, options: dict[str, Any], twins: int, scenario_file: Path | None,
              warmup_s: float, timeout_s: float, force: bool, as_json: bool) -> dict[str, Any]:
    """Run the rollout on twins first (edgefleet.twin.rehearsal); RehearsalTripped unless it passed or ``force``."""
    import tempfile

    from edgefleet.twin.rehearsal import RehearsalTripped, rehearse
    from edgefleet.twin.scenario import Scenario, load_scenario

    scenario = load_scenario(scenario_file) if scenario_file is not None else Scenario()
    with tempfile.TemporaryDirectory(prefix="edgefleet-rehearsal-") as root:
        report = rehearse(api, {"model": model, **options}, twins, Path(root), scenario, warmup_s=warmup_s,
                          timeout_s=timeout_s, say=lambda line: typer.echo(line, err=True))
    typer.echo("\n".join(report.lines()), err=True)
    if not report.passed and not force:
        detail = json.dumps(report.to_json(), sort_keys=True) if as_json else report.lines()[0]
        raise RehearsalTripped(f"{detail}; the rollout was not created (--force creates it anyway)")
    return report.to_json()


@rollout_app.command("promote")
def rollout_promote(rollout_id: Annotated[str, typer.Argument(help="a shadow rollout that passed")],
                    waves: Annotated[str, typer.Option(help="cumulative waves: 10%,50%,100% or 1,10,100%")] = "100%",
                    gate: Gates = None, pause_gate: PauseGates = None, window: Window = 60.0,
                    install_timeout: InstallTimeout = 300.0, unknown_timeout: UnknownTimeout = 600.0,
                    inconclusive_timeout: InconclusiveTimeout = 600.0, on_inconclusive: OnInconclusive = "pause",
                    baseline: Baseline = 3600.0,
                    min_windows: Annotated[int | None, typer.Option(help="default: the shadow rollout's")] = None,
                    confidence: Annotated[float | None, typer.Option(help="default: the shadow rollout's")] = None,
                    server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Roll a shadow-passed candidate out to the same devices as a canary (gates: given, or the shadow's that a
    canary can judge)."""
    _choice(on_inconclusive, ("pause", "abort", "proceed"), "--on-inconclusive")
    with _api(server, token) as api:
        rollout = api.promote_rollout(rollout_id, waves=[w.strip() for w in waves.split(",")],
                                      gates=_gates(gate, pause_gate), window_s=window,
                                      install_timeout_s=install_timeout, unknown_timeout_s=unknown_timeout,
                                      inconclusive_timeout_s=inconclusive_timeout, on_inconclusive=on_inconclusive,
                                      baseline_s=baseline, min_windows=min_windows, confidence=confidence)
    _emit(rollout, as_json, f"{rollout['id']}: {rollout['candidate']} promoted from {rollout_id} to "
                            f"{rollout['targets']} device(s), {rollout['phase']}")


@rollout_app.command("list")
def rollout_list(server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """Every rollout and its phase."""
    with _api(server, token) as api:
        rollouts = api.rollouts()
    lines = [f"{r['id']}  {r['candidate']:<20} {r['mode'] or '':<7} {r['phase']:<13} wave {r['wave']}/{r['waves']}  "
             f"{r['reason']}" for r in rollouts]
    _emit(rollouts, as_json, "\n".join(lines) or "no rollouts")


@rollout_app.command("status")
def rollout_status(rollout_id: str, server: Server = "", token: Token = "", as_json: Json = False) -> None:
    """A rollout's phase, progress, devices and audit trail (each decision with its model role and the values
    that caused it)."""
    with _api(server, token) as api:
        r = api.rollout(rollout_id)
    lines = [f"{r['id']}: {r['candidate']} ({r['mode']}) {r['phase']}, wave {r['wave']}/{r['waves']}, "
             f"{r['moved']}/{r['targets']} device(s) moved", f"  {r['reason']}" if r["reason"] else ""]
    if r.get("promoted_from"):
        lines.append(f"  promoted from shadow rollout {r['promoted_from']}")
    if "control_devices" in r:
        lines.append(f"  treatment ({len(r['treatment_devices'])}): {', '.join(r['treatment_devices'])}")
        lines.append(f"  control ({len(r['control_devices'])}): {', '.join(r['control_devices'])}")
    lines += [f"  step {d['step']} {d['kind']:<8} wave {d['wave']} [{d.get('role', 'active')}]: {d['reason']}"
              for d in r.get("decisions", [])]
    _emit(r, as_json, "\n".join(line for line in lines if line))


def _command(action: str, rollout_id: str, note: str, server: str, token: str, as_json: bool) -> None:
    with _api(server, token) as api:
        r = api.rollout_command(rollout_id, action, note or os.environ.get("USER", ""))
    _emit(r, as_json, f"{r['id']}: {r['phase']}")


@rollout_app.command("pause")
def rollout_pause(rollout_id: str, note: Annotated[str, typer.Option(help="why")] = "", server: Server = "",
                  token: Token = "", as_json: Json = False) -> None:
    """Pause a rollout where it is."""
    _command("pause", rollout_id, note, server, token, as_json)


@rollout_app.command("resume")
def rollout_resume(rollout_id: str, note: Annotated[str, typer.Option(help="why")] = "", server: Server = "",
                   token: Token = "", as_json: Json = False) -> None:
    """Resume a paused rollout (over a tripped pause gate: on to the next wave)."""
    _command("resume", rollout_id, note, server, token, as_json)


@rollout_app.command("abort")
def rollout_abort(rollout_id: str, note: Annotated[str, typer.Option(help="why")] = "", server: Server = "",
                  token: Token = "", as_json: Json = False) -> None:
    """Abort a rollout and return every moved device to what it ran before."""
    _command("abort", rollout_id, note, server, token, as_json)
